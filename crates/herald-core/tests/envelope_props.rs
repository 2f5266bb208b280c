//! The CloudEvents envelope: property tests of the JSON round trip and of parsing untrusted
//! input, and a table of every validation rule with the error it produces.

use std::collections::BTreeMap;

use chrono::{DateTime, FixedOffset, NaiveDate, TimeZone as _};
use herald_core::event::{Data, Error, Event, ExtensionValue};
use proptest::prelude::*;
use serde_json::value::RawValue;
use serde_json::{Value, json};

/// Context attribute names; they can never be extensions.
const RESERVED: [&str; 10] = [
    "specversion",
    "id",
    "source",
    "type",
    "datacontenttype",
    "dataschema",
    "subject",
    "time",
    "data",
    "data_base64",
];

// ---------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------

/// Any JSON value, with finite numbers of every kind, nested a few levels.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON numbers are finite", |f| f.is_finite())
            .prop_map(Value::from),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(any::<String>(), inner, 0..6)
                .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

/// A JSON payload as raw text, compact or pretty-printed (the text must survive as is).
/// A top-level `null` is left out: the JSON format reads `"data": null` as no data.
fn json_data() -> impl Strategy<Value = Data> {
    (json_value(), any::<bool>())
        .prop_filter("`data: null` means no data", |(value, _)| !value.is_null())
        .prop_map(|(value, pretty)| {
            let text = if pretty {
                serde_json::to_string_pretty(&value)
            } else {
                serde_json::to_string(&value)
            }
            .expect("a JSON value serialises");
            Data::Json(RawValue::from_string(text).expect("serde_json writes valid JSON"))
        })
}

fn data() -> impl Strategy<Value = Data> {
    prop_oneof![
        json_data(),
        prop::collection::vec(any::<u8>(), 0..64).prop_map(Data::Binary),
    ]
}

/// A time RFC 3339 can carry: years 0000–9999, offsets in whole minutes, and second
/// fractions of 0, 3, 6 or 9 digits.
fn time() -> impl Strategy<Value = DateTime<FixedOffset>> {
    (
        (0_i32..=9999, 1_u32..=12, 1_u32..=28),
        (0_u32..24, 0_u32..60, 0_u32..60),
        (0_usize..4, 0_u32..1_000_000_000),
        -(23 * 60 + 59)..=(23 * 60 + 59_i32),
    )
        .prop_map(
            |((year, month, day), (hour, minute, second), (precision, nanos), offset)| {
                let nanos = match precision {
                    0 => 0,
                    1 => nanos / 1_000_000 * 1_000_000,
                    2 => nanos / 1_000 * 1_000,
                    _ => nanos,
                };
                let naive = NaiveDate::from_ymd_opt(year, month, day)
                    .and_then(|date| date.and_hms_nano_opt(hour, minute, second, nanos))
                    .expect("a valid date and time");
                FixedOffset::east_opt(offset * 60)
                    .expect("a valid offset")
                    .from_local_datetime(&naive)
                    .single()
                    .expect("a fixed offset maps every local time")
            },
        )
}

fn extension_value() -> impl Strategy<Value = ExtensionValue> {
    prop_oneof![
        any::<String>().prop_map(ExtensionValue::String),
        any::<i32>().prop_map(ExtensionValue::Integer),
        any::<bool>().prop_map(ExtensionValue::Boolean),
    ]
}

fn extensions() -> impl Strategy<Value = BTreeMap<String, ExtensionValue>> {
    // Longer than the recommended 20 characters too: the limit is a SHOULD NOT.
    let name = "[a-z0-9]{1,30}".prop_filter("not a context attribute", |name| {
        !RESERVED.contains(&name.as_str())
    });
    prop::collection::btree_map(name, extension_value(), 0..6)
}

fn non_empty() -> impl Strategy<Value = String> {
    any::<String>().prop_filter("non-empty", |text| !text.is_empty())
}

/// A URI-reference as the envelope checks it: no whitespace, no control characters.
fn uri_reference() -> impl Strategy<Value = String> {
    "[^\\s\\p{Cc}]{1,40}"
}

fn absolute_uri() -> impl Strategy<Value = String> {
    "[a-zA-Z][a-zA-Z0-9+.-]{0,10}:[^\\s\\p{Cc}]{0,40}"
}

fn media_type() -> impl Strategy<Value = String> {
    "[A-Za-z0-9!#$%&'*+.^_`|~-]{1,12}/[A-Za-z0-9!#$%&'*+.^_`|~-]{1,20}(; ?[a-z]{1,8}=[a-z0-9-]{1,10})?"
}

/// Any valid event, with every optional attribute present or absent.
fn event() -> impl Strategy<Value = Event> {
    (
        (non_empty(), uri_reference(), non_empty()),
        (
            prop::option::of(time()),
            prop::option::of(non_empty()),
            prop::option::of(media_type()),
            prop::option::of(absolute_uri()),
        ),
        prop::option::of(data()),
        extensions(),
    )
        .prop_map(
            |((id, source, ty), (time, subject, datacontenttype, dataschema), data, extensions)| {
                Event {
                    id,
                    source,
                    ty,
                    time,
                    subject,
                    datacontenttype,
                    dataschema,
                    data,
                    extensions,
                }
            },
        )
}

/// Equality, plus what `Event`'s `PartialEq` does not see: the offset of `time` (chrono
/// compares instants) and the exact encoding.
fn assert_exactly_equal(got: &Event, want: &Event) -> Result<(), TestCaseError> {
    prop_assert_eq!(got, want);
    prop_assert_eq!(
        got.time.map(|time| *time.offset()),
        want.time.map(|time| *time.offset())
    );
    prop_assert_eq!(got.to_json(), want.to_json());
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn an_event_round_trips_through_json(event in event()) {
        prop_assert_eq!(event.validate(), Ok(()));
        let json = event.to_json();
        let parsed = Event::from_json(&json)
            .map_err(|error| TestCaseError::fail(format!("{error}: {}", String::from_utf8_lossy(&json))))?;
        assert_exactly_equal(&parsed, &event)?;
        // Through serde too, as a store or an HTTP body would.
        let via_serde: Event = serde_json::from_slice(&json).expect("serde reads what to_json wrote");
        assert_exactly_equal(&via_serde, &event)?;
    }

    #[test]
    fn a_batch_round_trips_through_json(events in prop::collection::vec(event(), 0..5)) {
        let json = Event::batch_to_json(&events);
        let parsed = Event::batch_from_json(&json)
            .map_err(|error| TestCaseError::fail(format!("{error}: {}", String::from_utf8_lossy(&json))))?;
        prop_assert_eq!(parsed.len(), events.len());
        for (got, want) in parsed.iter().zip(&events) {
            assert_exactly_equal(got, want)?;
        }
    }

    #[test]
    fn garbage_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        check_whatever_parses(&bytes)?;
    }

    #[test]
    fn arbitrary_json_never_panics(value in json_value()) {
        check_whatever_parses(&serde_json::to_vec(&value).expect("a JSON value serialises"))?;
    }

    #[test]
    fn arbitrary_objects_with_attribute_names_never_panic(
        members in prop::collection::vec(
            (prop_oneof![
                prop::sample::select(RESERVED.to_vec()).prop_map(str::to_owned),
                "[a-zA-Z0-9_]{0,24}",
            ], json_value()),
            0..12,
        )
    ) {
        // Written by hand so that duplicate members reach the parser.
        let body: Vec<String> = members
            .iter()
            .map(|(name, value)| format!("{}:{}", json!(name), value))
            .collect();
        let document = format!("{{{}}}", body.join(","));
        check_whatever_parses(document.as_bytes())?;
        check_whatever_parses(format!("[{document},{document}]").as_bytes())?;
    }

    #[test]
    fn mutated_events_never_panic(
        event in event(),
        attribute in prop::sample::select(RESERVED.to_vec()),
        replacement in prop::option::of(json_value()),
    ) {
        let mut document: serde_json::Map<String, Value> =
            serde_json::from_slice(&event.to_json()).expect("to_json writes an object");
        match replacement {
            Some(value) => document.insert(attribute.to_owned(), value),
            None => document.remove(attribute),
        };
        check_whatever_parses(&serde_json::to_vec(&document).expect("a JSON object serialises"))?;
    }
}

/// Parsing `bytes` as an event and as a batch returns, never panics; whatever parses is
/// valid, can be used, and round-trips.
fn check_whatever_parses(bytes: &[u8]) -> Result<(), TestCaseError> {
    let mut parsed = Vec::new();
    if let Ok(event) = Event::from_json(bytes) {
        parsed.push(event);
    }
    if let Ok(events) = Event::batch_from_json(bytes) {
        parsed.extend(events);
    }
    for event in parsed {
        prop_assert_eq!(event.validate(), Ok(()));
        if let Some(data) = &event.data {
            // May fail (a number beyond f64), must not panic.
            let _ = data.to_value();
        }
        let again = Event::from_json(&event.to_json()).map_err(|error| {
            TestCaseError::fail(format!("accepted but not re-readable: {error}"))
        })?;
        assert_exactly_equal(&again, &event)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Validation errors, rule by rule
// ---------------------------------------------------------------------------------------

/// The error a document must produce.
#[derive(Debug)]
enum Want {
    Missing(&'static str),
    /// The attribute at fault, and a phrase the reason must contain.
    Invalid(&'static str, &'static str),
    /// A phrase the syntax error's reason must contain.
    Syntax(&'static str),
}

/// A minimal valid event with `changes` applied: `Some` sets a member, `None` removes it.
fn document(changes: &[(&str, Option<Value>)]) -> Vec<u8> {
    let mut document = json!({
        "specversion": "1.0",
        "id": "id-1",
        "source": "/orders",
        "type": "OrderPlaced",
    });
    let members = document.as_object_mut().expect("an object");
    for (name, value) in changes {
        match value {
            Some(value) => members.insert((*name).to_owned(), value.clone()),
            None => members.remove(*name),
        };
    }
    serde_json::to_vec(&document).expect("a JSON object serialises")
}

fn set(name: &'static str, value: Value) -> (&'static str, Option<Value>) {
    (name, Some(value))
}

fn unset(name: &'static str) -> (&'static str, Option<Value>) {
    (name, None)
}

fn check(case: &str, result: Result<Event, Error>, want: &Want) {
    match (&result, want) {
        (Err(Error::Missing { attribute }), Want::Missing(expected)) if attribute == expected => {}
        (Err(Error::Invalid { attribute, reason }), Want::Invalid(expected, phrase))
            if attribute == expected && reason.contains(phrase) => {}
        (Err(Error::Syntax { reason, .. }), Want::Syntax(phrase)) if reason.contains(phrase) => {}
        _ => panic!("{case}: want {want:?}, got {result:?}"),
    }
    // Every message names the attribute at fault.
    if let (Err(error), Want::Missing(attribute) | Want::Invalid(attribute, _)) = (&result, want) {
        assert!(
            error.to_string().contains(&format!("`{attribute}`")),
            "{case}: the message `{error}` must name `{attribute}`"
        );
    }
}

#[test]
fn every_parsing_rule_has_a_precise_error() {
    let cases: Vec<(&str, Vec<u8>, Want)> = vec![
        // Required attributes.
        (
            "no specversion",
            document(&[unset("specversion")]),
            Want::Missing("specversion"),
        ),
        ("no id", document(&[unset("id")]), Want::Missing("id")),
        (
            "no source",
            document(&[unset("source")]),
            Want::Missing("source"),
        ),
        ("no type", document(&[unset("type")]), Want::Missing("type")),
        (
            "null id is absent",
            document(&[set("id", Value::Null)]),
            Want::Missing("id"),
        ),
        (
            "specversion 0.3",
            document(&[set("specversion", json!("0.3"))]),
            Want::Invalid("specversion", "`0.3` is not supported"),
        ),
        (
            "specversion 1",
            document(&[set("specversion", json!(1))]),
            Want::Invalid("specversion", "must be a JSON string, found a number"),
        ),
        // Types of string attributes.
        (
            "numeric id",
            document(&[set("id", json!(42))]),
            Want::Invalid("id", "must be a JSON string, found a number"),
        ),
        (
            "object source",
            document(&[set("source", json!({}))]),
            Want::Invalid("source", "found an object"),
        ),
        (
            "array type",
            document(&[set("type", json!([]))]),
            Want::Invalid("type", "found an array"),
        ),
        (
            "boolean subject",
            document(&[set("subject", json!(true))]),
            Want::Invalid("subject", "found a boolean"),
        ),
        (
            "numeric time",
            document(&[set("time", json!(1_700_000_000))]),
            Want::Invalid("time", "must be a JSON string"),
        ),
        (
            "numeric datacontenttype",
            document(&[set("datacontenttype", json!(1))]),
            Want::Invalid("datacontenttype", "must be a JSON string"),
        ),
        (
            "numeric dataschema",
            document(&[set("dataschema", json!(1))]),
            Want::Invalid("dataschema", "must be a JSON string"),
        ),
        (
            "numeric data_base64",
            document(&[set("data_base64", json!(1))]),
            Want::Invalid("data_base64", "must be a JSON string"),
        ),
        // Values.
        (
            "empty id",
            document(&[set("id", json!(""))]),
            Want::Invalid("id", "must be a non-empty string"),
        ),
        (
            "empty source",
            document(&[set("source", json!(""))]),
            Want::Invalid("source", "must be a non-empty string"),
        ),
        (
            "source with a space",
            document(&[set("source", json!("/a b"))]),
            Want::Invalid("source", "must be a URI-reference, but contains ' '"),
        ),
        (
            "source with a control character",
            document(&[set("source", json!("/a\u{7}"))]),
            Want::Invalid("source", "must be a URI-reference, but contains '\\u{7}'"),
        ),
        (
            "empty type",
            document(&[set("type", json!(""))]),
            Want::Invalid("type", "must be a non-empty string"),
        ),
        (
            "empty subject",
            document(&[set("subject", json!(""))]),
            Want::Invalid("subject", "must be a non-empty string"),
        ),
        (
            "time without offset",
            document(&[set("time", json!("2026-11-23T17:31:00"))]),
            Want::Invalid("time", "not an RFC 3339 timestamp"),
        ),
        (
            "time as a date",
            document(&[set("time", json!("2026-11-23"))]),
            Want::Invalid("time", "not an RFC 3339 timestamp"),
        ),
        (
            "time with a seconds offset",
            document(&[set("time", json!("2026-11-23T17:31:00+05:30:15"))]),
            Want::Invalid("time", "not an RFC 3339 timestamp"),
        ),
        (
            "media type without subtype",
            document(&[set("datacontenttype", json!("json"))]),
            Want::Invalid("datacontenttype", "is not a media type"),
        ),
        (
            "media type with empty subtype",
            document(&[set("datacontenttype", json!("application/"))]),
            Want::Invalid("datacontenttype", "is not a media type"),
        ),
        (
            "media type with a space",
            document(&[set("datacontenttype", json!("appli cation/json"))]),
            Want::Invalid("datacontenttype", "is not a media type"),
        ),
        (
            "empty media type",
            document(&[set("datacontenttype", json!(""))]),
            Want::Invalid("datacontenttype", "is not a media type"),
        ),
        (
            "relative dataschema",
            document(&[set("dataschema", json!("/schemas/order.json"))]),
            Want::Invalid("dataschema", "is not an absolute URI"),
        ),
        (
            "dataschema with a bad scheme",
            document(&[set("dataschema", json!("1http://x"))]),
            Want::Invalid("dataschema", "is not an absolute URI"),
        ),
        (
            "dataschema with a space",
            document(&[set("dataschema", json!("https://x/a b"))]),
            Want::Invalid("dataschema", "must be a URI-reference"),
        ),
        (
            "empty dataschema",
            document(&[set("dataschema", json!(""))]),
            Want::Invalid("dataschema", "must be a non-empty string"),
        ),
        // Data.
        (
            "data and data_base64",
            document(&[set("data", json!(1)), set("data_base64", json!("AA=="))]),
            Want::Invalid("data_base64", "mutually exclusive"),
        ),
        (
            "data_base64 not base64",
            document(&[set("data_base64", json!("not base64!"))]),
            Want::Invalid("data_base64", "not valid base64"),
        ),
        (
            "data_base64 without padding",
            document(&[set("data_base64", json!("AP8"))]),
            Want::Invalid("data_base64", "not valid base64"),
        ),
        // Extensions.
        (
            "upper-case extension name",
            document(&[set("Traceparent", json!("x"))]),
            Want::Invalid("Traceparent", "lower-case letters a-z and digits 0-9 only"),
        ),
        (
            "extension name with `_`",
            document(&[set("trace_parent", json!("x"))]),
            Want::Invalid("trace_parent", "lower-case letters a-z and digits 0-9 only"),
        ),
        (
            "extension name with `-`",
            document(&[set("trace-parent", json!("x"))]),
            Want::Invalid("trace-parent", "lower-case letters a-z and digits 0-9 only"),
        ),
        (
            "empty extension name",
            document(&[set("", json!("x"))]),
            Want::Invalid("", "at least 1 character"),
        ),
        (
            "object extension",
            document(&[set("ext", json!({"a": 1}))]),
            Want::Invalid(
                "ext",
                "must be a string, an integer or a boolean, found an object",
            ),
        ),
        (
            "array extension",
            document(&[set("ext", json!([1]))]),
            Want::Invalid("ext", "found an array"),
        ),
        (
            "fractional extension",
            document(&[set("ext", json!(1.5))]),
            Want::Invalid(
                "ext",
                "is not an integer in the range of a signed 32-bit integer",
            ),
        ),
        (
            "extension above i32",
            document(&[set("ext", json!(2_147_483_648_i64))]),
            Want::Invalid("ext", "`2147483648` is not an integer"),
        ),
        (
            "extension below i32",
            document(&[set("ext", json!(-2_147_483_649_i64))]),
            Want::Invalid("ext", "`-2147483649` is not an integer"),
        ),
        // Structure.
        (
            "duplicate member",
            br#"{"specversion":"1.0","id":"1","id":"2","source":"/s","type":"t"}"#.to_vec(),
            Want::Invalid("id", "appears more than once"),
        ),
        (
            "duplicate extension",
            br#"{"specversion":"1.0","id":"1","source":"/s","type":"t","ext":1,"ext":1}"#.to_vec(),
            Want::Invalid("ext", "appears more than once"),
        ),
        (
            "an array, not an object",
            b"[]".to_vec(),
            Want::Syntax("invalid type: sequence"),
        ),
        (
            "a string, not an object",
            br#""event""#.to_vec(),
            Want::Syntax("invalid type: string"),
        ),
        (
            "truncated",
            br#"{"specversion":"1.0","#.to_vec(),
            Want::Syntax("EOF"),
        ),
        (
            "trailing garbage",
            [document(&[]), b"x".to_vec()].concat(),
            Want::Syntax("trailing characters"),
        ),
        ("empty input", Vec::new(), Want::Syntax("EOF")),
    ];
    for (case, json, want) in &cases {
        check(case, Event::from_json(json), want);
    }
}

#[test]
fn lenient_where_the_specification_is() {
    let accepted: Vec<(&str, Vec<u8>)> = vec![
        (
            "null optional attributes are absent",
            document(&[
                set("subject", Value::Null),
                set("time", Value::Null),
                set("data", Value::Null),
            ]),
        ),
        (
            "an extension name over 20 characters",
            document(&[set("averyveryverylongextensionname", json!("x"))]),
        ),
        (
            "extension integer bounds",
            document(&[set("lo", json!(i32::MIN)), set("hi", json!(i32::MAX))]),
        ),
        (
            "a relative source",
            document(&[set("source", json!("1-555-123-4567"))]),
        ),
        (
            "a URN dataschema",
            document(&[set("dataschema", json!("urn:example:schema"))]),
        ),
        (
            "media type parameters",
            document(&[set("datacontenttype", json!("text/plain; charset=utf-8"))]),
        ),
        (
            "lower-case t and z",
            document(&[set("time", json!("2026-11-23t17:31:00.5z"))]),
        ),
        (
            "a leap second",
            document(&[set("time", json!("2016-12-31T23:59:60Z"))]),
        ),
        (
            "empty binary data",
            document(&[set("data_base64", json!(""))]),
        ),
        (
            "datacontenttype without data",
            document(&[set("datacontenttype", json!("application/xml"))]),
        ),
    ];
    for (case, json) in accepted {
        let event = Event::from_json(&json).unwrap_or_else(|error| panic!("{case}: {error}"));
        let again = Event::from_json(&event.to_json())
            .unwrap_or_else(|error| panic!("{case}, written back: {error}"));
        assert_eq!(again, event, "{case}");
    }
}

#[test]
fn validation_of_built_events_names_the_rule() {
    let base = || Event::new("/orders", "OrderPlaced");
    let offset = |seconds| FixedOffset::east_opt(seconds).expect("a valid offset");
    let cases: Vec<(&str, Event, &str, &str)> = vec![
        (
            "empty id",
            base().with_id(""),
            "id",
            "must be a non-empty string",
        ),
        (
            "a reserved name as extension",
            base().with_extension("subject", "x"),
            "subject",
            "is a context attribute",
        ),
        (
            "`data` as extension",
            base().with_extension("data", "x"),
            "data",
            "is a context attribute",
        ),
        (
            "empty extension name",
            base().with_extension("", 1),
            "",
            "at least 1 character",
        ),
        (
            "upper-case extension name",
            base().with_extension("Ext", true),
            "Ext",
            "lower-case letters",
        ),
        (
            "a year beyond 9999",
            base().with_time(
                offset(0)
                    .with_ymd_and_hms(10_000, 1, 1, 0, 0, 0)
                    .single()
                    .expect("a time"),
            ),
            "time",
            "year 10000 cannot be written in RFC 3339",
        ),
        (
            "a year before 0000",
            base().with_time(
                offset(0)
                    .with_ymd_and_hms(-1, 1, 1, 0, 0, 0)
                    .single()
                    .expect("a time"),
            ),
            "time",
            "year -1 cannot be written in RFC 3339",
        ),
        (
            "an offset with seconds",
            base().with_time(
                offset(5 * 3600 + 30 * 60 + 15)
                    .with_ymd_and_hms(2026, 1, 1, 0, 0, 0)
                    .single()
                    .expect("a time"),
            ),
            "time",
            "RFC 3339 offsets are whole minutes",
        ),
    ];
    for (case, event, attribute, phrase) in cases {
        match event.validate() {
            Err(Error::Invalid {
                attribute: got,
                reason,
            }) if got == attribute && reason.contains(phrase) => {}
            other => panic!("{case}: want Invalid({attribute:?}, …{phrase}…), got {other:?}"),
        }
    }
}

#[test]
fn batch_errors_name_the_event() {
    let good = document(&[]);
    let bad = document(&[set("id", json!(""))]);
    let batch = [
        b"[".to_vec(),
        good.clone(),
        b",".to_vec(),
        good.clone(),
        b",".to_vec(),
        bad,
        b"]".to_vec(),
    ]
    .concat();
    match Event::batch_from_json(&batch) {
        Err(Error::InBatch {
            index: 2,
            error: source,
        }) => {
            assert!(
                matches!(&*source, Error::Invalid { attribute, .. } if attribute == "id"),
                "the batch error must carry the event's own error, got {source:?}"
            );
        }
        other => panic!("want InBatch {{ index: 2 }}, got {other:?}"),
    }
    for (case, json, phrase) in [
        ("an object, not an array", good.clone(), "invalid type: map"),
        (
            "an element that is not an object",
            br#"[1]"#.to_vec(),
            "invalid type: integer",
        ),
        ("truncated", b"[".to_vec(), "EOF"),
    ] {
        match Event::batch_from_json(&json) {
            Err(Error::Syntax { reason, .. }) if reason.contains(phrase) => {}
            other => panic!("{case}: want a syntax error containing {phrase:?}, got {other:?}"),
        }
    }
    assert_eq!(
        Event::batch_from_json(b"[]"),
        Ok(Vec::new()),
        "an empty batch is valid"
    );
}

#[test]
fn syntax_errors_carry_line_and_column() {
    let json = b"{\n  \"specversion\": \"1.0\",\n  \"id\": ,\n}";
    match Event::from_json(json) {
        Err(Error::Syntax {
            line: 3, column, ..
        }) => assert!(column > 0),
        other => panic!("want a syntax error on line 3, got {other:?}"),
    }
}

#[test]
fn data_beyond_f64_parses_and_converts_without_panicking() {
    // Valid JSON that serde_json's Value cannot hold; other producers may write it.
    let json = br#"{"specversion":"1.0","id":"1","source":"/s","type":"t","data":1e400}"#;
    let event = Event::from_json(json).expect("1e400 is valid JSON");
    let data = event.data.as_ref().expect("the event has data");
    assert!(
        data.to_value().is_err(),
        "1e400 does not fit a serde_json::Value"
    );
    assert_eq!(
        Event::from_json(&event.to_json()).expect("written back"),
        event
    );
}
