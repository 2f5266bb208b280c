//! [`EventStoreDeadLetters`]: dead letters kept as events in a system stream per group.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use herald_core::broker::{GroupName, TopicName};
use herald_core::store::{self, EventStore};
use herald_core::{Direction, Event, ExpectedVersion, StreamName, Version};
use serde::{Deserialize, Serialize};

use super::{DeadLetterStore, StoreError, dead_letter_id};
use crate::delivery::DeadLetter;
use crate::error::ErrorKind;

/// The `source` of every event this store appends.
pub const EVENT_SOURCE: &str = "/herald/runtime/dead-letters";
/// The type of a `DeadLetterStored` event: its data is a [`DeadLetterRecord`].
pub const STORED_EVENT_TYPE: &str = "herald.dead_letter.stored";
/// The type of a `DeadLetterDiscarded` marker: its data is `{"id"}`.
pub const DISCARDED_EVENT_TYPE: &str = "herald.dead_letter.discarded";
/// The type of a `DeadLetterReplayRequested` marker: its data is `{"id"}`.
pub const REPLAY_REQUESTED_EVENT_TYPE: &str = "herald.dead_letter.replay_requested";
/// The type of a `DeadLetterReplayed` marker: its data is `{"id"}`.
pub const REPLAYED_EVENT_TYPE: &str = "herald.dead_letter.replayed";

/// How many events one read of a group's stream returns at most; a fold reads in pages.
const READ_PAGE_LEN_MAX: usize = 512;

/// How many times a conditional write is tried when another writer appended to the
/// group's stream between the fold and the append.
const APPEND_ATTEMPTS_MAX: u32 = 16;

/// A durable [`DeadLetterStore`] on any [`EventStore`] — in practice the embedded log, so
/// that dead letters survive a restart and the `herald dlq` commands can read them.
///
/// # Layout
///
/// Each consumer group's dead letters live in the system stream `$dlq:<group>`, as events
/// from [`EVENT_SOURCE`]:
///
/// - [`STORED_EVENT_TYPE`] (`DeadLetterStored`) carries the whole record as a
///   [`DeadLetterRecord`]: the original event as a structured CloudEvent plus every field of
///   the [`DeadLetter`]. A later one with the same id replaces the record (and clears a
///   replay request).
/// - [`DISCARDED_EVENT_TYPE`] and [`REPLAYED_EVENT_TYPE`] carry `{"id"}` and remove the
///   record.
/// - [`REPLAY_REQUESTED_EVENT_TYPE`] carries `{"id"}` and marks the record
///   [`ReplayRequested`](DeadLetterStatus::ReplayRequested).
///
/// The current state is the fold of the stream from its first event, read forward in
/// pages: every operation costs a read of the group's whole stream, which is fine for the
/// handful of dead letters a healthy group has. Compacting the stream is later work.
///
/// # Idempotency
///
/// A marker is only appended if the fold shows the record present (and, for a replay
/// request, not already requested), and the append is conditional on the version the fold
/// saw, retried on a conflict. So discarding twice appends one marker and the second call
/// returns `None`, and two processes cannot both discard the same record.
pub struct EventStoreDeadLetters {
    store: Arc<dyn EventStore>,
}

/// A dead letter with what an operator has asked for it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredDeadLetter {
    /// The record.
    pub dead_letter: DeadLetter,
    /// Whether a replay has been requested.
    pub status: DeadLetterStatus,
}

/// Where a stored dead letter stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DeadLetterStatus {
    /// Waiting for an operator to replay or discard it.
    Pending,
    /// An operator asked for a replay; the group's consumer has not replayed it yet.
    ReplayRequested,
}

impl DeadLetterStatus {
    /// The status as a lower-case word: `pending` or `replay-requested`.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterStatus::Pending => "pending",
            DeadLetterStatus::ReplayRequested => "replay-requested",
        }
    }
}

impl fmt::Display for DeadLetterStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What became of a replay request ([`EventStoreDeadLetters::request_replay`]).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ReplayRequest {
    /// The request was recorded now.
    Requested(DeadLetter),
    /// A replay of this dead letter was already requested: nothing was recorded.
    AlreadyRequested(DeadLetter),
}

/// What a group's stream says about one id ([`EventStoreDeadLetters::find`]).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Lookup {
    /// The record is stored.
    Stored(Box<StoredDeadLetter>),
    /// The record was discarded, and not dead-lettered again since.
    Discarded,
    /// The record was replayed successfully, and not dead-lettered again since.
    Replayed,
    /// The group never had a dead letter with this id.
    Unknown,
}

/// The data of a `DeadLetterStored` event: a [`DeadLetter`] as JSON, with the original
/// event as a structured CloudEvent. Also how `herald dlq show` prints a record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetterRecord {
    /// The event, exactly as delivered.
    pub event: Event,
    /// The last failure's message.
    pub reason: String,
    /// `permanent` or `transient`.
    pub error_kind: String,
    /// How many times the handler was called.
    pub attempts: u32,
    /// The handler: the event type it is registered for.
    pub handler: String,
    /// The consumer group that failed to handle it.
    pub group: String,
    /// The topic it was delivered from.
    pub topic: String,
    /// Its partition.
    pub partition: u32,
    /// Its offset within the partition.
    pub offset: u64,
    /// When the first attempt failed.
    pub first_failure_at: DateTime<Utc>,
    /// When the last attempt failed.
    pub last_failure_at: DateTime<Utc>,
}

/// The data of a marker event.
#[derive(Debug, Serialize, Deserialize)]
struct Marker {
    id: String,
}

/// A stored event of a group's stream that does not decode.
#[derive(Debug, thiserror::Error)]
#[error("stored dead-letter event in `{stream}` is invalid: {reason}")]
struct InvalidRecord {
    stream: StreamName,
    reason: String,
}

/// A conditional append kept failing because other writers kept appending.
#[derive(Debug, thiserror::Error)]
#[error("gave up on `{stream}` after {attempts} attempts: other writers kept appending")]
struct Contended {
    stream: StreamName,
    attempts: u32,
}

impl From<&DeadLetter> for DeadLetterRecord {
    fn from(dead_letter: &DeadLetter) -> Self {
        DeadLetterRecord {
            event: dead_letter.event.clone(),
            reason: dead_letter.reason.clone(),
            error_kind: dead_letter.error_kind.as_str().to_owned(),
            attempts: dead_letter.attempts,
            handler: dead_letter.handler.clone(),
            group: dead_letter.group.to_string(),
            topic: dead_letter.topic.to_string(),
            partition: dead_letter.partition,
            offset: dead_letter.offset,
            first_failure_at: dead_letter.first_failure_at,
            last_failure_at: dead_letter.last_failure_at,
        }
    }
}

impl TryFrom<DeadLetterRecord> for DeadLetter {
    type Error = String;

    fn try_from(record: DeadLetterRecord) -> Result<Self, String> {
        let error_kind = match record.error_kind.as_str() {
            "permanent" => ErrorKind::Permanent,
            "transient" => ErrorKind::Transient,
            other => return Err(format!("unknown error kind `{other}`")),
        };
        Ok(DeadLetter {
            event: record.event,
            reason: record.reason,
            error_kind,
            attempts: record.attempts,
            handler: record.handler,
            group: GroupName::new(&record.group).map_err(|error| error.to_string())?,
            topic: TopicName::new(&record.topic).map_err(|error| error.to_string())?,
            partition: record.partition,
            offset: record.offset,
            first_failure_at: record.first_failure_at,
            last_failure_at: record.last_failure_at,
        })
    }
}

/// A group's records as folded from its stream, and the version the fold ended at.
struct Folded {
    version: Option<Version>,
    records: BTreeMap<String, StoredDeadLetter>,
    /// The ids removed and not stored again since, with the marker that removed them.
    removed: BTreeMap<String, Removal>,
}

/// How a record left the store.
#[derive(Debug, Clone, Copy)]
enum Removal {
    Discarded,
    Replayed,
}

impl Folded {
    /// The expectation under which an append keeps this fold valid.
    fn expected(&self) -> ExpectedVersion {
        match self.version {
            Some(version) => ExpectedVersion::Exact(version),
            None => ExpectedVersion::NoStream,
        }
    }
}

impl EventStoreDeadLetters {
    /// A store keeping dead letters in `store`.
    pub fn new(store: Arc<dyn EventStore>) -> Self {
        EventStoreDeadLetters { store }
    }

    /// The stream holding `group`'s dead letters: `$dlq:<group>`.
    pub fn stream(group: &GroupName) -> Result<StreamName, StoreError> {
        StreamName::system(format!("dlq:{group}")).map_err(backend)
    }

    /// Like [`list`](DeadLetterStore::list), with each record's status.
    pub async fn list_stored(
        &self,
        group: &GroupName,
        after: Option<&str>,
        count_max: usize,
    ) -> Result<Vec<StoredDeadLetter>, StoreError> {
        let folded = self.fold(group).await?;
        let start = match after {
            Some(after) => std::ops::Bound::Excluded(after.to_owned()),
            None => std::ops::Bound::Unbounded,
        };
        Ok(folded
            .records
            .range((start, std::ops::Bound::Unbounded))
            .take(count_max)
            .map(|(_, stored)| stored.clone())
            .collect())
    }

    /// Like [`get`](DeadLetterStore::get), with the record's status.
    pub async fn get_stored(
        &self,
        group: &GroupName,
        id: &str,
    ) -> Result<Option<StoredDeadLetter>, StoreError> {
        Ok(self.fold(group).await?.records.remove(id))
    }

    /// What `group`'s stream says about `id`: stored (with its status), discarded,
    /// replayed, or never seen — so that a caller can tell a repeated discard from a typo.
    pub async fn find(&self, group: &GroupName, id: &str) -> Result<Lookup, StoreError> {
        let mut folded = self.fold(group).await?;
        if let Some(stored) = folded.records.remove(id) {
            return Ok(Lookup::Stored(Box::new(stored)));
        }
        Ok(match folded.removed.get(id) {
            Some(Removal::Discarded) => Lookup::Discarded,
            Some(Removal::Replayed) => Lookup::Replayed,
            None => Lookup::Unknown,
        })
    }

    /// Records that an operator asks for the dead letter `id` of `group` to be replayed.
    ///
    /// Idempotent: if a replay is already requested, nothing is recorded and the answer is
    /// [`ReplayRequest::AlreadyRequested`]. `None` if there is no such record.
    pub async fn request_replay(
        &self,
        group: &GroupName,
        id: &str,
    ) -> Result<Option<ReplayRequest>, StoreError> {
        let stream = Self::stream(group)?;
        for _ in 0..APPEND_ATTEMPTS_MAX {
            let folded = self.fold(group).await?;
            let Some(stored) = folded.records.get(id) else {
                return Ok(None);
            };
            if stored.status == DeadLetterStatus::ReplayRequested {
                return Ok(Some(ReplayRequest::AlreadyRequested(
                    stored.dead_letter.clone(),
                )));
            }
            let marker = marker(REPLAY_REQUESTED_EVENT_TYPE, id);
            match self.append(&stream, folded.expected(), marker).await? {
                true => {
                    return Ok(Some(ReplayRequest::Requested(stored.dead_letter.clone())));
                }
                false => continue,
            }
        }
        Err(contended(stream))
    }

    /// Removes the record `id` by appending a marker of type `ty`, if the record is there.
    async fn remove(
        &self,
        group: &GroupName,
        id: &str,
        ty: &str,
    ) -> Result<Option<DeadLetter>, StoreError> {
        let stream = Self::stream(group)?;
        for _ in 0..APPEND_ATTEMPTS_MAX {
            let mut folded = self.fold(group).await?;
            let expected = folded.expected();
            let Some(stored) = folded.records.remove(id) else {
                return Ok(None);
            };
            if self.append(&stream, expected, marker(ty, id)).await? {
                return Ok(Some(stored.dead_letter));
            }
        }
        Err(contended(stream))
    }

    /// Appends `event` to `stream` if `expected` holds: `false` if it did not.
    async fn append(
        &self,
        stream: &StreamName,
        expected: ExpectedVersion,
        event: Event,
    ) -> Result<bool, StoreError> {
        match self.store.append(stream, expected, vec![event]).await {
            Ok(_) => Ok(true),
            Err(store::Error::WrongExpectedVersion { .. }) => Ok(false),
            Err(error) => Err(backend(error)),
        }
    }

    /// Reads `group`'s stream forward from its first event and folds it into its records.
    async fn fold(&self, group: &GroupName) -> Result<Folded, StoreError> {
        let stream = Self::stream(group)?;
        let mut folded = Folded {
            version: None,
            records: BTreeMap::new(),
            removed: BTreeMap::new(),
        };
        let mut from = Version::START;
        loop {
            let page = match self
                .store
                .read_stream(&stream, from, Direction::Forward, READ_PAGE_LEN_MAX)
                .await
            {
                Ok(page) => page,
                Err(store::Error::StreamNotFound { .. }) => return Ok(folded),
                Err(error) => return Err(backend(error)),
            };
            let Some(last) = page.last() else {
                return Ok(folded);
            };
            from = Version(last.version.0 + 1);
            let page_len = page.len();
            for recorded in page {
                folded.version = Some(recorded.version);
                apply(&mut folded, &stream, &recorded.event)?;
            }
            if page_len < READ_PAGE_LEN_MAX {
                return Ok(folded);
            }
        }
    }
}

impl fmt::Debug for EventStoreDeadLetters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventStoreDeadLetters")
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl DeadLetterStore for EventStoreDeadLetters {
    async fn put(&self, dead_letter: DeadLetter) -> Result<(), StoreError> {
        let stream = Self::stream(&dead_letter.group)?;
        let record = DeadLetterRecord::from(&dead_letter);
        let event = Event::new(EVENT_SOURCE, STORED_EVENT_TYPE)
            .with_time_now()
            .with_subject(dead_letter_id(&dead_letter))
            .with_data(serde_json::to_value(&record).expect("a record always serialises"));
        // Unconditional: a put replaces whatever the stream holds for this id.
        self.store
            .append(&stream, ExpectedVersion::Any, vec![event])
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn list(
        &self,
        group: &GroupName,
        after: Option<&str>,
        count_max: usize,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let stored = self.list_stored(group, after, count_max).await?;
        Ok(stored
            .into_iter()
            .map(|stored| stored.dead_letter)
            .collect())
    }

    async fn get(&self, group: &GroupName, id: &str) -> Result<Option<DeadLetter>, StoreError> {
        let stored = self.get_stored(group, id).await?;
        Ok(stored.map(|stored| stored.dead_letter))
    }

    async fn discard(&self, group: &GroupName, id: &str) -> Result<Option<DeadLetter>, StoreError> {
        self.remove(group, id, DISCARDED_EVENT_TYPE).await
    }

    /// Records a `DeadLetterReplayed` marker rather than a discard.
    async fn replayed(
        &self,
        group: &GroupName,
        id: &str,
    ) -> Result<Option<DeadLetter>, StoreError> {
        self.remove(group, id, REPLAYED_EVENT_TYPE).await
    }

    async fn replay_requests(
        &self,
        group: &GroupName,
        count_max: usize,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let folded = self.fold(group).await?;
        Ok(folded
            .records
            .into_values()
            .filter(|stored| stored.status == DeadLetterStatus::ReplayRequested)
            .take(count_max)
            .map(|stored| stored.dead_letter)
            .collect())
    }
}

/// Applies one event of a group's stream to its fold.
fn apply(folded: &mut Folded, stream: &StreamName, event: &Event) -> Result<(), StoreError> {
    let invalid = |reason: String| {
        backend(InvalidRecord {
            stream: stream.clone(),
            reason: format!("event `{}`: {reason}", event.id),
        })
    };
    match event.ty.as_str() {
        STORED_EVENT_TYPE => {
            let record = event
                .data_as::<DeadLetterRecord>()
                .map_err(|error| invalid(error.to_string()))?
                .ok_or_else(|| invalid("no data".to_owned()))?;
            let dead_letter = DeadLetter::try_from(record).map_err(invalid)?;
            let id = dead_letter_id(&dead_letter).to_owned();
            folded.removed.remove(&id);
            folded.records.insert(
                id,
                StoredDeadLetter {
                    dead_letter,
                    status: DeadLetterStatus::Pending,
                },
            );
        }
        DISCARDED_EVENT_TYPE | REPLAYED_EVENT_TYPE | REPLAY_REQUESTED_EVENT_TYPE => {
            let marker = event
                .data_as::<Marker>()
                .map_err(|error| invalid(error.to_string()))?
                .ok_or_else(|| invalid("no data".to_owned()))?;
            let removal = match event.ty.as_str() {
                DISCARDED_EVENT_TYPE => Removal::Discarded,
                REPLAYED_EVENT_TYPE => Removal::Replayed,
                _ => {
                    if let Some(stored) = folded.records.get_mut(&marker.id) {
                        stored.status = DeadLetterStatus::ReplayRequested;
                    }
                    return Ok(());
                }
            };
            if folded.records.remove(&marker.id).is_some() {
                folded.removed.insert(marker.id, removal);
            }
        }
        // A type from a later version of Herald: skipped, so that an older reader still
        // sees the records it understands.
        _ => {}
    }
    Ok(())
}

/// A marker event of type `ty` for the record `id`.
fn marker(ty: &str, id: &str) -> Event {
    Event::new(EVENT_SOURCE, ty)
        .with_time_now()
        .with_subject(id)
        .with_data(serde_json::to_value(Marker { id: id.to_owned() }).expect("serialisable"))
}

fn contended(stream: StreamName) -> StoreError {
    backend(Contended {
        stream,
        attempts: APPEND_ATTEMPTS_MAX,
    })
}

fn backend(error: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::Backend(Box::new(error))
}
