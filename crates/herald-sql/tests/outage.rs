//! A broker outage, on SQLite and PostgreSQL: the backlog grows and shows in the status
//! and the metrics, failures are recorded on the rows, nothing is lost, and the backlog
//! drains in order per key once the broker is back.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use common::{Business, Flaky, HANG_GUARD, receive, topic};
use herald_core::Event;
use herald_core::broker::{GroupName, Subscriber as _};
use herald_core::memory_broker::InMemoryBroker;
use herald_sql::relay::{OUTBOX_BACKLOG, OUTBOX_OLDEST_AGE_SECONDS};
use herald_sql::{Outbox, RelayOptions, status};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use sqlx::Pool;
use tokio_util::sync::CancellationToken;

on_both_backends! {
    a_broker_outage_delays_events_and_loses_none => outage;
}

const KEYS: u32 = 10;

fn options() -> RelayOptions {
    RelayOptions {
        batch_len_max: 50,
        poll_interval_ms: 20,
        lease_ttl_ms: 3_000,
        publish_timeout_ms: 1_000,
        retry_delay_initial_ms: 5,
        retry_delay_max_ms: 40,
        database_retry_delay_ms: 50,
        ..RelayOptions::default()
    }
}

async fn enqueue(pool: &Pool<impl Business>, outbox: &Outbox, from: u32, to: u32) {
    for chunk in (from..to).collect::<Vec<_>>().chunks(25) {
        let mut tx = pool.begin().await.unwrap();
        for &n in chunk {
            let key = format!("key-{}", n % KEYS);
            let event = Event::new("/test", "Counted")
                .with_partition_key(key.clone())
                .with_data(serde_json::json!({ "key": key, "n": n }));
            outbox.enqueue(&mut tx, &event).await.unwrap();
        }
        tx.commit().await.unwrap();
    }
}

async fn outage<DB: Business>(pool: Pool<DB>) {
    let outbox = Outbox::new(topic("counted"));
    let broker = InMemoryBroker::new(4);
    let mut consumer = broker
        .subscribe(&topic("counted"), &GroupName::new("check").unwrap())
        .await
        .unwrap();
    let flaky = Arc::new(Flaky::new(broker.clone()));
    flaky.set_failing(true);
    enqueue(&pool, &outbox, 0, 200).await;

    let relay = options().build(pool.clone(), flaky.clone()).unwrap();
    let handle = relay.handle();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(relay.run(shutdown.clone()));

    // Down: every partition's first publish fails, and keeps failing.
    flaky.failed_at_least(20).await;
    let during = status(&pool).await.unwrap();
    assert_eq!(during.backlog, 200, "nothing published, nothing lost");
    assert!(during.oldest_age.is_some());
    assert!(!during.failing.is_empty());
    for row in &during.failing {
        assert!(row.attempts >= 1, "{row:?}");
        let error = row.last_error.as_deref().unwrap_or_default();
        assert!(error.contains("broker unreachable"), "{error}");
        assert!(row.next_attempt_at.is_some());
    }
    // More events while down: the backlog grows.
    enqueue(&pool, &outbox, 200, 300).await;
    assert_eq!(status(&pool).await.unwrap().backlog, 300);
    assert_eq!(handle.progress().published, 0);

    // Back: everything drains, in order per key.
    flaky.set_failing(false);
    let messages = receive(&mut consumer, 300).await;
    let mut next_per_key: HashMap<String, u64> = HashMap::new();
    let mut seen = HashSet::new();
    for message in &messages {
        let data: serde_json::Value = message.event.data_as().unwrap().unwrap();
        let (key, n) = (data["key"].as_str().unwrap(), data["n"].as_u64().unwrap());
        assert!(seen.insert(n), "published once here: {n}");
        let expected = next_per_key
            .entry(key.to_owned())
            .or_insert(n % u64::from(KEYS));
        assert_eq!(n, *expected, "{key}: out of order");
        *expected += u64::from(KEYS);
    }
    tokio::time::timeout(HANG_GUARD, handle.wait_for(|p| p.published >= 300))
        .await
        .unwrap();
    let after = status(&pool).await.unwrap();
    assert_eq!(after.backlog, 0);
    assert!(after.failing.is_empty());
    shutdown.cancel();
    let report = running.await.unwrap().unwrap();
    assert_eq!(report.published, 300);
    assert!(report.publish_failures >= 20);
}

/// The gauges, on SQLite (the metrics code is the backends' shared code).
#[test]
fn the_backlog_gauges_show_unpublished_rows() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    metrics::with_local_recorder(&recorder, || {
        runtime.block_on(async {
            let (pool, _dir) = common::sqlite().await;
            let outbox = Outbox::new(topic("counted"));
            enqueue(&pool, &outbox, 0, 7).await;
            let flaky = Arc::new(Flaky::new(InMemoryBroker::new(1)));
            flaky.set_failing(true);
            let relay = options().build(pool.clone(), flaky.clone()).unwrap();
            let shutdown = CancellationToken::new();
            let running = tokio::spawn(relay.run(shutdown.clone()));
            // The gauges are set before the first claim, which tries a publish.
            flaky.attempted_at_least(1).await;
            shutdown.cancel();
            running.await.unwrap().unwrap();
        });
    });
    let gauges: HashMap<String, f64> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter_map(|(key, _, _, value)| match value {
            DebugValue::Gauge(value) => Some((key.key().name().to_owned(), value.into_inner())),
            _ => None,
        })
        .collect();
    assert_eq!(gauges.get(OUTBOX_BACKLOG), Some(&7.0), "{gauges:?}");
    assert!(gauges.contains_key(OUTBOX_OLDEST_AGE_SECONDS), "{gauges:?}");
}
