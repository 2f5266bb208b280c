//! Herald on a SQL database: the transactional outbox and its relay, the inbox, and
//! checkpoints, on PostgreSQL (scale-out) and SQLite (the embedded default), with sqlx.
//!
//! A service saves its state and the events it announces in **one** transaction of its own
//! database ([`Outbox::enqueue`]); a [`Relay`] publishes them afterwards through any
//! [`Publisher`](herald_core::broker::Publisher), so that a crash between "saved" and
//! "published" can neither lose nor invent an event. On the consuming side, the inbox
//! ([`inbox::begin`], [`Inbox`]) records the event id in the transaction of the handler's
//! effect, so the effect happens once however often the event is delivered.
//! [`Checkpoints`] keeps the named positions of subscriptions and projections.
//!
//! Every operation is generic over the [`Backend`]: `sqlx::Postgres` or `sqlx::Sqlite`,
//! with the same behaviour on both except where the backend's documentation says.
//!
//! # Schema
//!
//! [`migrate`] applies the migrations shipped in the crate (`migrations/postgres`,
//! `migrations/sqlite`, embedded in the binary) with sqlx's migrator: idempotent, and on
//! PostgreSQL safe with several processes starting at once (sqlx holds an advisory lock).
//! Herald's migrations are recorded in sqlx's `_sqlx_migrations` table with versions from
//! `1000000001` up and are run with `ignore_missing`; an application that runs its own sqlx
//! migrations in the same database must set `ignore_missing` on its migrator too (or keep
//! Herald's tables in another database or schema), or sqlx reports Herald's as unknown.
//!
//! | table                  | holds                                                        |
//! |------------------------|--------------------------------------------------------------|
//! | `herald_outbox`        | events to publish, in `seq` order; Debezium's column names   |
//! | `herald_outbox_leases` | one row per lease partition: its holder and lease expiry     |
//! | `herald_outbox_relays` | the relays alive, so that each takes its fair share          |
//! | `herald_inbox`         | (consumer group, event id) pairs handled, with outputs       |
//! | `herald_checkpoints`   | named positions, moving only forward                         |
//!
//! # Ordering: what per-key order means here
//!
//! The outbox keeps the order of `seq` within a partition key: a relay publishes the rows
//! of a key in `seq` order and never publishes a row past an earlier unpublished row of its
//! lease partition. On PostgreSQL `seq` values are taken when a row is inserted, but rows
//! become visible when their transaction commits, so two transactions writing the same key
//! concurrently may commit out of `seq` order; the relay then publishes in the order the
//! rows became visible. **`seq` order within a key equals commit order when the writers
//! serialise their writes per key** — the usual case, where a transaction locks the
//! aggregate's row (or the aggregate's version check rejects the concurrent writer) before
//! it enqueues the aggregate's events. The relay never skips a row that commits late: it
//! claims every unpublished row, not rows above a high-water mark. See [`relay`] for how
//! several relays keep the order.

#![forbid(unsafe_code)]

mod backend;
pub mod checkpoint;
mod error;
pub mod inbox;
pub mod outbox;
mod postgres;
pub mod relay;
mod sqlite;

pub use backend::Backend;
pub use checkpoint::Checkpoints;
pub use error::Error;
pub use inbox::{Begin, Inbox};
pub use outbox::{Enqueued, LEASE_PARTITIONS, Outbox, OutboxRow, OutboxStatus, status};
pub use relay::{Relay, RelayOptions};
pub use sqlite::{
    SQLITE_BUSY_TIMEOUT_MS, configure as sqlite_configure,
    connect_options as sqlite_connect_options, statements as sqlite_statements,
};

/// Applies Herald's migrations to the database of `pool`; see [Schema](crate#schema).
pub async fn migrate<DB: Backend>(pool: &sqlx::Pool<DB>) -> Result<(), Error> {
    migrate_report(pool).await.map(drop)
}

/// Applies Herald's migrations as [`migrate`] does, and returns the ones this call applied,
/// in version order: none when the database was up to date. On PostgreSQL the applied
/// versions are read under the migration lock, so of several processes migrating at once
/// each reports only what it applied itself.
pub async fn migrate_report<DB: Backend>(pool: &sqlx::Pool<DB>) -> Result<Vec<Migration>, Error> {
    let applied = DB::migrate(pool).await.map_err(Error::Migrate)?;
    Ok(DB::MIGRATIONS
        .iter()
        .filter(|(version, _, _)| applied.contains(version))
        .map(|&(version, description, _)| Migration {
            version,
            description,
        })
        .collect())
}

/// One of Herald's migrations, as [`migrate_report`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Migration {
    /// Its version in sqlx's `_sqlx_migrations` table (from `1000000001` up).
    pub version: i64,
    /// What it creates or changes.
    pub description: &'static str,
}
