//! The transactional outbox: events written in the caller's own transaction, for a
//! [`Relay`](crate::Relay) to publish once it commits.
//!
//! # Contract
//!
//! - [`Outbox::enqueue`] writes one row into `herald_outbox` **in the caller's
//!   transaction**: the row commits or rolls back with the caller's own writes. Nothing is
//!   published before the commit, and a rolled-back enqueue is never published.
//! - The event is validated first; an invalid event fails with [`Error::InvalidEvent`] and
//!   writes nothing. Event ids are unique in the outbox: enqueueing an id that is already
//!   there fails with [`Error::DuplicateEventId`] (on PostgreSQL that aborts the caller's
//!   transaction, as any failed statement does).
//! - The row keeps the exact event: every attribute and extension in `headers`, the data's
//!   bytes in `payload` (JSON data as its exact text). The relay publishes that event,
//!   equal to the one enqueued, to the row's topic.
//! - Rows get increasing `seq` values in the order they are inserted; the relay keeps that
//!   order per partition key (see [Ordering](crate#ordering-what-per-key-order-means-here)).
//! - On PostgreSQL, the enqueue also notifies channel [`NOTIFY_CHANNEL`] (`pg_notify`, in
//!   the same statement as the insert): PostgreSQL delivers it only when the transaction
//!   commits, and relays listening wake up at once instead of at their next poll.
//!
//! # Row layout
//!
//! Debezium's outbox event router reads `id`, `aggregatetype`, `aggregateid`, `type` and
//! `payload`, so that CDC (Debezium on the PostgreSQL WAL) can replace the relay:
//!
//! | column            | holds                                                            |
//! |-------------------|------------------------------------------------------------------|
//! | `seq`             | the insertion order (`BIGSERIAL`; `INTEGER PRIMARY KEY` on SQLite)|
//! | `id`              | the event id                                                     |
//! | `aggregatetype`   | the topic (Debezium routes by it)                                |
//! | `aggregateid`     | the partition key (Debezium's message key): `partitionkey`, else the id |
//! | `type`            | the event type                                                   |
//! | `payload`         | the data's bytes: JSON text, or the binary data; `NULL` without data |
//! | `payload_kind`    | `json`, `binary`, or `NULL` without data                         |
//! | `headers`         | the structured-format JSON of the event without its data         |
//! | `topic`           | where the relay publishes                                        |
//! | `partition`       | the lease partition: [`partition_for`]`(key, `[`LEASE_PARTITIONS`]`)` |
//! | `created_at`      | when the row was inserted                                        |
//! | `attempts`, `next_attempt_at`, `last_error` | failed publishes and the next retry     |
//! | `published_at`    | when the relay published it (`NULL` while in the backlog)        |

use std::time::Duration;

use chrono::{DateTime, Utc};
use herald_core::broker::{TopicName, partition_for, partition_key};
use herald_core::{Data, Event};
use serde_json::value::RawValue;
use sqlx::{Pool, Transaction};

use crate::backend::{Backend, ClaimedRow};
use crate::error::Error;

/// How many lease partitions the key space is split into. Fixed by the schema (the
/// migration creates one `herald_outbox_leases` row per partition) and stored in each row
/// at enqueue: changing it needs a migration that recomputes `partition`.
pub const LEASE_PARTITIONS: u32 = 32;

/// The PostgreSQL notification channel an enqueue notifies (payload: the row's lease
/// partition).
pub const NOTIFY_CHANNEL: &str = "herald_outbox";

/// How many failing rows [`status`] lists at most.
pub const STATUS_FAILING_LEN_MAX: i64 = 20;

/// Writes events into the outbox in the caller's transaction; see the
/// [module documentation](self). Cheap to clone.
#[derive(Debug, Clone)]
pub struct Outbox {
    topic: TopicName,
    notify: bool,
}

/// Where an enqueued event was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enqueued {
    /// The row's `seq`: its place in the relay order.
    pub seq: i64,
    /// The row's lease partition.
    pub partition: u32,
}

impl Outbox {
    /// An outbox whose events go to `topic` unless [`enqueue_to`](Self::enqueue_to) names
    /// another.
    pub fn new(topic: TopicName) -> Self {
        Outbox {
            topic,
            notify: true,
        }
    }

    /// Whether enqueues notify [`NOTIFY_CHANNEL`] on PostgreSQL (on by default). Without
    /// notifications relays find new rows at their next poll. Has no effect on SQLite.
    pub fn notify(mut self, notify: bool) -> Self {
        self.notify = notify;
        self
    }

    /// The default topic.
    pub fn topic(&self) -> &TopicName {
        &self.topic
    }

    /// Writes `event` for the default topic in the caller's transaction `tx`.
    pub async fn enqueue<DB: Backend>(
        &self,
        tx: &mut Transaction<'_, DB>,
        event: &Event,
    ) -> Result<Enqueued, Error> {
        self.enqueue_to(tx, &self.topic, event).await
    }

    /// Writes `event` for `topic` in the caller's transaction `tx`.
    pub async fn enqueue_to<DB: Backend>(
        &self,
        tx: &mut Transaction<'_, DB>,
        topic: &TopicName,
        event: &Event,
    ) -> Result<Enqueued, Error> {
        let row = encode(topic, event)?;
        let seq = DB::insert_outbox(&mut **tx, &row, self.notify)
            .await
            .map_err(|error| match &error {
                sqlx::Error::Database(database) if database.is_unique_violation() => {
                    Error::DuplicateEventId {
                        id: event.id.clone(),
                    }
                }
                _ => Error::Database(error),
            })?;
        Ok(Enqueued {
            seq,
            partition: row.partition as u32,
        })
    }
}

/// The state of the outbox, for `herald outbox status` and dashboards.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct OutboxStatus {
    /// Rows not yet published.
    pub backlog: u64,
    /// How long the oldest unpublished row has waited; `None` when the backlog is empty.
    pub oldest_age: Option<Duration>,
    /// The first unpublished rows (by `seq`, at most [`STATUS_FAILING_LEN_MAX`]) whose
    /// publish failed, with their errors.
    pub failing: Vec<FailingRow>,
    /// Every lease partition, in order, with its holder.
    pub leases: Vec<Lease>,
    /// The relays alive (registered and not expired), by holder.
    pub relays: Vec<RelayInfo>,
}

/// An unpublished row whose publish failed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct FailingRow {
    /// Its `seq`.
    pub seq: i64,
    /// Its event id.
    pub id: String,
    /// Its lease partition (blocked until the row is published).
    pub partition: u32,
    /// Failed publishes so far.
    pub attempts: u32,
    /// The last failure.
    pub last_error: Option<String>,
    /// When the relay tries again.
    pub next_attempt_at: Option<DateTime<Utc>>,
}

/// A lease partition and who holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Lease {
    /// The partition.
    pub partition: u32,
    /// The relay holding it (`None`: free).
    pub holder: Option<String>,
    /// When the lease expires unless renewed.
    pub expires_at: Option<DateTime<Utc>>,
}

/// A relay that is alive.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RelayInfo {
    /// Its holder id (see [`Relay::holder`](crate::Relay::holder)).
    pub holder: String,
    /// When it registered.
    pub started_at: DateTime<Utc>,
    /// When its registration expires unless renewed.
    pub expires_at: DateTime<Utc>,
}

impl OutboxStatus {
    /// The partitions `holder` holds.
    pub fn partitions_of(&self, holder: &str) -> Vec<u32> {
        self.leases
            .iter()
            .filter(|lease| lease.holder.as_deref() == Some(holder))
            .map(|lease| lease.partition)
            .collect()
    }
}

/// The backlog, the age of the oldest unpublished row, the failing rows, the leases and
/// the relays alive.
pub async fn status<DB: Backend>(pool: &Pool<DB>) -> Result<OutboxStatus, Error> {
    Ok(DB::status(pool, STATUS_FAILING_LEN_MAX).await?)
}

/// The row of `event` for `topic`, once the event is checked.
fn encode<'a>(topic: &'a TopicName, event: &'a Event) -> Result<OutboxRow<'a>, Error> {
    event.validate().map_err(Error::InvalidEvent)?;
    Ok(OutboxRow::of(topic, event))
}

/// The values of the `herald_outbox` row that [`Outbox::enqueue`] writes for an event, for
/// anything that must write the same row another way (a benchmark's raw `INSERT`, another
/// driver). `created_at`, `attempts` and the other bookkeeping columns take their defaults.
#[derive(Debug)]
pub struct OutboxRow<'a> {
    /// `id`: the event's id.
    pub id: &'a str,
    /// `aggregatetype`: the topic.
    pub aggregatetype: &'a str,
    /// `aggregateid`: the partition key (or the event id without one).
    pub aggregateid: &'a str,
    /// `type`: the event's type.
    pub ty: &'a str,
    /// `payload`: the event's data bytes, exactly.
    pub payload: Option<&'a [u8]>,
    /// `payload_kind`: `json` or `binary`.
    pub payload_kind: Option<&'static str>,
    /// `headers`: the event without its data, as JSON.
    pub headers: String,
    /// `topic`: where the relay publishes.
    pub topic: &'a str,
    /// `partition`: the lease partition of the key.
    pub partition: i32,
}

impl<'a> OutboxRow<'a> {
    /// The row of `event` for `topic`. The event is not checked: [`Outbox::enqueue`] checks
    /// it first.
    pub fn of(topic: &'a TopicName, event: &'a Event) -> OutboxRow<'a> {
        let key = partition_key(event);
        let (payload, payload_kind) = match &event.data {
            None => (None, None),
            Some(Data::Json(raw)) => (Some(raw.get().as_bytes()), Some("json")),
            Some(Data::Binary(bytes)) => (Some(bytes.as_slice()), Some("binary")),
        };
        let headers = Event {
            id: event.id.clone(),
            source: event.source.clone(),
            ty: event.ty.clone(),
            time: event.time,
            subject: event.subject.clone(),
            datacontenttype: event.datacontenttype.clone(),
            dataschema: event.dataschema.clone(),
            data: None,
            extensions: event.extensions.clone(),
        }
        .to_json();
        OutboxRow {
            id: &event.id,
            aggregatetype: topic.as_str(),
            aggregateid: key,
            ty: &event.ty,
            payload,
            payload_kind,
            headers: String::from_utf8(headers).expect("JSON is UTF-8"),
            topic: topic.as_str(),
            partition: partition_for(key, LEASE_PARTITIONS) as i32,
        }
    }
}

/// The event and topic of a claimed row; an error names what is wrong with the row.
pub(crate) fn decode(row: &ClaimedRow) -> Result<(TopicName, Event), String> {
    let topic = TopicName::new(&row.topic).map_err(|error| format!("bad topic: {error}"))?;
    let mut event = Event::from_json(row.headers.as_bytes())
        .map_err(|error| format!("bad headers: {error}"))?;
    event.data = match (row.payload_kind.as_deref(), &row.payload) {
        (None, None) => None,
        (Some("json"), Some(bytes)) => {
            let text = String::from_utf8(bytes.clone())
                .map_err(|_| "bad payload: JSON data is not UTF-8".to_owned())?;
            let raw = RawValue::from_string(text)
                .map_err(|error| format!("bad payload: JSON data does not parse: {error}"))?;
            Some(Data::Json(raw))
        }
        (Some("binary"), Some(bytes)) => Some(Data::Binary(bytes.clone())),
        (kind, payload) => {
            return Err(format!(
                "bad payload: kind {kind:?} with {} payload",
                if payload.is_some() { "a" } else { "no" }
            ));
        }
    };
    Ok((topic, event))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claimed(row: &OutboxRow<'_>) -> ClaimedRow {
        ClaimedRow {
            seq: 1,
            partition: row.partition,
            topic: row.topic.to_owned(),
            headers: row.headers.clone(),
            payload: row.payload.map(<[u8]>::to_vec),
            payload_kind: row.payload_kind.map(str::to_owned),
            attempts: 0,
        }
    }

    #[test]
    fn a_row_decodes_to_the_event_it_was_encoded_from() {
        let topic = TopicName::new("orders").unwrap();
        let exact = Event::from_json(
            br#"{"specversion":"1.0","id":"e-1","source":"/orders","type":"OrderPlaced",
                "time":"2026-11-02T10:00:00.123456+01:00","subject":"order-7",
                "partitionkey":"order-7","attempt":3,"vip":true,
                "datacontenttype":"application/json",
                "data":{"b": 1.50, "a": [1, 2], "big": 123456789012345678901234567890}}"#,
        )
        .unwrap();
        let binary = Event::new("/blobs", "Blob").with_binary_data("image/png", vec![0, 159, 255]);
        let bare = Event::new("/bare", "Nothing");
        for event in [exact, binary, bare] {
            let row = encode(&topic, &event).unwrap();
            let (decoded_topic, decoded) = decode(&claimed(&row)).unwrap();
            assert_eq!(decoded_topic, topic);
            assert_eq!(decoded, event);
        }
    }

    #[test]
    fn the_partition_key_decides_the_lease_partition() {
        let topic = TopicName::new("orders").unwrap();
        let keyed = Event::new("/orders", "OrderPlaced").with_partition_key("order-7");
        let row = encode(&topic, &keyed).unwrap();
        assert_eq!(row.aggregateid, "order-7");
        assert_eq!(
            row.partition as u32,
            partition_for("order-7", LEASE_PARTITIONS)
        );
        let unkeyed = Event::new("/orders", "OrderPlaced");
        let row = encode(&topic, &unkeyed).unwrap();
        assert_eq!(row.aggregateid, unkeyed.id, "no key: the id");
    }

    #[test]
    fn an_invalid_event_is_refused() {
        let topic = TopicName::new("orders").unwrap();
        let invalid = Event::new("/orders", "");
        assert!(matches!(
            encode(&topic, &invalid),
            Err(Error::InvalidEvent(_))
        ));
    }

    #[test]
    fn a_damaged_row_is_reported_not_decoded() {
        let topic = TopicName::new("orders").unwrap();
        let event = Event::new("/orders", "OrderPlaced").with_data(serde_json::json!({"a": 1}));
        let good = claimed(&encode(&topic, &event).unwrap());
        let damage: [fn(&mut ClaimedRow); 4] = [
            |row| row.headers = "{".to_owned(),
            |row| row.payload = Some(b"{not json".to_vec()),
            |row| row.payload_kind = Some("xml".to_owned()),
            |row| row.topic = "bad:topic".to_owned(),
        ];
        for damage in damage {
            let mut row = good.clone();
            damage(&mut row);
            assert!(decode(&row).is_err(), "{row:?}");
        }
    }
}
