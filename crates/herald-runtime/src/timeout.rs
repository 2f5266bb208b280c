//! The timeout layer: an attempt that runs too long fails as transient.

use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use tower_layer::Layer;
use tower_service::Service;

use crate::delivery::Delivery;
use crate::error::{HandlerError, TimedOut};

/// Fails an attempt that runs longer than `timeout_ms` with a transient [`TimedOut`]
/// error, so that the retry layer outside it tries again.
///
/// Herald's own rather than `tower::timeout::TimeoutLayer`, whose error is a
/// [`tower::BoxError`]: the runtime must know a timeout is transient without downcasting.
#[derive(Debug, Clone, Copy)]
pub struct TimeoutLayer {
    timeout_ms: u64,
}

impl TimeoutLayer {
    /// A layer allowing each call `timeout_ms` milliseconds.
    pub fn new(timeout_ms: u64) -> Self {
        TimeoutLayer { timeout_ms }
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;

    fn layer(&self, inner: S) -> Timeout<S> {
        Timeout {
            inner,
            timeout_ms: self.timeout_ms,
        }
    }
}

/// The service [`TimeoutLayer`] makes.
#[derive(Debug, Clone)]
pub struct Timeout<S> {
    inner: S,
    timeout_ms: u64,
}

impl<S> Service<Delivery> for Timeout<S>
where
    S: Service<Delivery, Error = HandlerError>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
{
    type Response = S::Response;
    type Error = HandlerError;
    type Future = BoxFuture<'static, Result<S::Response, HandlerError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, delivery: Delivery) -> Self::Future {
        let timeout_ms = self.timeout_ms;
        let call = self.inner.call(delivery);
        Box::pin(async move {
            match tokio::time::timeout(Duration::from_millis(timeout_ms), call).await {
                Ok(result) => result,
                Err(_elapsed) => Err(HandlerError::transient(TimedOut { timeout_ms })),
            }
        })
    }
}
