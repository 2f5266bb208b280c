//! [`Backend`]: the databases Herald's SQL components run on, and the statements each one
//! runs (its dialect, private to the crate).

use std::future::Future;
use std::sync::Arc;

use std::collections::BTreeSet;

use sqlx::Pool;
use sqlx::migrate::{Migrate, MigrateError, Migration, MigrationSource, MigrationType, Migrator};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::outbox::OutboxRow;
use crate::outbox::OutboxStatus;

/// Whose leases and registrations [`Dialect::leave`] and [`Dialect::take_over`] drop.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Holders {
    /// The named relay's.
    Only,
    /// Every relay's but the named one's.
    Others,
}

/// A database Herald's SQL components run on: `sqlx::Postgres` or `sqlx::Sqlite`.
///
/// Sealed: the statements behind it are written for each database, and the crate's tests
/// run the same behaviour suite against both.
#[allow(private_bounds)]
pub trait Backend: sqlx::Database + Dialect {}

impl Backend for sqlx::Postgres {}
impl Backend for sqlx::Sqlite {}

/// An unpublished row a relay claimed.
#[derive(Debug, Clone)]
pub(crate) struct ClaimedRow {
    pub(crate) seq: i64,
    pub(crate) partition: i32,
    pub(crate) topic: String,
    pub(crate) headers: String,
    pub(crate) payload: Option<Vec<u8>>,
    pub(crate) payload_kind: Option<String>,
    pub(crate) attempts: i32,
}

/// Rows whose publish failed: they wait `delay_ms` before the next attempt.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    pub(crate) seqs: Vec<i64>,
    pub(crate) error: String,
    pub(crate) delay_ms: i64,
}

/// The statements of one database. Times are the database's clock on PostgreSQL, and the
/// process's clock on SQLite (one machine).
pub(crate) trait Dialect: sqlx::Database {
    /// Whether one relay holds every lease partition at a time (SQLite), instead of each
    /// live relay taking its fair share (PostgreSQL).
    const SINGLE_RELAY: bool;

    /// What a claim keeps until its rows are settled: on PostgreSQL the transaction that
    /// locks the claimed partitions' lease rows.
    type Claim: Send;

    /// The embedded migrations of this database, as `(version, description, sql)`.
    const MIGRATIONS: &'static [(i64, &'static str, &'static str)];

    /// Applies the pending migrations; returns the versions this call applied, in order.
    fn migrate(pool: &Pool<Self>) -> impl Future<Output = Result<Vec<i64>, MigrateError>> + Send;

    fn insert_outbox(
        conn: &mut Self::Connection,
        row: &OutboxRow<'_>,
        notify: bool,
    ) -> impl Future<Output = sqlx::Result<i64>> + Send;

    fn status(
        pool: &Pool<Self>,
        failing_len_max: i64,
    ) -> impl Future<Output = sqlx::Result<OutboxStatus>> + Send;

    fn lease_partitions(pool: &Pool<Self>) -> impl Future<Output = sqlx::Result<i64>> + Send;

    /// Registers `holder` as alive for `ttl_ms`, forgets relays whose registration expired,
    /// and returns the live relays, sorted.
    fn heartbeat(
        pool: &Pool<Self>,
        holder: &str,
        ttl_ms: i64,
    ) -> impl Future<Output = sqlx::Result<Vec<String>>> + Send;

    /// Extends every lease `holder` holds; returns their partitions.
    fn renew(
        pool: &Pool<Self>,
        holder: &str,
        ttl_ms: i64,
    ) -> impl Future<Output = sqlx::Result<Vec<i32>>> + Send;

    /// Takes up to `want` free or expired leases (all or none on a single-relay backend).
    fn acquire(
        pool: &Pool<Self>,
        holder: &str,
        want: i64,
        ttl_ms: i64,
    ) -> impl Future<Output = sqlx::Result<Vec<i32>>> + Send;

    fn release(
        pool: &Pool<Self>,
        holder: &str,
        partitions: &[i32],
    ) -> impl Future<Output = sqlx::Result<()>> + Send;

    /// Releases every lease of `holder` and unregisters it.
    fn leave(pool: &Pool<Self>, holder: &str) -> impl Future<Output = sqlx::Result<()>> + Send;

    /// Releases every lease held by a relay other than `holder` and unregisters the other
    /// relays, in one transaction.
    fn take_over(pool: &Pool<Self>, holder: &str) -> impl Future<Output = sqlx::Result<()>> + Send;

    /// Whether [`Dialect::claim`] reads each partition's rows separately, at most
    /// `partition_len_max[partition]` of them (PostgreSQL), rather than in one scan of
    /// every held partition in `seq` order (SQLite).
    const CLAIMS_PER_PARTITION: bool;

    /// The first unpublished rows, in `seq` order, of the partitions `holder` holds, up to
    /// `len_max`, leaving out partitions whose rows wait for a retry. Each partition's rows
    /// are a prefix of its unpublished rows; with [`Dialect::CLAIMS_PER_PARTITION`] that
    /// prefix is at most `partition_len_max[partition]` rows long (indexed by partition).
    /// The leases claimed from last at least `valid_ms` more (renewed to `ttl_ms` if need
    /// be), so that a publish bounded by `valid_ms` ends before they can move.
    fn claim(
        pool: &Pool<Self>,
        holder: &str,
        ttl_ms: i64,
        valid_ms: i64,
        len_max: i64,
        partition_len_max: &[i64],
    ) -> impl Future<Output = sqlx::Result<(Self::Claim, Vec<ClaimedRow>)>> + Send;

    /// Marks `published` rows published (or deletes them) and records `failures`.
    fn settle(
        pool: &Pool<Self>,
        claim: Self::Claim,
        published: &[i64],
        failures: &[Failure],
        delete: bool,
    ) -> impl Future<Output = sqlx::Result<()>> + Send;

    /// Deletes up to `len_max` rows published more than `older_than_ms` ago.
    fn delete_published(
        pool: &Pool<Self>,
        older_than_ms: i64,
        len_max: i64,
    ) -> impl Future<Output = sqlx::Result<u64>> + Send;

    /// Whether [`Dialect::listen`] wakes the relay on commits.
    const NOTIFIES: bool;

    /// Until `shutdown`, wakes `wake` whenever a transaction that enqueued commits.
    fn listen(
        pool: Pool<Self>,
        wake: Arc<Notify>,
        shutdown: CancellationToken,
        retry_delay_ms: u64,
    ) -> impl Future<Output = ()> + Send + 'static;

    /// Records (group, event id) unless recorded; whether this call recorded it.
    fn inbox_insert(
        conn: &mut Self::Connection,
        group: &str,
        event_id: &str,
        published: &str,
    ) -> impl Future<Output = sqlx::Result<bool>> + Send;

    /// Deletes up to `len_max` inbox records handled before `before_ms` (milliseconds
    /// since the Unix epoch), oldest first; how many it deleted.
    fn inbox_prune(
        pool: &Pool<Self>,
        before_ms: i64,
        len_max: i64,
    ) -> impl Future<Output = sqlx::Result<u64>> + Send;

    fn inbox_get(
        conn: &mut Self::Connection,
        group: &str,
        event_id: &str,
    ) -> impl Future<Output = sqlx::Result<Option<String>>> + Send;

    fn checkpoint_load(
        conn: &mut Self::Connection,
        name: &str,
    ) -> impl Future<Output = sqlx::Result<Option<i64>>> + Send;

    /// Stores the greater of `position` and the stored position; returns the stored one.
    fn checkpoint_save(
        conn: &mut Self::Connection,
        name: &str,
        position: i64,
    ) -> impl Future<Output = sqlx::Result<i64>> + Send;

    fn checkpoint_delete(
        conn: &mut Self::Connection,
        name: &str,
    ) -> impl Future<Output = sqlx::Result<()>> + Send;
}

/// The migrator of a backend: its embedded migrations, not failing on versions it does not
/// know (an application's own sqlx migrations in the same database).
/// Its locking is off: [`run_migrations`] holds the lock.
pub(crate) async fn migrator<DB: Dialect>() -> Result<Migrator, MigrateError> {
    let mut migrator = Migrator::new(Embedded(DB::MIGRATIONS)).await?;
    migrator.set_ignore_missing(true);
    migrator.set_locking(false);
    Ok(migrator)
}

/// Applies the backend's pending migrations on a connection of `pool` and returns the
/// versions applied. The migration lock (an advisory lock on PostgreSQL, nothing on SQLite)
/// is taken here rather than by the migrator, so that the versions applied before and after
/// are read under it: of several processes migrating at once, each reports what it applied.
pub(crate) async fn run_migrations<DB>(pool: &Pool<DB>) -> Result<Vec<i64>, MigrateError>
where
    DB: Dialect,
    DB::Connection: Migrate,
{
    let migrator = migrator::<DB>().await?;
    let mut conn = pool.acquire().await?;
    let conn = &mut *conn;
    conn.lock().await?;
    let applied: Result<Vec<i64>, MigrateError> = async {
        conn.ensure_migrations_table().await?;
        let before = applied_versions(conn).await?;
        // `run_direct` is what `Migrator::run` calls once it has a connection; sqlx keeps
        // it public for generic callers like this one, which `run`'s `Acquire` bound
        // cannot serve.
        migrator.run_direct(conn).await?;
        let after = applied_versions(conn).await?;
        Ok(after.difference(&before).copied().collect())
    }
    .await;
    let unlocked = conn.unlock().await;
    let applied = applied?;
    unlocked?;
    Ok(applied)
}

async fn applied_versions<C: Migrate>(conn: &mut C) -> Result<BTreeSet<i64>, MigrateError> {
    Ok(conn
        .list_applied_migrations()
        .await?
        .into_iter()
        .map(|migration| migration.version)
        .collect())
}

/// Migrations compiled into the binary.
#[derive(Debug)]
struct Embedded(&'static [(i64, &'static str, &'static str)]);

impl MigrationSource<'static> for Embedded {
    fn resolve(
        self,
    ) -> futures::future::BoxFuture<'static, Result<Vec<Migration>, sqlx::error::BoxDynError>> {
        let migrations = self
            .0
            .iter()
            .map(|&(version, description, sql)| {
                Migration::new(
                    version,
                    description.into(),
                    MigrationType::Simple,
                    sql.into(),
                    false,
                )
            })
            .collect();
        Box::pin(async move { Ok(migrations) })
    }
}
