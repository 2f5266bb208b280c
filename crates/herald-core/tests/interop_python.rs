//! Interop with an independent implementation: the Python CloudEvents SDK (`cloudevents`
//! 2.2.0 from PyPI, installed by `scripts/install-test-deps.sh`).
//!
//! Python writes events with the SDK's own conversion functions — the classic API
//! (`cloudevents.v1.conversion.to_json` / `to_structured`) and the new core API
//! (`JSONFormat().write`, `cloudevents.core.bindings.http.to_structured_event`) — and Rust
//! parses them and checks every attribute. Then Rust writes events and batches, Python parses
//! them with the SDK (`from_json`, `from_structured_event`) and prints the attributes as JSON,
//! and Rust compares. The SDK has no batch format, so batches are built and split as the JSON
//! format specifies: a JSON array of structured events, each written or read by the SDK.
//!
//! Without `python3` or the SDK the tests print `skipped: …` and pass, unless
//! `HERALD_REQUIRE_SERVICES=1`, under which they fail.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::process::{Command, Stdio};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use chrono::{DateTime, FixedOffset, SubsecRound as _, TimeZone as _};
use herald_core::event::{Data, Event, ExtensionValue};
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

const PYTHON: &str = "python3";

/// The SDK modules the scripts use.
const PROBE: &str = "import cloudevents, cloudevents.v1.conversion, cloudevents.core.formats.json, \
                     cloudevents.core.bindings.http; print(cloudevents.__version__)";

/// Writes each case of stdin with both SDK APIs; prints the documents.
const PY_WRITE: &str = r#"
import base64, json, sys
from dateutil.parser import isoparse
from cloudevents.v1.http import CloudEvent as LegacyEvent
from cloudevents.v1.conversion import to_json, to_structured
from cloudevents.core.v1.event import CloudEvent
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.bindings.http import to_structured_event

def payload(spec):
    if spec is None:
        return None
    if spec["kind"] == "binary":
        return base64.b64decode(spec["value"])
    return spec["value"]

out = {"legacy": [], "legacy_http": [], "core": [], "core_http": []}
for case in json.load(sys.stdin):
    data = payload(case["data"])
    legacy = LegacyEvent(dict(case["attributes"]), data)
    out["legacy"].append(to_json(legacy).decode("utf-8"))
    headers, body = to_structured(legacy)
    assert headers["content-type"] == "application/cloudevents+json", headers
    out["legacy_http"].append(body.decode("utf-8"))
    attributes = dict(case["attributes"])
    if "time" in attributes:
        attributes["time"] = isoparse(attributes["time"])
    core = CloudEvent(attributes, data)
    out["core"].append(JSONFormat().write(core).decode("utf-8"))
    message = to_structured_event(core)
    assert message.headers["content-type"] == "application/cloudevents+json", message.headers
    out["core_http"].append(message.body.decode("utf-8"))
# The SDK has no batch format: a batch is a JSON array of structured events.
for api in ["legacy", "core"]:
    out[api + "_batch"] = "[" + ",".join(out[api]) + "]"
json.dump(out, sys.stdout)
"#;

/// Reads each document of stdin with both SDK APIs; prints attributes and data.
const PY_READ: &str = r#"
import base64, json, sys
from cloudevents.v1.http import CloudEvent as LegacyEvent
from cloudevents.v1.conversion import from_json
from cloudevents.core.bindings.http import HTTPMessage, from_structured_event

def data_of(data):
    if data is None:
        return None
    if isinstance(data, (bytes, bytearray)):
        return {"kind": "binary", "value": base64.b64encode(data).decode("ascii")}
    return {"kind": "json", "value": data}

def legacy(text):
    # The identity unmarshaller keeps binary data as bytes and JSON data as its JSON text.
    event = from_json(LegacyEvent, text, data_unmarshaller=lambda raw: raw)
    data = event.get_data()
    if isinstance(data, str):
        data = json.loads(data)
    return {"attributes": {name: event[name] for name in event}, "data": data_of(data)}

def core(text):
    message = HTTPMessage(headers={"content-type": "application/cloudevents+json"},
                          body=text.encode("utf-8"))
    event = from_structured_event(message)
    attributes = dict(event.get_attributes())
    if attributes.get("time") is not None:
        attributes["time"] = attributes["time"].isoformat()
    return {"attributes": attributes, "data": data_of(event.get_data())}

doc = json.load(sys.stdin)
out = {"structured": [], "batch": []}
for text in doc["structured"]:
    out["structured"].append({"legacy": legacy(text), "core": core(text)})
# The SDK has no batch format: split the JSON array and read each event with the SDK.
for element in json.loads(doc["batch"]):
    text = json.dumps(element)
    out["batch"].append({"legacy": legacy(text), "core": core(text)})
json.dump(out, sys.stdout)
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

/// Runs `script` with `input` as JSON on stdin; its stdout as JSON.
fn python(script: &str, input: &Value) -> Value {
    let mut child = Command::new(PYTHON)
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 starts");
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(&serde_json::to_vec(input).expect("the input serialises"))
        .expect("the script reads its input");
    let output = child.wait_with_output().expect("the script finishes");
    assert!(
        output.status.success(),
        "the Python script failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
        panic!(
            "the Python script printed no JSON ({error}):\n{}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

// ---------------------------------------------------------------------------------------
// Python writes, Rust reads
// ---------------------------------------------------------------------------------------

/// An event as Python is asked to write it.
struct Case {
    attributes: Map<String, Value>,
    data: Option<Payload>,
}

enum Payload {
    Json(Value),
    Text(String),
    Binary(Vec<u8>),
}

const CONTEXT_ATTRIBUTES: [&str; 8] = [
    "specversion",
    "id",
    "source",
    "type",
    "time",
    "subject",
    "datacontenttype",
    "dataschema",
];

fn attributes(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        _ => unreachable!("the cases are written as objects"),
    }
}

fn python_cases() -> Vec<Case> {
    vec![
        Case {
            attributes: attributes(json!({
                "id": "0192f3a4-everything",
                "source": "https://orders.example.com/api",
                "type": "com.example.order.placed",
                "subject": "order/Zürich 😀",
                "time": "2026-11-23T17:31:07.123456+05:30",
                "datacontenttype": "application/json",
                "dataschema": "https://schemas.example.com/order/placed/v3.json",
                "correlationid": "corr-1",
                "causationid": "cause-1",
                "partitionkey": "order-42",
                "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                "dataversion": "3",
                "count": 42,
                "lowest": i32::MIN,
                "highest": i32::MAX,
                "flag": true,
                "off": false,
                "averyveryverylongextensionname": "longer than the recommended 20 characters",
            })),
            data: Some(Payload::Json(json!({
                "order": {"id": "o-1", "lines": [{"sku": "a", "qty": 2, "price": 12.5}]},
                "note": null,
                "unicode": "ü 😀 \u{7}",
                "empty": {},
            }))),
        },
        Case {
            attributes: attributes(json!({
                "id": "binary",
                "source": "/files",
                "type": "com.example.file.uploaded",
                "time": "2026-11-23T17:31:07Z",
                "datacontenttype": "application/octet-stream",
            })),
            data: Some(Payload::Binary((0..=255).collect())),
        },
        Case {
            attributes: attributes(json!({
                "id": "text",
                "source": "urn:example:mail",
                "type": "com.example.mail.sent",
                "time": "2026-11-23T17:31:07-03:00",
                "datacontenttype": "text/plain",
            })),
            data: Some(Payload::Text("plain text, ü".to_owned())),
        },
        Case {
            attributes: attributes(json!({
                "id": "minimal",
                "source": "/minimal",
                "type": "minimal",
            })),
            data: None,
        },
        Case {
            attributes: attributes(json!({
                "id": "array",
                "source": "/arrays",
                "type": "com.example.array",
            })),
            data: Some(Payload::Json(json!([1, "two", {"three": 3.5}, [], null]))),
        },
    ]
}

#[test]
fn rust_reads_what_python_writes() {
    if !sdk_available("rust_reads_what_python_writes") {
        return;
    }
    let cases = python_cases();
    let input: Vec<Value> = cases
        .iter()
        .map(|case| {
            let data = case.data.as_ref().map(|payload| match payload {
                Payload::Json(value) => json!({"kind": "json", "value": value}),
                Payload::Text(text) => json!({"kind": "text", "value": text}),
                Payload::Binary(bytes) => json!({"kind": "binary", "value": BASE64.encode(bytes)}),
            });
            json!({"attributes": case.attributes, "data": data})
        })
        .collect();
    let written = python(PY_WRITE, &Value::Array(input));

    for api in ["legacy", "legacy_http", "core", "core_http"] {
        let documents = written[api].as_array().expect("a list of documents");
        assert_eq!(documents.len(), cases.len());
        for (document, case) in documents.iter().zip(&cases) {
            let text = document.as_str().expect("a document");
            let event = Event::from_json(text.as_bytes())
                .unwrap_or_else(|error| panic!("{api}: Python's {text} does not parse: {error}"));
            check_python_event(&format!("{api}: {text}"), &event, case);
        }
    }
    for api in ["legacy_batch", "core_batch"] {
        let text = written[api].as_str().expect("a batch");
        let events = Event::batch_from_json(text.as_bytes())
            .unwrap_or_else(|error| panic!("{api}: Python's batch does not parse: {error}"));
        assert_eq!(events.len(), cases.len(), "{api}: one event per case");
        for (event, case) in events.iter().zip(&cases) {
            check_python_event(api, event, case);
        }
    }
}

fn check_python_event(what: &str, event: &Event, case: &Case) {
    let string = |name: &str| case.attributes.get(name).and_then(Value::as_str);
    assert_eq!(Some(event.id.as_str()), string("id"), "{what}: id");
    assert_eq!(
        Some(event.source.as_str()),
        string("source"),
        "{what}: source"
    );
    assert_eq!(Some(event.ty.as_str()), string("type"), "{what}: type");
    assert_eq!(
        event.subject.as_deref(),
        string("subject"),
        "{what}: subject"
    );
    assert_eq!(
        event.datacontenttype.as_deref(),
        string("datacontenttype"),
        "{what}: datacontenttype"
    );
    assert_eq!(
        event.dataschema.as_deref(),
        string("dataschema"),
        "{what}: dataschema"
    );
    match string("time") {
        Some(time) => {
            let want = DateTime::parse_from_rfc3339(time).expect("the cases' times are valid");
            let got = event
                .time
                .unwrap_or_else(|| panic!("{what}: time is missing"));
            assert_eq!(got, want, "{what}: time");
            assert_eq!(got.offset(), want.offset(), "{what}: the offset of time");
        }
        // Both APIs of the SDK stamp the current time on an event without one.
        None => assert!(event.time.is_some(), "{what}: the SDK's default time"),
    }
    let want_extensions: BTreeMap<String, ExtensionValue> = case
        .attributes
        .iter()
        .filter(|(name, _)| !CONTEXT_ATTRIBUTES.contains(&name.as_str()))
        .map(|(name, value)| {
            let value = match value {
                Value::String(text) => ExtensionValue::String(text.clone()),
                Value::Bool(flag) => ExtensionValue::Boolean(*flag),
                Value::Number(number) => ExtensionValue::Integer(
                    number
                        .as_i64()
                        .and_then(|n| i32::try_from(n).ok())
                        .expect("the cases' integers fit in 32 bits"),
                ),
                other => unreachable!("the cases have no extension like {other}"),
            };
            (name.clone(), value)
        })
        .collect();
    assert_eq!(event.extensions, want_extensions, "{what}: extensions");
    match (&event.data, &case.data) {
        (None, None) => {}
        (Some(Data::Json(raw)), Some(Payload::Json(want))) => {
            let got: Value = serde_json::from_str(raw.get()).expect("the data is JSON");
            assert_eq!(&got, want, "{what}: JSON data");
        }
        (Some(Data::Json(raw)), Some(Payload::Text(want))) => {
            let got: Value = serde_json::from_str(raw.get()).expect("the data is JSON");
            assert_eq!(got, Value::String(want.clone()), "{what}: text data");
        }
        (Some(Data::Binary(got)), Some(Payload::Binary(want))) => {
            assert_eq!(got, want, "{what}: binary data");
        }
        (got, _) => panic!("{what}: data of the wrong kind: {got:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// Rust writes, Python reads
// ---------------------------------------------------------------------------------------

fn rust_events() -> Vec<Event> {
    let offset = |seconds| FixedOffset::east_opt(seconds).expect("a valid offset");
    let time = |seconds, nanos| {
        offset(seconds)
            .with_ymd_and_hms(2026, 11, 23, 17, 31, 7)
            .single()
            .expect("an unambiguous time")
            + chrono::Duration::nanoseconds(nanos)
    };
    let raw = |text: &str| Data::Json(RawValue::from_string(text.to_owned()).expect("valid JSON"));

    let mut everything = Event::new("https://orders.example.com/api", "com.example.order.placed")
        .with_time(time(5 * 3600 + 30 * 60, 123_456_789))
        .with_subject("order/Zürich 😀")
        .with_dataschema("https://schemas.example.com/order/placed/v3.json")
        .with_correlation_id("corr-1")
        .with_causation_id("cause-1")
        .with_partition_key("order-42")
        .with_traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
        .with_extension("dataversion", "3")
        .with_extension("count", 42)
        .with_extension("lowest", i32::MIN)
        .with_extension("highest", i32::MAX)
        .with_extension("flag", true)
        .with_extension("off", false)
        .with_extension("averyveryverylongextensionname", "x");
    everything.data = Some(raw(
        "{ \"order\": {\"id\": \"o-1\", \"lines\": [{\"qty\": 2, \"price\": 12.50}]},\n  \"note\": null, \"u\": \"\\u00fc\" }",
    ));
    everything.datacontenttype = Some("application/json".to_owned());

    let mut text =
        Event::new("urn:example:mail", "com.example.mail.sent").with_time(time(-3 * 3600, 0));
    text.data = Some(raw("\"plain text, ü\""));
    text.datacontenttype = Some("text/plain".to_owned());

    let mut array = Event::new("/arrays", "com.example.array");
    array.data = Some(raw("[1,\"two\",{\"three\":3.5},[],null]"));

    let mut number = Event::new("/numbers", "com.example.number").with_time(time(0, 1_000_000));
    number.data = Some(raw("42"));
    number.datacontenttype = Some("application/json".to_owned());

    vec![
        everything,
        Event::new("/files", "com.example.file.uploaded")
            .with_time(time(0, 0))
            .with_binary_data("application/octet-stream", (0..=255).collect()),
        text,
        Event::new("/minimal", "minimal"),
        array,
        number,
    ]
}

#[test]
fn python_reads_what_rust_writes() {
    if !sdk_available("python_reads_what_rust_writes") {
        return;
    }
    let events = rust_events();
    let structured: Vec<String> = events
        .iter()
        .map(|event| String::from_utf8(event.to_json()).expect("JSON is UTF-8"))
        .collect();
    let batch = String::from_utf8(Event::batch_to_json(&events)).expect("JSON is UTF-8");
    let read = python(PY_READ, &json!({"structured": structured, "batch": batch}));

    for mode in ["structured", "batch"] {
        let reads = read[mode].as_array().expect("a list of reads");
        assert_eq!(reads.len(), events.len(), "{mode}: one read per event");
        for (read, event) in reads.iter().zip(&events) {
            for api in ["legacy", "core"] {
                check_rust_event(
                    &format!("{mode}, {api} API, event `{}`", event.id),
                    &read[api],
                    event,
                    api == "core",
                );
            }
        }
    }
}

/// Compares what Python read with the event Rust wrote. The core API keeps `time` as a
/// Python datetime, which holds microseconds.
fn check_rust_event(what: &str, read: &Value, event: &Event, microseconds: bool) {
    let mut attributes = read["attributes"]
        .as_object()
        .unwrap_or_else(|| panic!("{what}: no attributes in {read}"))
        .clone();
    let time = attributes.remove("time");

    let mut want = Map::new();
    want.insert("specversion".into(), json!("1.0"));
    want.insert("id".into(), json!(event.id));
    want.insert("source".into(), json!(event.source));
    want.insert("type".into(), json!(event.ty));
    for (name, value) in [
        ("subject", &event.subject),
        ("datacontenttype", &event.datacontenttype),
        ("dataschema", &event.dataschema),
    ] {
        if let Some(value) = value {
            want.insert(name.into(), json!(value));
        }
    }
    for (name, value) in &event.extensions {
        let value = match value {
            ExtensionValue::String(text) => json!(text),
            ExtensionValue::Integer(number) => json!(number),
            ExtensionValue::Boolean(flag) => json!(flag),
        };
        want.insert(name.clone(), value);
    }
    assert_eq!(attributes, want, "{what}: attributes");

    match event.time {
        Some(written) => {
            let text = time
                .as_ref()
                .and_then(Value::as_str)
                .unwrap_or_else(|| panic!("{what}: time is missing"));
            let got = DateTime::parse_from_rfc3339(text)
                .unwrap_or_else(|error| panic!("{what}: Python's time {text:?}: {error}"));
            let written = if microseconds {
                written.trunc_subsecs(6)
            } else {
                written
            };
            assert_eq!(got, written, "{what}: time");
            assert_eq!(got.offset(), written.offset(), "{what}: the offset of time");
        }
        // The SDK stamps the current time on an event without one.
        None => assert!(time.is_some(), "{what}: the SDK's default time"),
    }

    let data = &read["data"];
    match &event.data {
        None => assert_eq!(data, &Value::Null, "{what}: no data"),
        Some(Data::Json(raw)) => {
            let written: Value = serde_json::from_str(raw.get()).expect("the data is JSON");
            assert_eq!(
                data,
                &json!({"kind": "json", "value": written}),
                "{what}: JSON data"
            );
        }
        Some(Data::Binary(bytes)) => {
            assert_eq!(
                data,
                &json!({"kind": "binary", "value": BASE64.encode(bytes)}),
                "{what}: binary data"
            );
        }
    }
}
