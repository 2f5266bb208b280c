//! Dead-letter stores: one behaviour suite run against the in-memory store and against
//! [`EventStoreDeadLetters`] on a real embedded log, then what only the durable store does
//! (its stream layout, replay requests, surviving a reopen).

use std::path::Path;
use std::sync::Arc;

use chrono::{DateTime, TimeZone, Utc};
use herald_core::broker::{GroupName, TopicName};
use herald_core::{Direction, Event, EventStore, RecordedEvent, Version};
use herald_log::{Durability, Log, Options};
use herald_runtime::dead_letter_store::{
    DISCARDED_EVENT_TYPE, DeadLetterStatus, EVENT_SOURCE, Lookup, REPLAY_REQUESTED_EVENT_TYPE,
    REPLAYED_EVENT_TYPE, ReplayRequest, STORED_EVENT_TYPE,
};
use herald_runtime::{
    DeadLetter, DeadLetterStore, ErrorKind, EventStoreDeadLetters, InMemoryDeadLetterStore,
};

fn group(name: &str) -> GroupName {
    GroupName::new(name).unwrap()
}

fn at(second: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 23, 12, 0, second).unwrap()
}

/// A complete record of the event `id` dead-lettered by `group`.
fn dead_letter(group_name: &str, id: &str, reason: &str) -> DeadLetter {
    DeadLetter {
        event: Event::new("/orders", "OrderPlaced")
            .with_id(id)
            .with_subject("order-7")
            .with_correlation_id("order-7")
            .with_data(serde_json::json!({ "order_id": "order-7", "total_cents": 1250 })),
        reason: reason.to_owned(),
        error_kind: ErrorKind::Transient,
        attempts: 5,
        handler: "OrderPlaced".to_owned(),
        group: group(group_name),
        topic: TopicName::new("orders").unwrap(),
        partition: 3,
        offset: 42,
        first_failure_at: at(1),
        last_failure_at: at(9),
    }
}

fn ids(records: &[DeadLetter]) -> Vec<&str> {
    records
        .iter()
        .map(|record| record.event.id.as_str())
        .collect()
}

/// The behaviour every [`DeadLetterStore`] shares, per the trait's contract.
async fn behaves_as_a_dead_letter_store(store: &dyn DeadLetterStore) {
    let billing = group("billing");
    let shipping = group("shipping");

    // Empty at first.
    assert!(store.list(&billing, None, 10).await.unwrap().is_empty());
    assert_eq!(store.get(&billing, "evt-b").await.unwrap(), None);

    // A record comes back complete, and only in its own group.
    let record = dead_letter("billing", "evt-b", "card declined");
    store.put(record.clone()).await.unwrap();
    assert_eq!(store.get(&billing, "evt-b").await.unwrap(), Some(record));
    assert_eq!(store.get(&shipping, "evt-b").await.unwrap(), None);
    store
        .put(dead_letter("shipping", "evt-s", "no address"))
        .await
        .unwrap();

    // Ascending id order whatever the order of puts, paged by `after` and `count_max`.
    for id in ["evt-d", "evt-a", "evt-c"] {
        store
            .put(dead_letter("billing", id, "card declined"))
            .await
            .unwrap();
    }
    let all = store.list(&billing, None, 10).await.unwrap();
    assert_eq!(ids(&all), ["evt-a", "evt-b", "evt-c", "evt-d"]);
    let first = store.list(&billing, None, 2).await.unwrap();
    assert_eq!(ids(&first), ["evt-a", "evt-b"]);
    let second = store.list(&billing, Some("evt-b"), 2).await.unwrap();
    assert_eq!(ids(&second), ["evt-c", "evt-d"]);
    assert!(
        store
            .list(&billing, Some("evt-d"), 2)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        ids(&store.list(&shipping, None, 10).await.unwrap()),
        ["evt-s"]
    );

    // A put of the same id replaces the record: one record, the latest.
    let replacement = DeadLetter {
        attempts: 1,
        error_kind: ErrorKind::Permanent,
        ..dead_letter("billing", "evt-c", "invalid data")
    };
    store.put(replacement.clone()).await.unwrap();
    assert_eq!(
        store.get(&billing, "evt-c").await.unwrap(),
        Some(replacement)
    );
    assert_eq!(store.list(&billing, None, 10).await.unwrap().len(), 4);

    // A discard returns the record once; a second one is harmless.
    let discarded = store.discard(&billing, "evt-a").await.unwrap();
    assert_eq!(ids(&discarded.into_iter().collect::<Vec<_>>()), ["evt-a"]);
    assert_eq!(store.discard(&billing, "evt-a").await.unwrap(), None);
    assert_eq!(store.get(&billing, "evt-a").await.unwrap(), None);
    assert_eq!(store.discard(&billing, "evt-unknown").await.unwrap(), None);
    assert_eq!(store.discard(&shipping, "evt-b").await.unwrap(), None);
    let left = store.list(&billing, None, 10).await.unwrap();
    assert_eq!(ids(&left), ["evt-b", "evt-c", "evt-d"]);

    // A record dead-lettered again after a discard is back.
    store
        .put(dead_letter("billing", "evt-a", "card declined"))
        .await
        .unwrap();
    assert!(store.get(&billing, "evt-a").await.unwrap().is_some());
}

/// Opens the log in `dir`; appends are acknowledged without a sync, which a test on one
/// machine does not need.
fn open_log(dir: &Path) -> Arc<Log> {
    let options = Options {
        durability: Durability::Os,
        ..Options::new(dir)
    };
    Arc::new(Log::open(options).unwrap())
}

fn on_log(log: &Arc<Log>) -> EventStoreDeadLetters {
    EventStoreDeadLetters::new(Arc::clone(log) as Arc<dyn EventStore>)
}

/// Every event of `group`'s stream.
async fn stream_events(log: &Log, group_name: &str) -> Vec<RecordedEvent> {
    let stream = EventStoreDeadLetters::stream(&group(group_name)).unwrap();
    log.read_stream(&stream, Version::START, Direction::Forward, 10_000)
        .await
        .unwrap()
}

fn types(events: &[RecordedEvent]) -> Vec<&str> {
    events.iter().map(|event| event.event.ty.as_str()).collect()
}

#[tokio::test]
async fn the_in_memory_store_behaves_as_a_dead_letter_store() {
    behaves_as_a_dead_letter_store(&InMemoryDeadLetterStore::new()).await;
}

#[tokio::test]
async fn the_event_store_behaves_as_a_dead_letter_store() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_log(dir.path());
    behaves_as_a_dead_letter_store(&on_log(&log)).await;
    log.close().await.unwrap();
}

#[tokio::test]
async fn dead_letters_survive_a_reopen_of_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let billing = group("billing");
    let log = open_log(dir.path());
    let store = on_log(&log);
    for id in ["evt-a", "evt-b", "evt-c"] {
        store
            .put(dead_letter("billing", id, "card declined"))
            .await
            .unwrap();
    }
    store.discard(&billing, "evt-a").await.unwrap();
    store.request_replay(&billing, "evt-b").await.unwrap();
    drop(store);
    log.close().await.unwrap();
    drop(log);

    let log = open_log(dir.path());
    let store = on_log(&log);
    let stored = store.list_stored(&billing, None, 10).await.unwrap();
    let summary: Vec<_> = stored
        .iter()
        .map(|stored| (stored.dead_letter.event.id.as_str(), stored.status))
        .collect();
    assert_eq!(
        summary,
        [
            ("evt-b", DeadLetterStatus::ReplayRequested),
            ("evt-c", DeadLetterStatus::Pending),
        ]
    );
    assert_eq!(
        stored[1].dead_letter,
        dead_letter("billing", "evt-c", "card declined")
    );
    log.close().await.unwrap();
}

#[tokio::test]
async fn a_group_stream_holds_the_full_record_and_one_marker_per_change() {
    let dir = tempfile::tempdir().unwrap();
    let billing = group("billing");
    let log = open_log(dir.path());
    let store = on_log(&log);
    let record = dead_letter("billing", "evt-a", "card declined");
    store.put(record.clone()).await.unwrap();
    store
        .put(dead_letter("billing", "evt-b", "card declined"))
        .await
        .unwrap();
    store.discard(&billing, "evt-a").await.unwrap();
    store.discard(&billing, "evt-a").await.unwrap();
    store.request_replay(&billing, "evt-b").await.unwrap();
    store.request_replay(&billing, "evt-b").await.unwrap();
    store.replayed(&billing, "evt-b").await.unwrap();
    store.replayed(&billing, "evt-b").await.unwrap();

    let events = stream_events(&log, "billing").await;
    assert_eq!(events[0].stream.as_str(), "$dlq:billing");
    assert_eq!(
        types(&events),
        [
            STORED_EVENT_TYPE,
            STORED_EVENT_TYPE,
            DISCARDED_EVENT_TYPE,
            REPLAY_REQUESTED_EVENT_TYPE,
            REPLAYED_EVENT_TYPE,
        ]
    );
    assert!(
        events
            .iter()
            .all(|event| event.event.source == EVENT_SOURCE)
    );

    // The stored event carries the original event as a structured CloudEvent, and every
    // field of the record.
    let data: serde_json::Value = events[0].event.data_as().unwrap().unwrap();
    assert_eq!(
        data,
        serde_json::json!({
            "event": serde_json::to_value(&record.event).unwrap(),
            "reason": "card declined",
            "error_kind": "transient",
            "attempts": 5,
            "handler": "OrderPlaced",
            "group": "billing",
            "topic": "orders",
            "partition": 3,
            "offset": 42,
            "first_failure_at": "2026-11-23T12:00:01Z",
            "last_failure_at": "2026-11-23T12:00:09Z",
        })
    );
    assert_eq!(data["event"]["data"]["total_cents"], 1250);
    assert_eq!(data["event"]["id"], "evt-a");
    assert!(store.list(&billing, None, 10).await.unwrap().is_empty());

    // The stream remembers how each id left, so a repeat can be told from a typo.
    assert_eq!(
        store.find(&billing, "evt-a").await.unwrap(),
        Lookup::Discarded
    );
    assert_eq!(
        store.find(&billing, "evt-b").await.unwrap(),
        Lookup::Replayed
    );
    assert_eq!(
        store.find(&billing, "evt-x").await.unwrap(),
        Lookup::Unknown
    );
    store.put(record.clone()).await.unwrap();
    assert!(matches!(
        store.find(&billing, "evt-a").await.unwrap(),
        Lookup::Stored(stored) if stored.dead_letter == record
    ));
    log.close().await.unwrap();
}

#[tokio::test]
async fn a_replay_is_requested_once_and_a_new_dead_letter_clears_the_request() {
    let dir = tempfile::tempdir().unwrap();
    let billing = group("billing");
    let log = open_log(dir.path());
    let store = on_log(&log);
    let record = dead_letter("billing", "evt-a", "card declined");
    store.put(record.clone()).await.unwrap();

    assert_eq!(
        store.request_replay(&billing, "evt-a").await.unwrap(),
        Some(ReplayRequest::Requested(record.clone()))
    );
    assert_eq!(
        store.request_replay(&billing, "evt-a").await.unwrap(),
        Some(ReplayRequest::AlreadyRequested(record.clone()))
    );
    let stored = store.get_stored(&billing, "evt-a").await.unwrap().unwrap();
    assert_eq!(stored.status, DeadLetterStatus::ReplayRequested);
    assert_eq!(store.request_replay(&billing, "evt-x").await.unwrap(), None);

    // The replay failed and the consumer dead-lettered the event again: pending again.
    store.put(record).await.unwrap();
    let stored = store.get_stored(&billing, "evt-a").await.unwrap().unwrap();
    assert_eq!(stored.status, DeadLetterStatus::Pending);
    log.close().await.unwrap();
}

#[tokio::test]
async fn a_fold_reads_a_stream_longer_than_one_page() {
    let dir = tempfile::tempdir().unwrap();
    let billing = group("billing");
    let log = open_log(dir.path());
    let store = on_log(&log);
    // More events than one read returns (512), with a discard at the very end.
    let count = 700;
    for index in 0..count {
        store
            .put(dead_letter("billing", &format!("evt-{index:04}"), "x"))
            .await
            .unwrap();
    }
    store.discard(&billing, "evt-0000").await.unwrap();
    let all = store.list(&billing, None, usize::MAX).await.unwrap();
    assert_eq!(all.len(), count - 1);
    assert_eq!(all[0].event.id, "evt-0001");
    assert_eq!(all[count - 2].event.id, format!("evt-{:04}", count - 1));
    log.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_discards_of_one_record_return_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let billing = group("billing");
    let log = open_log(dir.path());
    let store = Arc::new(on_log(&log));
    store
        .put(dead_letter("billing", "evt-a", "card declined"))
        .await
        .unwrap();
    let discards = (0..8).map(|_| {
        let store = Arc::clone(&store);
        let billing = billing.clone();
        tokio::spawn(async move { store.discard(&billing, "evt-a").await.unwrap() })
    });
    let mut returned = 0;
    for discard in discards.collect::<Vec<_>>() {
        returned += usize::from(discard.await.unwrap().is_some());
    }
    assert_eq!(returned, 1);
    let events = stream_events(&log, "billing").await;
    assert_eq!(types(&events), [STORED_EVENT_TYPE, DISCARDED_EVENT_TYPE]);
    log.close().await.unwrap();
}
