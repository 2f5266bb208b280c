//! `herald bench outbox` end to end, on a small run: the JSON report has its shape, each
//! scenario wrote and relayed what it was asked to, and PostgreSQL is either measured or
//! reported as skipped with the reason. No timing is checked: these machines are shared
//! and noisy.

use std::process::Command;

use serde_json::Value;

/// Events per enqueue scenario.
const EVENTS: u64 = 200;

#[test]
fn a_small_outbox_bench_reports_every_scenario() {
    let parent = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_herald"))
        .arg("--data-dir")
        .arg(parent.path())
        .args(["bench", "outbox", "--json", "--events", &EVENTS.to_string()])
        .args(["--batch", "5", "--writers", "2", "--duration-secs", "0.5"])
        .args(["--rate", "100"])
        .env_remove("HERALD_DATA_DIR")
        .env_remove("RUST_LOG")
        .output()
        .expect("the herald binary starts");
    assert!(
        output.status.success(),
        "herald bench outbox failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_slice(&output.stdout).expect("the report is JSON");

    assert_eq!(report["bench"], "outbox");
    assert_eq!(report["events"], EVENTS);
    assert_eq!(report["batch"], 5);
    assert_eq!(report["event_bytes"], 500);
    let postgres_skipped = report["enqueue"][1]["skipped"].as_str().map(str::to_owned);
    let postgres_installed = postgres_skipped.is_none();
    if let Some(reason) = &postgres_skipped {
        eprintln!("skipped: the PostgreSQL figures ({reason})");
        assert!(
            !herald_testkit::services_required(),
            "PostgreSQL is required: {reason}"
        );
    }

    let backends = |section: &str| -> Vec<String> {
        report[section]
            .as_array()
            .unwrap_or_else(|| panic!("{section} is a list"))
            .iter()
            .map(|row| row["backend"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(backends("enqueue"), ["sqlite", "postgres"]);
    assert_eq!(backends("relay"), ["sqlite", "postgres"]);

    for row in report["enqueue"].as_array().unwrap() {
        let backend = &row["backend"];
        if !row["skipped"].is_null() {
            continue;
        }
        assert_eq!(row["events"], EVENTS, "{backend}");
        for field in [
            "outbox_events_per_sec",
            "raw_insert_events_per_sec",
            "ratio",
            "outbox_p50_us",
            "outbox_p99_us",
            "raw_insert_p50_us",
            "raw_insert_p99_us",
        ] {
            assert!(
                row[field].is_number(),
                "{backend}: {field} is {}",
                row[field]
            );
        }
    }
    assert_eq!(report["enqueue"][0]["writers"], 1, "SQLite has one writer");
    for row in report["relay"].as_array().unwrap() {
        let backend = &row["backend"];
        if !row["skipped"].is_null() {
            continue;
        }
        // The relay publishes the backlog the outbox scenario left.
        assert_eq!(row["events"], EVENTS, "{backend}");
        for field in ["cpu_us_per_event", "server_cpu_us_per_event"] {
            assert!(row.get(field).is_some(), "{backend}: no {field}");
        }
        for field in ["seconds", "events_per_sec", "batches"] {
            assert!(
                row[field].is_number(),
                "{backend}: {field} is {}",
                row[field]
            );
        }
    }
    let latency = &report["latency"];
    assert_eq!(latency["backend"], "postgres");
    if postgres_installed {
        assert!(latency["events"].as_u64().unwrap() > 0, "{latency}");
        for field in ["events_per_sec", "p50_us", "p99_us", "max_us"] {
            assert!(
                latency[field].is_number(),
                "latency: {field} is {}",
                latency[field]
            );
        }
    } else {
        assert!(latency["skipped"].is_string());
    }

    let targets = &report["targets"];
    assert_eq!(targets["enqueue_ratio"], 0.8);
    assert_eq!(targets["relay_postgres_events_per_sec"], 20_000.0);
    assert_eq!(targets["latency_p99_ms"], 20.0);
    assert!(targets["enqueue_ratio_met_sqlite"].is_boolean());
    for field in [
        "enqueue_ratio_met_postgres",
        "relay_postgres_met",
        "latency_p99_met",
    ] {
        assert_eq!(
            targets[field].is_boolean(),
            postgres_installed,
            "targets: {field} is {}",
            targets[field]
        );
    }
}
