//! What the behaviour tests share: a migrated database of each backend, helpers that run
//! the same business statements on both, and the macro that runs one test body on both.

#![allow(dead_code, unreachable_pub, async_fn_in_trait)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use herald_core::Event;
use herald_core::broker::{self, Published, Publisher, TopicName};
use herald_sql::Backend;
use sqlx::{Pool, Postgres, Sqlite, Transaction};
use tokio::sync::watch;

/// How long a test waits for something that should happen within milliseconds: a hang
/// guard, not a synchronisation.
pub const HANG_GUARD: Duration = Duration::from_secs(120);

/// A migrated SQLite database in a temporary directory (kept alive by the returned guard).
pub async fn sqlite() -> (Pool<Sqlite>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(8)
        .connect_with(herald_sql::sqlite_connect_options(
            dir.path().join("herald.db"),
        ))
        .await
        .unwrap();
    herald_sql::migrate(&pool).await.unwrap();
    (pool, dir)
}

/// A fresh, migrated database on this test binary's PostgreSQL server, or `None` (with a
/// visible skip) where PostgreSQL is not installed.
pub async fn postgres(test: &str) -> Option<Pool<Postgres>> {
    let url = postgres_database(test).await?;
    let pool = postgres_pool(&url, 8).await;
    herald_sql::migrate(&pool).await.unwrap();
    Some(pool)
}

/// A fresh database (not migrated) on the shared server; its URL.
pub async fn postgres_database(test: &str) -> Option<String> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let server = herald_testkit::shared_postgres()?;
    let name = format!(
        "{}_{}",
        test.to_lowercase()
            .replace(|c: char| !c.is_ascii_alphanumeric(), "_"),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    Some(server.create_database(&name).await.unwrap())
}

pub async fn postgres_pool(url: &str, connections: u32) -> Pool<Postgres> {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(connections)
        .connect(url)
        .await
        .unwrap()
}

/// Runs the async fn `$body(pool)` against SQLite and against PostgreSQL, as two tests
/// `$name::sqlite` and `$name::postgres`.
// `crate` is meant: the macro is used only by the test crate that defines it.
#[allow(clippy::crate_in_macro_def)]
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident => $body:ident;)+) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let (pool, _dir) = crate::common::sqlite().await;
                super::$body(pool).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let Some(pool) = crate::common::postgres(stringify!($name)).await else {
                    return;
                };
                super::$body(pool).await;
            }
        }
    )+};
}

/// Business statements written for each backend, so test bodies stay generic.
pub trait Business: Backend {
    async fn create_orders(pool: &Pool<Self>);
    async fn insert_order(tx: &mut Transaction<'_, Self>, id: &str);
    async fn count_orders(pool: &Pool<Self>) -> i64;
    async fn add_to_balance(tx: &mut Transaction<'_, Self>, amount: i64);
    async fn balance(pool: &Pool<Self>) -> i64;
    /// Rows in `herald_outbox`, published or not.
    async fn outbox_rows(pool: &Pool<Self>) -> i64;
    /// Rows in `herald_inbox`.
    async fn inbox_rows(pool: &Pool<Self>) -> i64;
    /// Marks every published row as published `age_ms` ago.
    async fn age_published(pool: &Pool<Self>, age_ms: i64);
}

macro_rules! business {
    ($db:ty, $p1:literal, $age:literal) => {
        impl Business for $db {
            async fn create_orders(pool: &Pool<Self>) {
                sqlx::query("CREATE TABLE orders (id TEXT PRIMARY KEY)")
                    .execute(pool)
                    .await
                    .unwrap();
                sqlx::query("CREATE TABLE balance (amount BIGINT NOT NULL)")
                    .execute(pool)
                    .await
                    .unwrap();
                sqlx::query("INSERT INTO balance (amount) VALUES (0)")
                    .execute(pool)
                    .await
                    .unwrap();
            }

            async fn insert_order(tx: &mut Transaction<'_, Self>, id: &str) {
                sqlx::query(concat!("INSERT INTO orders (id) VALUES (", $p1, ")"))
                    .bind(id)
                    .execute(&mut **tx)
                    .await
                    .unwrap();
            }

            async fn count_orders(pool: &Pool<Self>) -> i64 {
                sqlx::query_scalar("SELECT count(*) FROM orders")
                    .fetch_one(pool)
                    .await
                    .unwrap()
            }

            async fn add_to_balance(tx: &mut Transaction<'_, Self>, amount: i64) {
                sqlx::query(concat!("UPDATE balance SET amount = amount + ", $p1))
                    .bind(amount)
                    .execute(&mut **tx)
                    .await
                    .unwrap();
            }

            async fn balance(pool: &Pool<Self>) -> i64 {
                sqlx::query_scalar("SELECT amount FROM balance")
                    .fetch_one(pool)
                    .await
                    .unwrap()
            }

            async fn outbox_rows(pool: &Pool<Self>) -> i64 {
                sqlx::query_scalar("SELECT count(*) FROM herald_outbox")
                    .fetch_one(pool)
                    .await
                    .unwrap()
            }

            async fn inbox_rows(pool: &Pool<Self>) -> i64 {
                sqlx::query_scalar("SELECT count(*) FROM herald_inbox")
                    .fetch_one(pool)
                    .await
                    .unwrap()
            }

            async fn age_published(pool: &Pool<Self>, age_ms: i64) {
                sqlx::query($age).bind(age_ms).execute(pool).await.unwrap();
            }
        }
    };
}

business!(
    Postgres,
    "$1",
    "UPDATE herald_outbox SET published_at = published_at - $1 * interval '1 millisecond'
     WHERE published_at IS NOT NULL"
);
business!(
    Sqlite,
    "?1",
    "UPDATE herald_outbox SET published_at = published_at - ?1 WHERE published_at IS NOT NULL"
);

/// A publisher that fails while told to, counting its failures, and otherwise publishes
/// to `inner`.
pub struct Flaky<P> {
    pub inner: P,
    failing: AtomicU64,
    failures: watch::Sender<u64>,
    attempts: watch::Sender<u64>,
}

impl<P> Flaky<P> {
    pub fn new(inner: P) -> Self {
        Flaky {
            inner,
            failing: AtomicU64::new(0),
            failures: watch::Sender::new(0),
            attempts: watch::Sender::new(0),
        }
    }

    pub fn set_failing(&self, failing: bool) {
        self.failing.store(u64::from(failing), Ordering::SeqCst);
    }

    /// Waits until at least `count` publishes failed.
    pub async fn failed_at_least(&self, count: u64) {
        let mut failures = self.failures.subscribe();
        tokio::time::timeout(HANG_GUARD, failures.wait_for(|failed| *failed >= count))
            .await
            .expect("publishes failed in time")
            .unwrap();
    }

    /// Waits until at least `count` publishes were attempted.
    pub async fn attempted_at_least(&self, count: u64) {
        let mut attempts = self.attempts.subscribe();
        tokio::time::timeout(HANG_GUARD, attempts.wait_for(|n| *n >= count))
            .await
            .expect("publishes attempted in time")
            .unwrap();
    }
}

#[async_trait]
impl<P: Publisher> Publisher for Flaky<P> {
    async fn publish(
        &self,
        topic: &TopicName,
        events: Vec<Event>,
    ) -> Result<Vec<Published>, broker::Error> {
        self.attempts.send_modify(|n| *n += 1);
        if self.failing.load(Ordering::SeqCst) == 1 {
            self.failures.send_modify(|n| *n += 1);
            return Err(broker::Error::Backend(Box::new(std::io::Error::other(
                "broker unreachable",
            ))));
        }
        self.inner.publish(topic, events).await
    }

    async fn close(&self) -> Result<(), broker::Error> {
        self.inner.close().await
    }
}

/// Reads `count` messages from `consumer` (hang-guarded).
pub async fn receive(
    consumer: &mut Box<dyn broker::Consumer>,
    count: usize,
) -> Vec<broker::Message> {
    let mut messages = Vec::with_capacity(count);
    tokio::time::timeout(HANG_GUARD, async {
        while messages.len() < count {
            let message = consumer.recv().await.expect("broker running").unwrap();
            consumer.ack(&message).await.unwrap();
            messages.push(message);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("received {} of {count} messages", messages.len()));
    messages
}

pub fn topic(name: &str) -> TopicName {
    TopicName::new(name).unwrap()
}

pub fn publisher<P: Publisher>(publisher: P) -> Arc<dyn Publisher> {
    Arc::new(publisher)
}
