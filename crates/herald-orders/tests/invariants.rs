//! The invariant check catches what it promises to: each kind of damage to a sound system's
//! databases is reported, and undoing it makes the check pass again.

mod common;

use std::path::Path;

use herald_log::{Log, Options};
use herald_orders::invariants::{Invariant, check};
use herald_orders::{OrderStatus, SystemOptions};
use sqlx::{Connection as _, SqliteConnection};
use tokio_util::sync::CancellationToken;

async fn run_flow(dir: &Path) -> (String, String, String) {
    let options = SystemOptions {
        data_dir: dir.to_owned(),
        ..common::options()
    };
    let log = Log::open(Options::new(dir)).unwrap();
    let system = options.build(log.clone()).await.unwrap();
    let handle = system.handle();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(system.run(shutdown.clone()));
    let mut ids = Vec::new();
    for (items, method) in [
        (vec![("prod-mouse", 2)], "card"),
        (vec![("prod-mouse", 1)], "card_declined"),
        (vec![("prod-signed-vinyl", 1)], "card"),
    ] {
        let request = serde_json::from_value(common::order("cust-alice", &items, method)).unwrap();
        let order = handle.place(request, None).await.unwrap();
        let order = handle
            .wait_settled(&order.order_id, common::WAIT)
            .await
            .unwrap()
            .unwrap();
        assert_ne!(order.status, OrderStatus::Pending);
        ids.push(order.order_id);
    }
    handle.wait_idle(common::WAIT).await.unwrap();
    shutdown.cancel();
    task.await.unwrap().unwrap();
    log.close().await.unwrap();
    let mut ids = ids.into_iter();
    (
        ids.next().unwrap(),
        ids.next().unwrap(),
        ids.next().unwrap(),
    )
}

async fn sql(dir: &Path, service: &str, statements: &str) {
    let path = dir.join("services").join(format!("{service}.sqlite"));
    let mut conn = SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    sqlx::raw_sql(statements).execute(&mut conn).await.unwrap();
    conn.close().await.unwrap();
}

async fn assert_reported(dir: &Path, invariant: Invariant, subject: &str) {
    let report = check(dir).await.unwrap();
    assert!(
        report
            .violations
            .iter()
            .any(|violation| violation.invariant == invariant && violation.subject == subject),
        "{invariant:?} on {subject} not reported: {report}"
    );
}

async fn assert_sound(dir: &Path) {
    let report = check(dir).await.unwrap();
    assert!(report.holds(), "{report}");
    assert_eq!((report.completed, report.cancelled), (1, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_damage_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let (completed, declined, short) = run_flow(dir).await;
    assert_sound(dir).await;

    // Each damage, then its undoing.
    let cases: Vec<(&str, String, String, Invariant, &str)> = vec![
        (
            "inventory",
            "UPDATE products SET available = available + 1 WHERE product_id = 'prod-mouse'"
                .to_owned(),
            "UPDATE products SET available = available - 1 WHERE product_id = 'prod-mouse'"
                .to_owned(),
            Invariant::Stock,
            "prod-mouse",
        ),
        (
            "inventory",
            format!(
                "UPDATE reservations SET quantity = quantity + 1 WHERE order_id = '{completed}'"
            ),
            format!(
                "UPDATE reservations SET quantity = quantity - 1 WHERE order_id = '{completed}'"
            ),
            Invariant::Goods,
            &completed,
        ),
        (
            "payment",
            format!(
                "UPDATE payments SET amount_cents = amount_cents + 1 WHERE order_id = '{completed}'"
            ),
            format!(
                "UPDATE payments SET amount_cents = amount_cents - 1 WHERE order_id = '{completed}'"
            ),
            Invariant::Money,
            &completed,
        ),
        (
            "payment",
            format!("UPDATE refunds SET amount_cents = 0 WHERE order_id = '{short}'"),
            format!(
                "UPDATE refunds SET amount_cents = (SELECT amount_cents FROM payments
                                                    WHERE order_id = '{short}')
                 WHERE order_id = '{short}'"
            ),
            Invariant::Money,
            &short,
        ),
        (
            "payment",
            format!("UPDATE payments SET status = 'charged' WHERE order_id = '{declined}'"),
            format!("UPDATE payments SET status = 'declined' WHERE order_id = '{declined}'"),
            Invariant::Money,
            &declined,
        ),
        (
            "shipping",
            format!("UPDATE shipments SET order_id = 'ghost' WHERE order_id = '{completed}'"),
            format!("UPDATE shipments SET order_id = '{completed}' WHERE order_id = 'ghost'"),
            Invariant::Goods,
            &completed,
        ),
        (
            "shipping",
            format!("UPDATE shipments SET order_id = 'ghost' WHERE order_id = '{completed}'"),
            format!("UPDATE shipments SET order_id = '{completed}' WHERE order_id = 'ghost'"),
            Invariant::References,
            "ghost",
        ),
        (
            "notification",
            format!(
                "INSERT INTO emails (event_id, order_id, kind, recipient, subject, body, sent_at)
                 SELECT 'forged', order_id, kind, recipient, subject, body, sent_at FROM emails
                 WHERE order_id = '{declined}' AND kind = 'order_cancelled'"
            ),
            "DELETE FROM emails WHERE event_id = 'forged'".to_owned(),
            Invariant::Emails,
            &declined,
        ),
        (
            "analytics",
            "UPDATE analytics_counters SET value = value + 1 WHERE name = 'orders_completed'"
                .to_owned(),
            "UPDATE analytics_counters SET value = value - 1 WHERE name = 'orders_completed'"
                .to_owned(),
            Invariant::Analytics,
            "completed",
        ),
    ];
    for (service, damage, repair, invariant, subject) in &cases {
        sql(dir, service, damage).await;
        assert_reported(dir, *invariant, subject).await;
        sql(dir, service, repair).await;
        assert_sound(dir).await;
    }

    // The audit trail is append-only; a forged event caused by the completed order's
    // placement branches its chain.
    sql(
        dir,
        "audit",
        &format!(
            "INSERT INTO audit_events (event_id, type, source, subject, correlation_id,
                                       causation_id, topic, partition, partition_offset,
                                       recorded_at, envelope)
             SELECT 'forged', 'PaymentFailed', source, subject, correlation_id, event_id,
                    topic, partition, partition_offset + 100, recorded_at, envelope
             FROM audit_events WHERE subject = '{completed}' AND type = 'OrderPlaced'"
        ),
    )
    .await;
    assert_reported(dir, Invariant::Audit, &completed).await;
    let path = dir.join("services").join("audit.sqlite");
    let mut conn = SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    let refused = sqlx::query("DELETE FROM audit_events WHERE event_id = 'forged'")
        .execute(&mut conn)
        .await;
    assert!(refused.is_err(), "the trail refuses deletes");
}
