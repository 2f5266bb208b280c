//! `herald groups`: the consumer groups of the embedded broker.
//!
//! `herald groups lag` shows how far a group is behind on a topic: for each partition, its
//! head (the offset after its last message), the group's committed offset as last made
//! durable in the log, and the lag between them — the numbers a running consumer exports
//! as the gauge `herald_consumer_lag`. The command opens the log, so it runs while no
//! consumer has the data directory open (the log's lock keeps them apart); it creates
//! neither the topic nor the group.

use std::io::{self, Write};
use std::path::Path;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use comfy_table::Table;
use herald_core::broker::{self, GroupName, PartitionLag, Subscriber as _, TopicName};
use herald_log::broker::{Broker, BrokerOptions};
use serde::Serialize;

use crate::store;

/// The `herald groups` subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Show how far a consumer group is behind on a topic, partition by partition.
    ///
    /// A table of partition, head (the offset after its last message), committed (the
    /// group's durable committed offset) and lag (head - committed), with the totals; with
    /// --json, one JSON object: `{"topic", "group", "head", "committed", "lag",
    /// "partitions": [{"partition", "head", "committed", "lag"}]}`. A group that never
    /// committed has committed 0 everywhere.
    Lag(LagArgs),
}

/// Arguments of `herald groups lag`.
#[derive(Debug, Args)]
pub(crate) struct LagArgs {
    /// The topic.
    #[arg(long, value_parser = parse_topic)]
    topic: TopicName,

    /// The consumer group.
    #[arg(long, value_parser = parse_group)]
    group: GroupName,

    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// A group's lag on a topic as printed by `lag --json`.
#[derive(Debug, Serialize)]
struct LagOutput<'a> {
    topic: &'a str,
    group: &'a str,
    // The totals over every partition.
    head: u64,
    committed: u64,
    lag: u64,
    partitions: Vec<PartitionOutput>,
}

/// One partition in [`LagOutput`].
#[derive(Debug, Serialize)]
struct PartitionOutput {
    partition: u32,
    head: u64,
    committed: u64,
    lag: u64,
}

/// Runs a `groups` subcommand against the log in `data_dir`.
pub(crate) async fn run(command: Command, data_dir: &Path) -> anyhow::Result<()> {
    let log = store::open_existing(data_dir).await?;
    let broker = Broker::new(log.clone(), BrokerOptions::default());
    let work = async {
        let result = match command {
            Command::Lag(args) => lag(&broker, &args).await,
        };
        broker.shutdown().await;
        result
    };
    store::closing(&log, work).await
}

/// What the user can do about `error`, when it is a broker error they can act on.
pub(crate) fn hint(error: &anyhow::Error) -> Option<String> {
    error
        .chain()
        .find_map(|cause| match cause.downcast_ref::<broker::Error>()? {
            broker::Error::UnknownTopic { topic } => Some(format!(
                "a topic exists once an event was published to it or a consumer subscribed to \
             it; check the spelling of `{topic}`, and that --data-dir (HERALD_DATA_DIR) is \
             the consumer's data directory"
            )),
            _ => None,
        })
}

/// `herald groups lag`.
async fn lag(broker: &Broker, args: &LagArgs) -> anyhow::Result<()> {
    let LagArgs { topic, group, json } = args;
    let partitions = broker
        .lag(topic, group)
        .await
        .with_context(|| format!("cannot read the lag of group `{group}` on topic `{topic}`"))?;
    let output = output(topic, group, &partitions);
    if output.committed == 0 {
        eprintln!(
            "note: group `{group}` has committed nothing on topic `{topic}` (a group that has \
             not consumed yet, or a misspelt name)"
        );
    }
    let mut out = io::stdout().lock();
    if *json {
        serde_json::to_writer_pretty(&mut out, &output)?;
        writeln!(out)?;
    } else {
        writeln!(out, "{}", table(&output))?;
    }
    out.flush()?;
    Ok(())
}

fn output<'a>(
    topic: &'a TopicName,
    group: &'a GroupName,
    partitions: &[PartitionLag],
) -> LagOutput<'a> {
    LagOutput {
        topic: topic.as_str(),
        group: group.as_str(),
        head: partitions.iter().map(|p| p.head).sum(),
        committed: partitions.iter().map(|p| p.committed).sum(),
        lag: partitions.iter().map(|p| p.lag).sum(),
        partitions: partitions
            .iter()
            .map(|p| PartitionOutput {
                partition: p.partition,
                head: p.head,
                committed: p.committed,
                lag: p.lag,
            })
            .collect(),
    }
}

/// The `lag` table: one row per partition, then the totals.
fn table(output: &LagOutput<'_>) -> Table {
    let mut table = Table::new();
    table.set_header(["partition", "head", "committed", "lag"]);
    for partition in &output.partitions {
        table.add_row([
            partition.partition.to_string(),
            partition.head.to_string(),
            partition.committed.to_string(),
            partition.lag.to_string(),
        ]);
    }
    table.add_row([
        "total".to_owned(),
        output.head.to_string(),
        output.committed.to_string(),
        output.lag.to_string(),
    ]);
    table
}

/// Parses `--topic`, naming a topic (not a stream) in the error.
fn parse_topic(name: &str) -> Result<TopicName, String> {
    TopicName::new(name)
        .map_err(|error| format!("invalid topic name {:?}: {}", error.name, error.reason))
}

/// Parses `--group`, naming a group (not a stream) in the error.
fn parse_group(name: &str) -> Result<GroupName, String> {
    GroupName::new(name)
        .map_err(|error| format!("invalid group name {:?}: {}", error.name, error.reason))
}
