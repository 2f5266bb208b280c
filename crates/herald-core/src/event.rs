//! The event envelope: a CloudEvents 1.0 event, with its JSON structured and batch formats.
//!
//! Herald reads and writes the JSON event format of the CloudEvents specification exactly:
//! a document written by another CloudEvents SDK parses here, and what Herald writes parses
//! there. Parsing is strict where the specification is (attribute names, types, required
//! attributes) and every error names the attribute at fault and why.
//!
//! `data` is kept as the raw JSON text it arrived as ([`serde_json::value::RawValue`]), so an
//! event read back from a store is byte-for-byte the event that was written, and a handler
//! deserialises `data` straight into its own type without an intermediate tree.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use chrono::{DateTime, FixedOffset, SecondsFormat};
use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;

/// The only CloudEvents specification version Herald speaks.
pub const SPEC_VERSION: &str = "1.0";

/// The length the specification recommends extension attribute names not to exceed.
///
/// It is a recommendation (SHOULD NOT), not a rule: longer names are accepted, because other
/// SDKs (e.g. the Python one) write them, and a document they write must parse here.
pub const EXTENSION_NAME_LEN_MAX: usize = 20;

/// Extension carrying the id shared by every event of one business flow (e.g. one order).
pub const CORRELATION_ID: &str = "correlationid";
/// Extension carrying the id of the event that caused this one.
pub const CAUSATION_ID: &str = "causationid";
/// Extension carrying the key that orders events within a partition.
pub const PARTITION_KEY: &str = "partitionkey";
/// Extension carrying the W3C trace context of the producer.
pub const TRACE_PARENT: &str = "traceparent";

/// Context attribute names defined by the specification; they can never be extensions.
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

/// A CloudEvents 1.0 event.
///
/// Construct one with [`Event::new`] (which assigns a UUIDv7 id) and the `with_*` builders,
/// or parse one with [`Event::from_json`]. Stores call [`Event::validate`] before accepting an
/// event, so an event built field by field is checked before it is written.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Identifies the event; `source` + `id` is unique per distinct event, and stores use
    /// it as the idempotency key.
    pub id: String,
    /// The context in which the event happened, as a URI-reference (e.g. `/orders`).
    pub source: String,
    /// The kind of event, e.g. `com.example.order.placed` or `OrderPlaced`.
    pub ty: String,
    /// When the occurrence happened.
    pub time: Option<DateTime<FixedOffset>>,
    /// The subject of the event within the source, e.g. the aggregate id.
    pub subject: Option<String>,
    /// The media type of `data`, e.g. `application/json`.
    pub datacontenttype: Option<String>,
    /// The schema `data` adheres to, as an absolute URI.
    pub dataschema: Option<String>,
    /// The payload.
    pub data: Option<Data>,
    /// Extension attributes by name, including `correlationid`, `causationid`,
    /// `partitionkey` and `traceparent`.
    pub extensions: BTreeMap<String, ExtensionValue>,
}

/// An event's payload.
#[derive(Debug, Clone)]
pub enum Data {
    /// A JSON value (written as `data`), kept as the exact text it was given in.
    Json(Box<RawValue>),
    /// Opaque bytes (written as `data_base64`).
    Binary(Vec<u8>),
}

/// The value of an extension attribute, as the JSON format can carry it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ExtensionValue {
    /// A string (also used for the URI, URI-reference, Timestamp and Binary types).
    String(String),
    /// A whole number in the range of a signed 32-bit integer.
    Integer(i32),
    /// `true` or `false`.
    Boolean(bool),
}

/// Why an envelope was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The document is not well-formed JSON, or not of the expected shape.
    #[error("malformed JSON at line {line}, column {column}: {reason}")]
    Syntax {
        /// The parser's description.
        reason: String,
        /// 1-based line of the fault.
        line: usize,
        /// 1-based column of the fault.
        column: usize,
    },
    /// A required context attribute is absent.
    #[error("missing required attribute `{attribute}`")]
    Missing {
        /// The attribute's name.
        attribute: &'static str,
    },
    /// An attribute is present but its value is not allowed.
    #[error("invalid attribute `{attribute}`: {reason}")]
    Invalid {
        /// The attribute's name, as given.
        attribute: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An event of a batch is invalid.
    #[error("event {index} of the batch: {error}")]
    InBatch {
        /// 0-based index of the event in the batch.
        index: usize,
        /// What is wrong with it.
        error: Box<Error>,
    },
}

impl Error {
    fn invalid(attribute: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Invalid {
            attribute: attribute.into(),
            reason: reason.into(),
        }
    }

    fn syntax(error: &serde_json::Error) -> Self {
        // serde_json appends " at line L column C" to its message; the fields carry that.
        let message = error.to_string();
        let reason = match message.rfind(" at line ") {
            Some(at) => message[..at].to_owned(),
            None => message,
        };
        Error::Syntax {
            reason,
            line: error.line(),
            column: error.column(),
        }
    }
}

impl Event {
    /// A new event with a fresh UUIDv7 id and no optional attributes.
    pub fn new(source: impl Into<String>, ty: impl Into<String>) -> Self {
        Event {
            id: uuid::Uuid::now_v7().to_string(),
            source: source.into(),
            ty: ty.into(),
            time: None,
            subject: None,
            datacontenttype: None,
            dataschema: None,
            data: None,
            extensions: BTreeMap::new(),
        }
    }

    /// Replaces the id.
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = id.into();
        self
    }

    /// Sets `time`.
    pub fn with_time(mut self, time: DateTime<FixedOffset>) -> Self {
        self.time = Some(time);
        self
    }

    /// Sets `time` to now, in UTC.
    pub fn with_time_now(self) -> Self {
        self.with_time(chrono::Utc::now().fixed_offset())
    }

    /// Sets `subject`.
    pub fn with_subject(mut self, subject: impl Into<String>) -> Self {
        self.subject = Some(subject.into());
        self
    }

    /// Sets `dataschema`.
    pub fn with_dataschema(mut self, dataschema: impl Into<String>) -> Self {
        self.dataschema = Some(dataschema.into());
        self
    }

    /// Sets a JSON payload and `datacontenttype: application/json`.
    ///
    /// JSON `null` means no payload: the JSON format treats a null member as absent, so it
    /// could not round-trip as a payload.
    pub fn with_data(mut self, data: serde_json::Value) -> Self {
        if data.is_null() {
            self.data = None;
            return self;
        }
        let raw =
            serde_json::value::to_raw_value(&data).expect("a serde_json::Value always serialises");
        self.data = Some(Data::Json(raw));
        self.datacontenttype = Some("application/json".to_owned());
        self
    }

    /// Sets a JSON payload serialised from `data` and `datacontenttype: application/json`.
    pub fn with_data_as<T: Serialize + ?Sized>(
        mut self,
        data: &T,
    ) -> Result<Self, serde_json::Error> {
        self.data = Some(Data::Json(serde_json::value::to_raw_value(data)?));
        self.datacontenttype = Some("application/json".to_owned());
        Ok(self)
    }

    /// Sets a binary payload with its media type.
    pub fn with_binary_data(mut self, content_type: impl Into<String>, data: Vec<u8>) -> Self {
        self.data = Some(Data::Binary(data));
        self.datacontenttype = Some(content_type.into());
        self
    }

    /// Sets an extension attribute. The name is checked by [`Event::validate`].
    pub fn with_extension(
        mut self,
        name: impl Into<String>,
        value: impl Into<ExtensionValue>,
    ) -> Self {
        self.extensions.insert(name.into(), value.into());
        self
    }

    /// Sets the `correlationid` extension.
    pub fn with_correlation_id(self, id: impl Into<String>) -> Self {
        self.with_extension(CORRELATION_ID, id.into())
    }

    /// Sets the `causationid` extension.
    pub fn with_causation_id(self, id: impl Into<String>) -> Self {
        self.with_extension(CAUSATION_ID, id.into())
    }

    /// Sets the `partitionkey` extension.
    pub fn with_partition_key(self, key: impl Into<String>) -> Self {
        self.with_extension(PARTITION_KEY, key.into())
    }

    /// Sets the `traceparent` extension.
    pub fn with_traceparent(self, traceparent: impl Into<String>) -> Self {
        self.with_extension(TRACE_PARENT, traceparent.into())
    }

    /// The `correlationid` extension, when it is a string.
    pub fn correlation_id(&self) -> Option<&str> {
        self.extension_str(CORRELATION_ID)
    }

    /// The `causationid` extension, when it is a string.
    pub fn causation_id(&self) -> Option<&str> {
        self.extension_str(CAUSATION_ID)
    }

    /// The `partitionkey` extension, when it is a string.
    pub fn partition_key(&self) -> Option<&str> {
        self.extension_str(PARTITION_KEY)
    }

    /// The `traceparent` extension, when it is a string.
    pub fn traceparent(&self) -> Option<&str> {
        self.extension_str(TRACE_PARENT)
    }

    /// A string-valued extension by name.
    pub fn extension_str(&self, name: &str) -> Option<&str> {
        match self.extensions.get(name) {
            Some(ExtensionValue::String(value)) => Some(value),
            _ => None,
        }
    }

    /// Deserialises the JSON payload into `T`; `Ok(None)` when there is no payload.
    ///
    /// A binary payload is an error, as is JSON that does not match `T`.
    pub fn data_as<'a, T: Deserialize<'a>>(&'a self) -> Result<Option<T>, serde_json::Error> {
        match &self.data {
            None => Ok(None),
            Some(Data::Json(raw)) => serde_json::from_str(raw.get()).map(Some),
            Some(Data::Binary(_)) => Err(de::Error::custom("the event's data is binary, not JSON")),
        }
    }

    /// Checks every attribute against the specification.
    pub fn validate(&self) -> Result<(), Error> {
        check_non_empty("id", &self.id)?;
        check_uri_reference("source", &self.source)?;
        check_non_empty("type", &self.ty)?;
        if let Some(time) = &self.time {
            check_time(time)?;
        }
        if let Some(subject) = &self.subject {
            check_non_empty("subject", subject)?;
        }
        if let Some(content_type) = &self.datacontenttype {
            check_media_type(content_type)?;
        }
        if let Some(schema) = &self.dataschema {
            check_absolute_uri("dataschema", schema)?;
        }
        for name in self.extensions.keys() {
            check_extension_name(name)?;
        }
        Ok(())
    }

    /// Parses one event in the JSON structured format and validates it.
    pub fn from_json(json: &[u8]) -> Result<Event, Error> {
        let doc: RawDoc =
            serde_json::from_str(utf8(json)?).map_err(|error| Error::syntax(&error))?;
        doc.into_event()
    }

    /// Parses a JSON batch (an array of structured events) and validates every event.
    pub fn batch_from_json(json: &[u8]) -> Result<Vec<Event>, Error> {
        let docs: Vec<RawDoc> =
            serde_json::from_str(utf8(json)?).map_err(|error| Error::syntax(&error))?;
        docs.into_iter()
            .enumerate()
            .map(|(index, doc)| {
                doc.into_event().map_err(|error| Error::InBatch {
                    index,
                    error: Box::new(error),
                })
            })
            .collect()
    }

    /// Writes the event in the JSON structured format.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an event always serialises to JSON")
    }

    /// Writes events in the JSON batch format.
    pub fn batch_to_json(events: &[Event]) -> Vec<u8> {
        serde_json::to_vec(events).expect("events always serialise to JSON")
    }
}

impl Data {
    /// The payload as a JSON value: JSON as it is, binary as a base64 string.
    ///
    /// Fails only for valid JSON that [`serde_json::Value`] cannot hold: a number beyond the
    /// range of `f64`, such as `1e400`, which other producers may legitimately write.
    pub fn to_value(&self) -> Result<serde_json::Value, serde_json::Error> {
        match self {
            Data::Json(raw) => serde_json::from_str(raw.get()),
            Data::Binary(bytes) => Ok(serde_json::Value::String(BASE64.encode(bytes))),
        }
    }
}

/// Two JSON payloads are equal when their text is; two binary ones when their bytes are.
impl PartialEq for Data {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Data::Json(a), Data::Json(b)) => a.get() == b.get(),
            (Data::Binary(a), Data::Binary(b)) => a == b,
            _ => false,
        }
    }
}

impl From<String> for ExtensionValue {
    fn from(value: String) -> Self {
        ExtensionValue::String(value)
    }
}

impl From<&str> for ExtensionValue {
    fn from(value: &str) -> Self {
        ExtensionValue::String(value.to_owned())
    }
}

impl From<i32> for ExtensionValue {
    fn from(value: i32) -> Self {
        ExtensionValue::Integer(value)
    }
}

impl From<bool> for ExtensionValue {
    fn from(value: bool) -> Self {
        ExtensionValue::Boolean(value)
    }
}

impl fmt::Display for ExtensionValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExtensionValue::String(value) => f.write_str(value),
            ExtensionValue::Integer(value) => write!(f, "{value}"),
            ExtensionValue::Boolean(value) => write!(f, "{value}"),
        }
    }
}

impl Serialize for Event {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("specversion", SPEC_VERSION)?;
        map.serialize_entry("id", &self.id)?;
        map.serialize_entry("source", &self.source)?;
        map.serialize_entry("type", &self.ty)?;
        if let Some(time) = &self.time {
            map.serialize_entry("time", &time.to_rfc3339_opts(SecondsFormat::AutoSi, true))?;
        }
        if let Some(subject) = &self.subject {
            map.serialize_entry("subject", subject)?;
        }
        if let Some(content_type) = &self.datacontenttype {
            map.serialize_entry("datacontenttype", content_type)?;
        }
        if let Some(schema) = &self.dataschema {
            map.serialize_entry("dataschema", schema)?;
        }
        for (name, value) in &self.extensions {
            match value {
                ExtensionValue::String(value) => map.serialize_entry(name, value)?,
                ExtensionValue::Integer(value) => map.serialize_entry(name, value)?,
                ExtensionValue::Boolean(value) => map.serialize_entry(name, value)?,
            }
        }
        match &self.data {
            Some(Data::Json(raw)) => map.serialize_entry("data", raw)?,
            Some(Data::Binary(bytes)) => {
                map.serialize_entry("data_base64", &BASE64.encode(bytes))?
            }
            None => {}
        }
        map.end()
    }
}

/// Deserialising an event requires `serde_json`'s deserializer (the payload is kept raw).
impl<'de> Deserialize<'de> for Event {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // Parsed from the raw text so that the fast, borrowing parser is the only one.
        let raw = Box::<RawValue>::deserialize(deserializer)?;
        Event::from_json(raw.get().as_bytes()).map_err(de::Error::custom)
    }
}

/// A structured event as its members, borrowed from the input, each value still raw JSON;
/// duplicates are kept so they can be reported.
struct RawDoc<'a>(Vec<(Key<'a>, &'a RawValue)>);

/// A member name: borrowed from the input unless it contains escapes.
struct Key<'a>(std::borrow::Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an attribute name")
            }
            fn visit_borrowed_str<E: de::Error>(self, name: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(std::borrow::Cow::Borrowed(name)))
            }
            fn visit_str<E: de::Error>(self, name: &str) -> Result<Key<'de>, E> {
                Ok(Key(std::borrow::Cow::Owned(name.to_owned())))
            }
            fn visit_string<E: de::Error>(self, name: String) -> Result<Key<'de>, E> {
                Ok(Key(std::borrow::Cow::Owned(name)))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for RawDoc<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DocVisitor<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for DocVisitor<'a> {
            type Value = RawDoc<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a CloudEvent as a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawDoc<'a>, A::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(12));
                while let Some(entry) = map.next_entry::<Key<'de>, &'de RawValue>()? {
                    members.push(entry);
                }
                Ok(RawDoc(members))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, _seq: A) -> Result<RawDoc<'a>, A::Error> {
                Err(de::Error::invalid_type(de::Unexpected::Seq, &self))
            }
        }
        deserializer.deserialize_map(DocVisitor(std::marker::PhantomData))
    }
}

impl RawDoc<'_> {
    fn into_event(self) -> Result<Event, Error> {
        let mut specversion = None;
        let mut id = None;
        let mut source = None;
        let mut ty = None;
        let mut time = None;
        let mut subject = None;
        let mut datacontenttype = None;
        let mut dataschema = None;
        let mut data = None;
        let mut data_base64 = None;
        let mut extensions = BTreeMap::new();

        for (at, (Key(name), raw)) in self.0.iter().enumerate() {
            // Names are few: a linear scan beats hashing them.
            if self.0[..at].iter().any(|(Key(earlier), _)| earlier == name) {
                return Err(Error::invalid(name.as_ref(), "appears more than once"));
            }
            let raw: &RawValue = raw;
            // The JSON format treats a member whose value is null as absent.
            if raw.get() == "null" {
                continue;
            }
            match name.as_ref() {
                "specversion" => specversion = Some(string_attr("specversion", raw)?),
                "id" => id = Some(string_attr("id", raw)?),
                "source" => source = Some(string_attr("source", raw)?),
                "type" => ty = Some(string_attr("type", raw)?),
                "time" => {
                    let text = string_attr("time", raw)?;
                    let parsed = DateTime::parse_from_rfc3339(&text).map_err(|error| {
                        Error::invalid("time", format!("not an RFC 3339 timestamp ({error})"))
                    })?;
                    time = Some(parsed);
                }
                "subject" => subject = Some(string_attr("subject", raw)?),
                "datacontenttype" => datacontenttype = Some(string_attr("datacontenttype", raw)?),
                "dataschema" => dataschema = Some(string_attr("dataschema", raw)?),
                "data" => data = Some(raw.to_owned()),
                "data_base64" => {
                    let text = string_attr("data_base64", raw)?;
                    let bytes = BASE64.decode(text.as_bytes()).map_err(|error| {
                        Error::invalid("data_base64", format!("not valid base64 ({error})"))
                    })?;
                    data_base64 = Some(bytes);
                }
                _ => {
                    check_extension_name(name)?;
                    let value = extension_value(name, raw)?;
                    extensions.insert(name.clone().into_owned(), value);
                }
            }
        }

        match specversion.as_deref() {
            None => {
                return Err(Error::Missing {
                    attribute: "specversion",
                });
            }
            Some(SPEC_VERSION) => {}
            Some(other) => {
                return Err(Error::invalid(
                    "specversion",
                    format!("`{other}` is not supported, only `{SPEC_VERSION}`"),
                ));
            }
        }
        let data = match (data, data_base64) {
            (Some(_), Some(_)) => {
                return Err(Error::invalid(
                    "data_base64",
                    "`data` and `data_base64` are mutually exclusive",
                ));
            }
            (Some(raw), None) => Some(Data::Json(raw)),
            (None, Some(bytes)) => Some(Data::Binary(bytes)),
            (None, None) => None,
        };
        let event = Event {
            id: id.ok_or(Error::Missing { attribute: "id" })?,
            source: source.ok_or(Error::Missing {
                attribute: "source",
            })?,
            ty: ty.ok_or(Error::Missing { attribute: "type" })?,
            time,
            subject,
            datacontenttype,
            dataschema,
            data,
            extensions,
        };
        event.validate()?;
        Ok(event)
    }
}

/// Checks the whole document is UTF-8 at once, which is much cheaper than the parser
/// checking string by string.
fn utf8(json: &[u8]) -> Result<&str, Error> {
    std::str::from_utf8(json).map_err(|error| {
        let before = &json[..error.valid_up_to()];
        let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
        let column = before.len()
            - before
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |at| at + 1)
            + 1;
        Error::Syntax {
            reason: "invalid UTF-8".to_owned(),
            line,
            column,
        }
    })
}

fn string_attr(attribute: &str, raw: &RawValue) -> Result<String, Error> {
    // Fast path: a JSON string without escapes is its own content (the parser has already
    // checked it is well-formed, so it holds no raw control characters).
    let text = raw.get();
    if let Some(inner) = text
        .strip_prefix('"')
        .and_then(|rest| rest.strip_suffix('"'))
        .filter(|inner| !inner.contains('\\'))
    {
        return Ok(inner.to_owned());
    }
    serde_json::from_str::<String>(text).map_err(|_| {
        Error::invalid(
            attribute,
            format!("must be a JSON string, found {}", kind_of(raw)),
        )
    })
}

fn extension_value(name: &str, raw: &RawValue) -> Result<ExtensionValue, Error> {
    let text = raw.get();
    match text.as_bytes().first() {
        Some(b'"') => string_attr(name, raw).map(ExtensionValue::String),
        Some(b't' | b'f') => serde_json::from_str::<bool>(text)
            .map(ExtensionValue::Boolean)
            .map_err(|_| Error::invalid(name, "not a boolean")),
        Some(b'-' | b'0'..=b'9') => serde_json::from_str::<i64>(text)
            .ok()
            .and_then(|value| i32::try_from(value).ok())
            .map(ExtensionValue::Integer)
            .ok_or_else(|| {
                Error::invalid(
                    name,
                    format!("`{text}` is not an integer in the range of a signed 32-bit integer"),
                )
            }),
        _ => Err(Error::invalid(
            name,
            format!(
                "extension values must be a string, an integer or a boolean, found {}",
                kind_of(raw)
            ),
        )),
    }
}

fn kind_of(raw: &RawValue) -> &'static str {
    match raw.get().as_bytes().first() {
        Some(b'"') => "a string",
        Some(b'{') => "an object",
        Some(b'[') => "an array",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        _ => "a number",
    }
}

fn check_non_empty(attribute: &str, value: &str) -> Result<(), Error> {
    if value.is_empty() {
        return Err(Error::invalid(attribute, "must be a non-empty string"));
    }
    Ok(())
}

fn check_uri_reference(attribute: &str, value: &str) -> Result<(), Error> {
    check_non_empty(attribute, value)?;
    if let Some(bad) = value.chars().find(|c| c.is_whitespace() || c.is_control()) {
        return Err(Error::invalid(
            attribute,
            format!("must be a URI-reference, but contains {bad:?}"),
        ));
    }
    Ok(())
}

fn check_absolute_uri(attribute: &str, value: &str) -> Result<(), Error> {
    check_uri_reference(attribute, value)?;
    let scheme = value
        .split_once(':')
        .map(|(scheme, _)| scheme)
        .unwrap_or("");
    let valid_scheme = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    if !valid_scheme {
        return Err(Error::invalid(
            attribute,
            format!("`{value}` is not an absolute URI (it needs a scheme, e.g. `https:`)"),
        ));
    }
    Ok(())
}

/// RFC 3339 writes a four-digit year and an offset in whole minutes; a time outside that
/// would be written as something that does not parse back, or as another instant.
fn check_time(time: &DateTime<FixedOffset>) -> Result<(), Error> {
    use chrono::Datelike as _;
    if !(0..=9999).contains(&time.year()) {
        return Err(Error::invalid(
            "time",
            format!(
                "year {} cannot be written in RFC 3339, which allows 0000 to 9999",
                time.year()
            ),
        ));
    }
    if time.offset().local_minus_utc() % 60 != 0 {
        return Err(Error::invalid(
            "time",
            format!(
                "offset {} has seconds, but RFC 3339 offsets are whole minutes",
                time.offset()
            ),
        ));
    }
    Ok(())
}

fn check_media_type(value: &str) -> Result<(), Error> {
    let essence = value.split(';').next().unwrap_or("").trim();
    let well_formed = essence
        .split_once('/')
        .is_some_and(|(kind, sub)| is_token(kind) && is_token(sub));
    if !well_formed {
        return Err(Error::invalid(
            "datacontenttype",
            format!("`{value}` is not a media type like `application/json`"),
        ));
    }
    Ok(())
}

fn is_token(value: &str) -> bool {
    !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn check_extension_name(name: &str) -> Result<(), Error> {
    if RESERVED.contains(&name) {
        return Err(Error::invalid(
            name,
            "is a context attribute and cannot be an extension",
        ));
    }
    // Names longer than EXTENSION_NAME_LEN_MAX are only discouraged by the specification.
    if name.is_empty() {
        return Err(Error::invalid(
            name,
            "extension names are at least 1 character long",
        ));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return Err(Error::invalid(
            name,
            "extension names consist of lower-case letters a-z and digits 0-9 only",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_specification_example() {
        let json = br#"{
            "specversion" : "1.0",
            "type" : "com.github.pull_request.opened",
            "source" : "https://github.com/cloudevents/spec/pull",
            "subject" : "123",
            "id" : "A234-1234-1234",
            "time" : "2018-04-05T17:31:00Z",
            "comexampleextension1" : "value",
            "comexampleothervalue" : 5,
            "datacontenttype" : "text/xml",
            "data" : "<much wow=\"xml\"/>"
        }"#;
        let event = Event::from_json(json).unwrap();
        assert_eq!(event.id, "A234-1234-1234");
        assert_eq!(event.ty, "com.github.pull_request.opened");
        assert_eq!(event.subject.as_deref(), Some("123"));
        assert_eq!(
            event.extensions.get("comexampleothervalue"),
            Some(&ExtensionValue::Integer(5))
        );
        assert_eq!(
            event.data_as::<String>().unwrap().unwrap(),
            "<much wow=\"xml\"/>"
        );
        let again = Event::from_json(&event.to_json()).unwrap();
        assert_eq!(again, event);
    }

    #[test]
    fn errors_name_the_attribute() {
        let missing = Event::from_json(br#"{"specversion":"1.0","id":"1","type":"t"}"#);
        assert_eq!(
            missing,
            Err(Error::Missing {
                attribute: "source"
            })
        );
        let bad_ext = Event::from_json(
            br#"{"specversion":"1.0","id":"1","source":"/s","type":"t","Bad_Name":"x"}"#,
        );
        assert!(
            matches!(bad_ext, Err(Error::Invalid { attribute, .. }) if attribute == "Bad_Name")
        );
        let version =
            Event::from_json(br#"{"specversion":"0.3","id":"1","source":"/s","type":"t"}"#);
        assert!(
            matches!(version, Err(Error::Invalid { attribute, .. }) if attribute == "specversion")
        );
        let syntax = Event::from_json(b"{\"id\": ");
        assert!(matches!(syntax, Err(Error::Syntax { line: 1, .. })));
        let batch = Event::batch_from_json(
            br#"[{"specversion":"1.0","id":"1","source":"/s","type":"t"},{"specversion":"1.0","id":"","source":"/s","type":"t"}]"#,
        );
        assert!(matches!(batch, Err(Error::InBatch { index: 1, .. })));
    }

    #[test]
    fn new_events_get_uuid_v7_ids() {
        let event = Event::new("/orders", "OrderPlaced");
        let id = uuid::Uuid::parse_str(&event.id).unwrap();
        assert_eq!(id.get_version_num(), 7);
        event.validate().unwrap();
    }
}
