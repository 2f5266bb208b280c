//! Raw-disk baselines: what the directory's disk does with no log in the way.

use std::fs::{File, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::path::Path;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use super::{latency_histogram, record, round3};

/// The size of one write of the `fdatasync` loop.
const SYNC_WRITE_BYTES: usize = 512;
/// The size of one write of the sequential bandwidth measurement.
const SEQUENTIAL_WRITE_BYTES: usize = 1 << 20;
/// The most the sequential measurement writes, so a fast disk does not fill up.
const SEQUENTIAL_BYTES_MAX: u64 = 2 << 30;
/// The size of one read of the raw read baseline.
const READ_BUFFER_BYTES: usize = 1 << 20;

/// The figures of the write baselines.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct WriteBaseline {
    /// `write` + `fdatasync` round trips of 512 bytes per second, on one file.
    pub(crate) fsync_per_sec: f64,
    /// The median latency of one such round trip, in microseconds.
    pub(crate) fsync_p50_us: u64,
    /// Sequential 1 MiB writes, each followed by `fdatasync`, in MB (10^6 bytes) per second.
    pub(crate) mb_per_sec: f64,
}

/// Measures both write baselines in `dir`, each for about `duration`. Blocking.
pub(crate) fn measure_writes(dir: &Path, duration: Duration) -> io::Result<WriteBaseline> {
    let (fsync_per_sec, fsync_p50_us) = sync_loop(&dir.join("baseline-fsync"), duration)?;
    let mb_per_sec = sequential_writes(&dir.join("baseline-sequential"), duration)?;
    Ok(WriteBaseline {
        fsync_per_sec,
        fsync_p50_us,
        mb_per_sec,
    })
}

/// Appends 512 bytes and `fdatasync`s, in a loop; returns syncs per second and p50 in µs.
fn sync_loop(path: &Path, duration: Duration) -> io::Result<(f64, u64)> {
    let mut file = create(path)?;
    let block = [0xA5u8; SYNC_WRITE_BYTES];
    let mut histogram = latency_histogram();
    let started = Instant::now();
    let mut syncs = 0u64;
    while started.elapsed() < duration {
        let began = Instant::now();
        file.write_all(&block)?;
        file.sync_data()?;
        record(&mut histogram, began.elapsed());
        syncs += 1;
    }
    let seconds = started.elapsed().as_secs_f64();
    drop(file);
    std::fs::remove_file(path)?;
    Ok((syncs as f64 / seconds, histogram.value_at_quantile(0.5)))
}

/// The latency floor of a durable append at `rate` events per second on this disk: a
/// group commit with nothing but the disk in the way. Events of `event_bytes` "arrive" on
/// schedule (the `k`-th at `k / rate` seconds); one thread writes every event that has
/// arrived in one `write`, `fdatasync`s, and records for each of them the time from its
/// arrival to the end of that sync; then it starts again with the events that arrived
/// meanwhile (sleeping until the next one is due when none has). No real writer can
/// acknowledge sooner, since it has more to do between syncs; a stall of the disk shows up
/// here just as it does in the log. Runs until `events` events are synced; returns their
/// latencies. Blocking.
pub(crate) fn group_commit_floor(
    path: &Path,
    rate: f64,
    event_bytes: usize,
    events: u64,
) -> io::Result<Histogram<u64>> {
    let mut file = create(path)?;
    let mut histogram = latency_histogram();
    let rate = rate.max(1e-3);
    let arrival = |k: u64| Duration::from_secs_f64(k as f64 / rate);
    let mut block = Vec::new();
    let started = Instant::now();
    let mut next = 0u64;
    while next < events {
        let elapsed = started.elapsed();
        let due = arrival(next);
        if due > elapsed {
            std::thread::sleep(due - elapsed);
            continue;
        }
        // Every event due by now: `k / rate <= elapsed`.
        let arrived = ((elapsed.as_secs_f64() * rate) as u64 + 1).clamp(next + 1, events);
        block.resize((arrived - next) as usize * event_bytes, 0xA5);
        file.write_all(&block)?;
        file.sync_data()?;
        let synced = started.elapsed();
        for k in next..arrived {
            record(&mut histogram, synced.saturating_sub(arrival(k)));
        }
        next = arrived;
    }
    drop(file);
    std::fs::remove_file(path)?;
    Ok(histogram)
}

/// Writes 1 MiB blocks sequentially, `fdatasync` after each; returns MB per second.
fn sequential_writes(path: &Path, duration: Duration) -> io::Result<f64> {
    let mut file = create(path)?;
    // Not all zeroes, so no layer below can take a shortcut.
    let block: Vec<u8> = (0..SEQUENTIAL_WRITE_BYTES)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let started = Instant::now();
    let mut written = 0u64;
    while started.elapsed() < duration && written < SEQUENTIAL_BYTES_MAX {
        file.write_all(&block)?;
        file.sync_data()?;
        written += block.len() as u64;
    }
    let seconds = started.elapsed().as_secs_f64();
    drop(file);
    std::fs::remove_file(path)?;
    Ok(written as f64 / seconds / 1e6)
}

/// Creates (or truncates) a file for writing.
fn create(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)
}

/// The figures of the raw read baseline.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct ReadBaseline {
    /// The bytes read: every file under the directory.
    pub(crate) bytes: u64,
    /// How long that took, in seconds.
    pub(crate) seconds: f64,
    /// Sequential 1 MiB reads, in MB (10^6 bytes) per second.
    pub(crate) mb_per_sec: f64,
}

/// Reads every file under `dir` sequentially in 1 MiB reads. Blocking.
pub(crate) fn measure_reads(dir: &Path) -> io::Result<ReadBaseline> {
    let mut files = Vec::new();
    collect_files(dir, &mut files)?;
    files.sort();
    let mut buffer = vec![0u8; READ_BUFFER_BYTES];
    let started = Instant::now();
    let mut bytes = 0u64;
    for path in files {
        let mut file = File::open(&path)?;
        loop {
            let read = file.read(&mut buffer)?;
            if read == 0 {
                break;
            }
            bytes += read as u64;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(ReadBaseline {
        bytes,
        seconds: round3(seconds),
        mb_per_sec: round3(bytes as f64 / seconds.max(1e-9) / 1e6),
    })
}

/// The size of every file under `dir`, added up.
pub(crate) fn size_of(dir: &Path) -> io::Result<u64> {
    let mut files = Vec::new();
    collect_files(dir, &mut files)?;
    files
        .iter()
        .map(|path| std::fs::metadata(path).map(|metadata| metadata.len()))
        .sum()
}

/// Adds every regular file under `dir` to `files`, recursively.
fn collect_files(dir: &Path, files: &mut Vec<std::path::PathBuf>) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            collect_files(&entry.path(), files)?;
        } else if kind.is_file() {
            files.push(entry.path());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn baselines_measure_something_and_clean_up() {
        let dir = tempfile::tempdir().unwrap();
        let writes = measure_writes(dir.path(), Duration::from_millis(50)).unwrap();
        assert!(writes.fsync_per_sec > 0.0 && writes.mb_per_sec > 0.0);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

        let floor = group_commit_floor(&dir.path().join("floor"), 2_000.0, 500, 200).unwrap();
        assert_eq!(floor.len(), 200);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/a"), [1u8; 3000]).unwrap();
        std::fs::write(dir.path().join("b"), [2u8; 10]).unwrap();
        assert_eq!(measure_reads(dir.path()).unwrap().bytes, 3010);
        assert_eq!(size_of(dir.path()).unwrap(), 3010);
    }
}
