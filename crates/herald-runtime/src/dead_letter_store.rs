//! Where dead letters are kept until an operator replays or discards them.
//!
//! A [`DeadLetterStore`] holds the [`DeadLetter`] records of every consumer group, each
//! identified within its group by the id of its event. The consumer
//! ([`ConsumerService`](crate::consumer::ConsumerService)) puts a record there before it
//! acks the dead-lettered message, so a dead letter is never lost between the two; the
//! consumer's [`Handle`](crate::consumer::Handle) discards and replays them.
//!
//! [`InMemoryDeadLetterStore`] is the implementation for tests: it forgets everything when
//! dropped. [`EventStoreDeadLetters`] is the durable one: it keeps each group's dead letters
//! as events in a system stream of any [`EventStore`](herald_core::EventStore) — the
//! embedded log in practice — so that dead letters and parked keys survive a restart, and
//! the `herald dlq` commands can list, discard and request replays of them.
//!
//! # Contract
//!
//! - [`put`](DeadLetterStore::put) MUST make the record durable (per the backend's
//!   documented durability) before it returns `Ok`, and replaces a record of the same group
//!   and id: an event dead-lettered again after a replay keeps one record, the latest.
//! - [`list`](DeadLetterStore::list) returns a group's records in ascending id order, at
//!   most `count_max` of them, starting after the id `after`; paging through it with the
//!   last id returned sees every record that is not put or discarded meanwhile.
//! - [`discard`](DeadLetterStore::discard) and [`replayed`](DeadLetterStore::replayed)
//!   remove a record and return it; removing a record that is not there returns `None`, so
//!   both are idempotent.
//! - [`replay_requests`](DeadLetterStore::replay_requests) returns the records whose
//!   replay was requested and not yet answered; a [`put`](DeadLetterStore::put) of the same
//!   id (the replay failed again) answers the request as much as a removal does.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Mutex;

use async_trait::async_trait;
use herald_core::broker::GroupName;

use crate::delivery::DeadLetter;

mod event_store;

pub use event_store::{
    DISCARDED_EVENT_TYPE, DeadLetterRecord, DeadLetterStatus, EVENT_SOURCE, EventStoreDeadLetters,
    Lookup, REPLAY_REQUESTED_EVENT_TYPE, REPLAYED_EVENT_TYPE, ReplayRequest, STORED_EVENT_TYPE,
    StoredDeadLetter,
};

/// Keeps dead letters per consumer group; see the [module documentation](self).
///
/// Object-safe: the consumer holds `Arc<dyn DeadLetterStore>`.
#[async_trait]
pub trait DeadLetterStore: Send + Sync + 'static {
    /// Stores `dead_letter` under its group and its event's id, replacing a record of the
    /// same group and id.
    async fn put(&self, dead_letter: DeadLetter) -> Result<(), StoreError>;

    /// At most `count_max` records of `group` in ascending id order, starting after the id
    /// `after` (from the first when `None`).
    async fn list(
        &self,
        group: &GroupName,
        after: Option<&str>,
        count_max: usize,
    ) -> Result<Vec<DeadLetter>, StoreError>;

    /// The record of `group` with the id `id`, if there is one.
    async fn get(&self, group: &GroupName, id: &str) -> Result<Option<DeadLetter>, StoreError>;

    /// Removes the record of `group` with the id `id`; returns it, or `None` if there was
    /// none.
    async fn discard(&self, group: &GroupName, id: &str) -> Result<Option<DeadLetter>, StoreError>;

    /// Removes the record of `group` with the id `id` because its replay succeeded;
    /// returns it, or `None` if there was none. A store that keeps history SHOULD record
    /// it as replayed rather than discarded. By default, the same as
    /// [`discard`](DeadLetterStore::discard).
    async fn replayed(
        &self,
        group: &GroupName,
        id: &str,
    ) -> Result<Option<DeadLetter>, StoreError> {
        self.discard(group, id).await
    }

    /// At most `count_max` records of `group` whose replay was requested through the store
    /// itself (by another process, e.g. `herald dlq replay`), in ascending id order. The
    /// group's running consumer polls this and replays them; a request is answered when
    /// the record is [replayed](DeadLetterStore::replayed) or [put](DeadLetterStore::put)
    /// again. By default none: a store without such requests is driven by
    /// [`Handle::replay`](crate::consumer::Handle::replay) alone.
    async fn replay_requests(
        &self,
        group: &GroupName,
        count_max: usize,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let _ = (group, count_max);
        Ok(Vec::new())
    }
}

/// The id of a dead letter within its group: the id of its event.
pub fn dead_letter_id(dead_letter: &DeadLetter) -> &str {
    &dead_letter.event.id
}

/// Why a dead-letter store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A backend-specific failure.
    #[error("dead-letter store failure")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// A [`DeadLetterStore`] in memory, for tests: not durable, and nothing bounds it.
#[derive(Default)]
pub struct InMemoryDeadLetterStore {
    // Locked only for map operations, never across an await.
    records: Mutex<BTreeMap<(GroupName, String), DeadLetter>>,
}

impl InMemoryDeadLetterStore {
    /// An empty store.
    pub fn new() -> Self {
        InMemoryDeadLetterStore::default()
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

impl fmt::Debug for InMemoryDeadLetterStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InMemoryDeadLetterStore")
            .field("records", &self.len())
            .finish()
    }
}

#[async_trait]
impl DeadLetterStore for InMemoryDeadLetterStore {
    async fn put(&self, dead_letter: DeadLetter) -> Result<(), StoreError> {
        let key = (
            dead_letter.group.clone(),
            dead_letter_id(&dead_letter).to_owned(),
        );
        self.records
            .lock()
            .expect("not poisoned")
            .insert(key, dead_letter);
        Ok(())
    }

    async fn list(
        &self,
        group: &GroupName,
        after: Option<&str>,
        count_max: usize,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let records = self.records.lock().expect("not poisoned");
        Ok(records
            .range((group.clone(), after.unwrap_or_default().to_owned())..)
            .take_while(|((record_group, _), _)| record_group == group)
            .filter(|((_, id), _)| after.is_none_or(|after| id.as_str() > after))
            .take(count_max)
            .map(|(_, record)| record.clone())
            .collect())
    }

    async fn get(&self, group: &GroupName, id: &str) -> Result<Option<DeadLetter>, StoreError> {
        let records = self.records.lock().expect("not poisoned");
        Ok(records.get(&(group.clone(), id.to_owned())).cloned())
    }

    async fn discard(&self, group: &GroupName, id: &str) -> Result<Option<DeadLetter>, StoreError> {
        let mut records = self.records.lock().expect("not poisoned");
        Ok(records.remove(&(group.clone(), id.to_owned())))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    // Keeps the store object-safe: this stops compiling if it ever isn't.
    #[allow(dead_code)]
    fn object_safe(store: Arc<dyn DeadLetterStore>) -> Arc<dyn DeadLetterStore> {
        store
    }
}
