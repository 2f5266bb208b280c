//! What flows through the pipeline: a [`Delivery`] in, an [`Outcome`] out.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use herald_core::Event;
use herald_core::broker::{GroupName, Message, TopicName};
use tokio_util::sync::CancellationToken;

use crate::error::{ErrorKind, HandlerError};

/// One message delivered to one consumer group, as the pipeline's request.
///
/// Cheap to clone (the message is shared), because the retry layer hands a clone to every
/// attempt.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The message: event, topic, partition, offset and delivery attempt.
    pub message: Arc<Message>,
    /// The consumer group the message was delivered to.
    pub group: GroupName,
    /// Cancelled when the consumer shuts down; the retry layer stops waiting when it is.
    pub shutdown: CancellationToken,
}

impl Delivery {
    /// A delivery of `message` to `group`, watching `shutdown`.
    pub fn new(message: Message, group: GroupName, shutdown: CancellationToken) -> Self {
        Delivery {
            message: Arc::new(message),
            group,
            shutdown,
        }
    }

    /// The delivered event.
    pub fn event(&self) -> &Event {
        &self.message.event
    }
}

/// What became of a delivery; the full pipeline never fails, it answers with one of these.
///
/// The caller acks the message for every outcome except [`Outcome::Abandoned`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Outcome {
    /// A handler succeeded; these are the events it published, in order, with causation,
    /// correlation and trace context set (see [`HandlerContext::publish`]).
    ///
    /// [`HandlerContext::publish`]: crate::HandlerContext::publish
    Handled {
        /// The events to publish.
        published: Vec<Event>,
    },
    /// The consumer group handled this event before (the
    /// [idempotency layer](crate::idempotency) found its record), so the handler did not
    /// run; these are the events it published then, to be published again. They carry the
    /// ids they were first published with, so publishing them again is an exact retry.
    Duplicate {
        /// The events to publish.
        published: Vec<Event>,
    },
    /// No handler is registered for the event's type and the policy is
    /// [`UnknownType::Skip`](crate::UnknownType::Skip).
    Skipped,
    /// The event failed permanently or ran out of retries; the record says why.
    DeadLettered(Box<DeadLetter>),
    /// The consumer shut down while the failure was being retried: leave the message
    /// un-acked, so that it is delivered again, and do not dead-letter it.
    Abandoned,
}

impl Outcome {
    /// The outcome as a lower-case word, for logs and the `outcome` metric label.
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Handled { .. } => "handled",
            Outcome::Duplicate { .. } => "duplicate",
            Outcome::Skipped => "skipped",
            Outcome::DeadLettered(_) => "dead_lettered",
            Outcome::Abandoned => "abandoned",
        }
    }
}

/// The record of an event that could not be handled: the event unchanged, and everything
/// an operator needs to decide whether to replay or discard it.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// The event, exactly as delivered.
    pub event: Event,
    /// The last failure's message.
    pub reason: String,
    /// Permanent (dead-lettered at once) or transient (retries ran out).
    pub error_kind: ErrorKind,
    /// How many times the handler was called for this delivery.
    pub attempts: u32,
    /// The handler: the event type it is registered for.
    pub handler: String,
    /// The consumer group that failed to handle it.
    pub group: GroupName,
    /// The topic it was delivered from.
    pub topic: TopicName,
    /// Its partition.
    pub partition: u32,
    /// Its offset within the partition.
    pub offset: u64,
    /// When the first attempt failed.
    pub first_failure_at: DateTime<Utc>,
    /// When the last attempt failed.
    pub last_failure_at: DateTime<Utc>,
}

/// A failure as the retry layer reports it: the last error with the history of attempts.
#[derive(Debug)]
pub struct Failure {
    /// The last attempt's error.
    pub error: HandlerError,
    /// How many times the handler was called.
    pub attempts: u32,
    /// When the first attempt failed.
    pub first_failure_at: DateTime<Utc>,
    /// When the last attempt failed.
    pub last_failure_at: DateTime<Utc>,
    /// The consumer shut down while retrying: the message must be left un-acked, not
    /// dead-lettered.
    pub abandoned: bool,
}

/// An error the dead-letter layer can turn into a [`DeadLetter`]: a [`Failure`] from the
/// retry layer, or a bare [`HandlerError`] when there is no retry layer in between.
pub trait IntoFailure {
    /// The failure; `now` is the time to record for a failure that carries none.
    fn into_failure(self, now: DateTime<Utc>) -> Failure;
}

impl IntoFailure for Failure {
    fn into_failure(self, _now: DateTime<Utc>) -> Failure {
        self
    }
}

impl IntoFailure for HandlerError {
    fn into_failure(self, now: DateTime<Utc>) -> Failure {
        Failure {
            error: self,
            attempts: 1,
            first_failure_at: now,
            last_failure_at: now,
            abandoned: false,
        }
    }
}
