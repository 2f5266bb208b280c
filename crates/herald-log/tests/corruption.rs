//! Damage on disk: a truncated or garbled tail is repaired by truncation, damage in the
//! middle of the log is reported with its file and offset and nothing is deleted, and a
//! damaged index checkpoint is rebuilt from the log.

mod common;

use std::path::{Path, PathBuf};

use herald_core::{EventStore, ExpectedVersion, StreamName};
use herald_log::{Log, OpenError, Options};

/// Writes `appends` appends of 1-3 events; returns the segment path and the file offset
/// where each append ends.
async fn write_log(dir: &Path, appends: usize) -> (PathBuf, Vec<u64>) {
    let mut options = Options::new(dir);
    options.index_checkpoint_interval_events = u64::MAX;
    let log = Log::open(options).unwrap();
    let stream = StreamName::new("s").unwrap();
    let mut n = 0;
    let segment = dir.join(format!("{:020}.log", 0));
    let mut ends = Vec::new();
    for append in 0..appends {
        let events = (0..1 + append % 3).map(|_| {
            n += 1;
            common::event(n)
        });
        log.append(&stream, ExpectedVersion::Any, events.collect())
            .await
            .unwrap();
        ends.push(std::fs::metadata(&segment).unwrap().len());
    }
    log.close().await.unwrap();
    // No checkpoint: recovery reads the records themselves.
    let _ = std::fs::remove_file(dir.join("index.ckpt"));
    (segment, ends)
}

async fn event_count(dir: &Path) -> Result<usize, OpenError> {
    let log = Log::open(Options::new(dir))?;
    let count = common::read_everything(&log).await.len();
    log.close().await.unwrap();
    Ok(count)
}

fn events_in_first(appends: usize) -> usize {
    (0..appends).map(|append| 1 + append % 3).sum()
}

#[tokio::test]
async fn a_truncated_tail_is_cut_back_to_the_last_whole_append() {
    let dir = tempfile::tempdir().unwrap();
    let (segment, ends) = write_log(dir.path(), 20).await;
    let full = std::fs::read(&segment).unwrap();
    // Cut at every byte of the last two appends.
    for cut in ends[17]..ends[19] {
        std::fs::write(&segment, &full[..cut as usize]).unwrap();
        let whole = ends.iter().filter(|&&end| end <= cut).count();
        assert_eq!(
            event_count(dir.path()).await.unwrap(),
            events_in_first(whole),
            "cut at {cut}"
        );
        assert_eq!(
            std::fs::metadata(&segment).unwrap().len(),
            ends[whole - 1],
            "truncated to a boundary"
        );
    }
}

#[tokio::test]
async fn a_flipped_byte_in_the_last_append_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let (segment, ends) = write_log(dir.path(), 20).await;
    let full = std::fs::read(&segment).unwrap();
    for at in (ends[18]..ends[19]).step_by(7) {
        let mut damaged = full.clone();
        damaged[at as usize] ^= 0x5A;
        std::fs::write(&segment, &damaged).unwrap();
        assert_eq!(
            event_count(dir.path()).await.unwrap(),
            events_in_first(19),
            "flip at {at}"
        );
        // Everything before the damaged append is intact, byte for byte.
        assert_eq!(std::fs::read(&segment).unwrap(), full[..ends[18] as usize]);
    }
}

#[tokio::test]
async fn damage_in_the_middle_is_reported_and_nothing_is_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let (segment, ends) = write_log(dir.path(), 20).await;
    let mut damaged = std::fs::read(&segment).unwrap();
    let at = ends[9] + 20; // inside the first record of the 11th append
    damaged[at as usize] ^= 0xFF;
    std::fs::write(&segment, &damaged).unwrap();
    match event_count(dir.path()).await {
        Err(OpenError::Corrupt {
            file,
            offset,
            reason,
        }) => {
            assert_eq!(file, segment);
            assert_eq!(offset, ends[9], "the damaged record's offset");
            assert!(reason.contains("checksum"), "{reason}");
        }
        other => panic!("expected a corruption report, got {other:?}"),
    }
    assert_eq!(
        std::fs::read(&segment).unwrap(),
        damaged,
        "nothing was truncated"
    );
}

#[tokio::test]
async fn damage_in_an_earlier_segment_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let mut options = common::options(dir.path());
    options.index_checkpoint_interval_events = u64::MAX;
    let log = Log::open(options.clone()).unwrap();
    let stream = StreamName::new("s").unwrap();
    for n in 0..600 {
        log.append(&stream, ExpectedVersion::Any, vec![common::event(n)])
            .await
            .unwrap();
    }
    log.close().await.unwrap();
    std::fs::remove_file(dir.path().join("index.ckpt")).unwrap();
    assert!(
        dir.path().join(format!("{:020}.log", 1)).exists()
            || std::fs::read_dir(dir.path()).unwrap().count() > 3
    );
    let first = dir.path().join(format!("{:020}.log", 0));
    let mut bytes = std::fs::read(&first).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1; // the tail of a segment that is not the last one
    std::fs::write(&first, &bytes).unwrap();
    let error = Log::open(options).err().expect("the open fails");
    assert!(
        matches!(&error, OpenError::Corrupt { file, .. } if *file == first),
        "{error}"
    );
}

#[tokio::test]
async fn a_damaged_checkpoint_is_rebuilt_from_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let stream = StreamName::new("s").unwrap();
    let log = Log::open(common::options(dir.path())).unwrap();
    for n in 0..120 {
        log.append(&stream, ExpectedVersion::Any, vec![common::event(n)])
            .await
            .unwrap();
    }
    log.close().await.unwrap();
    let checkpoint = dir.path().join("index.ckpt");
    let mut bytes = std::fs::read(&checkpoint).unwrap();
    bytes[20] ^= 0xFF;
    std::fs::write(&checkpoint, &bytes).unwrap();
    let log = Log::open(common::options(dir.path())).unwrap();
    assert_eq!(common::read_everything(&log).await.len(), 120);
    assert_eq!(
        log.stream_version(&stream).await.unwrap(),
        Some(herald_core::Version(119)),
        "the stream index is rebuilt"
    );
}
