//! Appends, reads and reopening on the real file system.

mod common;

use herald_core::{Direction, EventStore, ExpectedVersion, StreamName, Version};
use herald_log::{Log, OpenError};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_survive_reopen_across_segments_and_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let stream = StreamName::new("order-1").unwrap();
    let log = Log::open(common::options(dir.path())).unwrap();
    for n in 0..300 {
        let appended = log
            .append(&stream, ExpectedVersion::Any, vec![common::event(n)])
            .await
            .unwrap();
        assert_eq!(appended.events[0].version, Version(n as u64));
    }
    log.close().await.unwrap();
    let segments = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|entry| {
            entry
                .as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|ext| ext == "log")
        })
        .count();
    assert!(
        segments > 1,
        "the small segment size makes the log roll ({segments} segments)"
    );

    let log = Log::open(common::options(dir.path())).unwrap();
    let all = common::read_everything(&log).await;
    assert_eq!(all.len(), 300);
    for (n, recorded) in all.iter().enumerate() {
        assert_eq!(recorded.event, common::event(n));
        assert_eq!(recorded.position.0, n as u64);
    }
    let backward = log
        .read_stream(&stream, Version::END, Direction::Backward, 3)
        .await
        .unwrap();
    let versions: Vec<u64> = backward.iter().map(|event| event.version.0).collect();
    assert_eq!(versions, [299, 298, 297]);
    assert_eq!(
        log.stream_version(&stream).await.unwrap(),
        Some(Version(299))
    );
}

#[tokio::test]
async fn a_second_open_of_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _log = Log::open(common::options(dir.path())).unwrap();
    let second = Log::open(common::options(dir.path()));
    let error = second.err().expect("the directory is locked");
    assert!(matches!(error, OpenError::Locked { .. }), "{error}");
    assert!(error.to_string().contains("locked by another process"));
}
