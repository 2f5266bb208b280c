//! `herald outbox`: the transactional outbox of a SQL database.
//!
//! `herald outbox status` reads [`herald_sql::status`]: the backlog (rows not yet
//! published), the age of the oldest of them, the rows whose publish failed (attempts, last
//! error, next attempt), and which relay holds which lease partition until when. It only
//! reads; it works while relays run.

use std::collections::BTreeMap;
use std::io::{self, Write as _};

use anyhow::Context as _;
use chrono::{DateTime, SecondsFormat, Utc};
use clap::Subcommand;
use comfy_table::Table;
use herald_sql::OutboxStatus;
use serde::Serialize;

use crate::database::{self, DatabaseArgs, with_pool};

/// The `herald outbox` subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Show the backlog, the oldest unpublished row's age, the failing rows, and which
    /// relay holds which lease.
    ///
    /// Tables, or with --json one JSON object: `{"database", "backlog",
    /// "oldest_age_seconds", "failing": [{"seq", "id", "partition", "attempts",
    /// "last_error", "next_attempt_at"}], "relays": [{"holder", "alive", "started_at",
    /// "registered_until", "partitions", "leases_expire_at"}], "free_partitions",
    /// "leases": [{"partition", "holder", "expires_at"}]}`. A relay is alive while its
    /// registration is renewed; one that died keeps its leases until they expire, then
    /// others take them.
    Status(StatusArgs),
}

/// Arguments of `herald outbox status`.
#[derive(Debug, clap::Args)]
pub(crate) struct StatusArgs {
    #[command(flatten)]
    database: DatabaseArgs,

    /// Print one JSON object instead of tables.
    #[arg(long)]
    json: bool,
}

/// What `herald outbox status --json` prints.
#[derive(Debug, Serialize)]
struct StatusOutput {
    /// `postgres` or `sqlite`.
    database: &'static str,
    /// Rows not yet published.
    backlog: u64,
    /// How long the oldest of them has waited; `null` when there are none.
    oldest_age_seconds: Option<f64>,
    /// The first unpublished rows whose publish failed (at most
    /// [`herald_sql::outbox::STATUS_FAILING_LEN_MAX`]).
    failing: Vec<FailingOutput>,
    /// Every relay alive or holding a lease, by holder id.
    relays: Vec<RelayOutput>,
    /// The lease partitions nobody holds.
    free_partitions: Vec<u32>,
    /// Every lease partition with its holder.
    leases: Vec<LeaseOutput>,
}

/// A failing row in [`StatusOutput`].
#[derive(Debug, Serialize)]
struct FailingOutput {
    seq: i64,
    id: String,
    partition: u32,
    attempts: u32,
    last_error: Option<String>,
    next_attempt_at: Option<DateTime<Utc>>,
}

/// A relay in [`StatusOutput`].
#[derive(Debug, Serialize)]
struct RelayOutput {
    holder: String,
    /// Registered and not expired.
    alive: bool,
    /// When it registered (`null` when not alive).
    started_at: Option<DateTime<Utc>>,
    /// When its registration expires unless renewed (`null` when not alive).
    registered_until: Option<DateTime<Utc>>,
    /// The lease partitions it holds.
    partitions: Vec<u32>,
    /// The earliest expiry of those leases (`null` when it holds none).
    leases_expire_at: Option<DateTime<Utc>>,
}

/// A lease in [`StatusOutput`].
#[derive(Debug, Serialize)]
struct LeaseOutput {
    partition: u32,
    holder: Option<String>,
    expires_at: Option<DateTime<Utc>>,
}

/// Runs an `outbox` subcommand.
pub(crate) async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Status(args) => status(args).await,
    }
}

/// `herald outbox status`.
async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let url = &args.database.database_url;
    let database = database::connect(url, 1).await?;
    let status = with_pool!(&database, pool => herald_sql::status(pool).await).with_context(|| {
        format!(
            "cannot read the outbox status of {}",
            database::redacted(url)
        )
    });
    database.close().await;
    let output = output(database.backend(), &status?);
    let mut out = io::stdout().lock();
    if args.json {
        serde_json::to_writer(&mut out, &output)?;
        writeln!(out)?;
    } else {
        write_tables(&mut out, &output)?;
    }
    out.flush()?;
    Ok(())
}

fn output(database: &'static str, status: &OutboxStatus) -> StatusOutput {
    // Relays alive, then holders of leases that are not (a relay that died keeps its leases
    // until they expire).
    let mut relays: BTreeMap<&str, RelayOutput> = status
        .relays
        .iter()
        .map(|relay| {
            (
                relay.holder.as_str(),
                RelayOutput {
                    holder: relay.holder.clone(),
                    alive: true,
                    started_at: Some(relay.started_at),
                    registered_until: Some(relay.expires_at),
                    partitions: Vec::new(),
                    leases_expire_at: None,
                },
            )
        })
        .collect();
    let mut free_partitions = Vec::new();
    for lease in &status.leases {
        let Some(holder) = lease.holder.as_deref() else {
            free_partitions.push(lease.partition);
            continue;
        };
        let relay = relays.entry(holder).or_insert_with(|| RelayOutput {
            holder: holder.to_owned(),
            alive: false,
            started_at: None,
            registered_until: None,
            partitions: Vec::new(),
            leases_expire_at: None,
        });
        relay.partitions.push(lease.partition);
        relay.leases_expire_at = match (relay.leases_expire_at, lease.expires_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
    StatusOutput {
        database,
        backlog: status.backlog,
        oldest_age_seconds: status.oldest_age.map(|age| age.as_secs_f64()),
        failing: status
            .failing
            .iter()
            .map(|row| FailingOutput {
                seq: row.seq,
                id: row.id.clone(),
                partition: row.partition,
                attempts: row.attempts,
                last_error: row.last_error.clone(),
                next_attempt_at: row.next_attempt_at,
            })
            .collect(),
        relays: relays.into_values().collect(),
        free_partitions,
        leases: status
            .leases
            .iter()
            .map(|lease| LeaseOutput {
                partition: lease.partition,
                holder: lease.holder.clone(),
                expires_at: lease.expires_at,
            })
            .collect(),
    }
}

/// The status as a summary, a table of relays and one of failing rows.
fn write_tables(out: &mut impl io::Write, output: &StatusOutput) -> io::Result<()> {
    writeln!(out, "database:        {}", output.database)?;
    writeln!(out, "backlog:         {} rows", output.backlog)?;
    match output.oldest_age_seconds {
        Some(age) => writeln!(out, "oldest waiting:  {age:.3} s")?,
        None => writeln!(out, "oldest waiting:  -")?,
    }
    writeln!(
        out,
        "free partitions: {}",
        ranges(&output.free_partitions).unwrap_or_else(|| "none".to_owned())
    )?;
    if output.relays.is_empty() {
        writeln!(out, "relays:          none")?;
    } else {
        let mut table = Table::new();
        table.set_header([
            "relay",
            "alive",
            "registered until",
            "partitions",
            "leases expire at",
        ]);
        for relay in &output.relays {
            table.add_row([
                relay.holder.clone(),
                if relay.alive { "yes" } else { "no" }.to_owned(),
                time(relay.registered_until),
                ranges(&relay.partitions).unwrap_or_else(|| "-".to_owned()),
                time(relay.leases_expire_at),
            ]);
        }
        writeln!(out, "{table}")?;
    }
    if output.failing.is_empty() {
        writeln!(out, "failing rows:    none")?;
    } else {
        let mut table = Table::new();
        table.set_header([
            "seq",
            "id",
            "partition",
            "attempts",
            "next attempt",
            "last error",
        ]);
        for row in &output.failing {
            table.add_row([
                row.seq.to_string(),
                row.id.clone(),
                row.partition.to_string(),
                row.attempts.to_string(),
                time(row.next_attempt_at),
                row.last_error.clone().unwrap_or_default(),
            ]);
        }
        writeln!(out, "{table}")?;
    }
    Ok(())
}

fn time(at: Option<DateTime<Utc>>) -> String {
    at.map_or_else(
        || "-".to_owned(),
        |at| at.to_rfc3339_opts(SecondsFormat::Millis, true),
    )
}

/// Sorted partitions as ranges, `0-10, 12`; `None` when there are none.
fn ranges(partitions: &[u32]) -> Option<String> {
    let mut parts: Vec<String> = Vec::new();
    let mut iter = partitions.iter().copied().peekable();
    while let Some(start) = iter.next() {
        let mut end = start;
        while iter.peek() == Some(&(end + 1)) {
            end += 1;
            iter.next();
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
    }
    (!parts.is_empty()).then(|| parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_print_as_ranges() {
        assert_eq!(ranges(&[]), None);
        assert_eq!(ranges(&[3]).unwrap(), "3");
        assert_eq!(ranges(&[0, 1, 2, 4, 6, 7]).unwrap(), "0-2, 4, 6-7");
    }
}
