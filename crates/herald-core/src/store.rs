//! The [`EventStore`] trait: streams of events with optimistic concurrency, one global order
//! and catch-up-then-live subscriptions.
//!
//! # Contract
//!
//! Every implementation MUST keep these promises; the conformance suite
//! (`herald_core::conformance`, feature `test-util`) checks them.
//!
//! - **Durability.** When `append` returns `Ok`, the events are durable per the backend's
//!   documented setting (the embedded log: synced to disk).
//! - **Atomicity.** An append stores all of its events or none; no reader ever sees part of
//!   a batch.
//! - **Optimistic concurrency.** An append whose [`ExpectedVersion`] does not hold fails with
//!   [`Error::WrongExpectedVersion`], which carries the stream's actual version.
//! - **Idempotency.** Re-appending a batch whose event ids are exactly those of one earlier
//!   append, in the same order, to the same stream with an expected version that held for
//!   that append, succeeds and returns the original versions and positions without storing
//!   anything. Any other append containing an already stored event id (a subset, a superset,
//!   another order, another stream, an expectation that did not hold then) fails with
//!   [`Error::DuplicateEventId`].
//! - **Order.** Versions within a stream start at 0 and are contiguous. Positions are
//!   contiguous and give one total order: an event appended after another one was
//!   acknowledged has a greater position.
//! - **Subscriptions** deliver every event from the requested start in order, first the ones
//!   already stored (catch-up), then new ones as they are appended (live), with no gap and no
//!   duplicate at the switch, under concurrent writers.
//! - **Soft delete.** A deleted stream reads as [`Error::StreamDeleted`]; its events stay in
//!   the global log. Appending to it again revives it: versions continue after the last one,
//!   and only the events appended after the deletion are visible in the stream.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::stream::BoxStream;

use crate::event::{self, Event};
use crate::stream::{Direction, ExpectedVersion, Position, StreamName, Version};

/// A stream of events from a subscription.
pub type Subscription = BoxStream<'static, Result<RecordedEvent, Error>>;

/// An event as stored: the envelope and where it sits.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedEvent {
    /// The stream the event belongs to.
    pub stream: StreamName,
    /// Its version within the stream.
    pub version: Version,
    /// Its position in the global log.
    pub position: Position,
    /// When the store accepted it.
    pub recorded_at: DateTime<Utc>,
    /// The event itself, exactly as appended.
    pub event: Event,
}

/// Where the events of a successful append were stored, in the order they were given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// One entry per appended event.
    pub events: Vec<AppendedEvent>,
}

/// Where one appended event was stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendedEvent {
    /// The event's id.
    pub id: String,
    /// Its version within the stream.
    pub version: Version,
    /// Its position in the global log.
    pub position: Position,
}

impl Appended {
    /// The stream's version after the append: the version of its last event.
    pub fn last_version(&self) -> Option<Version> {
        self.events.last().map(|event| event.version)
    }
}

/// Why an event store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The stream's state did not match the append's expected version.
    #[error("wrong expected version for stream `{stream}`: expected {expected}, actual {}", display_actual(*.actual))]
    WrongExpectedVersion {
        /// The stream appended to.
        stream: StreamName,
        /// What the caller expected.
        expected: ExpectedVersion,
        /// The stream's last version (`None`: the stream does not exist or is deleted).
        actual: Option<Version>,
    },
    /// An event id of the append is already stored, and the append is not a retry of the
    /// append that stored it.
    #[error("event id `{id}` is already stored at {stream}@{version}, by another append")]
    DuplicateEventId {
        /// The event id.
        id: String,
        /// The stream holding the stored event.
        stream: StreamName,
        /// The stored event's version.
        version: Version,
    },
    /// The same event id appears twice in one append.
    #[error("event id `{id}` appears more than once in the batch")]
    DuplicateInBatch {
        /// The event id.
        id: String,
    },
    /// The stream has no events.
    #[error("stream `{stream}` not found")]
    StreamNotFound {
        /// The stream.
        stream: StreamName,
    },
    /// The stream was deleted.
    #[error("stream `{stream}` is deleted")]
    StreamDeleted {
        /// The stream.
        stream: StreamName,
    },
    /// An event of the append is not a valid CloudEvent.
    #[error("event {index} of the append is invalid: {error}")]
    InvalidEvent {
        /// 0-based index of the event in the append.
        index: usize,
        /// What is wrong with it.
        error: event::Error,
    },
    /// An append carried no events.
    #[error("an append needs at least one event")]
    EmptyAppend,
    /// An append is larger than the store accepts in one atomic batch.
    #[error("the append is {size} bytes, more than the limit of {limit} bytes")]
    AppendTooLarge {
        /// The append's encoded size.
        size: u64,
        /// The configured limit.
        limit: u64,
    },
    /// Reading or writing the storage failed.
    #[error("storage i/o failed")]
    Io(#[source] Arc<std::io::Error>),
    /// The store stopped accepting writes after a failure it cannot recover from while
    /// running (e.g. a failed sync); reopen it to recover.
    #[error("the store failed and accepts no more writes; reopen it to recover")]
    Failed(#[source] Arc<std::io::Error>),
    /// Stored data is damaged.
    #[error("stored data is corrupt: {detail}")]
    Corrupt {
        /// Where and what.
        detail: String,
    },
    /// The store has been closed.
    #[error("the store is closed")]
    Closed,
    /// A backend-specific failure.
    #[error("backend failure")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
}

fn display_actual(actual: Option<Version>) -> String {
    match actual {
        Some(version) => version.to_string(),
        None => "no stream".to_owned(),
    }
}

/// The checks every store makes on an append before anything else: at least one event,
/// every event valid, no id twice.
pub fn check_append(events: &[Event]) -> Result<(), Error> {
    if events.is_empty() {
        return Err(Error::EmptyAppend);
    }
    let mut ids = std::collections::HashSet::with_capacity(events.len());
    for (index, event) in events.iter().enumerate() {
        event
            .validate()
            .map_err(|error| Error::InvalidEvent { index, error })?;
        if !ids.insert(event.id.as_str()) {
            return Err(Error::DuplicateInBatch {
                id: event.id.clone(),
            });
        }
    }
    Ok(())
}

impl From<std::io::Error> for Error {
    fn from(error: std::io::Error) -> Self {
        Error::Io(Arc::new(error))
    }
}

/// A store of event streams with one global order.
///
/// The trait is object-safe: the runtime, server and CLI hold it as `Arc<dyn EventStore>`.
/// See the [module documentation](self) for the contract every implementation keeps.
#[async_trait]
pub trait EventStore: Send + Sync + 'static {
    /// Appends `events` to `stream` atomically if `expected` holds.
    async fn append(
        &self,
        stream: &StreamName,
        expected: ExpectedVersion,
        events: Vec<Event>,
    ) -> Result<Appended, Error>;

    /// Reads up to `limit` events of `stream` starting at version `from` (inclusive) in
    /// `direction`. Reading backward from [`Version::END`] starts at the last event.
    async fn read_stream(
        &self,
        stream: &StreamName,
        from: Version,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, Error>;

    /// Reads up to `limit` events of the global log starting at `from` (inclusive) in
    /// `direction`. Reading backward from [`Position::END`] starts at the last event.
    async fn read_all(
        &self,
        from: Position,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, Error>;

    /// The version of the stream's last event; `None` when it has none or is deleted.
    async fn stream_version(&self, stream: &StreamName) -> Result<Option<Version>, Error>;

    /// The position of the last event of the log; `None` when the log is empty.
    async fn head(&self) -> Result<Option<Position>, Error>;

    /// Every event from position `from` (inclusive): catch-up, then live.
    async fn subscribe_all(&self, from: Position) -> Result<Subscription, Error>;

    /// Every event of `stream` from version `from` (inclusive): catch-up, then live. The
    /// stream need not exist yet.
    async fn subscribe_stream(
        &self,
        stream: &StreamName,
        from: Version,
    ) -> Result<Subscription, Error>;

    /// Soft-deletes `stream` if `expected` holds.
    ///
    /// `expected` is checked first, as for [`append`](Self::append): a deleted or unknown
    /// stream has no version, so `StreamExists` and `Exact` fail with
    /// [`Error::WrongExpectedVersion`]. When it holds but there is nothing to delete, the
    /// call fails with [`Error::StreamNotFound`] (never existed) or [`Error::StreamDeleted`]
    /// (already deleted).
    async fn delete_stream(
        &self,
        stream: &StreamName,
        expected: ExpectedVersion,
    ) -> Result<(), Error>;
}

#[cfg(test)]
mod tests {
    use super::*;

    // Keeps the trait object-safe: this stops compiling if it ever isn't.
    #[allow(dead_code)]
    fn object_safe(store: Arc<dyn EventStore>) -> Arc<dyn EventStore> {
        store
    }
}
