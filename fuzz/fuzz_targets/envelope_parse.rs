//! Fuzzes the CloudEvents JSON envelope parser, `herald_core::Event::{from_json,
//! batch_from_json}`.
//!
//! Checks, for any bytes:
//! - neither `Event::from_json` nor `Event::batch_from_json` panics;
//! - when `from_json` accepts the input, the event writes (`to_json`) to a document that
//!   `from_json` accepts and that parses to an equal event (the round trip), and writing
//!   that event again gives the same bytes (`to_json` is a fixed point after one pass);
//! - when `batch_from_json` accepts the input, `batch_to_json` of the events parses back
//!   to equal events.

#![no_main]

use herald_core::Event;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(event) = Event::from_json(data) {
        let json = event.to_json();
        let again = match Event::from_json(&json) {
            Ok(again) => again,
            Err(error) => panic!(
                "to_json output does not parse: {error}\n input  {:?}\n output {:?}\n event  {event:?}",
                String::from_utf8_lossy(data),
                String::from_utf8_lossy(&json),
            ),
        };
        assert_eq!(again, event, "round trip changed the event; to_json was {:?}", String::from_utf8_lossy(&json));
        let json_again = again.to_json();
        assert!(
            json_again == json,
            "to_json is not stable:\n first  {:?}\n second {:?}",
            String::from_utf8_lossy(&json),
            String::from_utf8_lossy(&json_again),
        );
    }

    if let Ok(events) = Event::batch_from_json(data) {
        let json = Event::batch_to_json(&events);
        let again = match Event::batch_from_json(&json) {
            Ok(again) => again,
            Err(error) => panic!(
                "batch_to_json output does not parse: {error}\n output {:?}",
                String::from_utf8_lossy(&json),
            ),
        };
        assert_eq!(again, events, "batch round trip changed the events");
    }
});
