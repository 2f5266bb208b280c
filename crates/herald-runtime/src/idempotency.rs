//! The idempotency layer: a consumer group handles each event id once, and publishes its
//! outputs once, however often the event is delivered.
//!
//! Delivery is at least once: a member that crashes before its ack is committed, or loses
//! its partition in a rebalance, sees the event again. [`IdempotencyLayer`] remembers, per
//! consumer group and event id, that an event was handled and which events its handler
//! published, in an [`IdempotencyStore`]:
//!
//! - **Before the handler**, it looks the event up. When the group handled it already, the
//!   handler does not run: the answer is [`Outcome::Duplicate`] carrying the events recorded
//!   then, which the consumer publishes again — the same events, with the same ids — and
//!   acks.
//! - **After the handler** answers [`Outcome::Handled`], it records the event with the
//!   handler's published events, durably, and only then answers `Handled`. If another
//!   delivery of the same event recorded it first (two members handled it at once during a
//!   rebalance), the record that stands wins: the answer is [`Outcome::Duplicate`] with
//!   *its* events, so both members publish the same ones.
//! - **Other outcomes** ([`Skipped`](Outcome::Skipped), [`DeadLettered`](Outcome::DeadLettered),
//!   [`Abandoned`](Outcome::Abandoned)) are not recorded: a dead letter replayed later must
//!   run again.
//! - **A store failure**, on the lookup or on the record, answers
//!   [`Outcome::Abandoned`] with a warning: the consumer leaves the message un-acked and
//!   runs nothing more of its key in this member, so it is delivered again when the member
//!   restarts or the partition moves — never lost, never doubled. A store outage does not
//!   dead-letter good events.
//!
//! # What is exactly once, and what is not
//!
//! The consumer publishes a handler's events only after the pipeline returns. So a crash
//! anywhere leaves either no record — the handler runs again, and its earlier outputs were
//! never published — or a record whose outputs are published on the next delivery, with
//! the ids they were recorded with. On the embedded broker, publishing events whose ids are
//! already stored, grouped the same way, is an exact retry that stores nothing new: **the
//! events a handler publishes through its [`HandlerContext`](crate::HandlerContext) reach
//! the topic exactly once.**
//!
//! Not covered:
//!
//! - **Effects outside Herald** — an HTTP call, a write to another database — happen at
//!   least once: the handler may run again after a crash between the effect and the record.
//!   Only an effect written in the same transaction as the record (the SQL inbox) is exactly
//!   once.
//! - **A broker whose publish is not idempotent on event ids** may store a re-published
//!   event twice. The copies carry the same event id, so a downstream consumer's own
//!   idempotency layer drops the second.
//! - **The handler itself** may run more than once for one event (crash before the record,
//!   or two members at once in a rebalance); only one run's outputs are published.
//!
//! # Contract of an [`IdempotencyStore`]
//!
//! A record is keyed by (consumer group, event id); an event id is any string.
//!
//! - [`get`](IdempotencyStore::get) MUST return the published events of the record of the
//!   key, exactly as they were put (same ids, same attributes, same data), or `None` if
//!   there is none. It MUST see every record whose `put` returned `Ok` before the `get`
//!   started.
//! - [`put`](IdempotencyStore::put) MUST make the record durable (per the backend's
//!   documented durability) before it returns `Ok`.
//! - A record MUST NOT change once stored: a `put` of a key that has a record keeps the
//!   record and answers [`Put::Kept`] with its events. Of concurrent `put`s of one key,
//!   exactly one answers [`Put::Stored`], and every other answers `Kept` with that one's
//!   events.
//! - Keys MUST NOT collide: two different (group, id) pairs are two records, whatever the
//!   backend does to map them onto its storage.
//! - A failure SHOULD be reported as [`StoreError`], never by a panic; after a failed `put`
//!   the record may or may not be stored, and a later `get` or `put` tells.
//!
//! [`InMemoryIdempotencyStore`] is the implementation for tests: it forgets everything when
//! dropped. [`EventStoreIdempotency`] is the durable one, on any
//! [`EventStore`](herald_core::EventStore) (see its documentation for the layout and the
//! cost).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use async_trait::async_trait;
use futures::future::{BoxFuture, Either};
use herald_core::Event;
use herald_core::broker::GroupName;
use tower::ServiceExt as _;
use tower_layer::Layer;
use tower_service::Service;

use crate::delivery::{Delivery, Outcome};

mod event_store;

pub use event_store::{EVENT_SOURCE, EventStoreIdempotency, HANDLED_EVENT_TYPE, HandledRecord};

/// Remembers which events each consumer group handled, with the events each handler
/// published; see the [module documentation](self) for the contract.
///
/// Object-safe: the layer holds `Arc<dyn IdempotencyStore>`.
#[async_trait]
pub trait IdempotencyStore: Send + Sync + 'static {
    /// The events published when `group` handled the event `event_id`, or `None` if the
    /// group has no record of handling it.
    async fn get(
        &self,
        group: &GroupName,
        event_id: &str,
    ) -> Result<Option<Vec<Event>>, StoreError>;

    /// Records, durably, that `group` handled the event `event_id` and published
    /// `published`; keeps an earlier record of the same key instead.
    async fn put(
        &self,
        group: &GroupName,
        event_id: &str,
        published: &[Event],
    ) -> Result<Put, StoreError>;
}

/// What a [`put`](IdempotencyStore::put) did.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Put {
    /// This put stored the record.
    Stored,
    /// The key had a record already, which stays: these are its published events.
    Kept {
        /// The events of the record that stands.
        published: Vec<Event>,
    },
}

/// Why an idempotency store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A backend-specific failure.
    #[error("idempotency store failure")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// An [`IdempotencyStore`] in memory, for tests: not durable, and nothing bounds it.
#[derive(Default)]
pub struct InMemoryIdempotencyStore {
    // Locked only for map operations, never across an await.
    records: Mutex<HashMap<(GroupName, String), Vec<Event>>>,
}

impl InMemoryIdempotencyStore {
    /// An empty store.
    pub fn new() -> Self {
        InMemoryIdempotencyStore::default()
    }

    /// How many records the store holds, over every group.
    pub fn len(&self) -> usize {
        self.records.lock().expect("not poisoned").len()
    }

    /// Whether the store holds no record.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl fmt::Debug for InMemoryIdempotencyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InMemoryIdempotencyStore")
            .field("records", &self.len())
            .finish()
    }
}

#[async_trait]
impl IdempotencyStore for InMemoryIdempotencyStore {
    async fn get(
        &self,
        group: &GroupName,
        event_id: &str,
    ) -> Result<Option<Vec<Event>>, StoreError> {
        let records = self.records.lock().expect("not poisoned");
        Ok(records.get(&(group.clone(), event_id.to_owned())).cloned())
    }

    async fn put(
        &self,
        group: &GroupName,
        event_id: &str,
        published: &[Event],
    ) -> Result<Put, StoreError> {
        let mut records = self.records.lock().expect("not poisoned");
        match records.entry((group.clone(), event_id.to_owned())) {
            std::collections::hash_map::Entry::Occupied(entry) => Ok(Put::Kept {
                published: entry.get().clone(),
            }),
            std::collections::hash_map::Entry::Vacant(entry) => {
                entry.insert(published.to_vec());
                Ok(Put::Stored)
            }
        }
    }
}

/// Handles each event id once per consumer group: see the [module documentation](self).
///
/// [`IdempotencyLayer::disabled`] makes a layer that passes every delivery through
/// untouched, so that one pipeline type serves consumers with and without deduplication.
#[derive(Clone)]
pub struct IdempotencyLayer {
    store: Option<Arc<dyn IdempotencyStore>>,
}

impl IdempotencyLayer {
    /// A layer recording handled events in `store`.
    pub fn new(store: Arc<dyn IdempotencyStore>) -> Self {
        IdempotencyLayer { store: Some(store) }
    }

    /// A layer that passes every delivery through to the inner service, recording nothing.
    pub fn disabled() -> Self {
        IdempotencyLayer { store: None }
    }

    /// Whether the layer deduplicates (it has a store).
    pub fn is_enabled(&self) -> bool {
        self.store.is_some()
    }
}

impl fmt::Debug for IdempotencyLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("enabled", &self.is_enabled())
            .finish()
    }
}

impl<S> Layer<S> for IdempotencyLayer {
    type Service = Idempotency<S>;

    fn layer(&self, inner: S) -> Idempotency<S> {
        Idempotency {
            inner,
            store: self.store.clone(),
        }
    }
}

/// The service [`IdempotencyLayer`] makes.
#[derive(Clone)]
pub struct Idempotency<S> {
    inner: S,
    store: Option<Arc<dyn IdempotencyStore>>,
}

impl<S: fmt::Debug> fmt::Debug for Idempotency<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotency")
            .field("inner", &self.inner)
            .field("enabled", &self.store.is_some())
            .finish()
    }
}

impl<S> Service<Delivery> for Idempotency<S>
where
    S: Service<Delivery, Response = Outcome> + Clone + Send + 'static,
    S::Error: Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Outcome;
    type Error = S::Error;
    type Future = Either<S::Future, BoxFuture<'static, Result<Outcome, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        match self.store {
            None => self.inner.poll_ready(cx),
            // The inner service is called after the lookup, if at all: its readiness is
            // awaited then, on the clone that makes the call.
            Some(_) => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, delivery: Delivery) -> Self::Future {
        match &self.store {
            None => Either::Left(self.inner.call(delivery)),
            Some(store) => Either::Right(Box::pin(deduplicate(
                self.inner.clone(),
                Arc::clone(store),
                delivery,
            ))),
        }
    }
}

/// Looks the delivery up, runs the inner service if it is new, and records a success.
async fn deduplicate<S>(
    inner: S,
    store: Arc<dyn IdempotencyStore>,
    delivery: Delivery,
) -> Result<Outcome, S::Error>
where
    S: Service<Delivery, Response = Outcome>,
{
    let group = delivery.group.clone();
    let event_id = delivery.event().id.clone();
    match store.get(&group, &event_id).await {
        Ok(Some(published)) => {
            tracing::debug!(
                published = published.len(),
                "handled before by this group: not handling it again"
            );
            return Ok(Outcome::Duplicate { published });
        }
        Ok(None) => {}
        Err(error) => {
            tracing::warn!(
                error = %error,
                cause = %Causes(&error),
                "idempotency lookup failed: delivery abandoned, left un-acked"
            );
            return Ok(Outcome::Abandoned);
        }
    }
    let outcome = inner.oneshot(delivery).await?;
    let Outcome::Handled { published } = outcome else {
        return Ok(outcome);
    };
    match store.put(&group, &event_id, &published).await {
        Ok(Put::Stored) => Ok(Outcome::Handled { published }),
        Ok(Put::Kept { published }) => {
            tracing::debug!(
                published = published.len(),
                "handled concurrently by another delivery, which recorded it first"
            );
            Ok(Outcome::Duplicate { published })
        }
        Err(error) => {
            tracing::warn!(
                error = %error,
                cause = %Causes(&error),
                "recording the handled event failed: delivery abandoned, left un-acked"
            );
            Ok(Outcome::Abandoned)
        }
    }
}

/// An error's causes, `why: why that`, for a log field next to the error itself.
struct Causes<'a>(&'a (dyn std::error::Error + 'static));

impl fmt::Display for Causes<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut cause = self.0.source();
        let mut first = true;
        while let Some(error) = cause {
            if !first {
                f.write_str(": ")?;
            }
            write!(f, "{error}")?;
            first = false;
            cause = error.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Keeps the store object-safe: this stops compiling if it ever isn't.
    #[allow(dead_code)]
    fn object_safe(store: Arc<dyn IdempotencyStore>) -> Arc<dyn IdempotencyStore> {
        store
    }

    #[test]
    fn causes_are_listed_without_the_error_itself() {
        let error = StoreError::Backend(Box::new(std::io::Error::other("disk gone")));
        assert_eq!(Causes(&error).to_string(), "disk gone");
    }
}
