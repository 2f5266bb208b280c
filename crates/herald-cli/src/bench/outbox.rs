//! `herald bench outbox`: the transactional outbox on SQLite and PostgreSQL — enqueueing in
//! the caller's transaction next to a raw `INSERT` of the same rows measured in the same
//! run, the relay's throughput to the embedded broker, and the relay's latency from commit
//! to publish with `LISTEN/NOTIFY`.
//!
//! # What is measured
//!
//! Each backend gets a fresh database: SQLite, a file in the bench directory opened with
//! Herald's settings (write-ahead log, `synchronous = FULL`: every commit is synced);
//! PostgreSQL, a throwaway server from herald-testkit with durable commits (`fsync`,
//! `synchronous_commit`, `full_page_writes` on), in a temporary directory of its own.
//! Where PostgreSQL is not installed its figures are reported as skipped, with the reason.
//!
//! - **enqueue**: `--events` events of `--event-bytes` bytes are written in transactions of
//!   `--batch` events, by `--writers` concurrent transactions on PostgreSQL (one on SQLite,
//!   which has a single writer). `outbox`: [`Outbox::enqueue`] of each event (notifying, as
//!   by default). `raw_insert`, the baseline: the same rows — the same columns and values,
//!   the event serialised as the outbox serialises it — each inserted by one plain `INSERT`
//!   into a table made like `herald_outbox` (same columns, constraints and indexes), in the
//!   same transactions. Both write `--events` events; they alternate in [`ROUNDS`] rounds
//!   so that a shared machine's drift hits both alike. `ratio` = outbox events/s over raw
//!   events/s. Latency is that of one transaction, from `BEGIN` to the end of `COMMIT`.
//! - **relay**: the `--events` rows the outbox scenario left form the backlog; a relay
//!   (the library's defaults, `--relay-batch` rows per batch) publishes them to the
//!   embedded broker on a fresh log in the bench directory (fsync on) and marks them.
//!   Events/s from the relay's start until it has marked the whole backlog, and the CPU
//!   time per event of this process and of the PostgreSQL server (all its processes, from
//!   `/proc`): on a shared machine the CPU cost is the steadier figure.
//! - **latency** (PostgreSQL): a relay runs with `LISTEN/NOTIFY` while one writer commits
//!   single-event transactions at `--rate` events/s for `--duration-secs`. The relay's
//!   publisher wraps the broker and takes, once the broker acknowledged an event, the time
//!   since its transaction committed — the instant the writer's commit call returned: the
//!   commit is durable then, and PostgreSQL notifies listeners at that point too. (Should
//!   the publish come first, which the notification's round trip makes unlikely, the
//!   latency counts as zero.)

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_trait::async_trait;
use comfy_table::Table;
use hdrhistogram::Histogram;
use herald_core::Event;
use herald_core::broker::{self, Published, Publisher, TopicName};
use herald_log::broker::{Broker, BrokerOptions};
use herald_sql::relay::{Handle, Report as RelayReport};
use herald_sql::{Backend, Outbox, OutboxRow, RelayOptions};
use herald_testkit::{PostgresOptions, PostgresServer};
use serde::Serialize;
use sqlx::{Pool, Postgres, Sqlite, Transaction};
use tokio_util::sync::CancellationToken;

use super::pubsub::{cpu_between, process_cpu_seconds};
use super::{
    BenchDir, EventMaker, Goal, Progress, latency_histogram, positive_secs, record, round3,
};
use crate::store::{self, Options};

/// Arguments of `herald bench outbox`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Print a JSON document instead of tables.
    #[arg(long)]
    json: bool,

    /// Events each enqueue scenario writes; the relay then publishes the outbox's.
    #[arg(long, default_value_t = 20_000, value_name = "N")]
    events: u64,

    /// Events per transaction in the enqueue scenarios.
    #[arg(long, default_value_t = 10, value_name = "N")]
    batch: u64,

    /// Concurrent transactions of the enqueue scenarios on PostgreSQL (SQLite: 1).
    #[arg(long, default_value_t = 4, value_name = "N")]
    writers: u64,

    /// How long the latency scenario writes, in seconds.
    #[arg(long, default_value_t = 5.0, value_name = "SECS")]
    duration_secs: f64,

    /// Events per second of the latency scenario, one per transaction.
    #[arg(long, default_value_t = 200.0, value_name = "EVENTS_PER_SEC")]
    rate: f64,

    /// The size of each event's structured JSON, in bytes.
    #[arg(long, default_value_t = 500, value_name = "BYTES")]
    event_bytes: usize,

    /// The most rows one relay batch claims (the relay's `batch_len_max`).
    #[arg(long, default_value_t = RelayOptions::default().batch_len_max, value_name = "N")]
    relay_batch: u32,
}

/// How many rounds the enqueue scenarios alternate in.
pub(crate) const ROUNDS: u64 = 4;

/// The most events `--events` accepts.
const EVENTS_MAX: u64 = 10_000_000;
/// The most events `--batch` accepts.
const BATCH_MAX: u64 = 10_000;
/// The most concurrent transactions `--writers` accepts.
const WRITERS_MAX: u64 = 64;
/// The most events the latency scenario may write (its commit times are kept in memory).
const LATENCY_EVENTS_MAX: f64 = 1_000_000.0;

/// How long a relay may go without publishing before the bench fails.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// The topic every event goes to.
const TOPIC: &str = "bench";

/// The table of the raw-insert baseline.
const RAW_TABLE: &str = "bench_raw_insert";

/// The ratio of outbox to raw-insert enqueue rate this bench is held to.
const TARGET_ENQUEUE_RATIO: f64 = 0.8;
/// The relay rate on PostgreSQL this bench is held to, in events per second.
const TARGET_RELAY_POSTGRES_EVENTS_PER_SEC: f64 = 20_000.0;
/// The p99 commit-to-publish latency on PostgreSQL at light load this bench is held to.
const TARGET_LATENCY_P99_MS: f64 = 20.0;

/// The report of `herald bench outbox --json`.
#[derive(Debug, Serialize)]
struct Report<'a> {
    bench: &'static str,
    /// The bench directory (SQLite's file, the logs).
    dir: String,
    /// Its file system type.
    filesystem: Option<&'a str>,
    /// Where the PostgreSQL server keeps its data (`null` when skipped).
    postgres_dir: Option<String>,
    event_bytes: usize,
    events: u64,
    batch: u64,
    rounds: u64,
    enqueue: Vec<EnqueueRow>,
    relay: Vec<RelayRow>,
    latency: LatencyRow,
    targets: Targets,
}

/// Enqueue figures of one backend.
#[derive(Debug, Serialize)]
struct EnqueueRow {
    backend: &'static str,
    /// Why the backend was not measured.
    skipped: Option<String>,
    writers: Option<u64>,
    /// Events written by each of the two scenarios.
    events: Option<u64>,
    outbox_events_per_sec: Option<f64>,
    raw_insert_events_per_sec: Option<f64>,
    /// `outbox_events_per_sec / raw_insert_events_per_sec`.
    ratio: Option<f64>,
    /// Latency of one transaction, in microseconds.
    outbox_p50_us: Option<u64>,
    outbox_p99_us: Option<u64>,
    raw_insert_p50_us: Option<u64>,
    raw_insert_p99_us: Option<u64>,
}

/// Relay figures of one backend.
#[derive(Debug, Serialize)]
struct RelayRow {
    backend: &'static str,
    skipped: Option<String>,
    /// Rows in the backlog, all published.
    events: Option<u64>,
    seconds: Option<f64>,
    events_per_sec: Option<f64>,
    /// Batches that claimed rows.
    batches: Option<u64>,
    batch_len_max: u32,
    /// This process's CPU time (user + system) per event: the relay, the broker, the log,
    /// and on SQLite the database too.
    cpu_us_per_event: Option<f64>,
    /// The PostgreSQL server's CPU time per event, all its processes (`null` on SQLite).
    server_cpu_us_per_event: Option<f64>,
}

/// Commit-to-publish latency on PostgreSQL.
#[derive(Debug, Serialize)]
struct LatencyRow {
    backend: &'static str,
    skipped: Option<String>,
    /// The writer's target rate, events per second.
    rate: f64,
    /// The rate it reached.
    events_per_sec: Option<f64>,
    events: Option<u64>,
    p50_us: Option<u64>,
    p99_us: Option<u64>,
    max_us: Option<u64>,
}

/// The targets and whether this run met them (`null`: not measured).
#[derive(Debug, Serialize)]
struct Targets {
    enqueue_ratio: f64,
    enqueue_ratio_met_sqlite: Option<bool>,
    enqueue_ratio_met_postgres: Option<bool>,
    relay_postgres_events_per_sec: f64,
    relay_postgres_met: Option<bool>,
    latency_p99_ms: f64,
    latency_p99_met: Option<bool>,
}

/// What every scenario shares.
struct Settings {
    events: u64,
    batch: u64,
    writers: u64,
    duration: Duration,
    rate: f64,
    relay_batch: u32,
    maker: EventMaker,
    topic: TopicName,
}

/// Runs `herald bench outbox` in `dir`.
pub(crate) async fn run(args: Args, dir: &BenchDir) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=EVENTS_MAX).contains(&args.events),
        "--events must be between 1 and {EVENTS_MAX}"
    );
    anyhow::ensure!(
        (1..=BATCH_MAX).contains(&args.batch),
        "--batch must be between 1 and {BATCH_MAX}"
    );
    anyhow::ensure!(
        (1..=WRITERS_MAX).contains(&args.writers),
        "--writers must be between 1 and {WRITERS_MAX}"
    );
    anyhow::ensure!(args.relay_batch > 0, "--relay-batch must be at least 1");
    let duration = positive_secs("--duration-secs", args.duration_secs)?;
    anyhow::ensure!(
        args.rate.is_finite() && args.rate > 0.0,
        "--rate must be a positive number of events per second"
    );
    anyhow::ensure!(
        args.rate * duration.as_secs_f64() <= LATENCY_EVENTS_MAX,
        "--rate × --duration-secs must stay below {LATENCY_EVENTS_MAX} events"
    );
    let maker = EventMaker::new(args.event_bytes);
    let event_bytes = maker.event(0).to_json().len();
    let settings = Settings {
        events: args.events,
        batch: args.batch,
        writers: args.writers,
        duration,
        rate: args.rate,
        relay_batch: args.relay_batch,
        maker,
        topic: TopicName::new(TOPIC)?,
    };

    let (sqlite_enqueue, sqlite_relay) = measure_sqlite(dir, &settings)
        .await
        .context("the SQLite scenarios failed")?;
    let (postgres, postgres_dir) = match start_postgres().await? {
        Err(reason) => {
            eprintln!("postgres: skipped: {reason}");
            (Measured::skipped("postgres", &reason, settings.rate), None)
        }
        Ok(server) => {
            let postgres_dir = server.data_dir().display().to_string();
            let measured = measure_postgres(&server, dir, &settings).await;
            // Stopping the server waits for it: off the executor.
            tokio::task::spawn_blocking(move || drop(server))
                .await
                .context("stopping PostgreSQL failed")?;
            (
                measured.context("the PostgreSQL scenarios failed")?,
                Some(postgres_dir),
            )
        }
    };

    let targets = Targets {
        enqueue_ratio: TARGET_ENQUEUE_RATIO,
        enqueue_ratio_met_sqlite: sqlite_enqueue.ratio.map(|r| r >= TARGET_ENQUEUE_RATIO),
        enqueue_ratio_met_postgres: postgres.enqueue.ratio.map(|r| r >= TARGET_ENQUEUE_RATIO),
        relay_postgres_events_per_sec: TARGET_RELAY_POSTGRES_EVENTS_PER_SEC,
        relay_postgres_met: postgres
            .relay
            .events_per_sec
            .map(|rate| rate >= TARGET_RELAY_POSTGRES_EVENTS_PER_SEC),
        latency_p99_ms: TARGET_LATENCY_P99_MS,
        latency_p99_met: postgres
            .latency
            .p99_us
            .map(|p99| p99 as f64 / 1_000.0 <= TARGET_LATENCY_P99_MS),
    };
    let report = Report {
        bench: "outbox",
        dir: dir.path().display().to_string(),
        filesystem: dir.filesystem(),
        postgres_dir,
        event_bytes,
        events: settings.events,
        batch: settings.batch,
        rounds: ROUNDS,
        enqueue: vec![sqlite_enqueue, postgres.enqueue],
        relay: vec![sqlite_relay, postgres.relay],
        latency: postgres.latency,
        targets,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_tables(&report);
    }
    Ok(())
}

/// The figures of one backend.
struct Measured {
    enqueue: EnqueueRow,
    relay: RelayRow,
    latency: LatencyRow,
}

impl Measured {
    fn skipped(backend: &'static str, reason: &str, rate: f64) -> Measured {
        Measured {
            enqueue: EnqueueRow {
                backend,
                skipped: Some(reason.to_owned()),
                writers: None,
                events: None,
                outbox_events_per_sec: None,
                raw_insert_events_per_sec: None,
                ratio: None,
                outbox_p50_us: None,
                outbox_p99_us: None,
                raw_insert_p50_us: None,
                raw_insert_p99_us: None,
            },
            relay: RelayRow {
                backend,
                skipped: Some(reason.to_owned()),
                events: None,
                seconds: None,
                events_per_sec: None,
                batches: None,
                batch_len_max: RelayOptions::default().batch_len_max,
                cpu_us_per_event: None,
                server_cpu_us_per_event: None,
            },
            latency: LatencyRow {
                backend,
                skipped: Some(reason.to_owned()),
                rate,
                events_per_sec: None,
                events: None,
                p50_us: None,
                p99_us: None,
                max_us: None,
            },
        }
    }
}

/// The SQLite scenarios, on a file in the bench directory. No latency scenario: SQLite has
/// no notifications, its relay polls (or is woken by an enqueuer in its own process).
async fn measure_sqlite(
    dir: &BenchDir,
    settings: &Settings,
) -> anyhow::Result<(EnqueueRow, RelayRow)> {
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(herald_sql::sqlite_connect_options(
            dir.path().join("outbox.db"),
        ))
        .await
        .context("cannot open the SQLite database")?;
    herald_sql::migrate(&pool).await?;
    let enqueue = enqueue(&pool, settings, 1).await?;
    let relay = relay(&pool, dir, settings, None).await?;
    pool.close().await;
    Ok((enqueue, relay))
}

/// Starts the throwaway PostgreSQL server, or says why there is none.
async fn start_postgres() -> anyhow::Result<Result<PostgresServer, String>> {
    eprintln!("postgres: starting a throwaway server (durable commits)");
    let started = tokio::task::spawn_blocking(|| PostgresOptions::new().durable(true).start())
        .await
        .context("the task starting PostgreSQL failed")?;
    match started {
        Ok(server) => Ok(Ok(server)),
        Err(error @ herald_testkit::Error::NotInstalled) => Ok(Err(error.to_string())),
        Err(error) => Err(error).context("PostgreSQL is installed but did not start"),
    }
}

/// The PostgreSQL scenarios, on a fresh database of `server`.
async fn measure_postgres(
    server: &PostgresServer,
    dir: &BenchDir,
    settings: &Settings,
) -> anyhow::Result<Measured> {
    let url = server.create_database("herald_bench").await?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        // The writers, a relay's batch and listening connections, its lease upkeep.
        .max_connections(settings.writers as u32 + 4)
        .connect(&url)
        .await
        .context("cannot connect to PostgreSQL")?;
    herald_sql::migrate(&pool).await?;
    let enqueue = enqueue(&pool, settings, settings.writers).await?;
    let relay = relay(&pool, dir, settings, server.postmaster_pid().ok()).await?;
    let latency = latency(&pool, dir, settings).await?;
    pool.close().await;
    Ok(Measured {
        enqueue,
        relay,
        latency,
    })
}

/// What one enqueue scenario writes with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// [`Outbox::enqueue`].
    Outbox,
    /// A plain `INSERT` of the same row into [`RAW_TABLE`].
    RawInsert,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Outbox => "outbox",
            Mode::RawInsert => "raw_insert",
        }
    }
}

/// What one enqueue scenario measured, over its rounds.
struct Written {
    events: u64,
    seconds: f64,
    latencies: Histogram<u64>,
}

impl Written {
    fn new() -> Written {
        Written {
            events: 0,
            seconds: 0.0,
            latencies: latency_histogram(),
        }
    }

    fn events_per_sec(&self) -> f64 {
        self.events as f64 / self.seconds.max(1e-9)
    }
}

/// The two enqueue scenarios on `pool`, alternating in [`ROUNDS`] rounds.
async fn enqueue<DB: BenchSql>(
    pool: &Pool<DB>,
    settings: &Settings,
    writers: u64,
) -> anyhow::Result<EnqueueRow> {
    DB::create_raw_table(pool)
        .await
        .context("cannot create the raw-insert table")?;
    let phase = format!("enqueue {}", DB::BACKEND);
    let done = Arc::new(AtomicU64::new(0));
    let progress = Progress::start(&phase, Goal::Events(2 * settings.events), done.clone());
    let mut outbox = Written::new();
    let mut raw = Written::new();
    for round in 0..ROUNDS {
        let events = settings.events / ROUNDS + u64::from(round < settings.events % ROUNDS);
        // Each goes first every other round.
        let order = if round % 2 == 0 {
            [Mode::RawInsert, Mode::Outbox]
        } else {
            [Mode::Outbox, Mode::RawInsert]
        };
        for mode in order {
            let written = match mode {
                Mode::Outbox => &mut outbox,
                Mode::RawInsert => &mut raw,
            };
            write(pool, mode, events, writers, settings, &done, written)
                .await
                .with_context(|| format!("{phase}: {} failed", mode.name()))?;
        }
    }
    progress.finish();
    let ratio = outbox.events_per_sec() / raw.events_per_sec().max(1e-9);
    eprintln!(
        "{phase}: outbox {:.0} events/s, raw insert {:.0} events/s, ratio {ratio:.2}",
        outbox.events_per_sec(),
        raw.events_per_sec()
    );
    Ok(EnqueueRow {
        backend: DB::BACKEND,
        skipped: None,
        writers: Some(writers),
        events: Some(outbox.events),
        outbox_events_per_sec: Some(round3(outbox.events_per_sec())),
        raw_insert_events_per_sec: Some(round3(raw.events_per_sec())),
        ratio: Some(round3(ratio)),
        outbox_p50_us: Some(outbox.latencies.value_at_quantile(0.5)),
        outbox_p99_us: Some(outbox.latencies.value_at_quantile(0.99)),
        raw_insert_p50_us: Some(raw.latencies.value_at_quantile(0.5)),
        raw_insert_p99_us: Some(raw.latencies.value_at_quantile(0.99)),
    })
}

/// Writes `events` events with `mode` from `writers` concurrent writers, adding to
/// `written`.
async fn write<DB: BenchSql>(
    pool: &Pool<DB>,
    mode: Mode,
    events: u64,
    writers: u64,
    settings: &Settings,
    done: &AtomicU64,
    written: &mut Written,
) -> anyhow::Result<()> {
    let outbox = Outbox::new(settings.topic.clone());
    let started = Instant::now();
    // The writers share one task: they wait on the database, not on the CPU.
    let results = futures::future::join_all((0..writers).map(|writer| {
        let share = events / writers + u64::from(writer < events % writers);
        let outbox = &outbox;
        async move {
            let mut latencies = latency_histogram();
            let mut written = 0;
            while written < share {
                let len = settings.batch.min(share - written);
                let batch: Vec<Event> = (written..written + len)
                    .map(|seq| settings.maker.event(seq))
                    .collect();
                let began = Instant::now();
                let mut tx = pool.begin().await?;
                for event in &batch {
                    match mode {
                        Mode::Outbox => {
                            outbox.enqueue(&mut tx, event).await?;
                        }
                        Mode::RawInsert => {
                            DB::raw_insert(&mut tx, &OutboxRow::of(&settings.topic, event)).await?;
                        }
                    }
                }
                tx.commit().await?;
                record(&mut latencies, began.elapsed());
                written += len;
                done.fetch_add(len, Ordering::Relaxed);
            }
            anyhow::Ok(latencies)
        }
    }))
    .await;
    written.seconds += started.elapsed().as_secs_f64();
    written.events += events;
    for latencies in results {
        written
            .latencies
            .add(&latencies?)
            .context("cannot merge latency histograms")?;
    }
    Ok(())
}

/// The relay scenario: publishes the backlog of `pool` to a fresh embedded broker. The
/// CPU time of the database server is read when `postmaster` gives its process.
async fn relay<DB: BenchSql>(
    pool: &Pool<DB>,
    dir: &BenchDir,
    settings: &Settings,
    postmaster: Option<u32>,
) -> anyhow::Result<RelayRow> {
    let backlog = herald_sql::status(pool).await?.backlog;
    let phase = format!("relay {}", DB::BACKEND);
    let log = store::open(Options::new(dir.log_dir(&format!("relay-{}", DB::BACKEND)))).await?;
    let cpu_start = process_cpu_seconds();
    let server_cpu_start = postmaster.and_then(server_cpu_seconds);
    let (seconds, report) = store::closing(&log, async {
        let broker = Broker::new(log.clone(), BrokerOptions::new());
        let result = async {
            broker
                .create_topic(&settings.topic, BrokerOptions::new().partitions_default)
                .await?;
            let options = RelayOptions {
                batch_len_max: settings.relay_batch,
                ..RelayOptions::default()
            };
            let done = Arc::new(AtomicU64::new(0));
            let progress = Progress::start(&phase, Goal::Events(backlog), done.clone());
            let started = Instant::now();
            let measured = with_relay(
                pool.clone(),
                Arc::new(broker.clone()),
                options,
                async |handle| {
                    wait_published(&handle, backlog, &done).await?;
                    Ok(started.elapsed().as_secs_f64())
                },
            )
            .await;
            progress.finish();
            measured
        }
        .await;
        broker.shutdown().await;
        result
    })
    .await?;
    let per_event = |cpu: Option<f64>| cpu.map(|cpu| round3(cpu * 1e6 / backlog.max(1) as f64));
    let cpu_us_per_event = per_event(cpu_between(cpu_start, process_cpu_seconds()));
    let server_cpu_us_per_event = per_event(cpu_between(
        server_cpu_start,
        postmaster.and_then(server_cpu_seconds),
    ));
    let events_per_sec = backlog as f64 / seconds.max(1e-9);
    eprintln!(
        "{phase}: {backlog} events in {seconds:.2} s, {events_per_sec:.0} events/s, {} batches, \
         CPU {cpu_us_per_event:?} µs/event here, {server_cpu_us_per_event:?} in the server",
        report.batches
    );
    Ok(RelayRow {
        backend: DB::BACKEND,
        skipped: None,
        events: Some(backlog),
        seconds: Some(round3(seconds)),
        events_per_sec: Some(round3(events_per_sec)),
        batches: Some(report.batches),
        batch_len_max: settings.relay_batch,
        cpu_us_per_event,
        server_cpu_us_per_event,
    })
}

/// The latency scenario on PostgreSQL.
async fn latency(
    pool: &Pool<Postgres>,
    dir: &BenchDir,
    settings: &Settings,
) -> anyhow::Result<LatencyRow> {
    let phase = "latency postgres";
    let log = store::open(Options::new(dir.log_dir("latency-postgres"))).await?;
    let broker = Broker::new(log.clone(), BrokerOptions::new());
    let stamping = Arc::new(Stamping {
        inner: broker.clone(),
        seen: Mutex::new(HashMap::new()),
        latencies: Mutex::new(latency_histogram()),
    });
    let (events, seconds) = store::closing(&log, async {
        let result = async {
            broker
                .create_topic(&settings.topic, BrokerOptions::new().partitions_default)
                .await?;
            let done = Arc::new(AtomicU64::new(0));
            let progress = Progress::start(phase, Goal::Duration(settings.duration), done.clone());
            let measured = with_relay(
                pool.clone(),
                stamping.clone(),
                RelayOptions::default(),
                async |handle| {
                    let (events, seconds) = write_paced(pool, settings, &stamping, &done).await?;
                    wait_published(&handle, events, &AtomicU64::new(0)).await?;
                    Ok((events, seconds))
                },
            )
            .await;
            progress.finish();
            Ok(measured?.0)
        }
        .await;
        broker.shutdown().await;
        result
    })
    .await?;
    let unmatched = stamping
        .seen
        .lock()
        .expect("no thread panics holding the stamps")
        .len();
    anyhow::ensure!(
        unmatched == 0,
        "{unmatched} events were committed and not published, or published and not committed"
    );
    let latencies = stamping
        .latencies
        .lock()
        .expect("no thread panics holding the histogram")
        .clone();
    eprintln!(
        "{phase}: {events} events, commit to publish p50 {} µs, p99 {} µs",
        latencies.value_at_quantile(0.5),
        latencies.value_at_quantile(0.99)
    );
    Ok(LatencyRow {
        backend: "postgres",
        skipped: None,
        rate: settings.rate,
        events_per_sec: Some(round3(events as f64 / seconds.max(1e-9))),
        events: Some(events),
        p50_us: Some(latencies.value_at_quantile(0.5)),
        p99_us: Some(latencies.value_at_quantile(0.99)),
        max_us: Some(latencies.max()),
    })
}

/// Commits one event per transaction at `settings.rate` for `settings.duration`, stamping
/// each once its commit returned; the events written and the seconds taken.
async fn write_paced(
    pool: &Pool<Postgres>,
    settings: &Settings,
    stamping: &Stamping,
    done: &AtomicU64,
) -> anyhow::Result<(u64, f64)> {
    let outbox = Outbox::new(settings.topic.clone());
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / settings.rate));
    let started = Instant::now();
    let mut events = 0;
    while started.elapsed() < settings.duration {
        ticker.tick().await;
        let event = settings.maker.event(events);
        let mut tx = pool.begin().await?;
        outbox.enqueue(&mut tx, &event).await?;
        tx.commit().await?;
        stamping.stamp(event.id, Stamp::Committed(Instant::now()));
        events += 1;
        done.fetch_add(1, Ordering::Relaxed);
    }
    Ok((events, started.elapsed().as_secs_f64()))
}

/// The CPU time (user + system) of the PostgreSQL server whose postmaster is `postmaster`:
/// its own and its child processes' (backends, writers, autovacuum), from `/proc`, in
/// seconds; `None` where `/proc` cannot tell. Backends that exited meanwhile are not
/// counted: the relay's connections live through the scenario.
fn server_cpu_seconds(postmaster: u32) -> Option<f64> {
    /// Linux reports CPU times in `USER_HZ` ticks, 100 per second on every architecture.
    const TICKS_PER_SEC: f64 = 100.0;
    let mut ticks = 0;
    for entry in std::fs::read_dir("/proc").ok()? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            // Exited since the listing.
            continue;
        };
        // After the command name's `)`: state, ppid, …; utime and stime are fields 14, 15.
        let Some(fields) = stat.get(stat.rfind(')')? + 1..) else {
            continue;
        };
        let fields: Vec<&str> = fields.split_whitespace().collect();
        let ppid: u32 = fields.get(1)?.parse().ok()?;
        if pid != postmaster && ppid != postmaster {
            continue;
        }
        let utime: u64 = fields.get(11)?.parse().ok()?;
        let stime: u64 = fields.get(12)?.parse().ok()?;
        ticks += utime + stime;
    }
    Some(ticks as f64 / TICKS_PER_SEC)
}

/// Runs a relay on `pool` while `work` runs with its handle; stops it when `work` is done.
async fn with_relay<DB: Backend, T>(
    pool: Pool<DB>,
    publisher: Arc<dyn Publisher>,
    options: RelayOptions,
    work: impl AsyncFnOnce(Handle) -> anyhow::Result<T>,
) -> anyhow::Result<(T, RelayReport)> {
    let relay = options.build(pool, publisher)?;
    let handle = relay.handle();
    let shutdown = CancellationToken::new();
    let running = relay.run(shutdown.clone());
    tokio::pin!(running);
    let output = tokio::select! {
        stopped = &mut running => {
            stopped.context("the relay failed")?;
            anyhow::bail!("the relay stopped by itself");
        }
        output = work(handle) => output,
    };
    shutdown.cancel();
    let report = running.await.context("the relay failed")?;
    Ok((output?, report))
}

/// Waits until the relay of `handle` has published `total` rows, mirroring its count in
/// `done`; fails if it stalls for [`STALL_TIMEOUT`].
async fn wait_published(handle: &Handle, total: u64, done: &AtomicU64) -> anyhow::Result<()> {
    loop {
        let last = done.load(Ordering::Relaxed);
        if last >= total {
            return Ok(());
        }
        let progress = tokio::time::timeout(
            STALL_TIMEOUT,
            handle.wait_for(|progress| progress.published > last),
        )
        .await
        .with_context(|| {
            format!(
                "the relay published nothing for {} s ({last} of {total} rows)",
                STALL_TIMEOUT.as_secs()
            )
        })?;
        done.store(progress.published, Ordering::Relaxed);
    }
}

/// A publisher that records, for each event the broker acknowledged, the time since its
/// transaction committed.
struct Stamping {
    inner: Broker,
    /// The first of the two instants of each event, by event id, until the other comes.
    seen: Mutex<HashMap<String, Stamp>>,
    latencies: Mutex<Histogram<u64>>,
}

/// One of the two instants of an event.
enum Stamp {
    /// Its transaction's commit returned.
    Committed(Instant),
    /// The broker acknowledged it.
    Published(Instant),
}

impl Stamping {
    /// Records `stamp` for event `id`; the second of its two instants records the latency.
    fn stamp(&self, id: String, stamp: Stamp) {
        let mut seen = self
            .seen
            .lock()
            .expect("no thread panics holding the stamps");
        let latency = match (seen.remove(&id), &stamp) {
            (Some(Stamp::Committed(at)), Stamp::Published(now)) => now.duration_since(at),
            // Published before the commit call returned: no time at all after the commit.
            (Some(Stamp::Published(_)), Stamp::Committed(_)) => Duration::ZERO,
            (None, _) => {
                seen.insert(id, stamp);
                return;
            }
            (Some(_), _) => unreachable!("an event is committed once and published once"),
        };
        drop(seen);
        record(
            &mut self
                .latencies
                .lock()
                .expect("no thread panics holding the histogram"),
            latency,
        );
    }
}

#[async_trait]
impl Publisher for Stamping {
    async fn publish(
        &self,
        topic: &TopicName,
        events: Vec<Event>,
    ) -> Result<Vec<Published>, broker::Error> {
        let ids: Vec<String> = events.iter().map(|event| event.id.clone()).collect();
        let published = self.inner.publish(topic, events).await?;
        let now = Instant::now();
        for id in ids {
            self.stamp(id, Stamp::Published(now));
        }
        Ok(published)
    }

    async fn close(&self) -> Result<(), broker::Error> {
        self.inner.close().await
    }
}

/// The baseline's statements, written for each backend.
trait BenchSql: Backend {
    /// `sqlite` or `postgres`.
    const BACKEND: &'static str;

    /// Creates [`RAW_TABLE`] like `herald_outbox`: its columns, constraints and indexes.
    fn create_raw_table(pool: &Pool<Self>) -> impl Future<Output = sqlx::Result<()>>;

    /// Inserts `row` into [`RAW_TABLE`] in `tx`, with one plain `INSERT`.
    fn raw_insert(
        tx: &mut Transaction<'_, Self>,
        row: &OutboxRow<'_>,
    ) -> impl Future<Output = sqlx::Result<()>>;
}

impl BenchSql for Sqlite {
    const BACKEND: &'static str = "sqlite";

    async fn create_raw_table(pool: &Pool<Self>) -> sqlx::Result<()> {
        // The migration's own statements for the table and its indexes, renamed.
        let statements: Vec<String> = sqlx::query_scalar(
            "SELECT sql FROM sqlite_master
             WHERE tbl_name = 'herald_outbox' AND sql IS NOT NULL
             ORDER BY type = 'table' DESC",
        )
        .fetch_all(pool)
        .await?;
        for statement in statements {
            sqlx::query(&statement.replace("herald_outbox", RAW_TABLE))
                .execute(pool)
                .await?;
        }
        Ok(())
    }

    async fn raw_insert(tx: &mut Transaction<'_, Self>, row: &OutboxRow<'_>) -> sqlx::Result<()> {
        sqlx::query(
            "INSERT INTO bench_raw_insert (id, aggregatetype, aggregateid, type, payload,
                                           payload_kind, headers, topic, partition, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )
        .bind(row.id)
        .bind(row.aggregatetype)
        .bind(row.aggregateid)
        .bind(row.ty)
        .bind(row.payload)
        .bind(row.payload_kind)
        .bind(&row.headers)
        .bind(row.topic)
        .bind(row.partition)
        .bind(chrono::Utc::now().timestamp_millis())
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}

impl BenchSql for Postgres {
    const BACKEND: &'static str = "postgres";

    async fn create_raw_table(pool: &Pool<Self>) -> sqlx::Result<()> {
        sqlx::query("CREATE TABLE bench_raw_insert (LIKE herald_outbox INCLUDING ALL)")
            .execute(pool)
            .await?;
        Ok(())
    }

    async fn raw_insert(tx: &mut Transaction<'_, Self>, row: &OutboxRow<'_>) -> sqlx::Result<()> {
        sqlx::query(
            "INSERT INTO bench_raw_insert (id, aggregatetype, aggregateid, type, payload,
                                           payload_kind, headers, topic, partition)
             VALUES ($1, $2, $3, $4, $5, $6, $7::json, $8, $9)",
        )
        .bind(row.id)
        .bind(row.aggregatetype)
        .bind(row.aggregateid)
        .bind(row.ty)
        .bind(row.payload)
        .bind(row.payload_kind)
        .bind(&row.headers)
        .bind(row.topic)
        .bind(row.partition)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}

/// The report as tables.
fn print_tables(report: &Report<'_>) {
    let figure = |value: Option<f64>| value.map_or_else(|| "-".to_owned(), |v| format!("{v:.0}"));
    let micros = |value: Option<u64>| value.map_or_else(|| "-".to_owned(), |v| v.to_string());
    let mut enqueue = Table::new();
    enqueue.set_header([
        "enqueue",
        "writers",
        "outbox events/s",
        "raw insert events/s",
        "ratio",
        "outbox p50/p99 µs",
        "raw p50/p99 µs",
    ]);
    for row in &report.enqueue {
        match &row.skipped {
            Some(_) => enqueue.add_row([row.backend, "skipped"]),
            None => enqueue.add_row([
                row.backend.to_owned(),
                micros(row.writers),
                figure(row.outbox_events_per_sec),
                figure(row.raw_insert_events_per_sec),
                row.ratio
                    .map_or_else(|| "-".to_owned(), |r| format!("{r:.2}")),
                format!(
                    "{}/{}",
                    micros(row.outbox_p50_us),
                    micros(row.outbox_p99_us)
                ),
                format!(
                    "{}/{}",
                    micros(row.raw_insert_p50_us),
                    micros(row.raw_insert_p99_us)
                ),
            ]),
        };
    }
    println!("{enqueue}");
    let mut relay = Table::new();
    relay.set_header([
        "relay",
        "events",
        "seconds",
        "events/s",
        "batches",
        "CPU µs/event",
        "server CPU µs/event",
    ]);
    for row in &report.relay {
        match &row.skipped {
            Some(_) => relay.add_row([row.backend, "skipped"]),
            None => relay.add_row([
                row.backend.to_owned(),
                micros(row.events),
                row.seconds
                    .map_or_else(|| "-".to_owned(), |s| format!("{s:.2}")),
                figure(row.events_per_sec),
                micros(row.batches),
                row.cpu_us_per_event
                    .map_or_else(|| "-".to_owned(), |cpu| format!("{cpu:.1}")),
                row.server_cpu_us_per_event
                    .map_or_else(|| "-".to_owned(), |cpu| format!("{cpu:.1}")),
            ]),
        };
    }
    println!("{relay}");
    let latency = &report.latency;
    match &latency.skipped {
        Some(reason) => println!("latency: skipped: {reason}"),
        None => println!(
            "latency (postgres, {:.0} events/s): commit to publish p50 {} µs, p99 {} µs, max {} µs",
            latency.rate,
            micros(latency.p50_us),
            micros(latency.p99_us),
            micros(latency.max_us)
        ),
    }
    let targets = &report.targets;
    let met = |met: Option<bool>| match met {
        Some(true) => "met",
        Some(false) => "missed",
        None => "not measured",
    };
    println!(
        "targets: enqueue ratio ≥ {} (sqlite {}, postgres {}); relay on postgres ≥ {} \
         events/s ({}); latency p99 ≤ {} ms ({})",
        targets.enqueue_ratio,
        met(targets.enqueue_ratio_met_sqlite),
        met(targets.enqueue_ratio_met_postgres),
        targets.relay_postgres_events_per_sec,
        met(targets.relay_postgres_met),
        targets.latency_p99_ms,
        met(targets.latency_p99_met)
    );
}
