//! The SQLite dialect. Times are the process's clock, in milliseconds since the Unix epoch:
//! an SQLite database lives on one machine. Lists are bound as JSON arrays and read with
//! `json_each`, SQLite having no array type.
//!
//! One relay at a time holds every lease partition (SQLite has one writer anyway). The
//! relay claims without a transaction and settles in a short write transaction: holding
//! SQLite's single write lock across a publish would stall every enqueuing transaction.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{Pool, Row as _, Sqlite, SqliteConnection};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::backend::{ClaimedRow, Dialect, Failure, Holders};
use crate::outbox::OutboxRow;
use crate::outbox::{FailingRow, Lease, OutboxStatus, RelayInfo};

/// How long a statement waits for SQLite's write lock before it fails with "database is
/// locked".
pub const SQLITE_BUSY_TIMEOUT_MS: u64 = 30_000;

/// Connection options for a Herald database in the SQLite file at `path`: created if
/// missing, write-ahead log (readers never block the writer), `synchronous = FULL` (a
/// commit is synced to disk before it returns, so an acknowledged enqueue or checkpoint
/// survives a power loss), and a busy timeout of [`SQLITE_BUSY_TIMEOUT_MS`].
pub fn connect_options(path: impl AsRef<Path>) -> SqliteConnectOptions {
    configure(
        SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true),
    )
}

/// Herald's settings of [`connect_options`] — write-ahead log, `synchronous = FULL`, the
/// busy timeout, foreign keys — applied to `options` (e.g. parsed from a `sqlite://` URL),
/// leaving its file and whether a missing file is created as they are.
pub fn configure(options: SqliteConnectOptions) -> SqliteConnectOptions {
    options
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(Duration::from_millis(SQLITE_BUSY_TIMEOUT_MS))
        .foreign_keys(true)
}

/// The statements that write Herald's SQLite tables in a caller's transaction, for code
/// that writes them through another SQLite driver in the same database (the rows must be
/// the ones [`Outbox::enqueue`](crate::Outbox::enqueue) and
/// [`inbox::begin`](crate::inbox::begin) write).
pub mod statements {
    /// Inserts an outbox row: `?1` to `?9` are the fields of
    /// [`OutboxRow`](crate::OutboxRow) in their order, `?10` the time in milliseconds since
    /// the Unix epoch. The new row's rowid is its `seq`.
    pub const OUTBOX_INSERT: &str =
        "INSERT INTO herald_outbox (id, aggregatetype, aggregateid, type, payload, payload_kind,
                                    headers, topic, partition, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)";

    /// Records that consumer group `?1` handles event `?2` at `?3` (milliseconds since the
    /// Unix epoch), with the events it published `?4` (a JSON batch; `[]` for none). Changes
    /// one row when the group had not handled the event, none when it had.
    pub const INBOX_INSERT: &str =
        "INSERT OR IGNORE INTO herald_inbox (consumer_group, event_id, handled_at, published)
         VALUES (?1, ?2, ?3, ?4)";
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

fn time(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

fn json_list<T: serde::Serialize>(items: &[T]) -> String {
    serde_json::to_string(items).expect("a list of numbers serialises")
}

impl Dialect for Sqlite {
    const SINGLE_RELAY: bool = true;
    const NOTIFIES: bool = false;
    type Claim = ();

    const MIGRATIONS: &'static [(i64, &'static str, &'static str)] = &[(
        1_000_000_001,
        "herald outbox inbox checkpoints",
        include_str!("../migrations/sqlite/1000000001_herald_outbox_inbox_checkpoints.sql"),
    )];

    async fn migrate(pool: &Pool<Self>) -> Result<Vec<i64>, sqlx::migrate::MigrateError> {
        crate::backend::run_migrations(pool).await
    }

    async fn insert_outbox(
        conn: &mut SqliteConnection,
        row: &OutboxRow<'_>,
        _notify: bool,
    ) -> sqlx::Result<i64> {
        let done = sqlx::query(statements::OUTBOX_INSERT)
            .bind(row.id)
            .bind(row.aggregatetype)
            .bind(row.aggregateid)
            .bind(row.ty)
            .bind(row.payload)
            .bind(row.payload_kind)
            .bind(&row.headers)
            .bind(row.topic)
            .bind(row.partition)
            .bind(now_ms())
            .execute(conn)
            .await?;
        Ok(done.last_insert_rowid())
    }

    async fn status(pool: &Pool<Self>, failing_len_max: i64) -> sqlx::Result<OutboxStatus> {
        let (backlog, oldest): (i64, Option<i64>) = sqlx::query_as(
            "SELECT count(*), min(created_at) FROM herald_outbox WHERE published_at IS NULL",
        )
        .fetch_one(pool)
        .await?;
        let now = now_ms();
        let failing = sqlx::query(
            "SELECT seq, id, partition, attempts, last_error, next_attempt_at
             FROM herald_outbox
             WHERE published_at IS NULL AND next_attempt_at IS NOT NULL
             ORDER BY seq LIMIT ?1",
        )
        .bind(failing_len_max)
        .fetch_all(pool)
        .await?
        .into_iter()
        .map(|row| {
            Ok(FailingRow {
                seq: row.try_get("seq")?,
                id: row.try_get("id")?,
                partition: row.try_get::<i64, _>("partition")? as u32,
                attempts: row.try_get::<i64, _>("attempts")? as u32,
                last_error: row.try_get("last_error")?,
                next_attempt_at: row.try_get::<Option<i64>, _>("next_attempt_at")?.map(time),
            })
        })
        .collect::<sqlx::Result<Vec<_>>>()?;
        let leases = sqlx::query_as::<_, (i64, Option<String>, Option<i64>)>(
            "SELECT partition, holder, expires_at FROM herald_outbox_leases ORDER BY partition",
        )
        .fetch_all(pool)
        .await?
        .into_iter()
        .map(|(partition, holder, expires_at)| Lease {
            partition: partition as u32,
            holder,
            expires_at: expires_at.map(time),
        })
        .collect();
        let relays = sqlx::query_as::<_, (String, i64, i64)>(
            "SELECT holder, started_at, expires_at FROM herald_outbox_relays
             WHERE expires_at > ?1 ORDER BY holder",
        )
        .bind(now)
        .fetch_all(pool)
        .await?
        .into_iter()
        .map(|(holder, started_at, expires_at)| RelayInfo {
            holder,
            started_at: time(started_at),
            expires_at: time(expires_at),
        })
        .collect();
        Ok(OutboxStatus {
            backlog: backlog as u64,
            oldest_age: oldest.map(|created| Duration::from_millis((now - created).max(0) as u64)),
            failing,
            leases,
            relays,
        })
    }

    async fn lease_partitions(pool: &Pool<Self>) -> sqlx::Result<i64> {
        sqlx::query_scalar("SELECT count(*) FROM herald_outbox_leases")
            .fetch_one(pool)
            .await
    }

    async fn heartbeat(pool: &Pool<Self>, holder: &str, ttl_ms: i64) -> sqlx::Result<Vec<String>> {
        let now = now_ms();
        let mut tx = pool.begin().await?;
        sqlx::query(
            "INSERT INTO herald_outbox_relays (holder, started_at, expires_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (holder) DO UPDATE SET expires_at = excluded.expires_at",
        )
        .bind(holder)
        .bind(now)
        .bind(now + ttl_ms)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM herald_outbox_relays WHERE expires_at < ?1")
            .bind(now)
            .execute(&mut *tx)
            .await?;
        let live = sqlx::query_scalar(
            "SELECT holder FROM herald_outbox_relays WHERE expires_at > ?1 ORDER BY holder",
        )
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(live)
    }

    async fn renew(pool: &Pool<Self>, holder: &str, ttl_ms: i64) -> sqlx::Result<Vec<i32>> {
        sqlx::query_scalar(
            "UPDATE herald_outbox_leases SET expires_at = ?2 WHERE holder = ?1
             RETURNING partition",
        )
        .bind(holder)
        .bind(now_ms() + ttl_ms)
        .fetch_all(pool)
        .await
    }

    async fn acquire(
        pool: &Pool<Self>,
        holder: &str,
        _want: i64,
        ttl_ms: i64,
    ) -> sqlx::Result<Vec<i32>> {
        // Every partition, if no other relay holds a live lease.
        let now = now_ms();
        sqlx::query_scalar(
            "UPDATE herald_outbox_leases SET holder = ?1, expires_at = ?2
             WHERE NOT EXISTS (
               SELECT 1 FROM herald_outbox_leases
               WHERE holder IS NOT NULL AND holder <> ?1 AND expires_at > ?3)
             RETURNING partition",
        )
        .bind(holder)
        .bind(now + ttl_ms)
        .bind(now)
        .fetch_all(pool)
        .await
    }

    async fn release(pool: &Pool<Self>, holder: &str, partitions: &[i32]) -> sqlx::Result<()> {
        sqlx::query(
            "UPDATE herald_outbox_leases SET holder = NULL, expires_at = NULL
             WHERE holder = ?1 AND partition IN (SELECT value FROM json_each(?2))",
        )
        .bind(holder)
        .bind(json_list(partitions))
        .execute(pool)
        .await?;
        Ok(())
    }

    async fn take_over(pool: &Pool<Self>, holder: &str) -> sqlx::Result<()> {
        forget_holders(pool, holder, Holders::Others).await
    }

    async fn leave(pool: &Pool<Self>, holder: &str) -> sqlx::Result<()> {
        forget_holders(pool, holder, Holders::Only).await
    }

    // One scan of the unpublished rows in `seq` order: the claim reads about `len_max`
    // index entries whatever the partitions.
    const CLAIMS_PER_PARTITION: bool = false;

    async fn claim(
        pool: &Pool<Self>,
        holder: &str,
        ttl_ms: i64,
        valid_ms: i64,
        len_max: i64,
        _partition_len_max: &[i64],
    ) -> sqlx::Result<((), Vec<ClaimedRow>)> {
        // A renewal is a write transaction, with its sync: only when a lease would not
        // outlast the publish. Otherwise the claim only reads.
        let now = now_ms();
        let (partitions, expires_at): (Option<String>, Option<i64>) = sqlx::query_as(
            "SELECT json_group_array(partition), min(coalesce(expires_at, 0))
             FROM herald_outbox_leases WHERE holder = ?1",
        )
        .bind(holder)
        .fetch_one(pool)
        .await?;
        let held: Vec<i32> = match expires_at {
            None => Vec::new(),
            Some(expires_at) if expires_at - now <= valid_ms => {
                Self::renew(pool, holder, ttl_ms).await?
            }
            Some(_) => serde_json::from_str(partitions.as_deref().unwrap_or("[]"))
                .map_err(|error| sqlx::Error::Decode(Box::new(error)))?,
        };
        if held.is_empty() {
            return Ok(((), Vec::new()));
        }
        let rows = sqlx::query(
            "SELECT seq, partition, topic, headers, payload, payload_kind, attempts
             FROM herald_outbox
             WHERE published_at IS NULL
               AND partition IN (SELECT value FROM json_each(?1))
               AND partition NOT IN (
                 SELECT partition FROM herald_outbox
                 WHERE published_at IS NULL AND next_attempt_at IS NOT NULL
                   AND next_attempt_at > ?2)
             ORDER BY seq LIMIT ?3",
        )
        .bind(json_list(&held))
        .bind(now_ms())
        .bind(len_max)
        .fetch_all(pool)
        .await?
        .into_iter()
        .map(|row| {
            Ok(ClaimedRow {
                seq: row.try_get("seq")?,
                partition: row.try_get::<i64, _>("partition")? as i32,
                topic: row.try_get("topic")?,
                headers: row.try_get("headers")?,
                payload: row.try_get("payload")?,
                payload_kind: row.try_get("payload_kind")?,
                attempts: row.try_get::<i64, _>("attempts")? as i32,
            })
        })
        .collect::<sqlx::Result<Vec<_>>>()?;
        Ok(((), rows))
    }

    async fn settle(
        pool: &Pool<Self>,
        (): (),
        published: &[i64],
        failures: &[Failure],
        delete: bool,
    ) -> sqlx::Result<()> {
        if published.is_empty() && failures.is_empty() {
            return Ok(());
        }
        let now = now_ms();
        let settle_published = (!published.is_empty()).then(|| {
            let sql = if delete {
                "DELETE FROM herald_outbox WHERE seq IN (SELECT value FROM json_each(?1))"
            } else {
                "UPDATE herald_outbox SET published_at = ?2, next_attempt_at = NULL
                 WHERE seq IN (SELECT value FROM json_each(?1))"
            };
            sqlx::query(sql).bind(json_list(published)).bind(now)
        });
        if failures.is_empty() {
            // One statement is a transaction of its own: no BEGIN and COMMIT round trips.
            if let Some(settle) = settle_published {
                settle.execute(pool).await?;
            }
            return Ok(());
        }
        let mut tx = pool.begin().await?;
        if let Some(settle) = settle_published {
            settle.execute(&mut *tx).await?;
        }
        for failure in failures {
            sqlx::query(
                "UPDATE herald_outbox
                 SET attempts = attempts + 1, last_error = ?2, next_attempt_at = ?3
                 WHERE seq IN (SELECT value FROM json_each(?1))",
            )
            .bind(json_list(&failure.seqs))
            .bind(&failure.error)
            .bind(now + failure.delay_ms)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await
    }

    async fn delete_published(
        pool: &Pool<Self>,
        older_than_ms: i64,
        len_max: i64,
    ) -> sqlx::Result<u64> {
        let done = sqlx::query(
            "DELETE FROM herald_outbox WHERE seq IN (
               SELECT seq FROM herald_outbox
               WHERE published_at IS NOT NULL AND published_at < ?1
               LIMIT ?2)",
        )
        .bind(now_ms() - older_than_ms)
        .bind(len_max)
        .execute(pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn listen(
        _pool: Pool<Self>,
        _wake: Arc<Notify>,
        _shutdown: CancellationToken,
        _retry_delay_ms: u64,
    ) {
    }

    async fn inbox_insert(
        conn: &mut SqliteConnection,
        group: &str,
        event_id: &str,
        published: &str,
    ) -> sqlx::Result<bool> {
        let done = sqlx::query(statements::INBOX_INSERT)
            .bind(group)
            .bind(event_id)
            .bind(now_ms())
            .bind(published)
            .execute(conn)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn inbox_prune(pool: &Pool<Self>, before_ms: i64, len_max: i64) -> sqlx::Result<u64> {
        // Rowids follow insertion, so the oldest records come first in rowid order: the
        // delete reads at most `len_max` rows from the start and deletes the old ones among
        // them, without an index (a record out of order waits for a later prune).
        let done = sqlx::query(
            "DELETE FROM herald_inbox
             WHERE rowid <= (SELECT max(rowid) FROM (
                               SELECT rowid, handled_at FROM herald_inbox
                               ORDER BY rowid LIMIT ?2)
                             WHERE handled_at < ?1)
               AND handled_at < ?1",
        )
        .bind(before_ms)
        .bind(len_max)
        .execute(pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn inbox_get(
        conn: &mut SqliteConnection,
        group: &str,
        event_id: &str,
    ) -> sqlx::Result<Option<String>> {
        sqlx::query_scalar(
            "SELECT published FROM herald_inbox WHERE consumer_group = ?1 AND event_id = ?2",
        )
        .bind(group)
        .bind(event_id)
        .fetch_optional(conn)
        .await
    }

    async fn checkpoint_load(conn: &mut SqliteConnection, name: &str) -> sqlx::Result<Option<i64>> {
        sqlx::query_scalar("SELECT position FROM herald_checkpoints WHERE name = ?1")
            .bind(name)
            .fetch_optional(conn)
            .await
    }

    async fn checkpoint_save(
        conn: &mut SqliteConnection,
        name: &str,
        position: i64,
    ) -> sqlx::Result<i64> {
        sqlx::query_scalar(
            "INSERT INTO herald_checkpoints (name, position, updated_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (name) DO UPDATE
             SET position = max(position, excluded.position), updated_at = excluded.updated_at
             RETURNING position",
        )
        .bind(name)
        .bind(position)
        .bind(now_ms())
        .fetch_one(conn)
        .await
    }

    async fn checkpoint_delete(conn: &mut SqliteConnection, name: &str) -> sqlx::Result<()> {
        sqlx::query("DELETE FROM herald_checkpoints WHERE name = ?1")
            .bind(name)
            .execute(conn)
            .await?;
        Ok(())
    }
}

/// Frees the leases of `holder`, or of every relay but `holder`, and unregisters them, in one
/// transaction.
async fn forget_holders(pool: &Pool<Sqlite>, holder: &str, which: Holders) -> sqlx::Result<()> {
    let (leases, relays) = match which {
        Holders::Only => (
            "UPDATE herald_outbox_leases SET holder = NULL, expires_at = NULL WHERE holder = ?1",
            "DELETE FROM herald_outbox_relays WHERE holder = ?1",
        ),
        Holders::Others => (
            "UPDATE herald_outbox_leases SET holder = NULL, expires_at = NULL WHERE holder <> ?1",
            "DELETE FROM herald_outbox_relays WHERE holder <> ?1",
        ),
    };
    let mut tx = pool.begin().await?;
    sqlx::query(leases).bind(holder).execute(&mut *tx).await?;
    sqlx::query(relays).bind(holder).execute(&mut *tx).await?;
    tx.commit().await
}
