//! `herald bench orders` end to end, on a tiny run: the JSON report has its shape, every
//! order placed is accounted for, and the invariants were checked and hold. No timing is
//! checked: these machines are shared and noisy.

use serde_json::Value;

mod common;

use common::{herald, success};

#[test]
fn a_small_orders_bench_reports_throughput_latency_and_invariants() {
    let parent = tempfile::tempdir().unwrap();
    let output = success(herald(
        parent.path(),
        &[
            "bench",
            "orders",
            "--json",
            "--duration-secs",
            "0.5",
            "--concurrency",
            "8",
            "--baseline-secs",
            "0.05",
        ],
    ));
    let report: Value = serde_json::from_str(&output).expect("the report is JSON");

    assert_eq!(report["bench"], "orders");
    assert_eq!(report["durability"], "fsync");
    assert_eq!(report["concurrency"], 8);
    for field in [
        "seconds",
        "orders_per_sec",
        "p50_ms",
        "p95_ms",
        "p99_ms",
        "max_ms",
        "baseline_fsync_per_sec",
        "baseline_fsync_p50_us",
        "baseline_mb_per_sec",
        "ratio_to_baseline_fsync",
    ] {
        assert!(report[field].is_number(), "{field} is {}", report[field]);
    }
    assert_eq!(report["target_orders_per_sec"], 2000.0);
    assert_eq!(report["target_p99_ms"], 250.0);
    assert!(report["target_met"].is_boolean());

    let count = |field: &str| {
        report[field]
            .as_u64()
            .unwrap_or_else(|| panic!("{field} is {}", report[field]))
    };
    assert!(count("orders") > 0, "{report}");
    assert_eq!(
        count("orders"),
        count("completed") + count("cancelled") + count("pending"),
        "{report}"
    );
    let by_reason: u64 = report["cancelled_by_reason"]
        .as_object()
        .expect("cancellations by reason")
        .values()
        .map(|count| count.as_u64().unwrap())
        .sum();
    assert_eq!(by_reason, count("cancelled"), "{report}");

    let invariants = &report["invariants"];
    assert_eq!(invariants["holds"], true, "{report}");
    assert_eq!(invariants["violations"], Value::Array(Vec::new()));
    assert_eq!(invariants["orders"], report["orders"]);
    assert_eq!(invariants["pending"], 0, "the system settled every order");

    // The bench directory is removed at the end.
    assert_eq!(std::fs::read_dir(parent.path()).unwrap().count(), 0);
}

#[test]
fn bad_options_are_refused() {
    let parent = tempfile::tempdir().unwrap();
    for args in [
        ["--duration-secs", "0"],
        ["--concurrency", "0"],
        ["--baseline-secs", "-1"],
    ] {
        let output = herald(
            parent.path(),
            &["bench", "orders", "--json", args[0], args[1]],
        );
        assert!(!output.status.success(), "{args:?} was accepted");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.lines().any(|line| line.starts_with("error: ")),
            "{args:?}: {stderr}"
        );
    }
}
