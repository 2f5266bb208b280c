//! The event API in process: every endpoint and every error, and bearer-token
//! authentication, through the router the server serves, over the in-memory store.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode, header};
use herald_core::memory::InMemoryStore;
use herald_core::{Data, EventStore, ExtensionValue, StreamName, Version};
use herald_server::{PAGE_EVENTS_MAX, Scope, ServerOptions, Token, router};
use http_body_util::BodyExt as _;
use serde_json::{Value, json};
use tower::ServiceExt as _;

const STRUCTURED: &str = "application/cloudevents+json";
const BATCH: &str = "application/cloudevents-batch+json";

struct Api {
    store: Arc<InMemoryStore>,
    options: ServerOptions,
}

struct Reply {
    status: StatusCode,
    content_type: String,
    headers: HeaderMap,
    body: Value,
}

impl Api {
    fn new() -> Self {
        Api {
            store: Arc::new(InMemoryStore::new()),
            options: ServerOptions::default(),
        }
    }

    /// An API that accepts only `tokens`.
    fn with_tokens(tokens: &[(&str, Scope)]) -> Self {
        let mut api = Api::new();
        api.options.tokens = tokens
            .iter()
            .map(|(token, scope)| Token {
                token: (*token).to_owned(),
                scope: *scope,
            })
            .collect();
        api
    }

    async fn send(&self, request: Request<Body>) -> Reply {
        let store: Arc<dyn EventStore> = self.store.clone();
        let response = router(store, &self.options).oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|value| value.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let body = if content_type.contains("json") {
            serde_json::from_slice(&bytes).unwrap()
        } else {
            Value::String(String::from_utf8(bytes.to_vec()).unwrap())
        };
        Reply {
            status,
            content_type,
            headers,
            body,
        }
    }

    async fn post(&self, path: &str, content_type: &str, body: impl Into<Body>) -> Reply {
        self.send(
            Request::post(path)
                .header(header::CONTENT_TYPE, content_type)
                .body(body.into())
                .unwrap(),
        )
        .await
    }

    async fn get(&self, path: &str) -> Reply {
        self.send(Request::get(path).body(Body::empty()).unwrap())
            .await
    }

    /// Nothing was ever stored.
    async fn assert_empty(&self) {
        assert_eq!(
            self.store.head().await.unwrap(),
            None,
            "nothing may be stored"
        );
    }
}

fn event(id: &str) -> Value {
    json!({"specversion": "1.0", "id": id, "source": "/tests", "type": "test.happened", "data": {"n": 1}})
}

fn assert_problem(reply: &Reply, status: StatusCode, kind: &str) {
    assert_eq!(reply.status, status, "{}", reply.body);
    assert_eq!(reply.content_type, "application/problem+json");
    assert_eq!(reply.body["status"], status.as_u16());
    assert_eq!(reply.body["type"], format!("urn:herald:problem:{kind}"));
    assert!(reply.body["title"].is_string());
    assert!(!reply.body["detail"].as_str().unwrap().is_empty());
}

#[tokio::test]
async fn a_structured_event_is_appended_and_read_back() {
    let api = Api::new();
    let reply = api
        .post("/streams/order-1", STRUCTURED, event("e1").to_string())
        .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    assert_eq!(
        reply.body,
        json!({"events": [{"id": "e1", "version": 0, "position": 0}]})
    );

    let page = api.get("/streams/order-1").await;
    assert_eq!(page.status, StatusCode::OK);
    let first = &page.body["events"][0];
    assert_eq!(first["version"], 0);
    assert_eq!(first["position"], 0);
    assert_eq!(first["stream"], "order-1");
    assert_eq!(first["event"], event("e1"));
    assert_eq!(page.body["next"], Value::Null);
}

#[tokio::test]
async fn a_batch_is_appended_atomically_and_a_retry_is_idempotent() {
    let api = Api::new();
    let batch = json!([event("a"), event("b"), event("c")]).to_string();
    let first = api.post("/streams/s", BATCH, batch.clone()).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let versions: Vec<_> = first.body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, [0, 1, 2]);

    let retry = api.post("/streams/s", BATCH, batch).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert_eq!(
        retry.body, first.body,
        "a retry returns the original result"
    );
    assert_eq!(api.store.head().await.unwrap().map(|p| p.0), Some(2));

    // One invalid event in a batch: nothing of it is stored.
    let bad = json!([event("d"), {"specversion": "1.0", "id": "e", "type": "t"}]).to_string();
    let reply = api.post("/streams/s", BATCH, bad).await;
    assert_problem(&reply, StatusCode::BAD_REQUEST, "invalid-event");
    assert_eq!(reply.body["index"], 1);
    assert_eq!(reply.body["attribute"], "source");
    assert_eq!(api.store.head().await.unwrap().map(|p| p.0), Some(2));

    let empty = api.post("/streams/s", BATCH, "[]").await;
    assert_problem(&empty, StatusCode::BAD_REQUEST, "empty-append");
}

#[tokio::test]
async fn binary_mode_maps_headers_to_attributes_and_the_body_to_data() {
    let api = Api::new();
    let request = Request::post("/streams/bin")
        .header("ce-specversion", "1.0")
        .header("ce-id", "b1")
        .header("ce-source", "/webhooks/shop")
        .header("ce-type", "shop.order.placed")
        .header("ce-time", "2026-01-02T03:04:05Z")
        .header("ce-subject", "order%2042") // percent-encoded, as the HTTP binding says
        .header("ce-tenant", "caf%C3%A9")
        .header(header::CONTENT_TYPE, "application/json; charset=utf-8")
        .body(Body::from(r#"{"total": 12.5}"#))
        .unwrap();
    let reply = api.send(request).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);

    let stored = api
        .store
        .read_stream(
            &StreamName::new("bin").unwrap(),
            Version(0),
            Default::default(),
            10,
        )
        .await
        .unwrap();
    let event = &stored[0].event;
    assert_eq!(event.id, "b1");
    assert_eq!(event.source, "/webhooks/shop");
    assert_eq!(event.ty, "shop.order.placed");
    assert_eq!(event.subject.as_deref(), Some("order 42"));
    assert_eq!(
        event.datacontenttype.as_deref(),
        Some("application/json; charset=utf-8")
    );
    assert_eq!(
        event.extensions.get("tenant"),
        Some(&ExtensionValue::String("café".into()))
    );
    match &event.data {
        Some(Data::Json(raw)) => assert_eq!(raw.get(), r#"{"total": 12.5}"#),
        other => panic!("expected JSON data, got {other:?}"),
    }

    // Opaque bytes are kept as bytes.
    let request = Request::post("/streams/bin")
        .header("ce-specversion", "1.0")
        .header("ce-id", "b2")
        .header("ce-source", "/s")
        .header("ce-type", "t")
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .body(Body::from(vec![0u8, 159, 255]))
        .unwrap();
    assert_eq!(api.send(request).await.status, StatusCode::CREATED);
    let page = api.get("/streams/bin?from=1").await;
    assert_eq!(page.body["events"][0]["event"]["data_base64"], "AJ//");
}

#[tokio::test]
async fn binary_mode_errors_name_the_attribute() {
    let api = Api::new();
    let cases: [(&[(&str, &str)], &str); 5] = [
        (
            &[
                ("ce-specversion", "1.0"),
                ("ce-source", "/s"),
                ("ce-type", "t"),
            ],
            "id",
        ),
        (
            &[
                ("ce-specversion", "0.3"),
                ("ce-id", "x"),
                ("ce-source", "/s"),
                ("ce-type", "t"),
            ],
            "specversion",
        ),
        (
            &[
                ("ce-specversion", "1.0"),
                ("ce-id", "x"),
                ("ce-source", "/s"),
                ("ce-type", "t"),
                ("ce-time", "yesterday"),
            ],
            "time",
        ),
        (
            &[
                ("ce-specversion", "1.0"),
                ("ce-id", "%ff"),
                ("ce-source", "/s"),
                ("ce-type", "t"),
            ],
            "id",
        ),
        (
            &[
                ("ce-specversion", "1.0"),
                ("ce-id", "x"),
                ("ce-source", "/s"),
                ("ce-type", "t"),
                ("ce-bad_name", "v"),
            ],
            "bad_name",
        ),
    ];
    for (headers, attribute) in cases {
        let mut request = Request::post("/streams/s").header(header::CONTENT_TYPE, "text/plain");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let reply = api.send(request.body(Body::from("hi")).unwrap()).await;
        assert_problem(&reply, StatusCode::BAD_REQUEST, "invalid-event");
        assert_eq!(reply.body["attribute"], attribute, "{}", reply.body);
    }
    // A huge attribute header, and JSON data nested too deep.
    let huge = "a".repeat(herald_server::ATTRIBUTE_HEADER_LEN_MAX_BYTES + 1);
    let request = Request::post("/streams/s")
        .header("ce-specversion", "1.0")
        .header("ce-id", "x")
        .header("ce-source", "/s")
        .header("ce-type", "t")
        .header("ce-huge", huge)
        .body(Body::empty())
        .unwrap();
    let reply = api.send(request).await;
    assert_problem(&reply, StatusCode::BAD_REQUEST, "invalid-event");
    assert_eq!(reply.body["attribute"], "huge");
    let request = Request::post("/streams/s")
        .header("ce-specversion", "1.0")
        .header("ce-id", "x")
        .header("ce-source", "/s")
        .header("ce-type", "t")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(format!(
            "{}{}",
            "[".repeat(10_000),
            "]".repeat(10_000)
        )))
        .unwrap();
    let reply = api.send(request).await;
    assert_problem(&reply, StatusCode::BAD_REQUEST, "invalid-event");
    assert_eq!(reply.body["attribute"], "data");

    // JSON content that is not JSON.
    let request = Request::post("/streams/s")
        .header("ce-specversion", "1.0")
        .header("ce-id", "x")
        .header("ce-source", "/s")
        .header("ce-type", "t")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from("{not json"))
        .unwrap();
    let reply = api.send(request).await;
    assert_problem(&reply, StatusCode::BAD_REQUEST, "invalid-event");
    assert_eq!(reply.body["attribute"], "data");
    api.assert_empty().await;
}

#[tokio::test]
async fn expected_versions_are_honoured_and_validated() {
    let api = Api::new();
    let post = |expected: &'static str, id: &'static str| {
        Request::post("/streams/acct")
            .header(header::CONTENT_TYPE, STRUCTURED)
            .header("Herald-Expected-Version", expected)
            .body(Body::from(event(id).to_string()))
            .unwrap()
    };
    for bad in ["-1", "abc", "1.5", "18446744073709551616", ""] {
        let reply = api.send(post(bad, "x")).await;
        assert_problem(&reply, StatusCode::BAD_REQUEST, "invalid-expected-version");
    }
    api.assert_empty().await;

    let reply = api.send(post("exists", "x")).await;
    assert_problem(&reply, StatusCode::CONFLICT, "wrong-expected-version");
    assert_eq!(reply.body["actual"], Value::Null);

    assert_eq!(
        api.send(post("no-stream", "a")).await.status,
        StatusCode::CREATED
    );
    assert_eq!(api.send(post("0", "b")).await.status, StatusCode::CREATED);
    let reply = api.send(post("0", "c")).await;
    assert_problem(&reply, StatusCode::CONFLICT, "wrong-expected-version");
    assert_eq!(reply.body["actual"], 1);
    assert_eq!(reply.body["expected"], "0");
    assert_eq!(
        api.send(post("exists", "c")).await.status,
        StatusCode::CREATED
    );
}

#[tokio::test]
async fn hostile_bodies_get_a_4xx_and_store_nothing() {
    let mut api = Api::new();
    api.options.body_size_max_bytes = 1024;

    let big = json!({"specversion": "1.0", "id": "x", "source": "/s", "type": "t", "data": "a".repeat(2000)});
    let reply = api.post("/streams/s", STRUCTURED, big.to_string()).await;
    assert_problem(&reply, StatusCode::PAYLOAD_TOO_LARGE, "body-too-large");
    assert_eq!(reply.body["limit"], 1024);

    // A body of unknown length is cut off while it is read.
    let chunks = futures_like_stream(2000);
    let reply = api.post("/streams/s", STRUCTURED, chunks).await;
    assert_problem(&reply, StatusCode::PAYLOAD_TOO_LARGE, "body-too-large");

    api.options.body_size_max_bytes = 4 << 20;
    let deep = format!(
        r#"{{"specversion":"1.0","id":"x","source":"/s","type":"t","data":{}{}}}"#,
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let reply = api.post("/streams/s", STRUCTURED, deep).await;
    assert_problem(&reply, StatusCode::BAD_REQUEST, "invalid-event");

    let reply = api
        .post("/streams/s", STRUCTURED, b"{\"id\":\"\xff\xfe\"}".to_vec())
        .await;
    assert_problem(&reply, StatusCode::BAD_REQUEST, "invalid-event");

    let reply = api.post("/streams/s", STRUCTURED, "{").await;
    assert_problem(&reply, StatusCode::BAD_REQUEST, "invalid-event");
    assert!(reply.body["line"].is_u64());

    let reply = api.post("/streams/s", STRUCTURED, "null").await;
    assert_problem(&reply, StatusCode::BAD_REQUEST, "invalid-event");

    for content_type in [
        "application/json",
        "text/plain",
        "application/cloudevents+xml",
    ] {
        let reply = api
            .post("/streams/s", content_type, event("x").to_string())
            .await;
        assert_problem(
            &reply,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
        );
    }
    let reply = api
        .send(Request::post("/streams/s").body(Body::from("x")).unwrap())
        .await;
    assert_problem(
        &reply,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported-media-type",
    );

    for path in [
        "/streams/$all",
        "/streams/a%20b",
        "/streams/%C3%A9",
        "/streams/%FF",
        "/streams/..",
        "/streams/x%2Fy",
    ] {
        let reply = api.post(path, STRUCTURED, event("x").to_string()).await;
        assert_problem(&reply, StatusCode::BAD_REQUEST, "invalid-stream-name");
    }
    let long = format!("/streams/{}", "x".repeat(257));
    let reply = api.post(&long, STRUCTURED, event("x").to_string()).await;
    assert_problem(&reply, StatusCode::BAD_REQUEST, "invalid-stream-name");
    api.assert_empty().await;
}

/// A body of `len` bytes sent in chunks, without a `Content-Length`.
fn futures_like_stream(len: usize) -> Body {
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..len / 100).map(|_| Ok(vec![b' '; 100])).collect();
    Body::from_stream(futures::stream::iter(chunks))
}

#[tokio::test]
async fn pages_link_to_the_next_page_in_both_directions() {
    let api = Api::new();
    let batch: Vec<Value> = (0..5).map(|i| event(&format!("e{i}"))).collect();
    assert_eq!(
        api.post("/streams/p", BATCH, Value::Array(batch).to_string())
            .await
            .status,
        StatusCode::CREATED
    );
    let mut path = "/streams/p?limit=2".to_owned();
    let mut seen = Vec::new();
    loop {
        let page = api.get(&path).await;
        assert_eq!(page.status, StatusCode::OK, "{}", page.body);
        seen.extend(
            page.body["events"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["version"].as_u64().unwrap()),
        );
        match page.body["next"].as_str() {
            Some(next) => path = next.to_owned(),
            None => break,
        }
    }
    assert_eq!(seen, [0, 1, 2, 3, 4]);

    let mut path = "/streams/p?limit=2&direction=backward".to_owned();
    let mut seen = Vec::new();
    loop {
        let page = api.get(&path).await;
        seen.extend(
            page.body["events"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["version"].as_u64().unwrap()),
        );
        match page.body["next"].as_str() {
            Some(next) => path = next.to_owned(),
            None => break,
        }
    }
    assert_eq!(seen, [4, 3, 2, 1, 0]);

    let all = api.get("/all?from=3&limit=10").await;
    let positions: Vec<_> = all.body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["position"].as_u64().unwrap())
        .collect();
    assert_eq!(positions, [3, 4]);
    assert_eq!(all.body["next"], Value::Null);

    let over = format!("/all?limit={}", PAGE_EVENTS_MAX + 1);
    for path in [
        over.as_str(),
        "/all?limit=0",
        "/all?from=-1",
        "/all?from=x",
        "/streams/p?direction=up",
        "/all?from=%ZZ",
    ] {
        assert_problem(
            &api.get(path).await,
            StatusCode::BAD_REQUEST,
            "invalid-query",
        );
    }
}

#[tokio::test]
async fn an_id_stored_by_another_append_is_a_conflict() {
    let api = Api::new();
    let first = api
        .post("/streams/a", STRUCTURED, event("same").to_string())
        .await;
    assert_eq!(first.status, StatusCode::CREATED);
    let reply = api
        .post("/streams/b", STRUCTURED, event("same").to_string())
        .await;
    assert_problem(&reply, StatusCode::CONFLICT, "duplicate-event-id");
    assert_eq!(reply.body["id"], "same");
    let twice = json!([event("x"), event("x")]).to_string();
    let reply = api.post("/streams/b", BATCH, twice).await;
    assert_problem(&reply, StatusCode::BAD_REQUEST, "duplicate-in-batch");
    assert_eq!(api.store.head().await.unwrap().map(|p| p.0), Some(0));
}

#[tokio::test]
async fn unknown_and_deleted_streams_read_as_404() {
    let api = Api::new();
    assert_problem(
        &api.get("/streams/nope").await,
        StatusCode::NOT_FOUND,
        "stream-not-found",
    );
    api.post("/streams/gone", STRUCTURED, event("g").to_string())
        .await;

    let delete = |expected: &'static str| {
        Request::delete("/streams/gone")
            .header("Herald-Expected-Version", expected)
            .body(Body::empty())
            .unwrap()
    };
    assert_problem(
        &api.send(delete("5")).await,
        StatusCode::CONFLICT,
        "wrong-expected-version",
    );
    assert_eq!(api.send(delete("0")).await.status, StatusCode::NO_CONTENT);
    assert_problem(
        &api.get("/streams/gone").await,
        StatusCode::NOT_FOUND,
        "stream-deleted",
    );
    assert_problem(
        &api.send(delete("any")).await,
        StatusCode::NOT_FOUND,
        "stream-deleted",
    );
    // The event stays in the global log.
    assert_eq!(api.get("/all").await.body["events"][0]["event"]["id"], "g");
}

#[tokio::test]
async fn health_readiness_and_unknown_routes() {
    let api = Api::new();
    assert_eq!(api.get("/healthz").await.status, StatusCode::OK);
    assert_eq!(api.get("/readyz").await.status, StatusCode::OK);
    assert_problem(
        &api.get("/nowhere").await,
        StatusCode::NOT_FOUND,
        "no-such-endpoint",
    );
    let reply = api
        .send(Request::put("/streams/s").body(Body::empty()).unwrap())
        .await;
    assert_problem(&reply, StatusCode::METHOD_NOT_ALLOWED, "method-not-allowed");
}

/// A request with `Authorization: Bearer <token>` when `token` is given.
fn authorized(method: &str, path: &str, token: Option<&str>, body: Body) -> Request<Body> {
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header(header::CONTENT_TYPE, STRUCTURED);
    if let Some(token) = token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    request.body(body).unwrap()
}

/// A body that records whether anything polled it.
fn watched_body(polled: Arc<AtomicBool>) -> Body {
    let chunks = futures::stream::poll_fn(move |_| {
        polled.store(true, Ordering::SeqCst);
        std::task::Poll::Ready(None::<Result<Vec<u8>, std::io::Error>>)
    });
    Body::from_stream(chunks)
}

fn assert_challenge(reply: &Reply, kind: &str) {
    assert_problem(reply, StatusCode::UNAUTHORIZED, kind);
    let challenge = reply.headers[header::WWW_AUTHENTICATE].to_str().unwrap();
    assert!(challenge.starts_with("Bearer"), "{challenge}");
}

#[tokio::test]
async fn without_a_valid_token_every_protected_route_is_401_and_nothing_is_stored() {
    let api = Api::with_tokens(&[("w-secret", Scope::Write), ("r-secret", Scope::Read)]);
    let protected = [
        ("POST", "/streams/s"),
        ("GET", "/streams/s"),
        ("DELETE", "/streams/s"),
        ("GET", "/streams/s/live"),
        ("GET", "/all"),
        ("GET", "/all/live"),
        ("GET", "/metrics"),
        ("GET", "/openapi.json"),
        // Unknown paths and methods do not tell anonymous clients what exists.
        ("GET", "/nowhere"),
        ("PUT", "/streams/s"),
    ];
    for (method, path) in protected {
        for token in [None, Some("wrong"), Some("w-secre"), Some("w-secrett")] {
            let polled = Arc::new(AtomicBool::new(false));
            let reply = api
                .send(authorized(
                    method,
                    path,
                    token,
                    watched_body(polled.clone()),
                ))
                .await;
            let kind = if token.is_none() {
                "unauthorized"
            } else {
                "invalid-token"
            };
            assert_challenge(&reply, kind);
            assert!(
                !polled.load(Ordering::SeqCst),
                "{method} {path}: the body of a refused request is never read"
            );
        }
    }
    // Credentials of another scheme, or malformed ones, are no credentials.
    for value in ["Basic dzpzZWNyZXQ=", "Bearer", "Bearer ", "w-secret"] {
        let request = Request::post("/streams/s")
            .header(header::CONTENT_TYPE, STRUCTURED)
            .header(header::AUTHORIZATION, value)
            .body(Body::from(event("x").to_string()))
            .unwrap();
        assert_challenge(&api.send(request).await, "unauthorized");
    }
    api.assert_empty().await;
}

#[tokio::test]
async fn a_read_token_may_read_but_not_write() {
    let api = Api::with_tokens(&[("w-secret", Scope::Write), ("r-secret", Scope::Read)]);
    for method in ["POST", "DELETE"] {
        let polled = Arc::new(AtomicBool::new(false));
        let reply = api
            .send(authorized(
                method,
                "/streams/s",
                Some("r-secret"),
                watched_body(polled.clone()),
            ))
            .await;
        assert_problem(&reply, StatusCode::FORBIDDEN, "insufficient-scope");
        assert!(
            reply.headers[header::WWW_AUTHENTICATE]
                .to_str()
                .unwrap()
                .contains("insufficient_scope")
        );
        assert!(!polled.load(Ordering::SeqCst), "the body is never read");
    }
    api.assert_empty().await;

    // The write token writes; both read.
    let body = Body::from(event("e1").to_string());
    let appended = api
        .send(authorized("POST", "/streams/s", Some("w-secret"), body))
        .await;
    assert_eq!(appended.status, StatusCode::CREATED, "{}", appended.body);
    for token in ["r-secret", "w-secret"] {
        for path in ["/streams/s", "/all", "/openapi.json", "/metrics"] {
            let reply = api
                .send(authorized("GET", path, Some(token), Body::empty()))
                .await;
            assert_eq!(reply.status, StatusCode::OK, "{path} with {token}");
        }
        let unknown = api
            .send(authorized("GET", "/nowhere", Some(token), Body::empty()))
            .await;
        assert_problem(&unknown, StatusCode::NOT_FOUND, "no-such-endpoint");
    }
    assert_eq!(api.get("/streams/s").await.status, StatusCode::UNAUTHORIZED);
    let deleted = api
        .send(authorized(
            "DELETE",
            "/streams/s",
            Some("w-secret"),
            Body::empty(),
        ))
        .await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn health_and_readiness_stay_open_and_auth_is_off_by_default() {
    let api = Api::with_tokens(&[("w-secret", Scope::Write)]);
    assert_eq!(api.get("/healthz").await.status, StatusCode::OK);
    assert_eq!(api.get("/readyz").await.status, StatusCode::OK);
    assert_eq!(
        api.send(Request::head("/healthz").body(Body::empty()).unwrap())
            .await
            .status,
        StatusCode::OK
    );

    let open = Api::new();
    assert!(open.options.tokens.is_empty());
    let reply = open
        .post("/streams/s", STRUCTURED, event("e1").to_string())
        .await;
    assert_eq!(reply.status, StatusCode::CREATED);
    assert_eq!(open.get("/metrics").await.status, StatusCode::OK);
}
