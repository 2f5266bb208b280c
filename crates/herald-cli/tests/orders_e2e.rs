//! End-to-end tests of the order system against a real `herald up` process, over HTTP only:
//! the happy path, a declined payment, a product out of stock, transient gateway errors,
//! invalid orders, the idempotency key, the bearer tokens on the `/api` routes, and a
//! SIGTERM followed by a restart on the same data directory.
//!
//! Terminal states are awaited with the long-poll `GET /api/orders/{id}?waitMs=`, which the
//! order service answers as soon as the order settles. The audit service records the last
//! event of a flow a moment after the order settled, so before reading a trail (or the
//! metrics of a dead letter) the tests wait with `GET /api/idle?waitMs=` for the system to
//! be idle: every effect of what they did has happened then.

mod common;

use std::collections::BTreeMap;

use common::http::{Herald, Reply};
use hyper::body::Bytes;
use hyper::{Method, StatusCode};
use serde_json::{Value, json};

/// The longest a test waits for one order to settle, per long-poll, in milliseconds (the API's
/// own maximum). A guard against a hang, not a timing assertion: the flow takes milliseconds.
const WAIT_MS: u64 = 30_000;

/// How many long-polls a test makes for one order before it fails.
const WAIT_POLLS_MAX: usize = 4;

/// The body of `POST /api/orders`.
fn order(customer: &str, items: &[(&str, u32)], payment_method: &str) -> Value {
    json!({
        "customerId": customer,
        "items": items
            .iter()
            .map(|(product, quantity)| json!({"productId": product, "quantity": quantity}))
            .collect::<Vec<_>>(),
        "shippingAddress": "1 Main St, Springfield",
        "paymentMethod": payment_method,
    })
}

/// `POST /api/orders` with `body` and optionally an `Idempotency-Key`.
async fn post_order(herald: &Herald, body: &Value, key: Option<&str>) -> Reply {
    let mut headers = vec![("content-type", "application/json")];
    if let Some(key) = key {
        headers.push(("idempotency-key", key));
    }
    herald
        .send(Method::POST, "/api/orders", &headers, body.to_string())
        .await
        .unwrap()
}

/// Places `body`; asserts `201` with its `Location`; returns the order.
async fn place(herald: &Herald, body: &Value) -> Value {
    let reply = post_order(herald, body, None).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    let id = reply.body["orderId"].as_str().unwrap();
    assert_eq!(
        reply.headers["location"],
        format!("/api/orders/{id}").as_str()
    );
    assert_eq!(reply.body["status"], "pending", "{}", reply.body);
    reply.body
}

/// The order `id` once it is completed or cancelled.
async fn settled(herald: &Herald, id: &str) -> Value {
    for _ in 0..WAIT_POLLS_MAX {
        let reply = herald
            .get(&format!("/api/orders/{id}?waitMs={WAIT_MS}"))
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        if reply.body["status"] != "pending" {
            return reply.body;
        }
    }
    panic!("order {id} did not settle");
}

/// Each product's `(available, reserved)` units.
async fn stock(herald: &Herald) -> BTreeMap<String, (u64, u64)> {
    let reply = herald.get("/api/products").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    reply.body["products"]
        .as_array()
        .unwrap()
        .iter()
        .map(|product| {
            (
                product["productId"].as_str().unwrap().to_owned(),
                (
                    product["available"].as_u64().unwrap(),
                    product["reserved"].as_u64().unwrap(),
                ),
            )
        })
        .collect()
}

/// Waits for the system to be idle (`GET /api/idle?waitMs=`), failing if it is still busy
/// after [`WAIT_MS`]: a guard against a hang, not a timing assertion.
async fn wait_idle(herald: &Herald) {
    let reply = herald.get(&format!("/api/idle?waitMs={WAIT_MS}")).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.body["idle"], true, "still busy: {}", reply.body);
}

/// Every order stored, newest first.
async fn orders(herald: &Herald) -> Vec<Value> {
    let reply = herald.get("/api/orders?limit=500").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    reply.body["orders"].as_array().unwrap().clone()
}

/// The audit trail of `order` once the system is idle: their types, after checking that it
/// holds `len` events, that each carries the correlation id and the order id as its
/// partition key, that the first has no cause and that every later one was caused by the
/// one before it.
async fn trail(herald: &Herald, order: &Value, len: usize) -> Vec<String> {
    let correlation_id = order["correlationId"].as_str().unwrap();
    wait_idle(herald).await;
    let reply = herald
        .get(&format!("/api/audit?correlationId={correlation_id}"))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let events = reply.body["events"].as_array().unwrap().clone();
    assert_eq!(events.len(), len, "{}", reply.body);
    let mut cause = Value::Null;
    for event in &events {
        assert_eq!(event["correlationId"], correlation_id, "{event}");
        assert_eq!(
            event["envelope"]["correlationid"], correlation_id,
            "{event}"
        );
        assert_eq!(
            event["envelope"]["partitionkey"], order["orderId"],
            "{event}"
        );
        assert_eq!(
            event["causationId"], cause,
            "the causation chain breaks at {event}"
        );
        cause = event["eventId"].clone();
    }
    events
        .iter()
        .map(|event| event["type"].as_str().unwrap().to_owned())
        .collect()
}

/// Asserts a problem document of `status` and `kind`.
fn assert_problem(reply: &Reply, status: StatusCode, kind: &str) {
    assert_eq!(reply.status, status, "{}", reply.body);
    assert_eq!(
        reply.content_type, "application/problem+json",
        "{}",
        reply.body
    );
    assert_eq!(
        reply.body["type"],
        format!("urn:herald:problem:{kind}"),
        "{}",
        reply.body
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_order_completes_with_a_complete_audit_trail() {
    let dir = tempfile::tempdir().unwrap();
    let herald = Herald::start(dir.path(), &[]);
    let before = stock(&herald).await;

    let placed = place(
        &herald,
        &order(
            "cust-alice",
            &[("prod-keyboard", 2), ("prod-mouse", 1)],
            "card",
        ),
    )
    .await;
    let done = settled(&herald, placed["orderId"].as_str().unwrap()).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["totalCents"], 2 * 8_900 + 2_900);
    assert!(done["trackingNumber"].is_string(), "{done}");
    assert_eq!(done["payment"]["chargedCents"], done["totalCents"]);
    assert_eq!(done["payment"]["refundedCents"], 0);
    assert_eq!(
        trail(&herald, &placed, 5).await,
        [
            "OrderPlaced",
            "PaymentProcessed",
            "InventoryReserved",
            "ShippingScheduled",
            "OrderCompleted"
        ]
    );
    let after = stock(&herald).await;
    assert_eq!(after["prod-keyboard"].0, before["prod-keyboard"].0 - 2);
    assert_eq!(after["prod-mouse"].0, before["prod-mouse"].0 - 1);

    // The flow's events are on the log the event API serves, in the `orders` topic.
    let all = herald.get("/all?limit=1000").await;
    assert_eq!(all.status, StatusCode::OK, "{}", all.body);
    let types: Vec<&str> = all.body["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|record| record["event"]["correlationid"] == placed["correlationId"])
        .map(|record| record["event"]["type"].as_str().unwrap())
        .collect();
    assert_eq!(types.len(), 5, "{types:?}");
    assert!(herald.terminate().success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_declined_payment_cancels_the_order_and_leaves_the_stock_alone() {
    let dir = tempfile::tempdir().unwrap();
    let herald = Herald::start(dir.path(), &[]);
    let before = stock(&herald).await;

    let placed = place(
        &herald,
        &order("cust-bob", &[("prod-monitor", 1)], "card_declined"),
    )
    .await;
    let done = settled(&herald, placed["orderId"].as_str().unwrap()).await;
    assert_eq!(done["status"], "cancelled", "{done}");
    assert_eq!(done["cancelReason"], "payment_declined", "{done}");
    assert_eq!(done["payment"]["chargedCents"], 0, "{done}");
    assert_eq!(
        trail(&herald, &placed, 3).await,
        ["OrderPlaced", "PaymentFailed", "OrderCancelled"]
    );
    assert_eq!(stock(&herald).await, before);
    assert!(herald.terminate().success());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_order_out_of_stock_is_refunded_and_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    let herald = Herald::start(dir.path(), &[]);
    let before = stock(&herald).await;

    // The keyboard is in stock, the vinyl is not: nothing of the order is reserved.
    let placed = place(
        &herald,
        &order(
            "cust-carol",
            &[("prod-keyboard", 1), ("prod-signed-vinyl", 1)],
            "card",
        ),
    )
    .await;
    let done = settled(&herald, placed["orderId"].as_str().unwrap()).await;
    assert_eq!(done["status"], "cancelled", "{done}");
    assert_eq!(done["cancelReason"], "out_of_stock", "{done}");
    assert_eq!(
        done["payment"]["chargedCents"], done["totalCents"],
        "{done}"
    );
    assert_eq!(
        done["payment"]["refundedCents"], done["totalCents"],
        "{done}"
    );
    assert_eq!(
        trail(&herald, &placed, 5).await,
        [
            "OrderPlaced",
            "PaymentProcessed",
            "InventoryFailed",
            "PaymentRefunded",
            "OrderCancelled"
        ]
    );
    assert_eq!(stock(&herald).await, before);
    assert!(herald.terminate().success());
}

#[tokio::test(flavor = "multi_thread")]
async fn transient_gateway_errors_are_retried_until_the_orders_complete() {
    let dir = tempfile::tempdir().unwrap();
    let herald = Herald::start(dir.path(), &["--transient-error-rate", "0.5"]);
    // Half the gateway's calls fail: over these orders some certainly do (the draws are
    // seeded), and every order still completes, each charged once.
    for _ in 0..8 {
        let placed = place(
            &herald,
            &order("cust-grace", &[("prod-webcam", 1)], "paypal"),
        )
        .await;
        let done = settled(&herald, placed["orderId"].as_str().unwrap()).await;
        assert_eq!(done["status"], "completed", "{done}");
        assert_eq!(done["payment"]["chargedCents"], 5_900, "{done}");
        assert_eq!(trail(&herald, &placed, 5).await.len(), 5);
    }
    let metrics = herald.get("/metrics").await;
    let text = metrics.body.as_str().unwrap();
    assert!(
        !text.contains("herald_dead_letters_total{"),
        "nothing is dead-lettered: {text}"
    );
    assert!(herald.terminate().success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gateway_that_always_fails_dead_letters_the_payment() {
    let dir = tempfile::tempdir().unwrap();
    let herald = Herald::start(dir.path(), &["--transient-error-rate", "1"]);
    let placed = place(&herald, &order("cust-grace", &[("prod-webcam", 1)], "card")).await;
    // Every retry fails too: once they are exhausted the payment's consumer dead-letters the
    // event, and the order waits, pending, for a replay.
    wait_idle(&herald).await;
    let metrics = herald.get("/metrics").await;
    let text = metrics.body.as_str().unwrap();
    assert!(
        text.contains(r#"herald_dead_letters_total{group="payment",topic="orders"} 1"#),
        "one dead letter: {text}"
    );
    let order = herald
        .get(&format!(
            "/api/orders/{}",
            placed["orderId"].as_str().unwrap()
        ))
        .await;
    assert_eq!(order.body["status"], "pending", "{}", order.body);
    assert_eq!(order.body["payment"]["chargedCents"], 0, "{}", order.body);
    assert!(herald.terminate().success());
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_orders_are_rejected_and_nothing_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let herald = Herald::start(dir.path(), &[]);
    let before = stock(&herald).await;

    let not_json = herald
        .post("/api/orders", "application/json", "{\"customerId\": ")
        .await;
    assert_problem(&not_json, StatusCode::BAD_REQUEST, "invalid-json");
    let unknown_member = herald
        .post(
            "/api/orders",
            "application/json",
            json!({"customerId": "cust-alice", "items": [], "colour": "red"}).to_string(),
        )
        .await;
    assert_problem(&unknown_member, StatusCode::BAD_REQUEST, "invalid-json");
    let text = herald.post("/api/orders", "text/plain", "hello").await;
    assert_problem(
        &text,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported-media-type",
    );
    for (body, pointer) in [
        (
            order("cust-nobody", &[("prod-mouse", 1)], "card"),
            "/customerId",
        ),
        (
            order("cust-alice", &[("prod-nothing", 1)], "card"),
            "/items/0/productId",
        ),
        (
            order("cust-alice", &[("prod-mouse", 0)], "card"),
            "/items/0/quantity",
        ),
        (order("cust-alice", &[], "card"), "/items"),
        (
            order("cust-alice", &[("prod-mouse", 1)], "cash"),
            "/paymentMethod",
        ),
    ] {
        let reply = post_order(&herald, &body, None).await;
        assert_problem(&reply, StatusCode::UNPROCESSABLE_ENTITY, "invalid-order");
        let errors = reply.body["errors"].as_array().unwrap();
        assert!(
            errors.iter().any(|error| error["pointer"] == pointer),
            "{pointer} in {}",
            reply.body
        );
    }

    assert!(orders(&herald).await.is_empty());
    assert_eq!(stock(&herald).await, before);
    // The log holds only what the system wrote when it started (its topic's creation).
    let all = herald.get("/all").await;
    for record in all.body["events"].as_array().unwrap() {
        assert!(
            record["stream"].as_str().unwrap().starts_with('$'),
            "{record}"
        );
    }
    assert!(herald.terminate().success());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_idempotency_key_is_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let herald = Herald::start(dir.path(), &[]);
    let body = order("cust-frank", &[("prod-usb-hub", 3)], "card");

    let first = post_order(&herald, &body, Some("key-1")).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.body);
    let again = post_order(&herald, &body, Some("key-1")).await;
    assert_eq!(again.status, StatusCode::CREATED, "{}", again.body);
    assert_eq!(again.body["orderId"], first.body["orderId"]);
    assert_eq!(again.headers["idempotent-replayed"], "true");
    let other = order("cust-frank", &[("prod-usb-hub", 4)], "card");
    let reused = post_order(&herald, &other, Some("key-1")).await;
    assert_problem(
        &reused,
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency-key-reused",
    );

    let stored = orders(&herald).await;
    assert_eq!(stored.len(), 1, "{stored:?}");
    let done = settled(&herald, first.body["orderId"].as_str().unwrap()).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(
        done["payment"]["chargedCents"],
        3 * 3_900,
        "charged once: {done}"
    );
    assert!(herald.terminate().success());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_order_routes_take_the_servers_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let herald = Herald::start(
        dir.path(),
        &["--token", "write:w-secret", "--token", "read:r-secret"],
    );
    let body = order("cust-alice", &[("prod-notebook", 1)], "card").to_string();
    let json = ("content-type", "application/json");

    let anonymous = herald.get("/api/products").await;
    assert_problem(&anonymous, StatusCode::UNAUTHORIZED, "unauthorized");
    let read = herald
        .send(
            Method::GET,
            "/api/products",
            &[("authorization", "Bearer r-secret")],
            Bytes::new(),
        )
        .await
        .unwrap();
    assert_eq!(read.status, StatusCode::OK, "{}", read.body);
    let read_posts = herald
        .send(
            Method::POST,
            "/api/orders",
            &[json, ("authorization", "Bearer r-secret")],
            body.clone(),
        )
        .await
        .unwrap();
    assert_problem(&read_posts, StatusCode::FORBIDDEN, "insufficient-scope");
    let write_posts = herald
        .send(
            Method::POST,
            "/api/orders",
            &[json, ("authorization", "Bearer w-secret")],
            body,
        )
        .await
        .unwrap();
    assert_eq!(
        write_posts.status,
        StatusCode::CREATED,
        "{}",
        write_posts.body
    );

    // The server's fallback answers what no route matches, and metrics name the template.
    let missing = herald
        .send(
            Method::GET,
            "/api/nothing",
            &[("authorization", "Bearer r-secret")],
            Bytes::new(),
        )
        .await
        .unwrap();
    assert_problem(&missing, StatusCode::NOT_FOUND, "no-such-endpoint");
    let metrics = herald
        .send(
            Method::GET,
            "/metrics",
            &[("authorization", "Bearer r-secret")],
            Bytes::new(),
        )
        .await
        .unwrap();
    let text = metrics.body.as_str().unwrap();
    assert!(
        text.contains(
            r#"herald_http_requests_total{method="POST",route="/api/orders",status="201"} 1"#
        ),
        "{text}"
    );
    assert!(herald.terminate().success());
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_exits_0_and_a_restart_keeps_the_orders() {
    let dir = tempfile::tempdir().unwrap();
    let herald = Herald::start(dir.path(), &[]);
    let placed = place(
        &herald,
        &order("cust-heidi", &[("prod-desk-lamp", 2)], "card"),
    )
    .await;
    let id = placed["orderId"].as_str().unwrap().to_owned();
    let done = settled(&herald, &id).await;
    assert_eq!(done["status"], "completed", "{done}");
    let types = trail(&herald, &placed, 5).await;
    let stock_before = stock(&herald).await;
    assert!(herald.terminate().success(), "SIGTERM exits 0");

    let herald = Herald::start(dir.path(), &[]);
    let again = herald.get(&format!("/api/orders/{id}")).await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.body);
    assert_eq!(again.body["status"], "completed");
    let again_types: Vec<_> = again.body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|event| event["type"].as_str().unwrap())
        .collect();
    assert_eq!(again_types, types);
    assert_eq!(stock(&herald).await, stock_before);
    // The restarted system goes on: a new order completes too.
    let next = place(
        &herald,
        &order("cust-heidi", &[("prod-desk-lamp", 1)], "card"),
    )
    .await;
    let next = settled(&herald, next["orderId"].as_str().unwrap()).await;
    assert_eq!(next["status"], "completed", "{next}");
    assert_eq!(orders(&herald).await.len(), 2);
    assert!(herald.terminate().success());
}

#[tokio::test(flavor = "multi_thread")]
async fn no_orders_serves_the_event_api_only() {
    let dir = tempfile::tempdir().unwrap();
    let herald = Herald::start(dir.path(), &["--no-orders"]);
    let reply = herald.get("/api/products").await;
    assert_problem(&reply, StatusCode::NOT_FOUND, "no-such-endpoint");
    assert_eq!(herald.get("/healthz").await.status, StatusCode::OK);
    assert!(herald.terminate().success());
    assert!(!dir.path().join("services").exists());
}
