//! `herald events`: append events, read them back, follow them live.

use std::io::{self, IsTerminal as _, Read as _, Write};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Args, Subcommand};
use futures::StreamExt as _;
use herald_core::store::Subscription;
use herald_core::{
    Appended, Direction, Event, EventStore as _, ExpectedVersion, Position, RecordedEvent,
    StreamName, Version,
};
use serde::Serialize;

use crate::store::{self, Log, Options};

/// How many events one read of the log returns at most; `--limit` is served in pages.
const READ_PAGE_LEN_MAX: usize = 1000;

/// The `herald events` subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Append one event built from flags, or the CloudEvents of a JSON file, to a stream.
    ///
    /// Prints where each event was stored: `{"stream", "events": [{"id", "version",
    /// "position"}]}`.
    Append(AppendArgs),
    /// Read events of one stream or of the global log; prints one JSON object per line.
    ///
    /// Each line is `{"stream", "version", "position", "recorded_at", "event"}`, where `event`
    /// is the structured CloudEvent.
    Read(ReadArgs),
    /// Print the events already stored, then new ones as they are appended, until Ctrl-C.
    ///
    /// Lines are those of `herald events read`.
    Tail(TailArgs),
}

/// Arguments of `herald events append`.
#[derive(Debug, Args)]
pub(crate) struct AppendArgs {
    /// The stream to append to.
    #[arg(long)]
    stream: StreamName,

    /// The CloudEvents `type` of the event, e.g. `com.example.order.placed`.
    #[arg(long = "type", value_name = "TYPE", required_unless_present = "file")]
    ty: Option<String>,

    /// The CloudEvents `source` (a URI-reference).
    #[arg(long, default_value = "/herald/cli", value_name = "SOURCE")]
    source: String,

    /// The payload, as JSON (a JSON string needs its quotes: '"text"').
    #[arg(long, value_name = "JSON")]
    data: Option<String>,

    /// The CloudEvents `subject`, e.g. the aggregate id.
    #[arg(long)]
    subject: Option<String>,

    /// The `correlationid` extension shared by every event of one business flow.
    #[arg(long, value_name = "ID")]
    correlation_id: Option<String>,

    /// The event id [default: a fresh UUIDv7]; re-sending an append with the same id is
    /// idempotent.
    #[arg(long)]
    id: Option<String>,

    /// Append only if the stream is in this state: `any`, `no-stream`, `exists`, or the
    /// version of its last event.
    #[arg(long, default_value = "any", value_name = "any|no-stream|exists|N")]
    expected_version: ExpectedVersion,

    /// Append the structured CloudEvent, or the batch (a JSON array of them), in this file
    /// instead; `-` reads standard input.
    #[arg(
        long,
        short,
        value_name = "FILE",
        conflicts_with_all = ["ty", "data", "subject", "correlation_id", "id"]
    )]
    file: Option<PathBuf>,
}

/// Arguments of `herald events read`.
#[derive(Debug, Args)]
pub(crate) struct ReadArgs {
    /// Read this stream; without it, read the global log.
    #[arg(long)]
    stream: Option<StreamName>,

    /// Start at this version (with --stream) or global position, inclusive [default: the
    /// first event, or the last one with --backward]
    #[arg(long, value_name = "N")]
    from: Option<u64>,

    /// Print at most this many events.
    #[arg(long, default_value_t = 100, value_name = "N")]
    limit: usize,

    /// Read from newer to older.
    #[arg(long)]
    backward: bool,
}

/// Arguments of `herald events tail`.
#[derive(Debug, Args)]
pub(crate) struct TailArgs {
    /// Follow this stream; without it, follow the global log.
    #[arg(long)]
    stream: Option<StreamName>,

    /// Start at this version (with --stream) or global position, inclusive.
    #[arg(long, default_value_t = 0, value_name = "N")]
    from: u64,
}

/// The result of an append, as printed.
#[derive(Debug, Serialize)]
struct AppendOutput<'a> {
    stream: &'a str,
    events: Vec<AppendedOutput<'a>>,
}

/// Where one appended event was stored, as printed.
#[derive(Debug, Serialize)]
struct AppendedOutput<'a> {
    id: &'a str,
    version: u64,
    position: u64,
}

/// Runs an `events` subcommand against the log in `data_dir`.
pub(crate) async fn run(command: Command, data_dir: &Path) -> anyhow::Result<()> {
    match command {
        Command::Append(args) => append(args, data_dir).await,
        Command::Read(args) => read(args, data_dir).await,
        Command::Tail(args) => tail(args, data_dir).await,
    }
}

/// `herald events append`: validates the input, appends it, prints where it was stored.
async fn append(args: AppendArgs, data_dir: &Path) -> anyhow::Result<()> {
    // Build and validate the events before opening the log, so bad input fails fast.
    let events = match &args.file {
        Some(path) => events_from_file(path)?,
        None => vec![event_from_flags(&args)?],
    };
    let log = store::open(Options::new(data_dir)).await?;
    let stream = &args.stream;
    let appended = store::closing(&log, async {
        log.append(stream, args.expected_version, events)
            .await
            .with_context(|| format!("cannot append to stream `{stream}`"))
    })
    .await?;
    print_appended(stream, &appended)
}

/// Builds the event described by `herald events append`'s flags.
fn event_from_flags(args: &AppendArgs) -> anyhow::Result<Event> {
    let ty = args
        .ty
        .as_deref()
        .context("--type is required unless --file is given")?;
    let mut event = Event::new(args.source.as_str(), ty).with_time_now();
    if let Some(id) = &args.id {
        event = event.with_id(id.as_str());
    }
    if let Some(data) = &args.data {
        let value: serde_json::Value = serde_json::from_str(data).with_context(|| {
            if data.trim_start().starts_with(['{', '[', '"']) {
                "--data is not valid JSON".to_owned()
            } else {
                format!(
                    "--data is not valid JSON (to send text, give it as a JSON string: \
                     --data '\"{data}\"')"
                )
            }
        })?;
        event = event.with_data(value);
    }
    if let Some(subject) = &args.subject {
        event = event.with_subject(subject.as_str());
    }
    if let Some(correlation_id) = &args.correlation_id {
        event = event.with_correlation_id(correlation_id.as_str());
    }
    event
        .validate()
        .context("the event is not a valid CloudEvent")?;
    Ok(event)
}

/// Reads a structured CloudEvent or a batch of them from `path` (`-`: standard input).
fn events_from_file(path: &Path) -> anyhow::Result<Vec<Event>> {
    let (name, bytes) = if path == Path::new("-") {
        if io::stdin().is_terminal() {
            eprintln!("reading events from standard input; end with Ctrl-D");
        }
        let mut bytes = Vec::new();
        io::stdin()
            .read_to_end(&mut bytes)
            .context("cannot read the events from standard input")?;
        ("standard input".to_owned(), bytes)
    } else {
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read the events file {}", path.display()))?;
        (path.display().to_string(), bytes)
    };
    let is_batch = bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[');
    if is_batch {
        let events = Event::batch_from_json(&bytes)
            .with_context(|| format!("{name} is not a valid CloudEvents JSON batch"))?;
        anyhow::ensure!(
            !events.is_empty(),
            "{name} holds an empty batch: give at least one event"
        );
        Ok(events)
    } else {
        let event = Event::from_json(&bytes)
            .with_context(|| format!("{name} is not a valid structured CloudEvent"))?;
        Ok(vec![event])
    }
}

/// Prints an append's result as one JSON line.
fn print_appended(stream: &StreamName, appended: &Appended) -> anyhow::Result<()> {
    let output = AppendOutput {
        stream: stream.as_str(),
        events: appended
            .events
            .iter()
            .map(|event| AppendedOutput {
                id: &event.id,
                version: event.version.0,
                position: event.position.0,
            })
            .collect(),
    };
    let mut out = io::stdout().lock();
    let written = serde_json::to_writer(&mut out, &output)
        .map_err(io::Error::from)
        .and_then(|()| writeln!(out))
        .and_then(|()| out.flush());
    ignore_broken_pipe(written).context("cannot write the result to standard output")?;
    Ok(())
}

/// `herald events read`.
async fn read(args: ReadArgs, data_dir: &Path) -> anyhow::Result<()> {
    let log = store::open_existing(data_dir).await?;
    store::closing(&log, read_pages(&log, &args)).await
}

/// Prints up to `args.limit` events, reading them a page at a time.
async fn read_pages(log: &Log, args: &ReadArgs) -> anyhow::Result<()> {
    let direction = if args.backward {
        Direction::Backward
    } else {
        Direction::Forward
    };
    let start = match (args.from, direction) {
        (Some(from), _) => from,
        (None, Direction::Forward) => 0,
        (None, Direction::Backward) => u64::MAX,
    };
    let mut next = Some(start);
    let mut remaining = args.limit;
    let mut out = io::BufWriter::new(io::stdout().lock());
    while let Some(from) = next
        && remaining > 0
    {
        let page_len = remaining.min(READ_PAGE_LEN_MAX);
        let page = match &args.stream {
            Some(stream) => log
                .read_stream(stream, Version(from), direction, page_len)
                .await
                .with_context(|| format!("cannot read stream `{stream}`"))?,
            None => log
                .read_all(Position(from), direction, page_len)
                .await
                .context("cannot read the global log")?,
        };
        for record in &page {
            if !write_or_stop(&mut out, record)? {
                return Ok(());
            }
        }
        remaining -= page.len();
        next = match page.last() {
            Some(last) if page.len() == page_len => {
                let key = if args.stream.is_some() {
                    last.version.0
                } else {
                    last.position.0
                };
                match direction {
                    Direction::Forward => key.checked_add(1),
                    Direction::Backward => key.checked_sub(1),
                }
            }
            _ => None,
        };
    }
    ignore_broken_pipe(out.flush()).context("cannot write to standard output")?;
    Ok(())
}

/// `herald events tail`: closes the log cleanly when it stops.
async fn tail(args: TailArgs, data_dir: &Path) -> anyhow::Result<()> {
    let log = store::open_existing(data_dir).await?;
    store::closing(&log, follow(&log, &args)).await
}

/// Prints the subscription's events until Ctrl-C (or SIGTERM), or until stdout is closed.
async fn follow(log: &Log, args: &TailArgs) -> anyhow::Result<()> {
    // Listen before the first event is printed, so a signal sent after it is never missed.
    let mut shutdown = Shutdown::listen().context("cannot listen for Ctrl-C")?;
    let mut subscription: Subscription = match &args.stream {
        Some(stream) => log
            .subscribe_stream(stream, Version(args.from))
            .await
            .with_context(|| format!("cannot follow stream `{stream}`"))?,
        None => log
            .subscribe_all(Position(args.from))
            .await
            .context("cannot follow the global log")?,
    };
    let mut out = io::stdout().lock();
    if io::stderr().is_terminal() {
        eprintln!("following events; press Ctrl-C to stop");
    }
    loop {
        tokio::select! {
            () = shutdown.recv() => {
                tracing::debug!("stopping on a signal");
                return Ok(());
            }
            item = subscription.next() => match item {
                Some(Ok(record)) => {
                    if !write_or_stop(&mut out, &record)? {
                        return Ok(());
                    }
                    // Followers see each event as soon as it arrives.
                    let flushed = ignore_broken_pipe(out.flush())
                        .context("cannot write to standard output")?;
                    if flushed.is_none() {
                        return Ok(());
                    }
                }
                Some(Err(error)) => {
                    return Err(error).context("the subscription failed");
                }
                None => anyhow::bail!("the subscription ended: the event log was closed"),
            }
        }
    }
}

/// The signals that stop `herald events tail` and `herald up`: Ctrl-C, and on Unix also
/// SIGTERM.
pub(crate) struct Shutdown {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl Shutdown {
    /// Starts listening; from now on those signals no longer kill the process.
    pub(crate) fn listen() -> io::Result<Shutdown> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Shutdown {
                interrupt: signal(SignalKind::interrupt())?,
                terminate: signal(SignalKind::terminate())?,
            })
        }
        #[cfg(not(unix))]
        {
            Ok(Shutdown {})
        }
    }

    /// Completes when one of the signals arrives.
    pub(crate) async fn recv(&mut self) {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.interrupt.recv() => {}
                _ = self.terminate.recv() => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Writes one event line; `Ok(false)` when the reader of stdout has gone (e.g. `| head`).
fn write_or_stop(out: &mut impl Write, record: &RecordedEvent) -> anyhow::Result<bool> {
    Ok(ignore_broken_pipe(store::write_line(out, record))
        .context("cannot write to standard output")?
        .is_some())
}

/// Turns a broken pipe into `Ok(None)`: a closed stdout is how pipelines stop early.
fn ignore_broken_pipe<T>(result: io::Result<T>) -> io::Result<Option<T>> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(error) if error.kind() == io::ErrorKind::BrokenPipe => Ok(None),
        Err(error) => Err(error),
    }
}
