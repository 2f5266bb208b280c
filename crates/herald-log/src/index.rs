//! The in-memory index of the log and its persisted checkpoint.
//!
//! The index maps a global position to where its record lies, a stream to the positions
//! of its events (so `read_stream` and expected-version checks never scan the log), and an
//! event id to its position (for idempotent appends). It is rebuilt on open from the last
//! checkpoint plus the log written after it, so open time depends on the tail since the
//! last checkpoint, not on the length of the log.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
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
    pub(crate) ids: Ids,
    /// Position the next event will get.
    pub(crate) next_position: u64,
}

/// How many maps the id index is split into, by hash. A map that outgrows its table moves
/// every entry to a bigger one while the writer holds the index; split 64 ways, such a move
/// takes 1/64 of the time a single map's would, so no append waits for a rehash of the
/// whole log's ids.
const ID_SHARDS: usize = 64;

/// The positions of the stored event ids, by [`id_hash`], split into [`ID_SHARDS`] maps.
pub(crate) struct Ids {
    shards: Box<[HashMap<u64, IdSlot, IdHashState>]>,
}

impl Default for Ids {
    fn default() -> Self {
        Ids {
            shards: (0..ID_SHARDS).map(|_| HashMap::default()).collect(),
        }
    }
}

impl Ids {
    /// Positions whose id hashes to `hash`.
    pub(crate) fn candidates(&self, hash: u64) -> &[u64] {
        match self.shards[shard_of(hash)].get(&hash) {
            None => &[],
            Some(IdSlot::One(position)) => std::slice::from_ref(position),
            Some(IdSlot::Many(positions)) => positions,
        }
    }

    /// Records that the event at `position` has an id hashing to `hash`.
    pub(crate) fn insert(&mut self, hash: u64, position: u64) {
        use std::collections::hash_map::Entry;
        match self.shards[shard_of(hash)].entry(hash) {
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

    /// Makes room for `additional` more ids, spread evenly over the shards.
    fn reserve(&mut self, additional: usize) {
        for shard in &mut self.shards {
            shard.reserve(additional / ID_SHARDS);
        }
    }
}

/// The shard of an id hash: bits that neither the in-shard table index (low bits) nor its
/// control tags (top 7 bits) use, so that every shard is still spread evenly.
fn shard_of(hash: u64) -> usize {
    (mix(hash) >> 32) as usize % ID_SHARDS
}

/// A cheap bijective mix of a 64-bit hash (the finaliser of MurmurHash3), so that every
/// bit of the FNV-1a hash influences the bits a table uses.
fn mix(mut hash: u64) -> u64 {
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    hash ^ (hash >> 33)
}

/// Hashes the id maps' keys, which are already hashes ([`id_hash`]), with [`mix`] rather
/// than SipHash: they are not chosen by an attacker in any way SipHash would help against,
/// since a collision only costs an extra comparison of stored ids.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct IdHashState;

/// The [`Hasher`] of [`IdHashState`].
#[derive(Debug, Default)]
pub(crate) struct IdHasher(u64);

impl BuildHasher for IdHashState {
    type Hasher = IdHasher;
    fn build_hasher(&self) -> IdHasher {
        IdHasher(0)
    }
}

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys are hashed; this keeps any other use correct, if slower.
        for byte in bytes {
            self.0 = mix(self.0 ^ u64::from(*byte));
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = mix(self.0 ^ value);
    }

    fn finish(&self) -> u64 {
        self.0
    }
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
        // The name is cloned only for a new stream, not for every event.
        let state = match self.streams.get_mut(stream) {
            Some(state) => state,
            None => self.streams.entry(stream.clone()).or_default(),
        };
        assert_eq!(
            state.positions.len() as u64,
            version,
            "stream versions are contiguous"
        );
        state.positions.push(position);
        state.deleted = false;
        self.ids.insert(id_hash, position);
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
///
/// Encoding a checkpoint reads the whole index, which grows with the log; the writer must
/// not wait for that. So the writer only takes a [`Cut`] — the position everything below
/// is synced and the few fields that may still change below it (segment lengths, stream
/// deletion marks) — and the encoding runs on another thread, reading the rest from the
/// live index in slices under short holds of its lock. That is sound because the index
/// only ever grows above the cut: the locations, stream positions and ids of the events
/// below it never change.
pub(crate) mod checkpoint {
    use parking_lot::RwLock;

    use super::*;

    pub(crate) const FILE_NAME: &str = "index.ckpt";
    const MAGIC: &[u8; 8] = b"HRLDIDX1";

    /// Entries (locations or stream positions) copied per hold of the index lock while
    /// encoding, so that an append never waits long for a checkpoint: the writer takes the
    /// lock once per append, so a group of many appends may wait for as many holds.
    const SLICE_ENTRIES_MAX: usize = 4_096;

    /// The index without its file handles, as read from a checkpoint.
    pub(crate) struct Snapshot {
        pub(crate) next_position: u64,
        pub(crate) segments: Vec<(u64, u64, Vec<Loc>)>,
        pub(crate) streams: HashMap<StreamName, StreamState>,
        pub(crate) ids: Ids,
    }

    /// What a checkpoint covers: the events below `next_position`.
    pub(crate) struct Cut {
        next_position: u64,
        /// Per segment: its base, the bytes and the events covered.
        segments: Vec<(u64, u64, usize)>,
        /// Per stream: its name, `visible_from`, `deleted`, and the events covered.
        streams: Vec<(StreamName, u64, bool, usize)>,
    }

    impl Cut {
        /// The cut of `index` as it is: the caller MUST hold it at a moment when every
        /// event and deletion in it is synced (between two groups of the writer).
        pub(crate) fn of(index: &Index) -> Cut {
            let next_position = index.next_position;
            Cut {
                next_position,
                segments: index
                    .segments
                    .iter()
                    .map(|segment| (segment.base, segment.len, segment.locs.len()))
                    .collect(),
                streams: index
                    .streams
                    .iter()
                    .map(|(name, state)| {
                        let count = state
                            .positions
                            .partition_point(|&position| position < next_position);
                        (name.clone(), state.visible_from, state.deleted, count)
                    })
                    .collect(),
            }
        }
    }

    /// The checkpoint of `cut`, read from `index` (which may have grown since the cut);
    /// `None` if the index does not hold exactly one id per event below the cut, which
    /// would be a bug: no checkpoint is better than a wrong one.
    pub(crate) fn encode(cut: &Cut, index: &RwLock<Index>) -> Option<Vec<u8>> {
        let events = usize::try_from(cut.next_position).unwrap_or(usize::MAX);
        let mut out = Vec::with_capacity(64usize.saturating_add(events.saturating_mul(32)));
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&cut.next_position.to_le_bytes());
        out.extend_from_slice(&(cut.segments.len() as u32).to_le_bytes());
        for (at, &(base, len, count)) in cut.segments.iter().enumerate() {
            out.extend_from_slice(&base.to_le_bytes());
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(&(count as u32).to_le_bytes());
            for start in (0..count).step_by(SLICE_ENTRIES_MAX) {
                let end = (start + SLICE_ENTRIES_MAX).min(count);
                let index = index.read();
                for loc in &index.segments.get(at)?.locs[start..end] {
                    out.extend_from_slice(&loc.offset.to_le_bytes());
                    out.extend_from_slice(&loc.len.to_le_bytes());
                }
            }
        }
        out.extend_from_slice(&(cut.streams.len() as u32).to_le_bytes());
        for (name, visible_from, deleted, count) in &cut.streams {
            out.extend_from_slice(&(name.as_str().len() as u16).to_le_bytes());
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(&visible_from.to_le_bytes());
            out.push(u8::from(*deleted));
            out.extend_from_slice(&(*count as u64).to_le_bytes());
            for start in (0..*count).step_by(SLICE_ENTRIES_MAX) {
                let end = (start + SLICE_ENTRIES_MAX).min(*count);
                let index = index.read();
                for position in &index.streams.get(name)?.positions[start..end] {
                    out.extend_from_slice(&position.to_le_bytes());
                }
            }
        }
        let id_count_at = out.len();
        out.extend_from_slice(&0u64.to_le_bytes());
        let mut id_count = 0u64;
        // One shard per hold of the lock: a map cannot be walked across holds, as an
        // insert in between may move its entries.
        for shard in 0..ID_SHARDS {
            let index = index.read();
            for (hash, slot) in &index.ids.shards[shard] {
                let positions = match slot {
                    IdSlot::One(position) => std::slice::from_ref(position),
                    IdSlot::Many(positions) => positions.as_slice(),
                };
                for &position in positions {
                    if position < cut.next_position {
                        out.extend_from_slice(&hash.to_le_bytes());
                        out.extend_from_slice(&position.to_le_bytes());
                        id_count += 1;
                    }
                }
            }
        }
        if id_count != cut.next_position {
            debug_assert_eq!(id_count, cut.next_position, "one id per event");
            return None;
        }
        out[id_count_at..id_count_at + 8].copy_from_slice(&id_count.to_le_bytes());
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        Some(out)
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
        let mut ids = Ids::default();
        ids.reserve((id_count as usize).min(body.len() / 16));
        for _ in 0..id_count {
            let hash = reader.u64()?;
            let position = reader.u64()?;
            ids.insert(hash, position);
        }
        if !reader.0.is_empty() {
            return None;
        }
        Some(Snapshot {
            next_position,
            segments,
            streams,
            ids,
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use parking_lot::RwLock;

    use super::*;
    use crate::io::Io;
    use crate::io::sim::SimIo;

    fn segment(io: &SimIo, base: u64) -> Segment {
        let path = PathBuf::from(format!("/log/{base:020}.log"));
        Segment {
            base,
            file: io.open(&path, true).unwrap(),
            path,
            locs: Vec::new(),
            len: 0,
        }
    }

    /// The id hash of the event at `position`: those of every third event collide in
    /// pairs, so that `IdSlot::Many` is covered.
    fn hash_of(position: u64) -> u64 {
        if position.is_multiple_of(3) {
            position / 6
        } else {
            id_hash(&format!("id-{position}"))
        }
    }

    /// Appends `count` events, alternating between two streams.
    fn append(index: &mut Index, count: u64) {
        for _ in 0..count {
            let position = index.next_position;
            let name = if position.is_multiple_of(2) {
                "even"
            } else {
                "odd"
            };
            let stream = StreamName::new(name).unwrap();
            let version = index.streams.get(&stream).map_or(0, |s| s.positions.len()) as u64;
            let hash = hash_of(position);
            let offset = index.segments.last().unwrap().len as u32;
            index.insert_event(&stream, version, hash, Loc { offset, len: 100 });
        }
    }

    #[test]
    fn a_checkpoint_covers_exactly_the_events_below_its_cut() {
        let io = SimIo::new();
        io.create_dir_all(Path::new("/log")).unwrap();
        let index = RwLock::new(Index::default());
        index.write().segments.push(segment(&io, 0));
        append(&mut index.write(), 70);
        index.write().segments.push(segment(&io, 70));
        append(&mut index.write(), 30);
        let deleted = StreamName::new("odd").unwrap();
        index.write().insert_deletion(&deleted, 3000, 50);
        let cut = checkpoint::Cut::of(&index.read());

        // The log goes on after the cut: more events, a new segment, a new stream, and
        // the deleted stream written to again.
        append(&mut index.write(), 25);
        index.write().segments.push(segment(&io, 125));
        append(&mut index.write(), 10);
        let late = StreamName::new("late").unwrap();
        index.write().insert_event(
            &late,
            0,
            id_hash("late"),
            Loc {
                offset: 1000,
                len: 1,
            },
        );

        let bytes = checkpoint::encode(&cut, &index).expect("one id per event");
        let snapshot = checkpoint::decode(&bytes).expect("it decodes");
        assert_eq!(snapshot.next_position, 100);
        let segments: Vec<(u64, u64, usize)> = snapshot
            .segments
            .iter()
            .map(|(base, len, locs)| (*base, *len, locs.len()))
            .collect();
        assert_eq!(segments, [(0, 7000, 70), (70, 3050, 30)]);
        let index = index.read();
        assert_eq!(snapshot.segments[1].2[..], index.segments[1].locs[..30]);
        assert_eq!(snapshot.streams.len(), 2);
        for (name, state) in &snapshot.streams {
            let now = &index.streams[name];
            assert_eq!(state.positions[..], now.positions[..50]);
            assert_eq!(state.deleted, name == &deleted);
        }
        for position in 0..100u64 {
            let hash = hash_of(position);
            let expected: Vec<u64> = index
                .ids
                .candidates(hash)
                .iter()
                .copied()
                .filter(|&other| other < 100)
                .collect();
            assert_eq!(
                snapshot.ids.candidates(hash),
                expected,
                "position {position}"
            );
        }
        assert!(snapshot.ids.candidates(id_hash("late")).is_empty());
    }

    #[test]
    fn ids_sharing_a_hash_keep_every_position() {
        let mut ids = Ids::default();
        for position in 0..1000 {
            ids.insert(position % 10, position);
        }
        for hash in 0..10 {
            let expected: Vec<u64> = (0..100).map(|n| n * 10 + hash).collect();
            assert_eq!(ids.candidates(hash), expected);
        }
        assert!(ids.candidates(10).is_empty());
        // The shards are all used.
        assert!(ids.shards.iter().filter(|shard| !shard.is_empty()).count() > 1);
    }
}
