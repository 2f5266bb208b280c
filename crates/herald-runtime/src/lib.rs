//! Herald's consumer runtime: the handler pipeline a delivered event goes through.
//!
//! A [`Router`] maps an event type to a typed handler, an `async fn(T, HandlerContext) ->
//! Result<(), HandlerError>` whose `T` is deserialised from the event's `data`. Around it,
//! [tower] layers add what every consumer needs: a tracing span, metrics, deduplication,
//! dead-lettering, retries and a timeout. The whole stack is a [`tower::Service`] from a [`Delivery`] (a
//! broker [`Message`](herald_core::broker::Message) for a consumer group, with a shutdown
//! token) to an [`Outcome`], and knows nothing of any broker: the caller fetches, calls the
//! pipeline, publishes what the handler published, stores a dead letter, and acks — or,
//! for [`Outcome::Abandoned`], does not.
//!
//! That caller is the [`consumer`]: [`ConsumerOptions::build`] makes a [`ConsumerService`]
//! that runs the pipeline for one member of a consumer group — keys in parallel, each key
//! in order, dead letters into a [`DeadLetterStore`], graceful shutdown.
//!
//! # Failures are classified once
//!
//! A handler fails with a [`HandlerError`] that is either [transient](ErrorKind::Transient)
//! (retry it) or [permanent](ErrorKind::Permanent) (dead-letter it now). The router reports
//! data that does not deserialise, and (by policy) an unknown type, as permanent; the
//! timeout layer reports an elapsed timeout as transient. Nothing downstream looks at
//! messages.
//!
//! # The default stack
//!
//! [`PipelineOptions::build_idempotent`] stacks the layers in this order, outermost first
//! ([`PipelineOptions::build`] makes the same stack with the idempotency layer passing
//! every delivery through):
//!
//! ```text
//!  Delivery ─►┌──────────────────────────────────────────────────────────┐
//!             │ TraceLayer      one span per delivery                    │
//!             │ ┌──────────────────────────────────────────────────────┐ │
//!             │ │ MetricsLayer    one count per delivery, final        │ │
//!             │ │ ┌──────────────────────────────────────────────────┐ │ │
//!             │ │ │ IdempotencyLayer  seen ─► Duplicate; record      │ │ │
//!             │ │ │ ┌──────────────────────────────────────────────┐ │ │ │
//!             │ │ │ │ DeadLetterLayer  failure ─► Outcome          │ │ │ │
//!             │ │ │ │ ┌──────────────────────────────────────────┐ │ │ │ │
//!             │ │ │ │ │ RetryLayer   transient ─► backoff, again │ │ │ │ │
//!             │ │ │ │ │ ┌──────────────────────────────────────┐ │ │ │ │ │
//!             │ │ │ │ │ │ TimeoutLayer  per attempt            │ │ │ │ │ │
//!             │ │ │ │ │ │ ┌──────────────────────────────────┐ │ │ │ │ │ │
//!             │ │ │ │ │ │ │ Router ─► handler(T, ctx)        │ │ │ │ │ │ │
//!             │ │ │ │ │ │ └──────────────────────────────────┘ │ │ │ │ │ │
//!             │ │ │ │ │ └──────────────────────────────────────┘ │ │ │ │ │
//!             │ │ │ │ └──────────────────────────────────────────┘ │ │ │ │
//!             │ │ │ └──────────────────────────────────────────────┘ │ │ │
//!             │ │ └──────────────────────────────────────────────────┘ │ │
//!             │ └──────────────────────────────────────────────────────┘ │
//!  Outcome ◄──└──────────────────────────────────────────────────────────┘
//! ```
//!
//! Why this order:
//!
//! - **Trace** is outermost so that everything the other layers log — each retry, the
//!   dead-letter warning, a failed idempotency lookup — is inside the delivery's span,
//!   with its ids.
//! - **Metrics** sits outside idempotency, dead-letter and retry so that it counts each
//!   delivery once, by its final outcome (`handled`, `duplicate`, `skipped`,
//!   `dead_lettered`, `abandoned`), not once per attempt, and times the whole delivery,
//!   store lookups and backoff included.
//! - **Idempotency** sits outside dead-letter and retry so that a duplicate costs one
//!   lookup and never reaches the handler, and so that it sees only the final outcome: it
//!   records a success once, after any retries, and never records a failure (a replayed
//!   dead letter must run again). Its own store failures answer `abandoned` (delivered
//!   again later), not a dead letter: a store outage must not dead-letter good events.
//! - **Dead-letter** sits outside retry so that it sees only what retrying could not fix: a
//!   permanent error, retries exhausted, or an attempt abandoned at shutdown.
//! - **Retry** sits outside the timeout so that each attempt gets the full timeout and a
//!   timed-out attempt is retried like any transient failure.
//! - **Timeout** is innermost, around the handler alone.
//!
//! The layers are ordinary tower layers: build another order, or add tower's own
//! (concurrency limit, rate limit), with [`tower::ServiceBuilder`].
//!
//! # Determinism
//!
//! Retry delays come from an injected random generator and failure times from an injected
//! [`Clock`], and every wait is a tokio timer: under paused tokio time with a seeded
//! generator the pipeline is deterministic, which is how its tests run.

#![forbid(unsafe_code)]

mod clock;
pub mod consumer;
mod dead_letter;
pub mod dead_letter_store;
mod delivery;
mod error;
pub mod idempotency;
pub mod lag;
mod meter;
mod retry;
mod router;
mod timeout;
mod trace;

use std::sync::Arc;

use rand::RngCore;
use serde::{Deserialize, Serialize};
use tower::ServiceBuilder;

pub use clock::{Clock, SystemClock, TokioClock};
pub use consumer::{ConsumerOptions, ConsumerService, OnDeadLetter};
pub use dead_letter::{DeadLetterLayer, DeadLetterService};
pub use dead_letter_store::{DeadLetterStore, EventStoreDeadLetters, InMemoryDeadLetterStore};
pub use delivery::{DeadLetter, Delivery, Failure, IntoFailure, Outcome};
pub use error::{BoxError, ErrorKind, HandlerError, RouteError, TimedOut};
pub use idempotency::{
    EventStoreIdempotency, Idempotency, IdempotencyLayer, IdempotencyStore,
    InMemoryIdempotencyStore,
};
pub use lag::{CONSUMER_LAG, LagOptions, record_lag};
pub use meter::{EVENTS_HANDLED_TOTAL, HANDLER_DURATION_SECONDS, Metrics, MetricsLayer};
pub use retry::{Retry, RetryLayer, RetryOptions};
pub use router::{Handler, HandlerContext, Router, UnknownType};
pub use timeout::{Timeout, TimeoutLayer};
pub use trace::{SPAN_NAME, Trace, TraceLayer};

/// The default stack (see the [crate documentation](crate#the-default-stack)).
pub type Pipeline = Trace<Metrics<Idempotency<DeadLetterService<Retry<Timeout<Router>>>>>>;

/// The bounds of the default stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PipelineOptions {
    /// How long one handler attempt may run before it fails as transient (default 30 s).
    pub timeout_ms: u64,
    /// How failed attempts are retried.
    pub retry: RetryOptions,
}

impl Default for PipelineOptions {
    fn default() -> Self {
        PipelineOptions {
            timeout_ms: 30_000,
            retry: RetryOptions::default(),
        }
    }
}

impl PipelineOptions {
    /// The default stack around `router` without deduplication: trace, metrics, a disabled
    /// idempotency layer (it passes every delivery through), dead-letter, retry (delays
    /// drawn from `rng`), timeout; failure times read from `clock`.
    ///
    /// Every redelivery of an event runs its handler again and publishes its events again,
    /// with new ids unless the handler sets them.
    pub fn build(
        self,
        router: Router,
        rng: impl RngCore + Send + 'static,
        clock: Arc<dyn Clock>,
    ) -> Pipeline {
        self.stack(router, IdempotencyLayer::disabled(), rng, clock)
    }

    /// The default stack around `router` with deduplication: like
    /// [`build`](Self::build), with an idempotency layer recording handled events in
    /// `store`, so that each event id is handled once per consumer group and the events its
    /// handler publishes are published once (see [`idempotency`]).
    pub fn build_idempotent(
        self,
        router: Router,
        store: Arc<dyn IdempotencyStore>,
        rng: impl RngCore + Send + 'static,
        clock: Arc<dyn Clock>,
    ) -> Pipeline {
        self.stack(router, IdempotencyLayer::new(store), rng, clock)
    }

    fn stack(
        self,
        router: Router,
        idempotency: IdempotencyLayer,
        rng: impl RngCore + Send + 'static,
        clock: Arc<dyn Clock>,
    ) -> Pipeline {
        ServiceBuilder::new()
            .layer(TraceLayer::new())
            .layer(MetricsLayer::new())
            .layer(idempotency)
            .layer(DeadLetterLayer::new(Arc::clone(&clock)))
            .layer(RetryLayer::new(self.retry, rng, clock))
            .layer(TimeoutLayer::new(self.timeout_ms))
            .service(router)
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use super::*;

    // The default stack is a cloneable, sendable service that never fails: this stops
    // compiling if a layer ever breaks that.
    #[allow(dead_code)]
    fn pipeline_is_an_infallible_service(pipeline: Pipeline) {
        fn check<S>(_: S)
        where
            S: tower_service::Service<Delivery, Response = Outcome, Error = Infallible>
                + Clone
                + Send
                + 'static,
            S::Future: Send + 'static,
        {
        }
        check(pipeline);
    }

    // A clock is shared as a trait object.
    #[allow(dead_code)]
    fn clock_is_object_safe(clock: Arc<dyn Clock>) -> Arc<dyn Clock> {
        clock
    }
}
