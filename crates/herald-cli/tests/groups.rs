//! `herald groups lag` end to end: the real binary on a data directory where a consumer
//! group consumed part of a topic through the embedded broker.

use std::process::Command;

use herald_core::Event;
use herald_core::broker::{GroupName, Publisher as _, Subscriber as _, TopicName, partition_for};
use herald_log::broker::{Broker, BrokerOptions};
use herald_log::{Log, Options};
use serde_json::{Value, json};

mod common;

use common::{failure, herald, runtime_current_thread, success};

/// `count` events whose keys land in `partition` of 2.
fn events_in(partition: u32, count: usize) -> Vec<Event> {
    (0..)
        .map(|n| format!("order-{n}"))
        .filter(|key| partition_for(key, 2) == partition)
        .take(count)
        .map(|key| Event::new("/orders", "OrderPlaced").with_partition_key(key))
        .collect()
}

/// A data directory with topic `orders` (2 partitions: 3 messages in 0, 5 in 1), of which
/// group `billing` acked all of partition 0 and the first 2 of partition 1; the log closed.
fn populated() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime_current_thread();
    runtime.block_on(async {
        let log = Log::open(Options::new(dir.path())).unwrap();
        let broker = Broker::new(log.clone(), BrokerOptions::default());
        let orders = TopicName::new("orders").unwrap();
        broker.create_topic(&orders, 2).await.unwrap();
        broker.publish(&orders, events_in(0, 3)).await.unwrap();
        broker.publish(&orders, events_in(1, 5)).await.unwrap();
        let mut consumer = broker
            .subscribe(&orders, &GroupName::new("billing").unwrap())
            .await
            .unwrap();
        for _ in 0..8 {
            let message = consumer.recv().await.unwrap().unwrap();
            if message.partition == 0 || message.offset < 2 {
                consumer.ack(&message).await.unwrap();
            }
        }
        consumer.close().await.unwrap();
        broker.shutdown().await;
        log.close().await.unwrap();
    });
    dir
}

#[test]
fn lag_as_json_lists_every_partition_and_the_totals() {
    let dir = populated();
    let out = success(herald(
        dir.path(),
        &[
            "groups", "lag", "--topic", "orders", "--group", "billing", "--json",
        ],
    ));
    let lag: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        lag,
        json!({
            "topic": "orders",
            "group": "billing",
            "head": 8,
            "committed": 5,
            "lag": 3,
            "partitions": [
                { "partition": 0, "head": 3, "committed": 3, "lag": 0 },
                { "partition": 1, "head": 5, "committed": 2, "lag": 3 },
            ],
        })
    );
}

#[test]
fn lag_as_a_table_has_a_row_per_partition_and_a_total() {
    let dir = populated();
    let out = success(herald(
        dir.path(),
        &["groups", "lag", "--topic", "orders", "--group", "billing"],
    ));
    let header = out.lines().find(|line| line.contains("partition")).unwrap();
    for column in ["head", "committed", "lag"] {
        assert!(header.contains(column), "no `{column}` in\n{out}");
    }
    let cells = |first: &str| -> Vec<String> {
        let row = out
            .lines()
            .find(|line| {
                line.split('|')
                    .nth(1)
                    .is_some_and(|cell| cell.trim() == first)
            })
            .unwrap_or_else(|| panic!("no row `{first}` in\n{out}"));
        row.split('|')
            .map(str::trim)
            .filter(|cell| !cell.is_empty())
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(cells("0"), ["0", "3", "3", "0"]);
    assert_eq!(cells("1"), ["1", "5", "2", "3"]);
    assert_eq!(cells("total"), ["total", "8", "5", "3"]);
}

#[test]
fn a_group_that_never_committed_lags_by_everything_with_a_note() {
    let dir = populated();
    let output = herald(
        dir.path(),
        &[
            "groups", "lag", "--topic", "orders", "--group", "audit", "--json",
        ],
    );
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let lag: Value = serde_json::from_str(&success(output)).unwrap();
    assert_eq!((&lag["committed"], &lag["lag"]), (&json!(0), &json!(8)));
    assert!(
        stderr.contains("note: group `audit` has committed nothing on topic `orders`"),
        "{stderr}"
    );
    // Asking created nothing: billing's numbers are unchanged, and audit is still new.
    let again: Value = serde_json::from_str(&success(herald(
        dir.path(),
        &[
            "groups", "lag", "--topic", "orders", "--group", "audit", "--json",
        ],
    )))
    .unwrap();
    assert_eq!(again, lag);
}

#[test]
fn an_unknown_topic_fails_with_a_hint() {
    let dir = populated();
    let stderr = failure(herald(
        dir.path(),
        &["groups", "lag", "--topic", "payments", "--group", "billing"],
    ));
    assert!(
        stderr.contains(
            "error: cannot read the lag of group `billing` on topic `payments`: topic \
             `payments` does not exist"
        ),
        "{stderr}"
    );
    assert!(stderr.contains("hint: "), "{stderr}");
    assert!(stderr.contains("--data-dir"), "{stderr}");
}

#[test]
fn names_with_a_colon_are_refused() {
    let dir = populated();
    for (args, message) in [
        (
            ["--topic", "orders:eu", "--group", "billing"],
            r#"invalid topic name "orders:eu": `:` is not allowed in topic and group names"#,
        ),
        (
            ["--topic", "orders", "--group", "billing:eu"],
            r#"invalid group name "billing:eu": `:` is not allowed in topic and group names"#,
        ),
    ] {
        let stderr = failure(herald(
            dir.path(),
            &[&["groups", "lag"][..], &args[..]].concat(),
        ));
        assert!(stderr.contains(message), "{stderr}");
    }
}

#[test]
fn the_data_directory_comes_from_the_environment_and_must_exist() {
    let dir = populated();
    let output = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["groups", "lag", "--topic", "orders", "--group", "billing"])
        .args(["--json"])
        .env("HERALD_DATA_DIR", dir.path())
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let lag: Value = serde_json::from_str(&success(output)).unwrap();
    assert_eq!(lag["lag"], json!(3));

    let missing = dir.path().join("nowhere");
    let stderr = failure(herald(
        &missing,
        &["groups", "lag", "--topic", "orders", "--group", "billing"],
    ));
    assert!(stderr.contains("there is no event log"), "{stderr}");
    assert!(!missing.exists(), "a missing data directory is not created");
}
