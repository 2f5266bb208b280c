//! `herald load` end to end against a real order server (`herald up`):
//! the summary accounts for every order, the mix produces declines and stock failures, an
//! unreachable server is counted and retried rather than fatal, and bad options are
//! refused. No timing is checked.

use std::net::TcpListener;
use std::process::Output;

use serde_json::Value;

mod common;

use common::http::Herald;
use common::{failure, herald, herald_command, success};

/// Runs `herald load ARGS…` (its data directory is unused).
fn load(dir: &std::path::Path, args: &[&str]) -> Output {
    let mut all = vec!["load"];
    all.extend_from_slice(args);
    herald(dir, &all)
}

/// A number field of the summary.
fn count(summary: &Value, field: &str) -> u64 {
    summary[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} is {}: {summary}", summary[field]))
}

#[test]
fn a_load_settles_every_order_with_some_declines_and_stock_failures() {
    let dir = tempfile::tempdir().unwrap();
    let mut command = herald_command(dir.path());
    command.args(["up", "--listen", "127.0.0.1:0"]);
    let server = Herald::spawn(command);
    let url = format!("http://{}", server.addr());

    let output = success(load(
        dir.path(),
        &[
            "--url", &url, "--orders", "200", "--rate", "400", "--seed", "1", "--json",
        ],
    ));
    let summary: Value = serde_json::from_str(&output).expect("the summary is JSON");
    assert_eq!(count(&summary, "due"), 200);
    assert_eq!(count(&summary, "placed"), 200, "{summary}");
    assert_eq!(count(&summary, "rejected"), 0, "{summary}");
    assert_eq!(count(&summary, "abandoned"), 0, "{summary}");
    assert_eq!(count(&summary, "still_pending"), 0, "{summary}");
    assert_eq!(
        count(&summary, "completed") + count(&summary, "cancelled"),
        200,
        "{summary}"
    );
    let reasons = &summary["cancelled_by_reason"];
    assert!(reasons["payment_declined"].as_u64() > Some(0), "{summary}");
    assert!(reasons["out_of_stock"].as_u64() > Some(0), "{summary}");
    for field in [
        "seconds",
        "orders_per_sec",
        "p50_ms",
        "p95_ms",
        "p99_ms",
        "max_ms",
    ] {
        assert!(summary[field].is_number(), "{field}: {summary}");
    }
    assert!(summary["p50_ms"].as_f64() <= summary["p99_ms"].as_f64());

    // The server holds exactly the orders placed.
    let orders = common::runtime_current_thread()
        .block_on(async { server.get("/api/orders?limit=500").await });
    assert_eq!(orders.body["orders"].as_array().map(Vec::len), Some(200));
    assert!(server.terminate().success());
}

#[test]
fn an_unreachable_server_is_counted_and_retried_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    // A port that was free a moment ago and has no listener now.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let output = success(load(
        dir.path(),
        &[
            "--url",
            &url,
            "--orders",
            "2",
            "--give-up-secs",
            "0.5",
            "--json",
        ],
    ));
    let summary: Value = serde_json::from_str(&output).expect("the summary is JSON");
    assert_eq!(count(&summary, "placed"), 0, "{summary}");
    assert_eq!(count(&summary, "abandoned"), 2, "{summary}");
    assert!(
        count(&summary, "errors") >= 2,
        "each order was tried: {summary}"
    );
}

#[test]
fn bad_options_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        ["--rate", "0"],
        ["--orders", "0"],
        ["--concurrency", "0"],
        ["--url", "ftp://example"],
        ["--wait-ms", "999999"],
    ] {
        let stderr = failure(load(dir.path(), &args));
        assert!(stderr.starts_with("error: "), "{args:?}: {stderr}");
    }
}
