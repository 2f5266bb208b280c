//! The order API in process: validation and its problem documents, the idempotency key,
//! and the read endpoints.

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::{Running, WAIT, order, start};
use herald_core::EventStore as _;
use serde_json::{Value, json};

/// Everything the system holds that a rejected request could have added to.
async fn footprint(system: &Running) -> (Value, Option<u64>, u64) {
    let orders = system.get("/api/orders?limit=500").await.body;
    let head = system.handle.log().head().await.unwrap().map(|head| head.0);
    let gateway_calls = system.handle.gateway().calls();
    (orders, head, gateway_calls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_orders_are_rejected_with_a_problem_and_nothing_is_stored() {
    let system = start(common::options()).await;
    let before = footprint(&system).await;
    let good = order("cust-alice", &[("prod-mouse", 1)], "card");
    let with = |pointer: &str, value: Value| {
        let mut body = good.clone();
        *body.pointer_mut(pointer).unwrap() = value;
        body
    };
    let without = |member: &str| {
        let mut body = good.clone();
        body.as_object_mut().unwrap().remove(member);
        body
    };
    let many_lines: Vec<Value> = (0..=herald_orders::ORDER_LINES_MAX)
        .map(|_| json!({ "productId": "prod-mouse", "quantity": 1 }))
        .collect();

    // Not an order at all: 400.
    for (body, why) in [
        (b"{\"customerId\":".to_vec(), "truncated"),
        (b"[1, 2]".to_vec(), "an array"),
        (b"\"order\"".to_vec(), "a string"),
        (b"".to_vec(), "empty"),
        (
            with("/items/0/quantity", json!("2"))
                .to_string()
                .into_bytes(),
            "a quantity as a string",
        ),
        (
            with("/items/0/quantity", json!(1e30))
                .to_string()
                .into_bytes(),
            "a quantity beyond integers",
        ),
        (
            json!({ "customerId": "cust-alice", "coupon": "FREE" })
                .to_string()
                .into_bytes(),
            "an unknown member",
        ),
        (
            format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)).into_bytes(),
            "deeply nested",
        ),
    ] {
        let answer = system.post_raw("application/json", body, None).await;
        let problem = answer.problem(StatusCode::BAD_REQUEST, "invalid-json");
        assert!(problem["line"].is_u64(), "{why}: {problem}");
    }

    // An order with unacceptable values: 422, with every fault.
    for (body, pointer) in [
        (without("customerId"), "/customerId"),
        (with("/customerId", json!("cust-nobody")), "/customerId"),
        (without("items"), "/items"),
        (with("/items", json!([])), "/items"),
        (with("/items", json!(many_lines)), "/items"),
        (with("/items/0/quantity", json!(0)), "/items/0/quantity"),
        (with("/items/0/quantity", json!(-3)), "/items/0/quantity"),
        (with("/items/0/quantity", json!(1_001)), "/items/0/quantity"),
        (
            with("/items/0/productId", json!("prod-nothing")),
            "/items/0/productId",
        ),
        (
            with(
                "/items",
                json!([
                    { "productId": "prod-mouse", "quantity": 1 },
                    { "productId": "prod-mouse", "quantity": 2 }
                ]),
            ),
            "/items/1/productId",
        ),
        (with("/shippingAddress", json!("   ")), "/shippingAddress"),
        (
            with("/shippingAddress", json!("x".repeat(501))),
            "/shippingAddress",
        ),
        (
            with("/shippingAddress", json!("a\u{0}b")),
            "/shippingAddress",
        ),
        (without("paymentMethod"), "/paymentMethod"),
        (with("/paymentMethod", json!("bitcoin")), "/paymentMethod"),
    ] {
        let answer = system.post(&body, None).await;
        let problem = answer.problem(StatusCode::UNPROCESSABLE_ENTITY, "invalid-order");
        let pointers: Vec<&str> = problem["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|fault| fault["pointer"].as_str().unwrap())
            .collect();
        assert_eq!(pointers, [pointer], "{problem}");
    }
    // Every fault at once.
    let answer = system
        .post(&json!({ "items": [{ "quantity": 0 }] }), None)
        .await;
    let problem = answer.problem(StatusCode::UNPROCESSABLE_ENTITY, "invalid-order");
    assert_eq!(problem["errors"].as_array().unwrap().len(), 5, "{problem}");

    // The envelope of the request.
    let body = good.to_string().into_bytes();
    system
        .post_raw("text/plain", body.clone(), None)
        .await
        .problem(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported-media-type");
    let mut huge = good.clone();
    huge["shippingAddress"] = json!("x".repeat(herald_orders::api::ORDER_BODY_SIZE_MAX_BYTES));
    system
        .post(&huge, None)
        .await
        .problem(StatusCode::PAYLOAD_TOO_LARGE, "body-too-large");
    for key in ["", "with space", "é", &"k".repeat(256)] {
        system
            .post_raw("application/json", body.clone(), Some(key))
            .await
            .problem(StatusCode::BAD_REQUEST, "invalid-idempotency-key");
    }
    let twice = Request::post("/api/orders")
        .header("content-type", "application/json")
        .header("idempotency-key", "a")
        .header("idempotency-key", "b")
        .body(Body::from(body.clone()))
        .unwrap();
    system
        .send(twice)
        .await
        .problem(StatusCode::BAD_REQUEST, "invalid-idempotency-key");

    assert_eq!(footprint(&system).await, before, "nothing was stored");
    assert_eq!(system.get("/api/orders").await.body["orders"], json!([]));

    // The same body, well-formed, is accepted: the rejections were about the request.
    let placed = system.post(&good, None).await;
    assert_eq!(placed.status, StatusCode::CREATED, "{}", placed.body);
    system.idle_and_sound().await;
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_places_one_order_per_key() {
    let system = start(common::options()).await;
    let body = order(
        "cust-bob",
        &[("prod-usb-hub", 2), ("prod-notebook", 3)],
        "card",
    );
    let first = system.post(&body, Some("checkout-42")).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.body);
    assert!(first.headers.get("idempotent-replayed").is_none());
    let order_id = first.body["orderId"].as_str().unwrap();

    // The same order, written differently (member order, spacing), is the same request.
    let reordered = format!(
        r#"{{ "paymentMethod": "card", "shippingAddress": {},
              "items": [ {{"quantity": 2, "productId": "prod-usb-hub"}},
                         {{"productId": "prod-notebook", "quantity": 3}} ],
              "customerId": "cust-bob" }}"#,
        body["shippingAddress"]
    );
    for _ in 0..2 {
        let again = system
            .post_raw(
                "application/json",
                reordered.clone().into_bytes(),
                Some("checkout-42"),
            )
            .await;
        assert_eq!(again.status, StatusCode::CREATED, "{}", again.body);
        assert_eq!(again.headers["idempotent-replayed"], "true");
        assert_eq!(again.body["orderId"], order_id);
        assert_eq!(again.body["correlationId"], first.body["correlationId"]);
        assert_eq!(again.headers["location"], first.headers["location"]);
    }

    // Another order under the same key is refused, and names the key's order.
    let other = order("cust-bob", &[("prod-usb-hub", 3)], "card");
    let refused = system.post(&other, Some("checkout-42")).await;
    let problem = refused.problem(StatusCode::UNPROCESSABLE_ENTITY, "idempotency-key-reused");
    assert_eq!(problem["orderId"], order_id);

    // Another key places another order; no key places one per request.
    let second = system.post(&body, Some("checkout-43")).await;
    assert_eq!(second.status, StatusCode::CREATED);
    assert_ne!(second.body["orderId"], order_id);
    let third = system.post(&body, None).await;
    let fourth = system.post(&body, None).await;
    assert_ne!(third.body["orderId"], fourth.body["orderId"]);

    for placed in [&first.body, &second.body, &third.body, &fourth.body] {
        system.settled(placed["orderId"].as_str().unwrap()).await;
    }
    let report = system.idle_and_sound().await;
    assert_eq!(report.orders, 4);
    let hubs = system
        .handle
        .products()
        .await
        .unwrap()
        .into_iter()
        .find(|product| product.product_id == "prod-usb-hub")
        .unwrap();
    assert_eq!(hubs.reserved, 4 * 2, "the replays reserved nothing");
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_read_endpoints_answer_and_refuse_bad_queries() {
    let system = start(common::options()).await;
    let completed = system
        .place("cust-alice", &[("prod-headphones", 1)], "card")
        .await;
    let cancelled = system
        .place("cust-alice", &[("prod-headphones", 1)], "card_declined")
        .await;
    let completed_id = completed["orderId"].as_str().unwrap();
    let cancelled_id = cancelled["orderId"].as_str().unwrap();

    // waitMs answers once the order is settled.
    let waited = system
        .get(&format!(
            "/api/orders/{completed_id}?waitMs={}",
            WAIT.as_millis()
        ))
        .await;
    assert_eq!(waited.status, StatusCode::OK);
    assert_eq!(waited.body["status"], "completed");
    system.settled(cancelled_id).await;
    system.idle_and_sound().await;

    let all = system.get("/api/orders").await;
    let ids: Vec<&str> = all.body["orders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|order| order["orderId"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [cancelled_id, completed_id], "newest first");
    let only = system.get("/api/orders?status=cancelled&limit=10").await;
    assert_eq!(only.body["orders"].as_array().unwrap().len(), 1);
    assert_eq!(only.body["orders"][0]["cancelReason"], "payment_declined");
    let limited = system.get("/api/orders?limit=1").await;
    assert_eq!(limited.body["orders"][0]["orderId"], cancelled_id);

    let products = system.get("/api/products").await;
    assert_eq!(products.status, StatusCode::OK);
    let products = products.body["products"].as_array().unwrap().clone();
    assert_eq!(products.len(), herald_orders::catalog::PRODUCTS.len());
    assert_eq!(products[0]["productId"], "prod-keyboard");

    let analytics = system.get("/api/analytics").await;
    assert_eq!(analytics.body["orders"]["placed"], 2);
    assert_eq!(analytics.body["orders"]["completed"], 1);
    assert_eq!(
        analytics.body["orders"]["cancelledByReason"]["payment_declined"],
        1
    );
    assert_eq!(
        analytics.body["topProducts"][0]["productId"],
        "prod-headphones"
    );

    let mail = system
        .get(&format!("/api/notifications?orderId={cancelled_id}"))
        .await;
    let kinds: Vec<&str> = mail.body["notifications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|email| email["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["order_received", "order_cancelled"]);
    let everyone = system.get("/api/notifications").await;
    assert_eq!(everyone.body["notifications"].as_array().unwrap().len(), 4);
    let nobody = system.get("/api/audit?correlationId=nobody").await;
    assert_eq!(nobody.body["events"], json!([]));

    for (uri, status, kind) in [
        (
            "/api/orders/no-such-order",
            StatusCode::NOT_FOUND,
            "order-not-found",
        ),
        (
            "/api/orders/no-such-order?waitMs=10",
            StatusCode::NOT_FOUND,
            "order-not-found",
        ),
        (
            "/api/orders/x?waitMs=30001",
            StatusCode::BAD_REQUEST,
            "invalid-query",
        ),
        (
            "/api/orders/x?waitMs=soon",
            StatusCode::BAD_REQUEST,
            "invalid-query",
        ),
        (
            "/api/orders?status=shipped",
            StatusCode::BAD_REQUEST,
            "invalid-query",
        ),
        (
            "/api/orders?limit=0",
            StatusCode::BAD_REQUEST,
            "invalid-query",
        ),
        (
            "/api/orders?limit=501",
            StatusCode::BAD_REQUEST,
            "invalid-query",
        ),
        (
            "/api/orders?limit=-1",
            StatusCode::BAD_REQUEST,
            "invalid-query",
        ),
        ("/api/audit", StatusCode::BAD_REQUEST, "invalid-query"),
        (
            "/api/audit?correlationId=",
            StatusCode::BAD_REQUEST,
            "invalid-query",
        ),
        (
            "/api/notifications?limit=1001",
            StatusCode::BAD_REQUEST,
            "invalid-query",
        ),
    ] {
        system.get(uri).await.problem(status, kind);
    }
    for (method, uri) in [
        ("DELETE", "/api/orders"),
        ("PUT", format!("/api/orders/{completed_id}").as_str()),
        ("POST", "/api/products"),
        ("POST", "/api/analytics"),
        ("DELETE", "/api/audit"),
        ("PATCH", "/api/notifications"),
    ] {
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .body(Body::empty())
            .unwrap();
        system
            .send(request)
            .await
            .problem(StatusCode::METHOD_NOT_ALLOWED, "method-not-allowed");
    }
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_an_order_that_does_not_settle_answers_at_the_timeout() {
    let mut options = common::options();
    options.transient_error_rate = 1.0;
    options.pipeline.retry.attempts_max = 1;
    let system = start(options).await;
    let placed = system
        .place("cust-alice", &[("prod-mouse", 1)], "card")
        .await;
    let order_id = placed["orderId"].as_str().unwrap();
    system.handle.wait_idle(WAIT).await.unwrap();
    // Dead-lettered: it stays pending, and a wait ends with it pending.
    let waited = system
        .get(&format!("/api/orders/{order_id}?waitMs=50"))
        .await;
    assert_eq!(waited.status, StatusCode::OK);
    assert_eq!(waited.body["status"], "pending");
    assert_eq!(waited.body["payment"]["status"], Value::Null);
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_says_what_is_still_busy_and_refuses_bad_waits() {
    // A gateway that always fails, and a retry that waits an hour: the payment's consumer
    // keeps its event uncommitted, so the system stays busy until it stops.
    let mut options = common::options();
    options.transient_error_rate = 1.0;
    options.pipeline.retry.delay_initial_ms = 3_600_000;
    options.pipeline.retry.delay_max_ms = 3_600_000;
    options.pipeline.retry.elapsed_max_ms = 7_200_000;
    options.pipeline.timeout_ms = 7_200_000;
    let system = start(options).await;
    let idle = system.get("/api/idle").await;
    assert_eq!(idle.status, StatusCode::OK);
    assert_eq!(idle.body, json!({ "idle": true }));

    system
        .place("cust-alice", &[("prod-mouse", 1)], "card")
        .await;
    // Whichever stage the flow is at (the order's event in its outbox, or the payment's
    // consumer retrying it), the system is busy and says with what.
    for uri in ["/api/idle", "/api/idle?waitMs=50"] {
        let busy = system.get(uri).await;
        assert_eq!(busy.status, StatusCode::OK);
        assert_eq!(busy.body["idle"], false, "{uri}: {}", busy.body);
        assert!(
            !busy.body["busy"].as_str().unwrap().is_empty(),
            "{uri}: {}",
            busy.body
        );
    }

    system
        .get(&format!(
            "/api/idle?waitMs={}",
            herald_orders::api::WAIT_MS_MAX + 1
        ))
        .await
        .problem(StatusCode::BAD_REQUEST, "invalid-query");
    system
        .get("/api/idle?waitMs=soon")
        .await
        .problem(StatusCode::BAD_REQUEST, "invalid-query");
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ending_the_waits_answers_every_long_poll_at_once() {
    // The order never settles: every charge fails and the retry waits an hour.
    let mut options = common::options();
    options.transient_error_rate = 1.0;
    options.pipeline.retry.delay_initial_ms = 3_600_000;
    options.pipeline.retry.delay_max_ms = 3_600_000;
    options.pipeline.retry.elapsed_max_ms = 7_200_000;
    options.pipeline.timeout_ms = 7_200_000;
    let system = start(options).await;
    let placed = system
        .place("cust-alice", &[("prod-mouse", 1)], "card")
        .await;
    let order_id = placed["orderId"].as_str().unwrap().to_owned();
    // Without the end it would answer `{"idle": false}` after 30 s.
    let idle_poll = {
        let api = system.api.clone();
        let uri = format!("/api/idle?waitMs={}", herald_orders::api::WAIT_MS_MAX);
        tokio::spawn(common::send(
            api,
            Request::get(uri).body(Body::empty()).unwrap(),
        ))
    };
    let waited = {
        let handle = system.handle.clone();
        let order_id = order_id.clone();
        tokio::spawn(async move {
            handle
                .wait_settled(&order_id, std::time::Duration::from_secs(3_600))
                .await
        })
    };

    system.handle.end_waits();
    tokio::time::timeout(WAIT, idle_poll)
        .await
        .unwrap()
        .unwrap()
        .problem(StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    let view = tokio::time::timeout(WAIT, waited)
        .await
        .unwrap()
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(view.status, herald_orders::OrderStatus::Pending);
    // A wait begun afterwards ends at once too.
    assert!(matches!(
        tokio::time::timeout(
            WAIT,
            system
                .handle
                .wait_idle(std::time::Duration::from_secs(3_600))
        )
        .await
        .unwrap(),
        Err(herald_orders::IdleError::Stopping)
    ));
    system.stop().await;
}
