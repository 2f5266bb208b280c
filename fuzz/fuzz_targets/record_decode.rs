//! Fuzzes `herald_log::record::decode`, the codec of the on-disk log.
//!
//! Checks, for any bytes:
//! - `decode` never panics;
//! - when it returns `Ok((record, len))`: `len` fits in the input, equals
//!   `record.encoded_len()`, and `record.encode_into` gives back exactly `data[..len]`
//!   (the round trip);
//! - when it returns `Incomplete { available, needed }`: `available` is the input's length
//!   and `needed` is more than that;
//! - a few strict prefixes of a decoded record never decode to `Ok`.
//!
//! Random bytes almost never carry a valid CRC32C, so each input is also decoded a second
//! time with its `crc` field recomputed over the range its `len` field names: that lets the
//! fuzzer reach the checks behind the checksum (kind, flags, stream length, UTF-8,
//! deletion payload) directly. Finally the input is scanned as a segment would be: record
//! after record until the first error.

#![no_main]

use herald_log::record::{self, DecodeError};
use libfuzzer_sys::fuzz_target;

/// Bytes of the `len` and `crc` fields.
const PREFIX_LEN: usize = 8;

fn check(data: &[u8]) -> Option<usize> {
    match record::decode(data) {
        Ok((decoded, len)) => {
            assert!(len <= data.len(), "decoded length {len} > input {}", data.len());
            assert_eq!(len, decoded.encoded_len(), "decoded length vs encoded_len");
            let mut out = Vec::with_capacity(len);
            decoded.encode_into(&mut out);
            assert!(
                out == data[..len],
                "round trip differs:\n input   {:02x?}\n encoded {:02x?}\n record  {decoded:?}",
                &data[..len],
                out
            );
            for cut in [0, PREFIX_LEN - 1, PREFIX_LEN, record::HEADER_LEN, len - 1] {
                if cut < len {
                    assert!(
                        record::decode(&data[..cut]).is_err(),
                        "a {cut}-byte prefix of a {len}-byte record decoded"
                    );
                }
            }
            Some(len)
        }
        Err(DecodeError::Incomplete { available, needed }) => {
            assert_eq!(available, data.len(), "Incomplete::available");
            assert!(needed > available, "Incomplete with needed {needed} <= available {available}");
            None
        }
        Err(_) => None,
    }
}

/// `data` with its `crc` field set to the CRC32C of the range its `len` field names, when
/// that range is within `data`.
fn with_valid_crc(data: &[u8]) -> Option<Vec<u8>> {
    if data.len() < PREFIX_LEN {
        return None;
    }
    let len = u32::from_le_bytes(data[0..4].try_into().unwrap()) as usize + 4;
    if len < PREFIX_LEN || len > data.len() {
        return None;
    }
    let mut fixed = data.to_vec();
    let crc = crc32c::crc32c(&fixed[PREFIX_LEN..len]);
    fixed[4..8].copy_from_slice(&crc.to_le_bytes());
    Some(fixed)
}

fuzz_target!(|data: &[u8]| {
    check(data);

    if let Some(fixed) = with_valid_crc(data) {
        check(&fixed);
    }

    // Scan as a reader scans a segment: record after record until the first error.
    let mut at = 0;
    while let Some(len) = check(&data[at..]) {
        at += len;
    }
});
