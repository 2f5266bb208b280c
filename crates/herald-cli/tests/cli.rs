//! `herald events` end to end: the real binary on a temporary data directory.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{Value, json};

mod common;

use common::{failure, herald, herald_with_stdin, success};

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

/// A fresh data directory that does not exist yet.
fn data_dir() -> (tempfile::TempDir, PathBuf) {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("data");
    (temp, dir)
}

fn append_one(dir: &Path, stream: &str) -> Value {
    let out = success(herald(
        dir,
        &["events", "append", "--stream", stream, "--type", "Noted"],
    ));
    serde_json::from_str(&out).unwrap()
}

#[test]
fn appended_events_read_back() {
    let (_temp, dir) = data_dir();

    let single: Value = serde_json::from_str(&success(herald(
        &dir,
        &[
            "events",
            "append",
            "--stream",
            "order-1",
            "--type",
            "OrderPlaced",
            "--source",
            "/orders",
            "--data",
            r#"{"total":42}"#,
            "--subject",
            "1",
            "--correlation-id",
            "corr-1",
        ],
    )))
    .unwrap();
    assert_eq!(single["stream"], "order-1");
    assert_eq!(single["events"][0]["version"], 0);
    assert_eq!(single["events"][0]["position"], 0);
    let first_id = single["events"][0]["id"].as_str().unwrap().to_owned();

    let batch = json!([
        {"specversion": "1.0", "id": "evt-2", "source": "/orders", "type": "OrderPaid",
         "data": {"amount": 42}},
        {"specversion": "1.0", "id": "evt-3", "source": "/orders", "type": "OrderShipped",
         "partitionkey": "order-1", "data_base64": "AAEC"},
    ]);
    let file = dir.parent().unwrap().join("batch.json");
    std::fs::write(&file, serde_json::to_vec(&batch).unwrap()).unwrap();
    let appended: Value = serde_json::from_str(&success(herald(
        &dir,
        &[
            "events",
            "append",
            "--stream",
            "order-1",
            "--expected-version",
            "0",
            "--file",
            file.to_str().unwrap(),
        ],
    )))
    .unwrap();
    assert_eq!(
        appended["events"],
        json!([
            {"id": "evt-2", "version": 1, "position": 1},
            {"id": "evt-3", "version": 2, "position": 2},
        ])
    );

    let event = br#"{"specversion":"1.0","id":"evt-4","source":"/billing","type":"InvoiceSent"}"#;
    let from_stdin: Value = serde_json::from_str(&success(herald_with_stdin(
        &dir,
        &[
            "events",
            "append",
            "--stream",
            "invoice-9",
            "--expected-version",
            "no-stream",
            "--file",
            "-",
        ],
        event,
    )))
    .unwrap();
    assert_eq!(
        from_stdin["events"],
        json!([{"id": "evt-4", "version": 0, "position": 3}])
    );

    let lines = json_lines(&success(herald(
        &dir,
        &["events", "read", "--stream", "order-1"],
    )));
    assert_eq!(lines.len(), 3);
    let first = &lines[0];
    assert_eq!(first["stream"], "order-1");
    assert_eq!(first["version"], 0);
    assert_eq!(first["position"], 0);
    assert!(first["recorded_at"].as_str().unwrap().ends_with('Z'));
    let event = &first["event"];
    assert_eq!(event["specversion"], "1.0");
    assert_eq!(event["id"], first_id.as_str());
    assert_eq!(event["type"], "OrderPlaced");
    assert_eq!(event["source"], "/orders");
    assert_eq!(event["subject"], "1");
    assert_eq!(event["correlationid"], "corr-1");
    assert_eq!(event["datacontenttype"], "application/json");
    assert_eq!(event["data"], json!({"total": 42}));
    assert!(event["time"].is_string());
    // The batch's events come back exactly as they were written.
    assert_eq!(lines[1]["event"], batch[0]);
    assert_eq!(lines[2]["event"], batch[1]);

    // The global log, backward, limited; then forward from a position.
    let lines = json_lines(&success(herald(
        &dir,
        &["events", "read", "--backward", "--limit", "2"],
    )));
    let positions: Vec<&Value> = lines.iter().map(|line| &line["position"]).collect();
    assert_eq!(positions, [&json!(3), &json!(2)]);
    assert_eq!(lines[0]["stream"], "invoice-9");
    let lines = json_lines(&success(herald(&dir, &["events", "read", "--from", "2"])));
    let ids: Vec<&Value> = lines.iter().map(|line| &line["event"]["id"]).collect();
    assert_eq!(ids, [&json!("evt-3"), &json!("evt-4")]);
}

#[test]
fn reads_are_served_in_pages_up_to_the_limit() {
    let (_temp, dir) = data_dir();
    let batch: Vec<Value> = (0..2500)
        .map(|i| json!({"specversion": "1.0", "id": format!("e{i}"), "source": "/s", "type": "t"}))
        .collect();
    let bytes = serde_json::to_vec(&batch).unwrap();
    success(herald_with_stdin(
        &dir,
        &["events", "append", "--stream", "big", "--file", "-"],
        &bytes,
    ));
    let lines = json_lines(&success(herald(
        &dir,
        &["events", "read", "--limit", "2400"],
    )));
    assert_eq!(lines.len(), 2400);
    let lines = json_lines(&success(herald(
        &dir,
        &["events", "read", "--stream", "big", "--limit", "5000"],
    )));
    assert_eq!(lines.len(), 2500);
    assert_eq!(lines[2499]["version"], 2499);
}

#[test]
fn a_wrong_expected_version_is_refused_with_the_actual_version() {
    let (_temp, dir) = data_dir();
    for _ in 0..3 {
        append_one(&dir, "account-7");
    }
    let output = herald(
        &dir,
        &[
            "events",
            "append",
            "--stream",
            "account-7",
            "--type",
            "Debited",
            "--expected-version",
            "0",
        ],
    );
    assert!(output.stdout.is_empty());
    let stderr = failure(output);
    assert!(stderr.contains("expected 0, actual 2"), "{stderr}");
    assert!(stderr.contains("--expected-version 2"), "{stderr}");

    let stderr = failure(herald(
        &dir,
        &[
            "events",
            "append",
            "--stream",
            "account-7",
            "--type",
            "Opened",
            "--expected-version",
            "no-stream",
        ],
    ));
    assert!(stderr.contains("actual 2"), "{stderr}");

    // Nothing was appended by the refused appends.
    let lines = json_lines(&success(herald(
        &dir,
        &["events", "read", "--stream", "account-7"],
    )));
    assert_eq!(lines.len(), 3);
}

#[test]
fn an_invalid_cloudevent_is_refused_naming_the_attribute() {
    let (temp, dir) = data_dir();
    let file = temp.path().join("event.json");

    std::fs::write(&file, br#"{"specversion":"1.0","id":"1","type":"t"}"#).unwrap();
    let args = [
        "events",
        "append",
        "--stream",
        "s",
        "--file",
        file.to_str().unwrap(),
    ];
    let stderr = failure(herald(&dir, &args));
    assert!(stderr.contains("`source`"), "{stderr}");
    assert!(stderr.contains("event.json"), "{stderr}");

    std::fs::write(
        &file,
        br#"[{"specversion":"1.0","id":"1","source":"/s","type":"t"},
            {"specversion":"1.0","id":"2","source":"/s","type":"t","Bad_Name":1}]"#,
    )
    .unwrap();
    let stderr = failure(herald(&dir, &args));
    assert!(stderr.contains("event 1 of the batch"), "{stderr}");
    assert!(stderr.contains("`Bad_Name`"), "{stderr}");
    // Each reason is said once, even though errors nest.
    assert_eq!(stderr.matches("lower-case").count(), 1, "{stderr}");

    std::fs::write(&file, b"{\"specversion\": ").unwrap();
    let stderr = failure(herald(&dir, &args));
    assert!(stderr.contains("line 1"), "{stderr}");

    let stderr = failure(herald(
        &dir,
        &[
            "events", "append", "--stream", "s", "--type", "t", "--data", "{oops",
        ],
    ));
    assert!(stderr.contains("--data is not valid JSON"), "{stderr}");

    // Bad input is refused before the log is touched.
    assert!(!dir.exists());
}

#[test]
fn a_locked_data_directory_is_reported_clearly() {
    let (_temp, dir) = data_dir();
    append_one(&dir, "s");

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let log = herald_log::Log::open(herald_log::Options::new(&dir)).unwrap();

    let stderr = failure(herald(
        &dir,
        &["events", "append", "--stream", "s", "--type", "t"],
    ));
    assert!(stderr.contains("locked by another process"), "{stderr}");
    assert!(stderr.contains("herald process"), "{stderr}");
    assert!(stderr.contains("--data-dir"), "{stderr}");
    let stderr = failure(herald(&dir, &["events", "read"]));
    assert!(stderr.contains("locked by another process"), "{stderr}");

    // Closing releases the lock.
    runtime.block_on(log.close()).unwrap();
    let appended = append_one(&dir, "s");
    assert_eq!(appended["events"][0]["version"], 1);
}

#[test]
fn reading_a_missing_log_says_where_it_looked() {
    let (_temp, dir) = data_dir();
    let stderr = failure(herald(&dir, &["events", "read"]));
    assert!(stderr.contains("no event log in"), "{stderr}");
    assert!(stderr.contains("--data-dir"), "{stderr}");
    assert!(!dir.exists(), "reading must not create a log");

    append_one(&dir, "present");
    let stderr = failure(herald(&dir, &["events", "read", "--stream", "absent"]));
    assert!(stderr.contains("stream `absent` not found"), "{stderr}");
}

#[cfg(unix)]
#[test]
fn tail_prints_stored_events_and_stops_cleanly_on_ctrl_c() {
    use std::io::BufRead as _;

    let (_temp, dir) = data_dir();
    for _ in 0..3 {
        append_one(&dir, "feed");
    }
    append_one(&dir, "other");
    let mut child = Command::new(env!("CARGO_BIN_EXE_herald"))
        .arg("--data-dir")
        .arg(&dir)
        .args(["events", "tail", "--stream", "feed", "--from", "1"])
        .env_remove("HERALD_DATA_DIR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut versions = Vec::new();
    for _ in 0..2 {
        let mut line = String::new();
        if stdout.read_line(&mut line).unwrap() == 0 {
            let output = child.wait_with_output().unwrap();
            panic!(
                "tail exited early ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let line: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(line["stream"], "feed");
        versions.push(line["version"].as_u64().unwrap());
    }
    assert_eq!(versions, [1, 2]);

    // Ctrl-C: the tail closes the log and exits successfully.
    let interrupted = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(interrupted.success());
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "tail exited with {}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    // It released the data directory.
    assert_eq!(append_one(&dir, "feed")["events"][0]["version"], 3);
}
