//! `GET /streams/{stream}`, `GET /all` (pages of structured CloudEvents with their version
//! and position, and a link to the next page) and `DELETE /streams/{stream}`.

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use herald_core::{Direction, Event, Position, RecordedEvent, Version};
use serde::Serialize;
use utoipa::ToSchema;

use crate::AppState;
use crate::openapi::CloudEvent;
use crate::params::{Page, PageQuery, expected_version, stream_name};
use crate::problem::Problem;

/// One page of a read.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Page)]
pub(crate) struct PageDto<'a> {
    /// The events of the page, in the order read.
    events: Vec<RecordDto<'a>>,
    /// The path and query of the next page; `null` when this page reached the end.
    next: Option<String>,
}

/// One stored event: the structured CloudEvent and where it sits. A page holds these, and
/// the `data:` of a live event is one of these.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Record)]
pub(crate) struct RecordDto<'a> {
    /// The stream the event belongs to.
    stream: &'a str,
    /// Its version within the stream, from 0.
    version: u64,
    /// Its position in the global log, from 0.
    position: u64,
    /// When the store accepted it.
    #[schema(value_type = String, format = DateTime)]
    recorded_at: &'a DateTime<Utc>,
    /// The event, exactly as appended.
    #[schema(value_type = CloudEvent)]
    event: &'a Event,
}

impl<'a> From<&'a RecordedEvent> for RecordDto<'a> {
    fn from(record: &'a RecordedEvent) -> Self {
        RecordDto {
            stream: record.stream.as_str(),
            version: record.version.0,
            position: record.position.0,
            recorded_at: &record.recorded_at,
            event: &record.event,
        }
    }
}

/// A page of one stream.
#[utoipa::path(
    get,
    path = "/streams/{stream}",
    tag = "events",
    summary = "Read a page of a stream",
    params(
        ("stream" = String, Path, description = "The stream's name"),
        ("from" = Option<u64>, Query, description = "The first version to read; default: the \
            first one forward, the last one backward"),
        ("limit" = Option<usize>, Query, minimum = 1, maximum = 1000,
         description = "Events in the page, 1 to 1000; default 100"),
        ("direction" = Option<String>, Query, description = "`forward` (the default) or `backward`"),
    ),
    responses(
        (status = 200, description = "A page; `next` links to the next one", body = PageDto),
        (status = 400, description = "A malformed stream name or query \
            (`urn:herald:problem:invalid-stream-name`, `urn:herald:problem:invalid-query`)",
         body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "The stream has no events or is deleted \
            (`urn:herald:problem:stream-not-found`, `urn:herald:problem:stream-deleted`)",
         body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The store is unavailable \
            (`urn:herald:problem:store-unavailable`)",
         body = Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn read_stream(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Response, Problem> {
    let stream = stream_name(path)?;
    let page = Page::parse(query)?;
    let from = Version(page.from.unwrap_or(start(page.direction)));
    let records = state
        .store
        .read_stream(&stream, from, page.direction, page.limit)
        .await
        .map_err(Problem::from_store)?;
    let next = next_from(
        &page,
        records.last().map(|record| record.version.0),
        records.len(),
    )
    .map(|from| link(&format!("/streams/{stream}"), from, &page));
    Ok(page_response(&records, next))
}

/// A page of the global log.
#[utoipa::path(
    get,
    path = "/all",
    tag = "events",
    summary = "Read a page of the global log",
    params(
        ("from" = Option<u64>, Query, description = "The first position to read; default: the \
            first one forward, the last one backward"),
        ("limit" = Option<usize>, Query, minimum = 1, maximum = 1000,
         description = "Events in the page, 1 to 1000; default 100"),
        ("direction" = Option<String>, Query, description = "`forward` (the default) or `backward`"),
    ),
    responses(
        (status = 200, description = "A page; `next` links to the next one", body = PageDto),
        (status = 400, description = "A malformed query (`urn:herald:problem:invalid-query`)",
         body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The store is unavailable \
            (`urn:herald:problem:store-unavailable`)",
         body = Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn read_all(
    State(state): State<AppState>,
    query: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Response, Problem> {
    let page = Page::parse(query)?;
    let from = Position(page.from.unwrap_or(start(page.direction)));
    let records = state
        .store
        .read_all(from, page.direction, page.limit)
        .await
        .map_err(Problem::from_store)?;
    let next = next_from(
        &page,
        records.last().map(|record| record.position.0),
        records.len(),
    )
    .map(|from| link("/all", from, &page));
    Ok(page_response(&records, next))
}

/// Soft-deletes a stream, honouring `Herald-Expected-Version`.
#[utoipa::path(
    delete,
    path = "/streams/{stream}",
    tag = "events",
    summary = "Soft-delete a stream",
    description = "The stream then reads as `404`; its events stay in the global log. \
                   Appending to it again revives it.",
    params(
        ("stream" = String, Path, description = "The stream's name"),
        ("Herald-Expected-Version" = Option<String>, Header, description = "`any` (the \
            default), `exists` or a version number: the delete is refused unless it holds"),
    ),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "A malformed stream name or expected version \
            (`urn:herald:problem:invalid-stream-name`, \
            `urn:herald:problem:invalid-expected-version`)",
         body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Nothing to delete \
            (`urn:herald:problem:stream-not-found`, `urn:herald:problem:stream-deleted`)",
         body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The expected version does not hold \
            (`urn:herald:problem:wrong-expected-version`, with `expected` and `actual`)",
         body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The store is unavailable \
            (`urn:herald:problem:store-unavailable`)",
         body = Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn delete_stream(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<StatusCode, Problem> {
    let stream = stream_name(path)?;
    let expected = expected_version(&headers)?;
    state
        .store
        .delete_stream(&stream, expected)
        .await
        .map_err(Problem::from_store)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Where a read without `from` starts.
fn start(direction: Direction) -> u64 {
    match direction {
        Direction::Forward => 0,
        Direction::Backward => u64::MAX,
    }
}

/// The `from` of the next page, when this one was full and there can be more.
fn next_from(page: &Page, last: Option<u64>, len: usize) -> Option<u64> {
    if len < page.limit {
        return None;
    }
    let last = last?;
    match page.direction {
        Direction::Forward => last.checked_add(1),
        Direction::Backward => last.checked_sub(1),
    }
}

fn link(path: &str, from: u64, page: &Page) -> String {
    let direction = match page.direction {
        Direction::Forward => "forward",
        Direction::Backward => "backward",
    };
    format!(
        "{path}?from={from}&limit={}&direction={direction}",
        page.limit
    )
}

fn page_response(records: &[RecordedEvent], next: Option<String>) -> Response {
    let dto = PageDto {
        events: records.iter().map(RecordDto::from).collect(),
        next,
    };
    axum::Json(dto).into_response()
}
