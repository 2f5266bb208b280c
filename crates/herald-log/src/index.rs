//! The in-memory index of the log and its persisted checkpoint.
//!
//! The index maps a global position to where its record lies, a stream to the positions
//! of its events (so `read_stream` and expected-version checks never scan the log), and an
//! event id to its position (for idempotent appends). It is rebuilt on open from the last
//! checkpoint plus the log written after it, so open time depends on the tail since the
//! last checkpoint, not on the length of the log.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use herald_core::StreamName;

use crate::io::IoFile;

/// Where one event's record lies in its segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Loc {
    pub(crate) offset: u32,
    pub(crate) len: u32,
}

/// One segment file and the records in it.
pub(crate) struct Segment {
    /// Position of the first event in the segment (also its file name).
    pub(crate) base: u64,
    pub(crate) path: PathBuf,
    pub(crate) file: Arc<dyn IoFile>,
    /// Per event, in position order.
    pub(crate) locs: Vec<Loc>,
    /// Bytes of records in the file (written, not necessarily synced yet).
    pub(crate) len: u64,
}

/// What the index knows about one stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct StreamState {
    /// Global position of each event, by version.
    pub(crate) positions: Vec<u64>,
    /// Versions before this one were soft-deleted.
    pub(crate) visible_from: u64,
    /// Deleted, and nothing appended since.
    pub(crate) deleted: bool,
}

impl StreamState {
    /// The version of the last visible event among those with a position below `head`.
    pub(crate) fn last_version(&self, head: u64) -> Option<u64> {
        if self.deleted {
            return None;
        }
        let visible = self.positions.partition_point(|&position| position < head) as u64;
        (visible > self.visible_from).then(|| visible - 1)
    }
}

/// Event ids by hash; a hash shared by several ids keeps all their positions, and callers
/// compare the stored ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum IdSlot {
    One(u64),
    Many(Vec<u64>),
}

#[derive(Default)]
pub(crate) struct Index {
    pub(crate) segments: Vec<Segment>,
    pub(crate) streams: HashMap<StreamName, StreamState>,
    pub(crate) ids: HashMap<u64, IdSlot>,
    /// Position the next event will get.
    pub(crate) next_position: u64,
}

/// A stable 64-bit hash of an event id (FNV-1a); stable so checkpoints stay valid across
/// builds.
pub(crate) fn id_hash(id: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in id.as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

impl Index {
    /// The segment holding `position` and the event's index within it.
    pub(crate) fn locate(&self, position: u64) -> Option<(&Segment, usize)> {
        let at = self
            .segments
            .partition_point(|segment| segment.base <= position);
        let segment = self.segments.get(at.checked_sub(1)?)?;
        let index = (position - segment.base) as usize;
        (index < segment.locs.len()).then_some((segment, index))
    }

    /// Positions whose id hashes like `id`'s.
    pub(crate) fn id_candidates(&self, id: &str) -> &[u64] {
        match self.ids.get(&id_hash(id)) {
            None => &[],
            Some(IdSlot::One(position)) => std::slice::from_ref(position),
            Some(IdSlot::Many(positions)) => positions,
        }
    }

    pub(crate) fn insert_id(&mut self, hash: u64, position: u64) {
        use std::collections::hash_map::Entry;
        match self.ids.entry(hash) {
            Entry::Vacant(slot) => {
                slot.insert(IdSlot::One(position));
            }
            Entry::Occupied(mut slot) => {
                let slot = slot.get_mut();
                match slot {
                    IdSlot::One(first) => *slot = IdSlot::Many(vec![*first, position]),
                    IdSlot::Many(positions) => positions.push(position),
                }
            }
        }
    }

    /// Records an event at the end of the last segment.
    pub(crate) fn insert_event(
        &mut self,
        stream: &StreamName,
        version: u64,
        id_hash: u64,
        loc: Loc,
    ) {
        let position = self.next_position;
        let segment = self.segments.last_mut().expect("an open log has a segment");
        debug_assert_eq!(segment.base + segment.locs.len() as u64, position);
        segment.locs.push(loc);
        segment.len = u64::from(loc.offset) + u64::from(loc.len);
        let state = self.streams.entry(stream.clone()).or_default();
        assert_eq!(
            state.positions.len() as u64,
            version,
            "stream versions are contiguous"
        );
        state.positions.push(position);
        state.deleted = false;
        self.insert_id(id_hash, position);
        self.next_position += 1;
    }

    /// Records a soft deletion at the end of the last segment.
    pub(crate) fn insert_deletion(&mut self, stream: &StreamName, offset: u32, len: u32) {
        let segment = self.segments.last_mut().expect("an open log has a segment");
        segment.len = u64::from(offset) + u64::from(len);
        let state = self.streams.entry(stream.clone()).or_default();
        state.visible_from = state.positions.len() as u64;
        state.deleted = true;
    }
}

/// The checkpoint file: the index as of a moment when everything it covers was synced.
///
/// ```text
/// magic "HRLDIDX1" (8) | next_position u64
/// segments u32, each: base u64 | len u64 | count u32 | count × (offset u32, len u32)
/// streams u32, each: name_len u16 | name | visible_from u64 | deleted u8 | count u64 | count × position u64
/// ids u64, each: hash u64 | position u64
/// crc32c u32 of everything before it
/// ```
/// All integers little-endian.
pub(crate) mod checkpoint {
    use super::*;

    pub(crate) const FILE_NAME: &str = "index.ckpt";
    const MAGIC: &[u8; 8] = b"HRLDIDX1";

    /// The index without its file handles, as read from a checkpoint.
    pub(crate) struct Snapshot {
        pub(crate) next_position: u64,
        pub(crate) segments: Vec<(u64, u64, Vec<Loc>)>,
        pub(crate) streams: HashMap<StreamName, StreamState>,
        pub(crate) ids: HashMap<u64, IdSlot>,
    }

    pub(crate) fn encode(index: &Index) -> Vec<u8> {
        let id_count: usize = index
            .ids
            .values()
            .map(|slot| match slot {
                IdSlot::One(_) => 1,
                IdSlot::Many(positions) => positions.len(),
            })
            .sum();
        let mut out = Vec::with_capacity(64 + id_count * 24 + index.next_position as usize * 8);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&index.next_position.to_le_bytes());
        out.extend_from_slice(&(index.segments.len() as u32).to_le_bytes());
        for segment in &index.segments {
            out.extend_from_slice(&segment.base.to_le_bytes());
            out.extend_from_slice(&segment.len.to_le_bytes());
            out.extend_from_slice(&(segment.locs.len() as u32).to_le_bytes());
            for loc in &segment.locs {
                out.extend_from_slice(&loc.offset.to_le_bytes());
                out.extend_from_slice(&loc.len.to_le_bytes());
            }
        }
        out.extend_from_slice(&(index.streams.len() as u32).to_le_bytes());
        for (name, state) in &index.streams {
            out.extend_from_slice(&(name.as_str().len() as u16).to_le_bytes());
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(&state.visible_from.to_le_bytes());
            out.push(u8::from(state.deleted));
            out.extend_from_slice(&(state.positions.len() as u64).to_le_bytes());
            for position in &state.positions {
                out.extend_from_slice(&position.to_le_bytes());
            }
        }
        out.extend_from_slice(&(id_count as u64).to_le_bytes());
        for (hash, slot) in &index.ids {
            let positions = match slot {
                IdSlot::One(position) => std::slice::from_ref(position),
                IdSlot::Many(positions) => positions.as_slice(),
            };
            for position in positions {
                out.extend_from_slice(&hash.to_le_bytes());
                out.extend_from_slice(&position.to_le_bytes());
            }
        }
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes a checkpoint; `None` when it is damaged (the caller then rebuilds the index
    /// from the whole log).
    pub(crate) fn decode(bytes: &[u8]) -> Option<Snapshot> {
        let (body, crc) = bytes.split_at_checked(bytes.len().checked_sub(4)?)?;
        if crc32c::crc32c(body) != u32::from_le_bytes(crc.try_into().ok()?) {
            return None;
        }
        let mut reader = Reader(body);
        if reader.take(8)? != MAGIC {
            return None;
        }
        let next_position = reader.u64()?;
        let segment_count = reader.u32()?;
        let mut segments = Vec::new();
        for _ in 0..segment_count {
            let base = reader.u64()?;
            let len = reader.u64()?;
            let count = reader.u32()? as usize;
            let mut locs = Vec::with_capacity(count.min(body.len() / 8));
            for _ in 0..count {
                locs.push(Loc {
                    offset: reader.u32()?,
                    len: reader.u32()?,
                });
            }
            segments.push((base, len, locs));
        }
        let stream_count = reader.u32()?;
        let mut streams = HashMap::with_capacity((stream_count as usize).min(body.len() / 16));
        for _ in 0..stream_count {
            let name_len = reader.u16()? as usize;
            let name =
                StreamName::parse_stored(std::str::from_utf8(reader.take(name_len)?).ok()?).ok()?;
            let visible_from = reader.u64()?;
            let deleted = reader.take(1)?[0] != 0;
            let count = reader.u64()? as usize;
            let mut positions = Vec::with_capacity(count.min(body.len() / 8));
            for _ in 0..count {
                positions.push(reader.u64()?);
            }
            streams.insert(
                name,
                StreamState {
                    positions,
                    visible_from,
                    deleted,
                },
            );
        }
        let id_count = reader.u64()?;
        let mut index = Index::default();
        index.ids.reserve((id_count as usize).min(body.len() / 16));
        for _ in 0..id_count {
            let hash = reader.u64()?;
            let position = reader.u64()?;
            index.insert_id(hash, position);
        }
        if !reader.0.is_empty() {
            return None;
        }
        Some(Snapshot {
            next_position,
            segments,
            streams,
            ids: index.ids,
        })
    }

    struct Reader<'a>(&'a [u8]);

    impl<'a> Reader<'a> {
        fn take(&mut self, n: usize) -> Option<&'a [u8]> {
            let (head, rest) = self.0.split_at_checked(n)?;
            self.0 = rest;
            Some(head)
        }
        fn u16(&mut self) -> Option<u16> {
            Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
        }
        fn u32(&mut self) -> Option<u32> {
            Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
        }
        fn u64(&mut self) -> Option<u64> {
            Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
        }
    }
}
