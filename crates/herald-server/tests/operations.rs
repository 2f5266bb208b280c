//! `/metrics` and `/openapi.json` in process: the request metrics and their labels, metrics of
//! other components on the same endpoint, and an OpenAPI document that describes exactly the
//! routes the router serves, each with its security and its problem responses.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use herald_core::EventStore;
use herald_core::memory::InMemoryStore;
use herald_server::{Access, ROUTES, ServerOptions, router};
use http_body_util::BodyExt as _;
use serde_json::{Value, json};
use tower::ServiceExt as _;

/// The methods a route could be served under; the router must answer `405` for the others.
const METHODS: [&str; 5] = ["GET", "POST", "PUT", "DELETE", "PATCH"];

struct Reply {
    status: StatusCode,
    content_type: String,
    text: String,
}

async fn send(store: &Arc<InMemoryStore>, request: Request<Body>) -> Reply {
    let store: Arc<dyn EventStore> = store.clone();
    let response = router(store, &ServerOptions::default())
        .oneshot(request)
        .await
        .unwrap();
    let status = response.status();
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|value| value.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let text = if content_type == "text/event-stream" {
        // A live response never ends by itself: its status is what is asked.
        String::new()
    } else {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    };
    Reply {
        status,
        content_type,
        text,
    }
}

async fn get(store: &Arc<InMemoryStore>, path: &str) -> Reply {
    send(store, Request::get(path).body(Body::empty()).unwrap()).await
}

/// The value of the sample of `name` whose labels include all of `labels`.
fn sample(metrics: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?.strip_prefix('{')?;
        let (label_text, value) = rest.split_once("} ")?;
        labels
            .iter()
            .all(|(label, value)| label_text.contains(&format!("{label}=\"{value}\"")))
            .then(|| value.trim().parse().unwrap())
    })
}

#[tokio::test]
async fn requests_are_counted_by_method_route_template_and_status() {
    let store = Arc::new(InMemoryStore::new());
    let before = sample(
        &get(&store, "/metrics").await.text,
        "herald_http_requests_total",
        &[
            ("method", "POST"),
            ("route", "/streams/{stream}"),
            ("status", "201"),
        ],
    )
    .unwrap_or(0.0);

    let event = json!({"specversion": "1.0", "id": "m1", "source": "/t", "type": "t"});
    for (id, stream) in [("m1", "metrics-a"), ("m2", "metrics-b")] {
        let mut event = event.clone();
        event["id"] = json!(id);
        let request = Request::post(format!("/streams/{stream}"))
            .header(header::CONTENT_TYPE, "application/cloudevents+json")
            .body(Body::from(event.to_string()))
            .unwrap();
        assert_eq!(send(&store, request).await.status, StatusCode::CREATED);
    }
    assert_eq!(
        get(&store, "/streams/metrics-a").await.status,
        StatusCode::OK
    );
    assert_eq!(
        get(&store, "/no/such/path").await.status,
        StatusCode::NOT_FOUND
    );
    // Another component of the process records through the same facade.
    metrics::counter!("herald_test_component_total", "kind" => "probe").increment(3);

    let reply = get(&store, "/metrics").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(
        reply.content_type.starts_with("text/plain"),
        "{}",
        reply.content_type
    );
    let metrics = reply.text;
    let after = sample(
        &metrics,
        "herald_http_requests_total",
        &[
            ("method", "POST"),
            ("route", "/streams/{stream}"),
            ("status", "201"),
        ],
    )
    .unwrap();
    assert!(after >= before + 2.0, "{before} then {after}");
    assert!(
        sample(
            &metrics,
            "herald_http_requests_total",
            &[
                ("method", "GET"),
                ("route", "/streams/{stream}"),
                ("status", "200")
            ],
        )
        .is_some()
    );
    assert!(
        sample(
            &metrics,
            "herald_http_requests_total",
            &[("method", "GET"), ("route", "unmatched"), ("status", "404")],
        )
        .is_some()
    );
    let buckets = sample(
        &metrics,
        "herald_http_request_duration_seconds_bucket",
        &[
            ("method", "POST"),
            ("route", "/streams/{stream}"),
            ("le", "+Inf"),
        ],
    )
    .unwrap();
    assert!(buckets >= 2.0);
    assert!(metrics.contains("# TYPE herald_http_request_duration_seconds histogram"));
    assert_eq!(
        sample(
            &metrics,
            "herald_test_component_total",
            &[("kind", "probe")]
        ),
        Some(3.0)
    );
    // Raw paths never become label values.
    assert!(!metrics.contains("metrics-a"));
    assert!(!metrics.contains("/no/such/path"));
}

/// The `(method, path)` pairs of the routes.
fn listed() -> BTreeSet<(String, String)> {
    ROUTES
        .iter()
        .map(|route| (route.method.to_owned(), route.path.to_owned()))
        .collect()
}

/// A concrete path for a path template.
fn concrete(path: &str) -> String {
    path.replace("{stream}", "some-stream")
}

#[tokio::test]
async fn the_router_serves_exactly_the_listed_routes() {
    let store = Arc::new(InMemoryStore::new());
    let paths: BTreeSet<&str> = ROUTES.iter().map(|route| route.path).collect();
    for path in paths {
        for method in METHODS {
            let request = Request::builder()
                .method(method)
                .uri(concrete(path))
                .body(Body::empty())
                .unwrap();
            let reply = send(&store, request).await;
            let served = !matches!(
                reply.status,
                StatusCode::METHOD_NOT_ALLOWED | StatusCode::NOT_FOUND
            ) || reply.text.contains("stream-not-found");
            let is_listed = listed().contains(&(method.to_owned(), path.to_owned()));
            assert_eq!(
                served, is_listed,
                "{method} {path} answered {} {}",
                reply.status, reply.text
            );
        }
    }
}

#[tokio::test]
async fn the_openapi_document_describes_every_route_and_only_those() {
    let store = Arc::new(InMemoryStore::new());
    let reply = get(&store, "/openapi.json").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.content_type, "application/json");
    let doc: Value = serde_json::from_str(&reply.text).unwrap();
    // It is an OpenAPI 3.1 document, by utoipa's own model.
    assert_eq!(doc["openapi"], "3.1.0");
    let parsed: utoipa::openapi::OpenApi = serde_json::from_value(doc.clone()).unwrap();
    let paths: BTreeSet<&str> = ROUTES.iter().map(|route| route.path).collect();
    assert_eq!(parsed.paths.paths.len(), paths.len());

    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, _) in item.as_object().unwrap() {
            let operation = [
                "get", "put", "post", "delete", "options", "head", "patch", "trace",
            ];
            if operation.contains(&method.as_str()) {
                documented.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    assert_eq!(documented, listed(), "documented routes differ from ROUTES");

    let schemes = &doc["components"]["securitySchemes"];
    assert_eq!(schemes["bearer"]["type"], "http");
    assert_eq!(schemes["bearer"]["scheme"], "bearer");
    for route in ROUTES {
        let operation = &doc["paths"][route.path][route.method.to_lowercase()];
        let security = &operation["security"];
        let responses = operation["responses"].as_object().unwrap();
        match route.access {
            Access::Open => {
                assert!(security.is_null(), "{} {}", route.method, route.path);
                assert!(!responses.contains_key("401"));
            }
            Access::Read | Access::Write => {
                let role = if route.access == Access::Read {
                    "read"
                } else {
                    "write"
                };
                assert_eq!(security, &json!([{"bearer": [role]}]), "{}", route.path);
                assert!(responses.contains_key("401"), "{}", route.path);
                assert_eq!(responses.contains_key("403"), route.access == Access::Write);
            }
        }
        assert!(
            responses.keys().any(|status| status.starts_with('2')),
            "{} {} documents its success",
            route.method,
            route.path
        );
        // Every error is a problem document.
        for (status, response) in responses {
            if status.starts_with('4') || status.starts_with('5') {
                assert_eq!(
                    response["content"]["application/problem+json"]["schema"]["$ref"],
                    "#/components/schemas/Problem",
                    "{} {} {status}",
                    route.method,
                    route.path
                );
                assert!(
                    response["description"]
                        .as_str()
                        .is_some_and(|text| text.contains("urn:herald:problem:")),
                    "{} {} {status} names its problem types",
                    route.method,
                    route.path
                );
            }
        }
    }

    // The append documents its three modes.
    let append = &doc["paths"]["/streams/{stream}"]["post"];
    let content = append["requestBody"]["content"].as_object().unwrap();
    for media in [
        "application/cloudevents+json",
        "application/cloudevents-batch+json",
        "*/*",
    ] {
        assert!(content.contains_key(media), "{media}");
    }
    let headers: Vec<&str> = append["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["in"] == "header")
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    for name in [
        "ce-specversion",
        "ce-id",
        "ce-source",
        "ce-type",
        "Herald-Expected-Version",
    ] {
        assert!(headers.contains(&name), "{name}");
    }
    assert!(
        doc["paths"]["/all/live"]["get"]["responses"]["200"]["content"]
            .get("text/event-stream")
            .is_some()
    );

    // Every reference resolves.
    let text = reply.text;
    for reference in text.split("\"$ref\":\"").skip(1) {
        let target = reference.split('"').next().unwrap();
        let name = target.strip_prefix("#/components/schemas/").unwrap();
        assert!(
            doc["components"]["schemas"].get(name).is_some(),
            "{target} is not defined"
        );
    }
}
