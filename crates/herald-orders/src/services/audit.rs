//! The audit service: an append-only record of every event of the flow, with its envelope
//! exactly as delivered, queryable by correlation id in causal order.
//!
//! Its consumer group handles every type of the flow ([`TYPES`]); each event is recorded
//! once: its row is keyed by the event id, so the row is its own inbox record and a
//! redelivery inserts nothing. Rows are never updated or deleted (triggers refuse it).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use herald_runtime::{HandlerContext, HandlerError, Router};
use rusqlite::params;
use serde::Serialize;
use serde::de::IgnoredAny;

use crate::db::{self, Db, Migrations, now_ms, rfc3339};
use crate::events::TYPES;
use crate::services::{handler_error, unsigned};

/// The most events one audit query returns.
pub const AUDIT_EVENTS_MAX: u32 = 1_000;

pub(crate) const MIGRATIONS: Migrations = &[(
    1,
    "audit",
    "CREATE TABLE audit_events (
        seq              INTEGER PRIMARY KEY AUTOINCREMENT,
        event_id         TEXT NOT NULL UNIQUE,
        type             TEXT NOT NULL,
        source           TEXT NOT NULL,
        subject          TEXT,
        correlation_id   TEXT,
        causation_id     TEXT,
        event_time       TEXT,
        topic            TEXT NOT NULL,
        partition        INTEGER NOT NULL,
        partition_offset INTEGER NOT NULL,
        recorded_at      INTEGER NOT NULL,
        envelope         TEXT NOT NULL
    );
    CREATE INDEX audit_by_correlation ON audit_events (correlation_id, seq);
    CREATE TRIGGER audit_events_append_only_update BEFORE UPDATE ON audit_events
    BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
    CREATE TRIGGER audit_events_append_only_delete BEFORE DELETE ON audit_events
    BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;",
)];

/// An event as the audit trail recorded it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditEntry {
    /// The event's id.
    pub event_id: String,
    /// Its type.
    #[serde(rename = "type")]
    pub ty: String,
    /// Its source.
    pub source: String,
    /// Its subject (the order id).
    pub subject: Option<String>,
    /// Its correlation id.
    pub correlation_id: Option<String>,
    /// The id of the event that caused it.
    pub causation_id: Option<String>,
    /// When it happened, as its envelope says.
    pub time: Option<String>,
    /// Where it was delivered from: topic, partition, offset.
    pub topic: String,
    /// Its partition.
    pub partition: u32,
    /// Its offset in the partition.
    pub offset: u64,
    /// When the audit recorded it (RFC 3339).
    pub recorded_at: String,
    /// The envelope, exactly as delivered (JSON structured format).
    pub envelope: serde_json::Value,
}

/// The events of `correlation_id` in causal order: an event comes after the event that
/// caused it; events unrelated by causation come in the order they were recorded. At most
/// [`AUDIT_EVENTS_MAX`].
pub(crate) async fn trail(db: &Db, correlation_id: &str) -> Result<Vec<AuditEntry>, db::Error> {
    let rows: Vec<AuditRow> = sqlx::query_as(
        "SELECT event_id, type, source, subject, correlation_id, causation_id, event_time,
                topic, partition, partition_offset, recorded_at, envelope
         FROM audit_events WHERE correlation_id = ?1 ORDER BY seq LIMIT ?2",
    )
    .bind(correlation_id)
    .bind(i64::from(AUDIT_EVENTS_MAX))
    .fetch_all(db.pool())
    .await?;
    let entries = rows
        .into_iter()
        .map(AuditRow::into_entry)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(causal_order(entries))
}

type AuditRow = (
    String,
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    String,
    i64,
    i64,
    i64,
    String,
);

trait IntoEntry {
    fn into_entry(self) -> Result<AuditEntry, db::Error>;
}

impl IntoEntry for AuditRow {
    fn into_entry(self) -> Result<AuditEntry, db::Error> {
        let (
            event_id,
            ty,
            source,
            subject,
            correlation_id,
            causation_id,
            time,
            topic,
            partition,
            offset,
            recorded_at,
            envelope,
        ) = self;
        Ok(AuditEntry {
            envelope: serde_json::from_str(&envelope).map_err(|error| {
                db::Error::Inconsistent(format!("the envelope of {event_id} is not JSON: {error}"))
            })?,
            event_id,
            ty,
            source,
            subject,
            correlation_id,
            causation_id,
            time,
            topic,
            partition: u32::try_from(partition)
                .map_err(|_| db::Error::Inconsistent(format!("partition {partition}")))?,
            offset: unsigned(offset, "offset")?,
            recorded_at: rfc3339(recorded_at),
        })
    }
}

/// `entries` (in recorded order) ordered so that each comes after its cause: a topological
/// order that keeps the recorded order wherever causation allows.
pub(crate) fn causal_order(entries: Vec<AuditEntry>) -> Vec<AuditEntry> {
    let index: HashMap<&str, usize> = entries
        .iter()
        .enumerate()
        .map(|(at, entry)| (entry.event_id.as_str(), at))
        .collect();
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); entries.len()];
    let mut ready = BTreeSet::new();
    for (at, entry) in entries.iter().enumerate() {
        match entry
            .causation_id
            .as_deref()
            .and_then(|cause| index.get(cause))
        {
            Some(&cause) if cause != at => children[cause].push(at),
            _ => {
                ready.insert(at);
            }
        }
    }
    let mut order = Vec::with_capacity(entries.len());
    while let Some(at) = ready.pop_first() {
        order.push(at);
        ready.extend(children[at].iter().copied());
    }
    // A cycle of causation ids (only forged events make one) keeps its recorded order.
    let placed: BTreeSet<usize> = order.iter().copied().collect();
    order.extend((0..entries.len()).filter(|at| !placed.contains(at)));
    let mut slots: Vec<Option<AuditEntry>> = entries.into_iter().map(Some).collect();
    order
        .into_iter()
        .map(|at| slots[at].take().expect("each index once"))
        .collect()
}

/// The audit service.
pub(crate) struct AuditService {
    db: Db,
}

impl AuditService {
    pub(crate) fn new(db: Db) -> Arc<Self> {
        Arc::new(AuditService { db })
    }

    pub(crate) fn db(&self) -> &Db {
        &self.db
    }

    /// The router of the service's consumer group: every type of the flow.
    pub(crate) fn router(self: &Arc<Self>) -> Router {
        TYPES.iter().fold(Router::new(), |router, ty| {
            let service = Arc::clone(self);
            router.on::<IgnoredAny, _>(*ty, move |_, ctx| {
                let service = Arc::clone(&service);
                async move { service.record(ctx).await }
            })
        })
    }

    async fn record(&self, ctx: HandlerContext) -> Result<(), HandlerError> {
        let message = ctx.message().clone();
        self.db
            .write(move |tx| {
                let event = &message.event;
                let envelope = String::from_utf8(event.to_json()).expect("JSON is UTF-8");
                tx.prepare_cached(
                    "INSERT INTO audit_events (event_id, type, source, subject, correlation_id,
                                               causation_id, event_time, topic, partition,
                                               partition_offset, recorded_at, envelope)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
                     ON CONFLICT (event_id) DO NOTHING",
                )?
                .execute(params![
                    event.id,
                    event.ty,
                    event.source,
                    event.subject,
                    event.correlation_id(),
                    event.causation_id(),
                    event.time.map(|time| time.to_rfc3339()),
                    message.topic.as_str(),
                    i64::from(message.partition),
                    i64::try_from(message.offset).unwrap_or(i64::MAX),
                    now_ms(),
                    envelope,
                ])?;
                Ok(())
            })
            .await
            .map_err(handler_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, cause: Option<&str>) -> AuditEntry {
        AuditEntry {
            event_id: id.to_owned(),
            ty: "T".to_owned(),
            source: "/s".to_owned(),
            subject: None,
            correlation_id: Some("c".to_owned()),
            causation_id: cause.map(str::to_owned),
            time: None,
            topic: "orders".to_owned(),
            partition: 0,
            offset: 0,
            recorded_at: String::new(),
            envelope: serde_json::Value::Null,
        }
    }

    fn ids(entries: &[AuditEntry]) -> Vec<&str> {
        entries
            .iter()
            .map(|entry| entry.event_id.as_str())
            .collect()
    }

    #[test]
    fn causes_come_first_and_recorded_order_breaks_ties() {
        let recorded = vec![
            entry("c", Some("b")),
            entry("a", None),
            entry("b", Some("a")),
            entry("x", Some("a")),
            entry("d", Some("c")),
        ];
        assert_eq!(ids(&causal_order(recorded)), ["a", "b", "c", "x", "d"]);
    }

    #[test]
    fn missing_causes_and_cycles_keep_every_entry() {
        let recorded = vec![
            entry("b", Some("missing")),
            entry("p", Some("q")),
            entry("q", Some("p")),
            entry("s", Some("s")),
        ];
        let ordered = causal_order(recorded);
        assert_eq!(ids(&ordered), ["b", "s", "p", "q"]);
    }
}
