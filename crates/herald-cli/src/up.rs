//! `herald up`: serves the event API over HTTP on the embedded log of the data directory.
//!
//! Once listening it prints one JSON line, `{"listen":"<address>"}`, with the real address
//! (so `--listen 127.0.0.1:0` tells which port it got). On SIGINT or SIGTERM it stops
//! accepting connections, answers the requests in flight, then closes the log (which syncs
//! it and releases the directory's lock) and exits 0.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use herald_core::EventStore;
use herald_server::{BODY_SIZE_MAX_BYTES_DEFAULT, LISTEN_DEFAULT, ServerOptions};
use serde::Serialize;

use crate::events::Shutdown;
use crate::store::{self, Options};

/// `herald up` options.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Address to listen on (port 0: any free port)
    #[arg(long, env = "HERALD_LISTEN", default_value_t = LISTEN_DEFAULT, value_name = "ADDR")]
    listen: SocketAddr,

    /// Largest request body accepted, in bytes; larger ones get 413
    #[arg(
        long,
        env = "HERALD_BODY_SIZE_MAX_BYTES",
        default_value_t = BODY_SIZE_MAX_BYTES_DEFAULT,
        value_name = "BYTES"
    )]
    body_size_max_bytes: usize,
}

/// The line printed once the server listens.
#[derive(Debug, Serialize)]
struct Listening {
    listen: SocketAddr,
}

/// Runs the server until SIGINT or SIGTERM, then closes the log.
pub(crate) async fn run(args: Args, data_dir: &Path) -> anyhow::Result<()> {
    // Listen for signals first: one sent as soon as the address is printed must not be lost.
    let mut shutdown = Shutdown::listen().context("cannot listen for SIGINT and SIGTERM")?;
    let log = store::open(Options::new(data_dir)).await?;
    store::closing(
        &log,
        serve(&log, args, async move { shutdown.recv().await }),
    )
    .await
}

async fn serve(
    log: &store::Log,
    args: Args,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let options = ServerOptions {
        listen: args.listen,
        body_size_max_bytes: args.body_size_max_bytes,
        tokens: Vec::new(),
    };
    let event_store: Arc<dyn EventStore> = Arc::new(log.clone());
    let server = options
        .build(event_store)
        .await
        .context("cannot start the http server")?;
    let line = serde_json::to_string(&Listening {
        listen: server.local_addr(),
    })?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .context("cannot write to standard output")?;
    drop(out);
    tracing::info!(listen = %server.local_addr(), "serving the event api");
    server
        .run(shutdown)
        .await
        .context("the http server failed")?;
    tracing::info!("stopped serving; closing the event log");
    Ok(())
}
