//! Opening and closing the embedded log, the JSON lines events are printed as, and the hints
//! shown under errors.

use std::io::{self, Write};
use std::path::Path;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use herald_core::store::Error as StoreError;
use herald_core::{Event, RecordedEvent};
use serde::Serialize;

pub(crate) use herald_log::{Durability, Log, OpenError, Options};

/// Opens the log described by `options`, running its recovery off the async executor.
pub(crate) async fn open(options: Options) -> anyhow::Result<Log> {
    let dir = options.data_dir.clone();
    tokio::task::spawn_blocking(move || Log::open(options))
        .await
        .context("the task opening the event log failed")?
        .with_context(|| format!("cannot open the event log in {}", dir.display()))
}

/// Opens the log in `dir` for reading: unlike [`open`], refuses to create a new, empty log.
pub(crate) async fn open_existing(dir: &Path) -> anyhow::Result<Log> {
    if !dir.exists() {
        anyhow::bail!(
            "there is no event log in {}: append events first, or point --data-dir \
             (HERALD_DATA_DIR) at an existing data directory",
            dir.display()
        );
    }
    open(Options::new(dir)).await
}

/// Closes `log`: drains pending appends and releases the data directory's lock.
pub(crate) async fn close(log: &Log) -> anyhow::Result<()> {
    log.close().await.context("cannot close the event log")
}

/// Runs `work` on `log`, then closes the log whatever the outcome; the first error wins.
pub(crate) async fn closing<T>(
    log: &Log,
    work: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    let result = work.await;
    let closed = close(log).await;
    let value = result?;
    closed?;
    Ok(value)
}

/// One stored event as printed by `herald events read` and `tail`: one JSON object per line.
#[derive(Debug, Serialize)]
pub(crate) struct RecordLine<'a> {
    /// The event's stream.
    pub(crate) stream: &'a str,
    /// Its version within the stream.
    pub(crate) version: u64,
    /// Its position in the global log.
    pub(crate) position: u64,
    /// When the log accepted it.
    pub(crate) recorded_at: &'a DateTime<Utc>,
    /// The structured CloudEvent.
    pub(crate) event: &'a Event,
}

impl<'a> From<&'a RecordedEvent> for RecordLine<'a> {
    fn from(record: &'a RecordedEvent) -> Self {
        RecordLine {
            stream: record.stream.as_str(),
            version: record.version.0,
            position: record.position.0,
            recorded_at: &record.recorded_at,
            event: &record.event,
        }
    }
}

/// Writes `record` as one JSON line.
pub(crate) fn write_line(out: &mut impl Write, record: &RecordedEvent) -> io::Result<()> {
    serde_json::to_writer(&mut *out, &RecordLine::from(record))?;
    out.write_all(b"\n")
}

/// What the user can do about `error`, when the error chain says something specific.
pub(crate) fn hint(error: &anyhow::Error) -> Option<String> {
    error.chain().find_map(|cause| {
        if let Some(error) = cause.downcast_ref::<StoreError>() {
            return store_hint(error);
        }
        if let Some(error) = cause.downcast_ref::<crate::dlq::Missing>() {
            return Some(error.hint());
        }
        if let Some(error) = cause.downcast_ref::<OpenError>() {
            return open_hint(error);
        }
        if let Some(error) = cause.downcast_ref::<io::Error>() {
            return io_hint(error);
        }
        None
    })
}

/// Advice for an event store error the user can act on.
fn store_hint(error: &StoreError) -> Option<String> {
    let hint = match error {
        StoreError::WrongExpectedVersion {
            stream,
            actual: Some(actual),
            ..
        } => format!(
            "stream `{stream}` is at version {actual}: read it with `herald events read \
             --stream {stream}`, then retry with `--expected-version {actual}`, or use \
             `--expected-version any` to append without the check"
        ),
        StoreError::WrongExpectedVersion {
            stream,
            actual: None,
            ..
        } => format!(
            "stream `{stream}` has no events: retry with `--expected-version no-stream` or `any`"
        ),
        StoreError::DuplicateEventId { .. } => "every event needs its own id: omit `--id` to get \
             a fresh UUIDv7, or re-send exactly the original append to retry it idempotently"
            .to_owned(),
        StoreError::DuplicateInBatch { .. } => "give every event of the batch its own id".into(),
        StoreError::StreamNotFound { .. } => "nothing has been appended to this stream; omit \
             --stream to read the global log"
            .into(),
        StoreError::StreamDeleted { stream } => format!(
            "stream `{stream}` was deleted; its events remain in the global log (read without \
             --stream), and appending to it revives it"
        ),
        StoreError::AppendTooLarge { .. } => "split the events into smaller appends".into(),
        StoreError::Failed(_) => "run the command again: reopening the log recovers it".into(),
        StoreError::Corrupt { .. } => "keep a copy of the data directory and report the problem; \
             do not delete files from it"
            .into(),
        StoreError::Io(_) => {
            "check that the data directory's disk has free space and is writable".into()
        }
        _ => return None,
    };
    Some(hint)
}

/// Advice for a failure to open the log.
fn open_hint(error: &OpenError) -> Option<String> {
    match error {
        OpenError::Locked { .. } => Some(
            "one process at a time can open a data directory, a running `herald events tail` \
             included; the directory can also be chosen with HERALD_DATA_DIR"
                .into(),
        ),
        OpenError::Corrupt { .. } => Some(
            "keep a copy of the data directory and report the problem; do not delete files \
             from it"
                .into(),
        ),
        _ => None,
    }
}

/// Advice for an I/O error the user can fix.
fn io_hint(error: &io::Error) -> Option<String> {
    match error.kind() {
        io::ErrorKind::PermissionDenied => {
            Some("check the permissions of the data directory and its files".into())
        }
        io::ErrorKind::AlreadyExists | io::ErrorKind::NotADirectory => {
            Some("--data-dir (HERALD_DATA_DIR) must name a directory, not a file".into())
        }
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => {
            Some("free some disk space, or point --data-dir at another disk".into())
        }
        _ => None,
    }
}
