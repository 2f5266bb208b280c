//! `herald bench`: performance figures of the embedded log, each next to a baseline measured
//! in the same run, on the same directory.
//!
//! These machines are shared and noisy, so the figures that matter are the ratios to the
//! baselines (raw `write` + `fdatasync`, raw sequential reads, the same work done in
//! process), not the absolute numbers.
//! Every run works in a fresh directory that it removes at the end.

mod append;
mod baseline;
mod http;
mod orders;
mod outbox;
mod pubsub;
mod read;

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Subcommand;
use hdrhistogram::Histogram;
use herald_core::Event;
use indicatif::{ProgressBar, ProgressStyle};

/// The `herald bench` subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Append throughput and latency with fsync on, next to raw `fdatasync` baselines.
    ///
    /// Scenarios: `single_writer` (1 task, one event per append), `writers_64` (64 tasks,
    /// one event per append, each to its own stream) and `batch_100` (1 task, 100 events per
    /// append). Before each one, the baselines are measured on the same directory: a loop of
    /// 512-byte `write` + `fdatasync` on one file, and sequential 1 MiB writes each followed
    /// by `fdatasync`.
    Append(append::Args),
    /// Read throughput of a populated log, and the time to reopen it.
    ///
    /// Populates the log (without fsync, to be quick), closes and reopens it, then reads it
    /// all with `read_all` forward in pages, and stream by stream with `read_stream`, next to
    /// a raw sequential read of the log's own files.
    Read(read::Args),
    /// Publish → handler throughput and latency through the durable embedded broker and
    /// the consumer runtime, next to a bare tokio channel.
    ///
    /// Scenarios: `consumers_1_full`, `consumers_1_bare`, `consumers_4_full`,
    /// `consumers_4_bare` (1 or 4 members of one group; the default middleware stack or
    /// the router alone), `channel_baseline` (a bounded tokio mpsc), then
    /// `consumers_1_full_half_rate` and `consumers_1_bare_half_rate` (publishers paced to
    /// half of `consumers_1_full`'s rate), and the middleware's CPU cost per event
    /// measured in isolation.
    Pubsub(pubsub::Args),
    /// Appends over the HTTP API next to the same appends in process, in the same run.
    ///
    /// Serves a fresh log on a free loopback port in this process; `--clients` clients (64),
    /// each with one keep-alive connection, POST `--batch` events (1) per request to their
    /// own streams. Then the same number of tasks call `EventStore::append` directly on
    /// another fresh log with the same events. Reports appends/s, p50/p99/max latency, CPU
    /// per append and `ratio` = HTTP / in process, next to the raw `fdatasync` baseline.
    Http(http::Args),
    /// The transactional outbox on SQLite and PostgreSQL, next to raw `INSERT`s of the
    /// same rows in the same run.
    ///
    /// Enqueue throughput (`Outbox::enqueue` in the caller's transactions of `--batch`
    /// events) next to a plain `INSERT` of the same rows into a table made like the
    /// outbox's, alternating in rounds, with `ratio` = outbox / raw; relay throughput from
    /// the resulting backlog to the embedded broker; and on PostgreSQL the relay's
    /// latency from commit to publish with LISTEN/NOTIFY at `--rate` events/s. SQLite is
    /// a file in the bench directory; PostgreSQL a throwaway durable server (reported as
    /// skipped where PostgreSQL is not installed).
    Outbox(outbox::Args),
    /// The order system in process on a fresh durable log: sustained orders/s and p50/p99
    /// from placement to terminal state, next to the raw `fdatasync` baseline.
    ///
    /// `--concurrency` tasks (256) each place an order and wait for it to settle, for
    /// `--duration-secs`; then the system is left to become idle and stopped, and its
    /// invariants are checked (a violation fails the command).
    Orders(orders::Args),
}

/// Runs a `bench` subcommand, measuring a fresh directory created in `parent_dir` (default:
/// the system's temporary directory).
pub(crate) async fn run(command: Command, parent_dir: Option<&Path>) -> anyhow::Result<()> {
    let bench_dir = BenchDir::create(parent_dir)?;
    match command {
        Command::Append(args) => append::run(args, &bench_dir).await,
        Command::Read(args) => read::run(args, &bench_dir).await,
        Command::Pubsub(args) => pubsub::run(args, &bench_dir).await,
        Command::Http(args) => http::run(args, &bench_dir).await,
        Command::Outbox(args) => outbox::run(args, &bench_dir).await,
        Command::Orders(args) => orders::run(args, &bench_dir).await,
    }
}

/// The fresh directory a benchmark measures, removed when dropped.
#[derive(Debug)]
pub(crate) struct BenchDir {
    dir: tempfile::TempDir,
    /// The file system type holding it (`ext4`, `tmpfs`, …), when it can be told.
    filesystem: Option<String>,
}

impl BenchDir {
    /// Creates `herald-bench-*` in `parent` (default: the system's temporary directory) and
    /// says on stderr which directory and file system are measured.
    fn create(parent: Option<&Path>) -> anyhow::Result<BenchDir> {
        let parent = parent.map_or_else(std::env::temp_dir, Path::to_path_buf);
        std::fs::create_dir_all(&parent)
            .with_context(|| format!("cannot create the directory {}", parent.display()))?;
        let dir = tempfile::Builder::new()
            .prefix("herald-bench-")
            .tempdir_in(&parent)
            .with_context(|| {
                format!(
                    "cannot create a benchmark directory in {}: pass --data-dir to measure \
                     another directory",
                    parent.display()
                )
            })?;
        let filesystem = filesystem_of(dir.path());
        eprintln!(
            "measuring {} (file system: {})",
            dir.path().display(),
            filesystem.as_deref().unwrap_or("unknown")
        );
        if let Some(kind @ ("tmpfs" | "ramfs")) = filesystem.as_deref() {
            eprintln!(
                "warning: {kind} keeps files in memory, so fdatasync costs nothing here; pass \
                 --data-dir on a disk to measure durable appends"
            );
        }
        Ok(BenchDir { dir, filesystem })
    }

    /// The directory's path.
    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A fresh subdirectory for one log.
    pub(crate) fn log_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Removes the log directory `name` and flushes the file system (`syncfs`), so that
    /// the next scenario does not pay for this one's writes and deletions: freeing hundreds
    /// of MB leaves the disk busy with metadata for seconds, and the syncs of whatever runs
    /// meanwhile wait behind it.
    pub(crate) fn remove_log_dir(&self, name: &str) -> std::io::Result<()> {
        std::fs::remove_dir_all(self.log_dir(name))?;
        let dir = std::fs::File::open(self.path())?;
        rustix::fs::syncfs(&dir)?;
        Ok(())
    }

    /// The file system type, for the report.
    pub(crate) fn filesystem(&self) -> Option<&str> {
        self.filesystem.as_deref()
    }
}

/// The file system type of the mount holding `path`, from `/proc/self/mounts` (Linux only).
fn filesystem_of(path: &Path) -> Option<String> {
    let path = path.canonicalize().ok()?;
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let _device = fields.next()?;
            let mount_point = unescape_mount_point(fields.next()?);
            let kind = fields.next()?;
            path.starts_with(&mount_point)
                .then(|| (mount_point.as_os_str().len(), kind.to_owned()))
        })
        // The deepest mount point holding the path is the one it lives on; the last one
        // listed wins among equals, as the most recent mount hides earlier ones.
        .max_by_key(|(len, _)| *len)
        .map(|(_, kind)| kind)
}

/// Decodes the octal escapes (`\040` for a space) of a mount point in `/proc/self/mounts`.
fn unescape_mount_point(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escape = bytes.get(i + 1..i + 4).filter(|_| bytes[i] == b'\\');
        match escape
            .and_then(|digits| u8::from_str_radix(std::str::from_utf8(digits).ok()?, 8).ok())
        {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    PathBuf::from(String::from_utf8_lossy(&out).into_owned())
}

/// Makes the benchmark's events: JSON payloads padded so that each structured event is about
/// `event_bytes` long.
#[derive(Debug, Clone)]
pub(crate) struct EventMaker {
    padding: Arc<str>,
}

impl EventMaker {
    /// A maker of events of about `event_bytes` bytes of structured JSON.
    pub(crate) fn new(event_bytes: usize) -> EventMaker {
        let bare = Self::build("", 0).to_json().len();
        let padding = "x".repeat(event_bytes.saturating_sub(bare));
        EventMaker {
            padding: padding.into(),
        }
    }

    /// The `seq`-th event.
    pub(crate) fn event(&self, seq: u64) -> Event {
        Self::build(&self.padding, seq)
    }

    /// An event whose payload carries `seq` and `padding`.
    fn build(padding: &str, seq: u64) -> Event {
        // A fixed-width sequence number keeps every event the same size.
        Event::new("/herald/bench", "BenchEvent")
            .with_data(serde_json::json!({ "seq": format!("{seq:020}"), "padding": padding }))
    }
}

/// A latency histogram in microseconds, from 1 µs to 10 minutes, 3 significant digits.
pub(crate) fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("the histogram bounds are valid")
}

/// Records `elapsed` in `histogram`, in microseconds, clamped to its range.
pub(crate) fn record(histogram: &mut Histogram<u64>, elapsed: Duration) {
    let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
    histogram.saturating_record(micros.max(1));
}

/// Progress of one phase, shown on stderr while it runs: a bar on a terminal, otherwise a
/// line every few seconds.
pub(crate) struct Progress {
    ticker: tokio::task::JoinHandle<()>,
    bar: Option<ProgressBar>,
}

/// What a phase's progress is measured against.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Goal {
    /// A number of events.
    Events(u64),
    /// A length of time.
    Duration(Duration),
}

impl Progress {
    /// How often the plain progress line is printed when stderr is not a terminal.
    const LINE_INTERVAL: Duration = Duration::from_secs(5);

    /// Starts showing the progress of `phase`, whose tasks add the events they complete
    /// to `done`.
    pub(crate) fn start(phase: &str, goal: Goal, done: Arc<AtomicU64>) -> Progress {
        let started = Instant::now();
        let bar = std::io::stderr().is_terminal().then(|| {
            let (len, template) = match goal {
                Goal::Events(events) => {
                    (events, "{prefix:>16} {wide_bar} {pos}/{len} events {msg}")
                }
                Goal::Duration(duration) => (
                    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
                    "{prefix:>16} {wide_bar} {elapsed} {msg}",
                ),
            };
            let bar = ProgressBar::new(len).with_prefix(phase.to_owned());
            bar.set_style(
                ProgressStyle::with_template(template).expect("the progress template is valid"),
            );
            bar
        });
        if bar.is_none() {
            eprintln!("{phase}: running");
        }
        let ticker = {
            let bar = bar.clone();
            let phase = phase.to_owned();
            tokio::spawn(async move {
                let period = if bar.is_some() {
                    Duration::from_millis(200)
                } else {
                    Self::LINE_INTERVAL
                };
                let mut interval = tokio::time::interval(period);
                interval.tick().await;
                loop {
                    interval.tick().await;
                    let events = done.load(Ordering::Relaxed);
                    let elapsed = started.elapsed();
                    let rate = events as f64 / elapsed.as_secs_f64().max(1e-9);
                    match &bar {
                        Some(bar) => {
                            match goal {
                                Goal::Events(_) => bar.set_position(events),
                                Goal::Duration(_) => bar.set_position(
                                    u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
                                ),
                            }
                            bar.set_message(format!("{events} events, {rate:.0}/s"));
                        }
                        None => eprintln!(
                            "{phase}: {events} events in {:.0} s, {rate:.0}/s",
                            elapsed.as_secs_f64()
                        ),
                    }
                }
            })
        };
        Progress { ticker, bar }
    }

    /// Stops showing the progress.
    pub(crate) fn finish(self) {
        self.ticker.abort();
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Rounds `value` to 3 decimals for the report: more digits would be noise.
pub(crate) fn round3(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

/// Checks a `--duration-secs`-like option.
pub(crate) fn positive_secs(name: &str, secs: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(secs)
        .ok()
        .filter(|duration| !duration.is_zero())
        .with_context(|| format!("{name} must be a positive number of seconds, not {secs}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_have_about_the_requested_size() {
        let maker = EventMaker::new(500);
        assert_eq!(maker.event(0).to_json().len(), 500);
        assert_eq!(maker.event(u64::MAX).to_json().len(), 500);
    }

    #[test]
    fn mount_points_are_unescaped() {
        assert_eq!(
            unescape_mount_point("/mnt/my\\040disk"),
            PathBuf::from("/mnt/my disk")
        );
        assert_eq!(unescape_mount_point("/"), PathBuf::from("/"));
    }

    #[test]
    fn the_root_file_system_is_found() {
        if Path::new("/proc/self/mounts").exists() {
            assert!(filesystem_of(Path::new("/")).is_some());
        }
    }
}
