//! `herald bench http`: appends over the HTTP API, next to the same appends made in process
//! in the same run.
//!
//! # What is measured
//!
//! - **baseline**: the raw-disk write baselines of [`super::baseline`] on the same directory
//!   (512-byte `write` + `fdatasync`, and sequential 1 MiB writes each synced).
//! - **in_process**: a fresh log (fsync on, the default durability) and `--clients` tasks,
//!   each calling [`EventStore::append`] on its own stream with `--batch` events, one call
//!   after the other, until `--events` events or `--duration-secs` seconds.
//! - **http**: another fresh log, served by [`herald_server`] on a free loopback port in this
//!   process, and `--clients` tasks, each with one keep-alive HTTP/1.1 connection of its own
//!   (`TCP_NODELAY`), POSTing the same events to its own stream: one structured event per
//!   request (`application/cloudevents+json`), or a batch (`application/cloudevents-batch+json`)
//!   when `--batch` is above 1, and reading the `201` answer in full before the next request.
//!   Any other answer fails the run.
//!
//! - **tcp_baseline**: no log and no HTTP: the same clients, each with one loopback TCP
//!   connection (`TCP_NODELAY`) to a bare server task in this process, write the same JSON
//!   (behind a 4-byte length) and read a fixed answer of [`TCP_ANSWER_BYTES`], about the
//!   size of the HTTP server's `201`, before the next request. This is what the loopback
//!   round trips alone cost on these cores: `tcp_baseline / in_process` is the most any
//!   request-per-append protocol could reach here, and `http / tcp_baseline` is how close
//!   the HTTP server comes to it.
//!
//! Latency is that of one append call (one request, from sending it to the end of its
//! answer). `ratio` is the HTTP append rate over the in-process one. The clients run in the
//! same process as the server, on the same cores, so their own cost (making the JSON,
//! parsing the answer) is part of the HTTP figures; the in-process tasks make their events
//! too, but need no JSON. CPU time per append is the whole process's (`/proc/self/stat`).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use comfy_table::Table;
use hdrhistogram::Histogram;
use herald_core::{Event, EventStore, ExpectedVersion, StreamName};
use herald_server::ServerOptions;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::task::JoinSet;

use super::baseline::{self, WriteBaseline};
use super::pubsub::{cpu_between, process_cpu_seconds};
use super::{
    BenchDir, EventMaker, Goal, Progress, latency_histogram, positive_secs, record, round3,
};
use crate::store::{self, Log, Options};

/// Arguments of `herald bench http`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Print a JSON document instead of a table.
    #[arg(long)]
    json: bool,

    /// How long each scenario runs, in seconds (unless --events is given).
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    duration_secs: f64,

    /// Run each scenario for exactly this many events instead of --duration-secs.
    #[arg(long, value_name = "N")]
    events: Option<u64>,

    /// Concurrent clients (HTTP: one connection each), each appending to its own stream.
    #[arg(long, default_value_t = 64, value_name = "N")]
    clients: u64,

    /// Events per append (per request).
    #[arg(long, default_value_t = 1, value_name = "N")]
    batch: u64,

    /// How long the raw-disk baselines run, in seconds.
    #[arg(long, default_value_t = 2.0, value_name = "SECS")]
    baseline_secs: f64,

    /// The size of each event's structured JSON, in bytes.
    #[arg(long, default_value_t = 500, value_name = "BYTES")]
    event_bytes: usize,
}

/// The most concurrent clients: each holds a connection and a task.
const CLIENTS_MAX: u64 = 4096;

/// The most events one append carries; the server's batch limit decides the real bound.
const BATCH_MAX: u64 = 10_000;

/// The ratio of the HTTP append rate to the in-process one this bench is held to.
const TARGET_RATIO: f64 = 0.5;

/// The media type of one structured event.
const STRUCTURED: &str = "application/cloudevents+json";

/// The media type of a batch.
const BATCH: &str = "application/cloudevents-batch+json";

/// The size of the bare TCP server's answer: about that of the HTTP server's `201`
/// (status line, headers and the JSON body).
const TCP_ANSWER_BYTES: usize = 256;

/// The scenarios, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    /// [`EventStore::append`] called directly.
    InProcess,
    /// `POST /streams/{stream}` over a loopback connection.
    Http,
    /// Length-prefixed JSON over a loopback connection to a bare server.
    Tcp,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::InProcess => "in_process",
            Scenario::Http => "http",
            Scenario::Tcp => "tcp_baseline",
        }
    }
}

/// When a scenario stops.
#[derive(Debug, Clone, Copy)]
enum Limit {
    /// After this many events in all.
    Events(u64),
    /// After this long.
    Duration(Duration),
}

/// When one client stops.
#[derive(Debug, Clone, Copy)]
enum Stop {
    /// After appending this many events.
    After(u64),
    /// At this instant.
    At(Instant),
}

impl Stop {
    /// How many events the next append carries, or `None` when the client is done.
    fn next_len(self, appended: u64, batch: u64) -> Option<u64> {
        match self {
            Stop::After(events) if appended >= events => None,
            Stop::After(events) => Some(batch.min(events - appended)),
            Stop::At(deadline) if Instant::now() >= deadline => None,
            Stop::At(_) => Some(batch),
        }
    }
}

/// The report of `herald bench http --json`.
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
    /// Concurrent clients.
    clients: u64,
    /// Events per append.
    batch_size: u64,
    /// 512-byte `write` + `fdatasync` round trips per second, measured first.
    baseline_fsync_per_sec: f64,
    /// The median of those round trips, in microseconds.
    baseline_fsync_p50_us: u64,
    /// Sequential synced writes, MB per second.
    baseline_mb_per_sec: f64,
    scenarios: Vec<Row>,
    /// `http` appends per second over `in_process` appends per second.
    ratio: f64,
    /// `tcp_baseline` round trips per second over `in_process` appends per second: the
    /// most a protocol of one request per append could reach on these cores.
    ratio_ceiling: f64,
    /// `http` appends per second over `tcp_baseline` round trips per second.
    ratio_to_tcp_baseline: f64,
    /// The ratio aimed for.
    target_ratio: f64,
    target_met: bool,
}

/// The figures of one scenario.
#[derive(Debug, Serialize)]
struct Row {
    scenario: &'static str,
    /// Append calls (HTTP requests) answered.
    appends: u64,
    events: u64,
    seconds: f64,
    appends_per_sec: f64,
    events_per_sec: f64,
    /// Latency of one append call, in microseconds.
    p50_us: u64,
    p99_us: u64,
    max_us: u64,
    /// The process's CPU time (user + system) per append.
    cpu_us_per_append: Option<f64>,
    /// `appends_per_sec` over `baseline_fsync_per_sec`: above 1, appends share syncs.
    ratio_to_baseline_fsync: f64,
}

/// What one scenario measured.
struct Measured {
    appends: u64,
    events: u64,
    seconds: f64,
    cpu_seconds: Option<f64>,
    latencies: Histogram<u64>,
}

impl Measured {
    fn appends_per_sec(&self) -> f64 {
        self.appends as f64 / self.seconds.max(1e-9)
    }
}

/// What one client task measured.
struct ClientResult {
    appends: u64,
    events: u64,
    latencies: Histogram<u64>,
}

/// Runs `herald bench http` in `dir`.
pub(crate) async fn run(args: Args, dir: &BenchDir) -> anyhow::Result<()> {
    let limit = match args.events {
        Some(0) => anyhow::bail!("--events must be at least 1"),
        Some(events) => Limit::Events(events),
        None => Limit::Duration(positive_secs("--duration-secs", args.duration_secs)?),
    };
    anyhow::ensure!(
        (1..=CLIENTS_MAX).contains(&args.clients),
        "--clients must be between 1 and {CLIENTS_MAX}"
    );
    anyhow::ensure!(
        (1..=BATCH_MAX).contains(&args.batch),
        "--batch must be between 1 and {BATCH_MAX}"
    );
    let baseline_duration = positive_secs("--baseline-secs", args.baseline_secs)?;
    let maker = EventMaker::new(args.event_bytes);
    let event_bytes = maker.event(0).to_json().len();
    let settings = Settings {
        clients: args.clients,
        batch: args.batch,
        limit,
        maker,
    };

    eprintln!("baseline: measuring the raw-disk baselines");
    let path = dir.path().to_path_buf();
    let baseline =
        tokio::task::spawn_blocking(move || baseline::measure_writes(&path, baseline_duration))
            .await
            .context("the baseline task failed")?
            .context("cannot measure the raw-disk baselines")?;

    let mut results = Vec::new();
    for scenario in [Scenario::InProcess, Scenario::Http, Scenario::Tcp] {
        let measured = run_scenario(scenario, dir, &settings)
            .await
            .with_context(|| format!("scenario {} failed", scenario.name()))?;
        eprintln!(
            "{}: {} appends in {:.1} s, {:.0} appends/s",
            scenario.name(),
            measured.appends,
            measured.seconds,
            measured.appends_per_sec()
        );
        results.push((scenario, measured));
    }

    let rate = |wanted: Scenario| {
        results
            .iter()
            .find(|(scenario, _)| *scenario == wanted)
            .map_or(0.0, |(_, measured)| measured.appends_per_sec())
    };
    let ratio = rate(Scenario::Http) / rate(Scenario::InProcess).max(1e-9);
    let ratio_ceiling = rate(Scenario::Tcp) / rate(Scenario::InProcess).max(1e-9);
    let ratio_to_tcp = rate(Scenario::Http) / rate(Scenario::Tcp).max(1e-9);
    let rows: Vec<Row> = results
        .iter()
        .map(|(scenario, measured)| row(*scenario, measured, &baseline))
        .collect();
    if args.json {
        let report = Report {
            bench: "http",
            dir: dir.path().display().to_string(),
            filesystem: dir.filesystem(),
            durability: "fsync",
            event_bytes,
            clients: args.clients,
            batch_size: args.batch,
            baseline_fsync_per_sec: round3(baseline.fsync_per_sec),
            baseline_fsync_p50_us: baseline.fsync_p50_us,
            baseline_mb_per_sec: round3(baseline.mb_per_sec),
            scenarios: rows,
            ratio: round3(ratio),
            ratio_ceiling: round3(ratio_ceiling),
            ratio_to_tcp_baseline: round3(ratio_to_tcp),
            target_ratio: TARGET_RATIO,
            target_met: ratio >= TARGET_RATIO,
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{}", table(&rows));
        println!(
            "http / in_process: {ratio:.2} (target {TARGET_RATIO}); tcp_baseline / in_process: \
             {ratio_ceiling:.2}; http / tcp_baseline: {ratio_to_tcp:.2}"
        );
        println!(
            "baseline: {:.0} fsync/s, \
             p50 {} µs, {:.1} MB/s",
            baseline.fsync_per_sec, baseline.fsync_p50_us, baseline.mb_per_sec
        );
    }
    Ok(())
}

/// What both scenarios share.
struct Settings {
    clients: u64,
    batch: u64,
    limit: Limit,
    maker: EventMaker,
}

/// The report row of one scenario.
fn row(scenario: Scenario, measured: &Measured, baseline: &WriteBaseline) -> Row {
    let appends_per_sec = measured.appends_per_sec();
    Row {
        scenario: scenario.name(),
        appends: measured.appends,
        events: measured.events,
        seconds: round3(measured.seconds),
        appends_per_sec: round3(appends_per_sec),
        events_per_sec: round3(measured.events as f64 / measured.seconds.max(1e-9)),
        p50_us: measured.latencies.value_at_quantile(0.5),
        p99_us: measured.latencies.value_at_quantile(0.99),
        max_us: measured.latencies.max(),
        cpu_us_per_append: measured
            .cpu_seconds
            .map(|cpu| round3(cpu * 1e6 / measured.appends.max(1) as f64)),
        ratio_to_baseline_fsync: round3(appends_per_sec / baseline.fsync_per_sec),
    }
}

/// The report as a table.
fn table(rows: &[Row]) -> Table {
    let mut table = Table::new();
    table.set_header([
        "scenario",
        "appends",
        "events",
        "seconds",
        "appends/s",
        "events/s",
        "p50 µs",
        "p99 µs",
        "max µs",
        "CPU µs/append",
        "× base fsync/s",
    ]);
    for row in rows {
        table.add_row([
            row.scenario.to_owned(),
            row.appends.to_string(),
            row.events.to_string(),
            format!("{:.1}", row.seconds),
            format!("{:.0}", row.appends_per_sec),
            format!("{:.0}", row.events_per_sec),
            row.p50_us.to_string(),
            row.p99_us.to_string(),
            row.max_us.to_string(),
            row.cpu_us_per_append
                .map_or_else(|| "-".to_owned(), |cpu| format!("{cpu:.1}")),
            format!("{:.2}", row.ratio_to_baseline_fsync),
        ]);
    }
    table
}

/// Runs `scenario`: the log scenarios on a fresh log in `dir`, closed afterwards.
async fn run_scenario(
    scenario: Scenario,
    dir: &BenchDir,
    settings: &Settings,
) -> anyhow::Result<Measured> {
    if scenario == Scenario::Tcp {
        let server = TcpServer::start().await?;
        let addr = server.addr;
        let measured = drive(scenario, settings, move |_| tcp(addr)).await;
        server.task.abort();
        return measured;
    }
    let log = store::open(Options::new(dir.log_dir(scenario.name()))).await?;
    store::closing(&log, async {
        if scenario == Scenario::InProcess {
            return drive(scenario, settings, |_| in_process(log.clone())).await;
        }
        let server = Served::start(&log).await?;
        let addr = server.addr;
        let measured = drive(scenario, settings, move |_| http(addr)).await;
        server.stop().await?;
        measured
    })
    .await
}

/// A client of one scenario: appends `events` to `stream` once, giving back the latency.
trait Appender: Send + 'static {
    /// Appends `events`, as one call or one request.
    fn append(
        &mut self,
        stream: &StreamName,
        events: Vec<Event>,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// Runs `settings.clients` clients, each made by `connect`, until the limit, and merges
/// what they measured.
async fn drive<A, F>(
    scenario: Scenario,
    settings: &Settings,
    connect: impl Fn(u64) -> F,
) -> anyhow::Result<Measured>
where
    A: Appender,
    F: Future<Output = anyhow::Result<A>>,
{
    let clients = settings.clients;
    // Connect every client before the clock starts: the set-up is not what is measured.
    let mut appenders = Vec::new();
    for client in 0..clients {
        appenders.push(connect(client).await?);
    }
    let done = Arc::new(AtomicU64::new(0));
    let goal = match settings.limit {
        Limit::Events(events) => Goal::Events(events),
        Limit::Duration(duration) => Goal::Duration(duration),
    };
    let progress = Progress::start(scenario.name(), goal, done.clone());
    let cpu_start = process_cpu_seconds();
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for (client, appender) in (0..clients).zip(appenders) {
        let stop = match settings.limit {
            Limit::Events(events) => {
                Stop::After(events / clients + u64::from(client < events % clients))
            }
            Limit::Duration(duration) => Stop::At(started + duration),
        };
        let stream = StreamName::new(format!("bench-{client}"))?;
        tasks.spawn(append_until(
            appender,
            stream,
            settings.maker.clone(),
            settings.batch,
            stop,
            done.clone(),
        ));
    }
    let mut measured = Measured {
        appends: 0,
        events: 0,
        seconds: 0.0,
        cpu_seconds: None,
        latencies: latency_histogram(),
    };
    while let Some(joined) = tasks.join_next().await {
        let client = joined.context("a client task panicked")??;
        measured.appends += client.appends;
        measured.events += client.events;
        measured
            .latencies
            .add(&client.latencies)
            .context("cannot merge latency histograms")?;
    }
    measured.seconds = started.elapsed().as_secs_f64();
    measured.cpu_seconds = cpu_between(cpu_start, process_cpu_seconds());
    progress.finish();
    Ok(measured)
}

/// One client's loop: appends batches of `batch` events until `stop`.
async fn append_until(
    mut appender: impl Appender,
    stream: StreamName,
    maker: EventMaker,
    batch: u64,
    stop: Stop,
    done: Arc<AtomicU64>,
) -> anyhow::Result<ClientResult> {
    let mut result = ClientResult {
        appends: 0,
        events: 0,
        latencies: latency_histogram(),
    };
    while let Some(len) = stop.next_len(result.events, batch) {
        let events: Vec<Event> = (result.events..result.events + len)
            .map(|seq| maker.event(seq))
            .collect();
        let began = Instant::now();
        appender.append(&stream, events).await?;
        record(&mut result.latencies, began.elapsed());
        result.events += len;
        result.appends += 1;
        done.fetch_add(len, Ordering::Relaxed);
    }
    Ok(result)
}

/// Appends with [`EventStore::append`] on the log.
struct InProcess(Log);

async fn in_process(log: Log) -> anyhow::Result<InProcess> {
    Ok(InProcess(log))
}

impl Appender for InProcess {
    async fn append(&mut self, stream: &StreamName, events: Vec<Event>) -> anyhow::Result<()> {
        self.0
            .append(stream, ExpectedVersion::Any, events)
            .await
            .with_context(|| format!("cannot append to stream `{stream}`"))?;
        Ok(())
    }
}

/// Appends with `POST /streams/{stream}` on one keep-alive connection.
struct Http {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    host: String,
}

/// Opens one connection to the server at `addr`.
async fn http(addr: SocketAddr) -> anyhow::Result<Http> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot connect to the server at {addr}"))?;
    // Requests are small and answered one at a time: Nagle's algorithm would only delay them.
    stream.set_nodelay(true)?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("the http handshake failed")?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::warn!(%error, "a benchmark connection failed");
        }
    });
    Ok(Http {
        sender,
        host: addr.to_string(),
    })
}

impl Appender for Http {
    async fn append(&mut self, stream: &StreamName, events: Vec<Event>) -> anyhow::Result<()> {
        let (content_type, body) = match events.as_slice() {
            [event] => (STRUCTURED, event.to_json()),
            events => (BATCH, Event::batch_to_json(events)),
        };
        let request = Request::post(format!("/streams/{stream}"))
            .header(hyper::header::HOST, &self.host)
            .header(hyper::header::CONTENT_TYPE, content_type)
            .body(Full::new(Bytes::from(body)))
            .context("cannot build the request")?;
        self.sender
            .ready()
            .await
            .context("the connection to the server closed")?;
        let response = self
            .sender
            .send_request(request)
            .await
            .context("the request failed")?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .context("cannot read the answer")?
            .to_bytes();
        anyhow::ensure!(
            status == StatusCode::CREATED,
            "the server answered {status}: {}",
            String::from_utf8_lossy(&body)
        );
        Ok(())
    }
}

/// Sends the JSON of the events to the bare TCP server on one connection, behind its
/// length, and reads the fixed answer.
struct Tcp {
    stream: tokio::net::TcpStream,
    answer: Vec<u8>,
}

/// Opens one connection to the bare TCP server at `addr`.
async fn tcp(addr: SocketAddr) -> anyhow::Result<Tcp> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot connect to the bare server at {addr}"))?;
    stream.set_nodelay(true)?;
    Ok(Tcp {
        stream,
        answer: vec![0; TCP_ANSWER_BYTES],
    })
}

impl Appender for Tcp {
    async fn append(&mut self, _stream: &StreamName, events: Vec<Event>) -> anyhow::Result<()> {
        let body = match events.as_slice() {
            [event] => event.to_json(),
            events => Event::batch_to_json(events),
        };
        let mut request = Vec::with_capacity(4 + body.len());
        request.extend_from_slice(&u32::try_from(body.len())?.to_be_bytes());
        request.extend_from_slice(&body);
        self.stream.write_all(&request).await?;
        self.stream.read_exact(&mut self.answer).await?;
        Ok(())
    }
}

/// The bare TCP server: per connection, reads a length and that many bytes, and answers
/// [`TCP_ANSWER_BYTES`] bytes, until the client closes.
struct TcpServer {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl TcpServer {
    async fn start() -> anyhow::Result<TcpServer> {
        let listener =
            tokio::net::TcpListener::bind(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 0)).await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                connections.spawn(serve_tcp(stream));
            }
        });
        Ok(TcpServer { addr, task })
    }
}

/// Serves one connection of the bare TCP server.
async fn serve_tcp(mut stream: tokio::net::TcpStream) {
    let _ = stream.set_nodelay(true);
    let answer = [0x20u8; TCP_ANSWER_BYTES];
    let mut request = Vec::new();
    loop {
        let mut len = [0u8; 4];
        if stream.read_exact(&mut len).await.is_err() {
            return;
        }
        request.resize(u32::from_be_bytes(len) as usize, 0);
        if stream.read_exact(&mut request).await.is_err()
            || stream.write_all(&answer).await.is_err()
        {
            return;
        }
    }
}

/// The HTTP server, serving in a task of this process.
struct Served {
    addr: SocketAddr,
    shutdown: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), herald_server::Error>>,
}

impl Served {
    /// Serves `log` on a free loopback port.
    async fn start(log: &Log) -> anyhow::Result<Served> {
        let options = ServerOptions {
            listen: SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 0),
            ..ServerOptions::default()
        };
        let store: Arc<dyn EventStore> = Arc::new(log.clone());
        let server = options
            .build(store)
            .await
            .context("cannot start the http server")?;
        let addr = server.local_addr();
        let (shutdown, stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(server.run(async move {
            let _ = stopped.await;
        }));
        Ok(Served {
            addr,
            shutdown,
            task,
        })
    }

    /// Stops serving, once the requests in flight are answered.
    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(());
        self.task
            .await
            .context("the server task panicked")?
            .context("the http server failed")
    }
}
