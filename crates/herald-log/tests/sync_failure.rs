//! A failed write or `fdatasync` stops the log: the callers waiting on it get the error,
//! nothing after it is acknowledged, and reopening recovers exactly what was synced.

mod common;

use std::path::Path;
use std::sync::Arc;

use herald_core::store::Error;
use herald_core::{EventStore, ExpectedVersion, StreamName};
use herald_log::io::Io;
use herald_log::io::sim::SimIo;

async fn fails_and_recovers(inject: impl FnOnce(&SimIo)) {
    let dir = Path::new("/sim/data");
    let sim = SimIo::new();
    let io: Arc<dyn Io> = Arc::new(sim.clone());
    let log = common::open(&io, dir);
    let stream = StreamName::new("orders").unwrap();
    for n in 0..10 {
        log.append(&stream, ExpectedVersion::Any, vec![common::event(n)])
            .await
            .unwrap();
    }

    inject(&sim);
    // Many concurrent appends: the first group fails, and nothing after it succeeds.
    let tasks: Vec<_> = (10..40)
        .map(|n| {
            let log = log.clone();
            let stream = stream.clone();
            tokio::spawn(async move {
                log.append(&stream, ExpectedVersion::Any, vec![common::event(n)])
                    .await
            })
        })
        .collect();
    for task in tasks {
        let result = task.await.unwrap();
        assert!(
            matches!(result, Err(Error::Failed(_))),
            "no append is acknowledged after the failure: {result:?}"
        );
    }
    let later = log
        .append(&stream, ExpectedVersion::Any, vec![common::event(99)])
        .await;
    assert!(matches!(later, Err(Error::Failed(_))), "{later:?}");
    assert!(
        later.unwrap_err().to_string().contains("reopen"),
        "the error says what to do"
    );
    // Readers never saw the failed group.
    assert_eq!(common::read_everything(&log).await.len(), 10);
    log.close().await.unwrap();

    let log = common::open(&io, dir);
    let all = common::read_everything(&log).await;
    let ids: Vec<&str> = all.iter().map(|event| event.event.id.as_str()).collect();
    let expected: Vec<String> = (0..10).map(|n| common::event(n).id).collect();
    assert_eq!(ids, expected, "exactly the synced events survive");
    // The reopened log works again.
    log.append(&stream, ExpectedVersion::Any, vec![common::event(100)])
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_sync_stops_acknowledgements() {
    fails_and_recovers(|sim| sim.fail_sync_in(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_stops_acknowledgements() {
    fails_and_recovers(|sim| sim.fail_write_in(1)).await;
}
