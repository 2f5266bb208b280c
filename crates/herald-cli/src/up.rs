//! `herald up`: serves the event API over HTTP on the embedded log of the data directory, and
//! runs the reference order system ([`herald_orders`]) on the same log, its routes (`/api/*`)
//! on the same server.
//!
//! Its settings come from flags, `HERALD_*` variables and a TOML file, in that order of
//! precedence ([`crate::config`]); `--no-orders` serves the event API only.
//!
//! Once listening it prints one JSON line, `{"listen":"<address>"}`, with the real address
//! (so `--listen 127.0.0.1:0` tells which port it got). On SIGINT or SIGTERM it stops
//! accepting connections and answers the requests in flight (a long-poll of
//! `GET /api/orders/{id}?waitMs=` ends within its `waitMs`), then stops the order system
//! (its consumers drain and leave their groups, its relays finish their batch, its
//! databases commit what is queued), then closes the log (which syncs it and releases the
//! directory's lock) and exits 0. If the order system stops by itself, the server stops too
//! and the command fails with the system's error.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use herald_core::EventStore;
use herald_orders::System;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::config::{self, Config, Overrides, TokenSpec};
use crate::events::Shutdown;
use crate::store::{self, Options};

/// `herald up` options. Each one left out comes from the configuration file, or else its
/// default (see [`crate::config`]).
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// TOML configuration file [default: ./herald.toml, when it exists]
    #[arg(long, env = "HERALD_CONFIG", value_name = "PATH")]
    config: Option<PathBuf>,

    /// Address to listen on (port 0: any free port) [default: 127.0.0.1:8080]
    #[arg(long, env = "HERALD_LISTEN", value_name = "ADDR")]
    listen: Option<SocketAddr>,

    /// Largest request body accepted, in bytes; larger ones get 413 [default: 4194304]
    #[arg(long, env = "HERALD_BODY_SIZE_MAX_BYTES", value_name = "BYTES")]
    body_size_max_bytes: Option<usize>,

    /// A bearer token the server accepts, SCOPE:SECRET with SCOPE `read` or `write`
    /// (repeatable; HERALD_TOKENS takes a comma-separated list). Replaces the file's tokens
    #[arg(
        long = "token",
        env = "HERALD_TOKENS",
        hide_env_values = true,
        value_delimiter = ',',
        value_parser = TokenSpec::parse,
        value_name = "SCOPE:SECRET"
    )]
    tokens: Vec<TokenSpec>,

    /// Serve the event API only, without the order system and its /api routes
    #[arg(long, env = "HERALD_NO_ORDERS")]
    no_orders: bool,

    /// Share of charges the simulated payment gateway declines at random, 0 to 1 [default: 0]
    #[arg(long, env = "HERALD_FAIL_PAYMENT_RATE", value_name = "RATE")]
    fail_payment_rate: Option<f64>,

    /// Share of payment gateway calls that fail with a transient error (retried), 0 to 1
    /// [default: 0]
    #[arg(long, env = "HERALD_TRANSIENT_ERROR_RATE", value_name = "RATE")]
    transient_error_rate: Option<f64>,
}

/// The line printed once the server listens.
#[derive(Debug, Serialize)]
struct Listening {
    listen: SocketAddr,
}

/// Runs the server (and the order system) until SIGINT or SIGTERM, then closes the log.
/// `data_dir` is what `--data-dir` or `HERALD_DATA_DIR` gave, if either did.
pub(crate) async fn run(args: Args, data_dir: Option<&Path>) -> anyhow::Result<()> {
    // Listen for signals first: one sent as soon as the address is printed must not be lost.
    let mut shutdown = Shutdown::listen().context("cannot listen for SIGINT and SIGTERM")?;
    let config = config::resolve(Overrides {
        config: args.config,
        data_dir: data_dir.map(Path::to_path_buf),
        listen: args.listen,
        body_size_max_bytes: args.body_size_max_bytes,
        tokens: args.tokens,
        no_orders: args.no_orders,
        fail_payment_rate: args.fail_payment_rate,
        transient_error_rate: args.transient_error_rate,
    })?;
    if let Some(file) = &config.file {
        tracing::info!(file = %file.display(), "read the configuration file");
    }
    let log = store::open(Options::new(&config.data_dir)).await?;
    store::closing(
        &log,
        serve(&log, config, async move { shutdown.recv().await }),
    )
    .await
}

async fn serve(
    log: &store::Log,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let system = if config.orders.enabled {
        let system: System = config
            .orders
            .system_options(&config.data_dir)
            .build(log.clone())
            .await
            .context("cannot start the order system")?;
        Some(system)
    } else {
        None
    };
    let event_store: Arc<dyn EventStore> = Arc::new(log.clone());
    let mut server = config
        .server
        .build(event_store)
        .await
        .context("cannot start the http server")?;
    if let Some(system) = &system {
        server = server.with_routes(system.api_router());
    }
    let line = serde_json::to_string(&Listening {
        listen: server.local_addr(),
    })?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .context("cannot write to standard output")?;
    drop(out);

    let Some(system) = system else {
        tracing::info!(listen = %server.local_addr(), "serving the event api");
        server
            .run(shutdown)
            .await
            .context("the http server failed")?;
        tracing::info!("stopped serving; closing the event log");
        return Ok(());
    };

    tracing::info!(listen = %server.local_addr(), "serving the event api and the order system");
    // The system runs until the server has stopped; if it stops first (a failure), the
    // server stops too.
    let stop_system = CancellationToken::new();
    let system_ended = CancellationToken::new();
    let handle = system.handle();
    let running = tokio::spawn({
        let stop = stop_system.clone();
        let ended = system_ended.clone();
        async move {
            let report = system.run(stop).await;
            ended.cancel();
            report
        }
    });
    let served = server
        .run(async move {
            tokio::select! {
                () = shutdown => {}
                () = system_ended.cancelled_owned() => {
                    tracing::error!("the order system stopped; stopping the http server");
                }
            }
            // The long-polls of the order API answer now, so that the graceful shutdown
            // does not wait for them.
            handle.end_waits();
        })
        .await
        .context("the http server failed");
    tracing::info!("stopped serving; stopping the order system");
    stop_system.cancel();
    let stopped = running
        .await
        .context("the order system's task failed")
        .and_then(|report| report.context("the order system failed"));
    tracing::info!("stopped the order system; closing the event log");
    served?;
    stopped?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;
    use herald_server::{BODY_SIZE_MAX_BYTES_DEFAULT, LISTEN_DEFAULT};

    /// The defaults are written out in the help, since the flags have none of their own (a
    /// flag's default would hide the file's value); this keeps the text true.
    #[test]
    fn the_help_states_the_real_defaults() {
        let mut command = crate::Cli::command();
        let up = command.find_subcommand_mut("up").expect("herald up exists");
        let help = up.render_help().to_string();
        assert!(
            help.contains(&format!("[default: {LISTEN_DEFAULT}]")),
            "{help}"
        );
        assert!(
            help.contains(&format!("[default: {BODY_SIZE_MAX_BYTES_DEFAULT}]")),
            "{help}"
        );
        assert!(
            help.contains(&format!(
                "[default: ./{}",
                crate::config::CONFIG_FILE_DEFAULT
            )),
            "{help}"
        );
    }
}
