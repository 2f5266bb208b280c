//! Errors of the order API as `application/problem+json` documents (RFC 9457), in the same
//! shape as the event API's: `type` (`urn:herald:problem:<kind>`), `title`, `status`,
//! `detail`, and extension members.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

/// The media type of every error response.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// One problem document.
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
        detail: impl Into<String>,
    ) -> Self {
        Problem {
            status,
            kind,
            title,
            detail: detail.into(),
            members: Map::new(),
        }
    }

    /// Adds an extension member.
    pub(crate) fn with(mut self, name: &str, value: impl Into<Value>) -> Self {
        self.members.insert(name.to_owned(), value.into());
        self
    }

    /// A `400` whose fault is in the request line, headers or syntax.
    pub(crate) fn bad_request(
        kind: &'static str,
        title: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        Problem::new(StatusCode::BAD_REQUEST, kind, title, detail)
    }

    /// A failure of the system itself: `503` while it shuts down, `500` otherwise (logged).
    pub(crate) fn internal(error: &(dyn std::error::Error + 'static)) -> Self {
        if matches!(
            error.downcast_ref::<crate::db::Error>(),
            Some(crate::db::Error::Closed)
        ) {
            return Problem::stopping();
        }
        tracing::error!(error = %error, cause = ?std::error::Error::source(error), "an order API request failed");
        Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Internal server error",
            "the order system failed to answer the request",
        )
    }

    /// `503`: the order system is shutting down.
    pub(crate) fn stopping() -> Self {
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "Service unavailable",
            "the order system is shutting down",
        )
    }

    fn to_json(&self) -> String {
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
