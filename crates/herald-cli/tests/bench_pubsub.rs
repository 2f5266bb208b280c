//! `herald bench pubsub` end to end, on a small run: the JSON report has its shape and
//! every scenario delivered every event it published. No timing is checked: these machines
//! are shared and noisy.

use serde_json::Value;

mod common;

use common::{herald, success};

/// The scenarios the report must hold, in order.
const SCENARIOS: [&str; 8] = [
    "consumers_1_full",
    "consumers_1_bare",
    "consumers_4_full",
    "consumers_4_bare",
    "channel_baseline",
    "consumers_1_full_half_rate",
    "consumers_1_bare_half_rate",
    "disk_floor_half_rate",
];

#[test]
fn a_small_pubsub_bench_reports_every_scenario_fully_delivered() {
    let parent = tempfile::tempdir().unwrap();
    let output = success(herald(
        parent.path(),
        &["bench", "pubsub", "--json", "--events", "2000"],
    ));
    let report: Value = serde_json::from_str(&output).expect("the report is JSON");

    assert_eq!(report["bench"], "pubsub");
    assert_eq!(report["durability"], "fsync");
    assert_eq!(report["event_bytes"], 500);
    let scenarios = report["scenarios"].as_array().expect("a list of scenarios");
    let names: Vec<&str> = scenarios
        .iter()
        .map(|row| row["scenario"].as_str().unwrap())
        .collect();
    assert_eq!(names, SCENARIOS);
    for row in scenarios {
        let name = &row["scenario"];
        assert_eq!(row["published"], 2000, "{name}");
        assert_eq!(row["events"], 2000, "{name}: not every event was handled");
        for field in [
            "duplicates",
            "seconds",
            "events_per_sec",
            "p50_us",
            "p99_us",
            "p999_us",
            "ratio_to_channel_baseline",
        ] {
            assert!(row[field].is_number(), "{name}: {field} is {}", row[field]);
        }
        for field in ["consumers", "stack", "target_rate", "cpu_us_per_event"] {
            assert!(row.get(field).is_some(), "{name}: no {field}");
        }
    }
    assert!(scenarios[5]["target_rate"].is_number());
    assert_eq!(scenarios[5]["target_rate"], scenarios[6]["target_rate"]);
    assert_eq!(scenarios[5]["target_rate"], scenarios[7]["target_rate"]);
    for field in [
        "middleware_cpu_us_per_event",
        "middleware_cpu_us_per_event_max_rate",
        "middleware_cpu_us_per_event_max_rate_4_consumers",
        "isolated_full_cpu_us_per_event",
        "isolated_bare_cpu_us_per_event",
        "isolated_middleware_cpu_us_per_event",
        "isolated_calls",
    ] {
        assert!(
            report["middleware"].get(field).is_some(),
            "middleware: no {field}"
        );
    }
    for field in [
        "throughput_events_per_sec",
        "throughput_met",
        "half_rate_p99_us",
        "half_rate_p99_met",
        "half_rate_p99_disk_floor_us",
        "middleware_cpu_us_per_event",
        "middleware_cpu_met",
    ] {
        assert!(
            report["targets"].get(field).is_some(),
            "targets: no {field}"
        );
    }
}
