//! The metrics layer: outcomes and handling time, through the `metrics` facade.

use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tower_layer::Layer;
use tower_service::Service;

use crate::delivery::{Delivery, Outcome};

/// Counter of finished deliveries, labelled `group`, `type` and `outcome`.
pub const EVENTS_HANDLED_TOTAL: &str = "herald_events_handled_total";
/// Histogram of the time from a delivery entering the layer to its outcome, in seconds
/// (every retry and backoff included), labelled `group` and `type`.
pub const HANDLER_DURATION_SECONDS: &str = "herald_handler_duration_seconds";

/// Counts each delivery's outcome in [`EVENTS_HANDLED_TOTAL`] (`outcome` is an
/// [`Outcome::as_str`], or `failed` when the inner service fails) and records its handling
/// time in [`HANDLER_DURATION_SECONDS`], through whatever `metrics` recorder is installed.
///
/// Time is read from tokio's clock, so it follows paused time in tests.
#[derive(Debug, Clone, Copy, Default)]
pub struct MetricsLayer;

impl MetricsLayer {
    /// The layer.
    pub fn new() -> Self {
        MetricsLayer
    }
}

impl<S> Layer<S> for MetricsLayer {
    type Service = Metrics<S>;

    fn layer(&self, inner: S) -> Metrics<S> {
        Metrics { inner }
    }
}

/// The service [`MetricsLayer`] makes.
#[derive(Debug, Clone)]
pub struct Metrics<S> {
    inner: S,
}

impl<S> Service<Delivery> for Metrics<S>
where
    S: Service<Delivery, Response = Outcome>,
    S::Error: Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Outcome;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Outcome, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, delivery: Delivery) -> Self::Future {
        let group = delivery.group.as_str().to_owned();
        let ty = delivery.event().ty.clone();
        let started = tokio::time::Instant::now();
        let call = self.inner.call(delivery);
        Box::pin(async move {
            let result = call.await;
            let outcome = match &result {
                Ok(outcome) => outcome.as_str(),
                Err(_) => "failed",
            };
            metrics::histogram!(
                HANDLER_DURATION_SECONDS,
                "group" => group.clone(),
                "type" => ty.clone(),
            )
            .record(started.elapsed().as_secs_f64());
            metrics::counter!(
                EVENTS_HANDLED_TOTAL,
                "group" => group,
                "type" => ty,
                "outcome" => outcome,
            )
            .increment(1);
            result
        })
    }
}
