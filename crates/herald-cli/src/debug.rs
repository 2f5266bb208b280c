//! `herald debug`: hidden tools that test Herald itself.
//!
//! `herald debug crash-writer` is the process that `tests/crash.rs` kills with SIGKILL: it
//! appends forever and reports every acknowledged append on stdout, so the test knows which
//! events the log promised to keep.
//!
//! `herald debug consume` is the process that `tests/consumer_crash.rs` kills with SIGKILL:
//! a consumer with the default pipeline and a durable idempotency store, whose handler
//! writes each input's id to a file (synced) before it publishes one output event, so the
//! test can count handler runs and compare them with the outputs the topic holds.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context as _;
use clap::{Args, Subcommand};
use futures::StreamExt as _;
use herald_core::broker::{GroupName, TopicName, partition_key};
use herald_core::{Event, EventStore, ExpectedVersion, Position, StreamName};
use herald_log::broker::{Broker, BrokerOptions};
use herald_runtime::{
    ConsumerOptions, EventStoreDeadLetters, EventStoreIdempotency, HandlerContext, HandlerError,
    PipelineOptions, Router, SystemClock,
};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde::Serialize;
use tokio::signal::unix::{SignalKind, signal};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::store::{self, Log, Options};

/// The name of the extension carrying the id of the append an event was part of.
pub(crate) const BATCH_ID: &str = "batchid";
/// The name of the extension carrying the number of events of that append.
pub(crate) const BATCH_SIZE: &str = "batchsize";

/// The `herald debug` subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Append forever from several tasks, printing one JSON line per acknowledged append.
    ///
    /// Each event carries the extensions `batchid` and `batchsize`. Each line is
    /// `{"writer", "stream", "batchid", "batchsize", "events": [{"id", "version",
    /// "position"}]}` and is flushed before the next append of that task starts.
    CrashWriter(CrashWriterArgs),
    /// Consume the topic `inputs` as the group `crash`, publishing one event to `effects`
    /// per input, with the idempotency layer on the log; stop on SIGTERM or SIGINT.
    ///
    /// The handler appends the input's id and a newline to `--handled-log` and syncs it
    /// before it publishes. Every `--progress-every` handler runs, a line
    /// `{"handled": <runs in this process>}` is printed; at a clean stop, a line
    /// `{"report": {...}}` with the consumer's report.
    Consume(ConsumeArgs),
}

/// Arguments of `herald debug crash-writer`.
#[derive(Debug, Args)]
pub(crate) struct CrashWriterArgs {
    /// Seeds the writers' random choices of stream and batch size.
    #[arg(long)]
    seed: u64,

    /// The number of concurrent writer tasks.
    #[arg(long, default_value_t = 8)]
    writers: usize,

    /// The number of streams the writers share.
    #[arg(long, default_value_t = 4)]
    streams: usize,

    /// The largest number of events in one append.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u16).range(1..))]
    batch_size_max: u16,
}

/// Arguments of `herald debug consume`.
#[derive(Debug, Args)]
pub(crate) struct ConsumeArgs {
    /// The file each handler run appends the input's id to (created if missing).
    #[arg(long, value_name = "FILE")]
    handled_log: PathBuf,

    /// Print a progress line every this many handler runs.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    progress_every: u64,

    /// Stop by itself, as on SIGTERM, once `effects` holds outputs of this many distinct
    /// inputs.
    #[arg(long, value_name = "COUNT")]
    expect: Option<usize>,
}

/// One acknowledged append, as printed by the crash writer.
#[derive(Debug, Serialize)]
struct AckLine<'a> {
    writer: usize,
    stream: &'a str,
    batchid: &'a str,
    batchsize: usize,
    events: Vec<AckedEvent<'a>>,
}

/// One acknowledged event, as printed by the crash writer.
#[derive(Debug, Serialize)]
struct AckedEvent<'a> {
    id: &'a str,
    version: u64,
    position: u64,
}

/// Runs a `debug` subcommand.
pub(crate) async fn run(command: Command, data_dir: &Path) -> anyhow::Result<()> {
    match command {
        Command::CrashWriter(args) => crash_writer(args, data_dir).await,
        Command::Consume(args) => consume(args, data_dir).await,
    }
}

/// `herald debug crash-writer`: runs the writers until one fails (or the process is killed).
async fn crash_writer(args: CrashWriterArgs, data_dir: &Path) -> anyhow::Result<()> {
    anyhow::ensure!(args.writers > 0, "--writers must be at least 1");
    anyhow::ensure!(args.streams > 0, "--streams must be at least 1");
    let log = store::open(Options::new(data_dir)).await?;
    let streams: Vec<StreamName> = (0..args.streams)
        .map(|i| StreamName::new(format!("crash-{i}")))
        .collect::<Result<_, _>>()?;
    let mut tasks = tokio::task::JoinSet::new();
    for writer in 0..args.writers {
        let log = log.clone();
        let streams = streams.clone();
        let rng = StdRng::seed_from_u64(args.seed.wrapping_mul(1000).wrapping_add(writer as u64));
        let batch_size_max = usize::from(args.batch_size_max);
        tasks.spawn(write_forever(
            log,
            args.seed,
            writer,
            streams,
            rng,
            batch_size_max,
        ));
    }
    // The writers only stop on an error; report the first one.
    let result = match tasks.join_next().await {
        Some(Ok(result)) => result,
        Some(Err(error)) => Err(error).context("a writer task panicked"),
        None => Ok(()),
    };
    tasks.abort_all();
    store::close(&log).await?;
    result
}

/// Appends random batches to random streams until an append fails.
async fn write_forever(
    log: Log,
    seed: u64,
    writer: usize,
    streams: Vec<StreamName>,
    mut rng: StdRng,
    batch_size_max: usize,
) -> anyhow::Result<()> {
    for batch in 0u64.. {
        let stream = &streams[rng.gen_range(0..streams.len())];
        let batchsize = rng.gen_range(1..=batch_size_max);
        let batchid = format!("s{seed}-w{writer}-b{batch}");
        let batchsize_ext = i32::try_from(batchsize).context("batch size fits in an i32")?;
        let events: Vec<Event> = (0..batchsize)
            .map(|index| {
                Event::new("/herald/debug/crash-writer", "CrashWriterEvent")
                    .with_data(
                        serde_json::json!({ "writer": writer, "batch": batch, "index": index }),
                    )
                    .with_extension(BATCH_ID, batchid.as_str())
                    .with_extension(BATCH_SIZE, batchsize_ext)
            })
            .collect();
        let appended = log
            .append(stream, ExpectedVersion::Any, events)
            .await
            .with_context(|| format!("writer {writer} cannot append to stream `{stream}`"))?;
        let line = AckLine {
            writer,
            stream: stream.as_str(),
            batchid: &batchid,
            batchsize,
            events: appended
                .events
                .iter()
                .map(|event| AckedEvent {
                    id: &event.id,
                    version: event.version.0,
                    position: event.position.0,
                })
                .collect(),
        };
        let mut text = serde_json::to_string(&line)?;
        text.push('\n');
        // One write of the whole line, under the lock, so lines of concurrent writers never
        // interleave; flushed so the test sees each acknowledgement before the next append.
        let mut out = std::io::stdout().lock();
        out.write_all(text.as_bytes())
            .and_then(|()| out.flush())
            .context("cannot write an acknowledgement to standard output")?;
    }
    Ok(())
}

/// The consumer group, input topic and output topic of `herald debug consume`.
pub(crate) const CONSUME_GROUP: &str = "crash";
/// The topic `herald debug consume` consumes.
pub(crate) const CONSUME_INPUTS: &str = "inputs";
/// The topic `herald debug consume` publishes to.
pub(crate) const CONSUME_EFFECTS: &str = "effects";

/// `herald debug consume`: runs the consumer until a signal, or until `--expect` holds.
async fn consume(args: ConsumeArgs, data_dir: &Path) -> anyhow::Result<()> {
    let handled_log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.handled_log)
        .with_context(|| format!("cannot open {}", args.handled_log.display()))?;
    let log = store::open(Options::new(data_dir)).await?;
    store::closing(&log, async {
        let broker = Broker::new(log.clone(), BrokerOptions::new());
        let result = run_consumer(&log, &broker, args, handled_log).await;
        broker.shutdown().await;
        result
    })
    .await
}

/// Runs the consumer on `broker` until `shutdown` (cancelled by a signal, or by the
/// `--expect` watcher), and prints its report.
async fn run_consumer(
    log: &Log,
    broker: &Broker,
    args: ConsumeArgs,
    handled_log: std::fs::File,
) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let store: Arc<dyn EventStore> = Arc::new(log.clone());
    let runs = Arc::new(AtomicU64::new(0));
    let handled_log = Arc::new(handled_log);
    let progress_every = args.progress_every;
    let router = Router::new().on::<serde_json::Value, _>(
        "CrashInput",
        move |_data: serde_json::Value, ctx: HandlerContext| {
            let handled_log = Arc::clone(&handled_log);
            let runs = Arc::clone(&runs);
            async move {
                record_run(handled_log, ctx.event().id.clone()).await?;
                let input = ctx.event();
                ctx.publish(
                    Event::new("/herald/debug/consume", "CrashEffect")
                        .with_partition_key(partition_key(input))
                        .with_data(serde_json::json!({ "input": input.id })),
                );
                let run = runs.fetch_add(1, Ordering::SeqCst) + 1;
                if run.is_multiple_of(progress_every) {
                    print_line(&serde_json::json!({ "handled": run }))
                        .map_err(HandlerError::permanent)?;
                }
                Ok(())
            }
        },
    );
    let pipeline = PipelineOptions::default().build_idempotent(
        router,
        Arc::new(EventStoreIdempotency::new(Arc::clone(&store))),
        StdRng::from_entropy(),
        Arc::new(SystemClock),
    );
    let consumer = ConsumerOptions {
        publish_topic: Some(CONSUME_EFFECTS.to_owned()),
        ..ConsumerOptions::default()
    }
    .build(
        Arc::new(broker.clone()),
        Arc::new(broker.clone()),
        Arc::new(EventStoreDeadLetters::new(Arc::clone(&store))),
        TopicName::new(CONSUME_INPUTS)?,
        GroupName::new(CONSUME_GROUP)?,
        pipeline,
    )?;

    // Registered before the consumer starts, so that a signal sent once it has made
    // progress always finds a handler.
    let mut terminate = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let mut watchers = JoinSet::new();
    watchers.spawn({
        let shutdown = shutdown.clone();
        async move {
            tokio::select! {
                _ = terminate.recv() => shutdown.cancel(),
                _ = interrupt.recv() => shutdown.cancel(),
                () = shutdown.cancelled() => {}
            }
            Ok(())
        }
    });
    if let Some(expect) = args.expect {
        watchers.spawn(watch_effects(Arc::clone(&store), expect, shutdown.clone()));
    }
    let report = consumer.run(shutdown.clone()).await;
    shutdown.cancel();
    while let Some(watched) = watchers.join_next().await {
        watched.context("a watcher task panicked")??;
    }
    let report = report.context("the consumer failed")?;
    print_line(&serde_json::json!({
        "report": {
            "handled": report.handled,
            "duplicates": report.duplicates,
            "skipped": report.skipped,
            "dead_lettered": report.dead_lettered,
            "abandoned": report.abandoned,
            "held": report.held,
        }
    }))?;
    Ok(())
}

/// Appends `id` and a newline to the handled log and syncs it, off the executor. One
/// `write` of an `O_APPEND` file: lines of concurrent handlers never interleave.
async fn record_run(handled_log: Arc<std::fs::File>, id: String) -> Result<(), HandlerError> {
    tokio::task::spawn_blocking(move || {
        let mut line = id.into_bytes();
        line.push(b'\n');
        (&*handled_log).write_all(&line)?;
        handled_log.sync_data()
    })
    .await
    .map_err(HandlerError::permanent)?
    .map_err(HandlerError::transient)
}

/// Cancels `shutdown` once the `effects` topic holds outputs caused by `expect` distinct
/// inputs: it follows the whole log from its start and counts the causation ids of the
/// events in the topic's partitions.
async fn watch_effects(
    store: Arc<dyn EventStore>,
    expect: usize,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let prefix = format!("$topic:{CONSUME_EFFECTS}:");
    let mut causes = HashSet::new();
    let mut events = store.subscribe_all(Position::START).await?;
    while causes.len() < expect {
        let recorded = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            recorded = events.next() => recorded,
        };
        let Some(recorded) = recorded else {
            anyhow::bail!("the log's subscription ended");
        };
        let recorded = recorded.context("following the log failed")?;
        if recorded.stream.as_str().starts_with(&prefix)
            && let Some(cause) = recorded.event.causation_id()
        {
            causes.insert(cause.to_owned());
        }
    }
    shutdown.cancel();
    Ok(())
}

/// Prints `value` as one line on stdout, flushed, in one write under the lock.
fn print_line(value: &serde_json::Value) -> std::io::Result<()> {
    let mut text = value.to_string();
    text.push('\n');
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()
}
