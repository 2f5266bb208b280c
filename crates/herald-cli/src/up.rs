//! `herald up`: serves the event API over HTTP on the embedded log of the data directory.
//!
//! Its settings come from flags, `HERALD_*` variables and a TOML file, in that order of
//! precedence ([`crate::config`]).
//!
//! Once listening it prints one JSON line, `{"listen":"<address>"}`, with the real address
//! (so `--listen 127.0.0.1:0` tells which port it got). On SIGINT or SIGTERM it stops
//! accepting connections, answers the requests in flight, then closes the log (which syncs
//! it and releases the directory's lock) and exits 0.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use herald_core::EventStore;
use herald_server::ServerOptions;
use serde::Serialize;

use crate::config::{self, Overrides, TokenSpec};
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
}

/// The line printed once the server listens.
#[derive(Debug, Serialize)]
struct Listening {
    listen: SocketAddr,
}

/// Runs the server until SIGINT or SIGTERM, then closes the log. `data_dir` is what
/// `--data-dir` or `HERALD_DATA_DIR` gave, if either did.
pub(crate) async fn run(args: Args, data_dir: Option<&Path>) -> anyhow::Result<()> {
    // Listen for signals first: one sent as soon as the address is printed must not be lost.
    let mut shutdown = Shutdown::listen().context("cannot listen for SIGINT and SIGTERM")?;
    let config = config::resolve(Overrides {
        config: args.config,
        data_dir: data_dir.map(Path::to_path_buf),
        listen: args.listen,
        body_size_max_bytes: args.body_size_max_bytes,
        tokens: args.tokens,
    })?;
    if let Some(file) = &config.file {
        tracing::info!(file = %file.display(), "read the configuration file");
    }
    let log = store::open(Options::new(&config.data_dir)).await?;
    store::closing(
        &log,
        serve(&log, config.server, async move { shutdown.recv().await }),
    )
    .await
}

async fn serve(
    log: &store::Log,
    options: ServerOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
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
