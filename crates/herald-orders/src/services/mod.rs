//! The services of the order system. Each owns its database and talks to the others only
//! through events of the topic.
//!
//! A consuming handler does everything in **one** transaction of its service's database:
//! the inbox record of the event it handles ([`herald_sql::inbox::begin`]), its state
//! change, and the events it emits ([`herald_sql::Outbox::enqueue`]). So a redelivered
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
use herald_sql::{Begin, Outbox};

use crate::db::{self, Tx};
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
/// redelivery), in which case the caller changes nothing.
pub(crate) async fn first_delivery(
    tx: &mut Tx<'_>,
    group: &GroupName,
    event: &Event,
) -> Result<bool, db::Error> {
    Ok(herald_sql::inbox::begin(tx, group, event).await? == Begin::New)
}

/// Writes the event `payload`, emitted by `service` in reaction to `cause`, to `outbox` in
/// `tx`.
pub(crate) async fn emit<T: OrderEvent>(
    tx: &mut Tx<'_>,
    outbox: &Outbox,
    service: Service,
    payload: &T,
    cause: &Event,
) -> Result<(), db::Error> {
    outbox
        .enqueue(tx, &caused_event(service, payload, cause))
        .await?;
    Ok(())
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
