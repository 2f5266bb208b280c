//! The tracing layer: one span per delivery, carrying the event's identity and lineage.

use std::fmt::Display;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tower_layer::Layer;
use tower_service::Service;
use tracing::Instrument;

use crate::delivery::{Delivery, Outcome};

/// The name of the span [`TraceLayer`] opens around each delivery.
pub const SPAN_NAME: &str = "herald.handle";

/// Runs each delivery inside an `INFO` span named [`SPAN_NAME`] with the fields `event.id`,
/// `event.type`, `correlation_id`, `causation_id`, `group`, `topic`, `partition`, `offset`
/// and `attempt` (the broker's delivery attempt), and records `outcome` (an
/// [`Outcome::as_str`], or `failed`) when the delivery is done. Everything inside — every
/// retry, the handler's own events — belongs to that span.
#[derive(Debug, Clone, Copy, Default)]
pub struct TraceLayer;

impl TraceLayer {
    /// The layer.
    pub fn new() -> Self {
        TraceLayer
    }
}

impl<S> Layer<S> for TraceLayer {
    type Service = Trace<S>;

    fn layer(&self, inner: S) -> Trace<S> {
        Trace { inner }
    }
}

/// The service [`TraceLayer`] makes.
#[derive(Debug, Clone)]
pub struct Trace<S> {
    inner: S,
}

impl<S> Service<Delivery> for Trace<S>
where
    S: Service<Delivery, Response = Outcome>,
    S::Error: Display + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Outcome;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Outcome, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, delivery: Delivery) -> Self::Future {
        let message = &delivery.message;
        let event = &message.event;
        let span = tracing::info_span!(
            SPAN_NAME,
            event.id = %event.id,
            event.type = %event.ty,
            correlation_id = event.correlation_id(),
            causation_id = event.causation_id(),
            group = %delivery.group,
            topic = %message.topic,
            partition = message.partition,
            offset = message.offset,
            attempt = message.attempt,
            outcome = tracing::field::Empty,
        );
        let call = {
            let _entered = span.enter();
            self.inner.call(delivery)
        };
        Box::pin(
            async move {
                let result = call.await;
                let span = tracing::Span::current();
                match &result {
                    Ok(outcome) => {
                        span.record("outcome", outcome.as_str());
                    }
                    Err(error) => {
                        span.record("outcome", "failed");
                        tracing::error!(error = %error, "delivery failed");
                    }
                }
                result
            }
            .instrument(span),
        )
    }
}
