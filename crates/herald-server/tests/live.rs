//! Live streams over Server-Sent Events, in process: catch-up then live, resuming with
//! `Last-Event-ID`, bad requests, deleted streams, a store failure mid-stream, and a server
//! shutdown that ends the live responses.

use std::sync::Arc;

use async_trait::async_trait;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use futures::StreamExt as _;
use herald_core::memory::InMemoryStore;
use herald_core::store::{Appended, Error, RecordedEvent, Subscription};
use herald_core::{Direction, Event, EventStore, ExpectedVersion, Position, StreamName, Version};
use herald_server::{LAST_EVENT_ID_HEADER, ServerOptions, router};
use http_body_util::BodyExt as _;
use serde_json::{Value, json};
use tower::ServiceExt as _;

/// One Server-Sent Event.
#[derive(Debug, Clone, PartialEq)]
struct SseEvent {
    id: Option<String>,
    event: Option<String>,
    data: String,
}

/// Reads Server-Sent Events from a response body as they come.
struct SseReader<B> {
    body: B,
    buffer: String,
}

impl<B> SseReader<B>
where
    B: axum::body::HttpBody<Data = axum::body::Bytes> + Unpin,
    B::Error: std::fmt::Debug,
{
    fn new(body: B) -> Self {
        SseReader {
            body,
            buffer: String::new(),
        }
    }

    /// The next event (comments are skipped); `None` when the response ended.
    async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                if let Some(event) = parse_event(&block) {
                    return Some(event);
                }
                continue;
            }
            let frame = self.body.frame().await?.expect("the body reads");
            if let Ok(data) = frame.into_data() {
                self.buffer
                    .push_str(std::str::from_utf8(&data).expect("SSE is UTF-8"));
            }
        }
    }
}

/// One event block; `None` for a block of comments only.
fn parse_event(block: &str) -> Option<SseEvent> {
    let mut event = SseEvent {
        id: None,
        event: None,
        data: String::new(),
    };
    let mut has_data = false;
    for line in block.lines() {
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "" => {} // a comment: the keep-alive
            "id" => event.id = Some(value.to_owned()),
            "event" => event.event = Some(value.to_owned()),
            "data" => {
                if has_data {
                    event.data.push('\n');
                }
                event.data.push_str(value);
                has_data = true;
            }
            _ => {}
        }
    }
    has_data.then_some(event)
}

fn event(id: &str) -> Event {
    Event::from_json(
        json!({"specversion": "1.0", "id": id, "source": "/tests", "type": "test.happened",
               "data": {"id": id}})
        .to_string()
        .as_bytes(),
    )
    .unwrap()
}

fn stream(name: &str) -> StreamName {
    StreamName::new(name).unwrap()
}

async fn append(store: &dyn EventStore, name: &str, ids: &[&str]) {
    store
        .append(
            &stream(name),
            ExpectedVersion::Any,
            ids.iter().map(|id| event(id)).collect(),
        )
        .await
        .unwrap();
}

/// Opens a live response in process.
async fn open(
    store: Arc<dyn EventStore>,
    path: &str,
    last_event_id: Option<&str>,
) -> axum::response::Response {
    let mut request = Request::get(path);
    if let Some(id) = last_event_id {
        request = request.header(LAST_EVENT_ID_HEADER, id);
    }
    router(store, &ServerOptions::default())
        .oneshot(request.body(Body::empty()).unwrap())
        .await
        .unwrap()
}

async fn follow(
    store: Arc<dyn EventStore>,
    path: &str,
    last_event_id: Option<&str>,
) -> SseReader<Body> {
    let response = open(store, path, last_event_id).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "text/event-stream"
    );
    SseReader::new(response.into_body())
}

/// The records of a paged read, as JSON.
async fn page(store: Arc<dyn EventStore>, path: &str) -> Vec<Value> {
    let response = router(store, &ServerOptions::default())
        .oneshot(Request::get(path).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let page: Value = serde_json::from_slice(&bytes).unwrap();
    page["events"].as_array().unwrap().clone()
}

#[tokio::test]
async fn all_live_catches_up_then_follows_with_positions_as_ids() {
    let store: Arc<dyn EventStore> = Arc::new(InMemoryStore::new());
    append(&*store, "a", &["a0", "a1"]).await;
    append(&*store, "b", &["b0"]).await;

    let mut live = follow(store.clone(), "/all/live", None).await;
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(live.next().await.unwrap());
    }
    // Live: appended after the catch-up was delivered.
    append(&*store, "a", &["a2"]).await;
    seen.push(live.next().await.unwrap());

    let ids: Vec<_> = seen.iter().map(|e| e.id.clone().unwrap()).collect();
    assert_eq!(ids, ["0", "1", "2", "3"]);
    assert!(
        seen.iter()
            .all(|e| e.event.is_none() && !e.data.contains('\n'))
    );
    // The data is exactly the record of the paged read.
    let data: Vec<Value> = seen
        .iter()
        .map(|e| serde_json::from_str(&e.data).unwrap())
        .collect();
    assert_eq!(data, page(store.clone(), "/all").await);
    assert_eq!(data[3]["stream"], "a");
    assert_eq!(data[3]["version"], 2);
    assert_eq!(data[3]["event"]["id"], "a2");
}

#[tokio::test]
async fn stream_live_uses_versions_as_ids_and_skips_other_streams() {
    let store: Arc<dyn EventStore> = Arc::new(InMemoryStore::new());
    append(&*store, "other", &["o0"]).await;
    append(&*store, "s", &["s0", "s1"]).await;

    let mut live = follow(store.clone(), "/streams/s/live?from=1", None).await;
    let first = live.next().await.unwrap();
    assert_eq!(first.id.as_deref(), Some("1"));
    append(&*store, "other", &["o1"]).await;
    append(&*store, "s", &["s2"]).await;
    let second = live.next().await.unwrap();
    assert_eq!(second.id.as_deref(), Some("2"));
    let record: Value = serde_json::from_str(&second.data).unwrap();
    assert_eq!(record["event"]["id"], "s2");
    assert_eq!(record["position"], 4);
    assert_eq!(record, page(store.clone(), "/streams/s?from=2").await[0]);

    // A stream that does not exist yet is waited for.
    let mut later = follow(store.clone(), "/streams/later/live", None).await;
    append(&*store, "later", &["l0"]).await;
    assert_eq!(later.next().await.unwrap().id.as_deref(), Some("0"));
}

#[tokio::test]
async fn last_event_id_resumes_right_after_it_and_wins_over_from() {
    let store: Arc<dyn EventStore> = Arc::new(InMemoryStore::new());
    for n in 0..10 {
        let id = format!("e{n}");
        append(&*store, if n % 2 == 0 { "even" } else { "odd" }, &[&id]).await;
    }

    let mut all = follow(store.clone(), "/all/live?from=2", Some("6")).await;
    let ids = [
        all.next().await.unwrap().id,
        all.next().await.unwrap().id,
        all.next().await.unwrap().id,
    ];
    assert_eq!(ids, [Some("7".into()), Some("8".into()), Some("9".into())]);
    append(&*store, "odd", &["e10"]).await;
    assert_eq!(all.next().await.unwrap().id.as_deref(), Some("10"));

    // On a stream, the id is a version: "even" holds e0 e2 e4 e6 e8 as versions 0 to 4.
    let mut even = follow(store.clone(), "/streams/even/live", Some("2")).await;
    let resumed = even.next().await.unwrap();
    assert_eq!(resumed.id.as_deref(), Some("3"));
    let record: Value = serde_json::from_str(&resumed.data).unwrap();
    assert_eq!(record["event"]["id"], "e6");
}

#[tokio::test]
async fn a_bad_from_or_last_event_id_is_400_before_the_stream_starts() {
    let store: Arc<dyn EventStore> = Arc::new(InMemoryStore::new());
    let cases: [(&str, Option<&str>, &str); 9] = [
        ("/all/live?from=abc", None, "invalid-query"),
        ("/all/live?from=-1", None, "invalid-query"),
        ("/all/live?from=1.5", None, "invalid-query"),
        ("/streams/s/live?from=x", None, "invalid-query"),
        ("/all/live", Some("x"), "invalid-last-event-id"),
        ("/all/live", Some("-3"), "invalid-last-event-id"),
        (
            "/all/live",
            Some("18446744073709551615"),
            "invalid-last-event-id",
        ),
        ("/streams/s/live", Some(""), "invalid-last-event-id"),
        ("/streams/bad%20name/live", None, "invalid-stream-name"),
    ];
    for (path, last_event_id, kind) in cases {
        let response = open(store.clone(), path, last_event_id).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{path}");
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let problem: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            problem["type"],
            format!("urn:herald:problem:{kind}"),
            "{path}"
        );
    }
    // Two Last-Event-ID headers are one too many.
    let request = Request::get("/all/live")
        .header(LAST_EVENT_ID_HEADER, "1")
        .header(LAST_EVENT_ID_HEADER, "2")
        .body(Body::empty())
        .unwrap();
    let response = router(store, &ServerOptions::default())
        .oneshot(request)
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn following_a_deleted_stream_is_404() {
    let store: Arc<dyn EventStore> = Arc::new(InMemoryStore::new());
    append(&*store, "gone", &["g0"]).await;
    store
        .delete_stream(&stream("gone"), ExpectedVersion::Any)
        .await
        .unwrap();
    let response = open(store.clone(), "/streams/gone/live", None).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let problem: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(problem["type"], "urn:herald:problem:stream-deleted");

    // Revived by an append, it can be followed again, from its visible events on.
    append(&*store, "gone", &["g1"]).await;
    // The in-memory store ends its subscriptions when it is dropped: keep it.
    let mut live = follow(store.clone(), "/streams/gone/live", None).await;
    let revived = live.next().await.unwrap();
    assert_eq!(revived.id.as_deref(), Some("1"));
}

/// A store whose subscriptions deliver what the inner store has, then fail.
struct FailingSubscriptions(InMemoryStore);

#[async_trait]
impl EventStore for FailingSubscriptions {
    async fn append(
        &self,
        stream: &StreamName,
        expected: ExpectedVersion,
        events: Vec<Event>,
    ) -> Result<Appended, Error> {
        self.0.append(stream, expected, events).await
    }

    async fn read_stream(
        &self,
        stream: &StreamName,
        from: Version,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, Error> {
        self.0.read_stream(stream, from, direction, limit).await
    }

    async fn read_all(
        &self,
        from: Position,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, Error> {
        self.0.read_all(from, direction, limit).await
    }

    async fn stream_version(&self, stream: &StreamName) -> Result<Option<Version>, Error> {
        self.0.stream_version(stream).await
    }

    async fn head(&self) -> Result<Option<Position>, Error> {
        self.0.head().await
    }

    async fn subscribe_all(&self, from: Position) -> Result<Subscription, Error> {
        let stored = self.0.read_all(from, Direction::Forward, 100).await?;
        let failure = futures::stream::iter([Err(Error::Closed)]);
        Ok(futures::stream::iter(stored.into_iter().map(Ok))
            .chain(failure)
            // Never reached: the response must end at the error.
            .chain(futures::stream::pending())
            .boxed())
    }

    async fn subscribe_stream(
        &self,
        stream: &StreamName,
        from: Version,
    ) -> Result<Subscription, Error> {
        self.0.subscribe_stream(stream, from).await
    }

    async fn delete_stream(
        &self,
        stream: &StreamName,
        expected: ExpectedVersion,
    ) -> Result<(), Error> {
        self.0.delete_stream(stream, expected).await
    }
}

#[tokio::test]
async fn a_store_error_ends_the_response_with_an_error_event() {
    let store: Arc<dyn EventStore> = Arc::new(FailingSubscriptions(InMemoryStore::new()));
    append(&*store, "s", &["e0"]).await;
    let mut live = follow(store, "/all/live", None).await;
    assert_eq!(live.next().await.unwrap().id.as_deref(), Some("0"));
    let error = live.next().await.unwrap();
    assert_eq!(error.event.as_deref(), Some("error"));
    assert_eq!(error.id, None);
    let problem: Value = serde_json::from_str(&error.data).unwrap();
    assert_eq!(problem["type"], "urn:herald:problem:store-unavailable");
    assert_eq!(problem["status"], 503);
    assert_eq!(live.next().await, None, "the response ends after the error");
}

#[tokio::test]
async fn shutdown_ends_live_responses_so_the_server_stops() {
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    let store: Arc<dyn EventStore> = Arc::new(InMemoryStore::new());
    append(&*store, "s", &["e0"]).await;
    let options = ServerOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..ServerOptions::default()
    };
    let server = options.build(store.clone()).await.unwrap();
    let addr = server.local_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));

    let client = Client::builder(TokioExecutor::new())
        .build_http::<http_body_util::Empty<axum::body::Bytes>>();
    let mut readers = Vec::new();
    for path in ["/all/live", "/streams/s/live"] {
        let response = client
            .get(format!("http://{addr}{path}").parse().unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let mut reader = SseReader::new(response.into_body());
        // The first event proves the response is live on the server.
        assert_eq!(reader.next().await.unwrap().id.as_deref(), Some("0"));
        readers.push(reader);
    }

    stop.send(()).unwrap();
    for mut reader in readers {
        assert_eq!(reader.next().await, None, "shutdown ends the live response");
    }
    running.await.unwrap().unwrap();
}
