//! Live streams, metrics, the OpenAPI document and bearer tokens, against a real `herald up`
//! process: a reader that drops its connection at random points and resumes with
//! `Last-Event-ID` while a writer appends sees every event exactly once, in order; a live
//! response does not hold up SIGTERM; `HERALD_TOKENS` protects the API.

use std::collections::BTreeSet;
use std::sync::Arc;

use hyper::body::Bytes;
use hyper::{Method, StatusCode};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde_json::{Value, json};

mod common;

use common::http::{Herald, Reply, SseReader};

const BATCH: &str = "application/cloudevents-batch+json";
const STRUCTURED: &str = "application/cloudevents+json";

/// Events the writer appends in the resume test.
const EVENTS_TOTAL: usize = 2_000;
/// Streams the writer spreads them over.
const STREAMS: usize = 4;
/// The largest batch the writer appends at once.
const BATCH_LEN_MAX: usize = 25;
/// How many times each reader drops its connection and resumes.
const RECONNECTS: usize = 6;
/// The stream whose own live endpoint is followed too.
const FOLLOWED_STREAM: &str = "stream-0";

fn event(id: &str) -> Value {
    json!({"specversion": "1.0", "id": id, "source": "/tests/live", "type": "test.happened",
           "data": {"id": id}})
}

/// The seed of the test's random choices: `HERALD_TEST_SEED`, or a fixed one. Printed, so
/// that a failure can be replayed.
fn seed() -> u64 {
    let seed = std::env::var("HERALD_TEST_SEED")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(0x5EED_2026);
    println!("HERALD_TEST_SEED={seed}");
    seed
}

/// What the writer appends: `(stream, number of events)` per append, in order.
fn plan(rng: &mut StdRng) -> Vec<(String, usize)> {
    let mut plan = Vec::new();
    let mut left = EVENTS_TOTAL;
    while left > 0 {
        let len = rng.gen_range(1..=BATCH_LEN_MAX).min(left);
        plan.push((format!("stream-{}", rng.gen_range(0..STREAMS)), len));
        left -= len;
    }
    plan
}

/// Appends the plan, batch by batch.
async fn write(herald: Arc<Herald>, plan: Vec<(String, usize)>) {
    let mut next_id = 0usize;
    for (stream, len) in plan {
        let batch: Vec<Value> = (next_id..next_id + len)
            .map(|n| event(&format!("e{n}")))
            .collect();
        next_id += len;
        let reply = herald
            .post(
                &format!("/streams/{stream}"),
                BATCH,
                Value::Array(batch).to_string(),
            )
            .await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    }
}

/// Follows `path` until `expected` events arrived, dropping the connection after each count
/// of `drops` and resuming with `Last-Event-ID`. Returns the `(id, record)` of every event
/// received, in the order received.
async fn follow(
    herald: Arc<Herald>,
    path: String,
    expected: usize,
    drops: BTreeSet<usize>,
) -> Vec<(u64, Value)> {
    let mut seen: Vec<(u64, Value)> = Vec::with_capacity(expected);
    let mut connections = 0;
    while seen.len() < expected {
        connections += 1;
        // A hang guard, not a synchronisation: a response that keeps ending early is a bug.
        assert!(
            connections <= drops.len() + 1,
            "{path}: the live response ended by itself after {} events",
            seen.len()
        );
        let last = seen.last().map(|(id, _)| id.to_string());
        let mut headers = Vec::new();
        if let Some(last) = &last {
            headers.push(("last-event-id", last.as_str()));
        }
        let response = herald
            .open(Method::GET, &path, &headers, Bytes::new())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        let mut reader = SseReader::new(response);
        while seen.len() < expected {
            let Some(event) = reader.next().await else {
                break;
            };
            assert_eq!(event.event, None, "{path}: {}", event.data);
            let id: u64 = event.id.as_deref().unwrap().parse().unwrap();
            seen.push((id, serde_json::from_str(&event.data).unwrap()));
            if drops.contains(&seen.len()) {
                // Dropping the reader closes the connection mid-stream.
                break;
            }
        }
    }
    seen
}

/// Every record of a paged read, following `next` links.
async fn read_all_pages(herald: &Herald, first: &str) -> Vec<Value> {
    let mut records = Vec::new();
    let mut path = first.to_owned();
    loop {
        let page = herald.get(&path).await;
        assert_eq!(page.status, StatusCode::OK);
        records.extend(page.body["events"].as_array().unwrap().iter().cloned());
        match page.body["next"].as_str() {
            Some(next) => path = next.to_owned(),
            None => return records,
        }
    }
}

/// Asserts that `ids` is `0, 1, 2, …, len - 1`: every id once, in order, none missing.
fn assert_every_id_once_in_order(what: &str, ids: &[u64], len: usize) {
    if let Some(at) = (0..len).find(|&n| ids.get(n) != Some(&(n as u64))) {
        let around = &ids[at.saturating_sub(2)..(at + 3).min(ids.len())];
        panic!("{what}: expected id {at} at index {at}, got {around:?} around it");
    }
    assert_eq!(ids.len(), len, "{what}: events after the last expected one");
}

/// Distinct counts in `1..expected` at which a reader drops its connection.
fn drop_points(rng: &mut StdRng, expected: usize) -> BTreeSet<usize> {
    let mut drops = BTreeSet::new();
    while drops.len() < RECONNECTS.min(expected.saturating_sub(1)) {
        drops.insert(rng.gen_range(1..expected));
    }
    drops
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_that_reconnect_with_last_event_id_see_every_event_once_in_order() {
    let dir = tempfile::tempdir().unwrap();
    // The event API alone: the positions below are exact, and the order system would append
    // its topic's creation first.
    let herald = Arc::new(Herald::start(dir.path(), &["--no-orders"]));
    let mut rng = StdRng::seed_from_u64(seed());
    let plan = plan(&mut rng);
    let in_stream: usize = plan
        .iter()
        .filter(|(stream, _)| stream == FOLLOWED_STREAM)
        .map(|(_, len)| len)
        .sum();
    assert!(in_stream > 0, "the plan appends to {FOLLOWED_STREAM}");
    let all_drops = drop_points(&mut rng, EVENTS_TOTAL);
    let stream_drops = drop_points(&mut rng, in_stream);

    // The readers start before the writer, so they switch from catch-up to live while it
    // appends, and resume at random points of its run.
    let readers = (
        tokio::spawn(follow(
            herald.clone(),
            "/all/live".to_owned(),
            EVENTS_TOTAL,
            all_drops,
        )),
        tokio::spawn(follow(
            herald.clone(),
            format!("/streams/{FOLLOWED_STREAM}/live"),
            in_stream,
            stream_drops,
        )),
    );
    tokio::spawn(write(herald.clone(), plan)).await.unwrap();
    let all = readers.0.await.unwrap();
    let stream = readers.1.await.unwrap();

    // The global log: ids are the positions 0, 1, 2, … with none missing or repeated, and
    // the records are those of the paged read.
    let ids: Vec<u64> = all.iter().map(|(id, _)| *id).collect();
    assert_every_id_once_in_order("/all/live", &ids, EVENTS_TOTAL);
    assert!(all.iter().all(|(id, record)| record["position"] == *id));
    let records: Vec<Value> = all.into_iter().map(|(_, record)| record).collect();
    assert!(
        records == read_all_pages(&herald, "/all?limit=1000").await,
        "the live records are those of the paged read"
    );

    // The stream: ids are its versions 0, 1, 2, …
    let ids: Vec<u64> = stream.iter().map(|(id, _)| *id).collect();
    assert_every_id_once_in_order(FOLLOWED_STREAM, &ids, in_stream);
    assert!(stream.iter().all(|(id, record)| record["version"] == *id));
    let records: Vec<Value> = stream.into_iter().map(|(_, record)| record).collect();
    assert!(
        records == read_all_pages(&herald, &format!("/streams/{FOLLOWED_STREAM}?limit=1000")).await,
        "the live records are those of the paged read"
    );

    let herald = Arc::into_inner(herald).expect("no reader or writer holds the server");
    assert!(herald.terminate().success(), "herald up exits 0 on SIGTERM");
}

#[tokio::test]
async fn sigterm_ends_live_responses_and_herald_exits() {
    let dir = tempfile::tempdir().unwrap();
    // The event API alone: the positions below are exact, and the order system would append
    // its topic's creation first.
    let herald = Herald::start(dir.path(), &["--no-orders"]);
    let reply = herald
        .post("/streams/s", STRUCTURED, event("e0").to_string())
        .await;
    assert_eq!(reply.status, StatusCode::CREATED);
    let mut readers = Vec::new();
    for path in ["/all/live", "/streams/s/live", "/streams/not-yet/live"] {
        let response = herald
            .open(Method::GET, path, &[], Bytes::new())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        readers.push(SseReader::new(response));
    }
    // The first event proves the response is live on the server.
    for reader in &mut readers[..2] {
        assert_eq!(reader.next().await.unwrap().id.as_deref(), Some("0"));
    }

    herald.sigterm();
    for reader in &mut readers {
        assert_eq!(reader.next().await, None, "SIGTERM ends the live response");
    }
    assert!(
        herald.wait().success(),
        "herald up exits 0 with live clients"
    );
}

#[tokio::test]
async fn metrics_and_the_openapi_document_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let herald = Herald::start(dir.path(), &[]);
    for id in ["m0", "m1"] {
        let reply = herald
            .post("/streams/metered", STRUCTURED, event(id).to_string())
            .await;
        assert_eq!(reply.status, StatusCode::CREATED);
    }
    assert_eq!(
        herald.get("/streams/missing").await.status,
        StatusCode::NOT_FOUND
    );

    let metrics = herald.get("/metrics").await;
    assert_eq!(metrics.status, StatusCode::OK);
    assert!(metrics.content_type.starts_with("text/plain"));
    let text = metrics.body.as_str().unwrap();
    let count = |labels: &[&str]| {
        text.lines()
            .find(|line| {
                line.starts_with("herald_http_requests_total{")
                    && labels.iter().all(|label| line.contains(label))
            })
            .map(|line| line.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
    };
    assert_eq!(
        count(&[
            r#"method="POST""#,
            r#"route="/streams/{stream}""#,
            r#"status="201""#
        ]),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        count(&[
            r#"method="GET""#,
            r#"route="/streams/{stream}""#,
            r#"status="404""#
        ]),
        Some(1.0)
    );
    assert!(text.contains("herald_http_request_duration_seconds_bucket{"));
    assert!(!text.contains("metered") && !text.contains("missing"));

    let doc = herald.get("/openapi.json").await;
    assert_eq!(doc.status, StatusCode::OK);
    assert_eq!(doc.body["openapi"], "3.1.0");
    assert!(doc.body["info"]["title"].is_string());
    assert_eq!(
        doc.body["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    let documented: usize = doc.body["paths"]
        .as_object()
        .unwrap()
        .values()
        .map(|item| item.as_object().unwrap().len())
        .sum();
    assert_eq!(documented, herald_server::ROUTES.len());
    for route in herald_server::ROUTES {
        let operation = &doc.body["paths"][route.path][route.method.to_lowercase()];
        assert!(
            operation.is_object(),
            "{} {} is documented",
            route.method,
            route.path
        );
    }
    assert!(herald.terminate().success());
}

fn assert_refused(reply: &Reply, status: StatusCode, kind: &str) {
    assert_eq!(reply.status, status, "{}", reply.body);
    assert_eq!(reply.content_type, "application/problem+json");
    assert_eq!(reply.body["type"], format!("urn:herald:problem:{kind}"));
    let challenge = reply.headers["www-authenticate"].to_str().unwrap();
    assert!(challenge.starts_with("Bearer"), "{challenge}");
}

#[tokio::test]
async fn herald_tokens_protect_the_api() {
    let dir = tempfile::tempdir().unwrap();
    // The event API alone: the events below are exact, and the order system would append
    // its topic's creation first.
    let herald = Herald::start_with_env(
        dir.path(),
        &["--no-orders"],
        &[("HERALD_TOKENS", "write:w-secret,read:r-secret")],
    );
    const WRITE: &[(&str, &str)] = &[
        ("content-type", STRUCTURED),
        ("authorization", "Bearer w-secret"),
    ];
    const READ_ONLY: &[(&str, &str)] = &[
        ("content-type", STRUCTURED),
        ("authorization", "Bearer r-secret"),
    ];
    const WRONG: &[(&str, &str)] = &[
        ("content-type", STRUCTURED),
        ("authorization", "Bearer nope"),
    ];
    let post = |headers: &'static [(&'static str, &'static str)], id: &str| {
        herald.send(
            Method::POST,
            "/streams/guarded",
            headers,
            event(id).to_string(),
        )
    };

    let anonymous = herald
        .post("/streams/guarded", STRUCTURED, event("a").to_string())
        .await;
    assert_refused(&anonymous, StatusCode::UNAUTHORIZED, "unauthorized");
    assert_refused(
        &post(WRONG, "b").await.unwrap(),
        StatusCode::UNAUTHORIZED,
        "invalid-token",
    );
    assert_refused(
        &post(READ_ONLY, "c").await.unwrap(),
        StatusCode::FORBIDDEN,
        "insufficient-scope",
    );
    assert_eq!(post(WRITE, "d").await.unwrap().status, StatusCode::CREATED);

    // Only the write token's event was stored.
    let page = herald
        .send(Method::GET, "/all", READ_ONLY, Bytes::new())
        .await
        .unwrap();
    assert_eq!(page.status, StatusCode::OK);
    let ids: Vec<&str> = page.body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|record| record["event"]["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["d"]);

    // Reads need a token too, live ones and operations included; probes do not.
    for path in ["/all", "/all/live", "/metrics", "/openapi.json"] {
        assert_refused(
            &herald.get(path).await,
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        );
    }
    let live = herald
        .open(
            Method::GET,
            "/streams/guarded/live",
            READ_ONLY,
            Bytes::new(),
        )
        .await
        .unwrap();
    assert_eq!(live.status(), StatusCode::OK);
    let mut live = SseReader::new(live);
    assert_eq!(live.next().await.unwrap().id.as_deref(), Some("0"));
    drop(live);
    let metrics = herald
        .send(Method::GET, "/metrics", READ_ONLY, Bytes::new())
        .await
        .unwrap();
    assert_eq!(metrics.status, StatusCode::OK);
    assert_eq!(herald.get("/healthz").await.status, StatusCode::OK);
    assert_eq!(herald.get("/readyz").await.status, StatusCode::OK);
    assert!(herald.terminate().success());
}
