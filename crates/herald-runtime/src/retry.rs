//! The retry layer: exponential backoff with full jitter, for transient failures only.

use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use rand::{Rng, RngCore};
use serde::{Deserialize, Serialize};
use tower::ServiceExt;
use tower_layer::Layer;
use tower_service::Service;

use crate::clock::Clock;
use crate::delivery::{Delivery, Failure, Outcome};
use crate::error::{ErrorKind, HandlerError};

/// The bounds of the retry layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryOptions {
    /// The most times the handler is called for one delivery, the first call included.
    /// 1 disables retries.
    pub attempts_max: u32,
    /// No attempt starts later than this after the first one started.
    pub elapsed_max_ms: u64,
    /// The ceiling of the first delay.
    pub delay_initial_ms: u64,
    /// The ceiling's ceiling: delays never exceed this.
    pub delay_max_ms: u64,
}

impl Default for RetryOptions {
    fn default() -> Self {
        RetryOptions {
            attempts_max: 5,
            elapsed_max_ms: 60_000,
            delay_initial_ms: 100,
            delay_max_ms: 10_000,
        }
    }
}

impl RetryOptions {
    /// The most the delay before retry `retry` (1 for the first retry) may be:
    /// `delay_initial_ms · 2^(retry − 1)`, capped at `delay_max_ms`.
    pub fn delay_ceiling_ms(&self, retry: u32) -> u64 {
        let doublings = retry.saturating_sub(1).min(63);
        self.delay_initial_ms
            .saturating_mul(1_u64 << doublings)
            .min(self.delay_max_ms)
    }

    /// The delay before retry `retry`, drawn uniformly from `0..=delay_ceiling_ms(retry)`
    /// ("full jitter"): competing consumers spread out instead of retrying in lockstep.
    pub fn delay_ms(&self, retry: u32, rng: &mut (impl RngCore + ?Sized)) -> u64 {
        rng.gen_range(0..=self.delay_ceiling_ms(retry))
    }
}

/// Calls the inner service again after a transient failure, waiting an exponentially
/// growing, fully jittered delay between attempts, until it succeeds, fails permanently,
/// has been called `attempts_max` times, or the next attempt would start after
/// `elapsed_max_ms`. It then fails with a [`Failure`] carrying the last error, the number of
/// attempts and the first and last failure times.
///
/// When the delivery's shutdown token is cancelled while it waits (or before an attempt),
/// it stops at once and fails with [`Failure::abandoned`] set, so the message is left
/// un-acked rather than dead-lettered. An attempt already running is not interrupted.
///
/// The random delays come from the injected generator, so a seeded one gives the same
/// schedule every run; the failure times come from the injected [`Clock`].
#[derive(Clone)]
pub struct RetryLayer {
    options: RetryOptions,
    rng: Arc<Mutex<dyn RngCore + Send>>,
    clock: Arc<dyn Clock>,
}

impl RetryLayer {
    /// A layer retrying within `options`, drawing delays from `rng`, timing failures by
    /// `clock`.
    pub fn new(
        options: RetryOptions,
        rng: impl RngCore + Send + 'static,
        clock: Arc<dyn Clock>,
    ) -> Self {
        RetryLayer {
            options,
            rng: Arc::new(Mutex::new(rng)),
            clock,
        }
    }
}

impl std::fmt::Debug for RetryLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetryLayer")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Retry<S> {
        Retry {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`RetryLayer`] makes.
#[derive(Clone, Debug)]
pub struct Retry<S> {
    inner: S,
    layer: RetryLayer,
}

impl<S> Service<Delivery> for Retry<S>
where
    S: Service<Delivery, Response = Outcome, Error = HandlerError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Outcome;
    type Error = Failure;
    type Future = BoxFuture<'static, Result<Outcome, Failure>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Failure>> {
        // Readiness is awaited per attempt, on the clone that makes the attempt.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, delivery: Delivery) -> Self::Future {
        let inner = self.inner.clone();
        let layer = self.layer.clone();
        Box::pin(retry(inner, layer, delivery))
    }
}

async fn retry<S>(mut inner: S, layer: RetryLayer, delivery: Delivery) -> Result<Outcome, Failure>
where
    S: Service<Delivery, Response = Outcome, Error = HandlerError>,
{
    let options = layer.options;
    let started = tokio::time::Instant::now();
    let elapsed_max = Duration::from_millis(options.elapsed_max_ms);
    let mut attempts = 0_u32;
    let mut first_failure_at = None;
    loop {
        attempts += 1;
        let result = match inner.ready().await {
            Ok(ready) => ready.call(delivery.clone()).await,
            Err(error) => Err(error),
        };
        let error = match result {
            Ok(outcome) => return Ok(outcome),
            Err(error) => error,
        };
        let now = layer.clock.now();
        let first = *first_failure_at.get_or_insert(now);
        let failure = |error, abandoned| Failure {
            error,
            attempts,
            first_failure_at: first,
            last_failure_at: now,
            abandoned,
        };
        if error.kind() == ErrorKind::Permanent || attempts >= options.attempts_max {
            return Err(failure(error, false));
        }
        let delay_ms = {
            // Not held across an await: the lock guards one draw.
            let mut rng = layer.rng.lock().expect("not poisoned");
            options.delay_ms(attempts, &mut *rng)
        };
        let delay = Duration::from_millis(delay_ms);
        if started.elapsed() + delay > elapsed_max {
            return Err(failure(error, false));
        }
        if delivery.shutdown.is_cancelled() {
            return Err(failure(error, true));
        }
        tracing::debug!(
            attempt = attempts,
            delay_ms,
            error = %error,
            "handler failed, retrying"
        );
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = delivery.shutdown.cancelled() => return Err(failure(error, true)),
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng as _;
    use rand::rngs::StdRng;

    use super::*;

    #[test]
    fn ceilings_double_then_cap_without_overflow() {
        let options = RetryOptions {
            delay_initial_ms: 100,
            delay_max_ms: 1_000,
            ..RetryOptions::default()
        };
        let ceilings: Vec<u64> = (1..=6)
            .map(|retry| options.delay_ceiling_ms(retry))
            .collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1_000, 1_000]);
        assert_eq!(options.delay_ceiling_ms(0), 100);
        assert_eq!(options.delay_ceiling_ms(u32::MAX), 1_000);
    }

    #[test]
    fn delays_cover_zero_to_the_ceiling() {
        let options = RetryOptions {
            delay_initial_ms: 100,
            delay_max_ms: 1_000,
            ..RetryOptions::default()
        };
        let mut rng = StdRng::seed_from_u64(42);
        let delays: Vec<u64> = (0..1_000).map(|_| options.delay_ms(3, &mut rng)).collect();
        assert!(delays.iter().all(|&delay| delay <= 400));
        // Full jitter: the draws spread over the whole range, not around the ceiling.
        assert!(delays.iter().any(|&delay| delay < 40));
        assert!(delays.iter().any(|&delay| delay > 360));
    }
}
