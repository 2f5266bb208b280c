//! A service's own SQLite database, and its writer: one connection that commits the
//! transactions of many concurrent handlers together (group commit).
//!
//! # Contract
//!
//! - [`Db::write`] runs a job in a transaction and returns its output only once that
//!   transaction has **committed** (synced, per [`Durability`]). A job that fails gets its
//!   error and leaves no write: the batch is rolled back and run again without it, so the
//!   other jobs are unaffected (a job may therefore run more than once before it commits,
//!   which is why it must be `Clone` and have no effect outside its transaction). A commit
//!   that fails fails every job of the batch; none of their writes stand.
//! - The writer takes the jobs queued when it starts a batch, up to
//!   [`DbOptions::write_batch_len_max`], and runs them one after another in one `BEGIN
//!   IMMEDIATE` transaction. Handlers of different keys run in parallel, so under load
//!   their jobs share the commit's sync instead of paying one each; a lone job commits
//!   alone, at once.
//! - Jobs of one batch see each other's writes in queue order, as if committed one by one.
//! - Jobs are synchronous: the writer runs them on its own thread, on its own connection
//!   (rusqlite, on the same SQLite library as sqlx), with its prepared statements cached.
//!   A statement costs a call, not a hand-off to a connection thread and back.
//! - After each commit the writer wakes the service's outbox relay, so events written by a
//!   job are published without waiting for the relay's next poll.
//! - Writers take turns instead of meeting on SQLite's write lock, whose busy handler would
//!   make them sleep for milliseconds: the outbox relay writes through [`Db::writes`], a
//!   pool of one connection, and the writer holds that connection (unused) for each batch.
//! - Reads never wait for the writer (write-ahead log). [`Db::read`] runs a short read on
//!   the caller's thread, on a connection of the service's own (rusqlite), in one read
//!   transaction: the reads of the flow and of its API. [`Db::pool`] is sqlx's, for
//!   Herald's outbox queries and the tools.
//!
//! The writer stops when its stop token is cancelled, after running the jobs already queued;
//! later writes fail with [`Error::Closed`].

use std::any::Any;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use rusqlite::TransactionBehavior;
use serde::{Deserialize, Serialize};
use sqlx::SqlitePool;
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions, SqliteSynchronous};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// When a committed write of a service's database is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// After the commit is synced to disk (SQLite `synchronous = FULL`): it survives a
    /// power loss.
    #[default]
    Fsync,
    /// After the commit reaches the operating system (SQLite `synchronous = NORMAL` in WAL
    /// mode): it survives a crash of the process (`kill -9`), not a power loss.
    Os,
}

impl Durability {
    /// SQLite's `synchronous` setting for it.
    fn synchronous(self) -> SqliteSynchronous {
        match self {
            Durability::Fsync => SqliteSynchronous::Full,
            Durability::Os => SqliteSynchronous::Normal,
        }
    }

    /// The same, as the `PRAGMA synchronous` value.
    fn synchronous_pragma(self) -> &'static str {
        match self {
            Durability::Fsync => "FULL",
            Durability::Os => "NORMAL",
        }
    }
}

/// The bounds of a service database. Every bound is named with its unit last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DbOptions {
    /// When a commit is acknowledged.
    pub durability: Durability,
    /// Connections kept for reads, of each kind: the service's own (rusqlite) and
    /// sqlx's (Herald's outbox queries, the tools).
    pub read_connections_max: u32,
    /// The most jobs committed in one transaction.
    pub write_batch_len_max: usize,
    /// Jobs waiting for the writer; further writers wait for room (backpressure).
    pub write_queue_len_max: usize,
}

impl Default for DbOptions {
    fn default() -> Self {
        DbOptions {
            durability: Durability::Fsync,
            read_connections_max: 4,
            write_batch_len_max: 256,
            write_queue_len_max: 1_024,
        }
    }
}

/// Why an operation on a service's database failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operation through sqlx failed (opening the database, Herald's outbox queries,
    /// the tools' reads).
    #[error("database operation failed")]
    Sql(#[from] sqlx::Error),
    /// A statement on the service's own connections (the writer's, the readers') failed.
    #[error("database statement failed")]
    Statement(#[from] rusqlite::Error),
    /// The outbox or the inbox failed.
    #[error("outbox or inbox operation failed")]
    Herald(#[from] herald_sql::Error),
    /// Applying the migrations failed.
    #[error("migrating the database failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The commit of the batch the job ran in failed; its writes do not stand.
    #[error("committing the transaction failed")]
    Commit(#[source] Arc<rusqlite::Error>),
    /// The writer could not take its turn on the database: the job did not run.
    #[error("the database is unavailable for writes")]
    Unavailable(#[source] Arc<sqlx::Error>),
    /// The writer has stopped (the system is shutting down).
    #[error("the database writer has stopped")]
    Closed,
    /// Stored data breaks an invariant the schema does not enforce.
    #[error("stored data is inconsistent: {0}")]
    Inconsistent(String),
}

/// A job's transaction: the batch's, on the writer's connection.
pub(crate) type Tx<'c> = rusqlite::Transaction<'c>;

type Output = Result<Box<dyn Any + Send>, Error>;
type RunJob = Box<dyn FnMut(&Tx<'_>) -> Output + Send>;

struct Job {
    run: RunJob,
    reply: oneshot::Sender<Output>,
}

/// A service's database: its readers, a pool for sqlx's reads, the relay's write
/// connection and the writer's queue. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Db {
    readers: Arc<Readers>,
    pool: SqlitePool,
    writes: SqlitePool,
    jobs: mpsc::Sender<Job>,
}

/// The connections of [`Db::read`]: opened when none is idle, kept up to `idle_max`.
struct Readers {
    path: PathBuf,
    idle: Mutex<Vec<rusqlite::Connection>>,
    idle_max: usize,
}

impl Readers {
    fn take(&self) -> Result<rusqlite::Connection, Error> {
        let idle = self.idle.lock().expect("not poisoned").pop();
        match idle {
            Some(conn) => Ok(conn),
            None => {
                let conn = rusqlite::Connection::open(&self.path)?;
                conn.busy_timeout(Duration::from_millis(herald_sql::SQLITE_BUSY_TIMEOUT_MS))?;
                Ok(conn)
            }
        }
    }

    fn put(&self, conn: rusqlite::Connection) {
        let mut idle = self.idle.lock().expect("not poisoned");
        if idle.len() < self.idle_max {
            idle.push(conn);
        }
    }
}

/// The writer of a [`Db`], before it runs.
pub(crate) struct Writer {
    conn: rusqlite::Connection,
    writes: SqlitePool,
    jobs: mpsc::Receiver<Job>,
    batch_len_max: usize,
    name: &'static str,
}

/// Migrations compiled into the binary: `(version, description, sql)`.
pub(crate) type Migrations = &'static [(i64, &'static str, &'static str)];

/// The connection options of the database file at `path`: Herald's SQLite settings (WAL,
/// busy timeout), with the sync level of `durability`.
pub(crate) fn connect_options(path: &Path, durability: Durability) -> SqliteConnectOptions {
    herald_sql::sqlite_connect_options(path).synchronous(durability.synchronous())
}

/// The writer's connection to the database at `path`, with the settings of
/// [`connect_options`].
fn open_writer(path: &Path, durability: Durability) -> Result<rusqlite::Connection, Error> {
    let conn = rusqlite::Connection::open(path)?;
    conn.busy_timeout(Duration::from_millis(herald_sql::SQLITE_BUSY_TIMEOUT_MS))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", durability.synchronous_pragma())?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // Each service runs a handful of statements; all of them stay prepared.
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

impl Db {
    /// Opens (creating it if needed) the database at `path`, applies Herald's migrations
    /// (outbox, inbox) and `migrations`, and returns it with its writer, to be spawned.
    pub(crate) async fn open(
        path: &Path,
        name: &'static str,
        options: &DbOptions,
        migrations: Migrations,
    ) -> Result<(Db, Writer), Error> {
        let connect = connect_options(path, options.durability);
        let pool = SqlitePoolOptions::new()
            .max_connections(options.read_connections_max.max(1))
            .connect_with(connect.clone())
            .await?;
        herald_sql::migrate(&pool).await?;
        let mut migrator = Migrator::new(Embedded(migrations)).await?;
        // Herald's own migrations are recorded in the same table.
        migrator.set_ignore_missing(true);
        migrator.run(&pool).await?;
        let writes = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            // Taken for every batch: no round trip to check it first.
            .test_before_acquire(false)
            .connect_with(connect)
            .await?;
        let conn = open_writer(path, options.durability)?;
        let (jobs_tx, jobs_rx) = mpsc::channel(options.write_queue_len_max.max(1));
        let readers = Arc::new(Readers {
            path: path.to_owned(),
            idle: Mutex::new(Vec::new()),
            idle_max: options.read_connections_max.max(1) as usize,
        });
        Ok((
            Db {
                readers,
                pool,
                writes: writes.clone(),
                jobs: jobs_tx,
            },
            Writer {
                conn,
                writes,
                jobs: jobs_rx,
                batch_len_max: options.write_batch_len_max.max(1),
                name,
            },
        ))
    }

    /// Runs `read` in a read transaction, on the caller's thread: it sees one committed
    /// state of the database. It must be short (a few indexed lookups): it holds up the
    /// caller's thread, which may be one of the runtime's.
    pub(crate) fn read<T>(
        &self,
        read: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let mut conn = self.readers.take()?;
        let output = conn
            .transaction_with_behavior(TransactionBehavior::Deferred)
            .map_err(Error::from)
            .and_then(|tx| read(&tx));
        self.readers.put(conn);
        output
    }

    /// The pool for sqlx's reads.
    pub(crate) fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// The write connection of the outbox relay, as a pool of one: its transactions take
    /// turns with the writer's batches.
    pub(crate) fn writes(&self) -> &SqlitePool {
        &self.writes
    }

    /// Runs `job` in a transaction of the writer; returns its output once committed. See
    /// the [module documentation](self).
    pub(crate) async fn write<T, F>(&self, job: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(&Tx<'_>) -> Result<T, Error> + Clone + Send + 'static,
    {
        let run: RunJob = Box::new(move |tx| {
            let output = (job.clone())(tx)?;
            Ok(Box::new(output) as Box<dyn Any + Send>)
        });
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job { run, reply })
            .await
            .map_err(|_| Error::Closed)?;
        let output = answer.await.map_err(|_| Error::Closed)??;
        Ok(*output
            .downcast::<T>()
            .expect("a job's output is the type its caller gave"))
    }

    /// Closes the read pool and the write connection.
    pub(crate) async fn close(&self) {
        self.pool.close().await;
        self.writes.close().await;
    }
}

impl Writer {
    /// Spawns the writer on a thread of its own; it wakes `relay` (if any) after each commit
    /// and stops when `stop` is cancelled, after the jobs already queued.
    pub(crate) fn spawn(
        self,
        relay: Option<herald_sql::relay::Handle>,
        stop: CancellationToken,
    ) -> JoinHandle<()> {
        let span = tracing::info_span!("herald.orders.db_writer", service = self.name);
        tokio::task::spawn_blocking(move || span.in_scope(|| self.run(relay, stop)))
    }

    fn run(mut self, relay: Option<herald_sql::relay::Handle>, stop: CancellationToken) {
        let runtime = tokio::runtime::Handle::current();
        let mut batch: Vec<Job> = Vec::with_capacity(self.batch_len_max);
        let mut stopping = false;
        loop {
            let first = if stopping {
                self.jobs.blocking_recv()
            } else {
                let next = runtime.block_on(async {
                    tokio::select! {
                        job = self.jobs.recv() => Some(job),
                        () = stop.cancelled() => None,
                    }
                });
                match next {
                    Some(job) => job,
                    None => {
                        // Refuse new jobs; the queued ones still run.
                        self.jobs.close();
                        stopping = true;
                        continue;
                    }
                }
            };
            let Some(first) = first else { break };
            batch.push(first);
            while batch.len() < self.batch_len_max {
                match self.jobs.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            let jobs = batch.len();
            let started = std::time::Instant::now();
            // The relay's connection, held so that the relay does not write meanwhile.
            match runtime.block_on(self.writes.acquire()) {
                Ok(turn) => {
                    commit(&mut self.conn, &mut batch);
                    drop(turn);
                }
                Err(error) => {
                    tracing::warn!(error = %error, jobs, "the write connection is unavailable");
                    let error = Arc::new(error);
                    for job in batch.drain(..) {
                        let _ = job.reply.send(Err(Error::Unavailable(Arc::clone(&error))));
                    }
                }
            }
            tracing::trace!(
                jobs,
                elapsed_us = started.elapsed().as_micros() as u64,
                "committed a write batch"
            );
            if let Some(relay) = &relay {
                relay.wake();
            }
        }
        runtime.block_on(self.writes.close());
    }
}

/// Runs `batch` in one transaction and answers every job: a job that fails is answered
/// with its error and the batch runs again without it (jobs rarely fail, so a batch rarely
/// runs twice, and no job pays for a savepoint).
fn commit(conn: &mut rusqlite::Connection, batch: &mut Vec<Job>) {
    let mut jobs = std::mem::take(batch);
    while !jobs.is_empty() {
        match run_batch(conn, &mut jobs) {
            Ok(Ok(outputs)) => {
                for (job, output) in jobs.drain(..).zip(outputs) {
                    // A caller that gave up (its handler was aborted) needs no answer.
                    let _ = job.reply.send(Ok(output));
                }
            }
            Ok(Err((failed, error))) => {
                let job = jobs.remove(failed);
                let _ = job.reply.send(Err(error));
            }
            Err(error) => {
                tracing::warn!(error = %error, jobs = jobs.len(), "a write batch failed to commit");
                let error = Arc::new(error);
                for job in jobs.drain(..) {
                    let _ = job.reply.send(Err(Error::Commit(Arc::clone(&error))));
                }
            }
        }
    }
}

/// The outputs of a committed batch.
type Committed = Vec<Box<dyn Any + Send>>;

/// Runs `jobs` in one transaction: their outputs once committed, or the index and error
/// of the first job that failed (the transaction rolled back); fails if the database
/// does.
fn run_batch(
    conn: &mut rusqlite::Connection,
    jobs: &mut [Job],
) -> Result<Result<Committed, (usize, Error)>, rusqlite::Error> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut outputs = Vec::with_capacity(jobs.len());
    for (index, job) in jobs.iter_mut().enumerate() {
        match (job.run)(&tx) {
            Ok(output) => outputs.push(output),
            Err(error) => {
                tx.rollback()?;
                return Ok(Err((index, error)));
            }
        }
    }
    tx.commit()?;
    Ok(Ok(outputs))
}

/// Migrations compiled into the binary.
#[derive(Debug)]
struct Embedded(Migrations);

impl MigrationSource<'static> for Embedded {
    fn resolve(self) -> BoxFuture<'static, Result<Vec<Migration>, sqlx::error::BoxDynError>> {
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

/// Milliseconds since the Unix epoch, as the services store times.
pub(crate) fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A time stored by [`now_ms`], as RFC 3339.
pub(crate) fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use futures::StreamExt as _;
    use futures::stream::FuturesUnordered;

    use super::*;

    const MIGRATIONS: Migrations = &[(1, "rows", "CREATE TABLE rows (n INTEGER PRIMARY KEY);")];

    fn insert(n: i64) -> impl FnOnce(&Tx<'_>) -> Result<i64, Error> + Clone {
        move |tx| {
            tx.execute("INSERT INTO rows (n) VALUES (?1)", [n])?;
            if n % 7 == 0 {
                return Err(Error::Inconsistent(format!("{n} is refused")));
            }
            Ok(n)
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_job_leaves_no_write_and_its_batch_commits_without_it() {
        let dir = tempfile::tempdir().unwrap();
        let (db, writer) = Db::open(
            &dir.path().join("test.sqlite"),
            "test",
            &DbOptions::default(),
            MIGRATIONS,
        )
        .await
        .unwrap();
        // Every job is queued before the writer starts, so they all share one batch.
        let mut writes: FuturesUnordered<_> = (1..=200).map(|n| db.write(insert(n))).collect();
        assert!(futures::poll!(writes.next()).is_pending());
        let stop = CancellationToken::new();
        let writer = writer.spawn(None, stop.clone());
        let mut committed = Vec::new();
        let mut refused = 0;
        while let Some(result) = writes.next().await {
            match result {
                Ok(n) => committed.push(n),
                Err(Error::Inconsistent(_)) => refused += 1,
                Err(other) => panic!("{other}"),
            }
        }
        assert_eq!(refused, 200 / 7);
        committed.sort_unstable();
        let stored: Vec<i64> = sqlx::query_scalar("SELECT n FROM rows ORDER BY n")
            .fetch_all(db.pool())
            .await
            .unwrap();
        assert_eq!(stored, committed);
        assert!(stored.iter().all(|n| n % 7 != 0));
        assert_eq!(stored.len(), 200 - 200 / 7);

        stop.cancel();
        writer.await.unwrap();
        assert!(matches!(db.write(insert(1_000)).await, Err(Error::Closed)));
    }
}
