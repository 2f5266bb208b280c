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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_told_its_append_conflicts_reads_what_it_conflicted_with() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(herald_log::Options::new(dir.path())).unwrap();
    for round in 0..50 {
        let stream = StreamName::new(format!("race-{round}")).unwrap();
        let appends = (0..4).map(|n| {
            let log = log.clone();
            let stream = stream.clone();
            tokio::spawn(async move {
                let event = herald_core::Event::new("/test", "T").with_id(format!("{round}-{n}"));
                match log
                    .append(&stream, ExpectedVersion::NoStream, vec![event])
                    .await
                {
                    Ok(_) => true,
                    Err(herald_core::store::Error::WrongExpectedVersion { .. }) => {
                        let events = log
                            .read_stream(&stream, Version::START, Direction::Forward, 10)
                            .await
                            .expect("the stream it conflicted with is readable");
                        assert_eq!(events.len(), 1, "the winner's event is there");
                        false
                    }
                    Err(error) => panic!("unexpected error: {error}"),
                }
            })
        });
        let won = futures::future::join_all(appends)
            .await
            .into_iter()
            .filter(|won| *won.as_ref().unwrap())
            .count();
        assert_eq!(won, 1, "exactly one append creates the stream");
    }
    log.close().await.unwrap();
}
