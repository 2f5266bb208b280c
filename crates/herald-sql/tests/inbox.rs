//! The inbox on SQLite and PostgreSQL: a redelivered event is detected in the transaction
//! of the effect, so the effect happens once; and the inbox as the runtime's idempotency
//! store keeps that store's contract.

mod common;

use std::sync::Arc;

use common::Business;
use herald_core::Event;
use herald_core::broker::GroupName;
use herald_runtime::IdempotencyStore;
use herald_runtime::idempotency::Put;
use herald_sql::inbox::{Ran, RunError, begin};
use herald_sql::{Begin, Inbox};
use sqlx::Pool;

on_both_backends! {
    a_redelivered_event_is_a_duplicate_in_the_same_transaction => begin_detects_duplicates;
    the_effect_of_an_event_happens_once => effect_once;
    concurrent_deliveries_have_one_effect => concurrent_effect_once;
    the_inbox_behaves_as_an_idempotency_store => idempotency_store;
    pruning_deletes_the_oldest_records_before_a_time => prune_oldest;
}

fn group(name: &str) -> GroupName {
    GroupName::new(name).unwrap()
}

fn payment() -> Event {
    Event::new("/payments", "PaymentRequested").with_data(serde_json::json!({ "amount": 10 }))
}

async fn begin_detects_duplicates<DB: Business>(pool: Pool<DB>) {
    let event = payment();
    let billing = group("billing");

    // Rolled back: no record, the event is new again.
    let mut tx = pool.begin().await.unwrap();
    assert_eq!(begin(&mut tx, &billing, &event).await.unwrap(), Begin::New);
    tx.rollback().await.unwrap();
    assert_eq!(DB::inbox_rows(&pool).await, 0);

    let mut tx = pool.begin().await.unwrap();
    assert_eq!(begin(&mut tx, &billing, &event).await.unwrap(), Begin::New);
    assert_eq!(
        begin(&mut tx, &billing, &event).await.unwrap(),
        Begin::Duplicate,
        "seen within the transaction"
    );
    tx.commit().await.unwrap();

    let mut tx = pool.begin().await.unwrap();
    assert_eq!(
        begin(&mut tx, &billing, &event).await.unwrap(),
        Begin::Duplicate
    );
    // Another group has not handled it.
    assert_eq!(
        begin(&mut tx, &group("audit"), &event).await.unwrap(),
        Begin::New
    );
    tx.commit().await.unwrap();
    assert_eq!(DB::inbox_rows(&pool).await, 2);
}

async fn effect_once<DB: Business>(pool: Pool<DB>) {
    DB::create_orders(&pool).await;
    let inbox = Inbox::new(pool.clone());
    let billing = group("billing");
    let event = payment();

    // A failing effect commits nothing: neither the effect nor the record.
    let failed = inbox
        .run(&billing, &event, async |tx| {
            DB::add_to_balance(tx, 10).await;
            Err::<(), _>("card declined")
        })
        .await;
    assert!(
        matches!(failed, Err(RunError::Effect("card declined"))),
        "{failed:?}"
    );
    assert_eq!(DB::balance(&pool).await, 0);
    assert_eq!(DB::inbox_rows(&pool).await, 0);

    for delivery in 0..3 {
        let ran = inbox
            .run(&billing, &event, async |tx| {
                DB::add_to_balance(tx, 10).await;
                Ok::<_, std::convert::Infallible>(delivery)
            })
            .await
            .unwrap();
        let expected = if delivery == 0 {
            Ran::New(0)
        } else {
            Ran::Duplicate
        };
        assert_eq!(ran, expected, "delivery {delivery}");
    }
    assert_eq!(DB::balance(&pool).await, 10, "the effect happened once");
}

async fn concurrent_effect_once<DB: Business>(pool: Pool<DB>) {
    DB::create_orders(&pool).await;
    let inbox = Inbox::new(pool.clone());
    let event = payment();
    let billing = group("billing");
    let runs = (0..6).map(|_| {
        inbox.run(&billing, &event, async |tx| {
            DB::add_to_balance(tx, 10).await;
            Ok::<_, std::convert::Infallible>(())
        })
    });
    let ran = futures::future::join_all(runs).await;
    let new = ran
        .iter()
        .filter(|ran| matches!(ran, Ok(Ran::New(()))))
        .count();
    let duplicates = ran
        .iter()
        .filter(|ran| matches!(ran, Ok(Ran::Duplicate)))
        .count();
    assert_eq!((new, duplicates), (1, 5), "{ran:?}");
    assert_eq!(DB::balance(&pool).await, 10);
}

/// Event ids that are no stream names, long ids, and long groups.
fn awkward_keys() -> Vec<(GroupName, String)> {
    let billing = group("billing");
    let long_group = group(&"g".repeat(256));
    vec![
        (billing.clone(), "evt-1".to_owned()),
        (billing.clone(), "has space".to_owned()),
        (billing.clone(), "a/b/../c".to_owned()),
        (billing.clone(), "été 🎉 注文".to_owned()),
        (billing.clone(), "x".repeat(300)),
        (billing.clone(), "'; DROP TABLE herald_inbox; --".to_owned()),
        (billing.clone(), String::new()),
        (long_group.clone(), "evt-1".to_owned()),
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

/// The behaviour herald-runtime's idempotency suite expects of every store.
async fn idempotency_store<DB: Business>(pool: Pool<DB>) {
    let store: Arc<dyn IdempotencyStore> = Arc::new(Inbox::new(pool.clone()));
    let keys = awkward_keys();
    for (index, (group, id)) in keys.iter().enumerate() {
        assert_eq!(store.get(group, id).await.unwrap(), None, "{group} {id:?}");
        let put = store
            .put(group, id, &outputs(&format!("k{index}")))
            .await
            .unwrap();
        assert_eq!(put, Put::Stored, "{group} {id:?}");
    }
    for (index, (group, id)) in keys.iter().enumerate() {
        let events = outputs(&format!("k{index}"));
        assert_eq!(store.get(group, id).await.unwrap(), Some(events.clone()));
        let put = store.put(group, id, &outputs("later")).await.unwrap();
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
    // A record made by `begin` reads as handled, with nothing published.
    let event = payment();
    let mut tx = pool.begin().await.unwrap();
    begin(&mut tx, &group("billing"), &event).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        store.get(&group("billing"), &event.id).await.unwrap(),
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
    assert!(kept.iter().all(|events| *events == winners[0]));
    assert_eq!(
        store.get(&group("billing"), "evt-raced").await.unwrap(),
        Some(winners[0].clone())
    );
}

async fn prune_oldest<DB: Business>(pool: Pool<DB>) {
    let inbox = Inbox::new(pool.clone());
    let billing = group("billing");
    let events: Vec<Event> = (0..5).map(|_| payment()).collect();
    let mut tx = pool.begin().await.unwrap();
    for event in &events {
        assert_eq!(begin(&mut tx, &billing, event).await.unwrap(), Begin::New);
    }
    tx.commit().await.unwrap();
    let long_ago = chrono::Utc::now() - chrono::Duration::days(1);
    let tomorrow = chrono::Utc::now() + chrono::Duration::days(1);

    assert_eq!(inbox.prune(long_ago, 10).await.unwrap(), 0, "none that old");
    assert_eq!(DB::inbox_rows(&pool).await, 5);
    assert_eq!(
        inbox.prune(tomorrow, 2).await.unwrap(),
        2,
        "at most len_max"
    );
    assert_eq!(DB::inbox_rows(&pool).await, 3);
    assert_eq!(inbox.prune(tomorrow, 10).await.unwrap(), 3);
    assert_eq!(DB::inbox_rows(&pool).await, 0);

    // A pruned event is new again: retention is only for events that cannot come back.
    let mut tx = pool.begin().await.unwrap();
    assert_eq!(
        begin(&mut tx, &billing, &events[0]).await.unwrap(),
        Begin::New
    );
    tx.commit().await.unwrap();
}
