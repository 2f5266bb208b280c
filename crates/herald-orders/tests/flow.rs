//! The order flow end to end, in process: the real embedded log and broker, every service
//! with its SQLite database on a temporary directory, orders placed through the HTTP API.

mod common;

use axum::http::StatusCode;
use common::{WAIT, order, start, stock};
use herald_core::Event;
use herald_core::broker::{Message, TopicName};
use herald_orders::invariants::{COMPLETED_CHAIN, DECLINED_CHAIN, OUT_OF_STOCK_CHAIN};
use herald_orders::{CancelReason, EmailKind, OrderStatus, Pruned, Service, catalog};
use herald_runtime::{ErrorKind, Outcome, RetryOptions};
use serde_json::Value;

/// The types of an order's events as `GET /api/orders/{id}` lists them, checking that each
/// was caused by the one before and carries the order's correlation id and key.
fn chain(details: &Value) -> Vec<String> {
    let correlation_id = details["correlationId"].as_str().unwrap();
    let order_id = details["orderId"].as_str().unwrap();
    let events = details["events"].as_array().unwrap();
    let mut cause: Option<&str> = None;
    let mut types = Vec::new();
    for event in events {
        assert_eq!(event["correlationId"], correlation_id, "{event}");
        assert_eq!(event["causationId"].as_str(), cause, "{event}");
        assert_eq!(event["envelope"]["partitionkey"], order_id, "{event}");
        assert_eq!(event["subject"], order_id, "{event}");
        assert!(
            event["source"]
                .as_str()
                .unwrap()
                .starts_with("herald://orders/"),
            "{event}"
        );
        cause = Some(event["eventId"].as_str().unwrap());
        types.push(event["type"].as_str().unwrap().to_owned());
    }
    types
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_placed_order_completes_with_its_whole_causal_chain_in_the_audit() {
    let system = start(common::options()).await;
    let before = stock(&system.handle).await;
    let placed = system
        .place(
            "cust-alice",
            &[("prod-mouse", 2), ("prod-keyboard", 1)],
            "card",
        )
        .await;
    let order_id = placed["orderId"].as_str().unwrap();
    let correlation_id = placed["correlationId"].as_str().unwrap();
    assert_eq!(placed["status"], "pending");
    let total = 2 * 2_900 + 8_900;
    assert_eq!(placed["totalCents"], total);

    let order = system.settled(order_id).await;
    assert_eq!(order.status, OrderStatus::Completed);
    assert!(order.tracking_number.as_deref().unwrap().starts_with("HX"));
    system.idle_and_sound().await;

    let details = system.get(&format!("/api/orders/{order_id}")).await;
    assert_eq!(details.status, 200, "{}", details.body);
    assert_eq!(details.body["status"], "completed");
    assert_eq!(details.body["payment"]["chargedCents"], total);
    assert_eq!(details.body["payment"]["refundedCents"], 0);
    assert_eq!(chain(&details.body), COMPLETED_CHAIN);
    let audit = system
        .get(&format!("/api/audit?correlationId={correlation_id}"))
        .await;
    assert_eq!(audit.body["events"], details.body["events"]);

    let after = stock(&system.handle).await;
    for ((id, available, reserved), (_, available_before, reserved_before)) in
        after.iter().zip(&before)
    {
        let ordered = match id.as_str() {
            "prod-mouse" => 2,
            "prod-keyboard" => 1,
            _ => 0,
        };
        assert_eq!(*available, available_before - ordered, "{id}");
        assert_eq!(*reserved, reserved_before + ordered, "{id}");
    }

    let emails = system.handle.emails(order_id).await.unwrap();
    let kinds: Vec<EmailKind> = emails.iter().map(|email| email.kind).collect();
    assert_eq!(kinds, [EmailKind::OrderReceived, EmailKind::OrderConfirmed]);
    assert!(
        emails[1]
            .body
            .contains(order.tracking_number.as_deref().unwrap())
    );
    assert_eq!(emails[0].recipient, "Alice Martin <alice@example.com>");

    let analytics = system.handle.analytics().await.unwrap();
    assert_eq!(analytics.orders.placed, 1);
    assert_eq!(analytics.orders.completed, 1);
    assert_eq!(analytics.orders.pending, 0);
    assert_eq!(analytics.revenue_cents, total);
    assert_eq!(analytics.top_products[0].product_id, "prod-mouse");
    assert_eq!(analytics.top_products[0].units_sold, 2);

    // Each group skipped the types it does not handle, counting them: shipping handles
    // one type of the five this order produced.
    assert_eq!(system.handle.skipped(Service::Shipping), 4);
    assert_eq!(system.handle.skipped(Service::Audit), 0);
    let report = system.stop().await;
    assert_eq!(report.consumers[&Service::Audit].handled, 5);
    assert_eq!(report.consumers[&Service::Order].handled, 1);
    assert_eq!(report.consumers[&Service::Order].skipped, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declined_payment_cancels_the_order_and_moves_no_stock() {
    let system = start(common::options()).await;
    let before = stock(&system.handle).await;
    // The test card, and an amount above Erin's limit of 50.00.
    let declined_card = system
        .place("cust-alice", &[("prod-mouse", 1)], "card_declined")
        .await;
    let over_limit = system
        .place("cust-erin", &[("prod-monitor", 1)], "card")
        .await;
    // The audit and the e-mails follow the settlement: look once everything is handled.
    system.idle_and_sound().await;
    for (placed, reason) in [
        (&declined_card, "card was declined"),
        (&over_limit, "above the customer's limit"),
    ] {
        let order_id = placed["orderId"].as_str().unwrap();
        let order = system.settled(order_id).await;
        assert_eq!(order.status, OrderStatus::Cancelled);
        assert_eq!(order.cancel_reason, Some(CancelReason::PaymentDeclined));
        assert!(
            order.cancel_detail.as_deref().unwrap().contains(reason),
            "{order:?}"
        );
        assert_eq!(order.tracking_number, None);
        let details = system.get(&format!("/api/orders/{order_id}")).await;
        assert_eq!(chain(&details.body), DECLINED_CHAIN);
        assert_eq!(details.body["payment"]["status"], "declined");
        assert_eq!(details.body["payment"]["chargedCents"], 0);
        let kinds: Vec<EmailKind> = system
            .handle
            .emails(order_id)
            .await
            .unwrap()
            .iter()
            .map(|email| email.kind)
            .collect();
        assert_eq!(kinds, [EmailKind::OrderReceived, EmailKind::OrderCancelled]);
    }
    assert_eq!(stock(&system.handle).await, before, "no stock moved");
    let analytics = system.handle.analytics().await.unwrap();
    assert_eq!(analytics.orders.cancelled, 2);
    assert_eq!(analytics.orders.cancelled_by_reason["payment_declined"], 2);
    assert_eq!(analytics.payments.declined_by_reason["card_declined"], 1);
    assert_eq!(analytics.payments.declined_by_reason["over_limit"], 1);
    assert_eq!(analytics.revenue_cents, 0);
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shortage_refunds_the_charge_and_cancels_the_order_reserving_nothing() {
    let system = start(common::options()).await;
    let before = stock(&system.handle).await;
    // Sold out: nothing of the order is reserved, not even the mouse in stock.
    let sold_out = system
        .place(
            "cust-carol",
            &[("prod-mouse", 3), ("prod-signed-vinyl", 1)],
            "card",
        )
        .await;
    let order_id = sold_out["orderId"].as_str().unwrap();
    let order = system.settled(order_id).await;
    assert_eq!(order.status, OrderStatus::Cancelled);
    assert_eq!(order.cancel_reason, Some(CancelReason::OutOfStock));
    assert!(
        order
            .cancel_detail
            .as_deref()
            .unwrap()
            .contains("prod-signed-vinyl (1 requested, 0 available)"),
        "{order:?}"
    );
    system.idle_and_sound().await;
    let details = system.get(&format!("/api/orders/{order_id}")).await;
    assert_eq!(chain(&details.body), OUT_OF_STOCK_CHAIN);
    let total = 3 * 2_900 + 12_000;
    assert_eq!(details.body["payment"]["chargedCents"], total);
    assert_eq!(details.body["payment"]["refundedCents"], total);
    let failed = &details.body["events"][2]["envelope"]["data"];
    assert_eq!(failed["shortages"][0]["productId"], "prod-signed-vinyl");
    assert_eq!(failed["shortages"][0]["available"], 0);
    assert_eq!(failed["shortages"].as_array().unwrap().len(), 1);
    assert_eq!(stock(&system.handle).await, before, "no stock moved");

    // A scarce product: the first order takes two of the three, the second, asking for
    // two more, is refused whole.
    let first = system
        .place("cust-grace", &[("prod-vintage-camera", 2)], "card")
        .await;
    let first = system.settled(first["orderId"].as_str().unwrap()).await;
    assert_eq!(first.status, OrderStatus::Completed);
    let second = system
        .place(
            "cust-grace",
            &[("prod-keyboard", 1), ("prod-vintage-camera", 2)],
            "paypal",
        )
        .await;
    let second = system.settled(second["orderId"].as_str().unwrap()).await;
    assert_eq!(second.cancel_reason, Some(CancelReason::OutOfStock));
    assert!(
        second
            .cancel_detail
            .as_deref()
            .unwrap()
            .contains("prod-vintage-camera (2 requested, 1 available)"),
        "{second:?}"
    );
    system.idle_and_sound().await;
    let products = system.handle.products().await.unwrap();
    let camera = products
        .iter()
        .find(|product| product.product_id == "prod-vintage-camera")
        .unwrap();
    assert_eq!((camera.available, camera.reserved), (1, 2));
    let keyboard = products
        .iter()
        .find(|product| product.product_id == "prod-keyboard")
        .unwrap();
    assert_eq!(keyboard.reserved, 0, "the refused order reserved nothing");
    let analytics = system.handle.analytics().await.unwrap();
    assert_eq!(analytics.orders.cancelled_by_reason["out_of_stock"], 2);
    assert_eq!(analytics.payments.refunded, 2);
    assert_eq!(analytics.refunded_cents, total + 8_900 + 2 * 45_000);
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_gateway_errors_are_retried_until_the_orders_complete() {
    let mut options = common::options();
    options.transient_error_rate = 0.5;
    options.pipeline.retry = RetryOptions {
        attempts_max: 30,
        elapsed_max_ms: 30_000,
        delay_initial_ms: 1,
        delay_max_ms: 5,
    };
    let system = start(options).await;
    // One at a time, so the gateway's seeded draws come in the same order every run.
    for _ in 0..6 {
        let placed = system
            .place("cust-bob", &[("prod-webcam", 1)], "card")
            .await;
        let order = system.settled(placed["orderId"].as_str().unwrap()).await;
        assert_eq!(order.status, OrderStatus::Completed);
    }
    let gateway = system.handle.gateway();
    assert!(
        gateway.transient_errors() > 0,
        "the gateway failed some calls"
    );
    assert_eq!(
        gateway.calls(),
        6 + gateway.transient_errors(),
        "each order charged once, after its failed calls"
    );
    assert!(
        system
            .handle
            .dead_letters(Service::Payment)
            .await
            .unwrap()
            .is_empty()
    );
    system.idle_and_sound().await;
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_retries_dead_letter_the_charge_and_a_replay_completes_the_order() {
    let mut options = common::options();
    options.transient_error_rate = 1.0;
    options.pipeline.retry.attempts_max = 3;
    let system = start(options).await;
    let placed = system
        .place("cust-frank", &[("prod-desk-lamp", 2)], "card")
        .await;
    let order_id = placed["orderId"].as_str().unwrap();
    // Dead-lettered messages are acked: the system goes idle with the order pending.
    system.handle.wait_idle(WAIT).await.unwrap();
    let dead = system.handle.dead_letters(Service::Payment).await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].event.ty, "OrderPlaced");
    assert_eq!(dead[0].error_kind, ErrorKind::Transient);
    assert_eq!(dead[0].attempts, 3);
    assert_eq!(system.handle.gateway().calls(), 3);
    let order = system.handle.order(order_id).await.unwrap().unwrap();
    assert_eq!(order.status, OrderStatus::Pending);
    let report = system.handle.check_invariants().await.unwrap();
    assert!(report.holds(), "{report}");
    assert_eq!(report.pending, 1);

    // The gateway recovers; the operator replays the dead letter.
    system
        .handle
        .gateway()
        .set_transient_error_rate(0.0)
        .unwrap();
    let replay = system
        .handle
        .replay(Service::Payment, &dead[0].event.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(replay, herald_runtime::consumer::Replay::Queued);
    let order = system.settled(order_id).await;
    assert_eq!(order.status, OrderStatus::Completed);
    let report = system.idle_and_sound().await;
    assert_eq!(report.pending, 0);
    assert!(
        system
            .handle
            .dead_letters(Service::Payment)
            .await
            .unwrap()
            .is_empty()
    );
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivered_events_change_nothing() {
    let system = start(common::options()).await;
    let mut correlation_ids = Vec::new();
    for (customer, items, method) in [
        ("cust-alice", vec![("prod-mouse", 1)], "card"),
        ("cust-alice", vec![("prod-mouse", 1)], "card_declined"),
        ("cust-bob", vec![("prod-signed-vinyl", 1)], "card"),
    ] {
        let placed = system.place(customer, &items, method).await;
        system.settled(placed["orderId"].as_str().unwrap()).await;
        correlation_ids.push(placed["correlationId"].as_str().unwrap().to_owned());
    }
    system.idle_and_sound().await;
    let stock_before = stock(&system.handle).await;
    let analytics_before = system.handle.analytics().await.unwrap();
    let calls_before = system.handle.gateway().calls();

    // Every event of the three flows, delivered again to every service, as after a crash
    // between a handler's commit and its ack.
    let topic = TopicName::new("orders").unwrap();
    let mut redelivered = 0;
    for correlation_id in &correlation_ids {
        for entry in system.handle.audit_trail(correlation_id).await.unwrap() {
            let event = Event::from_json(entry.envelope.to_string().as_bytes()).unwrap();
            for service in Service::CONSUMING {
                let message = Message {
                    topic: topic.clone(),
                    partition: entry.partition,
                    offset: entry.offset,
                    attempt: 2,
                    event: event.clone(),
                };
                let outcome = system
                    .handle
                    .redeliver(service, message)
                    .await
                    .unwrap()
                    .unwrap();
                assert!(
                    matches!(outcome, Outcome::Handled { .. } | Outcome::Skipped),
                    "{outcome:?}"
                );
                redelivered += 1;
            }
        }
    }
    assert_eq!(redelivered, 6 * (5 + 3 + 5));
    let report = system.idle_and_sound().await;
    assert_eq!((report.completed, report.cancelled), (1, 2));
    assert_eq!(stock(&system.handle).await, stock_before);
    assert_eq!(system.handle.analytics().await.unwrap(), analytics_before);
    assert_eq!(
        system.handle.gateway().calls(),
        calls_before,
        "no charge reached the gateway again"
    );
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_analytics_read_model_rebuilds_from_the_log_to_the_same_figures() {
    let system = start(common::options()).await;
    for (customer, items, method) in [
        ("cust-alice", vec![("prod-mouse", 2)], "card"),
        ("cust-dave", vec![("prod-gpu", 1)], "card"),
        (
            "cust-carol",
            vec![("prod-gpu", 1), ("prod-notebook", 5)],
            "paypal",
        ),
        ("cust-heidi", vec![("prod-signed-vinyl", 1)], "card"),
    ] {
        let placed = system.place(customer, &items, method).await;
        system.settled(placed["orderId"].as_str().unwrap()).await;
    }
    system.idle_and_sound().await;
    let before = system.handle.analytics().await.unwrap();
    assert_eq!(before.orders.placed, 4);
    assert_eq!(before.checkpoint.rebuilds, 0);

    system.handle.rebuild_analytics().await.unwrap();
    system.idle_and_sound().await;
    let mut after = system.handle.analytics().await.unwrap();
    assert_eq!(after.checkpoint.rebuilds, 1);
    after.checkpoint = before.checkpoint.clone();
    assert_eq!(after, before);
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_system_resumes_where_it_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let mut options = common::options();
    options.data_dir = dir.path().to_owned();
    let run = async |options: herald_orders::SystemOptions, orders: usize| {
        let log = herald_log::Log::open(herald_log::Options::new(dir.path())).unwrap();
        let system = options.build(log.clone()).await.unwrap();
        let handle = system.handle();
        let shutdown = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(system.run(shutdown.clone()));
        for _ in 0..orders {
            let placed = handle
                .place(
                    serde_json::from_value(order("cust-alice", &[("prod-gpu", 1)], "card"))
                        .unwrap(),
                    None,
                )
                .await
                .unwrap();
            let order = handle
                .wait_settled(&placed.order_id, WAIT)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(order.status, OrderStatus::Completed);
        }
        handle.wait_idle(WAIT).await.unwrap();
        let report = handle.check_invariants().await.unwrap();
        shutdown.cancel();
        task.await.unwrap().unwrap();
        log.close().await.unwrap();
        report
    };
    let first = run(options.clone(), 2).await;
    assert!(first.holds(), "{first}");
    // The stock and every service's state survive the restart; seeding does not reset them.
    let second = run(options, 3).await;
    assert!(second.holds(), "{second}");
    assert_eq!(second.completed, 5);
    let gpu = catalog::product("prod-gpu").unwrap();
    assert!(gpu.initial_stock >= 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_inbox_records_and_idempotency_keys_are_deleted_and_nothing_else() {
    let system = start(common::options()).await;
    let body = order("cust-alice", &[("prod-mouse", 1)], "card");
    let first = system.post(&body, Some("key-1")).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.body);
    let order_id = first.body["orderId"].as_str().unwrap().to_owned();
    system.settled(&order_id).await;
    system.idle_and_sound().await;

    // Nothing has expired yet.
    let now = chrono::Utc::now();
    assert_eq!(system.handle.prune(now).await.unwrap(), Pruned::default());
    let retry = system.post(&body, Some("key-1")).await;
    assert_eq!(retry.body["orderId"], order_id.as_str(), "the key holds");

    // A day after the retention of both: the inbox records of the four services that
    // reacted to the order (payment, inventory, shipping, order), and the key.
    let later = now
        + chrono::Duration::milliseconds(common::options().retention.inbox_ms as i64 + 86_400_000);
    let pruned = system.handle.prune(later).await.unwrap();
    assert_eq!((pruned.inbox, pruned.idempotency_keys), (4, 1));
    assert_eq!(system.handle.prune(later).await.unwrap(), Pruned::default());
    // The order, its events and its effects stay.
    system.idle_and_sound().await;
    assert_eq!(
        system
            .handle
            .order(&order_id)
            .await
            .unwrap()
            .unwrap()
            .status,
        OrderStatus::Completed
    );
    // A forgotten key places a new order.
    let after = system.post(&body, Some("key-1")).await;
    assert_eq!(after.status, StatusCode::CREATED, "{}", after.body);
    assert_ne!(after.body["orderId"], order_id.as_str());
    system.stop().await;
}
