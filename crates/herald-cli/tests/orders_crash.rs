//! The order system survives `kill -9`: while `herald load` places orders over HTTP, the
//! server (`herald up`: the event API and the order system in one
//! process) is killed with SIGKILL again and again and restarted on the same data
//! directory and port.
//!
//! The kills are paced by what the load reports, not by time: the load prints its
//! progress (`load: … settled=N …`) every few milliseconds, and the server is killed each
//! time [`SETTLED_PER_KILL`] more orders have settled since the last restart. The load
//! retries a POST that got no answer with the same `Idempotency-Key` and long-polls every
//! placed order until it is completed or cancelled, so at the end:
//!
//! - every order the load placed reached a terminal state through the restarted servers,
//!   none was abandoned or left pending, none was refused;
//! - the order service holds exactly as many orders as the load placed: a retried POST
//!   never placed an order twice;
//! - after the last server stops with SIGTERM, the system is opened once more in this
//!   process and left to become idle (the e-mails and audit entries that follow the last
//!   terminal events are asynchronous), stopped, and
//!   [`herald_orders::invariants::check`] finds no violation: stock conservation, charges
//!   − refunds, one e-mail per order, complete audit causation chains.
//!
//! `HERALD_ORDERS_CRASH_KILLS` changes the number of kills.

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use herald_log::{Log, Options};
use herald_orders::SystemOptions;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

mod common;

use common::http::Herald;
use common::{env_or, herald_command, runtime_multi_thread};

/// Kills of the server, unless `HERALD_ORDERS_CRASH_KILLS` says otherwise.
const KILLS_DEFAULT: u64 = 3;
/// Orders settled (as the load reports them) between one start of the server and its kill.
const SETTLED_PER_KILL: u64 = 40;
/// Orders placed after the last kill, so that the load still runs when it happens.
const ORDERS_AFTER_KILLS: u64 = 80;
/// Orders due per second.
const RATE: &str = "40";
/// Orders in flight at most.
const CONCURRENCY: &str = "32";
/// How often the load prints its progress, in milliseconds.
const PROGRESS_MS: &str = "20";
/// The most time the load may go without settling an order before the test gives up.
const LOAD_STALL_TIMEOUT: Duration = Duration::from_secs(180);
/// How long the recovered system is given to become idle.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

#[test]
fn every_accepted_order_settles_and_the_invariants_hold_across_kill_9() {
    let kills = env_or("HERALD_ORDERS_CRASH_KILLS", KILLS_DEFAULT);
    let orders = SETTLED_PER_KILL * kills + ORDERS_AFTER_KILLS;
    let dir = tempfile::tempdir().unwrap();
    let mut server = start(dir.path(), "127.0.0.1:0");
    let listen = server.addr().to_string();

    let (mut load, progress) = start_load(&listen, orders);
    let mut settled_at_restart = 0;
    for kill in 0..kills {
        let target = settled_at_restart + SETTLED_PER_KILL;
        let settled = wait_settled(&progress, target)
            .unwrap_or_else(|| panic!("kill {kill}: the load stalled below {target} settled"));
        server.kill_9();
        server = start(dir.path(), &listen);
        settled_at_restart = settled;
    }

    let output = load_output(&mut load);
    let summary: Value = serde_json::from_str(&output)
        .unwrap_or_else(|error| panic!("herald load printed {output:?}: {error}"));
    let count = |field: &str| {
        summary[field]
            .as_u64()
            .unwrap_or_else(|| panic!("{field} is {}: {summary}", summary[field]))
    };
    assert_eq!(count("due"), orders, "{summary}");
    assert_eq!(count("placed"), orders, "every order was placed: {summary}");
    assert_eq!(count("rejected"), 0, "{summary}");
    assert_eq!(count("abandoned"), 0, "{summary}");
    assert_eq!(count("still_pending"), 0, "{summary}");
    assert_eq!(
        count("completed") + count("cancelled"),
        orders,
        "every placed order settled: {summary}"
    );
    assert!(count("completed") > 0, "{summary}");

    let status = server.terminate();
    assert!(
        status.success(),
        "the server stops cleanly on SIGTERM: {status}"
    );

    let report = runtime_multi_thread().block_on(async {
        settle(dir.path()).await;
        herald_orders::invariants::check(dir.path()).await.unwrap()
    });
    assert!(report.holds(), "{report}");
    assert_eq!(report.orders, orders, "no order was placed twice: {report}");
    assert_eq!(report.pending, 0, "{report}");
    eprintln!("after {kills} kills: {report}; load: {summary}");
}

/// Starts `herald up` on `dir`, listening on `listen`.
fn start(dir: &Path, listen: &str) -> Herald {
    let mut command = herald_command(dir);
    command.args(["up", "--listen", listen]);
    Herald::spawn(command)
}

/// Starts `herald load --json` against `listen` for `orders` orders; the receiver gets
/// the `settled` count of each progress line.
fn start_load(listen: &str, orders: u64) -> (Child, mpsc::Receiver<u64>) {
    let mut load = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["load", "--json", "--url", &format!("http://{listen}")])
        .args(["--orders", &orders.to_string(), "--rate", RATE])
        .args(["--concurrency", CONCURRENCY, "--progress-ms", PROGRESS_MS])
        .args(["--wait-ms", "2000", "--seed", "7"])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("herald load starts");
    let stderr = load.stderr.take().expect("stderr is piped");
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            let settled = line
                .strip_prefix("load: ")
                .and_then(|rest| {
                    rest.split(' ')
                        .find_map(|field| field.strip_prefix("settled="))
                })
                .and_then(|count| count.parse::<u64>().ok());
            match settled {
                Some(settled) => {
                    // The test stops listening once the kills are done.
                    let _ = sender.send(settled);
                }
                None => eprintln!("herald load: {line}"),
            }
        }
    });
    (load, receiver)
}

/// Waits until the load reports at least `target` settled orders; returns the count it
/// reported, or `None` if it stalls for [`LOAD_STALL_TIMEOUT`] or exits.
fn wait_settled(progress: &mpsc::Receiver<u64>, target: u64) -> Option<u64> {
    loop {
        let settled = progress.recv_timeout(LOAD_STALL_TIMEOUT).ok()?;
        if settled >= target {
            return Some(settled);
        }
    }
}

/// Waits for the load to exit successfully and returns its standard output.
fn load_output(load: &mut Child) -> String {
    let mut output = String::new();
    std::io::Read::read_to_string(load.stdout.as_mut().expect("stdout is piped"), &mut output)
        .expect("the output of herald load is readable");
    let status = load.wait().expect("herald load exits");
    assert!(status.success(), "herald load failed ({status})");
    output
}

/// Opens the stopped system's data directory in process, runs the system until it is idle
/// (every event of the topic handled by every service), and stops it.
async fn settle(dir: &Path) {
    let log = Log::open(Options::new(dir)).unwrap();
    let system = SystemOptions {
        data_dir: dir.to_path_buf(),
        ..SystemOptions::default()
    }
    .build(log.clone())
    .await
    .unwrap();
    let handle = system.handle();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(system.run(shutdown.clone()));
    handle.wait_idle(IDLE_TIMEOUT).await.unwrap();
    shutdown.cancel();
    running.await.unwrap().unwrap();
    log.close().await.unwrap();
}
