//! `herald bench read`: read throughput of a populated log, and the time to reopen it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::Context as _;
use comfy_table::Table;
use herald_core::store::Error as StoreError;
use herald_core::{
    Direction, Event, EventStore as _, ExpectedVersion, Position, StreamName, Version,
};
use serde::Serialize;

use super::baseline::{self, ReadBaseline};
use super::{BenchDir, EventMaker, Goal, Progress, round3};
use crate::store::{self, Durability, Log, Options};

/// How many tasks populate the log concurrently.
const POPULATE_WRITERS: u64 = 4;

/// Arguments of `herald bench read`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Print a JSON document instead of a table.
    #[arg(long)]
    json: bool,

    /// How many events to populate the log with.
    #[arg(long, default_value_t = 1_000_000, value_name = "N")]
    events: u64,

    /// How many streams the events are spread over.
    #[arg(long, default_value_t = 1000, value_name = "N")]
    streams: u64,

    /// The size of each event's structured JSON, in bytes.
    #[arg(long, default_value_t = 500, value_name = "BYTES")]
    event_bytes: usize,

    /// How many events each populating append carries.
    #[arg(long, default_value_t = 100, value_name = "N")]
    batch_size: u64,

    /// How many events one read asks for.
    #[arg(long, default_value_t = 1000, value_name = "N")]
    page_size: usize,
}

/// The report of `herald bench read --json`.
#[derive(Debug, Serialize)]
struct Report<'a> {
    bench: &'static str,
    /// The directory measured.
    dir: String,
    /// Its file system type.
    filesystem: Option<&'a str>,
    events: u64,
    streams: u64,
    /// The size of each event's structured JSON.
    event_bytes: usize,
    /// The size of the log's files.
    data_bytes: u64,
    page_size: usize,
    scenarios: Vec<Row>,
    /// A raw sequential read of the log's files, measured just before the reads.
    baseline: ReadBaseline,
}

/// The figures of one phase.
#[derive(Debug, Serialize)]
struct Row {
    scenario: &'static str,
    events: u64,
    seconds: f64,
    events_per_sec: f64,
    /// The events' structured JSON per second, in MB (10^6 bytes).
    mb_per_sec: f64,
    /// `mb_per_sec` over the raw read baseline's, for the read phases.
    ratio_of_baseline_read: Option<f64>,
}

/// Runs `herald bench read` in `dir`.
pub(crate) async fn run(args: Args, dir: &BenchDir) -> anyhow::Result<()> {
    anyhow::ensure!(args.events > 0, "--events must be at least 1");
    anyhow::ensure!(args.streams > 0, "--streams must be at least 1");
    anyhow::ensure!(args.batch_size > 0, "--batch-size must be at least 1");
    anyhow::ensure!(args.page_size > 0, "--page-size must be at least 1");
    let maker = EventMaker::new(args.event_bytes);
    let event_bytes = maker.event(0).to_json().len();
    let log_dir = dir.log_dir("read");
    let streams: Vec<StreamName> = (0..args.streams)
        .map(|i| StreamName::new(format!("bench-{i}")))
        .collect::<Result<_, _>>()?;

    let mut options = Options::new(&log_dir);
    options.durability = Durability::Os;
    let log = store::open(options).await?;
    let populate = store::closing(&log, populate(&log, &args, &streams, &maker))
        .await
        .context("cannot populate the log")?;
    let populate = row("populate_os", args.events, populate, event_bytes, None);
    eprintln!(
        "populate_os: {} events in {:.1} s",
        args.events, populate.seconds
    );
    let data_bytes = baseline::size_of(&log_dir).context("cannot measure the log's size")?;

    let started = Instant::now();
    let log = store::open(Options::new(&log_dir)).await?;
    let open_seconds = started.elapsed().as_secs_f64();
    eprintln!("open: {open_seconds:.3} s");
    let measured = store::closing(&log, async {
        let path = log_dir.clone();
        let baseline = tokio::task::spawn_blocking(move || baseline::measure_reads(&path))
            .await
            .context("the baseline task failed")?
            .context("cannot measure the raw read baseline")?;
        let read_all = read_all(&log, &args).await?;
        let read_streams = read_streams(&log, &args, &streams).await?;
        Ok((baseline, read_all, read_streams))
    })
    .await?;
    let (baseline, read_all_seconds, read_streams_seconds) = measured;
    // The same open without the index checkpoint is a replay of the whole log: the cost the
    // checkpoint saves, and what an open costs for the events written since the last one.
    std::fs::remove_file(log_dir.join("index.ckpt"))
        .context("cannot remove the index checkpoint")?;
    let started = Instant::now();
    let log = store::open(Options::new(&log_dir)).await?;
    let replay_seconds = started.elapsed().as_secs_f64();
    eprintln!("open with a full replay: {replay_seconds:.3} s");
    store::closing(&log, async { anyhow::Ok(()) }).await?;
    let baseline_mb = Some(baseline.mb_per_sec);
    let rows = vec![
        populate,
        Row {
            scenario: "open",
            events: args.events,
            seconds: round3(open_seconds),
            events_per_sec: round3(args.events as f64 / open_seconds),
            mb_per_sec: round3(data_bytes as f64 / open_seconds / 1e6),
            ratio_of_baseline_read: None,
        },
        Row {
            scenario: "open_full_replay",
            events: args.events,
            seconds: round3(replay_seconds),
            events_per_sec: round3(args.events as f64 / replay_seconds),
            mb_per_sec: round3(data_bytes as f64 / replay_seconds / 1e6),
            ratio_of_baseline_read: None,
        },
        row(
            "read_all_forward",
            args.events,
            read_all_seconds,
            event_bytes,
            baseline_mb,
        ),
        row(
            "read_stream_all",
            args.events,
            read_streams_seconds,
            event_bytes,
            baseline_mb,
        ),
    ];
    if args.json {
        let report = Report {
            bench: "read",
            dir: dir.path().display().to_string(),
            filesystem: dir.filesystem(),
            events: args.events,
            streams: args.streams,
            event_bytes,
            data_bytes,
            page_size: args.page_size,
            scenarios: rows,
            baseline,
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{}", table(&rows, &baseline));
    }
    Ok(())
}

/// The figures of a phase that handled `events` events in `seconds`.
fn row(
    scenario: &'static str,
    events: u64,
    seconds: f64,
    event_bytes: usize,
    baseline_mb_per_sec: Option<f64>,
) -> Row {
    let mb_per_sec = events as f64 * event_bytes as f64 / seconds / 1e6;
    Row {
        scenario,
        events,
        seconds: round3(seconds),
        events_per_sec: round3(events as f64 / seconds),
        mb_per_sec: round3(mb_per_sec),
        ratio_of_baseline_read: baseline_mb_per_sec.map(|baseline| round3(mb_per_sec / baseline)),
    }
}

/// The report as a table.
fn table(rows: &[Row], baseline: &ReadBaseline) -> Table {
    let mut table = Table::new();
    table.set_header([
        "scenario",
        "events",
        "seconds",
        "events/s",
        "MB/s",
        "× raw read",
    ]);
    for row in rows {
        table.add_row([
            row.scenario.to_owned(),
            row.events.to_string(),
            format!("{:.3}", row.seconds),
            format!("{:.0}", row.events_per_sec),
            format!("{:.1}", row.mb_per_sec),
            row.ratio_of_baseline_read
                .map_or_else(|| "-".to_owned(), |ratio| format!("{ratio:.3}")),
        ]);
    }
    table.add_row([
        "baseline_raw_read".to_owned(),
        "-".to_owned(),
        format!("{:.3}", baseline.seconds),
        "-".to_owned(),
        format!("{:.1}", baseline.mb_per_sec),
        "1".to_owned(),
    ]);
    table
}

/// Appends `args.events` events in batches, spread round-robin over `streams`; returns the
/// seconds taken.
async fn populate(
    log: &Log,
    args: &Args,
    streams: &[StreamName],
    maker: &EventMaker,
) -> anyhow::Result<f64> {
    let batches = args.events.div_ceil(args.batch_size);
    let next_batch = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let progress = Progress::start("populate_os", Goal::Events(args.events), done.clone());
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..POPULATE_WRITERS {
        let (log, next_batch, done, maker) =
            (log.clone(), next_batch.clone(), done.clone(), maker.clone());
        let streams = streams.to_vec();
        let (events, batch_size) = (args.events, args.batch_size);
        tasks.spawn(async move {
            loop {
                let batch = next_batch.fetch_add(1, Ordering::Relaxed);
                if batch >= batches {
                    return anyhow::Ok(());
                }
                let first = batch * batch_size;
                let last = (first + batch_size).min(events);
                let stream = &streams[(batch % streams.len() as u64) as usize];
                let batch_events: Vec<Event> = (first..last).map(|seq| maker.event(seq)).collect();
                log.append(stream, ExpectedVersion::Any, batch_events)
                    .await
                    .with_context(|| format!("cannot append to stream `{stream}`"))?;
                done.fetch_add(last - first, Ordering::Relaxed);
            }
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.context("a populating task panicked")??;
    }
    let seconds = started.elapsed().as_secs_f64();
    progress.finish();
    Ok(seconds)
}

/// Reads the whole log forward in pages; returns the seconds taken.
async fn read_all(log: &Log, args: &Args) -> anyhow::Result<f64> {
    let done = Arc::new(AtomicU64::new(0));
    let progress = Progress::start("read_all_forward", Goal::Events(args.events), done.clone());
    let started = Instant::now();
    let mut next = Position::START;
    loop {
        let page = log
            .read_all(next, Direction::Forward, args.page_size)
            .await
            .context("cannot read the global log")?;
        if let Some(last) = page.last() {
            next = Position(last.position.0 + 1);
        }
        done.fetch_add(page.len() as u64, Ordering::Relaxed);
        if page.len() < args.page_size {
            break;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    progress.finish();
    let read = done.load(Ordering::Relaxed);
    anyhow::ensure!(
        read == args.events,
        "read_all returned {read} events, but {} were appended",
        args.events
    );
    Ok(seconds)
}

/// Reads every stream from its start in pages; returns the seconds taken.
async fn read_streams(log: &Log, args: &Args, streams: &[StreamName]) -> anyhow::Result<f64> {
    let done = Arc::new(AtomicU64::new(0));
    let progress = Progress::start("read_stream_all", Goal::Events(args.events), done.clone());
    let started = Instant::now();
    for stream in streams {
        let mut next = Version::START;
        loop {
            let page = match log
                .read_stream(stream, next, Direction::Forward, args.page_size)
                .await
            {
                Ok(page) => page,
                // More streams than batches leaves some streams empty.
                Err(StoreError::StreamNotFound { .. }) => break,
                Err(error) => {
                    return Err(error).with_context(|| format!("cannot read stream `{stream}`"));
                }
            };
            if let Some(last) = page.last() {
                next = Version(last.version.0 + 1);
            }
            done.fetch_add(page.len() as u64, Ordering::Relaxed);
            if page.len() < args.page_size {
                break;
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    progress.finish();
    let read = done.load(Ordering::Relaxed);
    anyhow::ensure!(
        read == args.events,
        "read_stream returned {read} events over all streams, but {} were appended",
        args.events
    );
    Ok(seconds)
}
