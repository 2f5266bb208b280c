//! Herald's HTTP server: the event API over any [`EventStore`], speaking CloudEvents, so that a
//! service in any language (or a webhook of an external system) can append, read and follow
//! events without a Rust client.
//!
//! # Endpoints
//!
//! Every route is listed in [`ROUTES`], with who may call it; `GET /openapi.json` describes
//! each one (parameters, bodies, responses and their problem types).
//!
//! | method and path                | what it does                                            | token |
//! |--------------------------------|---------------------------------------------------------|-------|
//! | `POST /streams/{stream}`       | appends one event, a batch (atomically) or a binary-mode event | write |
//! | `GET /streams/{stream}`        | a page of the stream: `?from=&limit=&direction=`         | read  |
//! | `DELETE /streams/{stream}`     | soft-deletes the stream                                 | write |
//! | `GET /streams/{stream}/live`   | the stream as Server-Sent Events, catch-up then live: `?from=` | read |
//! | `GET /all`                     | a page of the global log: `?from=&limit=&direction=`    | read  |
//! | `GET /all/live`                | the global log as Server-Sent Events, catch-up then live: `?from=` | read |
//! | `GET /metrics`                 | Prometheus metrics of the process                       | read  |
//! | `GET /openapi.json`            | the OpenAPI 3.1 description of this API                 | read  |
//! | `GET /healthz`                 | the process is up                                       | none  |
//! | `GET /readyz`                  | the store answers                                       | none  |
//!
//! # Contract
//!
//! - An append MUST be one atomic [`EventStore::append`]: a request stores all of its events
//!   or none. `201 Created` MUST only be sent once the store acknowledged the append.
//! - `Herald-Expected-Version` (`any`, the default, `no-stream`, `exists` or a number) MUST be
//!   passed to the store unchanged; a wrong one is `409` with the stream's actual version.
//! - Every error MUST be an `application/problem+json` document (RFC 9457) with `type`,
//!   `title`, `status` and a `detail` that says what is wrong; a request rejected with a `4xx`
//!   MUST have stored nothing.
//! - A request body MUST NOT be buffered beyond [`ServerOptions::body_size_max_bytes`]: a
//!   larger one is `413` before or while it is read.
//! - A page MUST hold at most [`PAGE_EVENTS_MAX`] events.
//! - JSON bodies MUST nest at most [`JSON_DEPTH_MAX`] levels, checked by a scan before any
//!   parser runs, so that hostile input cannot exhaust the stack and everything stored parses
//!   again with ordinary JSON libraries; a binary-mode `ce-*` header MUST be at most
//!   [`ATTRIBUTE_HEADER_LEN_MAX_BYTES`] long.
//! - On shutdown the server MUST stop accepting connections, end the live responses, then
//!   answer the requests in flight before [`Server::run`] returns.
//!
//! # Live streams
//!
//! `GET /all/live` and `GET /streams/{stream}/live` answer `text/event-stream`: every event
//! from `from` (default 0) in order, first those already stored, then new ones as they are
//! appended, with no gap and no duplicate (the [`EventStore`] subscription contract). Each SSE
//! event's `data:` is one line of JSON, one record exactly as in the pages of the paged reads
//! (`stream`, `version`, `position`, `recorded_at`, `event`), and its `id:` is the event's
//! **global position** on `/all/live` and its **stream version** on
//! `/streams/{stream}/live`. A client that reconnects with `Last-Event-ID` MUST get exactly
//! the events after that id; the header wins over `from`. A malformed `from` or
//! `Last-Event-ID` is `400` before the response starts; following a deleted stream is `404`,
//! one that does not exist yet is waited for. An error of the store after the response
//! started ends it with an SSE event named `error` whose data is the problem document.
//! Comments are sent every [`LIVE_KEEP_ALIVE_INTERVAL_SECS`] while nothing happens, so that
//! proxies keep the connection and clients notice a dead one.
//!
//! A live response never buffers ahead of its client: the subscription is polled only when
//! the connection can take more (hyper stops polling a response body while its write buffer
//! is full), and the stores read a subscription a page at a time, so a slow client costs a
//! bounded amount of memory however far behind it falls.
//!
//! # Authentication
//!
//! With [`ServerOptions::tokens`] empty (the default) every endpoint is open. Otherwise a
//! request MUST carry `Authorization: Bearer <token>` naming one of them: without one, or with
//! an unknown one, it is `401` with `WWW-Authenticate: Bearer`; a [`Scope::Read`] token on an
//! endpoint that writes is `403`. Both are decided before the body is read, so nothing is
//! stored. Tokens are compared in constant time. `/healthz` and `/readyz` stay open: load
//! balancers and orchestrators probe them without credentials, and they reveal nothing but
//! that the process and its store answer.
//!
//! # Metrics
//!
//! Every request is counted in `herald_http_requests_total{method,route,status}` and timed in
//! the histogram `herald_http_request_duration_seconds{method,route}` (until the response
//! head is sent; a live response counts once, when it starts). `route` is the matched route
//! template, e.g. `/streams/{stream}`, or `unmatched`, and `method` is one of the standard
//! methods or `other`, so that no request can add a label value. The recorder is the
//! process-global one of the [`metrics`] facade (see [`install_metrics`]), so that every
//! component of the process that records metrics is served on `/metrics` too.
//!
//! # Extra routes
//!
//! An application that embeds the server can serve its own routes next to the event API with
//! [`Server::with_routes`]: they get the same layers (tracing, metrics labelled with their
//! route template, catch-panic, bearer authentication) and the server's problem+json
//! fallbacks. They are not in [`ROUTES`] nor in `/openapi.json`, which describe the event API
//! only: the application documents its own routes. Their access is derived from the method:
//! `GET` and `HEAD` need a read token, any other method a write token.
//!
//! **API Boundary:** the server knows only the [`EventStore`] trait of `herald-core`; which
//! store backs it (the embedded log, or another) is the caller's choice.

#![forbid(unsafe_code)]

mod append;
mod auth;
mod binary;
mod live;
mod openapi;
mod params;
mod problem;
mod read;
mod telemetry;

pub use append::JSON_DEPTH_MAX;
pub use binary::ATTRIBUTE_HEADER_LEN_MAX_BYTES;
pub use live::{LAST_EVENT_ID_HEADER, LIVE_KEEP_ALIVE_INTERVAL_SECS};
pub use metrics_exporter_prometheus::PrometheusHandle;
pub use openapi::openapi;
pub use telemetry::{
    DURATION_BUCKETS_SECONDS, HTTP_REQUEST_DURATION_SECONDS, HTTP_REQUESTS_TOTAL,
    METRICS_UPKEEP_INTERVAL_SECS, install_metrics,
};

use std::future::{Future, IntoFuture as _};
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use herald_core::EventStore;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;

use crate::problem::Problem;

/// The default of [`ServerOptions::body_size_max_bytes`]: 4 MiB.
pub const BODY_SIZE_MAX_BYTES_DEFAULT: usize = 4 * 1024 * 1024;

/// The default of [`ServerOptions::listen`]: loopback only, so that a demo is never exposed.
pub const LISTEN_DEFAULT: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 8080);

/// The most events one page of a read holds; a larger `limit` is rejected with `400`.
pub const PAGE_EVENTS_MAX: usize = 1000;

/// The events in a page when the request gives no `limit`.
pub const PAGE_EVENTS_DEFAULT: usize = 100;

/// The request header carrying an append's or a delete's expected version.
pub const EXPECTED_VERSION_HEADER: &str = "herald-expected-version";

/// How the server is configured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerOptions {
    /// The address to listen on; port 0 picks a free port ([`Server::local_addr`] tells it).
    pub listen: SocketAddr,
    /// The largest request body accepted, in bytes; a larger one gets `413`.
    pub body_size_max_bytes: usize,
    /// Bearer tokens accepted; empty (the default) turns authentication off.
    pub tokens: Vec<Token>,
}

/// A bearer token and what it may do.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Token {
    /// The secret the client sends as `Authorization: Bearer <token>`.
    pub token: String,
    /// What the token allows.
    pub scope: Scope,
}

impl std::fmt::Debug for Token {
    // The secret never reaches a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("token", &"<redacted>")
            .field("scope", &self.scope)
            .finish()
    }
}

/// What a [`Token`] allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Reads only: `GET` endpoints.
    Read,
    /// Reads and writes: appends and deletes too.
    Write,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            listen: LISTEN_DEFAULT,
            body_size_max_bytes: BODY_SIZE_MAX_BYTES_DEFAULT,
            tokens: Vec::new(),
        }
    }
}

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The listening socket could not be bound.
    #[error("cannot listen on {listen}")]
    Bind {
        /// The address asked for.
        listen: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Serving connections failed.
    #[error("the http server failed")]
    Serve(#[source] std::io::Error),
}

/// Who may call a route when [`ServerOptions::tokens`] is not empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone, without a token.
    Open,
    /// A token of either scope.
    Read,
    /// A [`Scope::Write`] token.
    Write,
}

/// One route the server serves: a method, a path template and who may call it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// The HTTP method, uppercase.
    pub method: &'static str,
    /// The path template, with `{name}` for a path parameter.
    pub path: &'static str,
    /// Who may call it.
    pub access: Access,
}

/// Every route of [`router`], and only those: authentication reads who may call a route
/// here, metrics take their `route` label from here, and a test checks that the router and
/// `/openapi.json` agree with this list, so that a route cannot be added without being
/// documented and protected.
pub const ROUTES: &[Route] = &[
    Route {
        method: "POST",
        path: "/streams/{stream}",
        access: Access::Write,
    },
    Route {
        method: "GET",
        path: "/streams/{stream}",
        access: Access::Read,
    },
    Route {
        method: "DELETE",
        path: "/streams/{stream}",
        access: Access::Write,
    },
    Route {
        method: "GET",
        path: "/streams/{stream}/live",
        access: Access::Read,
    },
    Route {
        method: "GET",
        path: "/all",
        access: Access::Read,
    },
    Route {
        method: "GET",
        path: "/all/live",
        access: Access::Read,
    },
    Route {
        method: "GET",
        path: "/metrics",
        access: Access::Read,
    },
    Route {
        method: "GET",
        path: "/openapi.json",
        access: Access::Read,
    },
    Route {
        method: "GET",
        path: "/healthz",
        access: Access::Open,
    },
    Route {
        method: "GET",
        path: "/readyz",
        access: Access::Open,
    },
];

impl ServerOptions {
    /// Binds the listening socket and builds the server over `store`; nothing is served until
    /// [`Server::run`].
    ///
    /// Binding here, not in `run`, lets the caller learn the real address (port 0) and report
    /// a busy port before anything else starts.
    pub async fn build(self, store: Arc<dyn EventStore>) -> Result<Server, Error> {
        let listener = tokio::net::TcpListener::bind(self.listen)
            .await
            .map_err(|source| Error::Bind {
                listen: self.listen,
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| Error::Bind {
            listen: self.listen,
            source,
        })?;
        Ok(Server {
            listener,
            local_addr,
            store,
            options: self,
            metrics: None,
            extra: None,
        })
    }
}

/// A bound server, ready to [`run`](Server::run).
pub struct Server {
    listener: tokio::net::TcpListener,
    local_addr: SocketAddr,
    store: Arc<dyn EventStore>,
    options: ServerOptions,
    /// `None`: [`install_metrics`] when the server starts.
    metrics: Option<PrometheusHandle>,
    /// Routes of the embedding application, merged next to the event API.
    extra: Option<Router>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("local_addr", &self.local_addr)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// The address the server listens on (the real port when port 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves `/metrics` from `handle`, a Prometheus recorder the caller installed, instead of
    /// the one [`install_metrics`] installs.
    pub fn with_metrics(mut self, handle: PrometheusHandle) -> Self {
        self.metrics = Some(handle);
        self
    }

    /// Serves `routes` too, next to the event API, behind the same layers (see
    /// [Extra routes](crate#extra-routes)). `routes` must have no fallback (the server's
    /// answers what no route matches) and no path of [`ROUTES`]; calling this again adds more.
    ///
    /// # Panics
    ///
    /// When a path of `routes` is already served, or `routes` has a fallback: both are bugs
    /// of the caller, found the first time it runs.
    pub fn with_routes(mut self, routes: Router) -> Self {
        self.extra = Some(match self.extra.take() {
            Some(extra) => extra.merge(routes),
            None => routes,
        });
        self
    }

    /// Serves until `shutdown` completes, then stops accepting connections, ends the live
    /// responses and returns once the requests in flight are answered.
    ///
    /// While serving, it also runs the metrics recorder's upkeep every
    /// [`METRICS_UPKEEP_INTERVAL_SECS`], so that histograms do not grow between scrapes.
    ///
    /// The store is not closed: it belongs to the caller, who closes it after `run` returns,
    /// when no request can reach it any more.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), Error> {
        let metrics = self.metrics.or_else(install_metrics);
        // Graceful shutdown waits for every open response; a live one would never end by
        // itself, so the same signal that stops accepting connections also ends them.
        let stopping = CancellationToken::new();
        let stop = stopping.clone();
        let signal = async move {
            shutdown.await;
            stop.cancel();
        };
        let state = AppState::new(self.store, &self.options, metrics.clone(), stopping);
        let serve = axum::serve(self.listener, app(state, self.extra))
            .with_graceful_shutdown(signal)
            .into_future();
        tokio::select! {
            served = serve => served.map_err(Error::Serve),
            never = telemetry::upkeep(metrics) => match never {},
        }
    }
}

/// What every handler shares.
///
/// axum clones the state for every request (and for every layer that extracts it), so its
/// contents sit behind one `Arc`: a clone is one reference-count increment, whatever
/// [`Shared`] holds.
#[derive(Clone)]
struct AppState(Arc<Shared>);

// A field added next to the `Arc` would make every request's clone dearer again.
const _: () = assert!(std::mem::size_of::<AppState>() == std::mem::size_of::<usize>());

/// The contents of [`AppState`], read through its `Deref`.
struct Shared {
    store: Arc<dyn EventStore>,
    body_size_max_bytes: usize,
    /// Accepted bearer tokens; empty: authentication is off.
    tokens: Box<[Token]>,
    /// Where `/metrics` renders from; `None`: another kind of recorder is installed.
    metrics: Option<PrometheusHandle>,
    /// Cancelled when the server starts shutting down; ends the live responses.
    stopping: CancellationToken,
}

impl AppState {
    fn new(
        store: Arc<dyn EventStore>,
        options: &ServerOptions,
        metrics: Option<PrometheusHandle>,
        stopping: CancellationToken,
    ) -> Self {
        AppState(Arc::new(Shared {
            store,
            body_size_max_bytes: options.body_size_max_bytes,
            tokens: options.tokens.iter().cloned().collect(),
            metrics,
            stopping,
        }))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The routes of the event API over `store`, for embedding in another server or for testing
/// in process; [`ServerOptions::build`] serves the same routes.
///
/// `/metrics` serves the recorder of [`install_metrics`]. `options.listen` is not used here,
/// and the live responses of this router end only when their client goes: the router has no
/// shutdown of its own (a [`Server`] has).
pub fn router(store: Arc<dyn EventStore>, options: &ServerOptions) -> Router {
    let state = AppState::new(store, options, install_metrics(), CancellationToken::new());
    app(state, None)
}

/// [`router`], with `/metrics` served from `metrics`, a Prometheus recorder the caller
/// installed.
pub fn router_with_metrics(
    store: Arc<dyn EventStore>,
    options: &ServerOptions,
    metrics: PrometheusHandle,
) -> Router {
    telemetry::describe();
    let state = AppState::new(store, options, Some(metrics), CancellationToken::new());
    app(state, None)
}

/// The routes of [`ROUTES`], then `extra` (see [`Server::with_routes`]), and their layers.
///
/// The layers, outermost first (`Router::layer` wraps each route after it was matched, so
/// every layer sees the matched route):
///
/// ```text
///   request ─► Trace ─► metrics ─► CatchPanic ─► auth ─► handler
/// ```
///
/// Metrics sit outside auth, so that refused requests are counted, and outside CatchPanic,
/// so that a panic, answered with a `500` problem, is counted as a `500`.
fn app(state: AppState, extra: Option<Router>) -> Router {
    let routes = Router::new()
        .route(
            "/streams/{stream}",
            post(append::append)
                .get(read::read_stream)
                .delete(read::delete_stream),
        )
        .route("/streams/{stream}/live", get(live::live_stream))
        .route("/all", get(read::read_all))
        .route("/all/live", get(live::live_all))
        .route("/metrics", get(telemetry::metrics))
        .route("/openapi.json", get(openapi::openapi_json))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state.clone());
    let routes = match extra {
        Some(extra) => routes.merge(extra),
        None => routes,
    };
    routes
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::authorize,
        ))
        // A panic is a bug; the client still gets a problem document, not a closed connection.
        .layer(CatchPanicLayer::custom(panicked))
        .layer(axum::middleware::from_fn(telemetry::record))
        .layer(TraceLayer::new_for_http())
}

/// The entry of [`ROUTES`] for a request; `HEAD` is served by the `GET` route.
fn route_of(method: &axum::http::Method, path: &str) -> Option<&'static Route> {
    let method = if method == axum::http::Method::HEAD {
        "GET"
    } else {
        method.as_str()
    };
    ROUTES
        .iter()
        .find(|route| route.path == path && route.method == method)
}

/// Who may call the route with template `path` by `method`: its entry of [`ROUTES`]; a path
/// of [`ROUTES`] by another method needs a read token (the answer is `405`); a path added
/// with [`Server::with_routes`] needs a read token for `GET` and `HEAD`, a write token
/// otherwise.
fn access_of(method: &axum::http::Method, path: &str) -> Access {
    if let Some(route) = route_of(method, path) {
        return route.access;
    }
    if ROUTES.iter().any(|route| route.path == path)
        || method == axum::http::Method::GET
        || method == axum::http::Method::HEAD
    {
        Access::Read
    } else {
        Access::Write
    }
}

/// The process is up and serving.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    summary = "Liveness",
    description = "The process is up and serving. Open even when tokens are configured, so \
                   that probes need no credentials.",
    responses((status = 200, description = "`ok`", body = String)),
)]
pub(crate) async fn healthz() -> &'static str {
    "ok\n"
}

/// The store answers a read.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    summary = "Readiness",
    description = "The store answers a read. Open even when tokens are configured, so that \
                   probes need no credentials.",
    responses(
        (status = 200, description = "`ready`", body = String),
        (status = 503, description = "The store does not answer (`urn:herald:problem:not-ready`)",
         body = Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn readyz(
    axum::extract::State(state): axum::extract::State<AppState>,
) -> Response {
    match state.store.head().await {
        Ok(_) => "ready\n".into_response(),
        Err(error) => Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not-ready",
            "The store is not ready",
            format!("the store does not answer: {error}"),
        )
        .into_response(),
    }
}

async fn not_found(uri: axum::http::Uri) -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        "no-such-endpoint",
        "No such endpoint",
        format!("there is no endpoint at {}", uri.path()),
    )
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> Problem {
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "Method not allowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
}

fn panicked(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("a request handler panicked");
    Problem::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "Internal server error",
        "the server failed to handle the request".to_owned(),
    )
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_default_every_field_and_reject_unknown_ones() {
        let options: ServerOptions = serde_json::from_str("{}").unwrap();
        assert_eq!(options, ServerOptions::default());
        assert_eq!(options.listen.to_string(), "127.0.0.1:8080");
        let options: ServerOptions =
            serde_json::from_str(r#"{"body_size_max_bytes": 10}"#).unwrap();
        assert_eq!(options.body_size_max_bytes, 10);
        assert!(serde_json::from_str::<ServerOptions>(r#"{"body_size_max": 10}"#).is_err());
    }
}
