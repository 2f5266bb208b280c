//! The embedded broker on a real log in a temporary directory: partitioning and offsets,
//! consumer groups and sticky rebalancing, ack / nack, lag, and a restart on the same
//! directory.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use herald_core::broker::{
    Consumer, Error, GroupName, Message, PartitionLag, Publisher, Subscriber, TopicName,
    partition_for,
};
use herald_core::{Direction, Event, EventStore, StreamName, Version};
use herald_log::broker::{Broker, BrokerOptions};
use herald_log::io::Io;
use herald_log::io::sim::SimIo;
use herald_log::{Log, Options};

/// A hang guard, never a synchronisation: a case waiting this long has failed.
const WAIT_MAX: Duration = Duration::from_secs(20);

async fn open(dir: &Path) -> Log {
    let options = Options::new(dir);
    tokio::task::spawn_blocking(move || Log::open(options))
        .await
        .expect("the open task")
        .expect("the log opens")
}

fn topic(name: &str) -> TopicName {
    TopicName::new(name).unwrap()
}

fn group(name: &str) -> GroupName {
    GroupName::new(name).unwrap()
}

/// A partition key that lands in `partition` of `partitions`.
fn key_for(partition: u32, partitions: u32) -> String {
    (0..)
        .map(|n| format!("key-{n}"))
        .find(|key| partition_for(key, partitions) == partition)
        .unwrap()
}

fn event(key: &str, n: usize) -> Event {
    Event::new("/test", "TestEvent")
        .with_partition_key(key)
        .with_data(serde_json::json!({ "key": key, "n": n }))
}

/// One event for each partition in `0..partitions`, `rounds` times, in rounds.
fn events_per_partition(partitions: u32, rounds: usize) -> Vec<Event> {
    (0..rounds)
        .flat_map(|round| {
            (0..partitions).map(move |partition| event(&key_for(partition, partitions), round))
        })
        .collect()
}

async fn next(consumer: &mut Box<dyn Consumer>) -> Message {
    tokio::time::timeout(WAIT_MAX, consumer.recv())
        .await
        .expect("a message before the hang guard")
        .expect("the consumer is open")
        .expect("a message, not an error")
}

async fn take(consumer: &mut Box<dyn Consumer>, count: usize) -> Vec<Message> {
    let mut messages = Vec::with_capacity(count);
    for _ in 0..count {
        messages.push(next(consumer).await);
    }
    messages
}

fn n_of(message: &Message) -> u64 {
    message
        .event
        .data_as::<serde_json::Value>()
        .unwrap()
        .unwrap()["n"]
        .as_u64()
        .unwrap()
}

fn at(messages: &[Message]) -> BTreeSet<(u32, u64)> {
    messages.iter().map(|m| (m.partition, m.offset)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_partitions_by_key_with_contiguous_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path()).await;
    let broker = Broker::new(log.clone(), BrokerOptions::default());
    let orders = topic("orders");
    assert_eq!(broker.create_topic(&orders, 4).await.unwrap(), 4);
    assert_eq!(
        broker.create_topic(&orders, 7).await.unwrap(),
        4,
        "the partition count is fixed at creation"
    );

    let keys: Vec<String> = (0..6).map(|n| format!("order-{n}")).collect();
    let events: Vec<Event> = (0..30).map(|n| event(&keys[n % keys.len()], n)).collect();
    let first = broker
        .publish(&orders, events[..10].to_vec())
        .await
        .unwrap();
    let second = broker
        .publish(&orders, events[10..].to_vec())
        .await
        .unwrap();
    let published: Vec<_> = first.into_iter().chain(second).collect();

    let mut next_offset = BTreeMap::<u32, u64>::new();
    for (event, published) in events.iter().zip(&published) {
        let key = event.partition_key().unwrap();
        assert_eq!(published.partition, partition_for(key, 4), "by key");
        let expected = next_offset.entry(published.partition).or_insert(0);
        assert_eq!(published.offset, *expected, "contiguous, in publish order");
        *expected += 1;
    }
    // The offsets are the versions of the partition's system stream.
    for (&partition, &count) in &next_offset {
        let stream = StreamName::system(format!("topic:orders:{partition}")).unwrap();
        let stored = log
            .read_stream(&stream, Version::START, Direction::Forward, 100)
            .await
            .unwrap();
        assert_eq!(stored.len() as u64, count);
        let expected: Vec<_> = events
            .iter()
            .zip(&published)
            .filter(|(_, p)| p.partition == partition)
            .map(|(e, _)| e.id.clone())
            .collect();
        let ids: Vec<_> = stored.iter().map(|r| r.event.id.clone()).collect();
        assert_eq!(ids, expected);
    }

    // A topic first used by a publish gets the default count.
    let other = topic("payments");
    broker.publish(&other, vec![event("a", 0)]).await.unwrap();
    assert_eq!(broker.create_topic(&other, 2).await.unwrap(), 8);

    assert!(matches!(
        broker.publish(&orders, Vec::new()).await,
        Err(Error::EmptyPublish)
    ));
    let invalid = event("a", 1).with_id("");
    assert!(matches!(
        broker.publish(&orders, vec![event("a", 2), invalid]).await,
        Err(Error::InvalidEvent { index: 1, .. })
    ));
    Publisher::close(&broker).await.unwrap();
    assert!(matches!(
        broker.publish(&orders, vec![event("a", 3)]).await,
        Err(Error::Closed)
    ));
    broker.shutdown().await;
    log.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_member_receives_everything_in_key_order() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path()).await;
    let broker = Broker::new(log.clone(), BrokerOptions::default());
    let orders = topic("orders");
    broker.create_topic(&orders, 3).await.unwrap();
    let keys: Vec<String> = (0..5).map(|n| format!("order-{n}")).collect();
    let events: Vec<Event> = (0..40).map(|n| event(&keys[n % keys.len()], n)).collect();
    broker
        .publish(&orders, events[..20].to_vec())
        .await
        .unwrap();

    let mut consumer = broker.subscribe(&orders, &group("billing")).await.unwrap();
    let mut received = take(&mut consumer, 10).await;
    // Published while the member reads: the subscription goes live.
    broker
        .publish(&orders, events[20..].to_vec())
        .await
        .unwrap();
    received.extend(take(&mut consumer, 30).await);

    let ids: BTreeSet<_> = received.iter().map(|m| m.event.id.clone()).collect();
    assert_eq!(ids.len(), 40, "every message once");
    for key in &keys {
        let ns: Vec<u64> = received
            .iter()
            .filter(|m| m.event.partition_key() == Some(key))
            .map(n_of)
            .collect();
        assert!(ns.is_sorted(), "messages of key {key} out of order: {ns:?}");
    }
    for partition in 0..3 {
        let offsets: Vec<u64> = received
            .iter()
            .filter(|m| m.partition == partition)
            .map(|m| m.offset)
            .collect();
        assert_eq!(offsets, (0..offsets.len() as u64).collect::<Vec<_>>());
    }
    assert!(received.iter().all(|m| m.attempt == 1 && m.topic == orders));
    for message in &received {
        consumer.ack(message).await.unwrap();
    }
    // Acking twice is harmless.
    consumer.ack(&received[0]).await.unwrap();
    consumer.close().await.unwrap();

    // Everything was acked: a new member of the group only gets what comes next.
    let mut again = broker.subscribe(&orders, &group("billing")).await.unwrap();
    let late = broker
        .publish(&orders, vec![event("late", 99)])
        .await
        .unwrap();
    let message = next(&mut again).await;
    assert_eq!(
        (message.partition, message.offset),
        (late[0].partition, late[0].offset)
    );
    again.close().await.unwrap();

    // Another group gets everything from the start.
    let mut audit = broker.subscribe(&orders, &group("audit")).await.unwrap();
    assert_eq!(take(&mut audit, 41).await.len(), 41);
    audit.close().await.unwrap();
    broker.shutdown().await;
    log.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_split_partitions_and_rebalance_with_redelivery() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path()).await;
    let broker = Broker::new(log.clone(), BrokerOptions::default());
    let orders = topic("orders");
    let billing = group("billing");
    broker.create_topic(&orders, 4).await.unwrap();
    broker
        .publish(&orders, events_per_partition(4, 2))
        .await
        .unwrap();

    // a takes every partition; b, joining, takes the upper half from it.
    let mut a = broker.subscribe(&orders, &billing).await.unwrap();
    let mut b = broker.subscribe(&orders, &billing).await.unwrap();
    let of_a = take(&mut a, 4).await;
    let of_b = take(&mut b, 4).await;
    let partitions =
        |messages: &[Message]| -> BTreeSet<u32> { messages.iter().map(|m| m.partition).collect() };
    assert_eq!(partitions(&of_a), BTreeSet::from([0, 1]));
    assert_eq!(partitions(&of_b), BTreeSet::from([2, 3]));
    assert!(matches!(b.ack(&of_a[0]).await, Err(Error::NotHeld { .. })));

    // a acks the first message of each of its partitions, then closes: b takes them over
    // and gets the second ones again.
    for message in of_a.iter().filter(|m| m.offset == 0) {
        a.ack(message).await.unwrap();
    }
    a.close().await.unwrap();
    let redelivered = take(&mut b, 2).await;
    assert_eq!(at(&redelivered), BTreeSet::from([(0, 1), (1, 1)]));
    assert!(redelivered.iter().all(|m| m.attempt == 2));

    // A third member takes the upper half from b (b keeps 0 and 1, c gets 2 and 3); b's
    // un-acked messages of those are no longer b's to ack, and c gets them again.
    let mut c = broker.subscribe(&orders, &billing).await.unwrap();
    let b_3: Vec<&Message> = of_b.iter().filter(|m| m.partition == 3).collect();
    assert!(matches!(
        b.ack(b_3[0]).await,
        Err(Error::NotHeld { partition: 3, .. })
    ));
    assert!(matches!(b.nack(b_3[0]).await, Err(Error::NotHeld { .. })));
    let of_c = take(&mut c, 4).await;
    assert_eq!(at(&of_c), BTreeSet::from([(2, 0), (2, 1), (3, 0), (3, 1)]));
    assert!(of_c.iter().all(|m| m.attempt == 2));
    for message in &redelivered {
        b.ack(message).await.unwrap();
    }

    // Dropping a member leaves the group too: c's partitions go back to b.
    c.ack(&of_c[0]).await.unwrap();
    let acked_by_c = (of_c[0].partition, of_c[0].offset);
    drop(c);
    let back = take(&mut b, 3).await;
    let expected: BTreeSet<_> = at(&of_c).into_iter().filter(|&m| m != acked_by_c).collect();
    assert_eq!(at(&back), expected);
    assert!(back.iter().all(|m| m.attempt == 3));
    b.close().await.unwrap();
    broker.shutdown().await;
    log.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_redelivers_the_message_and_later_unacked_ones() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path()).await;
    let broker = Broker::new(log.clone(), BrokerOptions::default());
    let orders = topic("orders");
    broker.create_topic(&orders, 1).await.unwrap();
    broker
        .publish(&orders, (0..5).map(|n| event("k", n)).collect())
        .await
        .unwrap();
    let mut consumer = broker.subscribe(&orders, &group("billing")).await.unwrap();
    let first = take(&mut consumer, 5).await;
    assert_eq!(
        first.iter().map(|m| m.offset).collect::<Vec<_>>(),
        [0, 1, 2, 3, 4]
    );
    consumer.ack(&first[0]).await.unwrap();
    consumer.ack(&first[3]).await.unwrap();
    consumer.nack(&first[2]).await.unwrap();

    // 2 and 4 again, in order; 1 came before the nacked message and 3 is acked.
    let again = take(&mut consumer, 2).await;
    assert_eq!(
        again
            .iter()
            .map(|m| (m.offset, m.attempt))
            .collect::<Vec<_>>(),
        [(2, 2), (4, 2)]
    );
    // A second nack counts again.
    consumer.nack(&again[1]).await.unwrap();
    let third = next(&mut consumer).await;
    assert_eq!((third.offset, third.attempt), (4, 3));
    for message in [&first[1], &again[0], &third] {
        consumer.ack(message).await.unwrap();
    }
    // Nothing else is pending: the next message is a new one.
    broker.publish(&orders, vec![event("k", 5)]).await.unwrap();
    let fresh = next(&mut consumer).await;
    assert_eq!((fresh.offset, fresh.attempt), (5, 1));
    // A message never delivered to this consumer cannot be acked.
    let mut unknown = fresh.clone();
    unknown.offset = 6;
    assert!(matches!(
        consumer.ack(&unknown).await,
        Err(Error::NotHeld { offset: 6, .. })
    ));
    consumer.close().await.unwrap();
    broker.shutdown().await;
    log.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_resumes_at_committed_offsets_and_redelivers_the_unacked() {
    let dir = tempfile::tempdir().unwrap();
    let orders = topic("orders");
    let billing = group("billing");
    let published;
    {
        let log = open(dir.path()).await;
        let broker = Broker::new(log.clone(), BrokerOptions::default());
        broker.create_topic(&orders, 2).await.unwrap();
        published = broker
            .publish(&orders, events_per_partition(2, 3))
            .await
            .unwrap();
        let mut consumer = broker.subscribe(&orders, &billing).await.unwrap();
        let received = take(&mut consumer, 6).await;
        // Partition 0: 0 and 1 acked. Partition 1: 0 and 2 acked, so only 0 is committed.
        for message in &received {
            if matches!((message.partition, message.offset), (0, 0 | 1) | (1, 0 | 2)) {
                consumer.ack(message).await.unwrap();
            }
        }
        consumer.close().await.unwrap();
        // A member that is dropped rather than closed: its acks are committed by the
        // shutdown's last commit.
        let mut other = broker.subscribe(&orders, &group("audit")).await.unwrap();
        let first = next(&mut other).await;
        other.ack(&first).await.unwrap();
        drop(other);
        broker.shutdown().await;
        log.close().await.unwrap();
    }
    assert_eq!(published.len(), 6);

    let log = open(dir.path()).await;
    let broker = Broker::new(log.clone(), BrokerOptions::default());
    assert_eq!(
        broker.create_topic(&orders, 5).await.unwrap(),
        2,
        "the partition count survives"
    );
    let mut consumer = broker.subscribe(&orders, &billing).await.unwrap();
    // Partition 1 resumes at its committed offset 1 and skips 2, acked beyond it.
    let resumed = take(&mut consumer, 2).await;
    assert_eq!(at(&resumed), BTreeSet::from([(0, 2), (1, 1)]));
    assert!(
        resumed.iter().all(|m| m.attempt == 1),
        "attempt counters start again after a restart"
    );
    let in_1: Vec<u64> = resumed
        .iter()
        .filter(|m| m.partition == 1)
        .map(|m| m.offset)
        .collect();
    assert_eq!(in_1, [1]);

    let mut audit = broker.subscribe(&orders, &group("audit")).await.unwrap();
    assert_eq!(take(&mut audit, 5).await.len(), 5, "one of six was acked");
    consumer.close().await.unwrap();
    audit.close().await.unwrap();
    broker.shutdown().await;
    log.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_recv_and_refuses_new_members() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path()).await;
    let broker = Broker::new(log.clone(), BrokerOptions::default());
    let orders = topic("orders");
    let mut consumer = broker.subscribe(&orders, &group("billing")).await.unwrap();
    let waiting = tokio::spawn(async move { consumer.recv().await.is_none() });
    broker.shutdown().await;
    assert!(
        tokio::time::timeout(WAIT_MAX, waiting)
            .await
            .unwrap()
            .unwrap(),
        "recv ends with None"
    );
    assert!(matches!(
        broker.subscribe(&orders, &group("billing")).await,
        Err(Error::Closed)
    ));
    log.close().await.unwrap();
}

/// Members of a group shutting down one after the other: a leave moves only the leaver's
/// partitions, so the others can still ack what they received, and after a restart no
/// acked message comes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_shutting_down_together_keep_their_acks() {
    const PARTITIONS: u32 = 8;
    const ROUNDS: usize = 3;
    let dir = tempfile::tempdir().unwrap();
    let orders = topic("orders");
    let billing = group("billing");
    let log = open(dir.path()).await;
    let broker = Broker::new(log.clone(), BrokerOptions::default());
    broker.create_topic(&orders, PARTITIONS).await.unwrap();
    let mut members = Vec::new();
    for _ in 0..4 {
        members.push(broker.subscribe(&orders, &billing).await.unwrap());
    }
    broker
        .publish(&orders, events_per_partition(PARTITIONS, ROUNDS))
        .await
        .unwrap();
    // Eight partitions, four members: two partitions each, so each gets six messages.
    let mut received = Vec::new();
    for member in &mut members {
        let messages = take(member, 2 * ROUNDS).await;
        let partitions: BTreeSet<u32> = messages.iter().map(|m| m.partition).collect();
        assert_eq!(partitions.len(), 2, "a balanced share: {partitions:?}");
        received.push(messages);
    }
    // Everyone acks the first message of each of its partitions, then `a` leaves.
    for (member, messages) in members.iter_mut().zip(&received) {
        for message in messages.iter().filter(|m| m.offset == 0) {
            member.ack(message).await.unwrap();
        }
    }
    let mut members = members.into_iter();
    members.next().unwrap().close().await.unwrap();
    // The others ack the rest and close one after the other; a leave never takes a
    // partition from a member that stays, so no ack fails with NotHeld.
    for (mut member, messages) in members.zip(&received[1..]) {
        for message in messages.iter().filter(|m| m.offset > 0) {
            member.ack(message).await.unwrap_or_else(|error| {
                panic!(
                    "ack of {}@{} failed: {error}",
                    message.partition, message.offset
                )
            });
        }
        member.close().await.unwrap();
    }
    broker.shutdown().await;
    log.close().await.unwrap();

    // After a restart, only a's un-acked messages come again, then the new fences.
    let log = open(dir.path()).await;
    let broker = Broker::new(log.clone(), BrokerOptions::default());
    let of_a: BTreeSet<u32> = received[0].iter().map(|m| m.partition).collect();
    let lag = broker.lag(&orders, &billing).await.unwrap();
    for partition in &lag {
        let committed = if of_a.contains(&partition.partition) {
            1
        } else {
            ROUNDS as u64
        };
        assert_eq!(
            *partition,
            PartitionLag::new(partition.partition, ROUNDS as u64, committed).unwrap()
        );
    }
    let fences = broker
        .publish(&orders, events_per_partition(PARTITIONS, 1))
        .await
        .unwrap();
    let mut fences_left: BTreeSet<(u32, u64)> =
        fences.iter().map(|p| (p.partition, p.offset)).collect();
    let mut consumer = broker.subscribe(&orders, &billing).await.unwrap();
    let mut again = BTreeSet::new();
    while !fences_left.is_empty() {
        let message = next(&mut consumer).await;
        if !fences_left.remove(&(message.partition, message.offset)) {
            assert!(
                again.insert((message.partition, message.offset)),
                "delivered twice"
            );
        }
    }
    let unacked_of_a: BTreeSet<(u32, u64)> = received[0]
        .iter()
        .filter(|m| m.offset > 0)
        .map(|m| (m.partition, m.offset))
        .collect();
    assert_eq!(
        again, unacked_of_a,
        "exactly a's un-acked messages come again"
    );
    consumer.close().await.unwrap();
    broker.shutdown().await;
    log.close().await.unwrap();
}

/// Lag counts a group's commits only once they are durable: acks whose commit failed do
/// not count, whether or not the group is loaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_counts_only_durable_commits() {
    let sim = SimIo::new();
    let io: Arc<dyn Io> = Arc::new(sim.clone());
    let log = Log::open_with_io(Options::new("/sim/data"), io).unwrap();
    let broker = Broker::new(log.clone(), BrokerOptions::default());
    let orders = topic("orders");
    let billing = group("billing");
    assert!(matches!(
        broker.lag(&orders, &billing).await,
        Err(Error::UnknownTopic { topic }) if topic == orders
    ));
    broker.create_topic(&orders, 2).await.unwrap();
    let lags = |committed: [u64; 2]| -> Vec<PartitionLag> {
        (0..2)
            .map(|p| PartitionLag::new(p, 3, committed[p as usize]).unwrap())
            .collect()
    };
    broker
        .publish(&orders, events_per_partition(2, 3))
        .await
        .unwrap();
    assert_eq!(broker.lag(&orders, &billing).await.unwrap(), lags([0, 0]));

    let mut consumer = broker.subscribe(&orders, &billing).await.unwrap();
    for message in take(&mut consumer, 6).await {
        if message.offset == 0 {
            consumer.ack(&message).await.unwrap();
        }
    }
    consumer.close().await.unwrap();
    assert_eq!(broker.lag(&orders, &billing).await.unwrap(), lags([1, 1]));

    // The next commit cannot be made durable: the acks succeed in memory, close reports
    // the failed commit, and lag keeps reporting the last durable offsets.
    let mut consumer = broker.subscribe(&orders, &billing).await.unwrap();
    let rest = take(&mut consumer, 4).await;
    sim.fail_sync_in(1);
    for message in &rest {
        consumer.ack(message).await.unwrap();
    }
    assert!(consumer.close().await.is_err(), "the commit failed");
    assert_eq!(broker.lag(&orders, &billing).await.unwrap(), lags([1, 1]));
    broker.shutdown().await;
    log.close().await.unwrap();
}

/// Lag reads the committed offsets of a group no member of this broker has joined from its
/// offsets stream, and creates neither the topic nor the group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_of_a_group_not_loaded_reads_its_offsets_stream() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path()).await;
    let orders = topic("orders");
    let billing = group("billing");
    let consuming = Broker::new(log.clone(), BrokerOptions::default());
    consuming.create_topic(&orders, 3).await.unwrap();
    consuming
        .publish(&orders, events_per_partition(3, 2))
        .await
        .unwrap();
    let mut consumer = consuming.subscribe(&orders, &billing).await.unwrap();
    for message in take(&mut consumer, 6).await {
        if message.partition != 1 {
            consumer.ack(&message).await.unwrap();
        }
    }
    consumer.close().await.unwrap();
    consuming.shutdown().await;

    // A second broker on the same log (as `herald groups lag` opens one): it has loaded no
    // group, so it reads `$offsets:billing:orders`.
    let reading = Broker::new(log.clone(), BrokerOptions::default());
    let lag = reading.lag(&orders, &billing).await.unwrap();
    let want: Vec<PartitionLag> = [2, 0, 2]
        .into_iter()
        .zip(0..)
        .map(|(committed, p)| PartitionLag::new(p, 2, committed).unwrap())
        .collect();
    assert_eq!(lag, want);
    assert_eq!(lag.iter().map(|p| p.lag).sum::<u64>(), 2);
    let audit = reading.lag(&orders, &group("audit")).await.unwrap();
    assert!(audit.iter().all(|p| p.committed == 0 && p.lag == 2));
    assert!(matches!(
        reading.lag(&topic("payments"), &billing).await,
        Err(Error::UnknownTopic { .. })
    ));
    // Nothing was created: no topic stream, no offsets stream for the other group.
    for stream in ["topics:payments", "offsets:audit:orders"] {
        let stream = StreamName::system(stream).unwrap();
        assert_eq!(log.stream_version(&stream).await.unwrap(), None, "{stream}");
    }
    reading.shutdown().await;
    log.close().await.unwrap();
}

/// A stored committed offset beyond a partition's head can only come from damaged storage:
/// lag reports it as an error naming the offsets stream, never as a negative lag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_refuses_a_committed_offset_beyond_the_head() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path()).await;
    let broker = Broker::new(log.clone(), BrokerOptions::default());
    let orders = topic("orders");
    broker.create_topic(&orders, 1).await.unwrap();
    broker.publish(&orders, vec![event("k", 0)]).await.unwrap();
    let offsets = StreamName::system("offsets:billing:orders").unwrap();
    let damaged = Event::new("/herald/broker", "herald.broker.offsets.committed")
        .with_data(serde_json::json!({ "topic": "orders", "group": "billing", "next": [5] }));
    log.append(&offsets, herald_core::ExpectedVersion::Any, vec![damaged])
        .await
        .unwrap();
    let error = broker.lag(&orders, &group("billing")).await.unwrap_err();
    let Error::Backend(source) = &error else {
        panic!("expected a backend error, got {error:?}");
    };
    let text = source.to_string();
    assert!(text.contains("$offsets:billing:orders"), "{text}");
    assert!(
        text.contains("committed offset 5 of partition 0 is beyond its 1 messages"),
        "{text}"
    );
    broker.shutdown().await;
    log.close().await.unwrap();
}

#[tokio::test]
async fn acks_behind_an_unacked_message_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let topic = TopicName::new("gaps").unwrap();
    let group = GroupName::new("g").unwrap();
    {
        let log = Log::open(Options::new(dir.path())).unwrap();
        let broker = Broker::new(log.clone(), BrokerOptions::default());
        broker.create_topic(&topic, 1).await.unwrap();
        let events: Vec<Event> = (0..6)
            .map(|n| Event::new("/test", "T").with_id(format!("e{n}")))
            .collect();
        broker.publish(&topic, events).await.unwrap();
        let mut consumer = broker.subscribe(&topic, &group).await.unwrap();
        let mut messages = Vec::new();
        for _ in 0..6 {
            messages.push(consumer.recv().await.unwrap().unwrap());
        }
        // e1 and e4 stay un-acked: the committed offset is 1, the acks of e2, e3, e5 lie
        // beyond it.
        for n in [0, 2, 3, 5] {
            consumer.ack(&messages[n]).await.unwrap();
        }
        consumer.close().await.unwrap();
        broker.shutdown().await;
        log.close().await.unwrap();
    }
    let log = Log::open(Options::new(dir.path())).unwrap();
    let broker = Broker::new(log.clone(), BrokerOptions::default());
    let lag = broker.lag(&topic, &group).await.unwrap();
    assert_eq!((lag[0].committed, lag[0].head), (1, 6));
    let mut consumer = broker.subscribe(&topic, &group).await.unwrap();
    let first = consumer.recv().await.unwrap().unwrap();
    let second = consumer.recv().await.unwrap().unwrap();
    assert_eq!(
        [first.event.id.as_str(), second.event.id.as_str()],
        ["e1", "e4"],
        "only the un-acked messages come again"
    );
    consumer.ack(&first).await.unwrap();
    consumer.ack(&second).await.unwrap();
    consumer.close().await.unwrap();
    let lag = broker.lag(&topic, &group).await.unwrap();
    assert_eq!(
        lag[0].lag, 0,
        "everything committed once the gaps are acked"
    );
    broker.shutdown().await;
    log.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_publishes_to_a_new_topic_all_succeed() {
    for round in 0..20 {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(Options::new(dir.path())).unwrap();
        let broker = Broker::new(log.clone(), BrokerOptions::default());
        let topic = TopicName::new(format!("new-{round}")).unwrap();
        let publishes = (0..8).map(|n| {
            let broker = broker.clone();
            let topic = topic.clone();
            tokio::spawn(async move {
                let event = Event::new("/test", "T").with_id(format!("e{n}"));
                broker.publish(&topic, vec![event]).await
            })
        });
        for publish in futures::future::join_all(publishes).await {
            publish.unwrap().expect("every first publish succeeds");
        }
        broker.shutdown().await;
        log.close().await.unwrap();
    }
}
