//! The inbox: which events each consumer group has handled, recorded in the transaction of
//! the handler's own effect, so that the effect happens exactly once.
//!
//! Delivery is at least once: a redelivered event must not charge a card twice. A handler
//! whose effect is a write to the same database calls [`begin`] in the transaction of that
//! write: it inserts (consumer group, event id) into `herald_inbox`, and answers
//! [`Begin::Duplicate`] if the pair is there already. The record and the effect commit
//! together or not at all, so the effect happens once per group, however often the event
//! is delivered and wherever the process crashes. [`Inbox::run`] is that pattern in one
//! call.
//!
//! # Contract
//!
//! - [`begin`] returns [`Begin::New`] at most once per (group, event id) among committed
//!   transactions. A transaction that rolls back leaves no record: the event is new again.
//! - Concurrent deliveries of one event: on PostgreSQL the second `begin` waits for the
//!   first transaction to end (the primary key), then answers `Duplicate` if it committed
//!   and `New` if it rolled back. On SQLite write transactions are serialised anyway.
//! - [`Inbox::prune`] deletes the records handled before a given time, oldest first: an
//!   event whose record is pruned is new again, so prune only what can no longer be
//!   delivered again.
//! - Events a handler publishes as part of its effect belong in the outbox, in the same
//!   transaction ([`Outbox::enqueue`](crate::Outbox::enqueue)): then the effect and its
//!   events happen exactly once together.
//!
//! # As the runtime's idempotency store
//!
//! [`Inbox`] also implements herald-runtime's [`IdempotencyStore`], on the same table, for
//! the [idempotency layer](herald_runtime::idempotency): a handled event's record carries
//! the events its handler published (JSON batch format, exact bytes). A record made by
//! [`begin`] reads as "handled, published nothing" — which is right when the handler
//! publishes through the outbox. Its durability is the database's: PostgreSQL's commit, or
//! SQLite with [`sqlite_connect_options`](crate::sqlite_connect_options) (`synchronous =
//! FULL`). Event ids PostgreSQL cannot store in `TEXT` (containing NUL) fail with a
//! [`StoreError`].

use std::fmt;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use herald_core::Event;
use herald_core::broker::GroupName;
use herald_runtime::idempotency::{IdempotencyStore, Put, StoreError};
use sqlx::{Pool, Transaction};

use crate::backend::Backend;
use crate::error::Error;

/// What [`begin`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Begin {
    /// The group has not handled the event: do the effect in this transaction.
    New,
    /// The group handled the event already: skip the effect.
    Duplicate,
}

/// Records, in the caller's transaction `tx`, that `group` handles `event`; see the
/// [module documentation](self).
pub async fn begin<DB: Backend>(
    tx: &mut Transaction<'_, DB>,
    group: &GroupName,
    event: &Event,
) -> Result<Begin, Error> {
    let new = DB::inbox_insert(&mut **tx, group.as_str(), &event.id, "[]").await?;
    Ok(if new { Begin::New } else { Begin::Duplicate })
}

/// What [`Inbox::run`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ran<T> {
    /// The effect ran and committed with the record; its output.
    New(T),
    /// The group had handled the event: the effect did not run.
    Duplicate,
}

/// Why [`Inbox::run`] failed; nothing was committed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError<E> {
    /// The effect failed; its transaction was rolled back.
    #[error("the effect failed")]
    Effect(#[source] E),
    /// The database failed (begin, record or commit).
    #[error("the inbox transaction failed")]
    Database(#[source] Error),
}

/// The inbox on a pool: [`Inbox::run`] for SQL effects, and an [`IdempotencyStore`] for
/// the runtime's idempotency layer. Cheap to clone.
#[derive(Clone)]
pub struct Inbox<DB: Backend> {
    pool: Pool<DB>,
}

impl<DB: Backend> fmt::Debug for Inbox<DB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inbox").finish_non_exhaustive()
    }
}

impl<DB: Backend> Inbox<DB> {
    /// The inbox of `pool`'s database (migrated with [`migrate`](crate::migrate)).
    pub fn new(pool: Pool<DB>) -> Self {
        Inbox { pool }
    }

    /// Deletes up to `len_max` records handled before `before`, oldest first, and returns
    /// how many it deleted: the inbox's retention, to be called again while it deletes
    /// `len_max`. A deleted record no longer stops its event: delete only records of events
    /// that can no longer be delivered again (handled days ago, say, when deliveries are
    /// acked within minutes).
    pub async fn prune(&self, before: DateTime<Utc>, len_max: u32) -> Result<u64, Error> {
        Ok(DB::inbox_prune(&self.pool, before.timestamp_millis(), i64::from(len_max)).await?)
    }

    /// Runs `effect` exactly once per (`group`, event id): begins a transaction, records
    /// the event with [`begin`], runs `effect` in the transaction if the event is new, and
    /// commits. A duplicate commits nothing and returns [`Ran::Duplicate`]; an effect that
    /// fails rolls everything back.
    ///
    /// ```no_run
    /// # async fn example(
    /// #     inbox: herald_sql::Inbox<sqlx::Postgres>,
    /// #     event: herald_core::Event,
    /// # ) -> Result<(), Box<dyn std::error::Error>> {
    /// use herald_core::broker::GroupName;
    ///
    /// let billing = GroupName::new("billing")?;
    /// let ran = inbox
    ///     .run(&billing, &event, async |tx| {
    ///         sqlx::query("UPDATE accounts SET balance = balance - 10 WHERE id = 1")
    ///             .execute(&mut **tx)
    ///             .await
    ///     })
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn run<T, E, F>(
        &self,
        group: &GroupName,
        event: &Event,
        effect: F,
    ) -> Result<Ran<T>, RunError<E>>
    where
        F: AsyncFnOnce(&mut Transaction<'static, DB>) -> Result<T, E>,
    {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(|error| RunError::Database(error.into()))?;
        match begin(&mut tx, group, event)
            .await
            .map_err(RunError::Database)?
        {
            Begin::Duplicate => {
                tx.rollback()
                    .await
                    .map_err(|error| RunError::Database(error.into()))?;
                Ok(Ran::Duplicate)
            }
            Begin::New => {
                // On an error the transaction is rolled back when dropped.
                let output = effect(&mut tx).await.map_err(RunError::Effect)?;
                tx.commit()
                    .await
                    .map_err(|error| RunError::Database(error.into()))?;
                Ok(Ran::New(output))
            }
        }
    }
}

fn store_error(error: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::Backend(Box::new(error))
}

fn parse_published(json: &str) -> Result<Vec<Event>, StoreError> {
    Event::batch_from_json(json.as_bytes()).map_err(store_error)
}

#[async_trait]
impl<DB: Backend> IdempotencyStore for Inbox<DB> {
    async fn get(
        &self,
        group: &GroupName,
        event_id: &str,
    ) -> Result<Option<Vec<Event>>, StoreError> {
        let mut conn = self.pool.acquire().await.map_err(store_error)?;
        let published = DB::inbox_get(&mut conn, group.as_str(), event_id)
            .await
            .map_err(store_error)?;
        published.as_deref().map(parse_published).transpose()
    }

    async fn put(
        &self,
        group: &GroupName,
        event_id: &str,
        published: &[Event],
    ) -> Result<Put, StoreError> {
        let json = String::from_utf8(Event::batch_to_json(published)).expect("JSON is UTF-8");
        let mut conn = self.pool.acquire().await.map_err(store_error)?;
        // The insert waits for a concurrent insert of the key to commit, so the record
        // read after a refused insert is the one that stands.
        if DB::inbox_insert(&mut conn, group.as_str(), event_id, &json)
            .await
            .map_err(store_error)?
        {
            return Ok(Put::Stored);
        }
        let stored = DB::inbox_get(&mut conn, group.as_str(), event_id)
            .await
            .map_err(store_error)?
            .ok_or_else(|| {
                store_error(std::io::Error::other(
                    "the inbox refused the record as a duplicate, then had none",
                ))
            })?;
        Ok(Put::Kept {
            published: parse_published(&stored)?,
        })
    }
}
