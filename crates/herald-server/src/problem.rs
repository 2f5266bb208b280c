//! Errors as `application/problem+json` documents (RFC 9457), and the one place that decides
//! which status each store and envelope error gets.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use herald_core::event;
use herald_core::store;
use serde_json::{Map, Value, json};

/// The media type of every error response.
pub(crate) const PROBLEM_JSON: &str = "application/problem+json";

/// One problem document: `type`, `title`, `status`, `detail`, plus extension members.
#[derive(Debug)]
pub(crate) struct Problem {
    status: StatusCode,
    kind: &'static str,
    title: &'static str,
    detail: String,
    members: Map<String, Value>,
}

impl Problem {
    /// A problem of `kind` (the last segment of its `type` URI).
    pub(crate) fn new(
        status: StatusCode,
        kind: &'static str,
        title: &'static str,
        detail: String,
    ) -> Self {
        Problem {
            status,
            kind,
            title,
            detail,
            members: Map::new(),
        }
    }

    /// Adds an extension member, e.g. the stream's actual version.
    pub(crate) fn with(mut self, name: &str, value: impl Into<Value>) -> Self {
        self.members.insert(name.to_owned(), value.into());
        self
    }

    /// A bad request whose fault is in the request line or headers.
    pub(crate) fn bad_request(kind: &'static str, title: &'static str, detail: String) -> Self {
        Problem::new(StatusCode::BAD_REQUEST, kind, title, detail)
    }

    /// An envelope that is not a valid CloudEvent: which attribute, and why.
    pub(crate) fn invalid_event(error: &event::Error) -> Self {
        let mut problem =
            Problem::bad_request("invalid-event", "Invalid CloudEvent", error.to_string());
        let mut current = error;
        loop {
            match current {
                event::Error::InBatch { index, error } => {
                    problem = problem.with("index", *index as u64);
                    current = error;
                }
                event::Error::Missing { attribute } => {
                    return problem.with("attribute", *attribute);
                }
                event::Error::Invalid { attribute, .. } => {
                    return problem.with("attribute", attribute.as_str());
                }
                event::Error::Syntax { line, column, .. } => {
                    return problem
                        .with("line", *line as u64)
                        .with("column", *column as u64);
                }
                _ => return problem,
            }
        }
    }

    /// The status and detail of a store error.
    pub(crate) fn from_store(error: store::Error) -> Self {
        let detail = error.to_string();
        match error {
            store::Error::WrongExpectedVersion {
                expected, actual, ..
            } => Problem::new(
                StatusCode::CONFLICT,
                "wrong-expected-version",
                "Wrong expected version",
                detail,
            )
            .with("expected", expected.to_string())
            .with("actual", actual.map(|version| version.0)),
            store::Error::DuplicateEventId { id, .. } => Problem::new(
                StatusCode::CONFLICT,
                "duplicate-event-id",
                "Event id already stored",
                detail,
            )
            .with("id", id),
            store::Error::DuplicateInBatch { id } => Problem::bad_request(
                "duplicate-in-batch",
                "Event id repeated in the batch",
                detail,
            )
            .with("id", id),
            store::Error::StreamNotFound { .. } => Problem::new(
                StatusCode::NOT_FOUND,
                "stream-not-found",
                "Stream not found",
                detail,
            ),
            store::Error::StreamDeleted { .. } => Problem::new(
                StatusCode::NOT_FOUND,
                "stream-deleted",
                "Stream deleted",
                detail,
            ),
            store::Error::InvalidEvent { index, error } => {
                Problem::invalid_event(&error).with("index", index as u64)
            }
            store::Error::EmptyAppend => {
                Problem::bad_request("empty-append", "Empty append", detail)
            }
            store::Error::AppendTooLarge { limit, .. } => Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "append-too-large",
                "Append too large",
                detail,
            )
            .with("limit", limit),
            store::Error::Closed | store::Error::Failed(_) => Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store-unavailable",
                "Store unavailable",
                detail,
            ),
            other => {
                tracing::error!(error = %other, "the store failed");
                Problem::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "store-failed",
                    "Store failed",
                    detail,
                )
            }
        }
    }
}

impl Problem {
    /// The `detail` member.
    pub(crate) fn detail(&self) -> &str {
        &self.detail
    }

    /// The problem document, as one line of JSON.
    pub(crate) fn to_json(&self) -> String {
        let mut body = Map::new();
        body.insert(
            "type".to_owned(),
            json!(format!("urn:herald:problem:{}", self.kind)),
        );
        body.insert("title".to_owned(), json!(self.title));
        body.insert("status".to_owned(), json!(self.status.as_u16()));
        body.insert("detail".to_owned(), json!(self.detail));
        for (name, value) in &self.members {
            body.entry(name.clone()).or_insert_with(|| value.clone());
        }
        Value::Object(body).to_string()
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let mut response = (self.status, self.to_json()).into_response();
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        response
    }
}
