//! Order per key with three relays on PostgreSQL, one of which crashes midway: 10,000
//! events across 100 keys, enqueued by concurrent writers while the relays run. One relay
//! is aborted without releasing its leases (its connections closed, as a dead process's
//! are); the others take its partitions over once its leases expire. Every event is
//! published, and per key the first deliveries come in enqueue order. The crash comes
//! between a publish and its mark, so the rows of that publish are delivered twice (at
//! least once): duplicates are allowed, and counted.

mod common;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use common::{HANG_GUARD, topic};
use herald_core::Event;
use herald_core::broker::{
    self, GroupName, Published, Publisher, Subscriber as _, TopicName, partition_for,
};
use herald_core::memory_broker::InMemoryBroker;
use herald_sql::{LEASE_PARTITIONS, Outbox, RelayOptions, status};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const KEYS: u32 = 100;
const EVENTS_PER_KEY: u32 = 100;
const WRITERS: u32 = 4;
/// Events per writer transaction (all of one key).
const EVENTS_PER_TX: u32 = 4;
/// Deliveries seen before one relay is crashed.
const CRASH_AFTER: usize = 3_000;

/// A publisher that, once armed, publishes its next batch and then never answers: the
/// relay calling it is stuck between the publish and the mark when it is crashed.
struct StuckAfterPublish {
    inner: InMemoryBroker,
    armed: AtomicBool,
    stuck: watch::Sender<bool>,
}

#[async_trait]
impl Publisher for StuckAfterPublish {
    async fn publish(
        &self,
        topic: &TopicName,
        events: Vec<Event>,
    ) -> Result<Vec<Published>, broker::Error> {
        let published = self.inner.publish(topic, events).await?;
        if self.armed.swap(false, Ordering::SeqCst) {
            self.stuck.send_replace(true);
            std::future::pending::<()>().await;
        }
        Ok(published)
    }

    async fn close(&self) -> Result<(), broker::Error> {
        self.inner.close().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_relays_keep_order_per_key_when_one_crashes() {
    let Some(url) = common::postgres_database("failover").await else {
        return;
    };
    let setup = common::postgres_pool(&url, 2).await;
    herald_sql::migrate(&setup).await.unwrap();

    let broker = InMemoryBroker::new(8);
    let mut consumer = broker
        .subscribe(&topic("orders"), &GroupName::new("check").unwrap())
        .await
        .unwrap();
    let (received_tx, mut received_rx) = watch::channel(0_usize);
    let reader = tokio::spawn(async move {
        let mut messages = Vec::new();
        let mut distinct = HashSet::new();
        while distinct.len() < (KEYS * EVENTS_PER_KEY) as usize {
            let message = consumer.recv().await.unwrap().unwrap();
            consumer.ack(&message).await.unwrap();
            distinct.insert(message.event.id.clone());
            messages.push(message.event);
            received_tx.send_replace(messages.len());
        }
        messages
    });

    let options = RelayOptions {
        batch_len_max: 200,
        poll_interval_ms: 50,
        lease_ttl_ms: 1_500,
        publish_timeout_ms: 500,
        retry_delay_initial_ms: 10,
        retry_delay_max_ms: 100,
        database_retry_delay_ms: 100,
        ..RelayOptions::default()
    };
    let shutdown = CancellationToken::new();
    let doomed = Arc::new(StuckAfterPublish {
        inner: broker.clone(),
        armed: AtomicBool::new(false),
        stuck: watch::Sender::new(false),
    });
    let mut relays = Vec::new();
    let mut handles = Vec::new();
    for index in 0..3 {
        let pool = common::postgres_pool(&url, 3).await;
        let publisher: Arc<dyn Publisher> = if index == 1 {
            doomed.clone()
        } else {
            Arc::new(broker.clone())
        };
        let relay = RelayOptions {
            name: Some(format!("relay-{index}")),
            ..options.clone()
        }
        .build(pool.clone(), publisher)
        .unwrap();
        let holder = relay.holder().to_owned();
        handles.push(relay.handle());
        let task = tokio::spawn(relay.run(shutdown.clone()));
        relays.push((holder, pool, task));
    }
    // The first relay to start takes every partition and gives back the others' shares at
    // its next renewal: the writes start once each relay holds its share, so that the relay
    // crashed below holds leases with rows behind them.
    for handle in &handles {
        let share = (LEASE_PARTITIONS / 3) as usize;
        tokio::time::timeout(HANG_GUARD, handle.wait_for(|p| p.held.len() >= share))
            .await
            .expect("every relay takes its share of the partitions");
    }

    // Writers: each owns a quarter of the keys and writes them in order, half before the
    // crash and half after it.
    let (crashed_tx, crashed_rx) = watch::channel(false);
    let outbox = Outbox::new(topic("orders"));
    let writers: Vec<_> = (0..WRITERS)
        .map(|writer| {
            let pool = setup.clone();
            let outbox = outbox.clone();
            let mut crashed = crashed_rx.clone();
            tokio::spawn(async move {
                let keys: Vec<u32> = (0..KEYS).filter(|key| key % WRITERS == writer).collect();
                for first in (0..EVENTS_PER_KEY).step_by(EVENTS_PER_TX as usize) {
                    if first == EVENTS_PER_KEY / 2 {
                        crashed.wait_for(|crashed| *crashed).await.unwrap();
                    }
                    for key in &keys {
                        let mut tx = pool.begin().await.unwrap();
                        for n in first..first + EVENTS_PER_TX {
                            let event = Event::new("/orders", "Counted")
                                .with_partition_key(format!("key-{key}"))
                                .with_data(serde_json::json!({ "key": key, "n": n }));
                            outbox.enqueue(&mut tx, &event).await.unwrap();
                        }
                        tx.commit().await.unwrap();
                    }
                }
            })
        })
        .collect();

    // The crash: relay 1's task is aborted mid-flight and its connections closed, leaving
    // its leases and its registration to expire.
    tokio::time::timeout(HANG_GUARD, received_rx.wait_for(|n| *n >= CRASH_AFTER))
        .await
        .expect("deliveries before the crash")
        .unwrap();
    let (dead_holder, dead_pool, dead_task) = relays.remove(1);
    let dead_partitions = status(&setup).await.unwrap().partitions_of(&dead_holder);
    doomed.armed.store(true, Ordering::SeqCst);
    tokio::time::timeout(
        HANG_GUARD,
        doomed.stuck.subscribe().wait_for(|stuck| *stuck),
    )
    .await
    .expect("the doomed relay published again")
    .unwrap();
    dead_task.abort();
    let _ = dead_task.await;
    dead_pool.close().await;
    crashed_tx.send_replace(true);
    assert!(!dead_partitions.is_empty(), "the crashed relay held leases");

    for writer in writers {
        writer.await.unwrap();
    }
    let messages = tokio::time::timeout(HANG_GUARD, reader)
        .await
        .expect("every event delivered")
        .unwrap();

    // Per key, first deliveries in enqueue order.
    let mut next: HashMap<u64, u64> = HashMap::new();
    let mut seen = HashSet::new();
    for event in &messages {
        if !seen.insert(event.id.clone()) {
            continue;
        }
        let data: serde_json::Value = event.data_as().unwrap().unwrap();
        let (key, n) = (data["key"].as_u64().unwrap(), data["n"].as_u64().unwrap());
        let expected = next.entry(key).or_insert(0);
        assert_eq!(n, *expected, "key {key}: first delivery out of order");
        *expected += 1;
    }
    assert_eq!(seen.len(), (KEYS * EVENTS_PER_KEY) as usize);
    assert!(next.values().all(|&n| n == u64::from(EVENTS_PER_KEY)));
    let duplicates = messages.len() - seen.len();
    assert!(duplicates > 0, "the stuck publish is published again");
    println!(
        "failover: {} events, {} deliveries, {duplicates} duplicates; the crashed relay held \
         partitions {dead_partitions:?}",
        seen.len(),
        messages.len()
    );

    // The survivors hold every partition that has keys.
    let survivors: BTreeSet<&str> = relays
        .iter()
        .map(|(holder, _, _)| holder.as_str())
        .collect();
    let used: BTreeSet<u32> = (0..KEYS)
        .map(|key| partition_for(&format!("key-{key}"), LEASE_PARTITIONS))
        .collect();
    let status = status(&setup).await.unwrap();
    assert_eq!(status.backlog, 0);
    for lease in status
        .leases
        .iter()
        .filter(|lease| used.contains(&lease.partition))
    {
        let holder = lease.holder.as_deref().unwrap_or("nobody");
        assert!(
            survivors.contains(holder),
            "partition {} held by {holder}",
            lease.partition
        );
    }

    shutdown.cancel();
    for (_, _, task) in relays {
        task.await.unwrap().unwrap();
    }
}
