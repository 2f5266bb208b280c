//! The consumer loop on the in-memory broker: order per key, parallelism across keys,
//! dead letters, parked keys, and graceful shutdown.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use herald_core::Event;
use herald_core::broker::{GroupName, Publisher as _, Subscriber as _, TopicName};
use herald_core::memory_broker::InMemoryBroker;
use herald_runtime::consumer::{Handle, Replay, Report};
use herald_runtime::dead_letter_store::StoreError;
use herald_runtime::{
    ConsumerOptions, DeadLetter, DeadLetterStore, HandlerContext, HandlerError,
    InMemoryDeadLetterStore, OnDeadLetter, PipelineOptions, RetryOptions, Router, TokioClock,
};
use rand::SeedableRng as _;
use rand::rngs::StdRng;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const TOPIC: &str = "orders";
const GROUP: &str = "billing";

#[derive(serde::Deserialize)]
struct Step {
    key: String,
    n: u32,
}

fn step(key: &str, n: u32) -> Event {
    Event::new("/test", "Step")
        .with_id(format!("{key}-{n}"))
        .with_partition_key(key)
        .with_correlation_id(format!("corr-{key}"))
        .with_data(serde_json::json!({ "key": key, "n": n }))
}

fn topic() -> TopicName {
    TopicName::new(TOPIC).unwrap()
}

fn group() -> GroupName {
    GroupName::new(GROUP).unwrap()
}

/// What the handler does with one step.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Behaviour {
    Succeed,
    /// Fails permanently: dead-lettered at once.
    Poison,
    /// Waits for a day (simulated): never finishes within a drain.
    Hang,
    /// Takes five simulated seconds.
    Slow,
}

/// Decides the behaviour of each step, by key and number.
type Script = dyn Fn(&str, u32) -> Behaviour + Send + Sync;

/// Records what the handler saw: every handled step in order, concurrency, and a count
/// tests can wait on.
#[derive(Clone)]
struct Seen {
    inner: Arc<Mutex<SeenState>>,
    /// Handler calls (finished or not) so far.
    calls: Arc<watch::Sender<usize>>,
    behaviour: Arc<Script>,
}

#[derive(Default)]
struct SeenState {
    /// Steps started that are not poison, and test markers, in order.
    log: Vec<String>,
    /// Steps finished successfully.
    finished: Vec<String>,
    running: HashSet<String>,
    concurrent: usize,
    concurrent_max: usize,
}

impl Seen {
    fn new(behaviour: impl Fn(&str, u32) -> Behaviour + Send + Sync + 'static) -> Self {
        Seen {
            inner: Arc::default(),
            calls: Arc::new(watch::Sender::new(0)),
            behaviour: Arc::new(behaviour),
        }
    }

    fn router(&self) -> Router {
        let seen = self.clone();
        Router::new().on::<Step, _>("Step", move |step: Step, ctx: HandlerContext| {
            let seen = seen.clone();
            async move { seen.handle(step, ctx).await }
        })
    }

    async fn handle(&self, step: Step, ctx: HandlerContext) -> Result<(), HandlerError> {
        let behaviour = (self.behaviour)(&step.key, step.n);
        {
            let mut state = self.inner.lock().unwrap();
            assert!(
                state.running.insert(step.key.clone()),
                "two events of key {} ran at once",
                step.key
            );
            state.concurrent += 1;
            state.concurrent_max = state.concurrent_max.max(state.concurrent);
            if behaviour != Behaviour::Poison {
                state.log.push(format!("{}-{}", step.key, step.n));
            }
        }
        self.calls.send_modify(|calls| *calls += 1);
        match behaviour {
            Behaviour::Hang => tokio::time::sleep(Duration::from_secs(86_400)).await,
            Behaviour::Slow => tokio::time::sleep(Duration::from_secs(5)).await,
            // Lets other handlers start, so that concurrency shows.
            Behaviour::Succeed | Behaviour::Poison => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
        }
        let mut state = self.inner.lock().unwrap();
        state.running.remove(&step.key);
        state.concurrent -= 1;
        if behaviour == Behaviour::Poison {
            return Err(HandlerError::permanent("poison"));
        }
        state.finished.push(format!("{}-{}", step.key, step.n));
        ctx.publish(Event::new("/test", "Stepped").with_partition_key(step.key.clone()));
        Ok(())
    }

    fn log(&self) -> Vec<String> {
        self.inner.lock().unwrap().log.clone()
    }

    fn finished(&self) -> Vec<String> {
        self.inner.lock().unwrap().finished.clone()
    }

    fn mark(&self, marker: &str) {
        self.inner.lock().unwrap().log.push(marker.to_owned());
    }

    fn concurrent_max(&self) -> usize {
        self.inner.lock().unwrap().concurrent_max
    }

    async fn wait_calls(&self, count: usize) {
        self.calls
            .subscribe()
            .wait_for(|calls| *calls >= count)
            .await
            .unwrap();
    }

    /// The steps of `key` in the log, in order.
    fn of(&self, key: &str) -> Vec<String> {
        let prefix = format!("{key}-");
        self.log()
            .into_iter()
            .filter(|entry| entry.starts_with(&prefix))
            .collect()
    }
}

/// A store that counts what is put into it, so tests can wait for a dead letter.
struct CountingStore {
    inner: InMemoryDeadLetterStore,
    puts: watch::Sender<usize>,
}

impl CountingStore {
    fn new() -> Arc<Self> {
        Arc::new(CountingStore {
            inner: InMemoryDeadLetterStore::new(),
            puts: watch::Sender::new(0),
        })
    }

    async fn wait_puts(&self, count: usize) {
        self.puts
            .subscribe()
            .wait_for(|puts| *puts >= count)
            .await
            .unwrap();
    }
}

#[async_trait]
impl DeadLetterStore for CountingStore {
    async fn put(&self, dead_letter: DeadLetter) -> Result<(), StoreError> {
        self.inner.put(dead_letter).await?;
        self.puts.send_modify(|puts| *puts += 1);
        Ok(())
    }

    async fn list(
        &self,
        group: &GroupName,
        after: Option<&str>,
        count_max: usize,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        self.inner.list(group, after, count_max).await
    }

    async fn get(&self, group: &GroupName, id: &str) -> Result<Option<DeadLetter>, StoreError> {
        self.inner.get(group, id).await
    }

    async fn discard(&self, group: &GroupName, id: &str) -> Result<Option<DeadLetter>, StoreError> {
        self.inner.discard(group, id).await
    }
}

/// One running member of the group.
struct Member {
    shutdown: CancellationToken,
    handle: Handle,
    run: JoinHandle<Result<Report, herald_runtime::consumer::Error>>,
}

impl Member {
    async fn stop(self) -> Report {
        self.shutdown.cancel();
        self.run.await.unwrap().unwrap()
    }
}

fn start(
    broker: &InMemoryBroker,
    store: Arc<dyn DeadLetterStore>,
    options: ConsumerOptions,
    seen: &Seen,
) -> Member {
    let pipeline = PipelineOptions {
        timeout_ms: 86_400_000 * 2,
        retry: RetryOptions {
            attempts_max: 1,
            ..RetryOptions::default()
        },
    }
    .build(
        seen.router(),
        StdRng::seed_from_u64(7),
        Arc::new(TokioClock::starting_at(chrono::Utc::now())),
    );
    let service = options
        .build(
            Arc::new(broker.clone()),
            Arc::new(broker.clone()),
            store,
            topic(),
            group(),
            pipeline,
        )
        .unwrap();
    let handle = service.handle();
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(service.run(shutdown.clone()));
    Member {
        shutdown,
        handle,
        run,
    }
}

async fn publish(broker: &InMemoryBroker, events: Vec<Event>) {
    broker.publish(&topic(), events).await.unwrap();
}

fn steps(keys: &[&str], count: u32) -> Vec<Event> {
    (0..count)
        .flat_map(|n| keys.iter().map(move |key| step(key, n)))
        .collect()
}

fn names(key: &str, ns: impl IntoIterator<Item = u32>) -> Vec<String> {
    ns.into_iter().map(|n| format!("{key}-{n}")).collect()
}

#[tokio::test(start_paused = true)]
async fn keys_run_in_parallel_and_each_key_strictly_in_order() {
    // One partition: every key shares it, and still runs in parallel with the others.
    let broker = InMemoryBroker::new(1);
    let keys = ["a", "b", "c", "d"];
    publish(&broker, steps(&keys, 5)).await;
    let seen = Seen::new(|_, _| Behaviour::Succeed);
    let store = Arc::new(InMemoryDeadLetterStore::new());
    let member = start(&broker, store, ConsumerOptions::default(), &seen);

    seen.wait_calls(20).await;
    let report = member.stop().await;

    assert_eq!(report.handled, 20);
    for key in keys {
        assert_eq!(seen.of(key), names(key, 0..5), "key {key} in order");
    }
    assert!(
        seen.concurrent_max() > 1,
        "keys ran in parallel: {}",
        seen.concurrent_max()
    );
}

#[tokio::test(start_paused = true)]
async fn in_flight_max_bounds_the_handlers_running_at_once() {
    let broker = InMemoryBroker::new(4);
    let keys = ["a", "b", "c", "d", "e", "f"];
    publish(&broker, steps(&keys, 3)).await;
    let seen = Seen::new(|_, _| Behaviour::Succeed);
    let options = ConsumerOptions {
        in_flight_max: 2,
        queued_max: 4,
        ..ConsumerOptions::default()
    };
    let member = start(
        &broker,
        Arc::new(InMemoryDeadLetterStore::new()),
        options,
        &seen,
    );

    seen.wait_calls(18).await;
    let report = member.stop().await;

    assert_eq!(report.handled, 18);
    assert_eq!(seen.concurrent_max(), 2);
    for key in keys {
        assert_eq!(seen.of(key), names(key, 0..3));
    }
}

#[tokio::test(start_paused = true)]
async fn a_poison_event_is_dead_lettered_and_its_partition_continues() {
    let broker = InMemoryBroker::new(1);
    publish(&broker, steps(&["a", "b"], 4)).await;
    let seen = Seen::new(|key, n| {
        if key == "a" && n == 1 {
            Behaviour::Poison
        } else {
            Behaviour::Succeed
        }
    });
    let store = Arc::new(InMemoryDeadLetterStore::new());
    let member = start(&broker, store.clone(), ConsumerOptions::default(), &seen);

    seen.wait_calls(8).await;
    let report = member.stop().await;

    assert_eq!((report.handled, report.dead_lettered), (7, 1));
    assert_eq!(seen.of("a"), names("a", [0, 2, 3]));
    assert_eq!(seen.of("b"), names("b", 0..4));
    let record = store.get(&group(), "a-1").await.unwrap().expect("stored");
    assert_eq!(record.event, step("a", 1));
    assert_eq!(record.reason, "poison");
    assert_eq!(store.len(), 1);

    // The dead-lettered message was acked like the rest: a new member handles nothing.
    let again = Seen::new(|_, _| Behaviour::Succeed);
    publish(&broker, vec![step("z", 0)]).await;
    let member = start(&broker, store.clone(), ConsumerOptions::default(), &again);
    again.wait_calls(1).await;
    member.stop().await;
    assert_eq!(again.log(), names("z", [0]));
}

fn park_options() -> ConsumerOptions {
    ConsumerOptions {
        on_dead_letter: OnDeadLetter::ParkKey,
        ..ConsumerOptions::default()
    }
}

#[tokio::test(start_paused = true)]
async fn park_key_holds_exactly_the_later_events_of_that_key_until_discarded() {
    let broker = InMemoryBroker::new(1);
    publish(&broker, steps(&["a", "b"], 4)).await;
    let seen = Seen::new(|key, n| {
        if key == "a" && n == 1 {
            Behaviour::Poison
        } else {
            Behaviour::Succeed
        }
    });
    let store = CountingStore::new();
    let member = start(&broker, store.clone(), park_options(), &seen);

    // a-0, a-1 (dead-lettered) and the four events of b.
    seen.wait_calls(6).await;
    store.wait_puts(1).await;
    seen.mark("discard");
    let discarded = member.handle.discard("a-1").await.unwrap();
    assert_eq!(discarded.map(|record| record.event.id), Some("a-1".into()));
    seen.wait_calls(8).await;
    let report = member.stop().await;

    let log = seen.log();
    let at = |entry: &str| log.iter().position(|e| e == entry).unwrap();
    assert_eq!(seen.of("a"), names("a", [0, 2, 3]));
    assert_eq!(seen.of("b"), names("b", 0..4));
    for held in ["a-2", "a-3"] {
        assert!(
            at(held) > at("discard"),
            "{held} waited for the discard: {log:?}"
        );
    }
    assert_eq!(
        (report.handled, report.dead_lettered, report.held),
        (7, 1, 0)
    );
    assert!(store.inner.is_empty());
    assert_eq!(member_discard_again(&broker, store).await, None);
}

/// Discarding twice is harmless.
async fn member_discard_again(
    broker: &InMemoryBroker,
    store: Arc<CountingStore>,
) -> Option<DeadLetter> {
    let seen = Seen::new(|_, _| Behaviour::Succeed);
    let member = start(broker, store, park_options(), &seen);
    let discarded = member.handle.discard("a-1").await.unwrap();
    member.stop().await;
    discarded
}

#[tokio::test(start_paused = true)]
async fn a_parked_key_stays_parked_at_shutdown_and_after_a_restart() {
    let broker = InMemoryBroker::new(1);
    publish(&broker, steps(&["a", "b"], 3)).await;
    let seen = Seen::new(|key, n| {
        if key == "a" && n == 0 {
            Behaviour::Poison
        } else {
            Behaviour::Succeed
        }
    });
    let store = CountingStore::new();
    let member = start(&broker, store.clone(), park_options(), &seen);
    seen.wait_calls(4).await;
    store.wait_puts(1).await;
    let report = member.stop().await;
    assert_eq!((report.handled, report.dead_lettered), (3, 1));
    assert_eq!(report.held, 2, "a-1 and a-2 were held");
    assert_eq!(seen.of("a"), Vec::<String>::new());

    // A new member learns of the park from the store, and holds a's events again until
    // the dead letter is replayed, now that the handler is fixed.
    let fixed = Seen::new(|_, _| Behaviour::Succeed);
    publish(&broker, vec![step("b", 3)]).await;
    let member = start(&broker, store.clone(), park_options(), &fixed);
    fixed.wait_calls(1).await;
    fixed.mark("replay");
    assert_eq!(member.handle.replay("a-0").await.unwrap(), Replay::Queued);
    fixed.wait_calls(4).await;
    let report = member.stop().await;

    let log = fixed.log();
    assert_eq!(log[..2], ["b-3", "replay"]);
    assert_eq!(
        fixed.of("a"),
        names("a", 0..3),
        "the replay first, then the held"
    );
    assert_eq!(report.handled, 4);
    assert!(
        store.inner.is_empty(),
        "a successful replay removes the record"
    );

    // Replaying again finds nothing: a replay is idempotent.
    let member = start(&broker, store.clone(), park_options(), &fixed);
    assert_eq!(member.handle.replay("a-0").await.unwrap(), Replay::NotFound);
    member.stop().await;
}

#[tokio::test(start_paused = true)]
async fn published_events_carry_causation_and_correlation() {
    let broker = InMemoryBroker::new(2);
    let out = TopicName::new("steps-out").unwrap();
    // Join the output topic first, so every event published to it reaches this group.
    let mut reader = broker
        .subscribe(&out, &GroupName::new("audit").unwrap())
        .await
        .unwrap();
    publish(&broker, vec![step("a", 0), step("b", 0)]).await;
    let seen = Seen::new(|_, _| Behaviour::Succeed);
    let options = ConsumerOptions {
        publish_topic: Some(out.as_str().to_owned()),
        ..ConsumerOptions::default()
    };
    let member = start(
        &broker,
        Arc::new(InMemoryDeadLetterStore::new()),
        options,
        &seen,
    );

    let mut caused = BTreeMap::new();
    for _ in 0..2 {
        let message = reader.recv().await.unwrap().unwrap();
        let event = message.event;
        assert_eq!(event.ty, "Stepped");
        caused.insert(
            event.causation_id().unwrap().to_owned(),
            event.correlation_id().unwrap().to_owned(),
        );
    }
    member.stop().await;

    let expected: BTreeMap<String, String> = [("a-0", "corr-a"), ("b-0", "corr-b")]
        .into_iter()
        .map(|(cause, correlation)| (cause.to_owned(), correlation.to_owned()))
        .collect();
    assert_eq!(caused, expected);
}

#[tokio::test(start_paused = true)]
async fn a_graceful_drain_acks_finished_work_and_a_new_member_does_not_handle_it_again() {
    let broker = InMemoryBroker::new(2);
    publish(&broker, steps(&["a", "b", "c"], 3)).await;
    publish(&broker, vec![step("slow", 0)]).await;
    let seen = Seen::new(|key, _| {
        if key == "slow" {
            Behaviour::Slow
        } else {
            Behaviour::Succeed
        }
    });
    let store = Arc::new(InMemoryDeadLetterStore::new());
    let member = start(&broker, store.clone(), ConsumerOptions::default(), &seen);

    // Shut down while the slow handler is still running: the drain lets it finish.
    seen.wait_calls(10).await;
    assert!(
        !seen.finished().contains(&"slow-0".to_owned()),
        "still running"
    );
    let report = member.stop().await;
    assert_eq!(report.handled, 10);
    assert_eq!((report.abandoned, report.held), (0, 0));
    assert!(seen.finished().contains(&"slow-0".to_owned()), "drained");

    let again = Seen::new(|_, _| Behaviour::Succeed);
    publish(&broker, vec![step("z", 0)]).await;
    let member = start(&broker, store, ConsumerOptions::default(), &again);
    again.wait_calls(1).await;
    member.stop().await;
    assert_eq!(again.log(), names("z", [0]), "nothing handled twice");
}

#[tokio::test(start_paused = true)]
async fn types_without_a_handler_are_acked_on_arrival_when_the_consumer_skips_them() {
    // One partition: the skipped messages come between the handled ones.
    let broker = InMemoryBroker::new(1);
    let other = |key: &str, n: u32| {
        Event::new("/test", "Other")
            .with_id(format!("other-{key}-{n}"))
            .with_partition_key(key)
    };
    let mut events = Vec::new();
    for n in 0..5 {
        events.extend([step("a", n), other("a", n), step("b", n)]);
    }
    publish(&broker, events).await;
    let seen = Seen::new(|_, _| Behaviour::Succeed);
    let router = seen.router();
    let build = |router: Router| {
        let pipeline = PipelineOptions::default().build(
            router.clone(),
            StdRng::seed_from_u64(7),
            Arc::new(TokioClock::starting_at(chrono::Utc::now())),
        );
        ConsumerOptions::default()
            .build(
                Arc::new(broker.clone()),
                Arc::new(broker.clone()),
                Arc::new(InMemoryDeadLetterStore::new()),
                topic(),
                group(),
                pipeline,
            )
            .unwrap()
            .skip_other_types(router.types())
    };
    let service = build(router.clone());
    let handle = service.handle();
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(service.run(shutdown.clone()));
    seen.wait_calls(10).await;
    shutdown.cancel();
    let report = run.await.unwrap().unwrap();

    assert_eq!((report.handled, report.skipped), (10, 5));
    assert_eq!(handle.skipped_on_arrival(), 5);
    assert_eq!(router.skipped_count(), 0, "the router never saw them");
    assert_eq!(seen.of("a"), names("a", 0..5), "key a in order");
    assert_eq!(seen.of("b"), names("b", 0..5), "key b in order");

    // Acked: a new member of the group gets none of them again.
    publish(&broker, vec![step("z", 0)]).await;
    let again = Seen::new(|_, _| Behaviour::Succeed);
    let service = build(again.router());
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(service.run(shutdown.clone()));
    again.wait_calls(1).await;
    shutdown.cancel();
    let report = run.await.unwrap().unwrap();
    assert_eq!((report.handled, report.skipped), (1, 0));
    assert_eq!(again.log(), names("z", [0]));
}

#[tokio::test(start_paused = true)]
async fn abandoned_work_is_redelivered_to_the_next_member() {
    let broker = InMemoryBroker::new(1);
    publish(
        &broker,
        vec![step("hang", 0), step("hang", 1), step("ok", 0)],
    )
    .await;
    let seen = Seen::new(|key, _| {
        if key == "hang" {
            Behaviour::Hang
        } else {
            Behaviour::Succeed
        }
    });
    let store = Arc::new(InMemoryDeadLetterStore::new());
    let options = ConsumerOptions {
        drain_timeout_ms: 1_000,
        ..ConsumerOptions::default()
    };
    let member = start(&broker, store.clone(), options.clone(), &seen);
    seen.wait_calls(2).await;
    let report = member.stop().await;
    assert_eq!(
        (report.handled, report.abandoned, report.held),
        (1, 1, 1),
        "ok-0 handled, hang-0 aborted at the drain timeout, hang-1 never started"
    );

    let again = Seen::new(|_, _| Behaviour::Succeed);
    let member = start(&broker, store, options, &again);
    again.wait_calls(2).await;
    let report = member.stop().await;
    assert_eq!(again.log(), names("hang", 0..2), "redelivered, in order");
    assert_eq!(report.handled, 2);
}

#[test]
fn options_have_the_documented_defaults_and_deserialise() {
    let options: ConsumerOptions =
        serde_json::from_str(r#"{ "on_dead_letter": "park_key", "in_flight_max": 8 }"#).unwrap();
    assert_eq!(options.on_dead_letter, OnDeadLetter::ParkKey);
    assert_eq!(options.in_flight_max, 8);
    let defaults = ConsumerOptions::default();
    assert_eq!(defaults.in_flight_max, 64);
    assert_eq!(defaults.drain_timeout_ms, 10_000);
    assert_eq!(defaults.on_dead_letter, OnDeadLetter::Continue);
    assert_eq!(defaults.publish_topic, None);
}
