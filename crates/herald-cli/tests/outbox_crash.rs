//! Crash safety of the outbox relay, on a SQLite file and on PostgreSQL: `kill -9` of the
//! relay process after the broker acknowledged its publish and before the rows were marked
//! published, then a restart, then a consumer whose effects go through the SQL inbox.
//!
//! 1. The test enqueues the events in business transactions (an `orders` row and the
//!    event's outbox row per event, several events per transaction), with the database
//!    migrated by `herald migrate`.
//! 2. `herald debug relay --pause-after-publish` relays them to the embedded broker on a
//!    data directory; its publisher reports the first publish the broker acknowledged and
//!    then blocks, so the relay never marks anything. The test reads that line (the only
//!    synchronisation) and kills the process with SIGKILL.
//! 3. `herald outbox status --json`: every row is still in the backlog, and the dead relay
//!    still holds leases. The topic already holds the reported events.
//! 4. The relay restarts (without the pause) and publishes again: it reports every row
//!    published — at least once: the events already stored are refused by the broker as
//!    duplicates and counted as published — and stops cleanly on SIGTERM. The backlog is
//!    empty, no lease is held, and the topic holds every event exactly once.
//! 5. A consumer reads the topic and hands each message to its handler **twice**; the
//!    handler's effect (a row in `effects`) runs in `Inbox::run`. Each event has exactly
//!    one effect.
//!
//! PostgreSQL runs on herald-testkit's throwaway server and follows its skip policy.

use std::collections::{BTreeSet, HashSet};
use std::convert::Infallible;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::str::FromStr as _;
use std::sync::mpsc;
use std::time::Duration;

use herald_core::Event;
use herald_core::broker::{GroupName, Subscriber as _, TopicName};
use herald_log::broker::{Broker, BrokerOptions};
use herald_log::{Log, Options};
use herald_sql::inbox::Ran;
use herald_sql::{Backend, Inbox, Outbox};
use serde_json::Value;
use sqlx::{Pool, Postgres, Sqlite, Transaction};

mod common;

use common::{herald, read_all, read_lines, success};

/// Events enqueued.
const EVENTS: usize = 120;
/// Distinct partition keys among them.
const KEYS: usize = 12;
/// Events per business transaction.
const EVENTS_PER_TRANSACTION: usize = 4;
/// The relays' lease time: the restarted relay waits up to this long for the dead one's
/// leases to expire.
const LEASE_TTL_MS: u64 = 1_500;
/// The topic the events go to.
const TOPIC: &str = "orders";
/// The consumer group of the inbox.
const GROUP: &str = "fulfilment";
/// A hang guard, not a synchronisation: how long one line of the relay may take.
const LINE_WAIT_MAX: Duration = Duration::from_secs(120);

#[test]
fn sqlite_a_relay_killed_between_publish_and_mark_publishes_again_and_effects_stay_single() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("shop.db").display());
    runtime().block_on(crash_and_recover::<Sqlite>(&url, dir.path()));
}

#[test]
fn postgres_a_relay_killed_between_publish_and_mark_publishes_again_and_effects_stay_single() {
    let runtime = runtime();
    let Some(server) = herald_testkit::shared_postgres() else {
        return;
    };
    let url = runtime
        .block_on(server.create_database("outbox_crash"))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    runtime.block_on(crash_and_recover::<Postgres>(&url, dir.path()));
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

async fn crash_and_recover<DB: Shop>(url: &str, dir: &Path) {
    let data = dir.join("data");
    let migrated = success(herald(&data, &["migrate", "--database-url", url, "--json"]));
    let migrated: Value = serde_json::from_str(&migrated).unwrap();
    assert!(
        !migrated["applied"].as_array().unwrap().is_empty(),
        "{migrated}"
    );
    let pool = DB::connect(url).await;
    DB::create_tables(&pool).await;
    let enqueued = enqueue(&pool).await;

    // The relay is killed once the broker has acknowledged a publish.
    let mut relay = RelayProcess::start(url, &data, true);
    let holder = relay.started("paused relay");
    let paused = relay.line("paused relay");
    let paused_ids: Vec<String> = paused["paused"]["events"]
        .as_array()
        .unwrap_or_else(|| panic!("a pause line, not {paused}"))
        .iter()
        .map(|id| id.as_str().unwrap().to_owned())
        .collect();
    assert!(!paused_ids.is_empty());
    relay.child.kill().expect("SIGKILL is delivered");
    relay.child.wait().unwrap();

    // Nothing was marked; the dead relay's leases are still there.
    let status = outbox_status(url, &data);
    assert_eq!(status["backlog"], EVENTS as u64, "{status}");
    let dead = status["relays"]
        .as_array()
        .unwrap()
        .iter()
        .find(|relay| relay["holder"] == holder.as_str())
        .unwrap_or_else(|| panic!("the dead relay holds its leases: {status}"));
    assert!(
        !dead["partitions"].as_array().unwrap().is_empty(),
        "{status}"
    );
    let stored = topic_ids(&data).await;
    for id in &paused_ids {
        assert!(
            stored.contains(id),
            "acknowledged event {id} is in the topic"
        );
    }

    // Restarted, the relay publishes every row again and marks them.
    let mut relay = RelayProcess::start(url, &data, false);
    relay.started("restarted relay");
    loop {
        let line = relay.line("restarted relay");
        let published = line["published"]
            .as_u64()
            .unwrap_or_else(|| panic!("a progress line, not {line}"));
        if published >= EVENTS as u64 {
            break;
        }
    }
    let (exit, lines) = relay.terminate("restarted relay");
    assert!(exit.success(), "a SIGTERM stop exits 0, not {exit}");
    let report = lines
        .iter()
        .rev()
        .find_map(|line| line.get("report"))
        .unwrap_or_else(|| panic!("a clean stop prints a report: {lines:?}"));
    assert_eq!(
        report["published"], EVENTS as u64,
        "every row published again, the refused duplicates included: {report}"
    );
    let status = outbox_status(url, &data);
    assert_eq!(status["backlog"], 0, "{status}");
    assert_eq!(status["relays"], serde_json::json!([]), "{status}");
    assert_eq!(status["free_partitions"].as_array().unwrap().len(), 32);

    // The topic holds every event once, and the inbox makes each effect happen once.
    let handled = consume_twice(&pool, &data, &enqueued).await;
    assert_eq!(handled.new, EVENTS);
    assert_eq!(
        handled.duplicates, EVENTS,
        "every second delivery is skipped"
    );
    assert_eq!(
        DB::count(&pool, "SELECT count(*) FROM effects").await,
        EVENTS as i64
    );
    assert_eq!(
        DB::count(&pool, "SELECT count(DISTINCT event_id) FROM effects").await,
        EVENTS as i64
    );
    assert_eq!(
        DB::count(&pool, "SELECT count(*) FROM orders").await,
        EVENTS as i64
    );
    pool.close().await;
}

/// Enqueues [`EVENTS`] events, [`EVENTS_PER_TRANSACTION`] per transaction, each with its
/// order row; returns their ids.
async fn enqueue<DB: Shop>(pool: &Pool<DB>) -> Vec<String> {
    let outbox = Outbox::new(TopicName::new(TOPIC).unwrap());
    let events: Vec<Event> = (0..EVENTS)
        .map(|n| {
            Event::new("/shop", "OrderPlaced")
                .with_id(format!("order-{n:04}"))
                .with_partition_key(format!("customer-{}", n % KEYS))
                .with_data(serde_json::json!({ "n": n }))
        })
        .collect();
    for chunk in events.chunks(EVENTS_PER_TRANSACTION) {
        let mut tx = pool.begin().await.unwrap();
        for event in chunk {
            DB::insert_order(&mut tx, &event.id).await;
            outbox.enqueue(&mut tx, event).await.unwrap();
        }
        tx.commit().await.unwrap();
    }
    events.into_iter().map(|event| event.id).collect()
}

/// What the consumer's handler did.
struct Handled {
    new: usize,
    duplicates: usize,
}

/// Checks that the topic holds each of `enqueued` once, then consumes it, handing every
/// message to the inbox-guarded handler twice.
async fn consume_twice<DB: Shop>(pool: &Pool<DB>, data: &Path, enqueued: &[String]) -> Handled {
    let stored = topic_ids(data).await;
    assert_eq!(stored.len(), EVENTS, "no event stored twice");
    let expected: BTreeSet<&str> = enqueued.iter().map(String::as_str).collect();
    let stored_set: BTreeSet<&str> = stored.iter().map(String::as_str).collect();
    assert_eq!(stored_set, expected, "the topic holds the enqueued events");

    let options = Options::new(data);
    let log = tokio::task::spawn_blocking(move || Log::open(options))
        .await
        .unwrap()
        .unwrap();
    let broker = Broker::new(log.clone(), BrokerOptions::new());
    let group = GroupName::new(GROUP).unwrap();
    let mut consumer = broker
        .subscribe(&TopicName::new(TOPIC).unwrap(), &group)
        .await
        .unwrap();
    let inbox = Inbox::new(pool.clone());
    let mut handled = Handled {
        new: 0,
        duplicates: 0,
    };
    let mut seen = HashSet::new();
    while seen.len() < EVENTS {
        let message = tokio::time::timeout(LINE_WAIT_MAX, consumer.recv())
            .await
            .expect("the topic delivers every event")
            .expect("the broker runs")
            .unwrap();
        for _ in 0..2 {
            let id = message.event.id.clone();
            let ran = inbox
                .run(&group, &message.event, async move |tx| {
                    DB::insert_effect(tx, &id).await;
                    Ok::<_, Infallible>(())
                })
                .await
                .unwrap();
            match ran {
                Ran::New(()) => handled.new += 1,
                Ran::Duplicate => handled.duplicates += 1,
            }
        }
        consumer.ack(&message).await.unwrap();
        seen.insert(message.event.id.clone());
    }
    consumer.close().await.unwrap();
    broker.shutdown().await;
    log.close().await.unwrap();
    handled
}

/// The ids of the events in the topic's partitions, in log order, read with the log
/// opened here (no relay may run).
async fn topic_ids(data: &Path) -> Vec<String> {
    let options = Options::new(data);
    let log = tokio::task::spawn_blocking(move || Log::open(options))
        .await
        .unwrap()
        .unwrap();
    let prefix = format!("$topic:{TOPIC}:");
    let ids = read_all(&log)
        .await
        .into_iter()
        .filter(|record| record.stream.as_str().starts_with(&prefix))
        .map(|record| record.event.id)
        .collect();
    log.close().await.unwrap();
    ids
}

/// `herald outbox status --json`.
fn outbox_status(url: &str, data: &Path) -> Value {
    let output = success(herald(
        data,
        &["outbox", "status", "--database-url", url, "--json"],
    ));
    serde_json::from_str(&output).unwrap()
}

/// A running `herald debug relay`, its stdout read line by line on a thread.
struct RelayProcess {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl RelayProcess {
    fn start(url: &str, data: &Path, pause: bool) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_herald"));
        command
            .arg("--data-dir")
            .arg(data)
            .args(["debug", "relay", "--database-url", url, "--topic", TOPIC])
            .args(["--lease-ttl-ms", &LEASE_TTL_MS.to_string()]);
        if pause {
            command.arg("--pause-after-publish");
        }
        let mut child = command
            .env_remove("HERALD_DATA_DIR")
            .env_remove("HERALD_DATABASE_URL")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the herald binary starts");
        let lines = read_lines(child.stdout.take().unwrap());
        RelayProcess { child, lines }
    }

    /// The next line, as JSON.
    fn line(&mut self, what: &str) -> Value {
        match self.lines.recv_timeout(LINE_WAIT_MAX) {
            Ok(line) => serde_json::from_str(&line)
                .unwrap_or_else(|error| panic!("{what}: {line:?} is not JSON: {error}")),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = self.child.kill();
                panic!("{what}: silent for {LINE_WAIT_MAX:?}: the relay hangs");
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = self.child.wait().unwrap();
                panic!("{what}: the relay stopped ({status}); its error is above");
            }
        }
    }

    /// Reads the `started` line; the relay's holder id.
    fn started(&mut self, what: &str) -> String {
        let line = self.line(what);
        line["started"]["holder"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: a start line, not {line}"))
            .to_owned()
    }

    /// Sends SIGTERM, reads every line until the relay closes its stdout, and waits.
    fn terminate(mut self, what: &str) -> (ExitStatus, Vec<Value>) {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success(), "kill -TERM failed");
        let mut lines = Vec::new();
        loop {
            match self.lines.recv_timeout(LINE_WAIT_MAX) {
                Ok(line) => lines.push(serde_json::from_str(&line).unwrap()),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let _ = self.child.kill();
                    panic!("{what}: silent for {LINE_WAIT_MAX:?} after SIGTERM");
                }
            }
        }
        (self.child.wait().unwrap(), lines)
    }
}

/// The shop's own statements, written for each backend so the test body stays generic.
trait Shop: Backend {
    async fn connect(url: &str) -> Pool<Self>;
    async fn create_tables(pool: &Pool<Self>);
    async fn insert_order(tx: &mut Transaction<'_, Self>, id: &str);
    async fn insert_effect(tx: &mut Transaction<'static, Self>, event_id: &str);
    async fn count(pool: &Pool<Self>, sql: &'static str) -> i64;
}

macro_rules! shop {
    ($db:ty, $connect:ident) => {
        impl Shop for $db {
            async fn connect(url: &str) -> Pool<Self> {
                $connect(url).await
            }

            async fn create_tables(pool: &Pool<Self>) {
                for sql in [
                    "CREATE TABLE orders (id TEXT PRIMARY KEY)",
                    // No key: an effect that ran twice shows as two rows.
                    "CREATE TABLE effects (event_id TEXT NOT NULL)",
                ] {
                    sqlx::query(sql).execute(pool).await.unwrap();
                }
            }

            async fn insert_order(tx: &mut Transaction<'_, Self>, id: &str) {
                sqlx::query("INSERT INTO orders (id) VALUES ($1)")
                    .bind(id)
                    .execute(&mut **tx)
                    .await
                    .unwrap();
            }

            async fn insert_effect(tx: &mut Transaction<'static, Self>, event_id: &str) {
                sqlx::query("INSERT INTO effects (event_id) VALUES ($1)")
                    .bind(event_id)
                    .execute(&mut **tx)
                    .await
                    .unwrap();
            }

            async fn count(pool: &Pool<Self>, sql: &'static str) -> i64 {
                sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
            }
        }
    };
}

shop!(Sqlite, sqlite_pool);
shop!(Postgres, postgres_pool);

/// A pool on the SQLite database at `url`, with Herald's settings, as the relay opens it.
async fn sqlite_pool(url: &str) -> Pool<Sqlite> {
    let options = sqlx::sqlite::SqliteConnectOptions::from_str(url).unwrap();
    sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(herald_sql::sqlite_configure(options))
        .await
        .unwrap()
}

async fn postgres_pool(url: &str) -> Pool<Postgres> {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(url)
        .await
        .unwrap()
}
