//! `herald bench orders`: the reference order system, run in this process on a fresh durable
//! log, under a sustained load; next to the raw `fdatasync` baseline of the same directory.
//!
//! # What is measured
//!
//! - **baseline**: the raw-disk write baselines of [`super::baseline`] (512-byte `write` +
//!   `fdatasync` round trips per second, and synced sequential writes), measured first.
//! - **orders**: a fresh log (fsync on) in the bench directory and the order system on it
//!   ([`SystemOptions`] defaults: every service database fsyncs its commits). `--concurrency`
//!   tasks each place an order with [`SystemHandle::place`] (the mix of
//!   [`crate::load::order_request`]) and wait for it to settle with
//!   [`SystemHandle::wait_settled`], one after the other, for `--duration-secs`. Latency is
//!   from the call to `place` to the order's terminal state.
//!
//! Afterwards the system is left to become idle, stopped, the log closed, and
//! [`herald_orders::invariants::check`] run on the data directory: a violation is printed and
//! makes the command fail. `ratio_to_baseline_fsync` is orders/s over raw fsyncs/s.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use comfy_table::Table;
use hdrhistogram::Histogram;
use herald_orders::{InvariantReport, OrderRequest, OrderStatus, SystemHandle, SystemOptions};
use serde::Serialize;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::baseline;
use super::{BenchDir, Goal, Progress, latency_histogram, positive_secs, record, round3};
use crate::store::{self, Options};

/// Arguments of `herald bench orders`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Print a JSON document instead of a table.
    #[arg(long)]
    json: bool,

    /// How long orders are placed, in seconds.
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    duration_secs: f64,

    /// Orders in flight: tasks each placing an order and waiting for it to settle.
    #[arg(long, default_value_t = 256, value_name = "N")]
    concurrency: u64,

    /// How long the raw-disk baselines run, in seconds.
    #[arg(long, default_value_t = 2.0, value_name = "SECS")]
    baseline_secs: f64,

    /// Seeds the order mix.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// The most tasks `--concurrency` accepts.
const CONCURRENCY_MAX: u64 = 10_000;
/// How long one order may take to settle before it is counted as pending.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the system is given to become idle after the load.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Settled orders per second aimed for on this machine.
const TARGET_ORDERS_PER_SEC: f64 = 2_000.0;
/// p99 from placement to terminal state aimed for, in milliseconds.
const TARGET_P99_MS: f64 = 250.0;

/// The report of `herald bench orders --json`.
#[derive(Debug, Serialize)]
struct Report<'a> {
    bench: &'static str,
    /// The directory measured.
    dir: String,
    /// Its file system type.
    filesystem: Option<&'a str>,
    /// The log's and the service databases' durability.
    durability: &'static str,
    concurrency: u64,
    seconds: f64,
    /// Orders placed.
    orders: u64,
    completed: u64,
    cancelled: u64,
    cancelled_by_reason: BTreeMap<String, u64>,
    /// Orders not settled within the settle timeout.
    pending: u64,
    /// Settled orders per second.
    orders_per_sec: f64,
    /// From `place` to the terminal state, in milliseconds.
    p50_ms: f64,
    p95_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// 512-byte `write` + `fdatasync` round trips per second, measured first.
    baseline_fsync_per_sec: f64,
    /// The median of those round trips, in microseconds.
    baseline_fsync_p50_us: u64,
    /// Sequential synced writes, MB per second.
    baseline_mb_per_sec: f64,
    /// `orders_per_sec` over `baseline_fsync_per_sec`.
    ratio_to_baseline_fsync: f64,
    target_orders_per_sec: f64,
    target_p99_ms: f64,
    target_met: bool,
    invariants: Invariants,
}

/// The invariant check at the end.
#[derive(Debug, Serialize)]
struct Invariants {
    orders: u64,
    pending: u64,
    completed: u64,
    cancelled: u64,
    holds: bool,
    violations: Vec<String>,
}

impl From<&InvariantReport> for Invariants {
    fn from(report: &InvariantReport) -> Self {
        Invariants {
            orders: report.orders,
            pending: report.pending,
            completed: report.completed,
            cancelled: report.cancelled,
            holds: report.holds(),
            violations: report.violations.iter().map(ToString::to_string).collect(),
        }
    }
}

/// What one task measured.
struct Measured {
    orders: u64,
    completed: u64,
    cancelled_by_reason: BTreeMap<String, u64>,
    pending: u64,
    latencies: Histogram<u64>,
}

impl Measured {
    fn new() -> Measured {
        Measured {
            orders: 0,
            completed: 0,
            cancelled_by_reason: BTreeMap::new(),
            pending: 0,
            latencies: latency_histogram(),
        }
    }

    fn add(&mut self, other: Measured) -> anyhow::Result<()> {
        self.orders += other.orders;
        self.completed += other.completed;
        self.pending += other.pending;
        for (reason, count) in other.cancelled_by_reason {
            *self.cancelled_by_reason.entry(reason).or_default() += count;
        }
        self.latencies
            .add(&other.latencies)
            .context("cannot merge latency histograms")
    }

    fn cancelled(&self) -> u64 {
        self.cancelled_by_reason.values().sum()
    }
}

/// Runs `herald bench orders` in `dir`.
pub(crate) async fn run(args: Args, dir: &BenchDir) -> anyhow::Result<()> {
    let duration = positive_secs("--duration-secs", args.duration_secs)?;
    let baseline_duration = positive_secs("--baseline-secs", args.baseline_secs)?;
    anyhow::ensure!(
        (1..=CONCURRENCY_MAX).contains(&args.concurrency),
        "--concurrency must be between 1 and {CONCURRENCY_MAX}"
    );

    eprintln!("baseline: measuring the raw-disk baselines");
    let path = dir.path().to_path_buf();
    let baseline =
        tokio::task::spawn_blocking(move || baseline::measure_writes(&path, baseline_duration))
            .await
            .context("the baseline task failed")?
            .context("cannot measure the raw-disk baselines")?;

    let data_dir = dir.log_dir("orders");
    let log = store::open(Options::new(&data_dir)).await?;
    let (measured, seconds) = store::closing(&log, async {
        let system = SystemOptions {
            data_dir: data_dir.clone(),
            seed: args.seed,
            ..SystemOptions::default()
        }
        .build(log.clone())
        .await
        .context("cannot start the order system")?;
        let handle = system.handle();
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(system.run(shutdown.clone()));
        let loaded = load(&handle, args.concurrency, args.seed, duration).await;
        let idle = match &loaded {
            Ok(_) => handle
                .wait_idle(IDLE_TIMEOUT)
                .await
                .context("the order system did not become idle"),
            Err(_) => Ok(()),
        };
        shutdown.cancel();
        running
            .await
            .context("the order system task panicked")?
            .context("the order system failed")?;
        idle?;
        loaded
    })
    .await?;
    let invariants = herald_orders::invariants::check(&data_dir)
        .await
        .context("cannot check the invariants")?;

    let orders_per_sec = (measured.completed + measured.cancelled()) as f64 / seconds.max(1e-9);
    let ms = |quantile: f64| round3(measured.latencies.value_at_quantile(quantile) as f64 / 1e3);
    let p99_ms = ms(0.99);
    let report = Report {
        bench: "orders",
        dir: dir.path().display().to_string(),
        filesystem: dir.filesystem(),
        durability: "fsync",
        concurrency: args.concurrency,
        seconds: round3(seconds),
        orders: measured.orders,
        completed: measured.completed,
        cancelled: measured.cancelled(),
        cancelled_by_reason: measured.cancelled_by_reason.clone(),
        pending: measured.pending,
        orders_per_sec: round3(orders_per_sec),
        p50_ms: ms(0.5),
        p95_ms: ms(0.95),
        p99_ms,
        max_ms: round3(measured.latencies.max() as f64 / 1e3),
        baseline_fsync_per_sec: round3(baseline.fsync_per_sec),
        baseline_fsync_p50_us: baseline.fsync_p50_us,
        baseline_mb_per_sec: round3(baseline.mb_per_sec),
        ratio_to_baseline_fsync: round3(orders_per_sec / baseline.fsync_per_sec.max(1e-9)),
        target_orders_per_sec: TARGET_ORDERS_PER_SEC,
        target_p99_ms: TARGET_P99_MS,
        target_met: orders_per_sec >= TARGET_ORDERS_PER_SEC && p99_ms <= TARGET_P99_MS,
        invariants: Invariants::from(&invariants),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{}", table(&report));
    }
    anyhow::ensure!(
        invariants.holds(),
        "the invariants do not hold: {invariants}"
    );
    Ok(())
}

/// The report as a table.
fn table(report: &Report<'_>) -> Table {
    let mut table = Table::new();
    table.set_header(["", "value"]);
    let mut row = |name: &str, value: String| {
        table.add_row([name.to_owned(), value]);
    };
    row("orders", report.orders.to_string());
    row("completed", report.completed.to_string());
    row("cancelled", report.cancelled.to_string());
    for (reason, count) in &report.cancelled_by_reason {
        row(&format!("  {reason}"), count.to_string());
    }
    row("pending", report.pending.to_string());
    row(
        "orders/s",
        format!(
            "{:.0} (target {TARGET_ORDERS_PER_SEC})",
            report.orders_per_sec
        ),
    );
    row("p50 ms", format!("{:.1}", report.p50_ms));
    row(
        "p99 ms",
        format!("{:.1} (target {TARGET_P99_MS})", report.p99_ms),
    );
    row(
        "baseline fsync/s",
        format!("{:.0}", report.baseline_fsync_per_sec),
    );
    row(
        "orders / fsync",
        format!("{:.2}", report.ratio_to_baseline_fsync),
    );
    row(
        "invariants",
        format!(
            "{} ({} violations)",
            if report.invariants.holds {
                "hold"
            } else {
                "BROKEN"
            },
            report.invariants.violations.len()
        ),
    );
    table
}

/// Runs `concurrency` tasks placing orders and waiting for them until `duration` is over;
/// returns what they measured and how long it took.
async fn load(
    handle: &SystemHandle,
    concurrency: u64,
    seed: u64,
    duration: Duration,
) -> anyhow::Result<(Measured, f64)> {
    let done = Arc::new(AtomicU64::new(0));
    let progress = Progress::start("orders", Goal::Duration(duration), done.clone());
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let stop = started + duration;
    let mut tasks = JoinSet::new();
    for _ in 0..concurrency {
        let handle = handle.clone();
        let next = Arc::clone(&next);
        let done = Arc::clone(&done);
        tasks.spawn(async move {
            let mut measured = Measured::new();
            while Instant::now() < stop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let request: OrderRequest =
                    serde_json::from_value(crate::load::order_request(seed, n))
                        .context("the order mix made an unreadable order")?;
                let began = Instant::now();
                let order = handle
                    .place(request, None)
                    .await
                    .with_context(|| format!("cannot place order {n}"))?;
                measured.orders += 1;
                let settled = handle
                    .wait_settled(&order.order_id, SETTLE_TIMEOUT)
                    .await
                    .context("cannot wait for an order")?
                    .with_context(|| format!("order {} vanished", order.order_id))?;
                match settled.status {
                    OrderStatus::Pending => {
                        measured.pending += 1;
                        continue;
                    }
                    OrderStatus::Completed => measured.completed += 1,
                    OrderStatus::Cancelled => {
                        let reason = settled
                            .cancel_reason
                            .map_or("unknown", |reason| reason.as_str());
                        *measured
                            .cancelled_by_reason
                            .entry(reason.to_owned())
                            .or_default() += 1;
                    }
                }
                record(&mut measured.latencies, began.elapsed());
                done.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(measured)
        });
    }
    let mut measured = Measured::new();
    while let Some(joined) = tasks.join_next().await {
        measured.add(joined.context("a load task panicked")??)?;
    }
    let seconds = started.elapsed().as_secs_f64();
    progress.finish();
    Ok((measured, seconds))
}
