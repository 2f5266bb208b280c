//! `herald bench pubsub`: publish → handler throughput and latency through the durable
//! embedded broker and the consumer runtime, next to a bare tokio channel measured in the
//! same run.
//!
//! # What is measured
//!
//! Every broker scenario opens a fresh log (fsync on, the default durability) in the bench
//! directory, puts an embedded [`Broker`] on it, creates the topic `bench` with
//! `--partitions` partitions, and starts 1 or 4 members of the consumer group `bench`, each
//! a [`ConsumerService`] with the default [`ConsumerOptions`]. Then `--publishers` tasks
//! publish `--batch-size` events per [`Publisher::publish`] call (the broker groups each
//! batch by partition, one log append per partition) until `--events` events or
//! `--duration-secs` seconds. Each event is `--event-bytes` (500) bytes of structured JSON
//! whose `data` carries its sequence number and its publish time; the handler deserialises
//! it, marks the sequence number seen (duplicates are counted, not timed) and records
//! `now − publish time` in a histogram. A scenario ends when every published event has
//! been handled once.
//!
//! - **full**: the default [`Pipeline`](herald_runtime::Pipeline) (trace, metrics,
//!   dead-letter, retry, timeout) around the [`Router`], built by
//!   [`PipelineOptions::build`] with the default retry options and a 30 s timeout.
//! - **bare**: the same [`Router`] and handler, called by the same consumer loop (receive,
//!   per-key scheduling, ack), with no layer around it: only an adapter that turns the
//!   router's `Result<Outcome, HandlerError>` into the `Result<Outcome, Infallible>` the
//!   consumer takes (an error — never expected here — becomes [`Outcome::Skipped`], so the
//!   event is reported as not delivered).
//! - **channel_baseline**: the same publishers make the same events and send them one by
//!   one into a bounded tokio `mpsc` channel (capacity 1024); one task receives them and
//!   runs the same handler code (deserialise, mark, record). No broker, no disk.
//! - **consumers_1_full_half_rate**: `consumers_1_full` again, with the publishers paced to
//!   half of the rate `consumers_1_full` reached. Here each event is stamped with the time
//!   its batch was *due*, not the time it was sent, so a publisher falling behind shows up
//!   as latency instead of hiding it (no coordinated omission).
//! - **consumers_1_bare_half_rate**: the same, with the bare stack, at the same rate.
//! - **disk_floor_half_rate**: the latency floor of a durable append on this disk at that
//!   same rate, for as long: a group commit of raw `write` + `fdatasync` with nothing else
//!   in the way ([`baseline::group_commit_floor`]). Its p99 is the least any durable
//!   broker could reach here in this run; a disk stall raises it as it raises the log's.
//!
//! CPU time is the whole process's user + system time from `/proc/self/stat` (Linux only;
//! in clock ticks of 1/100 s), over the same span as the throughput. The middleware's cost
//! is `cpu_us_per_event(full) − cpu_us_per_event(bare)`, end to end from the two half-rate
//! runs (same rate, same publishing work, so the difference is the consumer's), also from
//! the max-rate runs with 1 and 4 consumers (noisier: at saturation the backlog, hence
//! the work per event, differs from run to run), and isolated: the pipeline and the bare
//! router called in a loop on one task with no broker, the least noisy.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use comfy_table::Table;
use futures::FutureExt as _;
use futures::future::{BoxFuture, Map};
use hdrhistogram::Histogram;
use herald_core::Event;
use herald_core::broker::{GroupName, Message, Publisher, Subscriber, TopicName};
use herald_log::broker::{Broker, BrokerOptions};
use herald_runtime::{
    ConsumerOptions, ConsumerService, DeadLetterStore, Delivery, HandlerContext, HandlerError,
    InMemoryDeadLetterStore, Outcome, PipelineOptions, Router, SystemClock, UnknownType,
};
use rand::SeedableRng as _;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower::{Service, ServiceExt as _};

use super::baseline;
use super::{BenchDir, Goal, Progress, latency_histogram, positive_secs, record, round3};
use crate::store::{self, Options};

/// Arguments of `herald bench pubsub`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Print a JSON document instead of a table.
    #[arg(long)]
    json: bool,

    /// How long each scenario publishes, in seconds (unless --events is given).
    #[arg(long, default_value_t = 5.0, value_name = "SECS")]
    duration_secs: f64,

    /// Publish exactly this many events in each scenario instead of --duration-secs.
    #[arg(long, value_name = "N")]
    events: Option<u64>,

    /// How many tasks publish concurrently.
    #[arg(long, default_value_t = 8, value_name = "N")]
    publishers: u64,

    /// How many events each publish call carries.
    #[arg(long, default_value_t = 64, value_name = "N")]
    batch_size: u64,

    /// The partitions of the benchmark topic.
    #[arg(long, default_value_t = 8, value_name = "N")]
    partitions: u32,

    /// The size of each event's structured JSON, in bytes.
    #[arg(long, default_value_t = 500, value_name = "BYTES")]
    event_bytes: usize,

    /// Runs only the named scenarios (repeatable), e.g. to profile one; the report then
    /// lacks the figures derived from the others. A half-rate scenario needs
    /// `consumers_1_full`, whose rate it halves, or `--full-rate`; `isolated_pipeline` names
    /// the isolated middleware measurement.
    #[arg(long = "scenario", value_name = "NAME", hide = true)]
    scenarios: Vec<String>,

    /// The rate the half-rate scenarios halve, in events per second, instead of the one
    /// `consumers_1_full` reaches in this run (to rerun them alone at a known rate).
    #[arg(long, value_name = "EVENTS_PER_SEC", hide = true)]
    full_rate: Option<f64>,
}

/// The most events one scenario publishes in a `--duration-secs` run: the size of the
/// bitmap of sequence numbers seen (8 MiB).
const DURATION_EVENTS_MAX: u64 = 64 * 1024 * 1024;

/// How long a scenario may go without handling a new event before it fails.
const STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the members get to join their group before publishing starts, so that no
/// rebalance happens mid-run.
const JOIN_GRACE: Duration = Duration::from_millis(300);

/// The scenarios paced to half of `consumers_1_full`'s rate, and their stacks.
const HALF_RATE_SCENARIOS: [(&str, Stack); 2] = [
    ("consumers_1_full_half_rate", Stack::Full),
    ("consumers_1_bare_half_rate", Stack::Bare),
];

/// The name of the isolated middleware measurement, for `--scenario`.
const ISOLATED: &str = "isolated_pipeline";

/// Every name `--scenario` accepts, in the order they run.
const SCENARIO_NAMES: [&str; 9] = [
    "consumers_1_full",
    "consumers_1_bare",
    "consumers_4_full",
    "consumers_4_bare",
    "channel_baseline",
    "consumers_1_full_half_rate",
    "consumers_1_bare_half_rate",
    DISK_FLOOR,
    ISOLATED,
];

/// The name of the disk's latency floor at half rate.
const DISK_FLOOR: &str = "disk_floor_half_rate";

/// The handler stack a broker scenario runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stack {
    /// The default [`Pipeline`](herald_runtime::Pipeline).
    Full,
    /// The router alone (see the module documentation).
    Bare,
}

impl Stack {
    fn name(self) -> &'static str {
        match self {
            Stack::Full => "full",
            Stack::Bare => "bare",
        }
    }
}

/// One scenario of the run.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Scenario {
    /// Through the broker and the consumer runtime.
    Broker {
        name: &'static str,
        consumers: u64,
        stack: Stack,
        /// Publish at this many events per second in all; `None`: as fast as possible.
        rate: Option<f64>,
    },
    /// Through a bounded tokio channel.
    Channel,
    /// Raw `write` + `fdatasync` group commits of events arriving at this rate.
    DiskFloor {
        /// Events per second.
        rate: f64,
    },
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Broker { name, .. } => name,
            Scenario::Channel => "channel_baseline",
            Scenario::DiskFloor { .. } => DISK_FLOOR,
        }
    }
}

/// When the publishers of a scenario stop.
#[derive(Debug, Clone, Copy)]
enum Limit {
    /// After this many events in all.
    Events(u64),
    /// After this long.
    Duration(Duration),
}

impl Limit {
    /// The most events the scenario publishes.
    fn events_max(self) -> u64 {
        match self {
            Limit::Events(events) => events,
            Limit::Duration(_) => DURATION_EVENTS_MAX,
        }
    }

    fn goal(self) -> Goal {
        match self {
            Limit::Events(events) => Goal::Events(events),
            Limit::Duration(duration) => Goal::Duration(duration),
        }
    }
}

/// The report of `herald bench pubsub --json`.
#[derive(Debug, Serialize)]
struct Report<'a> {
    bench: &'static str,
    /// The directory measured.
    dir: String,
    /// Its file system type.
    filesystem: Option<&'a str>,
    /// The log's durability setting.
    durability: &'static str,
    /// The size of each event's structured JSON.
    event_bytes: usize,
    /// Concurrent publishing tasks.
    publishers: u64,
    /// Events per publish call (per channel send: 1).
    batch_size: u64,
    /// Partitions of the topic.
    partitions: u32,
    /// Handlers in flight per consumer (the default `in_flight_max`).
    in_flight_max: usize,
    /// What the `bare` scenarios run.
    bare_stack: &'static str,
    /// The source of the CPU figures.
    cpu_clock: &'static str,
    scenarios: Vec<Row>,
    /// The middleware's CPU cost per event, full minus bare.
    middleware: Middleware,
    /// The targets of the issue, against what was measured.
    targets: Targets,
}

/// The figures of one scenario.
#[derive(Debug, Serialize)]
struct Row {
    scenario: &'static str,
    /// Members of the consumer group (`None` for the channel).
    consumers: Option<u64>,
    /// `full`, `bare`, or `channel`.
    stack: &'static str,
    /// The paced publish rate, events per second (`None`: as fast as possible).
    target_rate: Option<f64>,
    /// Events published.
    published: u64,
    /// Distinct events handled: equals `published` when everything was delivered.
    events: u64,
    /// Deliveries of events already handled (redeliveries), not timed.
    duplicates: u64,
    /// From the first publish to the last event handled.
    seconds: f64,
    events_per_sec: f64,
    /// Publish → handler latency percentiles.
    p50_us: u64,
    p99_us: u64,
    p999_us: u64,
    /// Process CPU time (user + system) per event handled.
    cpu_us_per_event: Option<f64>,
    /// `events_per_sec` over `channel_baseline`'s.
    ratio_to_channel_baseline: f64,
}

/// The CPU cost of the default middleware stack over a bare handler, µs per event.
#[derive(Debug, Serialize)]
struct Middleware {
    /// End to end, 1 consumer, at the same paced rate: `consumers_1_full_half_rate` minus
    /// `consumers_1_bare_half_rate`.
    middleware_cpu_us_per_event: Option<f64>,
    /// End to end at max rate, 1 consumer: `consumers_1_full` minus `consumers_1_bare`.
    middleware_cpu_us_per_event_max_rate: Option<f64>,
    /// End to end at max rate, 4 consumers: `consumers_4_full` minus `consumers_4_bare`.
    middleware_cpu_us_per_event_max_rate_4_consumers: Option<f64>,
    /// Isolated: the default pipeline called in a loop on one task, no broker.
    isolated_full_cpu_us_per_event: Option<f64>,
    /// Isolated: the bare router called in a loop on one task, no broker.
    isolated_bare_cpu_us_per_event: Option<f64>,
    /// `isolated_full − isolated_bare`.
    isolated_middleware_cpu_us_per_event: Option<f64>,
    /// Calls per isolated measurement.
    isolated_calls: u64,
}

/// The targets against the figures.
#[derive(Debug, Serialize)]
struct Targets {
    /// At least 100k events/s end to end, durable: the best of the `full` scenarios.
    throughput_events_per_sec: f64,
    throughput_target: f64,
    throughput_met: bool,
    /// p99 at most 10 ms at half of the maximum rate (`consumers_1_full_half_rate`).
    half_rate_p99_us: Option<u64>,
    half_rate_p99_target_us: u64,
    half_rate_p99_met: Option<bool>,
    /// The p99 of `disk_floor_half_rate`: the least a durable broker could reach on this
    /// disk at that rate in this run. Above the target, the target is out of reach here.
    half_rate_p99_disk_floor_us: Option<u64>,
    /// At most 2 µs of CPU per event for the middleware (end to end, 1 consumer, at half
    /// rate).
    middleware_cpu_us_per_event: Option<f64>,
    middleware_cpu_target_us: f64,
    middleware_cpu_met: Option<bool>,
}

/// What one scenario measured.
struct Measured {
    published: u64,
    events: u64,
    duplicates: u64,
    seconds: f64,
    cpu_seconds: Option<f64>,
    latencies: Histogram<u64>,
}

impl Measured {
    fn events_per_sec(&self) -> f64 {
        self.events as f64 / self.seconds.max(1e-9)
    }

    fn cpu_us_per_event(&self) -> Option<f64> {
        self.cpu_seconds
            .map(|cpu| cpu * 1e6 / self.events.max(1) as f64)
    }
}

/// Runs `herald bench pubsub` in `dir`.
pub(crate) async fn run(args: Args, dir: &BenchDir) -> anyhow::Result<()> {
    let limit = match args.events {
        Some(0) => anyhow::bail!("--events must be at least 1"),
        Some(events) if events > DURATION_EVENTS_MAX => {
            anyhow::bail!("--events must be at most {DURATION_EVENTS_MAX}")
        }
        Some(events) => Limit::Events(events),
        None => Limit::Duration(positive_secs("--duration-secs", args.duration_secs)?),
    };
    anyhow::ensure!(args.publishers > 0, "--publishers must be at least 1");
    anyhow::ensure!(args.batch_size > 0, "--batch-size must be at least 1");
    anyhow::ensure!(args.partitions > 0, "--partitions must be at least 1");
    let maker = StampMaker::new(args.event_bytes);
    let event_bytes = maker.event(0, 0).to_json().len();
    let settings = Settings {
        publishers: args.publishers,
        batch_size: args.batch_size,
        partitions: args.partitions,
        limit,
        maker,
    };

    for name in &args.scenarios {
        anyhow::ensure!(
            SCENARIO_NAMES.contains(&name.as_str()),
            "unknown scenario {name}; the scenarios are {}",
            SCENARIO_NAMES.join(", ")
        );
    }
    let selected =
        |name: &str| args.scenarios.is_empty() || args.scenarios.iter().any(|other| other == name);
    let half_rate_selected = HALF_RATE_SCENARIOS.iter().any(|&(name, _)| selected(name));
    anyhow::ensure!(
        !half_rate_selected || selected("consumers_1_full") || args.full_rate.is_some(),
        "the half-rate scenarios need consumers_1_full, whose rate they halve, or --full-rate"
    );
    if let Some(rate) = args.full_rate {
        anyhow::ensure!(
            rate.is_finite() && rate > 0.0,
            "--full-rate must be a positive number of events per second"
        );
    }

    let broker = |name, consumers, stack| Scenario::Broker {
        name,
        consumers,
        stack,
        rate: None,
    };
    let mut results: Vec<(Scenario, Measured)> = Vec::new();
    for scenario in [
        broker("consumers_1_full", 1, Stack::Full),
        broker("consumers_1_bare", 1, Stack::Bare),
        broker("consumers_4_full", 4, Stack::Full),
        broker("consumers_4_bare", 4, Stack::Bare),
        Scenario::Channel,
    ] {
        if !selected(scenario.name()) {
            continue;
        }
        let measured = run_scenario(scenario, dir, &settings).await?;
        results.push((scenario, measured));
    }
    let full_rate = args.full_rate.or_else(|| {
        results
            .iter()
            .find(|(scenario, _)| scenario.name() == "consumers_1_full")
            .map(|(_, measured)| measured.events_per_sec())
    });
    for (name, stack) in HALF_RATE_SCENARIOS {
        if !selected(name) {
            continue;
        }
        let scenario = Scenario::Broker {
            name,
            consumers: 1,
            stack,
            rate: full_rate.map(|rate| round3(rate / 2.0)),
        };
        let measured = run_scenario(scenario, dir, &settings).await?;
        results.push((scenario, measured));
    }
    if let Some(rate) = full_rate.filter(|_| selected(DISK_FLOOR)) {
        let scenario = Scenario::DiskFloor {
            rate: round3(rate / 2.0),
        };
        let measured = run_scenario(scenario, dir, &settings).await?;
        results.push((scenario, measured));
    }

    let isolated_calls = limit.events_max().clamp(1, 200_000);
    let isolated = if selected(ISOLATED) {
        eprintln!("{ISOLATED}: {isolated_calls} calls of each stack on one task");
        isolated_cpu(isolated_calls, &settings.maker).await?
    } else {
        (None, None)
    };

    let report = report(
        dir,
        &settings,
        event_bytes,
        &results,
        isolated,
        isolated_calls,
    );
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{}", table(&report.scenarios));
        println!("{}", middleware_table(&report));
    }
    Ok(())
}

/// What every scenario shares.
struct Settings {
    publishers: u64,
    batch_size: u64,
    partitions: u32,
    limit: Limit,
    maker: StampMaker,
}

/// Runs one scenario and says on stderr what it measured.
async fn run_scenario(
    scenario: Scenario,
    dir: &BenchDir,
    settings: &Settings,
) -> anyhow::Result<Measured> {
    let measured = match scenario {
        Scenario::Broker {
            name,
            consumers,
            stack,
            rate,
        } => {
            let log_dir = dir.log_dir(name);
            let log = store::open(Options::new(&log_dir)).await?;
            let measured = store::closing(
                &log,
                drive_broker(&log, name, consumers, stack, rate, settings),
            )
            .await
            .with_context(|| format!("scenario {name} failed"));
            // Each scenario's log can be hundreds of MB: free the space before the next.
            if let Err(error) = dir.remove_log_dir(name) {
                eprintln!("warning: cannot remove {}: {error}", log_dir.display());
            }
            measured?
        }
        Scenario::Channel => drive_channel(settings)
            .await
            .context("scenario channel_baseline failed")?,
        Scenario::DiskFloor { rate } => disk_floor(dir, rate, settings)
            .await
            .with_context(|| format!("scenario {DISK_FLOOR} failed"))?,
    };
    eprintln!(
        "{}: {} of {} events in {:.1} s, {:.0} events/s, p99 {} µs",
        scenario.name(),
        measured.events,
        measured.published,
        measured.seconds,
        measured.events_per_sec(),
        measured.latencies.value_at_quantile(0.99),
    );
    anyhow::ensure!(
        measured.events == measured.published,
        "scenario {}: only {} of the {} published events were handled",
        scenario.name(),
        measured.events,
        measured.published
    );
    Ok(measured)
}

/// Makes the benchmark's events: JSON payloads carrying a sequence number and a publish
/// time, padded so that each structured event is about `event_bytes` long.
///
/// The payload is serialised straight from a borrowed struct, as an application publishing
/// a typed event would do it, and the padding, the same for every event, is serialised
/// once: making the events is the publishers' work, not Herald's, and should cost the
/// run as little as it can.
#[derive(Debug, Clone)]
struct StampMaker {
    /// The padding, as a JSON string.
    padding: Arc<RawValue>,
}

/// An event's `data` as published. Fixed-width decimal strings keep every event the same
/// size; the fields are in the order a JSON object map would sort them.
#[derive(Debug, Serialize)]
struct StampData<'a> {
    padding: &'a RawValue,
    sent_ns: FixedWidth,
    seq: FixedWidth,
}

/// A number written as a 20-digit decimal string, without an intermediate `String`.
#[derive(Debug, Clone, Copy)]
struct FixedWidth(u64);

impl Serialize for FixedWidth {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut digits = [b'0'; 20];
        let mut rest = self.0;
        for digit in digits.iter_mut().rev() {
            *digit = b'0' + (rest % 10) as u8;
            rest /= 10;
        }
        serializer.serialize_str(std::str::from_utf8(&digits).expect("ASCII digits"))
    }
}

/// An event's `data`, as the handler reads it.
#[derive(Debug, Clone, Copy, Deserialize)]
struct Stamp {
    /// The event's sequence number in its scenario.
    #[serde(deserialize_with = "fixed_width")]
    seq: u64,
    /// When it was published, in ns since the scenario's epoch.
    #[serde(deserialize_with = "fixed_width")]
    sent_ns: u64,
}

/// Reads a [`FixedWidth`] number from its string, borrowing the text rather than
/// allocating a `String` for it.
fn fixed_width<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    struct Digits;
    impl serde::de::Visitor<'_> for Digits {
        type Value = u64;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a decimal number as a string")
        }
        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<u64, E> {
            text.parse().map_err(E::custom)
        }
    }
    deserializer.deserialize_str(Digits)
}

impl StampMaker {
    /// The type of the benchmark's events.
    const TYPE: &'static str = "BenchEvent";

    fn new(event_bytes: usize) -> StampMaker {
        let padding = |len: usize| {
            serde_json::value::to_raw_value(&"x".repeat(len)).expect("a string serialises")
        };
        let bare = Self::build(&padding(0), 0, 0).to_json().len();
        StampMaker {
            padding: padding(event_bytes.saturating_sub(bare)).into(),
        }
    }

    /// The `seq`-th event, published `sent_ns` after the epoch.
    fn event(&self, seq: u64, sent_ns: u64) -> Event {
        Self::build(&self.padding, seq, sent_ns)
    }

    fn build(padding: &RawValue, seq: u64, sent_ns: u64) -> Event {
        let data = StampData {
            padding,
            sent_ns: FixedWidth(sent_ns),
            seq: FixedWidth(seq),
        };
        Event::new("/herald/bench", Self::TYPE)
            .with_data_as(&data)
            .expect("a struct of strings serialises")
    }
}

/// Where the handlers of one scenario report: which events were seen and how late.
struct Sink {
    /// The scenario's time origin, which the publish times count from.
    epoch: Instant,
    /// One bit per sequence number.
    seen: Vec<AtomicU64>,
    /// Distinct events handled.
    distinct: Arc<AtomicU64>,
    /// Events handled again.
    duplicates: AtomicU64,
    /// Events whose data made no sense (sequence number out of range; in the channel
    /// baseline also data that does not parse).
    malformed: AtomicU64,
    /// When the last new event was handled, ns since the epoch.
    last_ns: AtomicU64,
    latencies: Mutex<Histogram<u64>>,
}

impl Sink {
    fn new(events_max: u64) -> Arc<Sink> {
        let words = usize::try_from(events_max.div_ceil(64)).unwrap_or(usize::MAX);
        Arc::new(Sink {
            epoch: Instant::now(),
            seen: (0..words).map(|_| AtomicU64::new(0)).collect(),
            distinct: Arc::new(AtomicU64::new(0)),
            duplicates: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
            last_ns: AtomicU64::new(0),
            latencies: Mutex::new(latency_histogram()),
        })
    }

    /// The time since the epoch, in ns.
    fn now_ns(&self) -> u64 {
        nanos(self.epoch.elapsed())
    }

    /// What a handler does with an event: mark it seen and, the first time, time it.
    fn handle(&self, stamp: &Stamp) {
        let now_ns = self.now_ns();
        let Stamp { seq, sent_ns } = *stamp;
        let Some(word) = usize::try_from(seq / 64)
            .ok()
            .and_then(|word| self.seen.get(word))
        else {
            self.malformed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let bit = 1 << (seq % 64);
        if word.fetch_or(bit, Ordering::Relaxed) & bit != 0 {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
            return;
        }
        record(
            &mut self.latencies.lock().expect("not poisoned"),
            Duration::from_nanos(now_ns.saturating_sub(sent_ns)),
        );
        self.last_ns.fetch_max(now_ns, Ordering::Relaxed);
        self.distinct.fetch_add(1, Ordering::Release);
    }

    /// Waits until `published` distinct events were handled; fails when none is for
    /// [`STALL_TIMEOUT`].
    async fn wait_for(&self, published: u64) -> anyhow::Result<()> {
        let mut last = self.distinct.load(Ordering::Acquire);
        let mut last_progress = Instant::now();
        while last < published {
            tokio::time::sleep(Duration::from_millis(1)).await;
            let now = self.distinct.load(Ordering::Acquire);
            if now > last {
                last = now;
                last_progress = Instant::now();
            } else if last_progress.elapsed() > STALL_TIMEOUT {
                anyhow::bail!(
                    "{} of {published} events handled, none for {} s ({} malformed)",
                    now,
                    STALL_TIMEOUT.as_secs(),
                    self.malformed.load(Ordering::Relaxed)
                );
            }
        }
        Ok(())
    }

    /// What the scenario measured, from `start_ns` (since the epoch) to the last event
    /// handled.
    fn measured(&self, published: u64, start_ns: u64, cpu_seconds: Option<f64>) -> Measured {
        let last_ns = self.last_ns.load(Ordering::Relaxed);
        Measured {
            published,
            events: self.distinct.load(Ordering::Acquire),
            duplicates: self.duplicates.load(Ordering::Relaxed),
            seconds: last_ns.saturating_sub(start_ns) as f64 / 1e9,
            cpu_seconds,
            latencies: self.latencies.lock().expect("not poisoned").clone(),
        }
    }
}

/// `duration` in ns, saturating.
fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// The router of every broker scenario: the benchmark's handler for [`StampMaker::TYPE`];
/// any other type is dead-lettered (so it would show as not delivered).
fn router(sink: &Arc<Sink>) -> Router {
    let sink = Arc::clone(sink);
    Router::new()
        .unknown_type(UnknownType::DeadLetter)
        .on::<Stamp, _>(
            StampMaker::TYPE,
            move |stamp: Stamp, _ctx: HandlerContext| {
                sink.handle(&stamp);
                std::future::ready(Ok::<(), HandlerError>(()))
            },
        )
}

/// The default middleware stack around `router`, as every consumer would build it; the
/// timeout is set explicitly since `PipelineOptions::default()` has none configured.
fn full_pipeline(router: Router) -> herald_runtime::Pipeline {
    PipelineOptions {
        timeout_ms: 30_000,
        ..PipelineOptions::default()
    }
    .build(
        router,
        rand::rngs::StdRng::from_entropy(),
        Arc::new(SystemClock),
    )
}

/// The bare stack: the router with no layer, adapted to the consumer's infallible
/// service type. A handler error (never expected) becomes [`Outcome::Skipped`].
#[derive(Clone)]
struct Bare(Router);

/// Turns the router's result into the bare stack's.
fn bare_result(result: Result<Outcome, HandlerError>) -> Result<Outcome, Infallible> {
    Ok(result.unwrap_or(Outcome::Skipped))
}

/// The future of [`Bare`]: the router's, mapped by [`bare_result`] (no extra allocation).
type BareFuture = Map<
    BoxFuture<'static, Result<Outcome, HandlerError>>,
    fn(Result<Outcome, HandlerError>) -> Result<Outcome, Infallible>,
>;

impl Service<Delivery> for Bare {
    type Response = Outcome;
    type Error = Infallible;
    type Future = BareFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, delivery: Delivery) -> BareFuture {
        self.0
            .call(delivery)
            .map(bare_result as fn(_) -> Result<Outcome, Infallible>)
    }
}

/// The process's CPU time (user + system, every thread) from `/proc/self/stat`, in
/// seconds; `None` where there is no such file.
pub(super) fn process_cpu_seconds() -> Option<f64> {
    /// Linux reports CPU times in `USER_HZ` ticks, 100 per second on every architecture.
    const TICKS_PER_SEC: f64 = 100.0;
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may contain spaces: count fields after its `)`. Field 3
    // (state) is the first there; utime and stime are fields 14 and 15.
    let mut fields = stat.get(stat.rfind(')')? + 1..)?.split_whitespace();
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / TICKS_PER_SEC)
}

/// CPU seconds between two readings.
pub(super) fn cpu_between(start: Option<f64>, end: Option<f64>) -> Option<f64> {
    Some(end? - start?)
}

/// Runs a broker scenario on `log`.
async fn drive_broker(
    log: &store::Log,
    name: &str,
    consumers: u64,
    stack: Stack,
    rate: Option<f64>,
    settings: &Settings,
) -> anyhow::Result<Measured> {
    let broker = Broker::new(log.clone(), BrokerOptions::new());
    let topic = TopicName::new("bench")?;
    let group = GroupName::new("bench")?;
    broker
        .create_topic(&topic, settings.partitions)
        .await
        .context("cannot create the topic")?;
    let sink = Sink::new(settings.limit.events_max());
    let router = router(&sink);

    let shutdown = CancellationToken::new();
    let mut members = JoinSet::new();
    for _ in 0..consumers {
        let subscriber: Arc<dyn Subscriber> = Arc::new(broker.clone());
        let publisher: Arc<dyn Publisher> = Arc::new(broker.clone());
        let dead_letters: Arc<dyn DeadLetterStore> = Arc::new(InMemoryDeadLetterStore::new());
        let options = ConsumerOptions::default();
        match stack {
            Stack::Full => {
                let consumer: ConsumerService = options.build(
                    subscriber,
                    publisher,
                    dead_letters,
                    topic.clone(),
                    group.clone(),
                    full_pipeline(router.clone()),
                )?;
                members.spawn(consumer.run(shutdown.clone()));
            }
            Stack::Bare => {
                let consumer = options.build(
                    subscriber,
                    publisher,
                    dead_letters,
                    topic.clone(),
                    group.clone(),
                    Bare(router.clone()),
                )?;
                members.spawn(consumer.run(shutdown.clone()));
            }
        }
    }
    tokio::time::sleep(JOIN_GRACE).await;

    let publishing = Publishing {
        broker: broker.clone(),
        topic,
        sink: Arc::clone(&sink),
        next_seq: Arc::new(AtomicU64::new(0)),
        maker: settings.maker.clone(),
        batch_size: settings.batch_size,
        events_max: settings.limit.events_max(),
        // Each publisher's share of the rate, as the time between its batches.
        batch_interval: rate.map(|rate| {
            Duration::from_secs_f64(
                settings.batch_size as f64 * settings.publishers as f64 / rate.max(1e-9),
            )
        }),
    };
    let progress = Progress::start(
        &format!("{name} ({})", stack.name()),
        settings.limit.goal(),
        Arc::clone(&sink.distinct),
    );
    let cpu_start = process_cpu_seconds();
    let start_ns = sink.now_ns();
    let deadline = match settings.limit {
        Limit::Events(_) => None,
        Limit::Duration(duration) => Some(Instant::now() + duration),
    };
    let mut publishers = JoinSet::new();
    for publisher in 0..settings.publishers {
        // Paced publishers are spread evenly over one batch interval, so that the batches
        // arrive at a steady rate rather than all at once.
        let offset = publishing
            .batch_interval
            .map_or(Duration::ZERO, |interval| {
                interval.mul_f64(publisher as f64 / settings.publishers as f64)
            });
        publishers.spawn(publishing.clone().run(Instant::now() + offset, deadline));
    }
    let mut published = 0;
    let mut failure = None;
    while let Some(joined) = publishers.join_next().await {
        match joined
            .context("a publisher task panicked")
            .and_then(|result| result)
        {
            Ok(count) => published += count,
            Err(error) => failure = failure.or(Some(error)),
        }
    }
    let waited = match failure {
        Some(error) => Err(error),
        None => sink.wait_for(published).await,
    };
    let cpu_end = process_cpu_seconds();
    progress.finish();

    // Members stop together. Each leave rebalances the group under the others, so acks
    // they had not applied yet (a member applies acks when its `recv` returns, which on an
    // idle topic is at shutdown) fail with a warning: those events are already counted.
    shutdown.cancel();
    while let Some(joined) = members.join_next().await {
        joined
            .context("a consumer task panicked")?
            .context("a consumer failed")?;
    }
    broker.shutdown().await;
    waited?;
    Ok(sink.measured(published, start_ns, cpu_between(cpu_start, cpu_end)))
}

/// What a publisher task of a broker scenario needs.
#[derive(Clone)]
struct Publishing {
    broker: Broker,
    topic: TopicName,
    sink: Arc<Sink>,
    /// The next sequence number to hand out, shared by the publishers.
    next_seq: Arc<AtomicU64>,
    maker: StampMaker,
    batch_size: u64,
    events_max: u64,
    /// When paced: the time between two batches of this publisher.
    batch_interval: Option<Duration>,
}

impl Publishing {
    /// Publishes batches until `deadline` or until the scenario's events are all taken;
    /// returns how many events this task published.
    /// When paced, the first batch is due at `started`.
    async fn run(self, started: Instant, deadline: Option<Instant>) -> anyhow::Result<u64> {
        let mut published = 0;
        for batch in 0u64.. {
            // Paced: the batch is due at a fixed time and stamped with it, so that a
            // publisher falling behind counts as latency.
            let sent_at = match self.batch_interval {
                Some(interval) => {
                    let due = started + interval.mul_f64(batch as f64);
                    tokio::time::sleep_until(due.into()).await;
                    due
                }
                None => Instant::now(),
            };
            if deadline.is_some_and(|deadline| sent_at >= deadline) {
                break;
            }
            let first = self.next_seq.fetch_add(self.batch_size, Ordering::Relaxed);
            if first >= self.events_max {
                break;
            }
            let len = self.batch_size.min(self.events_max - first);
            let sent_ns = nanos(sent_at.saturating_duration_since(self.sink.epoch));
            let events: Vec<Event> = (first..first + len)
                .map(|seq| self.maker.event(seq, sent_ns))
                .collect();
            self.broker
                .publish(&self.topic, events)
                .await
                .context("cannot publish")?;
            published += len;
        }
        Ok(published)
    }
}

/// The disk's latency floor at `rate` ([`baseline::group_commit_floor`]), for as many
/// events as a scenario publishes: `--events`, or those of `--duration-secs` at that rate.
async fn disk_floor(dir: &BenchDir, rate: f64, settings: &Settings) -> anyhow::Result<Measured> {
    let events = match settings.limit {
        Limit::Duration(duration) => (duration.as_secs_f64() * rate).ceil().max(1.0) as u64,
        Limit::Events(events) => events,
    };
    let path = dir.path().join(DISK_FLOOR);
    let event_bytes = settings.maker.event(0, 0).to_json().len();
    let started = Instant::now();
    let latencies = tokio::task::spawn_blocking(move || {
        baseline::group_commit_floor(&path, rate, event_bytes, events)
    })
    .await
    .context("the disk floor task panicked")??;
    Ok(Measured {
        published: latencies.len(),
        events: latencies.len(),
        duplicates: 0,
        seconds: started.elapsed().as_secs_f64(),
        cpu_seconds: None,
        latencies,
    })
}

/// The channel baseline: the same producers and events, a bounded mpsc, one receiving task
/// running the same handler code.
async fn drive_channel(settings: &Settings) -> anyhow::Result<Measured> {
    const CAPACITY: usize = 1024;
    let sink = Sink::new(settings.limit.events_max());
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Event>(CAPACITY);
    let receiver = {
        let sink = Arc::clone(&sink);
        tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                match event.data_as::<Stamp>() {
                    Ok(Some(stamp)) => sink.handle(&stamp),
                    _ => {
                        sink.malformed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })
    };
    let progress = Progress::start(
        "channel_baseline",
        settings.limit.goal(),
        Arc::clone(&sink.distinct),
    );
    let cpu_start = process_cpu_seconds();
    let start_ns = sink.now_ns();
    let deadline = match settings.limit {
        Limit::Events(_) => None,
        Limit::Duration(duration) => Some(Instant::now() + duration),
    };
    let next_seq = Arc::new(AtomicU64::new(0));
    let mut producers = JoinSet::new();
    for _ in 0..settings.publishers {
        let tx = tx.clone();
        let next_seq = Arc::clone(&next_seq);
        let maker = settings.maker.clone();
        let sink = Arc::clone(&sink);
        let batch_size = settings.batch_size;
        let events_max = settings.limit.events_max();
        producers.spawn(async move {
            let mut sent = 0;
            loop {
                if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                    break;
                }
                let first = next_seq.fetch_add(batch_size, Ordering::Relaxed);
                if first >= events_max {
                    break;
                }
                let len = batch_size.min(events_max - first);
                let sent_ns = sink.now_ns();
                for seq in first..first + len {
                    if tx.send(maker.event(seq, sent_ns)).await.is_err() {
                        return sent;
                    }
                    sent += 1;
                }
            }
            sent
        });
    }
    drop(tx);
    let mut published = 0;
    while let Some(joined) = producers.join_next().await {
        published += joined.context("a producer task panicked")?;
    }
    let waited = sink.wait_for(published).await;
    let cpu_end = process_cpu_seconds();
    progress.finish();
    receiver.await.context("the receiving task panicked")?;
    waited?;
    Ok(sink.measured(published, start_ns, cpu_between(cpu_start, cpu_end)))
}

/// The CPU time per call of the full pipeline and of the bare router, each called `calls`
/// times in a loop on one task with one delivery (after the first call every one is a
/// duplicate to the sink, so the handler deserialises and marks, without timing).
/// Alternates the stacks twice and keeps each one's best, to shed noise.
async fn isolated_cpu(
    calls: u64,
    maker: &StampMaker,
) -> anyhow::Result<(Option<f64>, Option<f64>)> {
    let sink = Sink::new(1);
    let router = router(&sink);
    let message = Message {
        topic: TopicName::new("bench")?,
        partition: 0,
        offset: 0,
        attempt: 1,
        event: maker.event(0, 0),
    };
    let delivery = Delivery::new(message, GroupName::new("bench")?, CancellationToken::new());
    let mut full = full_pipeline(router.clone());
    let mut bare = Bare(router);
    let (mut best_full, mut best_bare) = (None::<f64>, None::<f64>);
    for _ in 0..2 {
        let start = process_cpu_seconds();
        for _ in 0..calls {
            let outcome = full.ready().await?.call(delivery.clone()).await?;
            anyhow::ensure!(matches!(outcome, Outcome::Handled { .. }), "not handled");
        }
        let cpu = cpu_between(start, process_cpu_seconds());
        best_full = min_option(best_full, cpu);
        let start = process_cpu_seconds();
        for _ in 0..calls {
            let outcome = bare.ready().await?.call(delivery.clone()).await?;
            anyhow::ensure!(matches!(outcome, Outcome::Handled { .. }), "not handled");
        }
        let cpu = cpu_between(start, process_cpu_seconds());
        best_bare = min_option(best_bare, cpu);
    }
    let per_call = |cpu: Option<f64>| cpu.map(|cpu| cpu * 1e6 / calls as f64);
    Ok((per_call(best_full), per_call(best_bare)))
}

/// The smaller of two optional readings.
fn min_option(best: Option<f64>, value: Option<f64>) -> Option<f64> {
    match (best, value) {
        (Some(best), Some(value)) => Some(best.min(value)),
        (best, value) => best.or(value),
    }
}

/// The whole report, with ratios and targets.
fn report<'a>(
    dir: &'a BenchDir,
    settings: &Settings,
    event_bytes: usize,
    results: &[(Scenario, Measured)],
    (isolated_full, isolated_bare): (Option<f64>, Option<f64>),
    isolated_calls: u64,
) -> Report<'a> {
    let find = |wanted: &str| {
        results
            .iter()
            .find(|(scenario, _)| scenario.name() == wanted)
            .map(|(_, measured)| measured)
    };
    let channel_rate = find("channel_baseline").map_or(f64::NAN, Measured::events_per_sec);
    let scenarios: Vec<Row> = results
        .iter()
        .map(|(scenario, measured)| {
            let (consumers, stack, target_rate) = match *scenario {
                Scenario::Broker {
                    consumers,
                    stack,
                    rate,
                    ..
                } => (Some(consumers), stack.name(), rate),
                Scenario::Channel => (None, "channel", None),
                Scenario::DiskFloor { rate } => (None, "raw_fdatasync", Some(rate)),
            };
            Row {
                scenario: scenario.name(),
                consumers,
                stack,
                target_rate,
                published: measured.published,
                events: measured.events,
                duplicates: measured.duplicates,
                seconds: round3(measured.seconds),
                events_per_sec: round3(measured.events_per_sec()),
                p50_us: measured.latencies.value_at_quantile(0.5),
                p99_us: measured.latencies.value_at_quantile(0.99),
                p999_us: measured.latencies.value_at_quantile(0.999),
                cpu_us_per_event: measured.cpu_us_per_event().map(round3),
                ratio_to_channel_baseline: round3(measured.events_per_sec() / channel_rate),
            }
        })
        .collect();
    let difference = |full: &str, bare: &str| {
        Some(round3(
            find(full)?.cpu_us_per_event()? - find(bare)?.cpu_us_per_event()?,
        ))
    };
    let middleware = Middleware {
        middleware_cpu_us_per_event: difference(
            "consumers_1_full_half_rate",
            "consumers_1_bare_half_rate",
        ),
        middleware_cpu_us_per_event_max_rate: difference("consumers_1_full", "consumers_1_bare"),
        middleware_cpu_us_per_event_max_rate_4_consumers: difference(
            "consumers_4_full",
            "consumers_4_bare",
        ),
        isolated_full_cpu_us_per_event: isolated_full.map(round3),
        isolated_bare_cpu_us_per_event: isolated_bare.map(round3),
        isolated_middleware_cpu_us_per_event: isolated_full
            .zip(isolated_bare)
            .map(|(full, bare)| round3(full - bare)),
        isolated_calls,
    };
    let throughput = ["consumers_1_full", "consumers_4_full"]
        .into_iter()
        .filter_map(find)
        .map(Measured::events_per_sec)
        .fold(0.0, f64::max);
    let p99 = |name: &str| find(name).map(|measured| measured.latencies.value_at_quantile(0.99));
    let half_rate_p99_us = p99("consumers_1_full_half_rate");
    let targets = Targets {
        throughput_events_per_sec: round3(throughput),
        throughput_target: 100_000.0,
        throughput_met: throughput >= 100_000.0,
        half_rate_p99_us,
        half_rate_p99_target_us: 10_000,
        half_rate_p99_met: half_rate_p99_us.map(|p99| p99 <= 10_000),
        half_rate_p99_disk_floor_us: p99(DISK_FLOOR),
        middleware_cpu_us_per_event: middleware.middleware_cpu_us_per_event,
        middleware_cpu_target_us: 2.0,
        middleware_cpu_met: middleware.middleware_cpu_us_per_event.map(|cpu| cpu <= 2.0),
    };
    Report {
        bench: "pubsub",
        dir: dir.path().display().to_string(),
        filesystem: dir.filesystem(),
        durability: "fsync",
        event_bytes,
        publishers: settings.publishers,
        batch_size: settings.batch_size,
        partitions: settings.partitions,
        in_flight_max: ConsumerOptions::default().in_flight_max,
        bare_stack: "the Router alone in the same consumer loop, no middleware layer",
        cpu_clock: "process user+system time from /proc/self/stat",
        scenarios,
        middleware,
        targets,
    }
}

/// The scenarios as a table.
fn table(rows: &[Row]) -> Table {
    let mut table = Table::new();
    table.set_header([
        "scenario",
        "published",
        "handled",
        "dup",
        "seconds",
        "events/s",
        "p50 µs",
        "p99 µs",
        "p99.9 µs",
        "CPU µs/event",
        "× channel",
    ]);
    for row in rows {
        table.add_row([
            row.scenario.to_owned(),
            row.published.to_string(),
            row.events.to_string(),
            row.duplicates.to_string(),
            format!("{:.1}", row.seconds),
            format!("{:.0}", row.events_per_sec),
            row.p50_us.to_string(),
            row.p99_us.to_string(),
            row.p999_us.to_string(),
            row.cpu_us_per_event
                .map_or_else(|| "-".to_owned(), |cpu| format!("{cpu:.2}")),
            format!("{:.3}", row.ratio_to_channel_baseline),
        ]);
    }
    table
}

/// The middleware cost and the targets as a table.
fn middleware_table(report: &Report<'_>) -> Table {
    let show = |value: Option<f64>| value.map_or_else(|| "-".to_owned(), |v| format!("{v:.3}"));
    let met = |met: Option<bool>| match met {
        Some(true) => "met",
        Some(false) => "missed",
        None => "-",
    };
    let (middleware, targets) = (&report.middleware, &report.targets);
    let mut table = Table::new();
    table.set_header(["measure", "value", "target", ""]);
    table.add_row([
        "best full events/s (durable)".to_owned(),
        format!("{:.0}", targets.throughput_events_per_sec),
        "≥ 100000".to_owned(),
        met(Some(targets.throughput_met)).to_owned(),
    ]);
    table.add_row([
        "p99 at half rate, µs".to_owned(),
        targets
            .half_rate_p99_us
            .map_or_else(|| "-".to_owned(), |p99| p99.to_string()),
        "≤ 10000".to_owned(),
        met(targets.half_rate_p99_met).to_owned(),
    ]);
    table.add_row([
        "p99 at half rate, disk floor (raw fdatasync), µs".to_owned(),
        targets
            .half_rate_p99_disk_floor_us
            .map_or_else(|| "-".to_owned(), |p99| p99.to_string()),
        String::new(),
        String::new(),
    ]);
    table.add_row([
        "middleware CPU µs/event, half rate".to_owned(),
        show(middleware.middleware_cpu_us_per_event),
        "≤ 2".to_owned(),
        met(targets.middleware_cpu_met).to_owned(),
    ]);
    table.add_row([
        "middleware CPU µs/event, max rate".to_owned(),
        show(middleware.middleware_cpu_us_per_event_max_rate),
        String::new(),
        String::new(),
    ]);
    table.add_row([
        "middleware CPU µs/event, max rate, 4 consumers".to_owned(),
        show(middleware.middleware_cpu_us_per_event_max_rate_4_consumers),
        String::new(),
        String::new(),
    ]);
    table.add_row([
        "middleware CPU µs/event, isolated".to_owned(),
        show(middleware.isolated_middleware_cpu_us_per_event),
        String::new(),
        String::new(),
    ]);
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_have_the_requested_size() {
        let maker = StampMaker::new(500);
        assert_eq!(maker.event(0, 0).to_json().len(), 500);
        assert_eq!(maker.event(u64::MAX, u64::MAX).to_json().len(), 500);
    }

    #[test]
    fn stamps_are_the_json_object_a_value_would_make() {
        let maker = StampMaker::new(500);
        let event = maker.event(42, 7);
        let expected = serde_json::json!({
            "seq": format!("{:020}", 42),
            "sent_ns": format!("{:020}", 7),
            "padding": serde_json::from_str::<String>(maker.padding.get()).unwrap(),
        });
        let Some(herald_core::Data::Json(raw)) = &event.data else {
            panic!("the payload is JSON");
        };
        assert_eq!(raw.get(), expected.to_string());
        let stamp = event.data_as::<Stamp>().unwrap().unwrap();
        assert_eq!((stamp.seq, stamp.sent_ns), (42, 7));
        let stamp = maker
            .event(u64::MAX, 0)
            .data_as::<Stamp>()
            .unwrap()
            .unwrap();
        assert_eq!(stamp.seq, u64::MAX);
    }

    #[test]
    fn a_stamp_with_bad_numbers_does_not_parse() {
        let event = Event::new("/herald/bench", StampMaker::TYPE)
            .with_data(serde_json::json!({ "seq": "12x", "sent_ns": "0" }));
        assert!(event.data_as::<Stamp>().is_err());
    }

    #[test]
    fn the_sink_counts_duplicates_once() {
        let sink = Sink::new(128);
        let stamp = |seq: u64| Stamp { seq, sent_ns: 0 };
        sink.handle(&stamp(3));
        sink.handle(&stamp(3));
        sink.handle(&stamp(127));
        sink.handle(&stamp(128));
        let measured = sink.measured(2, 0, None);
        assert_eq!(measured.events, 2);
        assert_eq!(measured.duplicates, 1);
        assert_eq!(sink.malformed.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn process_cpu_time_is_read() {
        if std::path::Path::new("/proc/self/stat").exists() {
            assert!(process_cpu_seconds().is_some());
        }
    }
}
