//! [`EventStoreIdempotency`]: each handled event recorded in a system stream of its own.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt as _;
use herald_core::broker::GroupName;
use herald_core::store::{self, EventStore};
use herald_core::{Direction, Event, ExpectedVersion, StreamName, Version};
use serde::{Deserialize, Serialize};

use super::{IdempotencyStore, Put, StoreError};

/// The `source` of every event this store appends.
pub const EVENT_SOURCE: &str = "/herald/runtime/idempotency";
/// The type of a `Handled` record: its data is a [`HandledRecord`].
pub const HANDLED_EVENT_TYPE: &str = "herald.idempotency.handled";

/// How many events one read of a key's stream returns at most. A stream holds one record,
/// or one per key whose names collide: a few at the very most.
const READ_PAGE_LEN_MAX: usize = 64;

/// How many times a put appends when other keys' records keep arriving in its stream
/// between its read and its append.
const APPEND_ATTEMPTS_MAX: u32 = 16;

/// How long a put whose append lost to another waits for the winning record to become
/// readable. A store may reject a conflicting append before the append it conflicts with
/// is durable, hence readable (the embedded log does, within one group commit); that takes
/// one sync. The bound only matters if the store fails meanwhile.
const CONFLICT_VISIBLE_WAIT_MAX_MS: u64 = 30_000;

/// The prefix of the stream name's last part when it is a digest of the key. Event ids
/// starting with it are always digested, so that no id ever reads as a digest.
const DIGEST_PREFIX: char = '@';

/// A durable [`IdempotencyStore`] on any [`EventStore`] — in practice the embedded log, in
/// the same data directory as the broker, so that what a group handled survives a restart.
///
/// # Layout
///
/// Each (group, event id) key has a system stream of its own, named from the key:
///
/// - `$handled:<group>:<event id>` when the event id is made of stream-name characters
///   (ASCII letters, digits, `-_.:@`), does not start with `@`, and the name fits in a
///   stream name (255 bytes after the `$`);
/// - otherwise `$handled:<group>:@<digest>`, where the digest is the FNV-1a 128 hash, in
///   32 lower-case hex digits, of the group's bytes, a zero byte and the event id's bytes —
///   event ids are arbitrary strings (spaces, `/`, any Unicode, any length);
/// - and `$handled:@<digest>` when even that is too long for the group's name.
///
/// The stream holds one [`HANDLED_EVENT_TYPE`] event from [`EVENT_SOURCE`] whose data is a
/// [`HandledRecord`]: the group, the original event id, and the handler's published events
/// as structured CloudEvents (their `data` kept as the exact JSON text, so they read back
/// byte for byte).
///
/// A plain name stands for one key (a group name has no `:`, so the first `:` after
/// `handled:` ends it), but FNV is not collision-resistant: crafted ids can share a digest.
/// Such keys then have one record each in the shared stream, and every read compares the
/// stored group and id with the key: correctness never rests on the name.
///
/// # Operations
///
/// - **get** reads the key's stream from its start: in the embedded log an index lookup,
///   not a scan. A stream that does not exist (or was deleted) means no record.
/// - **put** appends the record with [`ExpectedVersion::NoStream`]: when the stream is
///   new, that is the whole cost. When the append finds the stream there, the put reads
///   it up to the version the rejection reported — following the stream until that
///   version is readable, because a store may reject an append before the one it conflicts
///   with is durable (the embedded log does so within one group commit). The key's record,
///   if there, is kept and returned ([`Put::Kept`]): this is how, of concurrent puts, the
///   first wins. Otherwise (another key's record, after a collision) the put appends
///   conditionally on the version it read, at most 16 times.
///
/// # Cost
///
/// One system stream and one synced append per handled event (the log's group commit
/// shares an `fdatasync` among concurrent appends), and one stream read per delivery. The
/// embedded log indexes every stream in memory, so memory and disk grow with the number of
/// events handled; records are never removed. Retention — forgetting records older than
/// the broker can redeliver — and compaction are later work. The streams are system
/// streams: they appear in `read_all` and `subscribe_all`, never among user streams.
///
/// A record larger than the store accepts in one append (a handler publishing more than
/// the log's `append_size_max_bytes`) cannot be stored: its puts fail, and the delivery is
/// abandoned each time.
pub struct EventStoreIdempotency {
    store: Arc<dyn EventStore>,
}

/// The data of a `Handled` record: which group handled which event, and what it published.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HandledRecord {
    /// The consumer group that handled the event.
    pub group: String,
    /// The handled event's id, as delivered.
    pub event_id: String,
    /// The events the handler published, in order, as structured CloudEvents.
    pub published: Vec<Event>,
}

/// A stored event of a key's stream that does not decode, or is in the wrong stream.
#[derive(Debug, thiserror::Error)]
#[error("stored idempotency record in `{stream}` is invalid: {reason}")]
struct InvalidRecord {
    stream: StreamName,
    reason: String,
}

/// A record that made a put's append fail never became readable.
#[derive(Debug, thiserror::Error)]
#[error(
    "`{stream}` is at version {version}, but that version did not become readable within \
     {CONFLICT_VISIBLE_WAIT_MAX_MS} ms"
)]
struct Invisible {
    stream: StreamName,
    version: Version,
}

/// A conditional append kept failing because other keys' records kept arriving.
#[derive(Debug, thiserror::Error)]
#[error("gave up on `{stream}` after {attempts} attempts: other records kept arriving")]
struct Contended {
    stream: StreamName,
    attempts: u32,
}

impl EventStoreIdempotency {
    /// A store keeping its records in `store`.
    pub fn new(store: Arc<dyn EventStore>) -> Self {
        EventStoreIdempotency { store }
    }

    /// The stream holding the record of (`group`, `event_id`); see the
    /// [layout](EventStoreIdempotency#layout).
    pub fn stream(group: &GroupName, event_id: &str) -> StreamName {
        let plain = !event_id.is_empty()
            && !event_id.starts_with(DIGEST_PREFIX)
            && event_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '@'));
        if plain && let Ok(stream) = StreamName::system(format!("handled:{group}:{event_id}")) {
            return stream;
        }
        let digest = digest(group, event_id);
        StreamName::system(format!("handled:{group}:{DIGEST_PREFIX}{digest:032x}"))
            .or_else(|_| StreamName::system(format!("handled:{DIGEST_PREFIX}{digest:032x}")))
            .expect("a digest name is always a valid stream name")
    }

    /// Every record in `stream`, and the stream's version (`None`: no stream).
    async fn read(
        &self,
        stream: &StreamName,
    ) -> Result<(Option<Version>, Vec<HandledRecord>), StoreError> {
        let mut version = None;
        let mut records = Vec::new();
        let mut from = Version::START;
        loop {
            let page = match self
                .store
                .read_stream(stream, from, Direction::Forward, READ_PAGE_LEN_MAX)
                .await
            {
                Ok(page) => page,
                Err(store::Error::StreamNotFound { .. } | store::Error::StreamDeleted { .. }) => {
                    return Ok((version, records));
                }
                Err(error) => return Err(backend(error)),
            };
            let page_len = page.len();
            for recorded in page {
                version = Some(recorded.version);
                from = Version(recorded.version.0 + 1);
                if let Some(record) = decode(stream, &recorded.event)? {
                    records.push(record);
                }
            }
            if page_len < READ_PAGE_LEN_MAX {
                return Ok((version, records));
            }
        }
    }

    /// Every record in `stream` up to at least the version `actual` that a rejected append
    /// reported, and the stream's version: reads, and when the events up to `actual` are
    /// not all readable yet, follows the stream until they are.
    async fn read_through(
        &self,
        stream: &StreamName,
        actual: Option<Version>,
    ) -> Result<(Option<Version>, Vec<HandledRecord>), StoreError> {
        let (mut version, mut records) = self.read(stream).await?;
        let Some(actual) = actual else {
            return Ok((version, records));
        };
        if version.is_some_and(|version| version >= actual) {
            return Ok((version, records));
        }
        let from = version.map_or(Version::START, |version| Version(version.0 + 1));
        let follow = async {
            let mut events = self
                .store
                .subscribe_stream(stream, from)
                .await
                .map_err(backend)?;
            while version.is_none_or(|version| version < actual) {
                let recorded = events
                    .next()
                    .await
                    .ok_or_else(|| backend(store::Error::Closed))?
                    .map_err(backend)?;
                version = Some(recorded.version);
                if let Some(record) = decode(stream, &recorded.event)? {
                    records.push(record);
                }
            }
            Ok::<_, StoreError>(())
        };
        tokio::time::timeout(Duration::from_millis(CONFLICT_VISIBLE_WAIT_MAX_MS), follow)
            .await
            .map_err(|_| {
                backend(Invisible {
                    stream: stream.clone(),
                    version: actual,
                })
            })??;
        Ok((version, records))
    }
}

impl fmt::Debug for EventStoreIdempotency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventStoreIdempotency")
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl IdempotencyStore for EventStoreIdempotency {
    async fn get(
        &self,
        group: &GroupName,
        event_id: &str,
    ) -> Result<Option<Vec<Event>>, StoreError> {
        let stream = Self::stream(group, event_id);
        let (_, records) = self.read(&stream).await?;
        Ok(find(records, group, event_id).map(|record| record.published))
    }

    async fn put(
        &self,
        group: &GroupName,
        event_id: &str,
        published: &[Event],
    ) -> Result<Put, StoreError> {
        let stream = Self::stream(group, event_id);
        let record = HandledRecord {
            group: group.to_string(),
            event_id: event_id.to_owned(),
            published: published.to_vec(),
        };
        let event = Event::new(EVENT_SOURCE, HANDLED_EVENT_TYPE)
            .with_time_now()
            .with_data_as(&record)
            .map_err(backend)?;
        let mut expected = ExpectedVersion::NoStream;
        for _ in 0..APPEND_ATTEMPTS_MAX {
            let actual = match self
                .store
                .append(&stream, expected, vec![event.clone()])
                .await
            {
                Ok(_) => return Ok(Put::Stored),
                Err(store::Error::WrongExpectedVersion { actual, .. }) => actual,
                Err(error) => return Err(backend(error)),
            };
            let (version, records) = self.read_through(&stream, actual).await?;
            if let Some(record) = find(records, group, event_id) {
                return Ok(Put::Kept {
                    published: record.published,
                });
            }
            expected = match version {
                Some(version) => ExpectedVersion::Exact(version),
                None => ExpectedVersion::NoStream,
            };
        }
        Err(backend(Contended {
            stream,
            attempts: APPEND_ATTEMPTS_MAX,
        }))
    }
}

/// The record of (`group`, `event_id`) among `records`: the first, which is the one that
/// stands.
fn find(records: Vec<HandledRecord>, group: &GroupName, event_id: &str) -> Option<HandledRecord> {
    records
        .into_iter()
        .find(|record| record.group == group.as_str() && record.event_id == event_id)
}

/// Decodes one event of `stream`: `None` for a type this version does not know (from a
/// later version of Herald), so that an older reader still sees the records it understands.
fn decode(stream: &StreamName, event: &Event) -> Result<Option<HandledRecord>, StoreError> {
    if event.ty != HANDLED_EVENT_TYPE {
        return Ok(None);
    }
    let invalid = |reason: String| {
        backend(InvalidRecord {
            stream: stream.clone(),
            reason: format!("event `{}`: {reason}", event.id),
        })
    };
    let record = event
        .data_as::<HandledRecord>()
        .map_err(|error| invalid(error.to_string()))?
        .ok_or_else(|| invalid("no data".to_owned()))?;
    // A record is only ever appended to its key's stream: one found elsewhere was not
    // written by this store.
    let group = GroupName::new(&record.group).map_err(|error| invalid(error.to_string()))?;
    if EventStoreIdempotency::stream(&group, &record.event_id) != *stream {
        return Err(invalid(format!(
            "it records group `{}` and event id {:?}, which belong in another stream",
            record.group, record.event_id
        )));
    }
    Ok(Some(record))
}

/// FNV-1a 128 of the group's bytes, a zero byte (which no group name contains) and the
/// event id's bytes. Part of the stored layout: it MUST never change.
fn digest(group: &GroupName, event_id: &str) -> u128 {
    const OFFSET_BASIS: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    const PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013b;
    let bytes = group
        .as_str()
        .bytes()
        .chain(std::iter::once(0))
        .chain(event_id.bytes());
    bytes.fold(OFFSET_BASIS, |hash, byte| {
        (hash ^ u128::from(byte)).wrapping_mul(PRIME)
    })
}

fn backend(error: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::Backend(Box::new(error))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(name: &str) -> GroupName {
        GroupName::new(name).unwrap()
    }

    #[test]
    fn the_digest_is_fnv_1a_128() {
        // FNV-1a 128 of the empty input is the offset basis; of "a", a published value.
        fn fnv(bytes: &[u8]) -> u128 {
            bytes
                .iter()
                .fold(0x6c62_272e_07bb_0142_62b8_2175_6295_c58d, |hash, byte| {
                    (hash ^ u128::from(*byte)).wrapping_mul(0x0100_0000_0000_0000_0000_013b)
                })
        }
        assert_eq!(fnv(b"a"), 0xd228_cb69_6f1a_8caf_7891_2b70_4e4a_8964);
        assert_eq!(digest(&group("g"), "id"), fnv(b"g\0id"));
    }

    #[test]
    fn names_are_plain_when_they_can_be() {
        assert_eq!(
            EventStoreIdempotency::stream(&group("billing"), "evt-1").as_str(),
            "$handled:billing:evt-1"
        );
        assert_eq!(
            EventStoreIdempotency::stream(&group("billing"), "0192f3a0-7c1e-7d4b").as_str(),
            "$handled:billing:0192f3a0-7c1e-7d4b"
        );
    }

    #[test]
    fn other_ids_are_digested_into_valid_names() {
        let long_group = "g".repeat(256);
        let cases = [
            ("billing", "has space"),
            ("billing", "a/b"),
            ("billing", "été"),
            ("billing", ""),
            ("billing", "@looks-like-a-digest"),
            ("billing", &"x".repeat(300)),
            (long_group.as_str(), "evt-1"),
        ];
        for (name, id) in cases {
            let stream = EventStoreIdempotency::stream(&group(name), id);
            assert!(stream.is_system(), "{stream}");
            assert!(stream.as_str().contains(":@"), "{stream} is not a digest");
            assert_eq!(StreamName::parse_stored(stream.as_str()).unwrap(), stream);
        }
        assert_eq!(
            EventStoreIdempotency::stream(&group(&long_group), "evt-1")
                .as_str()
                .len(),
            "$handled:@".len() + 32
        );
    }
}
