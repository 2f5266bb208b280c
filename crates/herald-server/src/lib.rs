//! Herald's HTTP server: the event API over any [`EventStore`], speaking CloudEvents, so that a
//! service in any language (or a webhook of an external system) can append and read events
//! without a Rust client.
//!
//! # Endpoints
//!
//! | method and path              | what it does                                              |
//! |------------------------------|-----------------------------------------------------------|
//! | `POST /streams/{stream}`     | appends one event, a batch (atomically) or a binary-mode event |
//! | `GET /streams/{stream}`      | a page of the stream: `?from=&limit=&direction=`           |
//! | `DELETE /streams/{stream}`   | soft-deletes the stream                                   |
//! | `GET /all`                   | a page of the global log: `?from=&limit=&direction=`      |
//! | `GET /healthz`               | the process is up                                         |
//! | `GET /readyz`                | the store answers                                         |
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
//! - On shutdown the server MUST stop accepting connections, then answer the requests in
//!   flight before [`Server::run`] returns.
//!
//! **API Boundary:** the server knows only the [`EventStore`] trait of `herald-core`; which
//! store backs it (the embedded log, or another) is the caller's choice.

#![forbid(unsafe_code)]

mod append;
mod binary;

pub use append::JSON_DEPTH_MAX;
pub use binary::ATTRIBUTE_HEADER_LEN_MAX_BYTES;
mod params;
mod problem;
mod read;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use herald_core::EventStore;
use serde::{Deserialize, Serialize};
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
            router: router(store, &self),
        })
    }
}

/// A bound server, ready to [`run`](Server::run).
#[derive(Debug)]
pub struct Server {
    listener: tokio::net::TcpListener,
    local_addr: SocketAddr,
    router: Router,
}

impl Server {
    /// The address the server listens on (the real port when port 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` completes, then stops accepting connections and returns once
    /// the requests in flight are answered.
    ///
    /// The store is not closed: it belongs to the caller, who closes it after `run` returns,
    /// when no request can reach it any more.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), Error> {
        axum::serve(self.listener, self.router)
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(Error::Serve)
    }
}

/// What every handler shares.
#[derive(Clone)]
struct AppState {
    store: Arc<dyn EventStore>,
    body_size_max_bytes: usize,
}

/// The routes of the event API over `store`, for embedding in another server or for testing
/// in process; [`ServerOptions::build`] serves exactly this.
///
/// `options.listen` is not used here.
pub fn router(store: Arc<dyn EventStore>, options: &ServerOptions) -> Router {
    let state = AppState {
        store,
        body_size_max_bytes: options.body_size_max_bytes,
    };
    Router::new()
        .route(
            "/streams/{stream}",
            post(append::append)
                .get(read::read_stream)
                .delete(read::delete_stream),
        )
        .route("/all", get(read::read_all))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
        // A panic is a bug; the client still gets a problem document, not a closed connection.
        .layer(CatchPanicLayer::custom(panicked))
        .layer(TraceLayer::new_for_http())
}

/// The process is up and serving.
async fn healthz() -> &'static str {
    "ok\n"
}

/// The store answers a read.
async fn readyz(axum::extract::State(state): axum::extract::State<AppState>) -> Response {
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
