//! The dead-letter layer: a failure becomes a [`DeadLetter`] record instead of an error.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tower_layer::Layer;
use tower_service::Service;

use crate::clock::Clock;
use crate::delivery::{DeadLetter, Delivery, IntoFailure, Outcome};

/// Turns every failure of the inner service into an outcome, so the pipeline never fails:
/// a failure abandoned at shutdown into [`Outcome::Abandoned`] (leave the message
/// un-acked), any other — a permanent error, or a transient one that ran out of retries —
/// into [`Outcome::DeadLettered`] with the complete record.
///
/// It records the failure; storing the record is the caller's job.
#[derive(Debug, Clone)]
pub struct DeadLetterLayer {
    clock: Arc<dyn Clock>,
}

impl DeadLetterLayer {
    /// A layer timing failures that carry no time of their own by `clock`.
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        DeadLetterLayer { clock }
    }
}

impl<S: Service<Delivery>> Layer<S> for DeadLetterLayer {
    type Service = DeadLetterService<S>;

    fn layer(&self, inner: S) -> DeadLetterService<S> {
        DeadLetterService {
            inner,
            clock: Arc::clone(&self.clock),
            ready_error: None,
        }
    }
}

/// The service [`DeadLetterLayer`] makes.
#[derive(Debug)]
pub struct DeadLetterService<S: Service<Delivery>> {
    inner: S,
    clock: Arc<dyn Clock>,
    // The inner service failed to become ready: the next call settles with this failure.
    ready_error: Option<S::Error>,
}

impl<S: Service<Delivery> + Clone> Clone for DeadLetterService<S> {
    fn clone(&self) -> Self {
        DeadLetterService {
            inner: self.inner.clone(),
            clock: Arc::clone(&self.clock),
            ready_error: None,
        }
    }
}

impl<S> Service<Delivery> for DeadLetterService<S>
where
    S: Service<Delivery, Response = Outcome>,
    S::Error: IntoFailure + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Outcome;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Outcome, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        if self.ready_error.is_some() {
            return Poll::Ready(Ok(()));
        }
        match self.inner.poll_ready(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
            Poll::Ready(Err(error)) => {
                self.ready_error = Some(error);
                Poll::Ready(Ok(()))
            }
        }
    }

    fn call(&mut self, delivery: Delivery) -> Self::Future {
        let clock = Arc::clone(&self.clock);
        let call = match self.ready_error.take() {
            Some(error) => futures::future::Either::Left(std::future::ready(Err(error))),
            None => futures::future::Either::Right(self.inner.call(delivery.clone())),
        };
        Box::pin(async move {
            let error = match call.await {
                Ok(outcome) => return Ok(outcome),
                Err(error) => error,
            };
            let failure = error.into_failure(clock.now());
            if failure.abandoned {
                tracing::info!(
                    attempts = failure.attempts,
                    error = %failure.error,
                    "shutting down: delivery abandoned, left un-acked"
                );
                return Ok(Outcome::Abandoned);
            }
            let message = &delivery.message;
            tracing::warn!(
                error_kind = %failure.error.kind(),
                attempts = failure.attempts,
                error = %failure.error,
                "event dead-lettered"
            );
            Ok(Outcome::DeadLettered(Box::new(DeadLetter {
                event: message.event.clone(),
                reason: failure.error.message().to_owned(),
                error_kind: failure.error.kind(),
                attempts: failure.attempts,
                handler: message.event.ty.clone(),
                group: delivery.group.clone(),
                topic: message.topic.clone(),
                partition: message.partition,
                offset: message.offset,
                first_failure_at: failure.first_failure_at,
                last_failure_at: failure.last_failure_at,
            })))
        })
    }
}
