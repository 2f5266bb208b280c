//! `herald debug`: hidden tools that test Herald itself.
//!
//! `herald debug crash-writer` is the process that `tests/crash.rs` kills with SIGKILL: it
//! appends forever and reports every acknowledged append on stdout, so the test knows which
//! events the log promised to keep.

use std::io::Write as _;
use std::path::Path;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use herald_core::{Event, EventStore as _, ExpectedVersion, StreamName};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde::Serialize;

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
