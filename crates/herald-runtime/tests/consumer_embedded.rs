//! The consumer loop on the durable embedded broker, with dead letters kept in the same
//! log: what only a real, restartable backend shows — a whole group shutting down at
//! once, parked keys and replay requests surviving a restart of the log.
//!
//! These run in real time (the log syncs on its own thread, so tokio's paused clock would
//! jump during every sync); every wait is for a condition, never for a duration.

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use futures::StreamExt as _;
use herald_core::broker::{GroupName, Publisher as _, TopicName};
use herald_core::{Event, EventStore as _, Position};
use herald_log::broker::{Broker, BrokerOptions};
use herald_log::{Log, Options};
use herald_runtime::consumer::Report;
use herald_runtime::dead_letter_store::{
    EventStoreDeadLetters, Lookup, REPLAYED_EVENT_TYPE, STORED_EVENT_TYPE,
};
use herald_runtime::{
    ConsumerOptions, HandlerContext, HandlerError, OnDeadLetter, PipelineOptions, RetryOptions,
    Router, SystemClock,
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
        .with_data(serde_json::json!({ "key": key, "n": n }))
}

fn topic() -> TopicName {
    TopicName::new(TOPIC).unwrap()
}

fn group() -> GroupName {
    GroupName::new(GROUP).unwrap()
}

/// The log and its broker, reopened as a restart would.
struct Node {
    log: Log,
    broker: Broker,
}

impl Node {
    fn open(dir: &Path) -> Node {
        let log = Log::open(Options::new(dir)).unwrap();
        let broker = Broker::new(log.clone(), BrokerOptions::default());
        Node { log, broker }
    }

    async fn close(self) {
        self.broker.shutdown().await;
        self.log.close().await.unwrap();
    }

    fn dead_letters(&self) -> Arc<EventStoreDeadLetters> {
        Arc::new(EventStoreDeadLetters::new(Arc::new(self.log.clone())))
    }

    /// Waits until the group's dead-letter stream holds an event of type `ty` for `id`.
    async fn wait_dead_letter_event(&self, ty: &str, id: &str) {
        let stream = EventStoreDeadLetters::stream(&group()).unwrap();
        let mut events = self.log.subscribe_all(Position(0)).await.unwrap();
        while let Some(recorded) = events.next().await {
            let recorded = recorded.unwrap();
            if recorded.stream == stream
                && recorded.event.ty == ty
                && recorded.event.subject.as_deref() == Some(id)
            {
                return;
            }
        }
        panic!("the log's subscription ended");
    }
}

/// The handler: records every step it finishes; fails `poison` steps permanently while
/// `fixed` is false.
#[derive(Clone)]
struct Seen {
    log: Arc<Mutex<Vec<String>>>,
    handled: Arc<watch::Sender<HashSet<String>>>,
    fixed: Arc<AtomicBool>,
    poison: &'static str,
}

impl Seen {
    fn new(poison: &'static str) -> Seen {
        Seen {
            log: Arc::default(),
            handled: Arc::new(watch::Sender::new(HashSet::new())),
            fixed: Arc::new(AtomicBool::new(false)),
            poison,
        }
    }

    fn router(&self) -> Router {
        let seen = self.clone();
        Router::new().on::<Step, _>("Step", move |step: Step, _ctx: HandlerContext| {
            let seen = seen.clone();
            async move {
                if step.key == seen.poison && !seen.fixed.load(Ordering::SeqCst) {
                    return Err(HandlerError::permanent("poison"));
                }
                let name = format!("{}-{}", step.key, step.n);
                seen.log.lock().unwrap().push(name.clone());
                seen.handled.send_modify(|handled| {
                    handled.insert(name);
                });
                Ok(())
            }
        })
    }

    async fn wait_handled(&self, names: &[&str]) {
        self.handled
            .subscribe()
            .wait_for(|handled| names.iter().all(|name| handled.contains(*name)))
            .await
            .unwrap();
    }

    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    fn of(&self, key: &str) -> Vec<String> {
        let prefix = format!("{key}-");
        self.log()
            .into_iter()
            .filter(|name| name.starts_with(&prefix))
            .collect()
    }
}

struct Member {
    shutdown: CancellationToken,
    run: JoinHandle<Result<Report, herald_runtime::consumer::Error>>,
}

impl Member {
    fn start(node: &Node, seen: &Seen, options: ConsumerOptions) -> Member {
        let pipeline = PipelineOptions {
            retry: RetryOptions {
                attempts_max: 1,
                ..RetryOptions::default()
            },
            ..PipelineOptions::default()
        }
        .build(
            seen.router(),
            StdRng::seed_from_u64(7),
            Arc::new(SystemClock),
        );
        let service = options
            .build(
                Arc::new(node.broker.clone()),
                Arc::new(node.broker.clone()),
                node.dead_letters(),
                topic(),
                group(),
                pipeline,
            )
            .unwrap();
        let shutdown = CancellationToken::new();
        let run = tokio::spawn(service.run(shutdown.clone()));
        Member { shutdown, run }
    }

    async fn stop(self) -> Report {
        self.shutdown.cancel();
        self.run.await.unwrap().unwrap()
    }
}

fn names(key: &str, ns: impl IntoIterator<Item = u32>) -> Vec<String> {
    ns.into_iter().map(|n| format!("{key}-{n}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_group_shutting_down_at_once_handles_nothing_twice_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::open(dir.path());
    let keys: Vec<String> = (0..40).map(|key| format!("k{key}")).collect();
    let events: Vec<Event> = (0..10)
        .flat_map(|n| keys.iter().map(move |key| step(key, n)))
        .collect();
    node.broker.publish(&topic(), events).await.unwrap();

    let seen = Seen::new("none");
    let members: Vec<Member> = (0..4)
        .map(|_| Member::start(&node, &seen, ConsumerOptions::default()))
        .collect();
    let all: Vec<String> = keys.iter().flat_map(|key| names(key, 0..10)).collect();
    let all_refs: Vec<&str> = all.iter().map(String::as_str).collect();
    seen.wait_handled(&all_refs).await;
    // Members joining while the first ones already consume take partitions over, and the
    // messages those held un-acked are handled again by the new owner: at least once. A
    // message handled once may still wait for that second handling, which only its ack
    // would spare after the restart. One more step per key, handled after every earlier
    // step of its key by the partition's owner now, marks the end of those.
    node.broker
        .publish(&topic(), keys.iter().map(|key| step(key, 10)).collect())
        .await
        .unwrap();
    let last: Vec<String> = keys.iter().map(|key| format!("{key}-10")).collect();
    let last_refs: Vec<&str> = last.iter().map(String::as_str).collect();
    seen.wait_handled(&last_refs).await;

    // Every member is told to stop at the same moment, as a process shutting down would.
    for member in &members {
        member.shutdown.cancel();
    }
    let mut handled = 0;
    for member in members {
        handled += member.stop().await.handled;
    }
    assert!(handled >= 440, "every event handled");
    node.close().await;

    let node = Node::open(dir.path());
    node.broker
        .publish(&topic(), vec![step("after", 0)])
        .await
        .unwrap();
    let again = Seen::new("none");
    let member = Member::start(&node, &again, ConsumerOptions::default());
    again.wait_handled(&["after-0"]).await;
    let report = member.stop().await;
    assert_eq!(again.log(), names("after", [0]), "nothing handled twice");
    assert_eq!(report.handled, 1);
    node.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_requested_through_the_store_runs_on_the_running_member_and_counts_as_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::open(dir.path());
    node.broker
        .publish(&topic(), vec![step("bad", 0), step("ok", 0)])
        .await
        .unwrap();
    let seen = Seen::new("bad");
    let options = ConsumerOptions {
        replay_poll_interval_ms: 20,
        ..ConsumerOptions::default()
    };
    let member = Member::start(&node, &seen, options);
    seen.wait_handled(&["ok-0"]).await;
    node.wait_dead_letter_event(STORED_EVENT_TYPE, "bad-0")
        .await;

    // Another handle on the same log asks for the replay, as an operator's request does.
    seen.fixed.store(true, Ordering::SeqCst);
    let operator = node.dead_letters();
    assert!(
        operator
            .request_replay(&group(), "bad-0")
            .await
            .unwrap()
            .is_some()
    );
    seen.wait_handled(&["bad-0"]).await;
    node.wait_dead_letter_event(REPLAYED_EVENT_TYPE, "bad-0")
        .await;
    let report = member.stop().await;

    assert_eq!(report.handled, 2, "ok-0, then bad-0 replayed");
    assert_eq!(report.dead_lettered, 1);
    assert_eq!(
        operator.find(&group(), "bad-0").await.unwrap(),
        Lookup::Replayed
    );
    assert_eq!(seen.of("bad"), names("bad", [0]), "replayed once");
    node.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_key_stays_parked_across_a_restart_until_its_requested_replay_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::open(dir.path());
    // One partition, so that `other-1` arriving means every earlier step has arrived.
    node.broker.create_topic(&topic(), 1).await.unwrap();
    node.broker
        .publish(
            &topic(),
            vec![step("k", 0), step("k", 1), step("other", 0), step("k", 2)],
        )
        .await
        .unwrap();
    let options = ConsumerOptions {
        on_dead_letter: OnDeadLetter::ParkKey,
        replay_poll_interval_ms: 20,
        ..ConsumerOptions::default()
    };
    let seen = Seen::new("k");
    let member = Member::start(&node, &seen, options.clone());
    seen.wait_handled(&["other-0"]).await;
    node.wait_dead_letter_event(STORED_EVENT_TYPE, "k-0").await;
    let report = member.stop().await;
    assert_eq!((report.handled, report.dead_lettered), (1, 1));
    assert_eq!(report.held, 2, "k-1 and k-2 parked, un-acked");
    node.close().await;

    // After a restart the key is parked again from the stored dead letter: later steps
    // of other keys go through, k's stay held.
    let node = Node::open(dir.path());
    node.broker
        .publish(&topic(), vec![step("other", 1)])
        .await
        .unwrap();
    let seen = Seen::new("k");
    seen.fixed.store(true, Ordering::SeqCst);
    let member = Member::start(&node, &seen, options);
    seen.wait_handled(&["other-1"]).await;
    assert_eq!(seen.of("k"), Vec::<String>::new(), "k still parked");

    node.dead_letters()
        .request_replay(&group(), "k-0")
        .await
        .unwrap()
        .unwrap();
    seen.wait_handled(&["k-0", "k-1", "k-2"]).await;
    let report = member.stop().await;
    assert_eq!(
        seen.of("k"),
        names("k", 0..3),
        "the replay, then the held steps in order"
    );
    assert_eq!(
        seen.of("other"),
        names("other", [1]),
        "other-0, acked behind the parked k-1, is not handled again"
    );
    assert_eq!(report.handled, 4);
    node.close().await;
}
