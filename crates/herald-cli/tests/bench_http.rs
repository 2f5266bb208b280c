//! `herald bench http` end to end, on a small run: the JSON report has its shape, and every
//! scenario appended (or sent) every event asked for. No timing is checked: these machines are shared
//! and noisy.

use serde_json::Value;

mod common;

use common::{herald, success};

#[test]
fn a_small_http_bench_reports_every_scenario_and_the_ratios() {
    let parent = tempfile::tempdir().unwrap();
    let output = success(herald(
        parent.path(),
        &[
            "bench",
            "http",
            "--json",
            "--events",
            "300",
            "--clients",
            "4",
            "--batch",
            "2",
            "--baseline-secs",
            "0.05",
        ],
    ));
    let report: Value = serde_json::from_str(&output).expect("the report is JSON");

    assert_eq!(report["bench"], "http");
    assert_eq!(report["durability"], "fsync");
    assert_eq!(report["event_bytes"], 500);
    assert_eq!(report["clients"], 4);
    assert_eq!(report["batch_size"], 2);
    for field in [
        "baseline_fsync_per_sec",
        "baseline_fsync_p50_us",
        "baseline_mb_per_sec",
        "ratio",
        "ratio_ceiling",
        "ratio_to_tcp_baseline",
        "target_ratio",
    ] {
        assert!(report[field].is_number(), "{field} is {}", report[field]);
    }
    assert!(report["target_met"].is_boolean());
    let scenarios = report["scenarios"].as_array().expect("a list of scenarios");
    let names: Vec<&str> = scenarios
        .iter()
        .map(|row| row["scenario"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["in_process", "http", "tcp_baseline"]);
    for row in scenarios {
        let name = &row["scenario"];
        assert_eq!(row["events"], 300, "{name}");
        // 300 events over 4 clients, 2 per append: 75 each, so 38 appends each.
        assert_eq!(row["appends"], 152, "{name}");
        for field in [
            "seconds",
            "appends_per_sec",
            "events_per_sec",
            "p50_us",
            "p99_us",
            "max_us",
            "ratio_to_baseline_fsync",
        ] {
            assert!(row[field].is_number(), "{name}: {field} is {}", row[field]);
        }
        assert!(row.get("cpu_us_per_append").is_some(), "{name}");
        assert!(row["p50_us"].as_u64() <= row["max_us"].as_u64(), "{name}");
    }
    // The bench cleans up after itself.
    assert_eq!(std::fs::read_dir(parent.path()).unwrap().count(), 0);
}
