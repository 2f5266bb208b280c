//! `herald load`: places orders against a running order system over HTTP and reports how
//! they ended and how long they took.
//!
//! # Contract
//!
//! - **Open loop.** Order `n` is due at `start + n / rate`, whether or not earlier orders
//!   have been answered; at most `--concurrency` orders are in flight, and an order that
//!   waits for a slot is late. Its latency is measured from the time it was *due*, not from
//!   when it was sent, so a slow server cannot hide its queueing (no coordinated omission).
//! - **One order each.** Each order is `POST /api/orders` with an `Idempotency-Key` unique
//!   to this run and order; when the POST gets no answer (connection refused or reset, a
//!   timeout, a 5xx), it is sent again with the same key and body after a backoff, so the
//!   server places it at most once. A 4xx answer is final: the order is counted as rejected.
//! - **Until settled.** Once placed, the order is long-polled with
//!   `GET /api/orders/{id}?waitMs=…` until it is completed or cancelled; failed polls are
//!   retried the same way. An order that is neither after `--give-up-secs` counts as still
//!   pending (or, if it was never placed, as abandoned).
//! - **Mix.** [`order_request`] draws the customer, products, quantities and payment
//!   method of order `n` from `--seed`: most orders complete, some are declined (a low
//!   credit limit, or the `card_declined` method) and some run out of stock (the scarce
//!   products of the catalog).
//! - **Output.** A progress line on stderr every `--progress-ms`
//!   (`load: placed=… settled=… in_flight=… rate=…/s`), then a summary table on stdout, or
//!   with `--json` one JSON document. Errors never stop the run; they are counted.

use std::collections::BTreeMap;
use std::io::IsTerminal as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use comfy_table::Table;
use hdrhistogram::Histogram;
use herald_orders::catalog::{CUSTOMERS, PRODUCTS, Product};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::bench::{latency_histogram, positive_secs, record, round3};

/// Arguments of `herald load`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The server's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080", value_name = "URL")]
    url: String,

    /// Orders due per second (open loop).
    #[arg(long, default_value_t = 100.0, value_name = "N")]
    rate: f64,

    /// How long orders are placed, in seconds (unless --orders is given).
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    duration: f64,

    /// Place exactly this many orders instead of placing for --duration.
    #[arg(long, value_name = "N")]
    orders: Option<u64>,

    /// The most orders in flight (placed or being placed, not yet settled).
    #[arg(long, default_value_t = 256, value_name = "N")]
    concurrency: usize,

    /// Seeds the mix of customers, products and payment methods.
    #[arg(long, default_value_t = 1)]
    seed: u64,

    /// How long one long-poll of an order waits on the server, in milliseconds.
    #[arg(long, default_value_t = 10_000, value_name = "MS")]
    wait_ms: u64,

    /// How long after it was due an order is given to settle before it is counted as
    /// still pending (or abandoned, if it was never placed).
    #[arg(long, default_value_t = 120.0, value_name = "SECS")]
    give_up_secs: f64,

    /// How often the progress line is printed, in milliseconds.
    #[arg(long, default_value_t = 1_000, value_name = "MS")]
    progress_ms: u64,

    /// Print a JSON document instead of a table.
    #[arg(long)]
    json: bool,
}

/// The most orders in flight `--concurrency` accepts: each holds a task and a connection.
const CONCURRENCY_MAX: usize = 10_000;
/// The longest `--wait-ms`: the server's own bound on `waitMs`.
const WAIT_MS_MAX: u64 = herald_orders::api::WAIT_MS_MAX;
/// How much longer than its `waitMs` a request may take before it is abandoned and
/// retried.
const REQUEST_TIMEOUT_SLACK_MS: u64 = 5_000;
/// The first backoff after a failed request.
const RETRY_DELAY_MIN_MS: u64 = 50;
/// The longest backoff between two attempts of one request.
const RETRY_DELAY_MAX_MS: u64 = 1_000;
/// The share of orders paid with the `card_declined` method.
const DECLINED_METHOD_SHARE: f64 = 0.02;
/// The share of order lines for a scarce product (low or no stock in the catalog).
const SCARCE_LINE_SHARE: f64 = 0.04;
/// Stock at or below this makes a product scarce for the mix.
const SCARCE_STOCK_MAX: u64 = 100;
/// The most lines of one order the mix makes.
const LINES_MAX: usize = 3;
/// The most of one product a line of the mix asks for.
const LINE_QUANTITY_MAX: i64 = 3;

/// The body of order `n` of the mix seeded with `seed`: a catalog customer, one to
/// [`LINES_MAX`] distinct products, each line scarce with [`SCARCE_LINE_SHARE`], and the
/// `card_declined` method with [`DECLINED_METHOD_SHARE`].
pub(crate) fn order_request(seed: u64, n: u64) -> Value {
    let mut rng = StdRng::seed_from_u64(seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let customer = CUSTOMERS[rng.gen_range(0..CUSTOMERS.len())].id;
    let (scarce, plentiful): (Vec<&Product>, Vec<&Product>) = PRODUCTS
        .iter()
        .partition(|product| product.initial_stock <= SCARCE_STOCK_MAX);
    let lines = rng.gen_range(1..=LINES_MAX);
    let mut items: Vec<Value> = Vec::with_capacity(lines);
    let mut chosen: Vec<&str> = Vec::with_capacity(lines);
    for _ in 0..lines {
        let pool = if !scarce.is_empty() && rng.gen_bool(SCARCE_LINE_SHARE) {
            &scarce
        } else {
            &plentiful
        };
        let product = pool[rng.gen_range(0..pool.len())].id;
        if chosen.contains(&product) {
            continue;
        }
        chosen.push(product);
        items.push(json!({
            "productId": product,
            "quantity": rng.gen_range(1..=LINE_QUANTITY_MAX),
        }));
    }
    let method = if rng.gen_bool(DECLINED_METHOD_SHARE) {
        "card_declined"
    } else {
        "card"
    };
    json!({
        "customerId": customer,
        "items": items,
        "shippingAddress": format!("{} Load Street", n % 1000 + 1),
        "paymentMethod": method,
    })
}

/// The summary of `herald load --json`.
#[derive(Debug, Serialize)]
struct Summary {
    /// Orders due in the run.
    due: u64,
    /// Orders the server accepted (`201`).
    placed: u64,
    completed: u64,
    cancelled: u64,
    /// Cancelled orders by reason.
    cancelled_by_reason: BTreeMap<String, u64>,
    /// Placed orders not settled within --give-up-secs.
    still_pending: u64,
    /// Orders the server refused with a 4xx.
    rejected: u64,
    /// Orders never placed: every attempt failed until --give-up-secs.
    abandoned: u64,
    /// Failed requests (connection errors, timeouts, 5xx), each retried.
    errors: u64,
    /// From the first order due to the last one settled.
    seconds: f64,
    /// Settled orders per second over `seconds`.
    orders_per_sec: f64,
    /// Time from an order's due time to its terminal state, settled orders only.
    p50_ms: f64,
    p95_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

/// How one order ended.
#[derive(Debug)]
enum Outcome {
    /// Completed or cancelled (with the reason), after this long from its due time.
    Settled {
        cancelled: Option<String>,
        latency: Duration,
    },
    /// Placed, but still pending at the give-up time.
    Pending,
    /// Refused with this status.
    Rejected,
    /// Never placed.
    Abandoned,
}

/// Counters shared with the progress line.
#[derive(Debug, Default)]
struct Counters {
    placed: AtomicU64,
    settled: AtomicU64,
    in_flight: AtomicU64,
    errors: AtomicU64,
}

/// Runs `herald load`.
pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.rate.is_finite() && args.rate > 0.0,
        "--rate must be a positive number of orders per second"
    );
    anyhow::ensure!(
        (1..=CONCURRENCY_MAX).contains(&args.concurrency),
        "--concurrency must be between 1 and {CONCURRENCY_MAX}"
    );
    anyhow::ensure!(
        (1..=WAIT_MS_MAX).contains(&args.wait_ms),
        "--wait-ms must be between 1 and {WAIT_MS_MAX}"
    );
    anyhow::ensure!(args.progress_ms > 0, "--progress-ms must be at least 1");
    let give_up = positive_secs("--give-up-secs", args.give_up_secs)?;
    let due = match args.orders {
        Some(0) => anyhow::bail!("--orders must be at least 1"),
        Some(orders) => orders,
        None => {
            let duration = positive_secs("--duration", args.duration)?;
            ((duration.as_secs_f64() * args.rate).ceil() as u64).max(1)
        }
    };
    let base: Uri = args
        .url
        .trim_end_matches('/')
        .parse()
        .with_context(|| format!("--url {} is not a URL", args.url))?;
    anyhow::ensure!(
        base.scheme_str() == Some("http") && base.authority().is_some(),
        "--url must be an http:// URL with a host, not {}",
        args.url
    );
    let client = Arc::new(Driver {
        client: Client::builder(TokioExecutor::new()).build_http(),
        base: base.to_string().trim_end_matches('/').to_owned(),
        wait_ms: args.wait_ms,
        give_up,
        // A key prefix of its own per run, so that another run's keys never match.
        run_id: format!("{:016x}", rand::random::<u64>()),
        counters: Counters::default(),
    });

    let permits = Arc::new(Semaphore::new(args.concurrency));
    let progress = spawn_progress(Arc::clone(&client), Duration::from_millis(args.progress_ms));
    let started = tokio::time::Instant::now();
    let interval = Duration::from_secs_f64(1.0 / args.rate);
    let mut tasks = JoinSet::new();
    let mut outcomes = Vec::with_capacity(usize::try_from(due).unwrap_or(0));
    for n in 0..due {
        let due_at = started + interval.mul_f64(n as f64);
        tokio::time::sleep_until(due_at).await;
        let permit = Arc::clone(&permits)
            .acquire_owned()
            .await
            .context("the in-flight limit closed")?;
        let driver = Arc::clone(&client);
        let body = order_request(args.seed, n);
        tasks.spawn(async move {
            driver.counters.in_flight.fetch_add(1, Ordering::Relaxed);
            let outcome = driver.order(n, body, due_at.into_std()).await;
            driver.counters.in_flight.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
            outcome
        });
        // Collect what is done, so that a long run does not keep every task around.
        while let Some(joined) = tasks.try_join_next() {
            outcomes.push(joined.context("an order task panicked")?);
        }
    }
    while let Some(joined) = tasks.join_next().await {
        outcomes.push(joined.context("an order task panicked")?);
    }
    let seconds = started.elapsed().as_secs_f64();
    progress.abort();
    if std::io::stderr().is_terminal() {
        // End the progress line, which is rewritten in place on a terminal.
        eprintln!();
    }
    let summary = summarize(due, &outcomes, &client.counters, seconds)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!("{}", table(&summary));
    }
    Ok(())
}

/// Prints the progress line every `period` until aborted.
fn spawn_progress(driver: Arc<Driver>, period: Duration) -> tokio::task::JoinHandle<()> {
    let terminal = std::io::stderr().is_terminal();
    tokio::spawn(async move {
        let started = Instant::now();
        let mut ticks = tokio::time::interval(period);
        ticks.tick().await;
        loop {
            ticks.tick().await;
            let counters = &driver.counters;
            let settled = counters.settled.load(Ordering::Relaxed);
            let line = format!(
                "load: placed={} settled={} in_flight={} errors={} rate={:.0}/s",
                counters.placed.load(Ordering::Relaxed),
                settled,
                counters.in_flight.load(Ordering::Relaxed),
                counters.errors.load(Ordering::Relaxed),
                settled as f64 / started.elapsed().as_secs_f64().max(1e-9),
            );
            if terminal {
                eprint!("\r{line}   ");
            } else {
                eprintln!("{line}");
            }
        }
    })
}

/// Adds the outcomes up.
fn summarize(
    due: u64,
    outcomes: &[Outcome],
    counters: &Counters,
    seconds: f64,
) -> anyhow::Result<Summary> {
    let mut latencies: Histogram<u64> = latency_histogram();
    let mut summary = Summary {
        due,
        placed: counters.placed.load(Ordering::Relaxed),
        completed: 0,
        cancelled: 0,
        cancelled_by_reason: BTreeMap::new(),
        still_pending: 0,
        rejected: 0,
        abandoned: 0,
        errors: counters.errors.load(Ordering::Relaxed),
        seconds: round3(seconds),
        orders_per_sec: 0.0,
        p50_ms: 0.0,
        p95_ms: 0.0,
        p99_ms: 0.0,
        max_ms: 0.0,
    };
    for outcome in outcomes {
        match outcome {
            Outcome::Settled { cancelled, latency } => {
                record(&mut latencies, *latency);
                match cancelled {
                    None => summary.completed += 1,
                    Some(reason) => {
                        summary.cancelled += 1;
                        *summary
                            .cancelled_by_reason
                            .entry(reason.clone())
                            .or_default() += 1;
                    }
                }
            }
            Outcome::Pending => summary.still_pending += 1,
            Outcome::Rejected => summary.rejected += 1,
            Outcome::Abandoned => summary.abandoned += 1,
        }
    }
    let settled = summary.completed + summary.cancelled;
    summary.orders_per_sec = round3(settled as f64 / seconds.max(1e-9));
    if settled > 0 {
        let ms = |quantile: f64| round3(latencies.value_at_quantile(quantile) as f64 / 1e3);
        summary.p50_ms = ms(0.5);
        summary.p95_ms = ms(0.95);
        summary.p99_ms = ms(0.99);
        summary.max_ms = round3(latencies.max() as f64 / 1e3);
    }
    Ok(summary)
}

/// The summary as a table.
fn table(summary: &Summary) -> Table {
    let mut table = Table::new();
    table.set_header(["", "value"]);
    let mut row = |name: &str, value: String| {
        table.add_row([name.to_owned(), value]);
    };
    row("due", summary.due.to_string());
    row("placed", summary.placed.to_string());
    row("completed", summary.completed.to_string());
    row("cancelled", summary.cancelled.to_string());
    for (reason, count) in &summary.cancelled_by_reason {
        row(&format!("  {reason}"), count.to_string());
    }
    row("still pending", summary.still_pending.to_string());
    row("rejected (4xx)", summary.rejected.to_string());
    row("abandoned", summary.abandoned.to_string());
    row("errors (retried)", summary.errors.to_string());
    row("seconds", format!("{:.1}", summary.seconds));
    row("orders/s", format!("{:.1}", summary.orders_per_sec));
    row("p50 ms", format!("{:.1}", summary.p50_ms));
    row("p95 ms", format!("{:.1}", summary.p95_ms));
    row("p99 ms", format!("{:.1}", summary.p99_ms));
    row("max ms", format!("{:.1}", summary.max_ms));
    table
}

/// What every order task shares.
struct Driver {
    client: Client<HttpConnector, Full<Bytes>>,
    /// The base URL, without a trailing slash.
    base: String,
    wait_ms: u64,
    give_up: Duration,
    run_id: String,
    counters: Counters,
}

/// What one attempt of a request got.
enum Answer {
    /// A status below 500, and the body.
    Status(StatusCode, Value),
    /// No usable answer: retry.
    Failed,
}

impl Driver {
    /// Places order `n` and waits for it to settle.
    async fn order(&self, n: u64, body: Value, due_at: Instant) -> Outcome {
        let deadline = due_at + self.give_up;
        let key = format!("load-{}-{n}", self.run_id);
        let body = Bytes::from(body.to_string());
        let mut backoff = Backoff::new();
        let order_id = loop {
            let request = Request::builder()
                .method(Method::POST)
                .uri(format!("{}/api/orders", self.base))
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .header("idempotency-key", &key)
                .body(Full::new(body.clone()));
            match self.send(request, 0).await {
                Answer::Status(StatusCode::CREATED, order) => {
                    match order["orderId"].as_str() {
                        Some(id) => break id.to_owned(),
                        None => self.counters.errors.fetch_add(1, Ordering::Relaxed),
                    };
                }
                Answer::Status(status, _) if status.is_client_error() => {
                    return Outcome::Rejected;
                }
                Answer::Status(..) | Answer::Failed => {}
            }
            if !backoff.wait(deadline).await {
                return Outcome::Abandoned;
            }
        };
        self.counters.placed.fetch_add(1, Ordering::Relaxed);
        let mut backoff = Backoff::new();
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let wait_ms = self
                .wait_ms
                .min(u64::try_from(remaining.as_millis()).unwrap_or(u64::MAX))
                .max(1);
            let request = Request::builder()
                .method(Method::GET)
                .uri(format!(
                    "{}/api/orders/{order_id}?waitMs={wait_ms}",
                    self.base
                ))
                .body(Full::new(Bytes::new()));
            match self.send(request, wait_ms).await {
                Answer::Status(StatusCode::OK, order) => {
                    match order["status"].as_str() {
                        Some("completed") => {
                            return self.settled(None, due_at);
                        }
                        Some("cancelled") => {
                            let reason = order["cancelReason"].as_str().unwrap_or("unknown");
                            return self.settled(Some(reason.to_owned()), due_at);
                        }
                        // Still pending: the long-poll ended; poll again at once.
                        _ => backoff = Backoff::new(),
                    }
                    if Instant::now() >= deadline {
                        return Outcome::Pending;
                    }
                    continue;
                }
                // Too many waiters, a lost order after a crash, an error: back off.
                Answer::Status(..) | Answer::Failed => {
                    self.counters.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            if !backoff.wait(deadline).await {
                return Outcome::Pending;
            }
        }
    }

    /// Counts a settled order.
    fn settled(&self, cancelled: Option<String>, due_at: Instant) -> Outcome {
        self.counters.settled.fetch_add(1, Ordering::Relaxed);
        Outcome::Settled {
            cancelled,
            latency: due_at.elapsed(),
        }
    }

    /// Sends one request and reads its JSON answer; a transport error, a timeout or a 5xx
    /// is [`Answer::Failed`] and counted.
    async fn send(
        &self,
        request: Result<Request<Full<Bytes>>, hyper::http::Error>,
        wait_ms: u64,
    ) -> Answer {
        let Ok(request) = request else {
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
            return Answer::Failed;
        };
        let timeout = Duration::from_millis(wait_ms + REQUEST_TIMEOUT_SLACK_MS);
        let exchange = async {
            let response = self.client.request(request).await.ok()?;
            let status = response.status();
            let body = response.into_body().collect().await.ok()?.to_bytes();
            Some((status, body))
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(Some((status, body))) if !status.is_server_error() => {
                Answer::Status(status, serde_json::from_slice(&body).unwrap_or(Value::Null))
            }
            Ok(Some((status, _))) if status == StatusCode::SERVICE_UNAVAILABLE => {
                // Too many waiters: not counted as an error of the server.
                Answer::Status(status, Value::Null)
            }
            _ => {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                Answer::Failed
            }
        }
    }
}

/// Exponential backoff from [`RETRY_DELAY_MIN_MS`] to [`RETRY_DELAY_MAX_MS`].
struct Backoff {
    delay: Duration,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff {
            delay: Duration::from_millis(RETRY_DELAY_MIN_MS),
        }
    }

    /// Waits before the next attempt; `false` when that would pass `deadline`.
    async fn wait(&mut self, deadline: Instant) -> bool {
        if Instant::now() + self.delay >= deadline {
            return false;
        }
        tokio::time::sleep(self.delay).await;
        self.delay = (self.delay * 2).min(Duration::from_millis(RETRY_DELAY_MAX_MS));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mix_is_seeded_and_valid() {
        let seeded = order_request(7, 3);
        assert_eq!(seeded, order_request(7, 3));
        let mut declined = 0;
        let mut scarce = 0;
        for n in 0..2_000 {
            let body = order_request(1, n);
            let customer = body["customerId"].as_str().unwrap();
            assert!(
                herald_orders::catalog::customer(customer).is_some(),
                "{body}"
            );
            let items = body["items"].as_array().unwrap();
            assert!((1..=LINES_MAX).contains(&items.len()), "{body}");
            declined += u32::from(body["paymentMethod"] == "card_declined");
            scarce += body["items"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|item| {
                    let id = item["productId"].as_str().unwrap();
                    herald_orders::catalog::product(id).unwrap().initial_stock <= SCARCE_STOCK_MAX
                })
                .count();
        }
        assert!(declined > 0 && scarce > 0, "{declined} {scarce}");
    }
}
