//! `herald bench append`: append throughput and latency with fsync on.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::ValueEnum;
use comfy_table::Table;
use hdrhistogram::Histogram;
use herald_core::{Event, EventStore as _, ExpectedVersion, StreamName};
use serde::Serialize;

use super::baseline::{self, WriteBaseline};
use super::{
    BenchDir, EventMaker, Goal, Progress, latency_histogram, positive_secs, record, round3,
};
use crate::store::{self, Log, Options};

/// Arguments of `herald bench append`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Print a JSON document instead of a table.
    #[arg(long)]
    json: bool,

    /// How long each scenario runs, in seconds (unless --events is given).
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    duration_secs: f64,

    /// Run each scenario for exactly this many events instead of --duration-secs.
    #[arg(long, value_name = "N")]
    events: Option<u64>,

    /// How long each baseline measurement runs before each scenario, in seconds.
    #[arg(long, default_value_t = 2.0, value_name = "SECS")]
    baseline_secs: f64,

    /// The scenarios to run, comma-separated [default: all]
    #[arg(long, value_enum, value_delimiter = ',', value_name = "SCENARIO")]
    scenarios: Vec<Scenario>,

    /// The size of each event's structured JSON, in bytes.
    #[arg(long, default_value_t = 500, value_name = "BYTES")]
    event_bytes: usize,
}

/// An append workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Scenario {
    /// One task, one event per append.
    #[value(name = "single_writer")]
    SingleWriter,
    /// 64 tasks, one event per append, each to its own stream.
    #[value(name = "writers_64")]
    Writers64,
    /// One task, 100 events per append.
    #[value(name = "batch_100")]
    Batch100,
}

impl Scenario {
    /// Every scenario, in the order they run.
    const ALL: [Scenario; 3] = [
        Scenario::SingleWriter,
        Scenario::Writers64,
        Scenario::Batch100,
    ];

    /// The scenario's name in reports and on the command line.
    fn name(self) -> &'static str {
        match self {
            Scenario::SingleWriter => "single_writer",
            Scenario::Writers64 => "writers_64",
            Scenario::Batch100 => "batch_100",
        }
    }

    /// How many tasks append concurrently.
    fn writers(self) -> u64 {
        match self {
            Scenario::SingleWriter | Scenario::Batch100 => 1,
            Scenario::Writers64 => 64,
        }
    }

    /// How many events one append carries.
    fn batch_size(self) -> u64 {
        match self {
            Scenario::SingleWriter | Scenario::Writers64 => 1,
            Scenario::Batch100 => 100,
        }
    }
}

/// When a scenario stops.
#[derive(Debug, Clone, Copy)]
enum Limit {
    /// After this many events in all.
    Events(u64),
    /// After this long.
    Duration(Duration),
}

/// The report of `herald bench append --json`.
#[derive(Debug, Serialize)]
struct Report<'a> {
    bench: &'static str,
    /// The directory measured.
    dir: String,
    /// Its file system type.
    filesystem: Option<&'a str>,
    /// The log's durability setting.
    durability: &'static str,
    /// The size of each event's structured JSON.
    event_bytes: usize,
    scenarios: Vec<Row>,
}

/// The figures of one scenario. Latencies are those of one append call (a batch of 100 in
/// `batch_100`); the baselines were measured just before the scenario.
#[derive(Debug, Serialize)]
struct Row {
    scenario: &'static str,
    writers: u64,
    batch_size: u64,
    events: u64,
    appends: u64,
    seconds: f64,
    events_per_sec: f64,
    /// The events' structured JSON appended per second.
    bytes_per_sec: f64,
    p50_us: u64,
    p99_us: u64,
    p999_us: u64,
    baseline_fsync_per_sec: f64,
    baseline_fsync_p50_us: u64,
    baseline_mb_per_sec: f64,
    /// `events_per_sec` over `single_writer`'s (when it ran).
    ratio_to_single_writer: Option<f64>,
    /// `events_per_sec` over `baseline_fsync_per_sec`: above 1, appends share syncs.
    ratio_to_baseline_fsync: f64,
    /// `bytes_per_sec` over the sequential write baseline's.
    ratio_of_baseline_bandwidth: f64,
    /// `p99_us` over `baseline_fsync_p50_us`.
    p99_over_baseline_fsync_p50: f64,
}

/// What one scenario measured.
struct Measured {
    events: u64,
    appends: u64,
    seconds: f64,
    latencies: Histogram<u64>,
}

/// Runs `herald bench append` in `dir`.
pub(crate) async fn run(args: Args, dir: &BenchDir) -> anyhow::Result<()> {
    let limit = match args.events {
        Some(0) => anyhow::bail!("--events must be at least 1"),
        Some(events) => Limit::Events(events),
        None => Limit::Duration(positive_secs("--duration-secs", args.duration_secs)?),
    };
    let baseline_duration = positive_secs("--baseline-secs", args.baseline_secs)?;
    let scenarios = if args.scenarios.is_empty() {
        Scenario::ALL.to_vec()
    } else {
        args.scenarios.clone()
    };
    let maker = EventMaker::new(args.event_bytes);
    let event_bytes = maker.event(0).to_json().len();

    let mut results = Vec::new();
    for scenario in scenarios {
        eprintln!("{}: measuring the raw-disk baselines", scenario.name());
        let path = dir.path().to_path_buf();
        let baseline =
            tokio::task::spawn_blocking(move || baseline::measure_writes(&path, baseline_duration))
                .await
                .context("the baseline task failed")?
                .context("cannot measure the raw-disk baselines")?;
        let measured = run_scenario(scenario, dir, limit, &maker).await?;
        eprintln!(
            "{}: {} events in {:.1} s, {:.0} events/s",
            scenario.name(),
            measured.events,
            measured.seconds,
            measured.events as f64 / measured.seconds
        );
        results.push((scenario, measured, baseline));
    }

    let single_writer_rate = results
        .iter()
        .find(|(scenario, ..)| *scenario == Scenario::SingleWriter)
        .map(|(_, measured, _)| measured.events as f64 / measured.seconds);
    let rows: Vec<Row> = results
        .iter()
        .map(|(scenario, measured, baseline)| {
            row(
                *scenario,
                measured,
                baseline,
                event_bytes,
                single_writer_rate,
            )
        })
        .collect();
    if args.json {
        let report = Report {
            bench: "append",
            dir: dir.path().display().to_string(),
            filesystem: dir.filesystem(),
            durability: "fsync",
            event_bytes,
            scenarios: rows,
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{}", table(&rows));
    }
    Ok(())
}

/// The report row of one scenario, with its ratios.
fn row(
    scenario: Scenario,
    measured: &Measured,
    baseline: &WriteBaseline,
    event_bytes: usize,
    single_writer_rate: Option<f64>,
) -> Row {
    let events_per_sec = measured.events as f64 / measured.seconds;
    let bytes_per_sec = events_per_sec * event_bytes as f64;
    let p99_us = measured.latencies.value_at_quantile(0.99);
    Row {
        scenario: scenario.name(),
        writers: scenario.writers(),
        batch_size: scenario.batch_size(),
        events: measured.events,
        appends: measured.appends,
        seconds: round3(measured.seconds),
        events_per_sec: round3(events_per_sec),
        bytes_per_sec: round3(bytes_per_sec),
        p50_us: measured.latencies.value_at_quantile(0.5),
        p99_us,
        p999_us: measured.latencies.value_at_quantile(0.999),
        baseline_fsync_per_sec: round3(baseline.fsync_per_sec),
        baseline_fsync_p50_us: baseline.fsync_p50_us,
        baseline_mb_per_sec: round3(baseline.mb_per_sec),
        ratio_to_single_writer: single_writer_rate.map(|rate| round3(events_per_sec / rate)),
        ratio_to_baseline_fsync: round3(events_per_sec / baseline.fsync_per_sec),
        ratio_of_baseline_bandwidth: round3(bytes_per_sec / (baseline.mb_per_sec * 1e6)),
        p99_over_baseline_fsync_p50: round3(p99_us as f64 / baseline.fsync_p50_us.max(1) as f64),
    }
}

/// The report as a table.
fn table(rows: &[Row]) -> Table {
    let mut table = Table::new();
    table.set_header([
        "scenario",
        "events",
        "seconds",
        "events/s",
        "MB/s",
        "p50 µs",
        "p99 µs",
        "p99.9 µs",
        "base fsync/s",
        "base fsync p50 µs",
        "base MB/s",
        "× single",
        "× base fsync/s",
        "× base MB/s",
        "p99 / base p50",
    ]);
    for row in rows {
        table.add_row([
            row.scenario.to_owned(),
            row.events.to_string(),
            format!("{:.1}", row.seconds),
            format!("{:.0}", row.events_per_sec),
            format!("{:.2}", row.bytes_per_sec / 1e6),
            row.p50_us.to_string(),
            row.p99_us.to_string(),
            row.p999_us.to_string(),
            format!("{:.0}", row.baseline_fsync_per_sec),
            row.baseline_fsync_p50_us.to_string(),
            format!("{:.1}", row.baseline_mb_per_sec),
            row.ratio_to_single_writer
                .map_or_else(|| "-".to_owned(), |ratio| format!("{ratio:.2}")),
            format!("{:.2}", row.ratio_to_baseline_fsync),
            format!("{:.3}", row.ratio_of_baseline_bandwidth),
            format!("{:.2}", row.p99_over_baseline_fsync_p50),
        ]);
    }
    table
}

/// Runs `scenario` on a fresh log in `dir`, closing it afterwards.
async fn run_scenario(
    scenario: Scenario,
    dir: &BenchDir,
    limit: Limit,
    maker: &EventMaker,
) -> anyhow::Result<Measured> {
    let log = store::open(Options::new(dir.log_dir(scenario.name()))).await?;
    store::closing(&log, drive(&log, scenario, limit, maker))
        .await
        .with_context(|| format!("scenario {} failed", scenario.name()))
}

/// What one writer task measured.
struct WriterResult {
    events: u64,
    appends: u64,
    latencies: Histogram<u64>,
}

/// Runs the scenario's writers on `log` and merges what they measured.
async fn drive(
    log: &Log,
    scenario: Scenario,
    limit: Limit,
    maker: &EventMaker,
) -> anyhow::Result<Measured> {
    let writers = scenario.writers();
    let batch_size = scenario.batch_size();
    let done = Arc::new(AtomicU64::new(0));
    let goal = match limit {
        Limit::Events(events) => Goal::Events(events),
        Limit::Duration(duration) => Goal::Duration(duration),
    };
    let progress = Progress::start(scenario.name(), goal, done.clone());
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for writer in 0..writers {
        // Each writer's share of the events, or the time when every writer stops.
        let stop = match limit {
            Limit::Events(events) => {
                Stop::After(events / writers + u64::from(writer < events % writers))
            }
            Limit::Duration(duration) => Stop::At(started + duration),
        };
        let stream = StreamName::new(format!("bench-{writer}"))?;
        tasks.spawn(write(
            log.clone(),
            stream,
            maker.clone(),
            batch_size,
            stop,
            done.clone(),
        ));
    }
    let mut measured = Measured {
        events: 0,
        appends: 0,
        seconds: 0.0,
        latencies: latency_histogram(),
    };
    while let Some(joined) = tasks.join_next().await {
        let writer = joined.context("a writer task panicked")??;
        measured.events += writer.events;
        measured.appends += writer.appends;
        measured
            .latencies
            .add(&writer.latencies)
            .context("cannot merge latency histograms")?;
    }
    measured.seconds = started.elapsed().as_secs_f64();
    progress.finish();
    Ok(measured)
}

/// When one writer stops.
#[derive(Debug, Clone, Copy)]
enum Stop {
    /// After appending this many events.
    After(u64),
    /// At this instant.
    At(Instant),
}

/// Appends batches of `batch_size` events to `stream` until `stop`.
async fn write(
    log: Log,
    stream: StreamName,
    maker: EventMaker,
    batch_size: u64,
    stop: Stop,
    done: Arc<AtomicU64>,
) -> anyhow::Result<WriterResult> {
    let mut result = WriterResult {
        events: 0,
        appends: 0,
        latencies: latency_histogram(),
    };
    loop {
        let len = match stop {
            Stop::After(events) if result.events >= events => break,
            Stop::After(events) => batch_size.min(events - result.events),
            Stop::At(deadline) if Instant::now() >= deadline => break,
            Stop::At(_) => batch_size,
        };
        let events: Vec<Event> = (result.events..result.events + len)
            .map(|seq| maker.event(seq))
            .collect();
        let began = Instant::now();
        log.append(&stream, ExpectedVersion::Any, events)
            .await
            .with_context(|| format!("cannot append to stream `{stream}`"))?;
        record(&mut result.latencies, began.elapsed());
        result.events += len;
        result.appends += 1;
        done.fetch_add(len, Ordering::Relaxed);
    }
    Ok(result)
}
