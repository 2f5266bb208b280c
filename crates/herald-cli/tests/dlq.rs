//! `herald dlq` end to end: the real binary on a data directory whose dead letters were
//! stored through `EventStoreDeadLetters` on the embedded log, as a consumer stores them.

use std::path::Path;
use std::sync::Arc;

use chrono::{TimeZone, Utc};
use herald_core::broker::{GroupName, TopicName};
use herald_core::{Event, EventStore};
use herald_log::{Log, Options};
use herald_runtime::{DeadLetter, DeadLetterStore, ErrorKind, EventStoreDeadLetters};
use serde_json::{Value, json};

mod common;

use common::{failure, herald, runtime_current_thread, success};

/// The record of event `id` dead-lettered by the `billing` group.
fn dead_letter(id: &str, reason: &str, error_kind: ErrorKind, attempts: u32) -> DeadLetter {
    DeadLetter {
        event: Event::new("/orders", "OrderPlaced")
            .with_id(id)
            .with_data(json!({ "order_id": id, "total_cents": 1250 })),
        reason: reason.to_owned(),
        error_kind,
        attempts,
        handler: "OrderPlaced".to_owned(),
        group: GroupName::new("billing").unwrap(),
        topic: TopicName::new("orders").unwrap(),
        partition: 3,
        offset: 42,
        first_failure_at: Utc.with_ymd_and_hms(2026, 11, 23, 12, 0, 1).unwrap(),
        last_failure_at: Utc.with_ymd_and_hms(2026, 11, 23, 12, 0, 9).unwrap(),
    }
}

/// A data directory holding two dead letters of group `billing`, the log closed again.
fn populated() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime_current_thread();
    runtime.block_on(async {
        let log = Arc::new(Log::open(Options::new(dir.path())).unwrap());
        let store = EventStoreDeadLetters::new(Arc::clone(&log) as Arc<dyn EventStore>);
        store
            .put(dead_letter(
                "evt-a",
                "card declined",
                ErrorKind::Transient,
                5,
            ))
            .await
            .unwrap();
        store
            .put(dead_letter("evt-b", "no such SKU", ErrorKind::Permanent, 1))
            .await
            .unwrap();
        log.close().await.unwrap();
    });
    dir
}

/// `ls --json`: the status of each listed id.
fn statuses(dir: &Path) -> Vec<(String, String)> {
    success(herald(dir, &["dlq", "ls", "--group", "billing", "--json"]))
        .lines()
        .map(|line| {
            let record: Value = serde_json::from_str(line).unwrap();
            (
                record["id"].as_str().unwrap().to_owned(),
                record["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn pair(id: &str, status: &str) -> (String, String) {
    (id.to_owned(), status.to_owned())
}

#[test]
fn ls_shows_a_table_of_the_groups_dead_letters() {
    let dir = populated();
    let table = success(herald(dir.path(), &["dlq", "ls", "--group", "billing"]));
    for header in [
        "id",
        "type",
        "reason",
        "attempts",
        "first failure",
        "last failure",
        "status",
    ] {
        assert!(table.contains(header), "no `{header}` in\n{table}");
    }
    let row_a = table.lines().find(|line| line.contains("evt-a")).unwrap();
    for cell in [
        "OrderPlaced",
        "card declined (transient)",
        "5",
        "2026-11-23T12:00:01+00:00",
        "2026-11-23T12:00:09+00:00",
        "pending",
    ] {
        assert!(row_a.contains(cell), "no `{cell}` in {row_a}");
    }
    let row_b = table.lines().find(|line| line.contains("evt-b")).unwrap();
    assert!(row_b.contains("no such SKU (permanent)"), "{row_b}");
    assert!(
        table.find("evt-a").unwrap() < table.find("evt-b").unwrap(),
        "ids in order"
    );

    assert_eq!(
        statuses(dir.path()),
        [pair("evt-a", "pending"), pair("evt-b", "pending")]
    );
}

#[test]
fn ls_of_a_group_without_dead_letters_prints_nothing_and_says_so() {
    let dir = populated();
    let output = herald(dir.path(), &["dlq", "ls", "--group", "shipping"]);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(success(output), "");
    assert!(
        stderr.contains("group `shipping` has no dead letters"),
        "{stderr}"
    );
}

#[test]
fn show_prints_the_full_record_as_json() {
    let dir = populated();
    let shown: Value = serde_json::from_str(&success(herald(
        dir.path(),
        &["dlq", "show", "--group", "billing", "evt-a"],
    )))
    .unwrap();
    assert_eq!(
        shown,
        json!({
            "id": "evt-a",
            "status": "pending",
            "event": {
                "specversion": "1.0",
                "id": "evt-a",
                "source": "/orders",
                "type": "OrderPlaced",
                "datacontenttype": "application/json",
                "data": { "order_id": "evt-a", "total_cents": 1250 },
            },
            "reason": "card declined",
            "error_kind": "transient",
            "attempts": 5,
            "handler": "OrderPlaced",
            "group": "billing",
            "topic": "orders",
            "partition": 3,
            "offset": 42,
            "first_failure_at": "2026-11-23T12:00:01Z",
            "last_failure_at": "2026-11-23T12:00:09Z",
        })
    );
}

#[test]
fn discard_removes_a_dead_letter_and_a_second_discard_is_harmless() {
    let dir = populated();
    let args = ["dlq", "discard", "--group", "billing", "evt-a"];
    let first = success(herald(dir.path(), &args));
    assert!(first.contains("discarded dead letter `evt-a`"), "{first}");
    let second = success(herald(dir.path(), &args));
    assert!(second.contains("already discarded"), "{second}");
    assert_eq!(statuses(dir.path()), [pair("evt-b", "pending")]);

    let error = failure(herald(
        dir.path(),
        &["dlq", "show", "--group", "billing", "evt-a"],
    ));
    assert!(
        error.contains("error: dead letter `evt-a` of group `billing` was discarded"),
        "{error}"
    );
    assert!(error.contains("hint: "), "{error}");
}

#[test]
fn replay_requests_once_and_a_dry_run_changes_nothing() {
    let dir = populated();
    let dry_run = success(herald(
        dir.path(),
        &["dlq", "replay", "--group", "billing", "evt-a", "--dry-run"],
    ));
    assert!(dry_run.contains("would request a replay"), "{dry_run}");
    assert!(dry_run.contains("nothing changed"), "{dry_run}");
    // Then the event that would be re-delivered, as a structured CloudEvent.
    let (_, event) = dry_run.split_once('\n').unwrap();
    let event: Value = serde_json::from_str(event).unwrap();
    assert_eq!(event["id"], "evt-a");
    assert_eq!(event["data"]["total_cents"], 1250);
    assert_eq!(
        statuses(dir.path()),
        [pair("evt-a", "pending"), pair("evt-b", "pending")]
    );

    let args = ["dlq", "replay", "--group", "billing", "evt-a"];
    let first = success(herald(dir.path(), &args));
    assert!(first.contains("requested a replay"), "{first}");
    assert_eq!(
        statuses(dir.path()),
        [pair("evt-a", "replay-requested"), pair("evt-b", "pending")]
    );
    let second = success(herald(dir.path(), &args));
    assert!(second.contains("already requested"), "{second}");
    assert_eq!(
        statuses(dir.path()),
        [pair("evt-a", "replay-requested"), pair("evt-b", "pending")]
    );

    let dry_run = success(herald(
        dir.path(),
        &["dlq", "replay", "--group", "billing", "evt-a", "--dry-run"],
    ));
    assert!(dry_run.contains("already requested"), "{dry_run}");
}

#[test]
fn an_unknown_id_fails_with_a_clear_message_and_a_hint() {
    let dir = populated();
    for command in ["show", "discard", "replay"] {
        let error = failure(herald(
            dir.path(),
            &["dlq", command, "--group", "billing", "evt-x"],
        ));
        assert!(
            error.contains("error: group `billing` has no dead letter `evt-x`"),
            "{command}: {error}"
        );
        assert!(
            error.contains(
                "hint: list the group's dead letters with `herald dlq ls --group billing`"
            ),
            "{command}: {error}"
        );
    }
    // Dead letters belong to their group.
    let error = failure(herald(
        dir.path(),
        &["dlq", "discard", "--group", "shipping", "evt-a"],
    ));
    assert!(
        error.contains("group `shipping` has no dead letter `evt-a`"),
        "{error}"
    );
    assert_eq!(
        statuses(dir.path()),
        [pair("evt-a", "pending"), pair("evt-b", "pending")]
    );
}

#[test]
fn a_missing_data_directory_is_reported_not_created() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("nowhere");
    let error = failure(herald(&dir, &["dlq", "ls", "--group", "billing"]));
    assert!(error.contains("there is no event log in"), "{error}");
    assert!(!dir.exists());
}
