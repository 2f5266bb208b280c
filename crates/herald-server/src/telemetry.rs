//! Prometheus metrics: the process-global recorder, the middleware that counts and times every
//! request, and `GET /metrics`.
//!
//! The recorder is the one global recorder of the [`metrics`] facade, installed once per
//! process: whatever records through the facade (the server, the consumer runtime, a store)
//! is rendered by `/metrics`. Label values come from closed sets (the route templates of
//! [`ROUTES`](crate::ROUTES), the standard methods, the status codes), so that requests cannot
//! grow the number of series. The route templates of
//! [`Server::with_routes`](crate::Server::with_routes) are a closed set too: the label is the
//! matched template, never the request's path.

use std::convert::Infallible;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::AppState;
use crate::problem::Problem;

/// The counter of requests, labelled `method`, `route` and `status`.
pub const HTTP_REQUESTS_TOTAL: &str = "herald_http_requests_total";

/// The histogram of request durations in seconds, until the response head, labelled
/// `method` and `route`.
pub const HTTP_REQUEST_DURATION_SECONDS: &str = "herald_http_request_duration_seconds";

/// The bucket bounds, in seconds, of every histogram whose name ends in `_seconds`.
pub const DURATION_BUCKETS_SECONDS: &[f64] = &[
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// How often a running [`Server`](crate::Server) drains the recorder's histogram samples into
/// their buckets, in seconds; without it, samples pile up until the next scrape.
pub const METRICS_UPKEEP_INTERVAL_SECS: u64 = 5;

/// The `route` label of a request that matched no route.
const ROUTE_UNMATCHED: &str = "unmatched";

/// The media type of the Prometheus text exposition format.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Installs Herald's Prometheus recorder as the process-global [`metrics`] recorder, once,
/// and returns its handle; later calls return the same handle.
///
/// `None` when another recorder was installed first (by something other than this
/// function): `/metrics` then answers `503`, unless the server is given that recorder's
/// handle ([`Server::with_metrics`](crate::Server::with_metrics),
/// [`router_with_metrics`](crate::router_with_metrics)). Call this early in `main`, before
/// other components record, so that nothing recorded is lost.
pub fn install_metrics() -> Option<PrometheusHandle> {
    static INSTALLED: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            let installed = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Suffix("_seconds".to_owned()),
                    DURATION_BUCKETS_SECONDS,
                )
                .and_then(PrometheusBuilder::install_recorder);
            match installed {
                Ok(handle) => {
                    describe();
                    Some(handle)
                }
                Err(error) => {
                    tracing::warn!(%error, "another metrics recorder is installed; /metrics is unavailable");
                    None
                }
            }
        })
        .clone()
}

/// Describes the server's metrics to the global recorder (their `# HELP` lines).
pub(crate) fn describe() {
    metrics::describe_counter!(
        HTTP_REQUESTS_TOTAL,
        "HTTP requests answered, by method, route template and status"
    );
    metrics::describe_histogram!(
        HTTP_REQUEST_DURATION_SECONDS,
        metrics::Unit::Seconds,
        "Time to answer an HTTP request up to the response head, by method and route template"
    );
}

/// Runs the recorder's upkeep every [`METRICS_UPKEEP_INTERVAL_SECS`]; never returns, so it is
/// raced against the server and dropped with it.
pub(crate) async fn upkeep(metrics: Option<PrometheusHandle>) -> Infallible {
    let Some(handle) = metrics else {
        return std::future::pending().await;
    };
    let mut interval = tokio::time::interval(Duration::from_secs(METRICS_UPKEEP_INTERVAL_SECS));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        handle.run_upkeep();
    }
}

/// Counts and times one request.
pub(crate) async fn record(request: Request, next: Next) -> Response {
    let method = method_label(request.method());
    // A matched path is the template of a route of the router (of `ROUTES`, or added with
    // `Server::with_routes`), never the request's own path: the set stays closed.
    let route: metrics::SharedString = match request.extensions().get::<MatchedPath>() {
        Some(matched) => match crate::ROUTES.iter().find(|r| r.path == matched.as_str()) {
            Some(route) => route.path.into(),
            None => matched.as_str().to_owned().into(),
        },
        None => ROUTE_UNMATCHED.into(),
    };
    let started = Instant::now();
    let response = next.run(request).await;
    let elapsed = started.elapsed();
    metrics::counter!(
        HTTP_REQUESTS_TOTAL,
        "method" => method,
        "route" => route.clone(),
        "status" => response.status().as_str().to_owned(),
    )
    .increment(1);
    metrics::histogram!(
        HTTP_REQUEST_DURATION_SECONDS,
        "method" => method,
        "route" => route,
    )
    .record(elapsed.as_secs_f64());
    response
}

/// `GET /metrics`: the recorder's metrics in the Prometheus text format.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    summary = "Prometheus metrics of the process",
    description = "Every metric recorded in the process, in the Prometheus text exposition \
                   format 0.0.4: the server's `herald_http_requests_total` and \
                   `herald_http_request_duration_seconds`, and those of the other components.",
    responses(
        (status = 200, description = "The metrics", body = String, content_type = "text/plain; version=0.0.4"),
        (status = 503, description = "Another kind of metrics recorder is installed in the \
                                      process (`urn:herald:problem:metrics-unavailable`)",
         body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["read"])),
)]
pub(crate) async fn metrics(State(state): State<AppState>) -> Response {
    match &state.metrics {
        Some(handle) => {
            let mut response = handle.render().into_response();
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(PROMETHEUS_TEXT),
            );
            response
        }
        None => Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics-unavailable",
            "Metrics unavailable",
            "another metrics recorder is installed in this process; give the server its handle"
                .to_owned(),
        )
        .into_response(),
    }
}

/// The `method` label: one of the standard methods, or `other`.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_come_from_closed_sets() {
        assert_eq!(method_label(&Method::POST), "POST");
        assert_eq!(method_label(&Method::from_bytes(b"BREW").unwrap()), "other");
    }
}
