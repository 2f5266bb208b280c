//! The services of the order system. Each owns its database and talks to the others only
//! through events of the topic.
//!
//! A consuming handler does everything in **one** transaction of its service's database:
//! the inbox record of the event it handles ([`first_delivery`]), its state change, and the
//! events it emits ([`emit`]), as [`herald_sql::inbox::begin`] and
//! [`herald_sql::Outbox::enqueue`] write them. So a redelivered
//! event finds its inbox record and changes nothing, and an event is emitted exactly when
//! the state change that caused it commits.

pub(crate) mod analytics;
pub(crate) mod audit;
pub(crate) mod inventory;
pub(crate) mod notification;
pub(crate) mod order;
pub(crate) mod payment;
pub(crate) mod shipping;

use herald_core::Event;
use herald_core::broker::GroupName;
use herald_runtime::HandlerError;
use herald_sql::{Outbox, OutboxRow, sqlite_statements};
use rusqlite::params;

use crate::db::{self, Tx, now_ms};
use crate::events::{OrderEvent, Service, caused_event};

/// The classification of a database failure in a handler: data that breaks an invariant
/// cannot get better by retrying (permanent); anything else is the database being busy,
/// full or shutting down (transient).
pub(crate) fn handler_error(error: db::Error) -> HandlerError {
    match error {
        db::Error::Inconsistent(_) => HandlerError::permanent(error),
        db::Error::Herald(herald_sql::Error::InvalidEvent(_)) => HandlerError::permanent(error),
        other => HandlerError::transient(other),
    }
}

/// Records in `tx` that `group` handles `event`; `false` when it already did (a
/// redelivery), in which case the caller changes nothing. The record is the one
/// [`herald_sql::inbox::begin`] makes.
pub(crate) fn first_delivery(
    tx: &Tx<'_>,
    group: &GroupName,
    event: &Event,
) -> Result<bool, db::Error> {
    let recorded = tx
        .prepare_cached(sqlite_statements::INBOX_INSERT)?
        .execute(params![group.as_str(), event.id, now_ms(), "[]"])?;
    Ok(recorded == 1)
}

/// Writes `event` to `outbox` in `tx`: the row [`Outbox::enqueue`] writes, after the same
/// check.
pub(crate) fn enqueue(tx: &Tx<'_>, outbox: &Outbox, event: &Event) -> Result<(), db::Error> {
    event.validate().map_err(herald_sql::Error::InvalidEvent)?;
    let row = OutboxRow::of(outbox.topic(), event);
    tx.prepare_cached(sqlite_statements::OUTBOX_INSERT)?
        .execute(params![
            row.id,
            row.aggregatetype,
            row.aggregateid,
            row.ty,
            row.payload,
            row.payload_kind,
            row.headers,
            row.topic,
            row.partition,
            now_ms(),
        ])
        .map_err(|error| match &error {
            rusqlite::Error::SqliteFailure(failure, _)
                if failure.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE =>
            {
                db::Error::Herald(herald_sql::Error::DuplicateEventId {
                    id: event.id.clone(),
                })
            }
            _ => db::Error::Statement(error),
        })?;
    Ok(())
}

/// Writes the event `payload`, emitted by `service` in reaction to `cause`, to `outbox` in
/// `tx`.
pub(crate) fn emit<T: OrderEvent>(
    tx: &Tx<'_>,
    outbox: &Outbox,
    service: Service,
    payload: &T,
    cause: &Event,
) -> Result<(), db::Error> {
    enqueue(tx, outbox, &caused_event(service, payload, cause))
}

/// A SQLite integer column as an unsigned amount; a negative one is damaged data.
pub(crate) fn unsigned(value: i64, what: &str) -> Result<u64, db::Error> {
    u64::try_from(value).map_err(|_| db::Error::Inconsistent(format!("negative {what}: {value}")))
}

/// An unsigned amount as a SQLite integer.
pub(crate) fn signed(value: u64, what: &str) -> Result<i64, db::Error> {
    i64::try_from(value)
        .map_err(|_| db::Error::Inconsistent(format!("{what} out of range: {value}")))
}
