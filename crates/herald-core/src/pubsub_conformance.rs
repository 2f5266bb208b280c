//! The Pub/Sub conformance suite every broker backend ([`Publisher`], [`Subscriber`],
//! [`Consumer`]) runs.
//!
//! A backend is done when the whole suite passes for the [`Capabilities`] it declares. Run it
//! with [`pubsub_conformance!`](crate::pubsub_conformance!), which expands to one test per
//! case, each on a fresh [`BrokerFixture`] from the given factory.
//!
//! # The fixture
//!
//! ```text
//! #[async_trait]
//! pub trait BrokerFixture: Send + 'static {
//!     /// Starts the broker on the fixture's storage; called again after a restart.
//!     async fn start(&mut self) -> (Arc<dyn Publisher>, Arc<dyn Subscriber>);
//!     /// The partition count of every topic the suite uses (at least 1; 2 or more for the
//!     /// consumer-group case to check the split).
//!     fn partitions(&self) -> u32;
//!     /// Creates `topic` with `partitions()` partitions, once, after the first `start`.
//!     /// The default does nothing: for backends that create topics on first use.
//!     async fn create_topic(&mut self, topic: &TopicName) { /* nothing */ }
//! }
//! ```
//!
//! - `start` is called once at the beginning of every case. The persistence case calls it
//!   again after it has closed every consumer, closed the publisher and dropped both handles
//!   it got from the previous `start`, to simulate a restart of the broker **on the same
//!   storage**: a persistent backend opens the same directory (or database) again. A
//!   backend whose broker has to be shut down explicitly can do so at the beginning of the
//!   next `start` or in the fixture's `Drop`.
//! - The fixture itself is dropped last, after every handle, so it can own the storage
//!   (e.g. a `tempfile::TempDir`).
//! - The capabilities are taken from [`Subscriber::capabilities`] of the started broker.
//! - The suite consumes in spawned tasks (so the runtime is multi-threaded, with
//!   [`WORKER_THREADS`](crate::conformance::WORKER_THREADS) workers). To stop a member it
//!   drops a pending [`Consumer::recv`] future and then closes or drops the consumer at
//!   once. `recv` MUST be cancel-safe, which [`recv_is_cancel_safe`] checks on its own;
//!   the other cases drop a `recv` only right before closing, so a backend failing that
//!   promise fails that case alone.
//!
//! ```
//! // tests/pubsub_conformance.rs of a backend crate
//! use std::sync::Arc;
//!
//! use async_trait::async_trait;
//! use herald_core::broker::{Publisher, Subscriber};
//! use herald_core::memory_broker::InMemoryBroker;
//! use herald_core::pubsub_conformance::BrokerFixture;
//!
//! /// A backend on disk holds its `tempfile::TempDir` here and opens its broker on that
//! /// directory in every `start`.
//! struct Fixture;
//!
//! #[async_trait]
//! impl BrokerFixture for Fixture {
//!     async fn start(&mut self) -> (Arc<dyn Publisher>, Arc<dyn Subscriber>) {
//!         let broker = InMemoryBroker::new(4);
//!         (Arc::new(broker.clone()), Arc::new(broker))
//!     }
//!
//!     fn partitions(&self) -> u32 {
//!         4
//!     }
//! }
//!
//! // The factory returns a future of a fresh fixture; it is called once per case.
//! herald_core::pubsub_conformance!(|| async { Fixture });
//! # fn main() {}
//! ```
//!
//! Every case is also a public `async fn` taking a `Box<dyn BrokerFixture>`, so a backend
//! can run one case on its own and a test can prove that a case fails against a broken
//! broker. Each case uses its own topic and group names and panics with a message naming the
//! broken promise. Timeouts are hang guards only (a case that waits
//! [`WAIT_MAX`] for a message has failed); nothing is
//! synchronised by sleeping. Where a case must know that nothing else arrives, it publishes
//! a *fence* (one message per partition) last: with order per partition, every earlier
//! message of a partition has arrived once its fence has.
//!
//! # Capability table
//!
//! A case whose capabilities the backend does not declare is skipped: it prints
//! `pubsub conformance: skipping <case>: ...` to stderr and passes.
//!
//! | Case | ordered_by_key | consumer_groups | redelivery | persistent |
//! | --- | :-: | :-: | :-: | :-: |
//! | [`publish_assigns_partitions_and_offsets`] | | | | |
//! | [`publish_rejects_empty_and_invalid`] | | | | |
//! | [`one_consumer_receives_everything_once`] | (order) | | | |
//! | [`events_round_trip_exactly`] | | | | |
//! | [`order_per_key_under_concurrent_publishers`] | needed | | | |
//! | [`groups_receive_independently`] | (order) | | | |
//! | [`members_split_partitions_and_take_over`] | (order) | needed | needed | |
//! | [`nack_redelivers_the_rest_of_the_partition`] | needed | | needed | |
//! | [`unacked_messages_are_redelivered`] | (order) | | needed | |
//! | [`group_resumes_after_restart`] | (order) | | | needed |
//! | [`ack_and_nack_of_messages_not_held_fail`] | | | | |
//! | [`publish_after_close_fails`] | | | | |
//! | [`lag_counts_what_the_group_has_not_committed`] | | | | |
//! | [`a_leave_moves_only_the_leavers_partitions`] | | needed | needed | |
//! | [`recv_is_cancel_safe`] | (order) | | | |
//!
//! "(order)": the case runs without the capability, and checks the order of delivery only
//! with it (and, with it, uses fences to know when everything has arrived).
//!
//! # What each case checks
//!
//! - [`publish_assigns_partitions_and_offsets`]: every published event MUST go to partition
//!   `partition_for(partition_key(event), partitions)` (its `partitionkey`, else its id);
//!   offsets MUST start at 0 and be contiguous per partition and per topic, across publishes
//!   of one and of many events; the result MUST list the events in the order given.
//! - [`publish_rejects_empty_and_invalid`]: a publish without events MUST fail with
//!   [`Error::EmptyPublish`], one with an invalid event with [`Error::InvalidEvent`] naming
//!   its index; neither MUST store anything (offsets continue as before).
//! - [`one_consumer_receives_everything_once`]: the only member of a group MUST receive every
//!   message exactly once (with ack), on the right topic, partition and offset, with
//!   `attempt` 1, the event as published. With `ordered_by_key`, the offsets of each
//!   partition MUST arrive as `0, 1, 2, …` and each key's events in publish order.
//! - [`events_round_trip_exactly`]: every attribute, extension type and payload kind MUST
//!   arrive exactly as published (JSON text byte for byte, time offsets, binary data).
//! - [`order_per_key_under_concurrent_publishers`]: with several publishers at once (each
//!   owning some keys), offsets of each partition MUST stay contiguous, each key's offsets
//!   MUST rise in publish order, and a consumer MUST receive each key's events in that order.
//! - [`groups_receive_independently`]: two groups — one joined before the publishes, one
//!   after — MUST each receive every message once, each with `attempt` 1, whatever the other
//!   acks.
//! - [`members_split_partitions_and_take_over`]: two members that joined before the
//!   publishes MUST receive every message exactly once between them, each partition going to
//!   one member only, and (with at least two partitions) each member MUST get some. When one
//!   member closes, the other MUST receive the rest: the closed member's un-acked messages
//!   (with a greater `attempt`) and the later publishes, but none of the messages in the
//!   group's acked prefix.
//! - [`nack_redelivers_the_rest_of_the_partition`]: after a nack, the nacked message and
//!   every later un-acked message of its partition MUST come again, in order, with `attempt`
//!   one more, before newer messages; acked messages after the nacked one MAY come again.
//!   A second nack increases `attempt` again.
//! - [`unacked_messages_are_redelivered`]: the messages a member did not ack MUST be
//!   delivered to the next member of the group after the first is closed, and again after
//!   that one is dropped without closing, each time with a greater `attempt`; the acked
//!   prefix MUST NOT come again (acked messages beyond it MAY).
//! - [`group_resumes_after_restart`]: after consuming and acking a prefix of each partition,
//!   closing everything and restarting the broker on the same storage, the published
//!   messages MUST still be there (a new group receives them all, exactly), offsets MUST
//!   continue where they were, [`Subscriber::lag`] MUST report the acked prefix as
//!   committed before any member joins, and the group MUST resume exactly after its acked
//!   prefix.
//! - [`ack_and_nack_of_messages_not_held_fail`]: acking or nacking a message this consumer
//!   does not hold (never delivered to it, delivered to another group, an offset that does
//!   not exist, another topic) MUST fail ([`Error::NotHeld`] is the expected error) and
//!   MUST NOT disturb the consumer.
//! - [`publish_after_close_fails`]: [`Publisher::close`] MUST succeed; a publish afterwards
//!   MUST fail with [`Error::Closed`]; [`Consumer::close`] MUST succeed.
//! - [`lag_counts_what_the_group_has_not_committed`]: [`Subscriber::lag`] MUST list every
//!   partition once, in order, with its head (the count of its messages) and `lag = head -
//!   committed`; a group that never joined MUST have committed 0 everywhere; after a member
//!   acked everything and closed, lag MUST be 0 everywhere; after one acked the first two
//!   offsets of each partition and closed, those MUST be committed; later publishes MUST
//!   raise the head and the lag. A topic that does not exist MUST fail with
//!   [`Error::UnknownTopic`], and asking MUST NOT create it.
//! - [`a_leave_moves_only_the_leavers_partitions`]: with up to three members of a group
//!   (at least two partitions; with fewer the case is skipped), when one closes, the others MUST still ack every message they received
//!   before (no [`Error::NotHeld`]), MUST keep receiving the partitions they held, and
//!   between them MUST receive the leaver's un-acked messages again and nothing they
//!   acked.
//! - [`recv_is_cancel_safe`]: `recv` futures dropped before they complete — unpolled, or
//!   after one to a few polls — interleaved with publishes and acks MUST NOT lose a
//!   message: every message MUST arrive exactly once, with `attempt` 1, and with
//!   `ordered_by_key` in offset order per partition.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::task::Poll;

use async_trait::async_trait;
use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::broker::{
    self, Capabilities, Consumer, Error, GroupName, Message, PartitionLag, Published, Publisher,
    Subscriber, TopicName,
};
use crate::conformance::{WAIT_MAX, check_exact};
use crate::event::Event;

/// What a backend provides to run the suite: a broker that can be started, and restarted on
/// the same storage. See the [module documentation](self) for the rules.
#[async_trait]
pub trait BrokerFixture: Send + 'static {
    /// Starts the broker on this fixture's storage and returns its publisher and subscriber.
    ///
    /// Called once at the beginning of every case, and again by the persistence case after
    /// it has closed and dropped everything the previous call returned (a restart).
    async fn start(&mut self) -> (Arc<dyn Publisher>, Arc<dyn Subscriber>);

    /// The number of partitions of every topic the suite uses.
    fn partitions(&self) -> u32;

    /// Creates `topic` with [`partitions`](Self::partitions) partitions. The suite calls it
    /// once per topic, after the first `start` and before the topic's first use. The default
    /// does nothing, for backends that create topics on first use.
    async fn create_topic(&mut self, topic: &TopicName) {
        let _ = topic;
    }
}

/// Expands to one test per conformance case, each running on a fresh fixture.
///
/// `$factory` is an expression callable once per case — typically a closure returning a
/// future — whose output implements [`BrokerFixture`](crate::pubsub_conformance::BrokerFixture).
/// Each test runs on its own multi-threaded tokio runtime built by
/// [`run`](crate::pubsub_conformance::run), so the calling crate needs no tokio features of
/// its own. The tests are named after the cases; invoke the macro once per module.
///
/// ```
/// mod in_memory {
///     # use std::sync::Arc;
///     # use herald_core::broker::{Publisher, Subscriber};
///     # use herald_core::memory_broker::InMemoryBroker;
///     # struct Fixture;
///     # #[async_trait::async_trait]
///     # impl herald_core::pubsub_conformance::BrokerFixture for Fixture {
///     #     async fn start(&mut self) -> (Arc<dyn Publisher>, Arc<dyn Subscriber>) {
///     #         let broker = InMemoryBroker::new(4);
///     #         (Arc::new(broker.clone()), Arc::new(broker))
///     #     }
///     #     fn partitions(&self) -> u32 { 4 }
///     # }
///     herald_core::pubsub_conformance!(|| async { Fixture });
/// }
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! pubsub_conformance {
    ($factory:expr $(,)?) => {
        $crate::pubsub_conformance!(@cases ($factory)
            publish_assigns_partitions_and_offsets,
            publish_rejects_empty_and_invalid,
            one_consumer_receives_everything_once,
            events_round_trip_exactly,
            order_per_key_under_concurrent_publishers,
            groups_receive_independently,
            members_split_partitions_and_take_over,
            nack_redelivers_the_rest_of_the_partition,
            unacked_messages_are_redelivered,
            group_resumes_after_restart,
            ack_and_nack_of_messages_not_held_fail,
            publish_after_close_fails,
            lag_counts_what_the_group_has_not_committed,
            a_leave_moves_only_the_leavers_partitions,
            recv_is_cancel_safe,
        );
    };
    (@cases ($factory:expr) $($case:ident,)*) => {
        $(
            #[test]
            fn $case() {
                $crate::pubsub_conformance::run($factory, $crate::pubsub_conformance::$case);
            }
        )*
    };
}

/// Runs one case on a fresh fixture from `factory`, on a multi-threaded tokio runtime with
/// [`WORKER_THREADS`](crate::conformance::WORKER_THREADS) workers, within
/// [`CASE_DURATION_MAX`](crate::conformance::CASE_DURATION_MAX).
pub fn run<F, Fut, X, C, CaseFut>(factory: F, case: C)
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = X>,
    X: BrokerFixture,
    C: FnOnce(Box<dyn BrokerFixture>) -> CaseFut,
    CaseFut: Future<Output = ()>,
{
    crate::conformance::block_on_case("broker", async move {
        let fixture: Box<dyn BrokerFixture> = Box::new(factory().await);
        case(fixture).await;
    });
}

/// No capability needed.
const NEEDS_NOTHING: Capabilities = Capabilities {
    ordered_by_key: false,
    consumer_groups: false,
    persistent: false,
    redelivery: false,
};

// ---------------------------------------------------------------------------------------
// Publishing
// ---------------------------------------------------------------------------------------

/// Publishes go to `partition_for(partition_key)` at contiguous offsets from 0.
pub async fn publish_assigns_partitions_and_offsets(mut fixture: Box<dyn BrokerFixture>) {
    let case = "publish_assigns_partitions_and_offsets";
    let (a, b) = (topic("pubsub-offsets-a"), topic("pubsub-offsets-b"));
    let Some(broker) = start(&mut *fixture, case, NEEDS_NOTHING, &[&a, &b]).await else {
        return;
    };
    let mut on_a = Ledger::new(a.clone());
    let mut on_b = Ledger::new(b.clone());
    let keys = [
        "order-1",
        "order-2",
        "customer-7",
        "x",
        "order-1000",
        "ü-key",
    ];
    let mut label = 0;
    for size in [1, 3, 7, 2, 10, 1] {
        let batch: Vec<Event> = (0..size)
            .map(|n| {
                label += 1;
                // Every third event has no key and is partitioned by its id.
                let key = (n % 3 != 2).then(|| keys[(label * 7) % keys.len()]);
                event(&format!("offsets-{label}"), key)
            })
            .collect();
        on_a.publish(&broker, batch, "a publish to the first topic")
            .await;
    }
    // A second topic has offsets of its own, from 0.
    on_b.publish(
        &broker,
        events("offsets-b", 5, Some("order-1")),
        "a publish to another topic",
    )
    .await;
    on_a.publish(
        &broker,
        events("offsets-a-again", 4, None),
        "a publish after the other topic's",
    )
    .await;
    broker.close().await;
}

/// Empty publishes and invalid events are rejected and store nothing.
pub async fn publish_rejects_empty_and_invalid(mut fixture: Box<dyn BrokerFixture>) {
    let case = "publish_rejects_empty_and_invalid";
    let t = topic("pubsub-rejects");
    let Some(broker) = start(&mut *fixture, case, NEEDS_NOTHING, &[&t]).await else {
        return;
    };
    let mut ledger = Ledger::new(t.clone());
    ledger
        .publish(
            &broker,
            events("rejects-before", 6, None),
            "a valid publish",
        )
        .await;

    match broker.publisher.publish(&t, Vec::new()).await {
        Err(Error::EmptyPublish) => {}
        other => panic!(
            "a publish without events must fail with EmptyPublish, got {}",
            describe(&other)
        ),
    }

    let mut invalid = event("rejects-invalid", Some("order-1"));
    invalid.ty = String::new();
    let batch = vec![
        event("rejects-valid-0", Some("order-1")),
        invalid,
        event("rejects-valid-2", Some("order-2")),
    ];
    match broker.publisher.publish(&t, batch).await {
        Err(Error::InvalidEvent { index: 1, .. }) => {}
        other => panic!(
            "a publish whose event 1 has an empty type must fail with InvalidEvent {{ index: 1 }}, got {}",
            describe(&other)
        ),
    }

    // Nothing was stored: offsets continue where the valid publish left them.
    let fences = fences("rejects", broker.partitions);
    ledger
        .publish(
            &broker,
            fences,
            "a publish after the rejected ones (must continue the offsets: nothing was stored)",
        )
        .await;
    broker.close().await;
}

// ---------------------------------------------------------------------------------------
// Delivery
// ---------------------------------------------------------------------------------------

/// The only member of a group receives every message once, exactly as published.
pub async fn one_consumer_receives_everything_once(mut fixture: Box<dyn BrokerFixture>) {
    let case = "one_consumer_receives_everything_once";
    let t = topic("pubsub-once");
    let Some(broker) = start(&mut *fixture, case, NEEDS_NOTHING, &[&t]).await else {
        return;
    };
    let ordered = broker.capabilities.ordered_by_key;
    let consumer = broker.subscribe(&t, "pubsub-once-group").await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let member = spawn_member("the consumer", consumer, |_| true, tx);

    let mut ledger = Ledger::new(t.clone());
    let keys: Vec<String> = (0..8).map(|n| format!("once-key-{n}")).collect();
    let mut published = Vec::new();
    for batch in 0..8 {
        let events: Vec<Event> = (0..5)
            .map(|n| {
                let key = (n != 4).then(|| keys[(batch + n) % keys.len()].as_str());
                event(&format!("once-{batch}-{n}"), key)
            })
            .collect();
        published.extend(ledger.publish(&broker, events, "a publish").await);
    }
    let fences = ledger
        .publish(&broker, fences("once", broker.partitions), "the fences")
        .await;

    let deliveries = collect(
        &mut rx,
        Want {
            what: "the only member of the group",
            must: published.iter().cloned().collect(),
            fences: fences.iter().cloned().collect(),
            may: HashSet::new(),
            ordered,
        },
    )
    .await;
    for delivery in &deliveries {
        ledger.check("the only member of the group", &delivery.message);
        assert_eq!(
            delivery.message.attempt,
            1,
            "the first delivery of {} must have attempt 1",
            summary(&delivery.message)
        );
    }
    if ordered {
        check_partition_order("the only member of the group", &deliveries, true);
        check_key_order("the only member of the group", &ledger, &deliveries);
    }
    member.stop(Stop::Close).await;
    broker.close().await;
}

/// Every attribute, extension and payload kind arrives exactly as published.
pub async fn events_round_trip_exactly(mut fixture: Box<dyn BrokerFixture>) {
    let case = "events_round_trip_exactly";
    let t = topic("pubsub-round-trip");
    let Some(broker) = start(&mut *fixture, case, NEEDS_NOTHING, &[&t]).await else {
        return;
    };
    let mut ledger = Ledger::new(t.clone());
    let originals = crate::conformance::round_trip_events();
    let ids = ledger
        .publish(
            &broker,
            originals.clone(),
            "a publish of every kind of event",
        )
        .await;
    let consumer = broker.subscribe(&t, "pubsub-round-trip-group").await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let member = spawn_member("the consumer", consumer, |_| true, tx);
    let deliveries = collect(
        &mut rx,
        Want {
            what: "the consumer",
            must: ids.iter().cloned().collect(),
            fences: HashSet::new(),
            may: HashSet::new(),
            ordered: false,
        },
    )
    .await;
    for delivery in &deliveries {
        // `check` compares the event with `check_exact`: offsets of times and encodings too.
        ledger.check("a round trip through the broker", &delivery.message);
    }
    member.stop(Stop::Close).await;
    broker.close().await;
}

/// Concurrent publishers keep offsets contiguous and each key's events in order.
pub async fn order_per_key_under_concurrent_publishers(mut fixture: Box<dyn BrokerFixture>) {
    const PUBLISHERS: usize = 4;
    const KEYS_PER_PUBLISHER: usize = 3;
    const ROUNDS: usize = 25;
    let case = "order_per_key_under_concurrent_publishers";
    let t = topic("pubsub-concurrent");
    let needs = Capabilities {
        ordered_by_key: true,
        ..NEEDS_NOTHING
    };
    let Some(broker) = start(&mut *fixture, case, needs, &[&t]).await else {
        return;
    };
    let partitions = broker.partitions;
    let consumer = broker.subscribe(&t, "pubsub-concurrent-group").await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let member = spawn_member("the consumer", consumer, |_| true, tx);

    let writers: Vec<JoinHandle<Vec<(Event, Published)>>> = (0..PUBLISHERS)
        .map(|writer| {
            let publisher = Arc::clone(&broker.publisher);
            let t = t.clone();
            tokio::spawn(async move {
                let mut sent = Vec::new();
                for round in 0..ROUNDS {
                    // 1 to 3 events per publish, over this writer's keys.
                    let batch: Vec<Event> = (0..1 + (writer + round) % 3)
                        .map(|n| {
                            let key =
                                format!("concurrent-{writer}-{}", (round + n) % KEYS_PER_PUBLISHER);
                            event(&format!("concurrent-{writer}-{round}-{n}"), Some(&key))
                        })
                        .collect();
                    let placed = publisher
                        .publish(&t, batch.clone())
                        .await
                        .unwrap_or_else(|error| panic!("a concurrent publish failed: {error}"));
                    assert_eq!(placed.len(), batch.len(), "one result per published event");
                    sent.extend(batch.into_iter().zip(placed));
                }
                sent
            })
        })
        .collect();
    let mut ledger = Ledger::new(t.clone());
    let mut published = Vec::new();
    for writer in writers {
        let sent = writer
            .await
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic.into_panic()));
        for (event, at) in sent {
            assert_eq!(
                at.partition,
                broker::partition_for(broker::partition_key(&event), partitions),
                "event `{}` went to the wrong partition",
                event.id
            );
            published.push(event.id.clone());
            ledger.record(event, at);
        }
    }
    // Contiguous offsets per partition, and rising offsets per key in publish order (each
    // writer published its keys' events one publish after the other).
    let mut offsets: HashMap<u32, Vec<u64>> = HashMap::new();
    for id in &published {
        let at = ledger.sent[id].at;
        offsets.entry(at.partition).or_default().push(at.offset);
    }
    for (partition, mut got) in offsets {
        got.sort_unstable();
        let want: Vec<u64> = (0..got.len() as u64).collect();
        assert_eq!(
            got, want,
            "offsets of partition {partition} under concurrent publishers must be contiguous from 0"
        );
        ledger.next_offset.insert(partition, want.len() as u64);
    }
    check_key_offsets_rise(&ledger, &published);
    let fences = ledger
        .publish(&broker, fences("concurrent", partitions), "the fences")
        .await;

    let deliveries = collect(
        &mut rx,
        Want {
            what: "the consumer",
            must: published.iter().cloned().collect(),
            fences: fences.iter().cloned().collect(),
            may: HashSet::new(),
            ordered: true,
        },
    )
    .await;
    for delivery in &deliveries {
        ledger.check("the consumer", &delivery.message);
    }
    check_partition_order("the consumer", &deliveries, true);
    check_key_order("the consumer", &ledger, &deliveries);
    member.stop(Stop::Close).await;
    broker.close().await;
}

/// Two groups each receive everything, independently of what the other acks.
pub async fn groups_receive_independently(mut fixture: Box<dyn BrokerFixture>) {
    let case = "groups_receive_independently";
    let t = topic("pubsub-groups");
    let Some(broker) = start(&mut *fixture, case, NEEDS_NOTHING, &[&t]).await else {
        return;
    };
    let ordered = broker.capabilities.ordered_by_key;
    let (tx, mut early_rx) = mpsc::unbounded_channel();
    let early = spawn_member(
        "the member of the early group",
        broker.subscribe(&t, "pubsub-groups-early").await,
        |_| true,
        tx,
    );
    let mut ledger = Ledger::new(t.clone());
    let mut published = Vec::new();
    for batch in 0..6 {
        published.extend(
            ledger
                .publish(
                    &broker,
                    events(&format!("groups-{batch}"), 5, None),
                    "a publish",
                )
                .await,
        );
    }
    let fences = ledger
        .publish(&broker, fences("groups", broker.partitions), "the fences")
        .await;
    let want = |what| Want {
        what,
        must: published.iter().cloned().collect(),
        fences: fences.iter().cloned().collect(),
        may: HashSet::new(),
        ordered,
    };
    let from_early = collect(
        &mut early_rx,
        want("the group that joined before the publishes"),
    )
    .await;

    // The late group joins after everything was published and acked by the early group: it
    // starts at the beginning of the topic. It acks only every other message.
    let (tx, mut late_rx) = mpsc::unbounded_channel();
    let late = spawn_member(
        "the member of the late group",
        broker.subscribe(&t, "pubsub-groups-late").await,
        |message| message.offset % 2 == 0,
        tx,
    );
    let from_late = collect(
        &mut late_rx,
        want("the group that joined after the publishes"),
    )
    .await;
    for (what, deliveries) in [
        ("the early group", &from_early),
        ("the late group", &from_late),
    ] {
        for delivery in deliveries {
            ledger.check(what, &delivery.message);
            assert_eq!(
                delivery.message.attempt,
                1,
                "{what}: attempt counts the deliveries to this group; the first of {} must be 1",
                summary(&delivery.message)
            );
        }
        if ordered {
            check_partition_order(what, deliveries, true);
        }
    }
    early.stop(Stop::Close).await;
    late.stop(Stop::Close).await;
    broker.close().await;
}

// ---------------------------------------------------------------------------------------
// Consumer groups and redelivery
// ---------------------------------------------------------------------------------------

/// Two members split the partitions; the survivor takes over the other's un-acked messages.
pub async fn members_split_partitions_and_take_over(mut fixture: Box<dyn BrokerFixture>) {
    /// Member A acks the messages below this offset of each of its partitions.
    const ACKED_BELOW: u64 = 2;
    let case = "members_split_partitions_and_take_over";
    let t = topic("pubsub-split");
    let needs = Capabilities {
        consumer_groups: true,
        redelivery: true,
        ..NEEDS_NOTHING
    };
    let Some(broker) = start(&mut *fixture, case, needs, &[&t]).await else {
        return;
    };
    let ordered = broker.capabilities.ordered_by_key;
    let group = "pubsub-split-group";
    let (tx, mut rx) = mpsc::unbounded_channel();
    // Both join before anything is published: no message can go to a member before the
    // partitions are split.
    let a = spawn_member(
        "member A",
        broker.subscribe(&t, group).await,
        |message| message.offset < ACKED_BELOW,
        tx.clone(),
    );
    let b = spawn_member("member B", broker.subscribe(&t, group).await, |_| true, tx);

    let mut ledger = Ledger::new(t.clone());
    let first: Vec<Event> = (0..40)
        .map(|n| {
            event(
                &format!("split-{n}"),
                Some(&format!("split-key-{}", n % 16)),
            )
        })
        .collect();
    let first = ledger.publish(&broker, first, "the first publish").await;
    let first_fences = ledger
        .publish(
            &broker,
            fences("split-1", broker.partitions),
            "the first fences",
        )
        .await;
    let phase_one = collect(
        &mut rx,
        Want {
            what: "the two members of the group",
            must: first.iter().cloned().collect(),
            fences: first_fences.iter().cloned().collect(),
            may: HashSet::new(),
            ordered,
        },
    )
    .await;
    let mut partitions_of: HashMap<&str, HashSet<u32>> = HashMap::new();
    for delivery in &phase_one {
        ledger.check(delivery.member, &delivery.message);
        assert_eq!(
            delivery.message.attempt,
            1,
            "the first delivery of {} must have attempt 1",
            summary(&delivery.message)
        );
        partitions_of
            .entry(delivery.member)
            .or_default()
            .insert(delivery.message.partition);
    }
    let of_a = partitions_of.remove("member A").unwrap_or_default();
    let of_b = partitions_of.remove("member B").unwrap_or_default();
    let shared: Vec<&u32> = of_a.intersection(&of_b).collect();
    assert!(
        shared.is_empty(),
        "each partition must be assigned to one member of the group, but partitions {shared:?} went to both"
    );
    if broker.partitions >= 2 {
        assert!(
            !of_a.is_empty() && !of_b.is_empty(),
            "two members of a group with {} partitions must share them; A got {of_a:?}, B got {of_b:?}",
            broker.partitions
        );
    } else {
        eprintln!("pubsub conformance: {case}: one partition, the split is not checked");
    }
    if ordered {
        check_partition_order("the two members of the group", &phase_one, true);
    }

    // A leaves: B must take over A's un-acked messages, and nothing of the acked prefix.
    a.stop(Stop::Close).await;
    let attempts: HashMap<&str, u32> = phase_one
        .iter()
        .map(|delivery| (delivery.message.event.id.as_str(), delivery.message.attempt))
        .collect();
    let unacked_of_a: HashSet<String> = phase_one
        .iter()
        .filter(|delivery| delivery.member == "member A" && delivery.message.offset >= ACKED_BELOW)
        .map(|delivery| delivery.message.event.id.clone())
        .collect();
    let second = ledger
        .publish(
            &broker,
            events("split-after", 20, None),
            "a publish after A left",
        )
        .await;
    let second_fences = ledger
        .publish(
            &broker,
            fences("split-2", broker.partitions),
            "the second fences",
        )
        .await;
    let phase_two = collect(
        &mut rx,
        Want {
            what: "member B after member A closed",
            must: unacked_of_a
                .iter()
                .cloned()
                .chain(second.iter().cloned())
                .collect(),
            fences: second_fences.iter().cloned().collect(),
            may: HashSet::new(),
            ordered,
        },
    )
    .await;
    for delivery in &phase_two {
        let message = &delivery.message;
        assert_eq!(delivery.member, "member B", "only member B is left");
        ledger.check("member B after member A closed", message);
        if let Some(before) = attempts.get(message.event.id.as_str()) {
            assert!(
                message.attempt > *before,
                "{} was delivered to A with attempt {before}; its redelivery to B must have a greater attempt",
                summary(message)
            );
        }
    }
    if ordered {
        check_partition_order("member B after member A closed", &phase_two, false);
    }
    b.stop(Stop::Close).await;
    broker.close().await;
}

/// A nack redelivers the message and the later un-acked ones of its partition, in order.
pub async fn nack_redelivers_the_rest_of_the_partition(mut fixture: Box<dyn BrokerFixture>) {
    let case = "nack_redelivers_the_rest_of_the_partition";
    let t = topic("pubsub-nack");
    let needs = Capabilities {
        ordered_by_key: true,
        redelivery: true,
        ..NEEDS_NOTHING
    };
    let Some(broker) = start(&mut *fixture, case, needs, &[&t]).await else {
        return;
    };
    let key = "nack-key";
    let mut ledger = Ledger::new(t.clone());
    ledger
        .publish(
            &broker,
            events("nack", 6, Some(key)),
            "a publish of six events with one key",
        )
        .await;
    let mut consumer = broker.subscribe(&t, "pubsub-nack-group").await;
    let mut first = Vec::new();
    for _ in 0..6 {
        let message = recv(&mut *consumer, "the consumer").await;
        ledger.check("the consumer", &message);
        first.push(message);
    }
    let offsets: Vec<u64> = first.iter().map(|message| message.offset).collect();
    assert_eq!(
        offsets,
        [0, 1, 2, 3, 4, 5],
        "one key's six events must arrive in offset order"
    );
    for index in [0, 1, 4] {
        ack(&mut *consumer, &first[index], "the consumer").await;
    }
    consumer
        .nack(&first[2])
        .await
        .unwrap_or_else(|error| panic!("nack of {} failed: {error}", summary(&first[2])));
    let fence = ledger
        .publish(
            &broker,
            vec![event("nack-fence", Some(key))],
            "a fence after the nack",
        )
        .await;

    // Offsets 2, 3 and 5 again (4 was acked and MAY come again), then the fence.
    let again = recv_until(&mut *consumer, &fence[0], "the consumer after a nack").await;
    let got: Vec<(u64, u32)> = again.iter().map(|m| (m.offset, m.attempt)).collect();
    let strict = [(2, 2), (3, 2), (5, 2), (6, 1)];
    let with_acked = [(2, 2), (3, 2), (4, 2), (5, 2), (6, 1)];
    assert!(
        got == strict || got == with_acked,
        "after a nack of offset 2 (0, 1 and 4 acked), (offset, attempt) must be {strict:?} \
         (or {with_acked:?}), got {got:?}"
    );
    for message in &again {
        ledger.check("the consumer after a nack", message);
    }

    // A second nack: attempt rises again, and the un-acked fence comes again after it.
    let five = again
        .iter()
        .find(|m| m.offset == 5)
        .expect("offset 5 was checked above")
        .clone();
    consumer
        .nack(&five)
        .await
        .unwrap_or_else(|error| panic!("nack of {} failed: {error}", summary(&five)));
    let next = recv(&mut *consumer, "the consumer after a second nack").await;
    assert_eq!(
        (next.offset, next.attempt),
        (5, 3),
        "after a second nack of offset 5, (offset, attempt) must be (5, 3)"
    );
    let next = recv(&mut *consumer, "the consumer after a second nack").await;
    assert_eq!(
        (next.offset, next.attempt),
        (6, 2),
        "after a nack of offset 5, the un-acked fence at 6 must come again with attempt 2"
    );
    close(consumer, "the consumer").await;
    broker.close().await;
}

/// Un-acked messages go to the next member after a close, and again after a drop.
pub async fn unacked_messages_are_redelivered(mut fixture: Box<dyn BrokerFixture>) {
    let case = "unacked_messages_are_redelivered";
    let t = topic("pubsub-redelivery");
    let needs = Capabilities {
        redelivery: true,
        ..NEEDS_NOTHING
    };
    let Some(broker) = start(&mut *fixture, case, needs, &[&t]).await else {
        return;
    };
    let ordered = broker.capabilities.ordered_by_key;
    let group = "pubsub-redelivery-group";
    let key = "redelivery-key";
    let mut ledger = Ledger::new(t.clone());
    let ids = ledger
        .publish(
            &broker,
            events("redelivery", 6, Some(key)),
            "a publish of six events with one key",
        )
        .await;
    let set = |indexes: &[usize]| -> HashSet<String> {
        indexes.iter().map(|i| ids[*i].clone()).collect()
    };
    let ordered_want = |what, must: HashSet<String>, fence: &String, may: HashSet<String>| Want {
        what,
        must,
        fences: HashSet::from([fence.clone()]),
        may,
        ordered,
    };

    // The first member acks offsets 0 and 1 (the prefix) and 3 (beyond it), then closes.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let first = spawn_member(
        "the first member",
        broker.subscribe(&t, group).await,
        |message| [0, 1, 3].contains(&message.offset),
        tx,
    );
    let delivered = collect(
        &mut rx,
        Want {
            what: "the first member",
            must: set(&[0, 1, 2, 3, 4, 5]),
            fences: HashSet::new(),
            may: HashSet::new(),
            ordered: false,
        },
    )
    .await;
    let mut attempts: HashMap<String, u32> = delivered
        .iter()
        .map(|d| (d.message.event.id.clone(), d.message.attempt))
        .collect();
    first.stop(Stop::Close).await;

    // The second member gets 2, 4 and 5 again (3 MAY come again), acks 2, and is dropped.
    let fence_one = ledger
        .publish(
            &broker,
            vec![event("redelivery-fence-1", Some(key))],
            "a fence",
        )
        .await
        .remove(0);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let second = spawn_member(
        "the second member",
        broker.subscribe(&t, group).await,
        |message| message.offset == 2,
        tx,
    );
    let redelivered = collect(
        &mut rx,
        ordered_want(
            "the member after the first one closed",
            set(&[2, 4, 5]),
            &fence_one,
            set(&[3]),
        ),
    )
    .await;
    check_redelivered(
        "the member after the first one closed",
        &ledger,
        &redelivered,
        &mut attempts,
        ordered,
    );
    second.stop(Stop::Drop).await;

    // The third member gets 4, 5 and the first fence again (3 MAY come again).
    let fence_two = ledger
        .publish(
            &broker,
            vec![event("redelivery-fence-2", Some(key))],
            "a second fence",
        )
        .await
        .remove(0);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let third = spawn_member(
        "the third member",
        broker.subscribe(&t, group).await,
        |_| true,
        tx,
    );
    let mut must = set(&[4, 5]);
    must.insert(fence_one.clone());
    let redelivered = collect(
        &mut rx,
        ordered_want(
            "the member after the second one was dropped",
            must,
            &fence_two,
            set(&[3]),
        ),
    )
    .await;
    check_redelivered(
        "the member after the second one was dropped",
        &ledger,
        &redelivered,
        &mut attempts,
        ordered,
    );
    third.stop(Stop::Close).await;
    broker.close().await;
}

/// After a restart, messages are still there and the group resumes after its acked prefix.
pub async fn group_resumes_after_restart(mut fixture: Box<dyn BrokerFixture>) {
    /// The messages below this offset of each partition are acked before the restart.
    const ACKED_BELOW: u64 = 2;
    let case = "group_resumes_after_restart";
    let t = topic("pubsub-restart");
    let needs = Capabilities {
        persistent: true,
        ..NEEDS_NOTHING
    };
    let Some(broker) = start(&mut *fixture, case, needs, &[&t]).await else {
        return;
    };
    let ordered = broker.capabilities.ordered_by_key;
    let group = "pubsub-restart-group";
    let mut ledger = Ledger::new(t.clone());
    let events: Vec<Event> = (0..12)
        .map(|n| {
            event(
                &format!("restart-{n}"),
                Some(&format!("restart-key-{}", n % 3)),
            )
        })
        .collect();
    let published = ledger
        .publish(&broker, events, "a publish before the restart")
        .await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let member = spawn_member(
        "the member before the restart",
        broker.subscribe(&t, group).await,
        |message| message.offset < ACKED_BELOW,
        tx,
    );
    let before = collect(
        &mut rx,
        Want {
            what: "the member before the restart",
            must: published.iter().cloned().collect(),
            fences: HashSet::new(),
            may: HashSet::new(),
            ordered: false,
        },
    )
    .await;
    member.stop(Stop::Close).await;
    broker.close().await;

    let broker = restart(&mut *fixture, case).await;
    // The committed offsets survived, and lag reports them before any member joins.
    let want: Vec<PartitionLag> = (0..broker.partitions)
        .map(|partition| {
            let head = ledger.head(partition);
            lag_of(partition, head, head.min(ACKED_BELOW))
        })
        .collect();
    check_lag(
        "lag after the restart, before the group's first member joined",
        &broker.lag(&t, group).await,
        &want,
    );
    // Offsets continue after the restart.
    let fences = ledger
        .publish(
            &broker,
            fences("restart", broker.partitions),
            "the fences after the restart",
        )
        .await;
    let unacked: HashSet<String> = before
        .iter()
        .filter(|delivery| delivery.message.offset >= ACKED_BELOW)
        .map(|delivery| delivery.message.event.id.clone())
        .collect();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let member = spawn_member(
        "the member after the restart",
        broker.subscribe(&t, group).await,
        |_| true,
        tx,
    );
    let after = collect(
        &mut rx,
        Want {
            what: "the group after the restart (it must resume after its acked prefix)",
            must: unacked,
            fences: fences.iter().cloned().collect(),
            may: HashSet::new(),
            ordered,
        },
    )
    .await;
    for delivery in &after {
        ledger.check("the group after the restart", &delivery.message);
    }
    if ordered {
        check_partition_order("the group after the restart", &after, false);
    }
    member.stop(Stop::Close).await;

    // A new group finds every message, exactly as published.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let fresh = spawn_member(
        "the new group's member",
        broker.subscribe(&t, "pubsub-restart-new-group").await,
        |_| true,
        tx,
    );
    let everything = collect(
        &mut rx,
        Want {
            what: "a new group after the restart",
            must: published.iter().cloned().collect(),
            fences: fences.iter().cloned().collect(),
            may: HashSet::new(),
            ordered,
        },
    )
    .await;
    for delivery in &everything {
        ledger.check("a new group after the restart", &delivery.message);
        assert_eq!(
            delivery.message.attempt, 1,
            "the first delivery to a new group must have attempt 1"
        );
    }
    if ordered {
        check_partition_order("a new group after the restart", &everything, true);
    }
    fresh.stop(Stop::Close).await;
    broker.close().await;
}

// ---------------------------------------------------------------------------------------
// Misuse and close
// ---------------------------------------------------------------------------------------

/// Acks and nacks of messages a consumer does not hold fail and change nothing.
pub async fn ack_and_nack_of_messages_not_held_fail(mut fixture: Box<dyn BrokerFixture>) {
    let case = "ack_and_nack_of_messages_not_held_fail";
    let (t, other) = (topic("pubsub-not-held"), topic("pubsub-not-held-other"));
    let Some(broker) = start(&mut *fixture, case, NEEDS_NOTHING, &[&t, &other]).await else {
        return;
    };
    let key = "not-held-key";
    let mut ledger = Ledger::new(t.clone());
    ledger
        .publish(
            &broker,
            events("not-held", 3, Some(key)),
            "a publish of three events with one key",
        )
        .await;
    let mut consumer = broker.subscribe(&t, "pubsub-not-held-group").await;
    let mut bystander = broker.subscribe(&t, "pubsub-not-held-bystander").await;
    let held = recv(&mut *consumer, "the consumer").await;
    ledger.check("the consumer", &held);

    let mut wrong_offset = held.clone();
    wrong_offset.offset = 1_000_000;
    let mut wrong_topic = held.clone();
    wrong_topic.topic = other.clone();
    for (what, message) in [
        ("a message at an offset that does not exist", &wrong_offset),
        ("a message of another topic", &wrong_topic),
    ] {
        expect_not_held(
            &format!("ack of {what}"),
            &consumer.ack(message).await,
            message,
        );
        expect_not_held(
            &format!("nack of {what}"),
            &consumer.nack(message).await,
            message,
        );
    }
    expect_not_held(
        "ack of a message delivered to another group's consumer",
        &bystander.ack(&held).await,
        &held,
    );
    expect_not_held(
        "nack of a message delivered to another group's consumer",
        &bystander.nack(&held).await,
        &held,
    );

    // The consumer is undisturbed: its message can be acked, the next one follows.
    ack(&mut *consumer, &held, "the consumer").await;
    let next = recv(&mut *consumer, "the consumer after failed acks").await;
    ledger.check("the consumer after failed acks", &next);
    assert_ne!(
        next.event.id, held.event.id,
        "an acked message must not come again"
    );
    close(consumer, "the consumer").await;
    close(bystander, "the other group's consumer").await;
    broker.close().await;
}

/// A closed publisher refuses publishes; consumers close cleanly.
pub async fn publish_after_close_fails(mut fixture: Box<dyn BrokerFixture>) {
    let case = "publish_after_close_fails";
    let t = topic("pubsub-close");
    let Some(broker) = start(&mut *fixture, case, NEEDS_NOTHING, &[&t]).await else {
        return;
    };
    let mut ledger = Ledger::new(t.clone());
    ledger
        .publish(&broker, events("close", 2, None), "a publish before close")
        .await;
    let mut consumer = broker.subscribe(&t, "pubsub-close-group").await;
    let message = recv(&mut *consumer, "the consumer").await;
    ledger.check("the consumer", &message);
    ack(&mut *consumer, &message, "the consumer").await;
    close(consumer, "the consumer").await;

    broker
        .publisher
        .close()
        .await
        .unwrap_or_else(|error| panic!("Publisher::close failed: {error}"));
    match broker
        .publisher
        .publish(&t, events("close-after", 1, None))
        .await
    {
        Err(Error::Closed) => {}
        other => panic!(
            "a publish after Publisher::close must fail with Closed, got {}",
            describe(&other)
        ),
    }
}

// ---------------------------------------------------------------------------------------
// Lag
// ---------------------------------------------------------------------------------------

/// Lag is head minus the durable committed offset, per partition, for any group.
pub async fn lag_counts_what_the_group_has_not_committed(mut fixture: Box<dyn BrokerFixture>) {
    /// The prefix group acks the messages below this offset of each partition.
    const ACKED_BELOW: u64 = 2;
    let case = "lag_counts_what_the_group_has_not_committed";
    let t = topic("pubsub-lag");
    let unknown = topic("pubsub-lag-unknown");
    let Some(broker) = start(&mut *fixture, case, NEEDS_NOTHING, &[&t]).await else {
        return;
    };
    let partitions = broker.partitions;
    let (never, all, prefix) = ("pubsub-lag-never", "pubsub-lag-all", "pubsub-lag-prefix");
    let check_unknown = |what: &str, result: &Result<Vec<PartitionLag>, Error>| match result {
        Err(Error::UnknownTopic { topic }) if *topic == unknown => {}
        other => panic!(
            "{what}: lag of a topic that does not exist must fail with UnknownTopic naming it, \
             got {}",
            describe(other)
        ),
    };
    check_unknown("before any publish", &broker.lag(&unknown, never).await);

    let mut ledger = Ledger::new(t.clone());
    let events: Vec<Event> = (0..6 * partitions as usize)
        .map(|n| event(&format!("lag-{n}"), Some(&format!("lag-key-{}", n % 7))))
        .collect();
    let published = ledger.publish(&broker, events, "a publish").await;
    check_lag(
        "lag of a group that never joined, after a publish",
        &broker.lag(&t, never).await,
        &ledger.lag(partitions, |_| 0),
    );

    // One group acks everything, another the first offsets of each partition.
    let (tx, mut all_rx) = mpsc::unbounded_channel();
    let all_member = spawn_member(
        "the member acking everything",
        broker.subscribe(&t, all).await,
        |_| true,
        tx,
    );
    let (tx, mut prefix_rx) = mpsc::unbounded_channel();
    let prefix_member = spawn_member(
        "the member acking a prefix",
        broker.subscribe(&t, prefix).await,
        |message| message.offset < ACKED_BELOW,
        tx,
    );
    for (what, rx) in [
        ("the member acking everything", &mut all_rx),
        ("the member acking a prefix", &mut prefix_rx),
    ] {
        collect(
            rx,
            Want {
                what,
                must: published.iter().cloned().collect(),
                fences: HashSet::new(),
                may: HashSet::new(),
                ordered: false,
            },
        )
        .await;
    }
    all_member.stop(Stop::Close).await;
    prefix_member.stop(Stop::Close).await;
    check_lag(
        "lag of a group whose member acked everything and closed",
        &broker.lag(&t, all).await,
        &ledger.lag(partitions, |head| head),
    );
    check_lag(
        "lag of a group whose member acked the first offsets of each partition and closed",
        &broker.lag(&t, prefix).await,
        &ledger.lag(partitions, |head| head.min(ACKED_BELOW)),
    );
    check_lag(
        "lag of a group that never joined, after other groups consumed",
        &broker.lag(&t, never).await,
        &ledger.lag(partitions, |_| 0),
    );

    // New messages raise the head and the lag; committed offsets stay.
    ledger
        .publish(&broker, fences("lag", partitions), "the fences")
        .await;
    check_lag(
        "lag of the group that acked everything, after a later publish",
        &broker.lag(&t, all).await,
        &ledger.lag(partitions, |head| head - 1),
    );
    check_unknown(
        "after lags were asked for (asking must not create the topic)",
        &broker.lag(&unknown, never).await,
    );
    broker.close().await;
}

// ---------------------------------------------------------------------------------------
// Sticky assignment and cancel safety
// ---------------------------------------------------------------------------------------

/// When a member leaves, the others keep their partitions and can ack what they received.
pub async fn a_leave_moves_only_the_leavers_partitions(mut fixture: Box<dyn BrokerFixture>) {
    let case = "a_leave_moves_only_the_leavers_partitions";
    let t = topic("pubsub-sticky");
    let needs = Capabilities {
        consumer_groups: true,
        redelivery: true,
        ..NEEDS_NOTHING
    };
    let Some(broker) = start(&mut *fixture, case, needs, &[&t]).await else {
        return;
    };
    let partitions = broker.partitions;
    if partitions < 2 {
        eprintln!("pubsub conformance: skipping {case}: it needs at least two partitions");
        broker.close().await;
        return;
    }
    let group = "pubsub-sticky-group";
    let mut members = Vec::new();
    for _ in 0..partitions.min(3) {
        members.push(broker.subscribe(&t, group).await);
    }
    let mut ledger = Ledger::new(t.clone());
    let first = ledger
        .publish(
            &broker,
            fences("sticky-1", partitions),
            "one message per partition",
        )
        .await;
    let received = recv_from_all(&mut members, first.len(), "the members before one leaves").await;
    let mut holder: HashMap<u32, usize> = HashMap::new();
    for (member, message) in &received {
        ledger.check("the members before one leaves", message);
        if let Some(other) = holder.insert(message.partition, *member) {
            panic!(
                "partition {} went to members {other} and {member} of one group",
                message.partition
            );
        }
    }
    for member in 0..members.len() {
        assert!(
            holder.values().any(|holder| *holder == member),
            "with {} members and {partitions} partitions, every member must get a partition; \
             member {member} got none",
            members.len()
        );
    }

    // Member 0 leaves without acking: its partitions move, no other partition does.
    let leaver = members.remove(0);
    close(leaver, "the leaving member").await;
    for (member, message) in received.iter().filter(|(member, _)| *member > 0) {
        members[member - 1]
            .ack(message)
            .await
            .unwrap_or_else(|error| {
                panic!(
                    "member {member} received {} before another member left; its ack must \
                     succeed after the leave (a leave moves only the leaver's partitions), \
                     but failed: {error}",
                    summary(message)
                )
            });
    }
    let leavers: HashSet<String> = received
        .iter()
        .filter(|(member, _)| *member == 0)
        .map(|(_, message)| message.event.id.clone())
        .collect();
    let second = ledger
        .publish(
            &broker,
            fences("sticky-2", partitions),
            "one message per partition again",
        )
        .await;
    let again = recv_from_all(
        &mut members,
        second.len() + leavers.len(),
        "the members after one left",
    )
    .await;
    let mut seen = HashSet::new();
    for (member, message) in &again {
        let what = "the members after one left";
        ledger.check(what, message);
        let id = &message.event.id;
        assert!(
            seen.insert(id.clone()),
            "{what}: {} arrived twice",
            summary(message)
        );
        assert!(
            second.contains(id) || leavers.contains(id),
            "{what}: {} must not come again: it was acked by a member that stayed",
            summary(message)
        );
        let before = holder[&message.partition];
        if before != 0 {
            assert_eq!(
                before,
                member + 1,
                "{what}: partition {} was held by member {before}, which stayed; it must not \
                 move, but member {} received {}",
                message.partition,
                member + 1,
                summary(message)
            );
        }
    }
    for member in members {
        close(member, "a member that stayed").await;
    }
    broker.close().await;
}

/// Dropping `recv` futures at any point loses no message.
pub async fn recv_is_cancel_safe(mut fixture: Box<dyn BrokerFixture>) {
    /// Rounds of publishes and abandoned receives.
    const ROUNDS: usize = 150;
    /// Polls of an abandoned `recv` before it is dropped, at most.
    const POLLS_MAX: u64 = 4;
    let case = "recv_is_cancel_safe";
    let t = topic("pubsub-cancel");
    let Some(broker) = start(&mut *fixture, case, NEEDS_NOTHING, &[&t]).await else {
        return;
    };
    let ordered = broker.capabilities.ordered_by_key;
    let what = "a consumer whose recv futures are dropped";
    let mut consumer = broker.subscribe(&t, "pubsub-cancel-group").await;
    let mut ledger = Ledger::new(t.clone());
    let mut random = SplitMix(0x5eed_cafe);
    let mut published: Vec<String> = Vec::new();
    let mut received: Vec<Delivery> = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    for round in 0..ROUNDS {
        if random.below(3) > 0 {
            let count = 1 + random.below(3) as usize;
            let batch = events(&format!("cancel-{round}"), count, None);
            published.extend(ledger.publish(&broker, batch, "a publish").await);
        }
        for _ in 0..random.below(4) {
            let polls = random.below(POLLS_MAX + 1);
            if let Some(next) = abandoned_recv(&mut *consumer, polls).await {
                let message = delivered(what, next);
                accept(what, &ledger, &mut seen, &message);
                ack(&mut *consumer, &message, what).await;
                received.push(Delivery {
                    member: "the consumer",
                    message,
                });
            }
        }
    }
    let fences = ledger
        .publish(&broker, fences("cancel", broker.partitions), "the fences")
        .await;
    // The rest arrives through whole receives. With order per partition the fences come
    // last in theirs, so a message lost earlier shows as missing once they have arrived.
    let mut fences_left: HashSet<&String> = fences.iter().collect();
    let total = published.len() + fences.len();
    while if ordered {
        !fences_left.is_empty()
    } else {
        seen.len() < total
    } {
        let message = recv(&mut *consumer, what).await;
        accept(what, &ledger, &mut seen, &message);
        fences_left.remove(&message.event.id);
        ack(&mut *consumer, &message, what).await;
        received.push(Delivery {
            member: "the consumer",
            message,
        });
    }
    let missing: Vec<&String> = published
        .iter()
        .chain(&fences)
        .filter(|id| !seen.contains(*id))
        .collect();
    assert!(
        missing.is_empty(),
        "{what}: {} of {total} messages were lost (e.g. event `{}`): a dropped recv must not \
         lose the message it was about to return",
        missing.len(),
        missing.first().map_or("", |id| id.as_str())
    );
    if ordered {
        check_partition_order(what, &received, true);
    }
    close(consumer, "the consumer").await;
    broker.close().await;
}

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

const SOURCE: &str = "/herald/pubsub-conformance";
const TYPE: &str = "herald.pubsub-conformance.tested";

/// A started broker.
struct Broker {
    publisher: Arc<dyn Publisher>,
    subscriber: Arc<dyn Subscriber>,
    capabilities: Capabilities,
    partitions: u32,
}

impl Broker {
    async fn subscribe(&self, topic: &TopicName, group: &str) -> Box<dyn Consumer> {
        let group = GroupName::new(group).expect("the suite's group names are valid");
        self.subscriber
            .subscribe(topic, &group)
            .await
            .unwrap_or_else(|error| {
                panic!("subscribe to `{topic}` as group `{group}` failed: {error}")
            })
    }

    async fn lag(&self, topic: &TopicName, group: &str) -> Result<Vec<PartitionLag>, Error> {
        let group = GroupName::new(group).expect("the suite's group names are valid");
        self.subscriber.lag(topic, &group).await
    }

    /// Closes the publisher and drops both handles.
    async fn close(self) {
        self.publisher
            .close()
            .await
            .unwrap_or_else(|error| panic!("Publisher::close failed: {error}"));
    }
}

/// Starts the broker and creates `topics`; `None` (after saying so) when the backend lacks
/// a capability in `needs`.
async fn start(
    fixture: &mut dyn BrokerFixture,
    case: &str,
    needs: Capabilities,
    topics: &[&TopicName],
) -> Option<Broker> {
    let broker = restart(fixture, case).await;
    let have = broker.capabilities;
    let missing: Vec<&str> = [
        ("ordered_by_key", needs.ordered_by_key, have.ordered_by_key),
        (
            "consumer_groups",
            needs.consumer_groups,
            have.consumer_groups,
        ),
        ("persistent", needs.persistent, have.persistent),
        ("redelivery", needs.redelivery, have.redelivery),
    ]
    .into_iter()
    .filter(|(_, needed, declared)| *needed && !*declared)
    .map(|(name, _, _)| name)
    .collect();
    if !missing.is_empty() {
        eprintln!(
            "pubsub conformance: skipping {case}: the backend does not declare {}",
            missing.join(", ")
        );
        broker.close().await;
        return None;
    }
    for topic in topics {
        fixture.create_topic(topic).await;
    }
    Some(broker)
}

/// Starts the broker (again) without creating topics.
async fn restart(fixture: &mut dyn BrokerFixture, case: &str) -> Broker {
    let partitions = fixture.partitions();
    assert!(
        partitions > 0,
        "{case}: the fixture must declare at least one partition"
    );
    let (publisher, subscriber) = fixture.start().await;
    let capabilities = subscriber.capabilities();
    Broker {
        publisher,
        subscriber,
        capabilities,
        partitions,
    }
}

/// An event published to one topic, and where it went.
struct Sent {
    event: Event,
    at: Published,
}

/// What a case published to one topic: every event by id, and the next offset of each
/// partition.
struct Ledger {
    topic: TopicName,
    sent: HashMap<String, Sent>,
    next_offset: HashMap<u32, u64>,
}

impl Ledger {
    fn new(topic: TopicName) -> Self {
        Ledger {
            topic,
            sent: HashMap::new(),
            next_offset: HashMap::new(),
        }
    }

    /// Publishes `events` and checks their partitions and offsets; returns their ids.
    async fn publish(&mut self, broker: &Broker, events: Vec<Event>, what: &str) -> Vec<String> {
        let placed = broker
            .publisher
            .publish(&self.topic, events.clone())
            .await
            .unwrap_or_else(|error| panic!("{what} to `{}` failed: {error}", self.topic));
        assert_eq!(
            placed.len(),
            events.len(),
            "{what}: publish must return one result per event"
        );
        let mut ids = Vec::with_capacity(events.len());
        for (event, at) in events.into_iter().zip(placed) {
            let key = broker::partition_key(&event);
            assert_eq!(
                at.partition,
                broker::partition_for(key, broker.partitions),
                "{what}: event `{}` with key `{key}` went to the wrong partition",
                event.id
            );
            let next = self.next_offset.entry(at.partition).or_insert(0);
            assert_eq!(
                at.offset, *next,
                "{what}: offsets of partition {} must be contiguous from 0 (event `{}`)",
                at.partition, event.id
            );
            *next += 1;
            ids.push(event.id.clone());
            self.record(event, at);
        }
        ids
    }

    /// The offset after the last message published to `partition`.
    fn head(&self, partition: u32) -> u64 {
        self.next_offset.get(&partition).copied().unwrap_or(0)
    }

    /// The lag of every partition when the committed offset of a partition of `head`
    /// messages is `committed(head)`.
    fn lag(&self, partitions: u32, committed: impl Fn(u64) -> u64) -> Vec<PartitionLag> {
        (0..partitions)
            .map(|partition| {
                let head = self.head(partition);
                lag_of(partition, head, committed(head))
            })
            .collect()
    }

    fn record(&mut self, event: Event, at: Published) {
        let id = event.id.clone();
        let previous = self.sent.insert(id.clone(), Sent { event, at });
        assert!(previous.is_none(), "the suite publishes event `{id}` once");
    }

    /// Checks that `message` is one this ledger published, where it was published, exactly.
    fn check(&self, what: &str, message: &Message) {
        assert_eq!(
            message.topic,
            self.topic,
            "{what}: {} arrived on the wrong topic",
            summary(message)
        );
        let sent = self.sent.get(&message.event.id).unwrap_or_else(|| {
            panic!(
                "{what}: {} was never published to `{}`",
                summary(message),
                self.topic
            )
        });
        assert_eq!(
            (message.partition, message.offset),
            (sent.at.partition, sent.at.offset),
            "{what}: event `{}` arrived with another partition and offset than publish returned",
            message.event.id
        );
        check_exact(what, &message.event, &sent.event);
    }
}

/// How a member task ends.
#[derive(Debug, Clone, Copy)]
enum Stop {
    /// With [`Consumer::close`].
    Close,
    /// By dropping the consumer.
    Drop,
}

/// A message as some member received it.
struct Delivery {
    member: &'static str,
    message: Message,
}

/// What a member task reports: a delivery, or a failure the case turns into a panic.
type Report = Result<Delivery, String>;

/// A consumer run by a task that receives, acks per its policy, then reports each message.
struct Member {
    name: &'static str,
    stop: oneshot::Sender<Stop>,
    task: JoinHandle<Result<(), String>>,
}

/// Runs `consumer` in a task: every message is acked when `acks` says so, then reported on
/// `reports` (so a reported message is already acked). The channel is unbounded, but only
/// carries what the case published.
fn spawn_member(
    name: &'static str,
    mut consumer: Box<dyn Consumer>,
    acks: impl Fn(&Message) -> bool + Send + 'static,
    reports: mpsc::UnboundedSender<Report>,
) -> Member {
    let (stop, mut stopped) = oneshot::channel();
    let task = tokio::spawn(async move {
        let how = loop {
            // Stopping abandons a pending `recv`; the consumer is closed or dropped right
            // after, so a message it may have taken is redelivered to the group.
            let next = tokio::select! {
                biased;
                how = &mut stopped => break how.unwrap_or(Stop::Close),
                next = consumer.recv() => next,
            };
            let failure = match next {
                Some(Ok(message)) => {
                    let acked = if acks(&message) {
                        consumer.ack(&message).await.map_err(|error| {
                            format!("{name}: ack of {} failed: {error}", summary(&message))
                        })
                    } else {
                        Ok(())
                    };
                    match acked {
                        Ok(()) => {
                            // The case may have stopped listening; that is its business.
                            let _ = reports.send(Ok(Delivery {
                                member: name,
                                message,
                            }));
                            continue;
                        }
                        Err(failure) => failure,
                    }
                }
                Some(Err(error)) => format!("{name}: recv failed: {error}"),
                None => format!("{name}: recv returned None before the consumer was closed"),
            };
            let _ = reports.send(Err(failure));
            break (&mut stopped).await.unwrap_or(Stop::Close);
        };
        match how {
            Stop::Close => consumer
                .close()
                .await
                .map_err(|error| format!("{name}: Consumer::close failed: {error}")),
            Stop::Drop => {
                drop(consumer);
                Ok(())
            }
        }
    });
    Member { name, stop, task }
}

impl Member {
    /// Stops the task and closes or drops its consumer; panics on a failure to close.
    async fn stop(self, how: Stop) {
        let _ = self.stop.send(how);
        match tokio::time::timeout(WAIT_MAX, self.task).await {
            Err(_) => panic!(
                "{}: stopping ({how:?}) did not finish within {WAIT_MAX:?}",
                self.name
            ),
            Ok(Err(join)) => std::panic::resume_unwind(join.into_panic()),
            Ok(Ok(Err(failure))) => panic!("{failure}"),
            Ok(Ok(Ok(()))) => {}
        }
    }
}

/// What [`collect`] waits for.
struct Want<'a> {
    what: &'a str,
    /// Messages that MUST arrive (by event id).
    must: HashSet<String>,
    /// Messages published last, one per partition concerned: MUST arrive, and with
    /// `ordered`, mark the end.
    fences: HashSet<String>,
    /// Messages that MAY arrive (once).
    may: HashSet<String>,
    /// Whether the backend keeps order per partition, so a fence arrives after everything
    /// published before it to its partition.
    ordered: bool,
}

/// Receives reports until everything wanted has arrived (with `ordered` and fences: until
/// every fence has), panicking on a failure, an unexpected or duplicate message, or a hang.
async fn collect(reports: &mut mpsc::UnboundedReceiver<Report>, want: Want<'_>) -> Vec<Delivery> {
    let what = want.what;
    let mut seen: HashSet<String> = HashSet::new();
    let mut deliveries = Vec::new();
    let done = |seen: &HashSet<String>| {
        let fences_seen = want.fences.iter().all(|id| seen.contains(id));
        if want.ordered && !want.fences.is_empty() {
            fences_seen
        } else {
            fences_seen && want.must.iter().all(|id| seen.contains(id))
        }
    };
    while !done(&seen) {
        let report = match tokio::time::timeout(WAIT_MAX, reports.recv()).await {
            Err(_) => {
                let missing = want
                    .must
                    .iter()
                    .chain(&want.fences)
                    .filter(|id| !seen.contains(*id))
                    .count();
                panic!("{what}: {missing} messages did not arrive within {WAIT_MAX:?}")
            }
            Ok(None) => panic!("{what}: every member stopped before the messages arrived"),
            Ok(Some(report)) => report,
        };
        let delivery = report.unwrap_or_else(|failure| panic!("{what}: {failure}"));
        let id = &delivery.message.event.id;
        if !(want.must.contains(id) || want.fences.contains(id) || want.may.contains(id)) {
            panic!(
                "{what}: {} received by {} must not be delivered here (acked by the group before, or not published)",
                summary(&delivery.message),
                delivery.member
            );
        }
        if !seen.insert(id.clone()) {
            panic!(
                "{what}: {} was delivered twice (again to {})",
                summary(&delivery.message),
                delivery.member
            );
        }
        deliveries.push(delivery);
    }
    let missing: Vec<&String> = want.must.iter().filter(|id| !seen.contains(*id)).collect();
    assert!(
        missing.is_empty(),
        "{what}: {} messages never arrived although the fences of their partitions did \
         (order per partition), e.g. event `{}`",
        missing.len(),
        missing[0]
    );
    deliveries
}

/// Checks that each partition's offsets rose (`from_zero`: were exactly `0, 1, 2, …`).
fn check_partition_order(what: &str, deliveries: &[Delivery], from_zero: bool) {
    let mut by_partition: HashMap<u32, Vec<u64>> = HashMap::new();
    for delivery in deliveries {
        by_partition
            .entry(delivery.message.partition)
            .or_default()
            .push(delivery.message.offset);
    }
    for (partition, offsets) in by_partition {
        if from_zero {
            let want: Vec<u64> = (0..offsets.len() as u64).collect();
            assert_eq!(
                offsets, want,
                "{what}: offsets of partition {partition} must arrive in order, once each"
            );
        } else {
            assert!(
                offsets.windows(2).all(|pair| pair[0] < pair[1]),
                "{what}: offsets of partition {partition} must arrive in rising order, got {offsets:?}"
            );
        }
    }
}

/// Checks that each key's events arrived in publish (offset) order.
fn check_key_order(what: &str, ledger: &Ledger, deliveries: &[Delivery]) {
    let mut last: HashMap<&str, u64> = HashMap::new();
    for delivery in deliveries {
        let sent = &ledger.sent[&delivery.message.event.id];
        let key = broker::partition_key(&sent.event);
        if let Some(previous) = last.insert(key, sent.at.offset) {
            assert!(
                previous < sent.at.offset,
                "{what}: events with key `{key}` must arrive in publish order; offset {} came after {previous}",
                sent.at.offset
            );
        }
    }
}

/// Checks that each key's offsets rose in the order the events were published; `published`
/// lists each writer's events in its publish order.
fn check_key_offsets_rise(ledger: &Ledger, published: &[String]) {
    let mut last: HashMap<&str, u64> = HashMap::new();
    for id in published {
        let sent = &ledger.sent[id];
        let key = broker::partition_key(&sent.event);
        if let Some(previous) = last.insert(key, sent.at.offset) {
            assert!(
                previous < sent.at.offset,
                "a later publish of key `{key}` got offset {} below an earlier one's {previous}",
                sent.at.offset
            );
        }
    }
}

/// Checks redelivered messages: exact, with a greater attempt than before (and records it),
/// and, with order, in rising offsets.
fn check_redelivered(
    what: &str,
    ledger: &Ledger,
    deliveries: &[Delivery],
    attempts: &mut HashMap<String, u32>,
    ordered: bool,
) {
    for delivery in deliveries {
        let message = &delivery.message;
        ledger.check(what, message);
        if let Some(before) = attempts.insert(message.event.id.clone(), message.attempt) {
            assert!(
                message.attempt > before,
                "{what}: {} was delivered before with attempt {before}; a redelivery must have a greater attempt",
                summary(message)
            );
        } else {
            assert_eq!(
                message.attempt,
                1,
                "{what}: the first delivery of {} must have attempt 1",
                summary(message)
            );
        }
    }
    if ordered {
        check_partition_order(what, deliveries, false);
    }
}

fn lag_of(partition: u32, head: u64, committed: u64) -> PartitionLag {
    PartitionLag::new(partition, head, committed)
        .expect("the suite expects no committed offset beyond the head")
}

/// Checks a [`Subscriber::lag`] result against the lag expected.
fn check_lag(what: &str, result: &Result<Vec<PartitionLag>, Error>, want: &[PartitionLag]) {
    let got = result
        .as_ref()
        .unwrap_or_else(|error| panic!("{what}: Subscriber::lag failed: {error}"));
    assert_eq!(
        got.as_slice(),
        want,
        "{what}: lag must list every partition once, in order, with its head, the durable \
         committed offset and head - committed"
    );
}

/// Receives from every member at once until `count` messages have arrived; returns each
/// with the index of the member that received it. The receives still pending at the end
/// are dropped (`recv` is cancel-safe), so nothing published after them is lost.
async fn recv_from_all(
    members: &mut [Box<dyn Consumer>],
    count: usize,
    what: &str,
) -> Vec<(usize, Message)> {
    async fn next(
        index: usize,
        consumer: &mut Box<dyn Consumer>,
    ) -> (
        usize,
        &mut Box<dyn Consumer>,
        Option<Result<Message, Error>>,
    ) {
        let next = consumer.recv().await;
        (index, consumer, next)
    }
    let mut pending: FuturesUnordered<_> = members
        .iter_mut()
        .enumerate()
        .map(|(index, consumer)| next(index, consumer))
        .collect();
    let mut received = Vec::with_capacity(count);
    while received.len() < count {
        let (index, consumer, result) = match tokio::time::timeout(WAIT_MAX, pending.next()).await {
            Err(_) => panic!(
                "{what}: {} of {count} messages did not arrive within {WAIT_MAX:?}",
                count - received.len()
            ),
            Ok(None) => panic!("{what}: there is no member to receive from"),
            Ok(Some(next)) => next,
        };
        received.push((index, delivered(what, result)));
        pending.push(next(index, consumer));
    }
    received
}

/// Polls a `recv` up to `polls` times, yielding to the runtime in between, and drops it
/// unless it completed; returns what it returned if it did.
async fn abandoned_recv(
    consumer: &mut dyn Consumer,
    polls: u64,
) -> Option<Option<Result<Message, Error>>> {
    let mut pending = consumer.recv();
    for _ in 0..polls {
        if let Poll::Ready(result) = futures::poll!(&mut pending) {
            return Some(result);
        }
        tokio::task::yield_now().await;
    }
    None
}

/// The message of a completed `recv`, or a panic naming what went wrong.
fn delivered(what: &str, result: Option<Result<Message, Error>>) -> Message {
    match result {
        None => panic!("{what}: recv returned None before the consumer was closed"),
        Some(Err(error)) => panic!("{what}: recv failed: {error}"),
        Some(Ok(message)) => message,
    }
}

/// Checks a message delivered once: as published, attempt 1, not seen before.
fn accept(what: &str, ledger: &Ledger, seen: &mut HashSet<String>, message: &Message) {
    ledger.check(what, message);
    assert!(
        seen.insert(message.event.id.clone()),
        "{what}: {} was delivered twice",
        summary(message)
    );
    assert_eq!(
        message.attempt,
        1,
        "{what}: the first delivery of {} must have attempt 1",
        summary(message)
    );
}

/// SplitMix64: the suite's seeded source of choices, so a failing run can be replayed.
struct SplitMix(u64);

impl SplitMix {
    /// A number in `0..bound`.
    fn below(&mut self, bound: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) % bound
    }
}

async fn recv(consumer: &mut dyn Consumer, what: &str) -> Message {
    match tokio::time::timeout(WAIT_MAX, consumer.recv()).await {
        Err(_) => panic!("{what}: no message within {WAIT_MAX:?}"),
        Ok(None) => panic!("{what}: recv returned None before the consumer was closed"),
        Ok(Some(Err(error))) => panic!("{what}: recv failed: {error}"),
        Ok(Some(Ok(message))) => message,
    }
}

/// Receives up to and including the message with event id `last`.
async fn recv_until(consumer: &mut dyn Consumer, last: &str, what: &str) -> Vec<Message> {
    let mut messages = Vec::new();
    loop {
        let message = recv(consumer, what).await;
        let end = message.event.id == last;
        messages.push(message);
        if end {
            return messages;
        }
        assert!(
            messages.len() <= 1_000,
            "{what}: too many messages before `{last}`"
        );
    }
}

async fn ack(consumer: &mut dyn Consumer, message: &Message, what: &str) {
    consumer
        .ack(message)
        .await
        .unwrap_or_else(|error| panic!("{what}: ack of {} failed: {error}", summary(message)));
}

async fn close(consumer: Box<dyn Consumer>, what: &str) {
    consumer
        .close()
        .await
        .unwrap_or_else(|error| panic!("{what}: Consumer::close failed: {error}"));
}

/// The result of acking or nacking a message not held MUST be an error; `NotHeld` MUST name
/// the message.
fn expect_not_held(what: &str, result: &Result<(), Error>, message: &Message) {
    match result {
        Ok(()) => panic!("{what} must fail (NotHeld), but succeeded"),
        Err(Error::NotHeld {
            topic,
            partition,
            offset,
        }) => assert_eq!(
            (topic, *partition, *offset),
            (&message.topic, message.partition, message.offset),
            "{what}: NotHeld must name the message"
        ),
        Err(_) => {}
    }
}

fn describe<T: std::fmt::Debug>(result: &Result<T, Error>) -> String {
    match result {
        Ok(value) => format!("Ok({value:?})"),
        Err(error) => format!("Err({error:?})"),
    }
}

fn summary(message: &Message) -> String {
    format!(
        "{}/{}@{} attempt {} ({})",
        message.topic,
        message.partition,
        message.offset,
        message.attempt,
        message
            .event
            .subject
            .as_deref()
            .unwrap_or(&message.event.id)
    )
}

fn topic(name: &str) -> TopicName {
    TopicName::new(name).expect("the suite's topic names are valid")
}

fn event(label: &str, key: Option<&str>) -> Event {
    let event = Event::new(SOURCE, TYPE)
        .with_subject(label)
        .with_data(json!({ "label": label }));
    match key {
        Some(key) => event.with_partition_key(key),
        None => event,
    }
}

fn events(prefix: &str, count: usize, key: Option<&str>) -> Vec<Event> {
    (0..count)
        .map(|n| event(&format!("{prefix}-{n}"), key))
        .collect()
}

/// One event per partition, in partition order, each with a key of that partition.
fn fences(prefix: &str, partitions: u32) -> Vec<Event> {
    (0..partitions)
        .map(|partition| {
            let key = (0..)
                .map(|n| format!("{prefix}-fence-{n}"))
                .find(|key| broker::partition_for(key, partitions) == partition)
                .expect("some key falls into every partition");
            event(&format!("{prefix}-fence-{partition}"), Some(&key))
        })
        .collect()
}
