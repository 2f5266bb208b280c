//! Interop over HTTP with an independent implementation: a Python program using the
//! CloudEvents SDK (`cloudevents` 2.2.0 from PyPI, installed by
//! `scripts/install-test-deps.sh`) appends to a real `herald up` and reads back.
//!
//! The script builds events with every context attribute (`id`, `source`, `type`,
//! `specversion`, `datacontenttype`, `dataschema`, `subject`, `time`) and string, integer and
//! boolean extensions, with JSON data and with binary data. It POSTs them in the structured
//! mode (the SDK's `to_structured`) and in the binary mode (`to_binary`) with the standard
//! library's `urllib.request`, reads the streams back with `GET /streams/{stream}`, parses
//! each stored event with the SDK (`from_http`, and `from_dict` for JSON data) and checks every
//! attribute, extension and the data. The Rust side then stops the server gracefully and
//! checks the same events in the log on disk.
//!
//! The binary mode carries attributes in `ce-*` headers, which have no types: an integer or
//! boolean extension arrives, and is stored, as its string (`"42"`, `"true"`). The SDK writes
//! header values as they are (a Python `True` would go out as `True`, a non-ASCII subject would
//! not fit a header at all), so the script encodes them as the HTTP binding requires:
//! booleans as `true`/`false`, and space, `"`, `%` and non-ASCII characters percent-encoded.
//!
//! Without `python3` or the SDK the test prints `skipped: …` and passes, unless
//! `HERALD_REQUIRE_SERVICES=1`, under which it fails.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::process::Command;

use chrono::DateTime;
use herald_core::event::{Data, ExtensionValue};
use herald_core::{Direction, EventStore as _, RecordedEvent, StreamName, Version};
use herald_log::{Log, Options};
use serde_json::{Value, json};

mod common;

use common::http::Herald;
use common::runtime_current_thread;

const PYTHON: &str = "python3";

/// The SDK modules the script uses.
const PROBE: &str = "import cloudevents, cloudevents.v1.http; print(cloudevents.__version__)";

/// The script: `python3 -c SCRIPT http://ADDR`. Prints a JSON summary of what it checked.
const SCRIPT: &str = r#"
import base64, datetime, json, sys, urllib.error, urllib.parse, urllib.request
from cloudevents.v1.http import CloudEvent, from_dict, from_http, to_binary, to_structured

BASE = sys.argv[1]
TIME = "2026-11-23T17:31:07.123456+05:30"
JSON_DATA = {"order": {"id": "o-1", "lines": [{"sku": "a", "qty": 2, "price": 12.5}]},
             "note": None, "unicode": "ü 😀", "empty": {}}
BYTES_DATA = bytes(range(256))

def attributes(id, content_type):
    return {
        "id": id,
        "source": "https://python.example.com/orders",
        "type": "com.example.order.placed",
        "specversion": "1.0",
        "datacontenttype": content_type,
        "dataschema": "https://schemas.example.com/order/placed/v3.json",
        "subject": "order/Zürich 😀 \"42%\"",
        "time": TIME,
        "correlationid": "corr-py-1",
        "count": 42,
        "flag": True,
        "off": False,
    }

EVENTS = [
    ("json", "application/json", JSON_DATA),
    ("bytes", "application/octet-stream", BYTES_DATA),
]

# What a header can carry as it is: printable ASCII but space, `"` and `%`.
HEADER_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '"%')

def header_value(value):
    if isinstance(value, bool):
        value = "true" if value else "false"
    return urllib.parse.quote(str(value), safe=HEADER_SAFE)

def request(method, path, headers=None, body=None):
    req = urllib.request.Request(BASE + path, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        sys.exit(f"{method} {path}: {error.code}: {error.read().decode()}")

def post(stream, headers, body):
    status, answer = request("POST", "/streams/" + stream, headers, body)
    assert status == 201, (status, answer)
    return json.loads(answer)

sent = {}
for mode, convert in [("structured", to_structured), ("binary", to_binary)]:
    for name, content_type, data in EVENTS:
        event = CloudEvent(attributes(f"py-{mode}-{name}", content_type), data)
        headers, body = convert(event)
        if mode == "binary":
            headers = {key: header_value(value) for key, value in headers.items()}
            assert headers["ce-id"] == event["id"], headers
        else:
            assert headers["content-type"] == "application/cloudevents+json", headers
        answer = post("python-" + mode, headers, body)
        assert answer["events"][0]["id"] == event["id"], answer
        sent[event["id"]] = (mode, event)

def expected_attributes(mode, event):
    want = {name: event[name] for name in event}
    if mode == "binary":
        # Headers carry no types: the extensions come back as the strings that were sent.
        want["count"] = "42"
        want["flag"] = "true"
        want["off"] = "false"
    return want

def same(name, got, want):
    if name == "time":
        got_time = datetime.datetime.fromisoformat(got)
        want_time = datetime.datetime.fromisoformat(want)
        assert got_time == want_time and got_time.utcoffset() == want_time.utcoffset(), (got, want)
    else:
        assert got == want and type(got) is type(want), (name, got, want)

checked = []
for mode in ["structured", "binary"]:
    status, body = request("GET", f"/streams/python-{mode}")
    assert status == 200, status
    records = json.loads(body)["events"]
    assert [record["version"] for record in records] == list(range(len(EVENTS))), records
    for record in records:
        stored = record["event"]
        parsed = from_http({"content-type": "application/cloudevents+json"}, json.dumps(stored))
        sent_mode, event = sent[parsed["id"]]
        assert sent_mode == mode, (sent_mode, mode)
        want = expected_attributes(mode, event)
        got = {name: parsed[name] for name in parsed}
        assert set(got) == set(want), (sorted(got), sorted(want))
        for name in want:
            same(name, got[name], want[name])
        assert parsed.get_data() == event.get_data(), (parsed.get_data(), event.get_data())
        if isinstance(event.get_data(), dict):
            # The plain dictionary form reads the same.
            from_dictionary = from_dict(stored)
            assert from_dictionary.get_data() == event.get_data()
            for name in want:
                same(name, from_dictionary[name], want[name])
        checked.append({"stream": record["stream"], "id": parsed["id"]})

assert len(checked) == len(sent), (checked, sorted(sent))
json.dump({"checked": checked, "sdk": __import__("cloudevents").__version__}, sys.stdout)
"#;

/// Whether the SDK can be used; without it, fails under `HERALD_REQUIRE_SERVICES=1` and
/// otherwise prints why the test is skipped.
fn sdk_available(test: &str) -> bool {
    let problem = match Command::new(PYTHON).args(["-c", PROBE]).output() {
        Err(error) => format!("`{PYTHON}` cannot be run ({error})"),
        Ok(output) if !output.status.success() => format!(
            "the Python CloudEvents SDK is missing ({})",
            String::from_utf8_lossy(&output.stderr)
                .lines()
                .last()
                .unwrap_or("no error output")
        ),
        Ok(_) => return true,
    };
    if std::env::var("HERALD_REQUIRE_SERVICES").as_deref() == Ok("1") {
        panic!(
            "{test}: {problem}; HERALD_REQUIRE_SERVICES=1 requires it: run scripts/install-test-deps.sh"
        );
    }
    // Straight to the process's stderr: the test harness captures `eprintln!`, and a skip
    // must be visible.
    let _ = writeln!(
        std::io::stderr(),
        "skipped: {test}: {problem}; run scripts/install-test-deps.sh to install it"
    );
    false
}

#[test]
fn python_sdk_appends_over_http_and_reads_back_intact() {
    if !sdk_available("python_sdk_appends_over_http_and_reads_back_intact") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Herald::start(dir.path(), &[]);

    let output = Command::new(PYTHON)
        .args(["-c", SCRIPT, &format!("http://{}", server.addr())])
        .output()
        .expect("python3 starts");
    assert!(
        output.status.success(),
        "the Python script failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let summary: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
        panic!(
            "the Python script printed no JSON ({error}):\n{}",
            String::from_utf8_lossy(&output.stdout)
        )
    });
    assert_eq!(
        summary["checked"].as_array().map(Vec::len),
        Some(4),
        "{summary}"
    );
    assert!(server.terminate().success(), "herald up exits 0 on SIGTERM");

    // What is on disk, read by Rust.
    let runtime = runtime_current_thread();
    runtime.block_on(async {
        let log = Log::open(Options::new(dir.path())).unwrap();
        for mode in ["structured", "binary"] {
            let stream = StreamName::new(format!("python-{mode}")).unwrap();
            let stored = log
                .read_stream(&stream, Version(0), Direction::Forward, 10)
                .await
                .unwrap();
            assert_eq!(stored.len(), 2, "{mode}");
            check_json_event(mode, &stored[0]);
            check_bytes_event(mode, &stored[1]);
        }
        log.close().await.unwrap();
    });
}

/// The attributes every event of the script has.
fn check_attributes(mode: &str, record: &RecordedEvent, id: &str, content_type: &str) {
    let event = &record.event;
    assert_eq!(event.id, id, "{mode}");
    assert_eq!(event.source, "https://python.example.com/orders", "{id}");
    assert_eq!(event.ty, "com.example.order.placed", "{id}");
    assert_eq!(
        event.subject.as_deref(),
        Some("order/Zürich 😀 \"42%\""),
        "{id}"
    );
    assert_eq!(event.datacontenttype.as_deref(), Some(content_type), "{id}");
    assert_eq!(
        event.dataschema.as_deref(),
        Some("https://schemas.example.com/order/placed/v3.json"),
        "{id}"
    );
    let time = DateTime::parse_from_rfc3339("2026-11-23T17:31:07.123456+05:30").unwrap();
    assert_eq!(event.time, Some(time), "{id}");
    assert_eq!(
        event.time.unwrap().offset(),
        time.offset(),
        "{id}: the offset"
    );
    let string = |text: &str| ExtensionValue::String(text.to_owned());
    let want: BTreeMap<String, ExtensionValue> = if mode == "structured" {
        BTreeMap::from([
            ("correlationid".to_owned(), string("corr-py-1")),
            ("count".to_owned(), ExtensionValue::Integer(42)),
            ("flag".to_owned(), ExtensionValue::Boolean(true)),
            ("off".to_owned(), ExtensionValue::Boolean(false)),
        ])
    } else {
        BTreeMap::from([
            ("correlationid".to_owned(), string("corr-py-1")),
            ("count".to_owned(), string("42")),
            ("flag".to_owned(), string("true")),
            ("off".to_owned(), string("false")),
        ])
    };
    assert_eq!(event.extensions, want, "{id}: extensions");
}

fn check_json_event(mode: &str, record: &RecordedEvent) {
    check_attributes(mode, record, &format!("py-{mode}-json"), "application/json");
    let Some(Data::Json(raw)) = &record.event.data else {
        panic!("{mode}: JSON data expected, got {:?}", record.event.data);
    };
    let data: Value = serde_json::from_str(raw.get()).unwrap();
    assert_eq!(
        data,
        json!({"order": {"id": "o-1", "lines": [{"sku": "a", "qty": 2, "price": 12.5}]},
               "note": null, "unicode": "ü 😀", "empty": {}})
    );
}

fn check_bytes_event(mode: &str, record: &RecordedEvent) {
    check_attributes(
        mode,
        record,
        &format!("py-{mode}-bytes"),
        "application/octet-stream",
    );
    let want: Vec<u8> = (0..=255).collect();
    assert!(
        matches!(&record.event.data, Some(Data::Binary(bytes)) if *bytes == want),
        "{mode}: binary data: {:?}",
        record.event.data
    );
}
