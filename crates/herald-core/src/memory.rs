//! [`InMemoryStore`]: a simple, correct [`EventStore`] that keeps everything in memory.
//!
//! It is the reference implementation of the [`EventStore`](crate::store) contract and a
//! fast fake for unit tests of the components built on the trait. It passes the conformance
//! suite ([`crate::conformance`]). It is not durable: everything is lost when the store is
//! dropped, and nothing bounds its memory.
//!
//! One mutex guards the whole state, so appends are serialised and trivially atomic;
//! live subscriptions wait on a [`tokio::sync::watch`] channel that carries the length of
//! the log.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use async_trait::async_trait;
use futures::StreamExt as _;
use tokio::sync::watch;

use crate::event::Event;
use crate::store::{Appended, AppendedEvent, Error, EventStore, RecordedEvent, Subscription};
use crate::stream::{Direction, ExpectedVersion, Position, StreamName, Version};

/// How many events a subscription copies out of the store per lock acquisition; bounds how
/// long a subscriber holds the lock and how much it buffers.
const SUBSCRIPTION_CHUNK_LEN_MAX: usize = 256;

/// An [`EventStore`] kept in memory; see the [module documentation](self).
///
/// Cloning is cheap and gives another handle to the same store.
#[derive(Clone, Default)]
pub struct InMemoryStore {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    /// The number of events in the log, published after every append.
    log_len: watch::Sender<u64>,
}

#[derive(Default)]
struct State {
    /// Every event ever appended; the index is the position.
    log: Vec<RecordedEvent>,
    streams: HashMap<StreamName, StreamState>,
    /// Every successful append, so that a retry can be recognised and answered.
    appends: Vec<AppendRecord>,
    /// Event id → the index in `appends` of the append that stored it.
    ids: HashMap<String, usize>,
}

struct StreamState {
    /// The position of every version ever appended; the index is the version.
    positions: Vec<Position>,
    /// Versions below this were hidden by a soft delete.
    visible_from: u64,
    /// Deleted and not appended to since.
    deleted: bool,
}

struct AppendRecord {
    stream: StreamName,
    /// The stream's version just before the append (`None`: no stream or deleted), which
    /// decides whether a retry's expected version "held for that append".
    version_before: Option<Version>,
    ids: Vec<String>,
    appended: Appended,
}

impl InMemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// The number of events in the log, including those of deleted streams.
    pub fn len(&self) -> usize {
        self.shared.lock().log.len()
    }

    /// Whether no event was ever appended.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl std::fmt::Debug for InMemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.shared.lock();
        f.debug_struct("InMemoryStore")
            .field("events", &state.log.len())
            .field("streams", &state.streams.len())
            .finish()
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The lock is only poisoned if a panic interrupted a mutation, which is a bug in
        // this module; the state may then be inconsistent, so refuse to go on.
        self.state
            .lock()
            .expect("the in-memory store's state is consistent (no panic while locked)")
    }
}

impl StreamState {
    fn current(&self) -> Option<Version> {
        if self.deleted || self.positions.is_empty() {
            None
        } else {
            Some(Version(self.positions.len() as u64 - 1))
        }
    }
}

impl State {
    fn current(&self, stream: &StreamName) -> Option<Version> {
        self.streams.get(stream).and_then(StreamState::current)
    }

    /// The stream, or why it cannot be read.
    fn readable(&self, stream: &StreamName) -> Result<&StreamState, Error> {
        match self.streams.get(stream) {
            None => Err(Error::StreamNotFound {
                stream: stream.clone(),
            }),
            Some(state) if state.deleted => Err(Error::StreamDeleted {
                stream: stream.clone(),
            }),
            Some(state) => Ok(state),
        }
    }

    /// Decides whether `ids` is a retry of an earlier append (`Ok(Some)`), new (`Ok(None)`)
    /// or collides with stored events (`Err`).
    fn check_ids(
        &self,
        stream: &StreamName,
        expected: ExpectedVersion,
        ids: &[&str],
    ) -> Result<Option<Appended>, Error> {
        let Some((first_stored, index)) = ids
            .iter()
            .find_map(|id| self.ids.get(*id).map(|index| (*id, *index)))
        else {
            return Ok(None);
        };
        let record = &self.appends[index];
        let is_retry = record.stream == *stream
            && record
                .ids
                .iter()
                .map(String::as_str)
                .eq(ids.iter().copied())
            && expected.admits(record.version_before);
        if is_retry {
            return Ok(Some(record.appended.clone()));
        }
        let stored = record
            .appended
            .events
            .iter()
            .find(|event| event.id == first_stored)
            .expect("an append record holds every id indexed to it");
        Err(Error::DuplicateEventId {
            id: first_stored.to_owned(),
            stream: record.stream.clone(),
            version: stored.version,
        })
    }
}

#[async_trait]
impl EventStore for InMemoryStore {
    async fn append(
        &self,
        stream: &StreamName,
        expected: ExpectedVersion,
        events: Vec<Event>,
    ) -> Result<Appended, Error> {
        crate::store::check_append(&events)?;
        let ids: Vec<&str> = events.iter().map(|event| event.id.as_str()).collect();

        let mut state = self.shared.lock();
        if let Some(original) = state.check_ids(stream, expected, &ids)? {
            return Ok(original);
        }
        let version_before = state.current(stream);
        if !expected.admits(version_before) {
            return Err(Error::WrongExpectedVersion {
                stream: stream.clone(),
                expected,
                actual: version_before,
            });
        }

        let recorded_at = chrono::Utc::now();
        let state = &mut *state;
        let stream_state = state
            .streams
            .entry(stream.clone())
            .or_insert_with(|| StreamState {
                positions: Vec::new(),
                visible_from: 0,
                deleted: false,
            });
        stream_state.deleted = false;
        let mut appended = Vec::with_capacity(events.len());
        for event in events {
            let version = Version(stream_state.positions.len() as u64);
            let position = Position(state.log.len() as u64);
            stream_state.positions.push(position);
            appended.push(AppendedEvent {
                id: event.id.clone(),
                version,
                position,
            });
            state.log.push(RecordedEvent {
                stream: stream.clone(),
                version,
                position,
                recorded_at,
                event,
            });
        }
        let appended = Appended { events: appended };
        let index = state.appends.len();
        for event in &appended.events {
            state.ids.insert(event.id.clone(), index);
        }
        state.appends.push(AppendRecord {
            stream: stream.clone(),
            version_before,
            ids: appended
                .events
                .iter()
                .map(|event| event.id.clone())
                .collect(),
            appended: appended.clone(),
        });
        let log_len = state.log.len() as u64;
        // Publishing while still holding the lock keeps the published lengths in order.
        self.shared.log_len.send_replace(log_len);
        Ok(appended)
    }

    async fn read_stream(
        &self,
        stream: &StreamName,
        from: Version,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, Error> {
        let state = self.shared.lock();
        let stream_state = state.readable(stream)?;
        let positions = &stream_state.positions[stream_state.visible_from as usize..];
        let first = stream_state.visible_from;
        let recorded = |position: &Position| state.log[position.0 as usize].clone();
        let events = match direction {
            Direction::Forward => {
                let skip = from.0.saturating_sub(first);
                positions
                    .iter()
                    .skip(usize::try_from(skip).unwrap_or(usize::MAX))
                    .take(limit)
                    .map(recorded)
                    .collect()
            }
            Direction::Backward => {
                if from.0 < first {
                    Vec::new()
                } else {
                    let end = usize::try_from(from.0 - first)
                        .unwrap_or(usize::MAX)
                        .saturating_add(1)
                        .min(positions.len());
                    positions[..end]
                        .iter()
                        .rev()
                        .take(limit)
                        .map(recorded)
                        .collect()
                }
            }
        };
        Ok(events)
    }

    async fn read_all(
        &self,
        from: Position,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, Error> {
        let state = self.shared.lock();
        let from = usize::try_from(from.0).unwrap_or(usize::MAX);
        let events = match direction {
            Direction::Forward => state.log.iter().skip(from).take(limit).cloned().collect(),
            Direction::Backward => {
                let end = from.saturating_add(1).min(state.log.len());
                state.log[..end].iter().rev().take(limit).cloned().collect()
            }
        };
        Ok(events)
    }

    async fn stream_version(&self, stream: &StreamName) -> Result<Option<Version>, Error> {
        Ok(self.shared.lock().current(stream))
    }

    async fn head(&self) -> Result<Option<Position>, Error> {
        let len = self.shared.lock().log.len() as u64;
        Ok(len.checked_sub(1).map(Position))
    }

    async fn subscribe_all(&self, from: Position) -> Result<Subscription, Error> {
        let cursor = Cursor {
            shared: Arc::downgrade(&self.shared),
            log_len: self.shared.log_len.subscribe(),
            next: from.0,
            stream: None,
        };
        Ok(cursor.into_subscription())
    }

    async fn subscribe_stream(
        &self,
        stream: &StreamName,
        from: Version,
    ) -> Result<Subscription, Error> {
        let cursor = Cursor {
            shared: Arc::downgrade(&self.shared),
            log_len: self.shared.log_len.subscribe(),
            next: from.0,
            stream: Some(stream.clone()),
        };
        Ok(cursor.into_subscription())
    }

    async fn delete_stream(
        &self,
        stream: &StreamName,
        expected: ExpectedVersion,
    ) -> Result<(), Error> {
        let mut state = self.shared.lock();
        let current = state.current(stream);
        if !expected.admits(current) {
            return Err(Error::WrongExpectedVersion {
                stream: stream.clone(),
                expected,
                actual: current,
            });
        }
        match state.streams.entry(stream.clone()) {
            Entry::Vacant(_) => Err(Error::StreamNotFound {
                stream: stream.clone(),
            }),
            Entry::Occupied(entry) if entry.get().deleted => Err(Error::StreamDeleted {
                stream: stream.clone(),
            }),
            Entry::Occupied(mut entry) => {
                let stream_state = entry.get_mut();
                stream_state.deleted = true;
                stream_state.visible_from = stream_state.positions.len() as u64;
                Ok(())
            }
        }
    }
}

/// Where a subscription is: the next position (all) or version (stream) to deliver.
struct Cursor {
    /// Weak, so that dropping the store ends its subscriptions.
    shared: Weak<Shared>,
    log_len: watch::Receiver<u64>,
    next: u64,
    stream: Option<StreamName>,
}

impl Cursor {
    fn into_subscription(self) -> Subscription {
        futures::stream::unfold(self, |mut cursor| async move {
            let chunk = cursor.next_chunk().await?;
            Some((futures::stream::iter(chunk.into_iter().map(Ok)), cursor))
        })
        .flatten()
        .boxed()
    }

    /// The next events to deliver, waiting for appends when caught up; `None` once the
    /// store is gone.
    async fn next_chunk(&mut self) -> Option<Vec<RecordedEvent>> {
        loop {
            // Mark the current length as seen *before* reading, so that an append after
            // the read always wakes `changed` below: no lost wake-up.
            self.log_len.borrow_and_update();
            let chunk = {
                let shared = self.shared.upgrade()?;
                let state = shared.lock();
                self.read(&state)
            };
            if !chunk.is_empty() {
                return Some(chunk);
            }
            self.log_len.changed().await.ok()?;
        }
    }

    fn read(&mut self, state: &State) -> Vec<RecordedEvent> {
        let chunk: Vec<RecordedEvent> = match &self.stream {
            None => {
                let from = usize::try_from(self.next).unwrap_or(usize::MAX);
                state
                    .log
                    .iter()
                    .skip(from)
                    .take(SUBSCRIPTION_CHUNK_LEN_MAX)
                    .cloned()
                    .collect()
            }
            Some(stream) => match state.streams.get(stream) {
                None => Vec::new(),
                Some(stream_state) => {
                    // Versions hidden by a soft delete are skipped, as `read_stream` does.
                    self.next = self.next.max(stream_state.visible_from);
                    let from = usize::try_from(self.next).unwrap_or(usize::MAX);
                    stream_state
                        .positions
                        .iter()
                        .skip(from)
                        .take(SUBSCRIPTION_CHUNK_LEN_MAX)
                        .map(|position| state.log[position.0 as usize].clone())
                        .collect()
                }
            },
        };
        if let Some(last) = chunk.last() {
            self.next = match self.stream {
                None => last.position.0 + 1,
                Some(_) => last.version.0 + 1,
            };
        }
        chunk
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_are_cheap_and_shared() {
        let store = InMemoryStore::new();
        let other = store.clone();
        assert!(other.is_empty());
        assert!(Arc::ptr_eq(&store.shared, &other.shared));
    }
}
