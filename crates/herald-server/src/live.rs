//! `GET /all/live` and `GET /streams/{stream}/live`: a subscription of the store as
//! Server-Sent Events, catch-up then live, resumable with `Last-Event-ID`.
//!
//! The SSE `id:` of an event is its global position on `/all/live` and its stream version on
//! `/streams/{stream}/live`: the number a reconnecting client needs to resume right after
//! it. The `data:` is one line of JSON, the record of the paged reads. The response ends
//! when the server shuts down, when the client goes, or after an SSE event named `error`
//! carrying the problem document of a store failure.

use std::time::Duration;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt as _;
use herald_core::store::{self, Subscription};
use herald_core::{Direction, Position, RecordedEvent, Version};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::AppState;
use crate::params::stream_name;
use crate::problem::Problem;
use crate::read::RecordDto;

/// How often a live response sends a keep-alive comment while no event comes, in seconds.
pub const LIVE_KEEP_ALIVE_INTERVAL_SECS: u64 = 15;

/// The request header of a reconnecting SSE client: the `id:` of the last event it received.
pub const LAST_EVENT_ID_HEADER: &str = "last-event-id";

/// The name of the SSE event that ends a live response after a store failure.
const ERROR_EVENT: &str = "error";

/// The query of a live request, as text so that a malformed `from` gets its own error.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct LiveQuery {
    from: Option<String>,
}

/// The global log, live.
#[utoipa::path(
    get,
    path = "/all/live",
    tag = "live",
    summary = "Follow the global log",
    description = "Every event from `from` in order, first those stored, then new ones as \
        they are appended, as Server-Sent Events. Each event's `id:` is its global position, \
        its `data:` one line of JSON (a `Record`). Reconnecting with `Last-Event-ID` resumes \
        right after that position, without gap or duplicate. A store failure ends the \
        response with an event named `error` whose data is a `Problem`; keep-alive comments \
        come while nothing happens.",
    params(
        ("from" = Option<u64>, Query, description = "The first position; default 0"),
        ("Last-Event-ID" = Option<u64>, Header, description = "The last position received: \
            resume after it (wins over `from`)"),
    ),
    responses(
        (status = 200, description = "A stream of Server-Sent Events whose data are records",
         content((RecordDto = "text/event-stream"))),
        (status = 400, description = "A malformed `from` or `Last-Event-ID` \
            (`urn:herald:problem:invalid-query`, `urn:herald:problem:invalid-last-event-id`)",
         body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The store is unavailable \
            (`urn:herald:problem:store-unavailable`)",
         body = Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn live_all(
    State(state): State<AppState>,
    query: Result<Query<LiveQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let from = start(query, &headers)?;
    let subscription = state
        .store
        .subscribe_all(Position(from))
        .await
        .map_err(Problem::from_store)?;
    Ok(respond(
        subscription,
        |record| record.position.0,
        &state.stopping,
    ))
}

/// One stream, live.
#[utoipa::path(
    get,
    path = "/streams/{stream}/live",
    tag = "live",
    summary = "Follow a stream",
    description = "Every event of the stream from version `from` in order, first those \
        stored, then new ones as they are appended, as Server-Sent Events. Each event's `id:` \
        is its stream version, its `data:` one line of JSON (a `Record`). Reconnecting with \
        `Last-Event-ID` resumes right after that version. A stream that does not exist yet is \
        waited for; a deleted one is `404`. A store failure ends the response with an event \
        named `error` whose data is a `Problem`.",
    params(
        ("stream" = String, Path, description = "The stream's name"),
        ("from" = Option<u64>, Query, description = "The first version; default 0"),
        ("Last-Event-ID" = Option<u64>, Header, description = "The last version received: \
            resume after it (wins over `from`)"),
    ),
    responses(
        (status = 200, description = "A stream of Server-Sent Events whose data are records",
         content((RecordDto = "text/event-stream"))),
        (status = 400, description = "A malformed stream name, `from` or `Last-Event-ID` \
            (`urn:herald:problem:invalid-stream-name`, `urn:herald:problem:invalid-query`, \
            `urn:herald:problem:invalid-last-event-id`)",
         body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "The stream is deleted \
            (`urn:herald:problem:stream-deleted`)",
         body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The store is unavailable \
            (`urn:herald:problem:store-unavailable`)",
         body = Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn live_stream(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<LiveQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let stream = stream_name(path)?;
    let from = start(query, &headers)?;
    // Subscriptions wait for a stream to (re)appear, but following a deleted one is almost
    // always a mistake: say so now, as a read would, while a status can still be sent.
    match state
        .store
        .read_stream(&stream, Version(0), Direction::Forward, 1)
        .await
    {
        Ok(_) | Err(store::Error::StreamNotFound { .. }) => {}
        Err(error) => return Err(Problem::from_store(error)),
    }
    let subscription = state
        .store
        .subscribe_stream(&stream, Version(from))
        .await
        .map_err(Problem::from_store)?;
    Ok(respond(
        subscription,
        |record| record.version.0,
        &state.stopping,
    ))
}

/// Where a live request starts: right after `Last-Event-ID` when given, else at `from`, else
/// at 0.
fn start(
    query: Result<Query<LiveQuery>, QueryRejection>,
    headers: &HeaderMap,
) -> Result<u64, Problem> {
    let Query(query) = query.map_err(|rejection| {
        Problem::bad_request(
            "invalid-query",
            "Invalid query parameter",
            format!("the query cannot be read: {rejection}"),
        )
    })?;
    // Checked even when `Last-Event-ID` wins, so that a wrong request is never half-used.
    let from = match query.from.as_deref() {
        None => 0,
        Some(text) => text.parse::<u64>().map_err(|_| {
            Problem::bad_request(
                "invalid-query",
                "Invalid query parameter",
                format!("`from` is {text:?}: it must be a non-negative integer"),
            )
        })?,
    };
    let mut values = headers.get_all(LAST_EVENT_ID_HEADER).iter();
    let Some(value) = values.next() else {
        return Ok(from);
    };
    let invalid = |detail: String| {
        Problem::bad_request("invalid-last-event-id", "Invalid Last-Event-ID", detail)
    };
    if values.next().is_some() {
        return Err(invalid(
            "the `Last-Event-ID` header is given more than once".to_owned(),
        ));
    }
    let text = value
        .to_str()
        .map_err(|_| invalid("the `Last-Event-ID` header is not visible ASCII".to_owned()))?;
    let last = text.trim().parse::<u64>().map_err(|_| {
        invalid(format!(
            "`Last-Event-ID` is {text:?}: it must be the `id` of an event this endpoint sent, \
             a non-negative integer"
        ))
    })?;
    last.checked_add(1)
        .ok_or_else(|| invalid(format!("no event can follow `Last-Event-ID` {last}")))
}

/// The SSE response of a subscription; `id` gives an event's SSE id.
fn respond(
    subscription: Subscription,
    id: fn(&RecordedEvent) -> u64,
    stopping: &CancellationToken,
) -> Response {
    // `Some(subscription)` while it can yield more; `None` once an error was sent.
    let events = futures::stream::unfold(Some(subscription), move |subscription| async move {
        let mut subscription = subscription?;
        match subscription.next().await? {
            Ok(record) => {
                let event = SseEvent::default()
                    .id(id(&record).to_string())
                    .json_data(RecordDto::from(&record));
                Some((event, Some(subscription)))
            }
            Err(error) => {
                let problem = Problem::from_store(error);
                tracing::warn!(detail = %problem.detail(), "a live response ends on a store error");
                let event = SseEvent::default()
                    .event(ERROR_EVENT)
                    .data(problem.to_json());
                Some((Ok(event), None))
            }
        }
    })
    .take_until(stopping.clone().cancelled_owned());
    Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(LIVE_KEEP_ALIVE_INTERVAL_SECS)))
        .into_response()
}
