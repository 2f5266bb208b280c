//! The PostgreSQL dialect. Times come from the database's clock (`clock_timestamp()`), so
//! relays on several machines agree on lease expiry whatever their own clocks say.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::PgListener;
use sqlx::{PgConnection, Pool, Postgres, Row as _};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::backend::{ClaimedRow, Dialect, Failure, Holders};
use crate::outbox::OutboxRow;
use crate::outbox::{FailingRow, Lease, NOTIFY_CHANNEL, OutboxStatus, RelayInfo};

impl Dialect for Postgres {
    const SINGLE_RELAY: bool = false;
    const NOTIFIES: bool = true;
    type Claim = sqlx::Transaction<'static, Postgres>;

    const MIGRATIONS: &'static [(i64, &'static str, &'static str)] = &[
        (
            1_000_000_001,
            "herald outbox inbox checkpoints",
            include_str!("../migrations/postgres/1000000001_herald_outbox_inbox_checkpoints.sql"),
        ),
        (
            1_000_000_002,
            "herald inbox handled_at index",
            include_str!("../migrations/postgres/1000000002_herald_inbox_handled_at.sql"),
        ),
    ];

    async fn migrate(pool: &Pool<Self>) -> Result<Vec<i64>, sqlx::migrate::MigrateError> {
        crate::backend::run_migrations(pool).await
    }

    async fn insert_outbox(
        conn: &mut PgConnection,
        row: &OutboxRow<'_>,
        notify: bool,
    ) -> sqlx::Result<i64> {
        // One round trip: the notification rides on the insert, and PostgreSQL delivers it
        // only if the transaction commits.
        let sql = if notify {
            "WITH row AS (
               INSERT INTO herald_outbox (id, aggregatetype, aggregateid, type, payload,
                                          payload_kind, headers, topic, partition)
               VALUES ($1, $2, $3, $4, $5, $6, $7::json, $8, $9)
               RETURNING seq, partition)
             SELECT seq, pg_notify('herald_outbox', partition::text)::text FROM row"
        } else {
            "INSERT INTO herald_outbox (id, aggregatetype, aggregateid, type, payload,
                                        payload_kind, headers, topic, partition)
             VALUES ($1, $2, $3, $4, $5, $6, $7::json, $8, $9)
             RETURNING seq"
        };
        debug_assert_eq!(NOTIFY_CHANNEL, "herald_outbox");
        sqlx::query_scalar(sql)
            .bind(row.id)
            .bind(row.aggregatetype)
            .bind(row.aggregateid)
            .bind(row.ty)
            .bind(row.payload)
            .bind(row.payload_kind)
            .bind(&row.headers)
            .bind(row.topic)
            .bind(row.partition)
            .fetch_one(conn)
            .await
    }

    async fn status(pool: &Pool<Self>, failing_len_max: i64) -> sqlx::Result<OutboxStatus> {
        let (backlog, oldest_age_s): (i64, Option<f64>) = sqlx::query_as(
            "SELECT count(*),
                    EXTRACT(EPOCH FROM clock_timestamp() - min(created_at))::float8
             FROM herald_outbox WHERE published_at IS NULL",
        )
        .fetch_one(pool)
        .await?;
        let failing = sqlx::query(
            "SELECT seq, id, partition, attempts, last_error, next_attempt_at
             FROM herald_outbox
             WHERE published_at IS NULL AND next_attempt_at IS NOT NULL
             ORDER BY seq LIMIT $1",
        )
        .bind(failing_len_max)
        .fetch_all(pool)
        .await?
        .into_iter()
        .map(|row| {
            Ok(FailingRow {
                seq: row.try_get("seq")?,
                id: row.try_get("id")?,
                partition: row.try_get::<i32, _>("partition")? as u32,
                attempts: row.try_get::<i32, _>("attempts")? as u32,
                last_error: row.try_get("last_error")?,
                next_attempt_at: row.try_get("next_attempt_at")?,
            })
        })
        .collect::<sqlx::Result<Vec<_>>>()?;
        let leases = sqlx::query_as::<_, (i32, Option<String>, Option<DateTime<Utc>>)>(
            "SELECT partition, holder, expires_at FROM herald_outbox_leases ORDER BY partition",
        )
        .fetch_all(pool)
        .await?
        .into_iter()
        .map(|(partition, holder, expires_at)| Lease {
            partition: partition as u32,
            holder,
            expires_at,
        })
        .collect();
        let relays = sqlx::query_as::<_, (String, DateTime<Utc>, DateTime<Utc>)>(
            "SELECT holder, started_at, expires_at FROM herald_outbox_relays
             WHERE expires_at > clock_timestamp() ORDER BY holder",
        )
        .fetch_all(pool)
        .await?
        .into_iter()
        .map(|(holder, started_at, expires_at)| RelayInfo {
            holder,
            started_at,
            expires_at,
        })
        .collect();
        Ok(OutboxStatus {
            backlog: backlog as u64,
            oldest_age: oldest_age_s.map(|age| Duration::from_secs_f64(age.max(0.0))),
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
        let mut conn = pool.acquire().await?;
        sqlx::query(
            "INSERT INTO herald_outbox_relays (holder, expires_at)
             VALUES ($1, clock_timestamp() + $2 * interval '1 millisecond')
             ON CONFLICT (holder) DO UPDATE SET expires_at = EXCLUDED.expires_at",
        )
        .bind(holder)
        .bind(ttl_ms)
        .execute(&mut *conn)
        .await?;
        sqlx::query("DELETE FROM herald_outbox_relays WHERE expires_at < clock_timestamp()")
            .execute(&mut *conn)
            .await?;
        sqlx::query_scalar(
            "SELECT holder FROM herald_outbox_relays
             WHERE expires_at > clock_timestamp() ORDER BY holder",
        )
        .fetch_all(&mut *conn)
        .await
    }

    async fn renew(pool: &Pool<Self>, holder: &str, ttl_ms: i64) -> sqlx::Result<Vec<i32>> {
        sqlx::query_scalar(
            "UPDATE herald_outbox_leases
             SET expires_at = clock_timestamp() + $2 * interval '1 millisecond'
             WHERE holder = $1 RETURNING partition",
        )
        .bind(holder)
        .bind(ttl_ms)
        .fetch_all(pool)
        .await
    }

    async fn acquire(
        pool: &Pool<Self>,
        holder: &str,
        want: i64,
        ttl_ms: i64,
    ) -> sqlx::Result<Vec<i32>> {
        // A lease locked by another transaction is in use (a relay mid-batch, or another
        // relay taking it): skipped, not waited for.
        sqlx::query_scalar(
            "UPDATE herald_outbox_leases
             SET holder = $1, expires_at = clock_timestamp() + $3 * interval '1 millisecond'
             WHERE partition IN (
               SELECT partition FROM herald_outbox_leases
               WHERE holder IS NULL OR expires_at IS NULL OR expires_at < clock_timestamp()
               ORDER BY partition LIMIT $2
               FOR UPDATE SKIP LOCKED)
             RETURNING partition",
        )
        .bind(holder)
        .bind(want)
        .bind(ttl_ms)
        .fetch_all(pool)
        .await
    }

    async fn release(pool: &Pool<Self>, holder: &str, partitions: &[i32]) -> sqlx::Result<()> {
        sqlx::query(
            "UPDATE herald_outbox_leases SET holder = NULL, expires_at = NULL
             WHERE holder = $1 AND partition = ANY($2)",
        )
        .bind(holder)
        .bind(partitions)
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

    const CLAIMS_PER_PARTITION: bool = true;

    async fn claim(
        pool: &Pool<Self>,
        holder: &str,
        ttl_ms: i64,
        _valid_ms: i64,
        len_max: i64,
        partition_len_max: &[i64],
    ) -> sqlx::Result<(Self::Claim, Vec<ClaimedRow>)> {
        let mut tx = pool.begin().await?;
        // The lease rows of the partitions worked on stay locked until the claim is
        // settled: no other relay takes them over mid-batch, and a relay that lost a lease
        // (its holder changed) does not see it here. Locked rows are skipped: a lease
        // still locked by its previous holder's batch is worked on after that batch.
        let partitions: Vec<i32> = sqlx::query_scalar(
            "UPDATE herald_outbox_leases
             SET expires_at = clock_timestamp() + $2 * interval '1 millisecond'
             WHERE partition IN (
               SELECT partition FROM herald_outbox_leases WHERE holder = $1
               FOR UPDATE SKIP LOCKED)
             RETURNING partition",
        )
        .bind(holder)
        .bind(ttl_ms)
        .fetch_all(&mut *tx)
        .await?;
        if partitions.is_empty() {
            return Ok((tx, Vec::new()));
        }
        // Per partition, its first unpublished rows by seq (the partial index), at most its
        // own limit, unless one of its rows waits for a retry; of those, the first `len_max`
        // by seq. Every index entry read costs a heap visit (the rows being marked are on
        // pages that are not all-visible), so each partition reads about its share of the
        // batch rather than `len_max` rows.
        let limits: Vec<i64> = partitions
            .iter()
            .map(|&partition| {
                partition_len_max
                    .get(partition as usize)
                    .copied()
                    .unwrap_or(len_max)
            })
            .collect();
        let rows = sqlx::query(
            "WITH picked AS (
               SELECT o.seq FROM unnest($1::int4[], $3::int8[]) AS p(partition, len_max)
               CROSS JOIN LATERAL (
                 SELECT seq FROM herald_outbox
                 WHERE partition = p.partition AND published_at IS NULL
                 ORDER BY seq LIMIT p.len_max) o
               WHERE NOT EXISTS (
                 SELECT 1 FROM herald_outbox r
                 WHERE r.partition = p.partition AND r.published_at IS NULL
                   AND r.next_attempt_at IS NOT NULL
                   AND r.next_attempt_at > clock_timestamp())
               ORDER BY o.seq LIMIT $2)
             SELECT seq, partition, topic, headers::text AS headers, payload, payload_kind,
                    attempts
             FROM herald_outbox WHERE seq IN (SELECT seq FROM picked) ORDER BY seq",
        )
        .bind(&partitions)
        .bind(len_max)
        .bind(&limits)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .map(|row| {
            Ok(ClaimedRow {
                seq: row.try_get("seq")?,
                partition: row.try_get("partition")?,
                topic: row.try_get("topic")?,
                headers: row.try_get("headers")?,
                payload: row.try_get("payload")?,
                payload_kind: row.try_get("payload_kind")?,
                attempts: row.try_get("attempts")?,
            })
        })
        .collect::<sqlx::Result<Vec<_>>>()?;
        Ok((tx, rows))
    }

    async fn settle(
        _pool: &Pool<Self>,
        mut tx: Self::Claim,
        published: &[i64],
        failures: &[Failure],
        delete: bool,
    ) -> sqlx::Result<()> {
        if !published.is_empty() {
            let sql = if delete {
                "DELETE FROM herald_outbox WHERE seq = ANY($1)"
            } else {
                "UPDATE herald_outbox SET published_at = clock_timestamp(), next_attempt_at = NULL
                 WHERE seq = ANY($1)"
            };
            sqlx::query(sql).bind(published).execute(&mut *tx).await?;
        }
        for failure in failures {
            sqlx::query(
                "UPDATE herald_outbox
                 SET attempts = attempts + 1, last_error = $2,
                     next_attempt_at = clock_timestamp() + $3 * interval '1 millisecond'
                 WHERE seq = ANY($1)",
            )
            .bind(&failure.seqs)
            .bind(&failure.error)
            .bind(failure.delay_ms)
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
               WHERE published_at IS NOT NULL
                 AND published_at < clock_timestamp() - $1 * interval '1 millisecond'
               LIMIT $2)",
        )
        .bind(older_than_ms)
        .bind(len_max)
        .execute(pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn listen(
        pool: Pool<Self>,
        wake: Arc<Notify>,
        shutdown: CancellationToken,
        retry_delay_ms: u64,
    ) {
        let retry_delay = Duration::from_millis(retry_delay_ms);
        loop {
            let listening = async {
                let mut listener = PgListener::connect_with(&pool).await?;
                listener.listen(NOTIFY_CHANNEL).await?;
                Ok::<_, sqlx::Error>(listener)
            };
            let mut listener = tokio::select! {
                () = shutdown.cancelled() => return,
                listening = listening => match listening {
                    Ok(listener) => listener,
                    Err(error) => {
                        tracing::warn!(error = %error, "listening for outbox notifications failed; polling meanwhile");
                        tokio::select! {
                            () = shutdown.cancelled() => return,
                            () = tokio::time::sleep(retry_delay) => continue,
                        }
                    }
                },
            };
            // Rows may have been enqueued while nobody listened.
            wake.notify_one();
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    notification = listener.recv() => match notification {
                        Ok(_) => wake.notify_one(),
                        Err(error) => {
                            tracing::warn!(error = %error, "outbox notifications interrupted; polling meanwhile");
                            break;
                        }
                    },
                }
            }
        }
    }

    async fn inbox_insert(
        conn: &mut PgConnection,
        group: &str,
        event_id: &str,
        published: &str,
    ) -> sqlx::Result<bool> {
        let done = sqlx::query(
            "INSERT INTO herald_inbox (consumer_group, event_id, published)
             VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        )
        .bind(group)
        .bind(event_id)
        .bind(published)
        .execute(conn)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn inbox_prune(pool: &Pool<Self>, before_ms: i64, len_max: i64) -> sqlx::Result<u64> {
        let done = sqlx::query(
            "DELETE FROM herald_inbox WHERE ctid IN (
               SELECT ctid FROM herald_inbox
               WHERE handled_at < to_timestamp($1 / 1000.0)
               ORDER BY handled_at LIMIT $2)",
        )
        .bind(before_ms as f64)
        .bind(len_max)
        .execute(pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn inbox_get(
        conn: &mut PgConnection,
        group: &str,
        event_id: &str,
    ) -> sqlx::Result<Option<String>> {
        sqlx::query_scalar(
            "SELECT published FROM herald_inbox WHERE consumer_group = $1 AND event_id = $2",
        )
        .bind(group)
        .bind(event_id)
        .fetch_optional(conn)
        .await
    }

    async fn checkpoint_load(conn: &mut PgConnection, name: &str) -> sqlx::Result<Option<i64>> {
        sqlx::query_scalar("SELECT position FROM herald_checkpoints WHERE name = $1")
            .bind(name)
            .fetch_optional(conn)
            .await
    }

    async fn checkpoint_save(
        conn: &mut PgConnection,
        name: &str,
        position: i64,
    ) -> sqlx::Result<i64> {
        sqlx::query_scalar(
            "INSERT INTO herald_checkpoints (name, position) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE
             SET position = GREATEST(herald_checkpoints.position, EXCLUDED.position),
                 updated_at = now()
             RETURNING position",
        )
        .bind(name)
        .bind(position)
        .fetch_one(conn)
        .await
    }

    async fn checkpoint_delete(conn: &mut PgConnection, name: &str) -> sqlx::Result<()> {
        sqlx::query("DELETE FROM herald_checkpoints WHERE name = $1")
            .bind(name)
            .execute(conn)
            .await?;
        Ok(())
    }
}

/// Frees the leases of `holder`, or of every relay but `holder`, and unregisters them, in one
/// transaction.
async fn forget_holders(pool: &Pool<Postgres>, holder: &str, which: Holders) -> sqlx::Result<()> {
    let (leases, relays) = match which {
        Holders::Only => (
            "UPDATE herald_outbox_leases SET holder = NULL, expires_at = NULL WHERE holder = $1",
            "DELETE FROM herald_outbox_relays WHERE holder = $1",
        ),
        Holders::Others => (
            "UPDATE herald_outbox_leases SET holder = NULL, expires_at = NULL WHERE holder <> $1",
            "DELETE FROM herald_outbox_relays WHERE holder <> $1",
        ),
    };
    let mut tx = pool.begin().await?;
    sqlx::query(leases).bind(holder).execute(&mut *tx).await?;
    sqlx::query(relays).bind(holder).execute(&mut *tx).await?;
    tx.commit().await
}
