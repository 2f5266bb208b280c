//! `POST /streams/{stream}`: one structured event, a batch, or one binary-mode event, appended
//! in one atomic store append.

use axum::body::{Body, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use herald_core::{Appended, Event};
use http_body_util::{BodyExt as _, LengthLimitError, Limited};
use serde::Serialize;
use utoipa::ToSchema;

use crate::AppState;
use crate::binary;
use crate::openapi::{CloudEvent, CloudEventBatch};
use crate::params::{expected_version, stream_name};
use crate::problem::Problem;

/// The media type of one event in the structured mode.
const STRUCTURED: &str = "application/cloudevents+json";
/// The media type of a batch.
const BATCH: &str = "application/cloudevents-batch+json";

/// The deepest nesting of arrays and objects accepted in a JSON body, counting the event
/// document itself and the batch array.
///
/// Anything stored must parse again with the usual JSON libraries (serde_json stops at 128
/// levels), and a parser of the body must never recurse without bound.
pub const JSON_DEPTH_MAX: usize = 64;

/// How the request carries its events, decided from its headers before the body is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Structured,
    Batch,
    Binary,
}

/// The `201` body: where each event was stored, in the order given.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Appended)]
pub(crate) struct AppendedDto {
    /// One entry per event of the request, in its order.
    events: Vec<AppendedEventDto>,
}

/// Where one appended event was stored.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = AppendedEvent)]
pub(crate) struct AppendedEventDto {
    /// The event's id.
    id: String,
    /// Its version within the stream.
    version: u64,
    /// Its position in the global log.
    position: u64,
}

/// Appends the request's events to the stream in the path.
#[utoipa::path(
    post,
    path = "/streams/{stream}",
    tag = "events",
    summary = "Append events to a stream",
    description = "One structured event, a batch (stored atomically: all or none) or one \
        binary-mode event: any other `Content-Type` with the `ce-specversion`, `ce-id`, \
        `ce-source` and `ce-type` headers, the body being the event's `data`. In binary mode \
        every other `ce-<name>` header is an attribute, percent-encoded as the CloudEvents \
        HTTP binding says. Re-sending an append that was stored is answered with the \
        original result and stores nothing.",
    params(
        ("stream" = String, Path, description = "The stream's name"),
        ("Herald-Expected-Version" = Option<String>, Header, description = "`any` (the \
            default), `no-stream`, `exists` or the version of the stream's last event: the \
            append is refused unless it holds"),
        ("ce-specversion" = Option<String>, Header, description = "Binary mode: `1.0`"),
        ("ce-id" = Option<String>, Header, description = "Binary mode: the event's id"),
        ("ce-source" = Option<String>, Header, description = "Binary mode: the event's source"),
        ("ce-type" = Option<String>, Header, description = "Binary mode: the event's type"),
        ("ce-subject" = Option<String>, Header, description = "Binary mode: the subject"),
        ("ce-time" = Option<String>, Header, description = "Binary mode: the time (RFC 3339)"),
        ("ce-dataschema" = Option<String>, Header, description = "Binary mode: the schema of \
            the data"),
    ),
    request_body(
        description = "The events, in one of three modes",
        content(
            (CloudEvent = "application/cloudevents+json"),
            (CloudEventBatch = "application/cloudevents-batch+json"),
            ("*/*"),
        ),
    ),
    responses(
        (status = 201, description = "Stored; `Location` points at the first event in the \
            stream", body = AppendedDto,
         headers(("Location" = String, description = "`/streams/{stream}?from=<version>`"))),
        (status = 400, description = "A malformed stream name, expected version or event, an \
            event id twice in the batch, an empty batch (`urn:herald:problem:invalid-event` \
            with `attribute` and `index`, `invalid-stream-name`, `invalid-expected-version`, \
            `duplicate-in-batch`, `empty-append`, `unreadable-body`)",
         body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The expected version does not hold, or an event id is \
            stored by another append (`urn:herald:problem:wrong-expected-version` with \
            `expected` and `actual`, `urn:herald:problem:duplicate-event-id`)",
         body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "The body or the append is larger than the limit \
            (`urn:herald:problem:body-too-large`, `urn:herald:problem:append-too-large`, with \
            `limit`)",
         body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Neither a CloudEvents media type nor binary-mode \
            headers (`urn:herald:problem:unsupported-media-type`)",
         body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The store is unavailable \
            (`urn:herald:problem:store-unavailable`)",
         body = Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn append(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    let stream = stream_name(path)?;
    let expected = expected_version(&headers)?;
    let mode = mode(&headers)?;
    let bytes = read_body(body, &headers, state.body_size_max_bytes).await?;
    if mode != Mode::Binary && !depth_within(&bytes, JSON_DEPTH_MAX) {
        return Err(Problem::invalid_event(
            &herald_core::event::Error::Invalid {
                attribute: "data".to_owned(),
                reason: format!("JSON nested deeper than {JSON_DEPTH_MAX} levels"),
            },
        ));
    }
    let events = match mode {
        Mode::Structured => vec![Event::from_json(&bytes).map_err(|e| Problem::invalid_event(&e))?],
        Mode::Batch => Event::batch_from_json(&bytes).map_err(|e| Problem::invalid_event(&e))?,
        Mode::Binary => {
            vec![binary::event(&headers, bytes).map_err(|e| Problem::invalid_event(&e))?]
        }
    };
    let appended = state
        .store
        .append(&stream, expected, events)
        .await
        .map_err(Problem::from_store)?;
    Ok(created(&stream, &appended))
}

fn created(stream: &herald_core::StreamName, appended: &Appended) -> Response {
    let dto = AppendedDto {
        events: appended
            .events
            .iter()
            .map(|event| AppendedEventDto {
                id: event.id.clone(),
                version: event.version.0,
                position: event.position.0,
            })
            .collect(),
    };
    let mut response = (StatusCode::CREATED, axum::Json(dto)).into_response();
    if let Some(first) = appended.events.first() {
        // Stream names are URL-safe by construction, so the location needs no escaping.
        let location = format!("/streams/{stream}?from={}", first.version.0);
        if let Ok(value) = HeaderValue::try_from(location) {
            response.headers_mut().insert(header::LOCATION, value);
        }
    }
    response
}

/// The essence of a media type (`type/subtype`, lowercase, without parameters).
pub(crate) fn essence(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

fn mode(headers: &HeaderMap) -> Result<Mode, Problem> {
    let content_type =
        match headers.get(header::CONTENT_TYPE) {
            None => None,
            Some(value) => Some(value.to_str().map_err(|_| {
                unsupported("the Content-Type header is not visible ASCII".to_owned())
            })?),
        };
    let essence = content_type.map(essence);
    match essence.as_deref() {
        Some(STRUCTURED) => Ok(Mode::Structured),
        Some(BATCH) => Ok(Mode::Batch),
        Some(other) if other.starts_with("application/cloudevents") => Err(unsupported(format!(
            "the event format `{other}` is not supported; use `{STRUCTURED}` or `{BATCH}`"
        ))),
        _ if headers.contains_key("ce-specversion") => Ok(Mode::Binary),
        Some(other) => Err(unsupported(format!(
            "`{other}` is not an event format: use `{STRUCTURED}`, `{BATCH}`, or binary mode \
             (`ce-specversion`, `ce-id`, `ce-source`, `ce-type` headers)"
        ))),
        None => Err(unsupported(format!(
            "the request has no Content-Type: use `{STRUCTURED}`, `{BATCH}`, or binary mode \
             (`ce-specversion`, `ce-id`, `ce-source`, `ce-type` headers)"
        ))),
    }
}

fn unsupported(detail: String) -> Problem {
    Problem::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported-media-type",
        "Unsupported media type",
        detail,
    )
}

/// Reads the body, refusing it as soon as it is known to exceed `limit_bytes`: from its
/// `Content-Length` before reading anything, or while reading a body of unknown length.
async fn read_body(body: Body, headers: &HeaderMap, limit_bytes: usize) -> Result<Bytes, Problem> {
    let too_large = || {
        Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body-too-large",
            "Request body too large",
            format!("the request body is larger than the limit of {limit_bytes} bytes"),
        )
        .with("limit", limit_bytes as u64)
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|text| text.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit_bytes as u64) {
        return Err(too_large());
    }
    match Limited::new(body, limit_bytes).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.is::<LengthLimitError>() => Err(too_large()),
        Err(error) => Err(Problem::bad_request(
            "unreadable-body",
            "Unreadable request body",
            format!("the request body cannot be read: {error}"),
        )),
    }
}

/// Whether `json` nests arrays and objects at most `depth_max` deep. Brackets inside strings
/// do not count. A linear scan, without recursion, so hostile input cannot exhaust the stack.
pub(crate) fn depth_within(json: &[u8], depth_max: usize) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &byte in json {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > depth_max {
                    return false;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_counts_brackets_outside_strings_only() {
        assert!(depth_within(br#"{"a":[1,{"b":2}]}"#, 3));
        assert!(!depth_within(br#"{"a":[1,{"b":2}]}"#, 2));
        assert!(depth_within(br#"{"a":"[[[[[[\"[[["}"#, 1));
        assert!(!depth_within(&[b'['; 65], JSON_DEPTH_MAX));
        assert!(depth_within(&[b'['; 64], JSON_DEPTH_MAX));
    }
}
