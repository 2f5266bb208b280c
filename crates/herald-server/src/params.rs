//! Parsing of what a request says outside its body: the stream in the path, the expected
//! version header and the paging query, each with a typed `400` when it is wrong.

use axum::extract::Path;
use axum::extract::Query;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::http::HeaderMap;
use herald_core::{Direction, ExpectedVersion, StreamName};
use serde::Deserialize;

use crate::problem::Problem;
use crate::{EXPECTED_VERSION_HEADER, PAGE_EVENTS_DEFAULT, PAGE_EVENTS_MAX};

/// The stream named in the path.
pub(crate) fn stream_name(
    path: Result<Path<String>, PathRejection>,
) -> Result<StreamName, Problem> {
    let Path(name) = path.map_err(|rejection| {
        Problem::bad_request(
            "invalid-stream-name",
            "Invalid stream name",
            format!("the stream name in the path cannot be read: {rejection}"),
        )
    })?;
    StreamName::new(&name).map_err(|error| {
        Problem::bad_request(
            "invalid-stream-name",
            "Invalid stream name",
            error.to_string(),
        )
    })
}

/// The `Herald-Expected-Version` header; `any` when absent.
pub(crate) fn expected_version(headers: &HeaderMap) -> Result<ExpectedVersion, Problem> {
    let mut values = headers.get_all(EXPECTED_VERSION_HEADER).iter();
    let Some(value) = values.next() else {
        return Ok(ExpectedVersion::Any);
    };
    let invalid = |detail: String| {
        Problem::bad_request(
            "invalid-expected-version",
            "Invalid expected version",
            detail,
        )
    };
    if values.next().is_some() {
        return Err(invalid(format!(
            "the `{EXPECTED_VERSION_HEADER}` header is given more than once"
        )));
    }
    let text = value.to_str().map_err(|_| {
        invalid(format!(
            "the `{EXPECTED_VERSION_HEADER}` header is not visible ASCII"
        ))
    })?;
    text.trim()
        .parse()
        .map_err(|error: herald_core::stream::InvalidExpectedVersion| invalid(error.to_string()))
}

/// The paging query as given, every field as text so that each gets its own error.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct PageQuery {
    from: Option<String>,
    limit: Option<String>,
    direction: Option<String>,
}

/// A page request, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Page {
    /// The first version or position; `None`: the start in `direction`.
    pub(crate) from: Option<u64>,
    /// Events in the page, 1 to [`PAGE_EVENTS_MAX`].
    pub(crate) limit: usize,
    /// Which way to read.
    pub(crate) direction: Direction,
}

impl Page {
    /// Checks the query of a read.
    pub(crate) fn parse(query: Result<Query<PageQuery>, QueryRejection>) -> Result<Page, Problem> {
        let invalid = |detail: String| {
            Problem::bad_request("invalid-query", "Invalid query parameter", detail)
        };
        let Query(query) =
            query.map_err(|rejection| invalid(format!("the query cannot be read: {rejection}")))?;
        let from = match query.from.as_deref() {
            None => None,
            Some(text) => Some(text.parse::<u64>().map_err(|_| {
                invalid(format!(
                    "`from` is {text:?}: it must be a non-negative integer"
                ))
            })?),
        };
        let limit = match query.limit.as_deref() {
            None => PAGE_EVENTS_DEFAULT,
            Some(text) => match text.parse::<usize>() {
                Ok(limit) if (1..=PAGE_EVENTS_MAX).contains(&limit) => limit,
                _ => {
                    return Err(invalid(format!(
                        "`limit` is {text:?}: it must be an integer from 1 to {PAGE_EVENTS_MAX}"
                    )));
                }
            },
        };
        let direction = match query.direction.as_deref() {
            None | Some("forward") => Direction::Forward,
            Some("backward") => Direction::Backward,
            Some(other) => {
                return Err(invalid(format!(
                    "`direction` is {other:?}: it must be `forward` or `backward`"
                )));
            }
        };
        Ok(Page {
            from,
            limit,
            direction,
        })
    }
}
