//! `herald migrate`: applies Herald's SQL migrations (the outbox with its leases and
//! relays, the inbox, the checkpoints) to a PostgreSQL or SQLite database with
//! [`herald_sql::migrate_report`], and prints what it applied.
//!
//! Idempotent: on an up-to-date database it applies nothing and says so. Safe to run from
//! several processes at once on PostgreSQL (the migration holds an advisory lock); each
//! prints only what it applied itself.

use std::io::{self, Write as _};

use anyhow::Context as _;
use serde::Serialize;

use crate::database::{self, DatabaseArgs, with_pool};

/// Arguments of `herald migrate`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    database: DatabaseArgs,

    /// Print one JSON object instead of lines: `{"database", "applied": [{"version",
    /// "description"}]}`.
    #[arg(long)]
    json: bool,
}

/// What `herald migrate --json` prints.
#[derive(Debug, Serialize)]
struct Output {
    /// `postgres` or `sqlite`.
    database: &'static str,
    /// The migrations this run applied, in order; empty when the schema was up to date.
    applied: Vec<Applied>,
}

/// One migration in [`Output`].
#[derive(Debug, Serialize)]
struct Applied {
    version: i64,
    description: &'static str,
}

/// Runs `herald migrate`.
pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let url = &args.database.database_url;
    let database = database::connect(url, 1).await?;
    let applied = with_pool!(&database, pool => herald_sql::migrate_report(pool).await)
        .with_context(|| format!("cannot migrate {}", database::redacted(url)));
    database.close().await;
    let output = Output {
        database: database.backend(),
        applied: applied?
            .into_iter()
            .map(|migration| Applied {
                version: migration.version,
                description: migration.description,
            })
            .collect(),
    };
    let mut out = io::stdout().lock();
    if args.json {
        serde_json::to_writer(&mut out, &output)?;
        writeln!(out)?;
    } else if output.applied.is_empty() {
        writeln!(out, "nothing to apply: the database is up to date")?;
    } else {
        for migration in &output.applied {
            writeln!(
                out,
                "applied {} {}",
                migration.version, migration.description
            )?;
        }
    }
    out.flush()?;
    Ok(())
}
