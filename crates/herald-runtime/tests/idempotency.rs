//! The idempotency layer in the default stack, the consumer settling its duplicates, and
//! the idempotency stores: one behaviour suite run against the in-memory store and against
//! [`EventStoreIdempotency`] on a real embedded log, then what only the durable store does.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use common::{delivery, message};
use herald_core::broker::{GroupName, Publisher as _, Subscriber as _, TopicName};
use herald_core::memory::InMemoryStore;
use herald_core::memory_broker::InMemoryBroker;
use herald_core::store::{self, Appended, Subscription};
use herald_core::{
    Direction, Event, EventStore, ExpectedVersion, Position, RecordedEvent, StreamName, Version,
};
use herald_log::{Durability, Log, Options};
use herald_runtime::idempotency::{HANDLED_EVENT_TYPE, HandledRecord, Put, StoreError};
use herald_runtime::{
    ConsumerOptions, Delivery, EventStoreIdempotency, HandlerContext, HandlerError,
    IdempotencyStore, InMemoryDeadLetterStore, InMemoryIdempotencyStore, Outcome, Pipeline,
    PipelineOptions, RetryOptions, Router, UnknownType,
};
use rand::SeedableRng as _;
use rand::rngs::StdRng;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

const OPTIONS: PipelineOptions = PipelineOptions {
    timeout_ms: 1_000,
    retry: RetryOptions {
        attempts_max: 3,
        elapsed_max_ms: 60_000,
        delay_initial_ms: 100,
        delay_max_ms: 1_000,
    },
};

fn group(name: &str) -> GroupName {
    GroupName::new(name).unwrap()
}

#[derive(serde::Deserialize)]
struct Order {
    order_id: String,
}

/// What the handler does.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    /// Publishes two events and succeeds.
    Ship,
    /// Fails permanently.
    Poison,
    /// Fails transiently every time.
    Flaky,
}

/// A router whose `Order` handler counts its calls and behaves as told.
fn router(calls: &Arc<AtomicUsize>, behaviour: Behaviour) -> Router {
    let calls = Arc::clone(calls);
    Router::new()
        .on::<Order, _>("Order", move |order: Order, ctx: HandlerContext| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move {
                match behaviour {
                    Behaviour::Poison => return Err(HandlerError::permanent("poison")),
                    Behaviour::Flaky => return Err(HandlerError::transient("ledger locked")),
                    Behaviour::Ship => {}
                }
                ctx.publish(
                    Event::new("/test", "Shipped")
                        .with_partition_key(order.order_id.clone())
                        .with_data(serde_json::json!({ "order_id": order.order_id })),
                );
                ctx.publish(Event::new("/test", "Invoiced").with_partition_key(order.order_id));
                Ok(())
            }
        })
        .unknown_type(UnknownType::Skip)
}

fn pipeline(router: Router, store: &Arc<dyn IdempotencyStore>) -> Pipeline {
    OPTIONS.build_idempotent(
        router,
        Arc::clone(store),
        StdRng::seed_from_u64(7),
        common::clock(),
    )
}

fn order(id: &str) -> Event {
    Event::new("/orders", "Order")
        .with_id(id)
        .with_data(serde_json::json!({ "order_id": format!("order-{id}") }))
}

async fn run(pipeline: &Pipeline, delivery: Delivery) -> Outcome {
    pipeline.clone().oneshot(delivery).await.unwrap()
}

fn published(outcome: &Outcome) -> &[Event] {
    match outcome {
        Outcome::Handled { published } | Outcome::Duplicate { published } => published,
        other => panic!("no published events: {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// The layer.

#[tokio::test(start_paused = true)]
async fn a_duplicate_skips_the_handler_and_returns_the_events_recorded_for_it() {
    let store: Arc<dyn IdempotencyStore> = Arc::new(InMemoryIdempotencyStore::new());
    let calls = Arc::new(AtomicUsize::new(0));
    let pipeline = pipeline(router(&calls, Behaviour::Ship), &store);

    let first = run(&pipeline, delivery(order("evt-1"))).await;
    let Outcome::Handled { published: first } = first else {
        panic!("not handled: {first:?}");
    };
    assert_eq!(first.len(), 2);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // Recorded exactly: the same events, ids, extensions and data.
    let recorded = store
        .get(&group(common::GROUP), "evt-1")
        .await
        .unwrap()
        .expect("recorded");
    assert_eq!(recorded, first);

    // Delivered again (a redelivery after a crash): not handled, the same events back.
    let again = run(&pipeline, delivery(order("evt-1"))).await;
    assert_eq!(
        again,
        Outcome::Duplicate {
            published: first.clone()
        }
    );
    assert_eq!(again.as_str(), "duplicate");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the handler did not run again"
    );

    // Another event, and the same event in another group, are new.
    let other = run(&pipeline, delivery(order("evt-2"))).await;
    assert!(matches!(other, Outcome::Handled { .. }), "{other:?}");
    let elsewhere = Delivery::new(
        message(order("evt-1")),
        group("shipping"),
        CancellationToken::new(),
    );
    let elsewhere = run(&pipeline, elsewhere).await;
    assert!(
        matches!(elsewhere, Outcome::Handled { .. }),
        "{elsewhere:?}"
    );
    assert_ne!(published(&elsewhere), first, "the handler made new events");
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[test]
fn a_duplicate_is_counted_and_traced_as_duplicate() {
    let capture = common::spans();
    let recorder = common::TestRecorder::default();
    let calls = Arc::new(AtomicUsize::new(0));
    let store: Arc<dyn IdempotencyStore> = Arc::new(InMemoryIdempotencyStore::new());
    common::with_recorder(&recorder, async {
        let pipeline = pipeline(router(&calls, Behaviour::Ship), &store);
        run(&pipeline, delivery(order("evt-metered"))).await;
        run(&pipeline, delivery(order("evt-metered"))).await;
    });

    let counted = |outcome: &str| {
        recorder.counter(&format!(
            "herald_events_handled_total{{group={},outcome={outcome},type=Order}}",
            common::GROUP
        ))
    };
    assert_eq!((counted("handled"), counted("duplicate")), (1, 1));
    let outcomes: Vec<Option<String>> = capture
        .deliveries_of("evt-metered")
        .iter()
        .map(|span| span.fields.get("outcome").cloned())
        .collect();
    assert_eq!(
        outcomes,
        [Some("handled".to_owned()), Some("duplicate".to_owned())]
    );
}

#[tokio::test(start_paused = true)]
async fn outcomes_other_than_handled_are_not_recorded() {
    let memory = Arc::new(InMemoryIdempotencyStore::new());
    let store: Arc<dyn IdempotencyStore> = memory.clone();
    let calls = Arc::new(AtomicUsize::new(0));

    // Skipped: no handler for the type.
    let skipping = pipeline(router(&calls, Behaviour::Ship), &store);
    let unknown = Event::new("/orders", "Refund").with_id("evt-skip");
    assert_eq!(run(&skipping, delivery(unknown)).await, Outcome::Skipped);

    // Dead-lettered: a permanent failure.
    let poisoned = pipeline(router(&calls, Behaviour::Poison), &store);
    let outcome = run(&poisoned, delivery(order("evt-poison"))).await;
    assert!(matches!(outcome, Outcome::DeadLettered(_)), "{outcome:?}");

    // Abandoned: a transient failure while the consumer shuts down.
    let flaky = pipeline(router(&calls, Behaviour::Flaky), &store);
    let shutdown = CancellationToken::new();
    shutdown.cancel();
    let leaving = Delivery::new(
        message(order("evt-abandon")),
        group(common::GROUP),
        shutdown,
    );
    assert_eq!(run(&flaky, leaving).await, Outcome::Abandoned);

    assert!(memory.is_empty(), "nothing recorded");

    // So each of them runs again; a replayed dead letter is handled.
    let healthy = pipeline(router(&calls, Behaviour::Ship), &store);
    for id in ["evt-poison", "evt-abandon"] {
        let calls_before = calls.load(Ordering::SeqCst);
        let outcome = run(&healthy, delivery(order(id))).await;
        assert!(
            matches!(outcome, Outcome::Handled { .. }),
            "{id}: {outcome:?}"
        );
        assert_eq!(calls.load(Ordering::SeqCst), calls_before + 1, "{id}");
    }
    assert_eq!(memory.len(), 2);
}

/// A store that fails its lookups or its records on demand.
#[derive(Default)]
struct FailingStore {
    inner: InMemoryIdempotencyStore,
    fail_get: AtomicBool,
    fail_put: AtomicBool,
}

fn unavailable() -> StoreError {
    StoreError::Backend(Box::new(std::io::Error::other("store unavailable")))
}

#[async_trait]
impl IdempotencyStore for FailingStore {
    async fn get(
        &self,
        group: &GroupName,
        event_id: &str,
    ) -> Result<Option<Vec<Event>>, StoreError> {
        if self.fail_get.load(Ordering::SeqCst) {
            return Err(unavailable());
        }
        self.inner.get(group, event_id).await
    }

    async fn put(
        &self,
        group: &GroupName,
        event_id: &str,
        published: &[Event],
    ) -> Result<Put, StoreError> {
        if self.fail_put.load(Ordering::SeqCst) {
            return Err(unavailable());
        }
        self.inner.put(group, event_id, published).await
    }
}

#[tokio::test(start_paused = true)]
async fn a_store_failure_abandons_the_delivery_and_it_is_handled_once_the_store_is_back() {
    let failing = Arc::new(FailingStore::default());
    let store: Arc<dyn IdempotencyStore> = failing.clone();
    let calls = Arc::new(AtomicUsize::new(0));
    let pipeline = pipeline(router(&calls, Behaviour::Ship), &store);

    // The lookup fails: the handler does not run.
    failing.fail_get.store(true, Ordering::SeqCst);
    assert_eq!(
        run(&pipeline, delivery(order("evt-1"))).await,
        Outcome::Abandoned
    );
    assert_eq!(calls.load(Ordering::SeqCst), 0);

    // The record fails: the handler ran, but its events are not handed out.
    failing.fail_get.store(false, Ordering::SeqCst);
    failing.fail_put.store(true, Ordering::SeqCst);
    assert_eq!(
        run(&pipeline, delivery(order("evt-1"))).await,
        Outcome::Abandoned
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(failing.inner.is_empty());

    // Redelivered once the store is back: handled, recorded.
    failing.fail_put.store(false, Ordering::SeqCst);
    let outcome = run(&pipeline, delivery(order("evt-1"))).await;
    assert!(matches!(outcome, Outcome::Handled { .. }), "{outcome:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(failing.inner.len(), 1);
}

/// A store whose lookups never see a record, as when another member handles the same
/// event at the same moment and records it first.
struct RacingStore(InMemoryIdempotencyStore);

#[async_trait]
impl IdempotencyStore for RacingStore {
    async fn get(&self, _: &GroupName, _: &str) -> Result<Option<Vec<Event>>, StoreError> {
        Ok(None)
    }

    async fn put(
        &self,
        group: &GroupName,
        event_id: &str,
        published: &[Event],
    ) -> Result<Put, StoreError> {
        self.0.put(group, event_id, published).await
    }
}

#[tokio::test(start_paused = true)]
async fn a_delivery_that_loses_the_race_to_record_answers_the_winners_events() {
    let inner = InMemoryIdempotencyStore::new();
    let winners = vec![Event::new("/test", "Shipped").with_id("winner-1")];
    let put = inner.put(&group(common::GROUP), "evt-1", &winners).await;
    assert_eq!(put.unwrap(), Put::Stored);
    let store: Arc<dyn IdempotencyStore> = Arc::new(RacingStore(inner));
    let calls = Arc::new(AtomicUsize::new(0));
    let pipeline = pipeline(router(&calls, Behaviour::Ship), &store);

    let outcome = run(&pipeline, delivery(order("evt-1"))).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the handler ran");
    assert_eq!(outcome, Outcome::Duplicate { published: winners });
}

#[tokio::test(start_paused = true)]
async fn build_passes_every_delivery_through() {
    let calls = Arc::new(AtomicUsize::new(0));
    let pipeline = OPTIONS.build(
        router(&calls, Behaviour::Ship),
        StdRng::seed_from_u64(7),
        common::clock(),
    );
    for _ in 0..2 {
        let outcome = run(&pipeline, delivery(order("evt-1"))).await;
        assert!(matches!(outcome, Outcome::Handled { .. }), "{outcome:?}");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn the_consumer_publishes_a_duplicates_recorded_events_and_acks_it() {
    // One partition, so that the group's messages come in one order.
    let broker = InMemoryBroker::new(1);
    let input = TopicName::new("orders").unwrap();
    let output = TopicName::new("shipments").unwrap();
    let billing = group(common::GROUP);
    let mut reader = broker.subscribe(&output, &group("audit")).await.unwrap();
    broker
        .publish(&input, vec![order("evt-seen"), order("evt-new")])
        .await
        .unwrap();
    // evt-seen was handled before a crash that lost its ack, and maybe its publish.
    let memory = Arc::new(InMemoryIdempotencyStore::new());
    let recorded = vec![
        Event::new("/test", "Shipped")
            .with_id("shipped-seen")
            .with_partition_key("order-evt-seen"),
    ];
    memory.put(&billing, "evt-seen", &recorded).await.unwrap();
    let store: Arc<dyn IdempotencyStore> = memory.clone();
    let calls = Arc::new(AtomicUsize::new(0));
    let consumer = ConsumerOptions {
        publish_topic: Some(output.as_str().to_owned()),
        ..ConsumerOptions::default()
    }
    .build(
        Arc::new(broker.clone()),
        Arc::new(broker.clone()),
        Arc::new(InMemoryDeadLetterStore::new()),
        input.clone(),
        billing.clone(),
        pipeline(router(&calls, Behaviour::Ship), &store),
    )
    .unwrap();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(consumer.run(shutdown.clone()));

    // One recorded event for evt-seen, two new ones for evt-new.
    let mut seen = Vec::new();
    let reading = async {
        for _ in 0..3 {
            seen.push(reader.recv().await.unwrap().unwrap().event);
        }
    };
    // A hang guard, not a synchronisation: under paused time it fails at once if the
    // consumer publishes fewer events.
    tokio::time::timeout(Duration::from_secs(3_600), reading)
        .await
        .expect("three events published");
    shutdown.cancel();
    let report = running.await.unwrap().unwrap();

    assert_eq!((report.handled, report.duplicates), (1, 1));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let replayed: Vec<&Event> = seen.iter().filter(|e| e.id == "shipped-seen").collect();
    assert_eq!(replayed, [&recorded[0]], "published as recorded");
    let caused: Vec<Option<&str>> = seen
        .iter()
        .filter(|e| e.id != "shipped-seen")
        .map(|e| e.causation_id())
        .collect();
    assert_eq!(caused, [Some("evt-new"), Some("evt-new")]);
    assert_eq!(memory.len(), 2);

    // Both were acked: the group's next message is a new one.
    broker
        .publish(&input, vec![order("evt-last")])
        .await
        .unwrap();
    let mut member = broker.subscribe(&input, &billing).await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(3_600), member.recv())
        .await
        .expect("a message")
        .unwrap()
        .unwrap();
    assert_eq!(next.event.id, "evt-last");
    member.close().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// The stores.

/// Event ids that are not stream names, ids with `:`, and groups too long for a plain name.
fn awkward_keys() -> Vec<(GroupName, String)> {
    let billing = group("billing");
    let long_group = group(&"g".repeat(256));
    vec![
        (billing.clone(), "evt-1".to_owned()),
        (billing.clone(), "has space".to_owned()),
        (billing.clone(), "a/b/../c".to_owned()),
        (billing.clone(), "été 🎉 注文".to_owned()),
        (billing.clone(), "x".repeat(300)),
        (billing.clone(), "@evt-1".to_owned()),
        (billing.clone(), String::new()),
        (long_group.clone(), "evt-1".to_owned()),
        (long_group, "has space".to_owned()),
        // `$handled:a:b:c`: a group name has no `:`, so this is group `a`'s key `b:c` only.
        (group("a"), "b:c".to_owned()),
    ]
}

/// Two events with exact data that must read back byte for byte.
fn outputs(tag: &str) -> Vec<Event> {
    let exact = format!(r#"{{"tag": "{tag}", "big": 123456789012345678901234567890, "x": 1.50}}"#);
    let json = format!(
        r#"{{"specversion":"1.0","id":"{tag}-json","source":"/test","type":"Shipped","causationid":"{tag}","data":{exact}}}"#
    );
    vec![
        Event::from_json(json.as_bytes()).unwrap(),
        Event::new("/test", "Blob")
            .with_id(format!("{tag}-blob"))
            .with_binary_data("application/octet-stream", vec![0, 159, 255]),
    ]
}

/// The behaviour every [`IdempotencyStore`] shares, per the trait's contract.
async fn behaves_as_an_idempotency_store(store: Arc<dyn IdempotencyStore>) {
    let keys = awkward_keys();
    for (index, (group, id)) in keys.iter().enumerate() {
        assert_eq!(store.get(group, id).await.unwrap(), None, "{group} {id:?}");
        let events = outputs(&format!("k{index}"));
        let put = store.put(group, id, &events).await.unwrap();
        assert_eq!(put, Put::Stored, "{group} {id:?}");
    }
    for (index, (group, id)) in keys.iter().enumerate() {
        let events = outputs(&format!("k{index}"));
        assert_eq!(
            store.get(group, id).await.unwrap(),
            Some(events.clone()),
            "{group} {id:?} reads back its own record"
        );
        // A second put keeps the first record.
        let later = outputs("later");
        let put = store.put(group, id, &later).await.unwrap();
        assert_eq!(
            put,
            Put::Kept {
                published: events.clone()
            },
            "{group} {id:?}"
        );
        assert_eq!(store.get(group, id).await.unwrap(), Some(events));
    }
    // An empty record is a record.
    store
        .put(&group("billing"), "evt-quiet", &[])
        .await
        .unwrap();
    assert_eq!(
        store.get(&group("billing"), "evt-quiet").await.unwrap(),
        Some(Vec::new())
    );

    // Concurrent puts of one key: one stores, every other keeps its events.
    let racers: Vec<_> = (0..8)
        .map(|racer| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let events = outputs(&format!("racer{racer}"));
                let put = store
                    .put(&group("billing"), "evt-raced", &events)
                    .await
                    .unwrap();
                (events, put)
            })
        })
        .collect();
    let mut winners = Vec::new();
    let mut kept = Vec::new();
    for racer in racers {
        match racer.await.unwrap() {
            (events, Put::Stored) => winners.push(events),
            (_, Put::Kept { published }) => kept.push(published),
            (_, other) => panic!("unexpected put: {other:?}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one put stored the record");
    let winner = winners.pop().unwrap();
    assert_eq!(kept.len(), 7);
    assert!(
        kept.iter().all(|events| *events == winner),
        "all kept the first"
    );
    assert_eq!(
        store.get(&group("billing"), "evt-raced").await.unwrap(),
        Some(winner)
    );
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

fn on_log(log: &Arc<Log>) -> Arc<dyn IdempotencyStore> {
    Arc::new(EventStoreIdempotency::new(
        Arc::clone(log) as Arc<dyn EventStore>
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_memory_store_behaves_as_an_idempotency_store() {
    behaves_as_an_idempotency_store(Arc::new(InMemoryIdempotencyStore::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_store_behaves_as_an_idempotency_store() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_log(dir.path());
    behaves_as_an_idempotency_store(on_log(&log)).await;
    log.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_puts_on_a_synced_log_agree_on_the_first_record() {
    // With every append synced, a losing append is rejected while the winning one waits
    // for its sync, unreadable yet: the loser must still answer the winner's events.
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(Log::open(Options::new(dir.path())).unwrap());
    let store = on_log(&log);
    let billing = group("billing");
    for key in 0..20 {
        let id = format!("evt-{key}");
        let racers: Vec<_> = (0..4)
            .map(|racer| {
                let store = Arc::clone(&store);
                let billing = billing.clone();
                let id = id.clone();
                tokio::spawn(async move {
                    let events = outputs(&format!("{id}-racer{racer}"));
                    let put = store.put(&billing, &id, &events).await.unwrap();
                    (events, put)
                })
            })
            .collect();
        let mut stored = Vec::new();
        let mut kept = Vec::new();
        for racer in racers {
            match racer.await.unwrap() {
                (events, Put::Stored) => stored.push(events),
                (_, Put::Kept { published }) => kept.push(published),
                (_, other) => panic!("unexpected put: {other:?}"),
            }
        }
        assert_eq!(stored.len(), 1, "{id}: one put stored the record");
        assert!(kept.iter().all(|events| *events == stored[0]), "{id}");
        assert_eq!(
            store.get(&billing, &id).await.unwrap().as_ref(),
            Some(&stored[0])
        );
    }
    log.close().await.unwrap();
}

/// An event store whose reads lag behind its appends, as a store that rejects a
/// conflicting append before the append it conflicts with is readable: until released,
/// `read_stream` shows nothing and subscriptions deliver nothing.
struct Lagging {
    inner: InMemoryStore,
    released: tokio::sync::watch::Sender<bool>,
    subscriptions: tokio::sync::watch::Sender<usize>,
}

#[async_trait]
impl EventStore for Lagging {
    async fn append(
        &self,
        stream: &StreamName,
        expected: ExpectedVersion,
        events: Vec<Event>,
    ) -> Result<Appended, store::Error> {
        self.inner.append(stream, expected, events).await
    }

    async fn read_stream(
        &self,
        stream: &StreamName,
        from: Version,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, store::Error> {
        if !*self.released.borrow() {
            return Err(store::Error::StreamNotFound {
                stream: stream.clone(),
            });
        }
        self.inner.read_stream(stream, from, direction, limit).await
    }

    async fn read_all(
        &self,
        from: Position,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, store::Error> {
        self.inner.read_all(from, direction, limit).await
    }

    async fn stream_version(&self, stream: &StreamName) -> Result<Option<Version>, store::Error> {
        self.inner.stream_version(stream).await
    }

    async fn head(&self) -> Result<Option<Position>, store::Error> {
        self.inner.head().await
    }

    async fn subscribe_all(&self, from: Position) -> Result<Subscription, store::Error> {
        self.inner.subscribe_all(from).await
    }

    async fn subscribe_stream(
        &self,
        stream: &StreamName,
        from: Version,
    ) -> Result<Subscription, store::Error> {
        self.subscriptions.send_modify(|count| *count += 1);
        let mut released = self.released.subscribe();
        released.wait_for(|released| *released).await.unwrap();
        self.inner.subscribe_stream(stream, from).await
    }

    async fn delete_stream(
        &self,
        stream: &StreamName,
        expected: ExpectedVersion,
    ) -> Result<(), store::Error> {
        self.inner.delete_stream(stream, expected).await
    }
}

#[tokio::test]
async fn a_losing_put_waits_for_the_winning_record_to_become_readable() {
    let lagging = Arc::new(Lagging {
        inner: InMemoryStore::new(),
        released: tokio::sync::watch::Sender::new(false),
        subscriptions: tokio::sync::watch::Sender::new(0),
    });
    let store: Arc<dyn IdempotencyStore> = Arc::new(EventStoreIdempotency::new(
        Arc::clone(&lagging) as Arc<dyn EventStore>,
    ));
    let billing = group("billing");
    let winners = outputs("winner");
    let put = store.put(&billing, "evt-1", &winners).await.unwrap();
    assert_eq!(put, Put::Stored);

    // The loser's append is rejected, and the winner's record is not readable yet.
    let mut loser = tokio::spawn({
        let store = Arc::clone(&store);
        let billing = billing.clone();
        async move { store.put(&billing, "evt-1", &outputs("loser")).await }
    });
    let mut subscriptions = lagging.subscriptions.subscribe();
    tokio::select! {
        waiting = subscriptions.wait_for(|count| *count > 0) => {
            waiting.unwrap();
        }
        answered = &mut loser => {
            panic!("answered before the winning record was readable: {answered:?}");
        }
    }
    lagging.released.send_replace(true);
    let put = loser.await.unwrap().unwrap();
    assert_eq!(put, Put::Kept { published: winners });
}

#[tokio::test]
async fn records_survive_a_reopen_of_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let keys = awkward_keys();
    let log = open_log(dir.path());
    let store = on_log(&log);
    for (index, (group, id)) in keys.iter().enumerate() {
        let events = outputs(&format!("k{index}"));
        store.put(group, id, &events).await.unwrap();
    }
    drop(store);
    log.close().await.unwrap();
    drop(log);

    let log = open_log(dir.path());
    let store = on_log(&log);
    for (index, (group, id)) in keys.iter().enumerate() {
        let events = outputs(&format!("k{index}"));
        assert_eq!(
            store.get(group, id).await.unwrap(),
            Some(events.clone()),
            "{group} {id:?}"
        );
        let put = store.put(group, id, &outputs("later")).await.unwrap();
        assert_eq!(put, Put::Kept { published: events });
    }
    assert_eq!(
        store.get(&group("billing"), "never-handled").await.unwrap(),
        None
    );
    log.close().await.unwrap();
}

#[tokio::test]
async fn a_record_is_one_event_in_the_keys_own_system_stream() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_log(dir.path());
    let store = on_log(&log);
    let billing = group("billing");
    let events = outputs("one");
    store.put(&billing, "evt-1", &events).await.unwrap();
    store.put(&billing, "evt-1", &outputs("two")).await.unwrap();

    let stream = EventStoreIdempotency::stream(&billing, "evt-1");
    assert_eq!(stream.as_str(), "$handled:billing:evt-1");
    let stored = log
        .read_stream(&stream, Version::START, Direction::Forward, 10)
        .await
        .unwrap();
    assert_eq!(stored.len(), 1, "the second put appended nothing");
    let event = &stored[0].event;
    assert_eq!(
        (event.ty.as_str(), event.source.as_str()),
        (
            HANDLED_EVENT_TYPE,
            herald_runtime::idempotency::EVENT_SOURCE
        )
    );
    let record: HandledRecord = event.data_as().unwrap().unwrap();
    assert_eq!(
        record,
        HandledRecord {
            group: "billing".to_owned(),
            event_id: "evt-1".to_owned(),
            published: events,
        }
    );
    log.close().await.unwrap();
}

#[tokio::test]
async fn a_record_found_in_another_keys_stream_is_reported_not_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_log(dir.path());
    let store = on_log(&log);
    let billing = group("billing");
    // A record of evt-2 written, by something other than the store, into evt-1's stream.
    let misplaced = HandledRecord {
        group: "billing".to_owned(),
        event_id: "evt-2".to_owned(),
        published: Vec::new(),
    };
    let event = Event::new("/elsewhere", HANDLED_EVENT_TYPE)
        .with_data_as(&misplaced)
        .unwrap();
    log.append(
        &EventStoreIdempotency::stream(&billing, "evt-1"),
        ExpectedVersion::NoStream,
        vec![event],
    )
    .await
    .unwrap();

    let error = store.get(&billing, "evt-1").await.unwrap_err();
    let cause = std::error::Error::source(&error).unwrap().to_string();
    assert!(cause.contains("belong in another stream"), "{cause}");
    log.close().await.unwrap();
}

#[tokio::test]
async fn the_layer_on_the_durable_store_dedups_across_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let first = {
        let log = open_log(dir.path());
        let pipeline = pipeline(router(&calls, Behaviour::Ship), &on_log(&log));
        let outcome = run(&pipeline, delivery(order("evt durable/1"))).await;
        log.close().await.unwrap();
        assert!(matches!(outcome, Outcome::Handled { .. }), "{outcome:?}");
        published(&outcome).to_vec()
    };
    let log = open_log(dir.path());
    let pipeline = pipeline(router(&calls, Behaviour::Ship), &on_log(&log));
    let outcome = run(&pipeline, delivery(order("evt durable/1"))).await;
    assert_eq!(outcome, Outcome::Duplicate { published: first });
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    log.close().await.unwrap();
}
