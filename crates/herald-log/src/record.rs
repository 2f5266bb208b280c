//! The record codec: how one event (or one stream deletion) is laid out on disk.
//!
//! The layout, byte by byte, is documented in `docs/log-format.md`; in short every record
//! is a little-endian header, the stream name and a payload, protected by a CRC32C:
//!
//! ```text
//! offset size field
//!      0    4 len          bytes that follow this field (header rest + stream + payload)
//!      4    4 crc          CRC32C (Castagnoli) of bytes [8, 4 + len)
//!      8    1 kind         1 = event, 2 = stream deleted
//!      9    1 flags        reserved, 0
//!     10    2 stream_len   length of the stream name in bytes (1..=256)
//!     12    4 batch_left   records of the same append that follow this one
//!     16    8 position     global position of the event (kind 2: the next event's)
//!     24    8 version      stream version of the event (kind 2: the stream's last)
//!     32    8 recorded_at  microseconds since the Unix epoch, signed
//!     40    n stream       the stream name, UTF-8
//! 40 + n    m payload      kind 1: the CloudEvent in JSON structured format; kind 2: empty
//! ```

use herald_core::stream::STREAM_NAME_LEN_MAX;

/// Bytes of the fixed part of a record, before the stream name.
pub const HEADER_LEN: usize = 40;

/// Bytes of the `len` and `crc` fields, which the `len` field does not count / the CRC
/// does not cover.
const PREFIX_LEN: usize = 8;

/// The largest record the decoder accepts; bounds what a damaged `len` field can make a
/// reader allocate.
pub const RECORD_LEN_MAX: usize = 64 * 1024 * 1024;

/// What a record holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An event.
    Event = 1,
    /// The soft deletion of a stream.
    StreamDeleted = 2,
}

/// A record borrowed from a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    /// What the record holds.
    pub kind: Kind,
    /// Records of the same append that follow this one; 0 marks the end of an append.
    pub batch_left: u32,
    /// The event's global position.
    pub position: u64,
    /// The event's stream version.
    pub version: u64,
    /// When the append was accepted, in microseconds since the Unix epoch.
    pub recorded_at_us: i64,
    /// The stream name.
    pub stream: &'a str,
    /// The CloudEvent in JSON structured format (empty for a deletion).
    pub payload: &'a [u8],
}

/// Why bytes do not decode to a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The buffer ends before the record does; `needed` is the record's full length when
    /// known.
    #[error("record incomplete: {available} bytes available, {needed} needed")]
    Incomplete {
        /// Bytes available.
        available: usize,
        /// Bytes the record needs (at least).
        needed: usize,
    },
    /// The bytes are not a valid record.
    #[error("record corrupt: {reason}")]
    Corrupt {
        /// What is wrong.
        reason: &'static str,
    },
}

impl Record<'_> {
    /// The record's length on disk.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.stream.len() + self.payload.len()
    }

    /// Appends the encoded record to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        debug_assert!(!self.stream.is_empty() && self.stream.len() <= STREAM_NAME_LEN_MAX);
        let len = self.encoded_len();
        assert!(
            len <= RECORD_LEN_MAX,
            "record of {len} bytes exceeds the codec limit"
        );
        let start = out.len();
        out.reserve(len);
        out.extend_from_slice(&((len - 4) as u32).to_le_bytes());
        out.extend_from_slice(&[0; 4]); // crc, filled in below
        out.push(self.kind as u8);
        out.push(0);
        out.extend_from_slice(&(self.stream.len() as u16).to_le_bytes());
        out.extend_from_slice(&self.batch_left.to_le_bytes());
        out.extend_from_slice(&self.position.to_le_bytes());
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&self.recorded_at_us.to_le_bytes());
        out.extend_from_slice(self.stream.as_bytes());
        out.extend_from_slice(self.payload);
        let crc = crc32c::crc32c(&out[start + PREFIX_LEN..]);
        out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    }
}

/// Decodes the record at the start of `buf`; returns it and its length on disk.
///
/// Never panics, whatever the bytes: every field is bounds-checked before use and the
/// CRC is checked before any field other than `len` is trusted.
pub fn decode(buf: &[u8]) -> Result<(Record<'_>, usize), DecodeError> {
    if buf.len() < PREFIX_LEN {
        return Err(DecodeError::Incomplete {
            available: buf.len(),
            needed: HEADER_LEN,
        });
    }
    let len = u32::from_le_bytes(buf[0..4].try_into().expect("4 bytes")) as usize + 4;
    if len < HEADER_LEN + 1 {
        return Err(DecodeError::Corrupt {
            reason: "length field smaller than a record header",
        });
    }
    if len > RECORD_LEN_MAX {
        return Err(DecodeError::Corrupt {
            reason: "length field larger than the record limit",
        });
    }
    if buf.len() < len {
        return Err(DecodeError::Incomplete {
            available: buf.len(),
            needed: len,
        });
    }
    let record = &buf[..len];
    let stored_crc = u32::from_le_bytes(record[4..8].try_into().expect("4 bytes"));
    if crc32c::crc32c(&record[PREFIX_LEN..]) != stored_crc {
        return Err(DecodeError::Corrupt {
            reason: "checksum mismatch",
        });
    }
    let kind = match record[8] {
        1 => Kind::Event,
        2 => Kind::StreamDeleted,
        _ => {
            return Err(DecodeError::Corrupt {
                reason: "unknown record kind",
            });
        }
    };
    if record[9] != 0 {
        return Err(DecodeError::Corrupt {
            reason: "unknown record flags",
        });
    }
    let stream_len = u16::from_le_bytes(record[10..12].try_into().expect("2 bytes")) as usize;
    if stream_len == 0 || stream_len > STREAM_NAME_LEN_MAX || HEADER_LEN + stream_len > len {
        return Err(DecodeError::Corrupt {
            reason: "stream name length out of range",
        });
    }
    let stream =
        std::str::from_utf8(&record[HEADER_LEN..HEADER_LEN + stream_len]).map_err(|_| {
            DecodeError::Corrupt {
                reason: "stream name is not UTF-8",
            }
        })?;
    let payload = &record[HEADER_LEN + stream_len..];
    if kind == Kind::StreamDeleted && !payload.is_empty() {
        return Err(DecodeError::Corrupt {
            reason: "deletion record with a payload",
        });
    }
    let u64_at = |at: usize| u64::from_le_bytes(record[at..at + 8].try_into().expect("8 bytes"));
    Ok((
        Record {
            kind,
            batch_left: u32::from_le_bytes(record[12..16].try_into().expect("4 bytes")),
            position: u64_at(16),
            version: u64_at(24),
            recorded_at_us: u64_at(32) as i64,
            stream,
            payload,
        },
        len,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn record_strategy() -> impl Strategy<Value = (bool, u32, u64, u64, i64, String, Vec<u8>)> {
        (
            any::<bool>(),
            any::<u32>(),
            any::<u64>(),
            any::<u64>(),
            any::<i64>(),
            "[a-zA-Z0-9_.:@-]{1,64}",
            proptest::collection::vec(any::<u8>(), 0..2048),
        )
    }

    proptest! {
        #[test]
        fn round_trips((is_event, batch_left, position, version, at, stream, payload) in record_strategy()) {
            let record = Record {
                kind: if is_event { Kind::Event } else { Kind::StreamDeleted },
                batch_left,
                position,
                version,
                recorded_at_us: at,
                stream: &stream,
                payload: if is_event { &payload } else { &[] },
            };
            let mut buf = vec![0xAA; 3];
            record.encode_into(&mut buf);
            let (decoded, len) = decode(&buf[3..]).unwrap();
            prop_assert_eq!(decoded, record);
            prop_assert_eq!(len, buf.len() - 3);
            // Every strict prefix is incomplete, never corrupt or a panic.
            for cut in 0..len {
                let partial = decode(&buf[3..3 + cut]);
                prop_assert!(partial.is_err());
            }
        }

        #[test]
        fn any_single_flipped_bit_is_detected(
            (_, batch_left, position, version, at, stream, payload) in record_strategy(),
            bit in any::<prop::sample::Index>(),
        ) {
            let record = Record {
                kind: Kind::Event, batch_left, position, version,
                recorded_at_us: at, stream: &stream, payload: &payload,
            };
            let mut buf = Vec::new();
            record.encode_into(&mut buf);
            let bit = bit.index(buf.len() * 8);
            buf[bit / 8] ^= 1 << (bit % 8);
            // CRC32C detects every single-bit error in what it covers; a flip in `len`
            // makes the record incomplete or checks the wrong range.
            prop_assert!(decode(&buf).is_err());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&bytes);
        }
    }
}
