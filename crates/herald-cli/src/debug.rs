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
//!
//! `herald debug relay` is the process that `tests/outbox_crash.rs` kills with SIGKILL: an
//! outbox relay from a SQL database to the embedded broker on the data directory. With
//! `--pause-after-publish` its publisher, a wrapper around the broker, says on stdout that
//! the broker has acknowledged the relay's first publish, then never returns to the relay:
//! the relay stays between "published" and "marked published", exactly where the test
//! kills it. The hook is the [`Publisher`] seam itself, so the relay under test is the
//! library's, unchanged.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
#[cfg(test)]
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use futures::StreamExt as _;
use herald_core::broker::{self, GroupName, Published, Publisher, TopicName, partition_key};
use herald_core::{Event, EventStore, ExpectedVersion, Position, StreamName};
use herald_log::broker::{Broker, BrokerOptions};
use herald_runtime::{
    ConsumerOptions, EventStoreDeadLetters, EventStoreIdempotency, HandlerContext, HandlerError,
    PipelineOptions, Router, SystemClock,
};
use herald_sql::relay::Handle;
use herald_sql::{Backend, RelayOptions};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde::Serialize;
use tokio::signal::unix::{SignalKind, signal};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::database::{self, DatabaseArgs, with_pool};
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
    /// Relay the outbox of --database-url to the embedded broker on the data directory,
    /// until SIGTERM or SIGINT.
    ///
    /// Prints `{"started": {"holder"}}`, then `{"published": <rows>}` whenever the count of
    /// rows published (and marked) grows, and at a clean stop `{"report": {"published",
    /// "publish_failures", "batches"}}`. With --pause-after-publish, the first publish the
    /// broker acknowledges prints `{"paused": {"topic", "events": [<ids>]}}`, and from then
    /// on every publish blocks after the broker acknowledged it, so that nothing is marked.
    Relay(RelayArgs),
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

/// Arguments of `herald debug relay`.
#[derive(Debug, Args)]
pub(crate) struct RelayArgs {
    #[command(flatten)]
    database: DatabaseArgs,

    /// A topic to create in the embedded broker before relaying (repeatable), as a
    /// deployment provisions its topics; rows name their own topic, and a topic not
    /// created here is created by its first publish.
    #[arg(long = "topic", value_name = "TOPIC")]
    topics: Vec<TopicName>,

    /// Block every publish after the broker acknowledged it, from the first one on,
    /// reporting the first on stdout: nothing gets marked published.
    #[arg(long)]
    pause_after_publish: bool,

    /// How long the relay's leases last unless renewed; a relay killed holding them
    /// delays the next one by up to this long. The publish timeout is two thirds of it.
    #[arg(long, default_value_t = RelayOptions::default().lease_ttl_ms, value_name = "MS",
          value_parser = clap::value_parser!(u64).range(RELAY_LEASE_TTL_MIN_MS..))]
    lease_ttl_ms: u64,
}

/// The shortest `--lease-ttl-ms` of `herald debug relay`.
const RELAY_LEASE_TTL_MIN_MS: u64 = 30;

/// The connections `herald debug relay` opens at most: one for its batches, one to
/// listen on PostgreSQL, and spares for lease upkeep.
const RELAY_CONNECTIONS_MAX: u32 = 4;

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
        Command::Relay(args) => relay(args, data_dir).await,
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

/// `herald debug relay`: relays until a signal.
async fn relay(args: RelayArgs, data_dir: &Path) -> anyhow::Result<()> {
    let database = database::connect(&args.database.database_url, RELAY_CONNECTIONS_MAX).await?;
    let log = store::open(Options::new(data_dir)).await?;
    let result = store::closing(&log, async {
        let broker = Broker::new(log.clone(), BrokerOptions::new());
        let result = async {
            for topic in &args.topics {
                broker
                    .create_topic(topic, BrokerOptions::new().partitions_default)
                    .await
                    .with_context(|| format!("cannot create topic `{topic}`"))?;
            }
            let publisher: Arc<dyn Publisher> = if args.pause_after_publish {
                Arc::new(PauseAfterPublish::new(Arc::new(broker.clone())))
            } else {
                Arc::new(broker.clone())
            };
            let options = RelayOptions {
                lease_ttl_ms: args.lease_ttl_ms,
                publish_timeout_ms: args.lease_ttl_ms * 2 / 3,
                ..RelayOptions::default()
            };
            with_pool!(&database, pool => run_relay(pool.clone(), publisher, options).await)
        }
        .await;
        broker.shutdown().await;
        result
    })
    .await;
    database.close().await;
    result
}

/// Runs the relay on `pool` until SIGTERM or SIGINT, printing its progress.
async fn run_relay<DB: Backend>(
    pool: sqlx::Pool<DB>,
    publisher: Arc<dyn Publisher>,
    options: RelayOptions,
) -> anyhow::Result<()> {
    let relay = options
        .build(pool, publisher)
        .context("invalid relay options")?;
    let handle = relay.handle();
    let shutdown = CancellationToken::new();
    // Registered before the relay starts, so that a signal always finds a handler.
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
    watchers.spawn(print_progress(handle.clone(), shutdown.clone()));
    print_line(&serde_json::json!({ "started": { "holder": handle.holder() } }))?;
    let report = relay.run(shutdown.clone()).await;
    shutdown.cancel();
    while let Some(watched) = watchers.join_next().await {
        watched.context("a watcher task panicked")??;
    }
    let report = report.context("the relay failed")?;
    print_line(&serde_json::json!({
        "report": {
            "published": report.published,
            "publish_failures": report.publish_failures,
            "batches": report.batches,
        }
    }))?;
    Ok(())
}

/// Prints `{"published": n}` whenever the relay's count of published rows grows.
async fn print_progress(handle: Handle, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut printed = 0;
    loop {
        let progress = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            progress = handle.wait_for(|progress| progress.published > printed) => progress,
        };
        printed = progress.published;
        print_line(&serde_json::json!({ "published": printed }))?;
    }
}

/// A publisher that publishes to `inner` and then never returns, reporting the first
/// publish `inner` acknowledged: the relay's rows stay published but unmarked.
struct PauseAfterPublish {
    inner: Arc<dyn Publisher>,
    paused: AtomicBool,
}

impl PauseAfterPublish {
    fn new(inner: Arc<dyn Publisher>) -> Self {
        PauseAfterPublish {
            inner,
            paused: AtomicBool::new(false),
        }
    }
}

#[async_trait::async_trait]
impl Publisher for PauseAfterPublish {
    async fn publish(
        &self,
        topic: &TopicName,
        events: Vec<Event>,
    ) -> Result<Vec<Published>, broker::Error> {
        let ids: Vec<String> = events.iter().map(|event| event.id.clone()).collect();
        self.inner.publish(topic, events).await?;
        if !self.paused.swap(true, Ordering::SeqCst) {
            let line = serde_json::json!({ "paused": { "topic": topic.as_str(), "events": ids } });
            if let Err(error) = print_line(&line) {
                tracing::warn!(%error, "cannot report the pause");
            }
        }
        std::future::pending().await
    }

    async fn close(&self) -> Result<(), broker::Error> {
        self.inner.close().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_core::broker::Subscriber as _;
    use herald_core::memory_broker::InMemoryBroker;

    /// Paused time: the timeout elapses only if the publish never completes.
    #[tokio::test(start_paused = true)]
    async fn a_paused_publisher_publishes_and_then_never_returns() {
        let broker = InMemoryBroker::new(1);
        let topic = TopicName::new("orders").unwrap();
        let mut consumer = broker
            .subscribe(&topic, &GroupName::new("check").unwrap())
            .await
            .unwrap();
        let pause = PauseAfterPublish::new(Arc::new(broker.clone()));
        for n in 0..2 {
            let event = Event::new("/test", "Paused").with_id(format!("e-{n}"));
            let publish = pause.publish(&topic, vec![event]);
            assert!(
                tokio::time::timeout(Duration::from_secs(3_600), publish)
                    .await
                    .is_err(),
                "publish {n} returned"
            );
            let message = consumer.recv().await.unwrap().unwrap();
            assert_eq!(
                message.event.id,
                format!("e-{n}"),
                "published before blocking"
            );
        }
    }
}
