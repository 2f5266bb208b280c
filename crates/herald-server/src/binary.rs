//! The HTTP binary mode of CloudEvents: attributes in `ce-*` headers, the body as `data` with
//! its `Content-Type` as `datacontenttype`.
//!
//! Header values are percent-decoded as the HTTP protocol binding requires (it percent-encodes
//! what a header cannot carry), and must then be UTF-8. Every extension arrives as a string:
//! headers carry no types.

use axum::body::Bytes;
use axum::http::{HeaderMap, header};
use chrono::DateTime;
use herald_core::event::{Error, SPEC_VERSION};
use herald_core::{Data, Event, ExtensionValue};
use serde_json::value::RawValue;

use crate::append::{JSON_DEPTH_MAX, depth_within, essence};

/// The longest `ce-*` header value accepted, in bytes (before percent-decoding).
///
/// Attributes are short identifiers and URIs; the body is where payloads go. The bound keeps a
/// client from storing the HTTP server's whole header buffer as one extension.
pub const ATTRIBUTE_HEADER_LEN_MAX_BYTES: usize = 4096;

/// The event a binary-mode request carries.
pub(crate) fn event(headers: &HeaderMap, body: Bytes) -> Result<Event, Error> {
    let mut specversion = None;
    let mut event = Event {
        id: String::new(),
        source: String::new(),
        ty: String::new(),
        time: None,
        subject: None,
        datacontenttype: None,
        dataschema: None,
        data: None,
        extensions: Default::default(),
    };
    let (mut id, mut source, mut ty) = (None, None, None);
    for name in headers.keys() {
        let Some(attribute) = name.as_str().strip_prefix("ce-") else {
            continue;
        };
        let mut values = headers.get_all(name).iter();
        let value = values
            .next()
            .map(|value| value.as_bytes())
            .unwrap_or_default();
        if values.next().is_some() {
            return Err(invalid(attribute, "the header is given more than once"));
        }
        if value.len() > ATTRIBUTE_HEADER_LEN_MAX_BYTES {
            return Err(invalid(
                attribute,
                format!(
                    "the header value is {} bytes long, more than {ATTRIBUTE_HEADER_LEN_MAX_BYTES}",
                    value.len()
                ),
            ));
        }
        let value = decode(attribute, value)?;
        match attribute {
            "specversion" => specversion = Some(value),
            "id" => id = Some(value),
            "source" => source = Some(value),
            "type" => ty = Some(value),
            "time" => {
                let time = DateTime::parse_from_rfc3339(&value).map_err(|error| {
                    invalid("time", format!("not an RFC 3339 timestamp ({error})"))
                })?;
                event.time = Some(time);
            }
            "subject" => event.subject = Some(value),
            "dataschema" => event.dataschema = Some(value),
            "datacontenttype" => {
                return Err(invalid(
                    "datacontenttype",
                    "in binary mode the Content-Type header gives it, not `ce-datacontenttype`",
                ));
            }
            "data" | "data_base64" => {
                return Err(invalid(attribute, "in binary mode the body is the data"));
            }
            extension => {
                event
                    .extensions
                    .insert(extension.to_owned(), ExtensionValue::String(value));
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
            return Err(invalid(
                "specversion",
                format!("`{other}` is not supported, only `{SPEC_VERSION}`"),
            ));
        }
    }
    event.id = id.ok_or(Error::Missing { attribute: "id" })?;
    event.source = source.ok_or(Error::Missing {
        attribute: "source",
    })?;
    event.ty = ty.ok_or(Error::Missing { attribute: "type" })?;
    let content_type = match headers.get(header::CONTENT_TYPE) {
        None => None,
        Some(value) => Some(decode("datacontenttype", value.as_bytes())?),
    };
    event.data = data(content_type.as_deref(), body)?;
    event.datacontenttype = content_type;
    event.validate()?;
    Ok(event)
}

/// The body as the event's data: JSON kept as its text, text as a JSON string, anything else
/// as bytes (written back as `data_base64`).
fn data(content_type: Option<&str>, body: Bytes) -> Result<Option<Data>, Error> {
    if body.is_empty() {
        return Ok(None);
    }
    let essence = content_type.map(essence);
    let is_json = |essence: &str| {
        essence == "application/json" || essence == "text/json" || essence.ends_with("+json")
    };
    match essence.as_deref() {
        // The JSON event format treats an absent datacontenttype as JSON; so does Herald.
        None => json(body, "the body has no Content-Type, so it must be JSON"),
        Some(essence) if is_json(essence) => json(body, "the Content-Type says JSON"),
        Some(essence) if essence.starts_with("text/") => match String::from_utf8(body.to_vec()) {
            Ok(text) => {
                let raw = serde_json::value::to_raw_value(&text)
                    .map_err(|error| invalid("data", error.to_string()))?;
                Ok(Some(Data::Json(raw)))
            }
            Err(error) => Ok(Some(Data::Binary(error.into_bytes()))),
        },
        Some(_) => Ok(Some(Data::Binary(body.to_vec()))),
    }
}

fn json(body: Bytes, why: &str) -> Result<Option<Data>, Error> {
    let text = String::from_utf8(body.to_vec())
        .map_err(|_| invalid("data", format!("{why}, but it is not UTF-8")))?;
    if !depth_within(text.as_bytes(), JSON_DEPTH_MAX) {
        return Err(invalid(
            "data",
            format!("JSON nested deeper than {JSON_DEPTH_MAX} levels"),
        ));
    }
    let raw = RawValue::from_string(text)
        .map_err(|error| invalid("data", format!("{why}, but it is not valid JSON ({error})")))?;
    Ok(Some(Data::Json(raw)))
}

/// Percent-decodes a header value into UTF-8 text.
fn decode(attribute: &str, value: &[u8]) -> Result<String, Error> {
    let mut bytes = Vec::with_capacity(value.len());
    let mut at = 0;
    while at < value.len() {
        let byte = value[at];
        if !(0x20..=0x7e).contains(&byte) {
            return Err(invalid(
                attribute,
                "the header value must be printable ASCII (percent-encode the rest)",
            ));
        }
        if byte == b'%' {
            let hex = value
                .get(at + 1..at + 3)
                .filter(|hex| hex.iter().all(u8::is_ascii_hexdigit))
                .and_then(|hex| std::str::from_utf8(hex).ok())
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                .ok_or_else(|| invalid(attribute, "a `%` is not followed by two hex digits"))?;
            bytes.push(hex);
            at += 3;
        } else {
            bytes.push(byte);
            at += 1;
        }
    }
    String::from_utf8(bytes)
        .map_err(|_| invalid(attribute, "the percent-decoded value is not UTF-8"))
}

fn invalid(attribute: &str, reason: impl Into<String>) -> Error {
    Error::Invalid {
        attribute: attribute.to_owned(),
        reason: reason.into(),
    }
}
