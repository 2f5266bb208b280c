//! `GET /streams/{stream}`, `GET /all` (pages of structured CloudEvents with their version
//! and position, and a link to the next page) and `DELETE /streams/{stream}`.

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use herald_core::{Direction, Event, Position, RecordedEvent, Version};
use serde::Serialize;

use crate::AppState;
use crate::params::{Page, PageQuery, expected_version, stream_name};
use crate::problem::Problem;

/// One page of a read.
#[derive(Debug, Serialize)]
struct PageDto<'a> {
    events: Vec<RecordDto<'a>>,
    /// The path and query of the next page; `null` when this page reached the end.
    next: Option<String>,
}

/// One stored event: the structured CloudEvent and where it sits.
#[derive(Debug, Serialize)]
struct RecordDto<'a> {
    stream: &'a str,
    version: u64,
    position: u64,
    recorded_at: &'a DateTime<Utc>,
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
