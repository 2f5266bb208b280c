//! A running order system on a temporary directory, driven through its HTTP API in process.

#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode, header};
use herald_log::{Log, Options};
use herald_orders::{
    InvariantReport, OrderStatus, OrderView, RunReport, System, SystemHandle, SystemOptions,
};
use herald_runtime::RetryOptions;
use http_body_util::BodyExt as _;
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

/// How long a test waits for an order to settle or the system to be idle before it fails.
/// A guard against a hang, not a timing assertion: the flow takes milliseconds.
pub const WAIT: Duration = Duration::from_secs(30);

/// An order system running on a fresh data directory.
pub struct Running {
    pub handle: SystemHandle,
    pub api: axum::Router,
    shutdown: CancellationToken,
    task: JoinHandle<Result<RunReport, herald_orders::RunError>>,
    log: Log,
    _dir: TempDir,
}

/// Options with retries fast enough for tests.
pub fn options() -> SystemOptions {
    let mut options = SystemOptions::default();
    options.pipeline.retry = RetryOptions {
        attempts_max: 5,
        elapsed_max_ms: 10_000,
        delay_initial_ms: 1,
        delay_max_ms: 20,
    };
    options.consumer.replay_poll_interval_ms = 0;
    options
}

/// Starts a system with `options` (its data directory replaced by a temporary one).
pub async fn start(mut options: SystemOptions) -> Running {
    let dir = tempfile::tempdir().unwrap();
    options.data_dir = dir.path().to_owned();
    let log = Log::open(Options::new(dir.path())).unwrap();
    let system: System = options.build(log.clone()).await.unwrap();
    let handle = system.handle();
    let api = system.api_router();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(system.run(shutdown.clone()));
    Running {
        handle,
        api,
        shutdown,
        task,
        log,
        _dir: dir,
    }
}

/// An HTTP answer: status, headers and the body as JSON (`Null` when empty).
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Answer {
    /// Asserts a problem document of `status` and `kind`; returns it.
    pub fn problem(&self, status: StatusCode, kind: &str) -> &Value {
        assert_eq!(self.status, status, "{}", self.body);
        assert_eq!(
            self.headers[header::CONTENT_TYPE],
            herald_orders::PROBLEM_JSON,
            "{}",
            self.body
        );
        assert_eq!(
            self.body["type"],
            format!("urn:herald:problem:{kind}"),
            "{}",
            self.body
        );
        assert_eq!(self.body["status"], status.as_u16());
        assert!(
            !self.body["detail"].as_str().unwrap().is_empty(),
            "{}",
            self.body
        );
        &self.body
    }
}

impl Running {
    /// Sends `request` to the API.
    pub async fn send(&self, request: Request<Body>) -> Answer {
        send(self.api.clone(), request).await
    }

    /// `GET uri`.
    pub async fn get(&self, uri: &str) -> Answer {
        self.send(Request::get(uri).body(Body::empty()).unwrap())
            .await
    }

    /// `POST /api/orders` with a raw body and content type, and an optional key.
    pub async fn post_raw(&self, content_type: &str, body: Vec<u8>, key: Option<&str>) -> Answer {
        let mut request = Request::post("/api/orders").header(header::CONTENT_TYPE, content_type);
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        self.send(request.body(Body::from(body)).unwrap()).await
    }

    /// `POST /api/orders` with a JSON body.
    pub async fn post(&self, body: &Value, key: Option<&str>) -> Answer {
        self.post_raw("application/json", body.to_string().into_bytes(), key)
            .await
    }

    /// Places an order through the API; asserts `201`; returns the body.
    pub async fn place(&self, customer: &str, items: &[(&str, u32)], method: &str) -> Value {
        let answer = self.post(&order(customer, items, method), None).await;
        assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.body);
        let id = answer.body["orderId"].as_str().unwrap();
        assert_eq!(
            answer.headers[header::LOCATION],
            format!("/api/orders/{id}").as_str()
        );
        answer.body
    }

    /// Waits until the order is settled; asserts it is.
    pub async fn settled(&self, order_id: &str) -> OrderView {
        let order = self
            .handle
            .wait_settled(order_id, WAIT)
            .await
            .unwrap()
            .expect("the order exists");
        assert_ne!(
            order.status,
            OrderStatus::Pending,
            "not settled within {WAIT:?}"
        );
        order
    }

    /// Waits until the system is idle, then checks the invariants and asserts they hold.
    pub async fn idle_and_sound(&self) -> InvariantReport {
        self.handle.wait_idle(WAIT).await.unwrap();
        let report = self.handle.check_invariants().await.unwrap();
        assert!(report.holds(), "{report}");
        report
    }

    /// Shuts the system down and closes the log; returns the run's report.
    pub async fn stop(self) -> RunReport {
        self.shutdown.cancel();
        let report = self.task.await.unwrap().unwrap();
        self.log.close().await.unwrap();
        report
    }
}

/// An order body.
pub fn order(customer: &str, items: &[(&str, u32)], method: &str) -> Value {
    json!({
        "customerId": customer,
        "items": items
            .iter()
            .map(|(product, quantity)| json!({ "productId": product, "quantity": quantity }))
            .collect::<Vec<_>>(),
        "shippingAddress": "1 Rue de la Paix, 75002 Paris",
        "paymentMethod": method,
    })
}

/// The stock of every product: product id → (available, reserved).
pub async fn stock(handle: &SystemHandle) -> Vec<(String, u64, u64)> {
    handle
        .products()
        .await
        .unwrap()
        .into_iter()
        .map(|product| (product.product_id, product.available, product.reserved))
        .collect()
}

/// Sends `request` to `api`.
pub async fn send(api: axum::Router, request: Request<Body>) -> Answer {
    let response = api.oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&bytes)))
    };
    Answer {
        status,
        headers,
        body,
    }
}
