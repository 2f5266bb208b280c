//! `herald dlq`: list, show, discard and request replays of a consumer group's dead letters.
//!
//! The dead letters are those a consumer stored in the data directory's log through
//! [`EventStoreDeadLetters`]: one system stream `$dlq:<group>` per consumer group. These
//! commands open the log, so they run while no consumer has the data directory open.

use std::fmt;
use std::io::{self, Write};
use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use comfy_table::Table;
use herald_core::EventStore;
use herald_core::broker::GroupName;
use herald_runtime::DeadLetterStore as _;
use herald_runtime::dead_letter_store::{
    DeadLetterRecord, DeadLetterStatus, EventStoreDeadLetters, Lookup, ReplayRequest,
    StoredDeadLetter,
};
use serde::Serialize;

use crate::store;

/// The `herald dlq` subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// List a consumer group's dead letters, oldest id first.
    ///
    /// A table of id, type, reason, attempts, first and last failure and status
    /// (`pending` or `replay-requested`); with --json, one JSON object per line, as printed
    /// by `herald dlq show`.
    Ls(LsArgs),
    /// Print one dead letter as JSON: the original event (a structured CloudEvent), why and
    /// where it failed, and its status.
    Show(IdArgs),
    /// Drop a dead letter for good. Discarding one already discarded changes nothing.
    Discard(IdArgs),
    /// Request that a dead letter be re-delivered to its consumer group, and to that group
    /// only.
    ///
    /// Marks the dead letter `replay-requested`; requesting it again changes nothing. The
    /// group's consumer replays it when it next starts (the data directory's lock keeps
    /// this command and a running consumer apart), ahead of the events its key holds; once
    /// the replay succeeds the dead letter is gone (`show` reports it replayed), and if it
    /// fails again it is stored again as pending.
    Replay(ReplayArgs),
}

/// Arguments of `herald dlq ls`.
#[derive(Debug, Args)]
pub(crate) struct LsArgs {
    /// The consumer group.
    #[arg(long, value_parser = parse_group)]
    group: GroupName,

    /// Print one JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
}

/// Arguments of the commands that act on one dead letter.
#[derive(Debug, Args)]
pub(crate) struct IdArgs {
    /// The consumer group.
    #[arg(long, value_parser = parse_group)]
    group: GroupName,

    /// The dead letter's id: the id of its event, as `herald dlq ls` shows it.
    id: String,
}

/// Arguments of `herald dlq replay`.
#[derive(Debug, Args)]
pub(crate) struct ReplayArgs {
    #[command(flatten)]
    target: IdArgs,

    /// Print what would be replayed, and change nothing.
    #[arg(long)]
    dry_run: bool,
}

/// A dead letter as printed by `show` and `ls --json`.
#[derive(Debug, Serialize)]
struct RecordOutput<'a> {
    id: &'a str,
    status: &'static str,
    #[serde(flatten)]
    record: DeadLetterRecord,
}

/// A dead letter that is not there to act on; its hint says what to do instead.
#[derive(Debug)]
pub(crate) struct Missing {
    group: GroupName,
    id: String,
    lookup: Lookup,
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Missing { group, id, lookup } = self;
        match lookup {
            Lookup::Discarded => write!(f, "dead letter `{id}` of group `{group}` was discarded"),
            Lookup::Replayed => write!(
                f,
                "dead letter `{id}` of group `{group}` was already replayed successfully"
            ),
            _ => write!(f, "group `{group}` has no dead letter `{id}`"),
        }
    }
}

impl std::error::Error for Missing {}

impl Missing {
    /// What the user can do about it.
    pub(crate) fn hint(&self) -> String {
        let group = &self.group;
        match self.lookup {
            Lookup::Discarded | Lookup::Replayed => format!(
                "it is no longer a dead letter; `herald dlq ls --group {group}` lists those left"
            ),
            _ => format!(
                "list the group's dead letters with `herald dlq ls --group {group}`; an id is \
                 the id of the dead-lettered event, and each group has its own dead letters"
            ),
        }
    }
}

/// Runs a `dlq` subcommand against the log in `data_dir`.
pub(crate) async fn run(command: Command, data_dir: &Path) -> anyhow::Result<()> {
    let log = Arc::new(store::open_existing(data_dir).await?);
    let dead_letters = EventStoreDeadLetters::new(Arc::clone(&log) as Arc<dyn EventStore>);
    let work = async {
        match command {
            Command::Ls(args) => ls(&dead_letters, &args).await,
            Command::Show(args) => show(&dead_letters, &args).await,
            Command::Discard(args) => discard(&dead_letters, &args).await,
            Command::Replay(args) => replay(&dead_letters, &args).await,
        }
    };
    store::closing(&log, work).await
}

/// `herald dlq ls`.
async fn ls(dead_letters: &EventStoreDeadLetters, args: &LsArgs) -> anyhow::Result<()> {
    let group = &args.group;
    let stored = dead_letters
        .list_stored(group, None, usize::MAX)
        .await
        .with_context(|| format!("cannot list the dead letters of group `{group}`"))?;
    let mut out = io::stdout().lock();
    if args.json {
        for stored in &stored {
            serde_json::to_writer(&mut out, &output(stored))?;
            writeln!(out)?;
        }
    } else if stored.is_empty() {
        eprintln!("group `{group}` has no dead letters");
    } else {
        writeln!(out, "{}", table(&stored))?;
    }
    out.flush()?;
    Ok(())
}

/// `herald dlq show`.
async fn show(dead_letters: &EventStoreDeadLetters, args: &IdArgs) -> anyhow::Result<()> {
    let stored = stored(dead_letters, args).await?;
    print_json(&output(&stored))
}

/// `herald dlq discard`.
async fn discard(dead_letters: &EventStoreDeadLetters, args: &IdArgs) -> anyhow::Result<()> {
    let IdArgs { group, id } = args;
    let discarded = dead_letters
        .discard(group, id)
        .await
        .with_context(|| format!("cannot discard dead letter `{id}` of group `{group}`"))?;
    if discarded.is_some() {
        println!("discarded dead letter `{id}` of group `{group}`");
        return Ok(());
    }
    match lookup(dead_letters, args).await? {
        Lookup::Discarded => {
            println!("dead letter `{id}` of group `{group}` is already discarded");
            Ok(())
        }
        lookup => Err(missing(args, lookup).into()),
    }
}

/// `herald dlq replay`.
async fn replay(dead_letters: &EventStoreDeadLetters, args: &ReplayArgs) -> anyhow::Result<()> {
    let IdArgs { group, id } = &args.target;
    if args.dry_run {
        let stored = stored(dead_letters, &args.target).await?;
        let dead_letter = &stored.dead_letter;
        if stored.status == DeadLetterStatus::ReplayRequested {
            println!(
                "dry run: a replay of dead letter `{id}` is already requested for group \
                 `{group}`; nothing would change"
            );
        } else {
            println!(
                "dry run: would request a replay of dead letter `{id}` ({}, from {} partition {} \
                 offset {}) to group `{group}` only; nothing changed",
                dead_letter.event.ty, dead_letter.topic, dead_letter.partition, dead_letter.offset
            );
        }
        return print_json(&dead_letter.event);
    }
    let request = dead_letters
        .request_replay(group, id)
        .await
        .with_context(|| format!("cannot request a replay of dead letter `{id}` of `{group}`"))?;
    match request {
        Some(ReplayRequest::Requested(_)) => println!(
            "requested a replay of dead letter `{id}` to group `{group}`; the group's consumer \
             replays it when it next starts"
        ),
        Some(ReplayRequest::AlreadyRequested(_)) => println!(
            "a replay of dead letter `{id}` to group `{group}` is already requested; nothing \
             changed"
        ),
        Some(_) => anyhow::bail!("unexpected answer to the replay request of `{id}`"),
        None => {
            return Err(missing(&args.target, lookup(dead_letters, &args.target).await?).into());
        }
    }
    Ok(())
}

/// The dead letter `args` name, or an error saying why there is none.
async fn stored(
    dead_letters: &EventStoreDeadLetters,
    args: &IdArgs,
) -> anyhow::Result<StoredDeadLetter> {
    match lookup(dead_letters, args).await? {
        Lookup::Stored(stored) => Ok(*stored),
        lookup => Err(missing(args, lookup).into()),
    }
}

/// What the group's stream says about the id `args` name.
async fn lookup(dead_letters: &EventStoreDeadLetters, args: &IdArgs) -> anyhow::Result<Lookup> {
    let IdArgs { group, id } = args;
    dead_letters
        .find(group, id)
        .await
        .with_context(|| format!("cannot read dead letter `{id}` of group `{group}`"))
}

fn missing(args: &IdArgs, lookup: Lookup) -> Missing {
    Missing {
        group: args.group.clone(),
        id: args.id.clone(),
        lookup,
    }
}

fn output(stored: &StoredDeadLetter) -> RecordOutput<'_> {
    RecordOutput {
        id: &stored.dead_letter.event.id,
        status: stored.status.as_str(),
        record: DeadLetterRecord::from(&stored.dead_letter),
    }
}

/// The `ls` table.
fn table(stored: &[StoredDeadLetter]) -> Table {
    let mut table = Table::new();
    table.set_header([
        "id",
        "type",
        "reason",
        "attempts",
        "first failure",
        "last failure",
        "status",
    ]);
    for stored in stored {
        let dead_letter = &stored.dead_letter;
        table.add_row([
            dead_letter.event.id.clone(),
            dead_letter.event.ty.clone(),
            format!("{} ({})", dead_letter.reason, dead_letter.error_kind),
            dead_letter.attempts.to_string(),
            dead_letter.first_failure_at.to_rfc3339(),
            dead_letter.last_failure_at.to_rfc3339(),
            stored.status.to_string(),
        ]);
    }
    table
}

/// Prints `value` as indented JSON.
fn print_json(value: &impl Serialize) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    out.flush()?;
    Ok(())
}

/// Parses `--group`.
fn parse_group(name: &str) -> Result<GroupName, String> {
    GroupName::new(name).map_err(|error| error.to_string())
}
