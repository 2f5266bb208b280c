//! The outbox and the relay, the same behaviour on SQLite and PostgreSQL: migrations,
//! atomicity with the caller's transaction, exact envelopes to both brokers, leases
//! released on shutdown, retention.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use common::{Business, HANG_GUARD, publisher, receive, topic};
use herald_core::Event;
use herald_core::broker::{GroupName, Subscriber as _};
use herald_core::memory_broker::InMemoryBroker;
use herald_sql::relay::{OnPublish, Report};
use herald_sql::{Error, Outbox, RelayOptions, status};
use sqlx::Pool;
use tokio_util::sync::CancellationToken;

on_both_backends! {
    migrations_apply_again_without_error => migrations_apply_again;
    a_business_write_and_its_event_commit_together => commit_together;
    a_business_write_and_its_event_roll_back_together => roll_back_together;
    invalid_and_duplicate_events_are_refused => refused;
    the_relay_publishes_exactly_what_was_enqueued => exact_envelopes;
    the_relay_publishes_to_the_embedded_broker => embedded_broker;
    a_stopped_relay_releases_its_leases => releases_leases;
    retention_deletes_old_published_rows => retention;
    rows_can_be_deleted_once_published => delete_on_publish;
    events_the_broker_already_has_are_not_stored_twice => republished;
    a_busy_key_drains_in_full_batches_without_waiting_for_a_poll => busy_key;
    a_relay_taking_over_does_not_wait_for_dead_leases => taken_over;
}

/// Options for tests: quick polls and retries, short leases.
fn options() -> RelayOptions {
    RelayOptions {
        poll_interval_ms: 20,
        lease_ttl_ms: 3_000,
        publish_timeout_ms: 1_000,
        retry_delay_initial_ms: 10,
        retry_delay_max_ms: 50,
        metrics_interval_ms: 50,
        database_retry_delay_ms: 50,
        ..RelayOptions::default()
    }
}

fn order_event(key: &str, n: u32) -> Event {
    Event::new("/orders", "OrderPlaced")
        .with_partition_key(key)
        .with_data(serde_json::json!({ "key": key, "n": n }))
}

async fn migrations_apply_again<DB: Business>(pool: Pool<DB>) {
    herald_sql::migrate(&pool).await.unwrap();
    herald_sql::migrate(&pool).await.unwrap();
    let applied = herald_sql::migrate_report(&pool).await.unwrap();
    assert!(applied.is_empty(), "up to date: {applied:?}");
    let status = status(&pool).await.unwrap();
    assert_eq!(status.leases.len(), herald_sql::LEASE_PARTITIONS as usize);
    assert_eq!(status.backlog, 0);
}

async fn commit_together<DB: Business>(pool: Pool<DB>) {
    DB::create_orders(&pool).await;
    let outbox = Outbox::new(topic("orders"));
    let mut tx = pool.begin().await.unwrap();
    DB::insert_order(&mut tx, "order-1").await;
    let enqueued = outbox
        .enqueue(&mut tx, &order_event("order-1", 0))
        .await
        .unwrap();
    // Not visible to others before the commit.
    assert_eq!(status(&pool).await.unwrap().backlog, 0);
    tx.commit().await.unwrap();

    assert_eq!(DB::count_orders(&pool).await, 1);
    let status = status(&pool).await.unwrap();
    assert_eq!(status.backlog, 1);
    assert!(status.oldest_age.is_some());
    let second = {
        let mut tx = pool.begin().await.unwrap();
        let second = outbox
            .enqueue(&mut tx, &order_event("order-1", 1))
            .await
            .unwrap();
        tx.commit().await.unwrap();
        second
    };
    assert!(second.seq > enqueued.seq, "seq grows");
    assert_eq!(
        second.partition, enqueued.partition,
        "one key, one partition"
    );
}

async fn roll_back_together<DB: Business>(pool: Pool<DB>) {
    DB::create_orders(&pool).await;
    let outbox = Outbox::new(topic("orders"));
    let mut tx = pool.begin().await.unwrap();
    DB::insert_order(&mut tx, "order-1").await;
    outbox
        .enqueue(&mut tx, &order_event("order-1", 0))
        .await
        .unwrap();
    tx.rollback().await.unwrap();

    // Dropped without a commit: rolled back too.
    {
        let mut tx = pool.begin().await.unwrap();
        DB::insert_order(&mut tx, "order-2").await;
        outbox
            .enqueue(&mut tx, &order_event("order-2", 0))
            .await
            .unwrap();
    }

    assert_eq!(DB::count_orders(&pool).await, 0);
    assert_eq!(DB::outbox_rows(&pool).await, 0);
    assert_eq!(status(&pool).await.unwrap().backlog, 0);

    // A relay finds nothing to publish.
    let broker = InMemoryBroker::new(1);
    let mut consumer = broker
        .subscribe(&topic("orders"), &GroupName::new("check").unwrap())
        .await
        .unwrap();
    let (report, _) = run_until_published(&pool, &broker, 0).await;
    assert_eq!(report.published, 0);
    let nothing = tokio::time::timeout(std::time::Duration::ZERO, consumer.recv()).await;
    assert!(nothing.is_err(), "nothing was published");
}

async fn refused<DB: Business>(pool: Pool<DB>) {
    let outbox = Outbox::new(topic("orders"));
    let mut tx = pool.begin().await.unwrap();
    let invalid = Event::new("not a uri reference ::", "");
    let error = outbox.enqueue(&mut tx, &invalid).await.unwrap_err();
    assert!(matches!(error, Error::InvalidEvent(_)), "{error:?}");
    let event = order_event("order-1", 0);
    outbox.enqueue(&mut tx, &event).await.unwrap();
    tx.commit().await.unwrap();

    let mut tx = pool.begin().await.unwrap();
    let error = outbox.enqueue(&mut tx, &event).await.unwrap_err();
    assert!(
        matches!(&error, Error::DuplicateEventId { id } if *id == event.id),
        "{error:?}"
    );
    drop(tx);
    assert_eq!(DB::outbox_rows(&pool).await, 1);
}

/// Events that must come out exactly as they went in.
fn varied_events() -> Vec<(&'static str, Event)> {
    let exact = Event::from_json(
        r#"{"specversion":"1.0","id":"exact-1","source":"/orders","type":"OrderPlaced",
            "time":"2026-11-02T10:00:00.123456+01:00","subject":"order-7",
            "partitionkey":"order-7","correlationid":"c-1","traceparent":
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01","retries":3,"vip":true,
            "dataschema":"https://example.com/schemas/order-placed/v2",
            "datacontenttype":"application/json",
            "data":{"b": 1.50, "a": [1, 2],  "big": 123456789012345678901234567890, "s": "é\u00e9"}}"#
            .as_bytes(),
    )
    .unwrap();
    vec![
        ("orders", exact),
        (
            "orders",
            Event::new("/blobs", "Blob")
                .with_partition_key("order-7")
                .with_binary_data("application/octet-stream", vec![0, 159, 255, 0]),
        ),
        ("orders", Event::new("/bare", "Nothing")),
        ("payments", order_event("order-7", 1)),
        ("payments", order_event("order-8", 0)),
        ("orders", order_event("order-9", 0).with_subject("order-9")),
    ]
}

/// Runs a relay on `pool` publishing to `broker` until it has published `count` rows (or,
/// for 0, one idle pass), then stops it; its report and its holder id.
async fn run_until_published<DB: Business>(
    pool: &Pool<DB>,
    broker: &InMemoryBroker,
    count: u64,
) -> (Report, String) {
    let relay = options()
        .build(pool.clone(), publisher(broker.clone()))
        .unwrap();
    let handle = relay.handle();
    let holder = relay.holder().to_owned();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(relay.run(shutdown.clone()));
    tokio::time::timeout(
        HANG_GUARD,
        handle.wait_for(|progress| {
            progress.published >= count && progress.claims > 0 && !progress.held.is_empty()
        }),
    )
    .await
    .expect("the relay published in time");
    shutdown.cancel();
    (running.await.unwrap().unwrap(), holder)
}

async fn exact_envelopes<DB: Business>(pool: Pool<DB>) {
    let events = varied_events();
    let outbox = Outbox::new(topic("orders"));
    let mut tx = pool.begin().await.unwrap();
    for (to, event) in &events {
        outbox.enqueue_to(&mut tx, &topic(to), event).await.unwrap();
    }
    tx.commit().await.unwrap();

    let broker = InMemoryBroker::new(1);
    let group = GroupName::new("check").unwrap();
    let mut orders = broker.subscribe(&topic("orders"), &group).await.unwrap();
    let mut payments = broker.subscribe(&topic("payments"), &group).await.unwrap();
    let (report, _) = run_until_published(&pool, &broker, events.len() as u64).await;
    assert_eq!(report.published, events.len() as u64);
    assert_eq!(report.publish_failures, 0);

    let mut received: HashMap<String, (String, Event)> = HashMap::new();
    for (name, consumer) in [("orders", &mut orders), ("payments", &mut payments)] {
        let expected = events.iter().filter(|(to, _)| *to == name).count();
        for message in receive(consumer, expected).await {
            received.insert(message.event.id.clone(), (name.to_owned(), message.event));
        }
    }
    for (to, event) in &events {
        let (got_topic, got) = received.get(&event.id).expect("published");
        assert_eq!(got_topic, to);
        assert_eq!(got, event, "the exact envelope");
        assert_eq!(got.to_json(), event.to_json(), "byte for byte");
    }
    // One topic, one partition: in seq order.
    let status = status(&pool).await.unwrap();
    assert_eq!(status.backlog, 0);
    assert_eq!(status.oldest_age, None);
}

async fn embedded_broker<DB: Business>(pool: Pool<DB>) {
    let dir = tempfile::tempdir().unwrap();
    let log = herald_log::Log::open(herald_log::Options {
        durability: herald_log::Durability::Os,
        ..herald_log::Options::new(dir.path())
    })
    .unwrap();
    let broker = herald_log::broker::Broker::new(log.clone(), Default::default());
    let events: Vec<Event> = (0..50)
        .map(|n| order_event(&format!("order-{}", n % 7), n))
        .collect();
    let outbox = Outbox::new(topic("orders"));
    for chunk in events.chunks(10) {
        let mut tx = pool.begin().await.unwrap();
        for event in chunk {
            outbox.enqueue(&mut tx, event).await.unwrap();
        }
        tx.commit().await.unwrap();
    }
    let mut consumer = broker
        .subscribe(&topic("orders"), &GroupName::new("check").unwrap())
        .await
        .unwrap();
    let relay = options()
        .build(pool.clone(), Arc::new(broker.clone()))
        .unwrap();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(relay.run(shutdown.clone()));
    let messages = receive(&mut consumer, events.len()).await;
    shutdown.cancel();
    let report = running.await.unwrap().unwrap();
    assert_eq!(report.published, events.len() as u64);

    let by_id: HashMap<&str, &Event> = events.iter().map(|e| (e.id.as_str(), e)).collect();
    let mut per_key: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for message in &messages {
        assert_eq!(by_id[message.event.id.as_str()], &message.event);
        let data: serde_json::Value = message.event.data_as().unwrap().unwrap();
        per_key
            .entry(data["key"].as_str().unwrap().to_owned())
            .or_default()
            .push(data["n"].as_u64().unwrap());
    }
    for (key, ns) in per_key {
        assert!(ns.is_sorted(), "{key}: {ns:?}");
    }
    consumer.close().await.unwrap();
    broker.shutdown().await;
    log.close().await.unwrap();
}

async fn releases_leases<DB: Business>(pool: Pool<DB>) {
    let broker = InMemoryBroker::new(1);
    let (_, holder) = run_until_published(&pool, &broker, 0).await;
    let status = status(&pool).await.unwrap();
    assert!(status.partitions_of(&holder).is_empty(), "{status:?}");
    assert!(status.leases.iter().all(|lease| lease.holder.is_none()));
    assert!(status.relays.is_empty(), "{:?}", status.relays);
}

async fn retention<DB: Business>(pool: Pool<DB>) {
    let outbox = Outbox::new(topic("orders"));
    let mut tx = pool.begin().await.unwrap();
    for n in 0..5 {
        outbox
            .enqueue(&mut tx, &order_event("order-1", n))
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    let broker = InMemoryBroker::new(1);
    run_until_published(&pool, &broker, 5).await;
    assert_eq!(DB::outbox_rows(&pool).await, 5, "kept while young");

    // Published long ago: the next relay's retention job deletes them.
    DB::age_published(&pool, 8 * 24 * 3_600_000).await;
    let mut tx = pool.begin().await.unwrap();
    outbox
        .enqueue(&mut tx, &order_event("order-1", 5))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    run_until_published(&pool, &broker, 1).await;
    assert_eq!(
        DB::outbox_rows(&pool).await,
        1,
        "only the young row is left"
    );
}

async fn delete_on_publish<DB: Business>(pool: Pool<DB>) {
    let outbox = Outbox::new(topic("orders"));
    let mut tx = pool.begin().await.unwrap();
    for n in 0..5 {
        outbox
            .enqueue(&mut tx, &order_event("order-1", n))
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    let broker = InMemoryBroker::new(1);
    let relay = RelayOptions {
        on_publish: OnPublish::Delete,
        ..options()
    }
    .build(pool.clone(), publisher(broker.clone()))
    .unwrap();
    let mut consumer = broker
        .subscribe(&topic("orders"), &GroupName::new("check").unwrap())
        .await
        .unwrap();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(relay.run(shutdown.clone()));
    receive(&mut consumer, 5).await;
    shutdown.cancel();
    assert_eq!(running.await.unwrap().unwrap().published, 5);
    assert_eq!(DB::outbox_rows(&pool).await, 0);
}

/// Options under which a relay never polls within a test's hang guard: it publishes a row
/// enqueued after it started only if something wakes it.
fn sleepy_options() -> RelayOptions {
    RelayOptions {
        poll_interval_ms: 3_600_000,
        lease_ttl_ms: 3_600_000,
        metrics_interval_ms: 3_600_000,
        retention_interval_ms: 3_600_000,
        ..options()
    }
}

async fn taken_over<DB: Business>(pool: Pool<DB>) {
    let broker = InMemoryBroker::new(1);
    // A relay with hour-long leases dies holding them: its task ends without releasing.
    let dead = sleepy_options()
        .build(pool.clone(), publisher(broker.clone()))
        .unwrap();
    let dead_handle = dead.handle();
    let dead_holder = dead.holder().to_owned();
    let running = tokio::spawn(dead.run(CancellationToken::new()));
    tokio::time::timeout(
        HANG_GUARD,
        dead_handle.wait_for(|progress| !progress.held.is_empty()),
    )
    .await
    .expect("the first relay took its leases");
    running.abort();
    assert!(running.await.unwrap_err().is_cancelled());
    let leases = status(&pool).await.unwrap().leases;
    assert!(
        leases
            .iter()
            .any(|lease| lease.holder.as_deref() == Some(&dead_holder))
    );

    let events: Vec<Event> = (0..10).map(|n| order_event("order-1", n)).collect();
    let mut tx = pool.begin().await.unwrap();
    for event in &events {
        Outbox::new(topic("orders"))
            .enqueue(&mut tx, event)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    // Without the take-over its successor would wait an hour for those leases.
    let successor = RelayOptions {
        take_over_on_start: true,
        ..sleepy_options()
    }
    .build(pool.clone(), publisher(broker.clone()))
    .unwrap();
    let handle = successor.handle();
    let holder = successor.holder().to_owned();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(successor.run(shutdown.clone()));
    tokio::time::timeout(HANG_GUARD, handle.wait_for(|p| p.published >= 10))
        .await
        .expect("the successor published without waiting for the dead relay's leases");
    let outbox = status(&pool).await.unwrap();
    assert_eq!(outbox.backlog, 0);
    assert!(
        outbox
            .leases
            .iter()
            .all(|lease| lease.holder.as_deref() == Some(holder.as_str())),
        "{:?}",
        outbox.leases
    );
    assert!(outbox.relays.iter().all(|relay| relay.holder == holder));
    shutdown.cancel();
    running.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_notifies_only_when_the_enqueue_commits() {
    let Some(pool) = common::postgres("notify_on_commit").await else {
        return;
    };
    let mut listener = sqlx::postgres::PgListener::connect_with(&pool)
        .await
        .unwrap();
    listener
        .listen(herald_sql::outbox::NOTIFY_CHANNEL)
        .await
        .unwrap();
    let outbox = Outbox::new(topic("orders"));
    // Two keys in different lease partitions, so the payloads tell them apart.
    let partition =
        |key: &str| herald_core::broker::partition_for(key, herald_sql::LEASE_PARTITIONS);
    let rolled_back = "order-1";
    let committed = (2..)
        .map(|n| format!("order-{n}"))
        .find(|key| partition(key) != partition(rolled_back))
        .unwrap();

    let mut tx = pool.begin().await.unwrap();
    outbox
        .enqueue(&mut tx, &order_event(rolled_back, 0))
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    outbox
        .enqueue(&mut tx, &order_event(&committed, 0))
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let notification = tokio::time::timeout(HANG_GUARD, listener.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(notification.payload(), partition(&committed).to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_relays_wake_on_commit_without_polling() {
    let Some(pool) = common::postgres("wake_on_commit").await else {
        return;
    };
    wakes_on_enqueue(pool, |_| {}).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_relays_wake_when_poked_without_polling() {
    let (pool, _dir) = common::sqlite().await;
    wakes_on_enqueue(pool, |handle| handle.wake()).await;
}

async fn wakes_on_enqueue<DB: Business>(pool: Pool<DB>, poke: fn(&herald_sql::relay::Handle)) {
    let broker = InMemoryBroker::new(1);
    let mut consumer = broker
        .subscribe(&topic("orders"), &GroupName::new("check").unwrap())
        .await
        .unwrap();
    let relay = sleepy_options()
        .build(pool.clone(), publisher(broker.clone()))
        .unwrap();
    let handle = relay.handle();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(relay.run(shutdown.clone()));
    // Idle: it holds its leases and found nothing.
    tokio::time::timeout(
        HANG_GUARD,
        handle.wait_for(|progress| progress.claims > 0 && !progress.held.is_empty()),
    )
    .await
    .unwrap();

    let outbox = Outbox::new(topic("orders"));
    for n in 0..3 {
        let mut tx = pool.begin().await.unwrap();
        outbox
            .enqueue(&mut tx, &order_event("order-1", n))
            .await
            .unwrap();
        tx.commit().await.unwrap();
        poke(&handle);
        let message = receive(&mut consumer, 1).await.remove(0);
        assert_eq!(
            message
                .event
                .data_as::<serde_json::Value>()
                .unwrap()
                .unwrap()["n"],
            n
        );
    }
    shutdown.cancel();
    assert_eq!(running.await.unwrap().unwrap().published, 3);
}

/// A relay that published rows and died before marking them: the next relay publishes
/// them again grouped differently, which the embedded broker refuses as duplicate ids. The
/// relay publishes one by one and counts the refused ones as published.
async fn republished<DB: Business>(pool: Pool<DB>) {
    let dir = tempfile::tempdir().unwrap();
    let log = herald_log::Log::open(herald_log::Options {
        durability: herald_log::Durability::Os,
        ..herald_log::Options::new(dir.path())
    })
    .unwrap();
    let broker = herald_log::broker::Broker::new(log.clone(), Default::default());
    broker.create_topic(&topic("orders"), 1).await.unwrap();
    let events: Vec<Event> = (0..10).map(|n| order_event("order-1", n)).collect();
    let outbox = Outbox::new(topic("orders"));
    let mut tx = pool.begin().await.unwrap();
    for event in &events {
        outbox.enqueue(&mut tx, event).await.unwrap();
    }
    tx.commit().await.unwrap();
    // The dead relay's publish of the first three.
    use herald_core::broker::Publisher as _;
    broker
        .publish(&topic("orders"), events[..3].to_vec())
        .await
        .unwrap();

    let relay = options()
        .build(pool.clone(), Arc::new(broker.clone()))
        .unwrap();
    let handle = relay.handle();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(relay.run(shutdown.clone()));
    tokio::time::timeout(HANG_GUARD, handle.wait_for(|p| p.published >= 10))
        .await
        .unwrap();
    shutdown.cancel();
    let report = running.await.unwrap().unwrap();
    assert_eq!((report.published, report.publish_failures), (10, 0));
    assert_eq!(status(&pool).await.unwrap().backlog, 0);

    let mut consumer = broker
        .subscribe(&topic("orders"), &GroupName::new("check").unwrap())
        .await
        .unwrap();
    let messages = receive(&mut consumer, 10).await;
    let received: Vec<&Event> = messages.iter().map(|m| &m.event).collect();
    assert_eq!(
        received,
        events.iter().collect::<Vec<_>>(),
        "each once, in order"
    );
    consumer.close().await.unwrap();
    broker.shutdown().await;
    log.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_migrations_started_together_both_succeed() {
    let Some(url) = common::postgres_database("migrate_together").await else {
        return;
    };
    let (a, b) = (
        common::postgres_pool(&url, 2).await,
        common::postgres_pool(&url, 2).await,
    );
    let (first, second) = tokio::join!(
        herald_sql::migrate_report(&a),
        herald_sql::migrate_report(&b)
    );
    let (first, second) = (first.unwrap(), second.unwrap());
    // Each reports what it applied itself: every migration once, in one of the two.
    let mut applied: Vec<i64> = first.iter().chain(&second).map(|m| m.version).collect();
    let len = applied.len();
    applied.sort_unstable();
    applied.dedup();
    assert_eq!(applied.len(), len, "reported twice: {first:?} {second:?}");
    assert_eq!(
        applied.first(),
        Some(&1_000_000_001),
        "{first:?} {second:?}"
    );
    assert_eq!(
        status(&a).await.unwrap().leases.len(),
        herald_sql::LEASE_PARTITIONS as usize
    );
}

async fn busy_key<DB: Business>(pool: Pool<DB>) {
    const ROWS: u64 = 2_000;
    const BATCH_LEN_MAX: u32 = 100;
    let outbox = Outbox::new(topic("orders"));
    let mut tx = pool.begin().await.unwrap();
    for n in 0..ROWS {
        outbox
            .enqueue(&mut tx, &order_event("order-1", n as u32))
            .await
            .unwrap();
    }
    // A few other keys, so that several partitions share the batches at first.
    for n in 0..10 {
        outbox
            .enqueue(&mut tx, &order_event(&format!("order-{}", n + 2), 0))
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();

    let broker = InMemoryBroker::new(1);
    let mut consumer = broker
        .subscribe(&topic("orders"), &GroupName::new("check").unwrap())
        .await
        .unwrap();
    // Neither a poll nor a notification comes in time: only claiming again at once after
    // a batch that may have left rows behind drains the backlog.
    let relay = RelayOptions {
        batch_len_max: BATCH_LEN_MAX,
        poll_interval_ms: 3_600_000,
        listen: false,
        ..options()
    }
    .build(pool.clone(), publisher(broker.clone()))
    .unwrap();
    let handle = relay.handle();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(relay.run(shutdown.clone()));
    let total = ROWS + 10;
    tokio::time::timeout(HANG_GUARD, handle.wait_for(|p| p.published >= total))
        .await
        .expect("the backlog drained without a poll");
    shutdown.cancel();
    let report = running.await.unwrap().unwrap();
    assert_eq!(report.published, total);
    // The busy key's partition soon gets whole batches: about ROWS / BATCH_LEN_MAX of
    // them, not one per equal share of a batch (ROWS / 4 on PostgreSQL's 32 partitions).
    assert!(
        report.batches <= ROWS / u64::from(BATCH_LEN_MAX) + 10,
        "{} batches",
        report.batches
    );
    let messages = receive(&mut consumer, total as usize).await;
    let busy: Vec<u64> = messages
        .iter()
        .filter(|m| m.event.partition_key() == Some("order-1"))
        .map(|m| {
            m.event.data_as::<serde_json::Value>().unwrap().unwrap()["n"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(busy, (0..ROWS).collect::<Vec<_>>(), "the key's order holds");
}
