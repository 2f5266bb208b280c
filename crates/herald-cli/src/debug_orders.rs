//! `herald debug orders-server`: the order system and the event API in one process, the
//! server that `tests/orders_crash.rs` kills with SIGKILL and restarts on the same data
//! directory.
//!
//! It opens the embedded log of the data directory, builds the order system on it
//! ([`herald_orders::SystemOptions`] with its defaults: durable, fsync on commit), and
//! serves the event API merged with the order system's `/api/*` routes. Once listening it
//! prints `{"listen":"<address>"}` as `herald up` does. On SIGINT or SIGTERM it stops
//! accepting connections, finishes the requests in flight, stops the system (consumers
//! drain, relays finish their batch, databases commit) and closes the log.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use herald_core::EventStore;
use herald_orders::SystemOptions;
use herald_server::ServerOptions;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::events::Shutdown;
use crate::store::{self, Options};

/// Arguments of `herald debug orders-server`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Address to listen on (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR")]
    listen: SocketAddr,
}

/// The line printed once the server listens.
#[derive(Debug, Serialize)]
struct Listening {
    listen: SocketAddr,
}

/// Serves the order system on `data_dir` until SIGINT or SIGTERM.
pub(crate) async fn run(args: Args, data_dir: &Path) -> anyhow::Result<()> {
    // Listen for signals first: one sent as soon as the address is printed must not be lost.
    let mut signals = Shutdown::listen().context("cannot listen for SIGINT and SIGTERM")?;
    let log = store::open(Options::new(data_dir)).await?;
    store::closing(&log, async {
        let system = SystemOptions {
            data_dir: data_dir.to_path_buf(),
            ..SystemOptions::default()
        }
        .build(log.clone())
        .await
        .context("cannot start the order system")?;
        let event_store: Arc<dyn EventStore> = Arc::new(log.clone());
        let router = system.api_router().merge(herald_server::router(
            event_store,
            &ServerOptions::default(),
        ));
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let listen = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(system.run(shutdown.clone()));
        let line = serde_json::to_string(&Listening { listen })?;
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}")
            .and_then(|()| out.flush())
            .context("cannot write to standard output")?;
        drop(out);
        let served = axum::serve(listener, router)
            .with_graceful_shutdown(async move { signals.recv().await })
            .await
            .context("the http server failed");
        shutdown.cancel();
        let report = running
            .await
            .context("the order system task panicked")?
            .context("the order system failed")?;
        tracing::info!(?report, "the order system stopped");
        served
    })
    .await
}
