//! The event API over HTTP, against a real `herald up` process on a free port: every endpoint,
//! every error, hostile input, and a graceful SIGTERM after which the data is on disk.

use std::io::{BufRead as _, BufReader};

use herald_core::{Direction, EventStore as _, Position, StreamName, Version};
use herald_log::{Log, Options};
use hyper::body::Bytes;
use hyper::{Method, StatusCode};
use serde_json::{Value, json};

mod common;

use common::http::{Herald, Reply, command, failure_to_start};

const STRUCTURED: &str = "application/cloudevents+json";
const BATCH: &str = "application/cloudevents-batch+json";
/// A hang guard, not a synchronisation: how many connections may still be accepted after
/// SIGTERM before the test gives up.
const CONNECT_ATTEMPTS_MAX: u64 = 1_000_000;

fn event(id: &str) -> Value {
    json!({"specversion": "1.0", "id": id, "source": "/tests", "type": "test.happened",
           "data": {"id": id}, "tenant": "acme"})
}

fn assert_problem(reply: &Reply, status: StatusCode) {
    assert_eq!(reply.status, status, "{}", reply.body);
    assert_eq!(reply.content_type, "application/problem+json");
    assert_eq!(reply.body["status"], status.as_u16());
    assert!(reply.body["type"].is_string() && reply.body["title"].is_string());
    assert!(!reply.body["detail"].as_str().unwrap().is_empty());
}

#[tokio::test]
async fn every_endpoint_works_and_sigterm_keeps_the_data() {
    let dir = tempfile::tempdir().unwrap();
    // The event API alone: the positions below are exact, and the order system would append
    // its topic's creation first.
    let herald = Herald::start(dir.path(), &["--no-orders"]);
    assert_eq!(herald.get("/healthz").await.status, StatusCode::OK);
    assert_eq!(herald.get("/readyz").await.status, StatusCode::OK);

    // Structured, then a batch, then a retry of the batch (idempotent).
    let one = herald
        .post("/streams/order-1", STRUCTURED, event("e0").to_string())
        .await;
    assert_eq!(one.status, StatusCode::CREATED, "{}", one.body);
    assert_eq!(
        one.body,
        json!({"events": [{"id": "e0", "version": 0, "position": 0}]})
    );
    let batch = json!([event("e1"), event("e2")]).to_string();
    let appended = herald.post("/streams/order-1", BATCH, batch.clone()).await;
    assert_eq!(appended.status, StatusCode::CREATED);
    let retried = herald.post("/streams/order-1", BATCH, batch).await;
    assert_eq!(retried.status, StatusCode::CREATED);
    assert_eq!(retried.body, appended.body);

    // Binary mode, with an expected version.
    let binary = herald
        .send(
            Method::POST,
            "/streams/order-1",
            &[
                ("ce-specversion", "1.0"),
                ("ce-id", "e3"),
                ("ce-source", "/webhooks"),
                ("ce-type", "test.happened"),
                ("ce-tenant", "acme"),
                ("herald-expected-version", "2"),
                ("content-type", "application/json"),
            ],
            r#"{"id":"e3"}"#,
        )
        .await
        .unwrap();
    assert_eq!(binary.status, StatusCode::CREATED, "{}", binary.body);
    assert_eq!(binary.body["events"][0]["version"], 3);

    let page = herald.get("/streams/order-1?limit=3").await;
    assert_eq!(page.status, StatusCode::OK);
    let ids: Vec<_> = page.body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|record| record["event"]["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, ["e0", "e1", "e2"]);
    assert_eq!(page.body["events"][1]["event"], event("e1"));
    let next = herald.get(page.body["next"].as_str().unwrap()).await;
    assert_eq!(next.body["events"][0]["event"]["id"], "e3");
    assert_eq!(next.body["events"][0]["event"]["tenant"], "acme");

    let backward = herald
        .get("/streams/order-1?direction=backward&limit=1")
        .await;
    assert_eq!(backward.body["events"][0]["version"], 3);

    herald
        .post("/streams/other", STRUCTURED, event("o0").to_string())
        .await;
    let all = herald.get("/all?from=3").await;
    let positions: Vec<_> = all.body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|record| record["position"].as_u64().unwrap())
        .collect();
    assert_eq!(positions, [3, 4]);

    let deleted = herald
        .send(Method::DELETE, "/streams/other", &[], Bytes::new())
        .await
        .unwrap();
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    assert_problem(&herald.get("/streams/other").await, StatusCode::NOT_FOUND);

    assert!(herald.terminate().success(), "herald up exits 0 on SIGTERM");

    // The log was closed cleanly: it opens again, with every acknowledged event.
    let log = Log::open(Options::new(dir.path())).unwrap();
    let stream = StreamName::new("order-1").unwrap();
    let stored = log
        .read_stream(&stream, Version(0), Direction::Forward, 100)
        .await
        .unwrap();
    let ids: Vec<_> = stored
        .iter()
        .map(|record| record.event.id.as_str())
        .collect();
    assert_eq!(ids, ["e0", "e1", "e2", "e3"]);
    assert_eq!(log.head().await.unwrap(), Some(Position(4)));
    log.close().await.unwrap();
}

#[tokio::test]
async fn errors_are_problem_documents_and_hostile_input_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // The event API alone: `/all` must stay empty, and the order system would append its
    // topic's creation.
    let herald = Herald::start(
        dir.path(),
        &["--no-orders", "--body-size-max-bytes", "4096"],
    );

    // 400: an invalid CloudEvent names the attribute.
    let reply = herald
        .post(
            "/streams/s",
            STRUCTURED,
            json!({"specversion": "1.0", "id": "x", "type": "t"}).to_string(),
        )
        .await;
    assert_problem(&reply, StatusCode::BAD_REQUEST);
    assert_eq!(reply.body["attribute"], "source");

    // 400: bad stream names; bad, negative or non-numeric expected versions.
    for path in [
        "/streams/$all",
        "/streams/a%20b",
        "/streams/%FF",
        "/streams/x%2Fy",
    ] {
        let reply = herald.post(path, STRUCTURED, event("x").to_string()).await;
        assert_problem(&reply, StatusCode::BAD_REQUEST);
    }
    for expected in ["-1", "abc", "1e3", "99999999999999999999"] {
        let reply = herald
            .send(
                Method::POST,
                "/streams/s",
                &[
                    ("content-type", STRUCTURED),
                    ("herald-expected-version", expected),
                ],
                event("x").to_string(),
            )
            .await
            .unwrap();
        assert_problem(&reply, StatusCode::BAD_REQUEST);
    }

    // 413 above the configured limit; 415 for what is not an event format.
    let big = json!({"specversion": "1.0", "id": "x", "source": "/s", "type": "t",
                     "data": "a".repeat(5000)});
    let reply = herald.post("/streams/s", STRUCTURED, big.to_string()).await;
    assert_problem(&reply, StatusCode::PAYLOAD_TOO_LARGE);
    let reply = herald
        .post("/streams/s", "application/json", event("x").to_string())
        .await;
    assert_problem(&reply, StatusCode::UNSUPPORTED_MEDIA_TYPE);

    // Deep nesting and invalid UTF-8.
    let deep = format!(
        r#"{{"specversion":"1.0","id":"x","source":"/s","type":"t","data":{}{}}}"#,
        "[".repeat(2000),
        "]".repeat(2000)
    );
    assert_problem(
        &herald.post("/streams/s", STRUCTURED, deep).await,
        StatusCode::BAD_REQUEST,
    );
    let reply = herald
        .post(
            "/streams/s",
            STRUCTURED,
            b"{\"specversion\":\"1.0\",\"id\":\"\xff\",\"source\":\"/s\",\"type\":\"t\"}".to_vec(),
        )
        .await;
    assert_problem(&reply, StatusCode::BAD_REQUEST);

    // A huge header value: refused (or the connection closed), and the server stays up.
    let huge = "a".repeat(1 << 20);
    if let Ok(reply) = herald
        .send(
            Method::POST,
            "/streams/s",
            &[("content-type", STRUCTURED), ("ce-huge", &huge)],
            event("x").to_string(),
        )
        .await
    {
        assert!(reply.status.is_client_error(), "{:?}", reply.status);
    }

    // A long attribute header in binary mode is refused too.
    let long = "a".repeat(64 * 1024);
    let reply = herald
        .send(
            Method::POST,
            "/streams/s",
            &[
                ("ce-specversion", "1.0"),
                ("ce-id", "x"),
                ("ce-source", "/s"),
                ("ce-type", "t"),
                ("ce-long", &long),
            ],
            Bytes::new(),
        )
        .await
        .unwrap();
    assert_problem(&reply, StatusCode::BAD_REQUEST);

    // 404 on reads of an unknown stream.
    assert_problem(&herald.get("/streams/unknown").await, StatusCode::NOT_FOUND);

    // Nothing of the above was stored, and the server still serves.
    let all = herald.get("/all").await;
    assert_eq!(all.status, StatusCode::OK);
    assert_eq!(all.body["events"], json!([]));

    // 409 with the actual version.
    herald
        .post("/streams/s", STRUCTURED, event("a").to_string())
        .await;
    let reply = herald
        .send(
            Method::POST,
            "/streams/s",
            &[
                ("content-type", STRUCTURED),
                ("herald-expected-version", "no-stream"),
            ],
            event("b").to_string(),
        )
        .await
        .unwrap();
    assert_problem(&reply, StatusCode::CONFLICT);
    assert_eq!(reply.body["actual"], 0);
    assert!(herald.terminate().success());
}

#[tokio::test]
async fn a_request_in_flight_at_sigterm_is_answered_and_stored() {
    use std::io::{Read as _, Write as _};

    let dir = tempfile::tempdir().unwrap();
    let herald = Herald::start(dir.path(), &[]);
    let body = event("late").to_string();
    let mut socket = std::net::TcpStream::connect(herald.addr()).unwrap();
    write!(
        socket,
        "POST /streams/late HTTP/1.1\r\nhost: herald\r\ncontent-type: {STRUCTURED}\r\n\
         content-length: {}\r\nexpect: 100-continue\r\n\r\n",
        body.len()
    )
    .unwrap();
    // `100 Continue` comes once the handler reads the body: the request is in flight.
    let mut reader = BufReader::new(socket.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("HTTP/1.1 100"), "{line:?}");
    reader.read_line(&mut line).unwrap();

    herald.sigterm();
    // Once the server stops accepting connections, it is shutting down; only then does the
    // body go out, so the request is answered during the shutdown, not before it.
    let mut attempts = 0u64;
    while std::net::TcpStream::connect(herald.addr()).is_ok() {
        attempts += 1;
        assert!(
            attempts < CONNECT_ATTEMPTS_MAX,
            "herald up still accepts connections"
        );
    }
    socket.write_all(body.as_bytes()).unwrap();
    let mut response = String::new();
    reader.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 201"), "{response}");
    assert!(herald.wait().success(), "herald up exits 0 after answering");

    let log = Log::open(Options::new(dir.path())).unwrap();
    let stored = log
        .read_stream(
            &StreamName::new("late").unwrap(),
            Version(0),
            Direction::Forward,
            10,
        )
        .await
        .unwrap();
    assert_eq!(stored.len(), 1);
    log.close().await.unwrap();
}

#[tokio::test]
async fn a_second_server_on_the_same_data_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let herald = Herald::start(dir.path(), &[]);
    let second = command(dir.path())
        .env("HERALD_LISTEN", "127.0.0.1:0")
        .env("HERALD_DATA_DIR", dir.path())
        .output()
        .unwrap();
    let stderr = failure_to_start(second);
    assert!(stderr.contains("cannot open the event log"), "{stderr}");
    assert!(herald.terminate().success());
}
