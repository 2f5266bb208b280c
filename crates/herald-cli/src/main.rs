//! `herald`: the command line of the Herald event platform.
//!
//! Every command that touches events works on the embedded log (`herald-log`) in the data
//! directory given by `--data-dir` (or `HERALD_DATA_DIR`, default `./herald-data`). One process
//! at a time may open a data directory; the log enforces that with a lock. `migrate` and
//! `outbox` work on a SQL database instead, named by `--database-url` (or
//! `HERALD_DATABASE_URL`).
//!
//! Errors are printed as one line (`error: what failed: why`), followed by a `hint:` line
//! when there is something specific the user can do about it. Diagnostics go to stderr
//! through `tracing` (filter with `RUST_LOG`); stdout carries only results, as JSON, so it can
//! be piped into `jq` or another program.

mod bench;
mod config;
mod database;
mod debug;
mod dlq;
mod events;
mod groups;
mod load;
mod migrate;
mod outbox;
mod store;
mod up;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use crate::config::DATA_DIR_DEFAULT;

/// The `herald` command line.
#[derive(Debug, Parser)]
#[command(
    name = "herald",
    version,
    about = "Herald, an event-driven application platform"
)]
struct Cli {
    /// Directory of the embedded event log [default: ./herald-data]
    #[arg(long, global = true, env = "HERALD_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

/// The top-level commands.
#[derive(Debug, Subcommand)]
enum Command {
    /// Append, read and follow events in the embedded log.
    #[command(subcommand)]
    Events(events::Command),
    /// Measure the embedded log next to raw-disk baselines taken in the same run.
    #[command(subcommand)]
    Bench(bench::Command),
    /// List, show, discard and request replays of a consumer group's dead letters.
    #[command(subcommand)]
    Dlq(dlq::Command),
    /// Show how far consumer groups are behind.
    #[command(subcommand)]
    Groups(groups::Command),
    /// Serve the event API over HTTP on the data directory's event log.
    Up(up::Args),
    /// Apply Herald's SQL migrations (outbox, inbox, checkpoints) to a database.
    Migrate(migrate::Args),
    /// Inspect the transactional outbox of a SQL database.
    #[command(subcommand)]
    Outbox(outbox::Command),
    /// Place orders against a running order system and report how they settled.
    Load(load::Args),
    /// Tools that test Herald itself.
    #[command(subcommand, hide = true)]
    Debug(debug::Command),
}

// mimalloc rather than the system allocator: the event path allocates and frees many
// small buffers per event, and glibc's malloc spent about a quarter of the pubsub
// benchmark's cycles on them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("herald-worker")
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", render(&error));
            if let Some(hint) = store::hint(&error)
                .or_else(|| groups::hint(&error))
                .or_else(|| config::hint(&error))
                .or_else(|| database::hint(&error))
            {
                eprintln!("hint: {hint}");
            }
            ExitCode::FAILURE
        }
    }
}

/// Runs one command to completion.
async fn run(cli: Cli) -> anyhow::Result<()> {
    let data_dir = cli.data_dir.clone();
    let resolved = || data_dir.clone().unwrap_or_else(|| DATA_DIR_DEFAULT.into());
    match cli.command {
        Command::Events(command) => events::run(command, &resolved()).await,
        // The benchmarks measure a fresh directory: inside `--data-dir` only when one is given.
        Command::Bench(command) => bench::run(command, data_dir.as_deref()).await,
        Command::Debug(command) => debug::run(command, &resolved()).await,
        Command::Dlq(command) => dlq::run(command, &resolved()).await,
        Command::Groups(command) => groups::run(command, &resolved()).await,
        // `herald up` also reads a configuration file, which the flag and the variable override.
        Command::Up(args) => up::run(args, data_dir.as_deref()).await,
        // The SQL commands work on --database-url, not on the data directory.
        Command::Migrate(args) => migrate::run(args).await,
        Command::Outbox(command) => outbox::run(command).await,
        // The load works on a server, named by --url.
        Command::Load(args) => load::run(args).await,
    }
}

/// The error and its causes on one line, `what failed: why: why that`.
///
/// A cause whose text the message already ends with is skipped: some errors print their
/// source in their own message.
fn render(error: &anyhow::Error) -> String {
    let mut message = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if message.ends_with(&text) {
            continue;
        }
        if !message.is_empty() {
            message.push_str(": ");
        }
        message.push_str(&text);
    }
    message
}

/// Sends diagnostics to stderr, filtered by `RUST_LOG` (default: warnings and errors).
fn init_tracing() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn causes_repeated_by_their_error_are_shown_once() {
        let inner = anyhow::anyhow!("missing `source`");
        let error = inner
            .context("event 1: missing `source`")
            .context("cannot append");
        assert_eq!(render(&error), "cannot append: event 1: missing `source`");
    }
}
