//! Opening the log: load the index checkpoint, replay the log after it, repair a torn tail.
//!
//! Recovery rules (also in `docs/log-format.md`):
//!
//! 1. Segments are the files `<base>.log` (20 digits: the position of their first event);
//!    the first event of each MUST carry its base position and positions MUST continue
//!    without a gap from one segment to the next.
//! 2. The checkpoint `index.ckpt` is used if its CRC holds and every segment it lists
//!    exists and is at least as long as it says; otherwise it is ignored and the whole log
//!    is replayed (slower, never wrong).
//! 3. Replay decodes records after the checkpoint. Events are applied one append at a time:
//!    the records of an append are applied only once its last record (`batch_left = 0`) is
//!    read, so a partial append is never visible.
//! 4. At the first record that does not decode, in the last segment: if no valid record
//!    follows anywhere after it, it is a torn tail — the file is truncated at the start of
//!    the incomplete append and synced. If a valid record follows, the damage is in the
//!    middle of the log and opening fails with the file and offset: nothing valid is ever
//!    dropped silently. Any such damage in an earlier segment fails the open too (a segment
//!    is synced before the next one is started, so its tail cannot be torn).

use std::path::Path;

use herald_core::StreamName;

use crate::index::{Index, Loc, Segment, checkpoint, id_hash};
use crate::io::{Io, IoFile};
use crate::record::{self, DecodeError, Kind};
use crate::writer::segment_path;
use crate::{OpenError, Options};

/// Bytes read at a time during replay.
const REPLAY_CHUNK_BYTES: usize = 8 * 1024 * 1024;

pub(crate) fn recover(options: &Options, io: &dyn Io) -> Result<Index, OpenError> {
    let dir = &options.data_dir;
    let io_error = |path: &Path| {
        let path = path.to_owned();
        move |source| OpenError::Io { path, source }
    };
    let mut bases: Vec<u64> = io
        .list(dir)
        .map_err(io_error(dir))?
        .iter()
        .filter_map(|name| name.strip_suffix(".log"))
        .filter(|stem| stem.len() == 20)
        .filter_map(|stem| stem.parse().ok())
        .collect();
    bases.sort_unstable();

    let mut index = Index::default();
    let mut replay_from = (0usize, 0u64);
    if let Some(snapshot) = load_checkpoint(io, dir, &bases) {
        for (base, len, locs) in snapshot.segments {
            index.segments.push(Segment {
                locs,
                len,
                ..open_segment(io, dir, base, false)?
            });
        }
        index.streams = snapshot.streams;
        index.ids = snapshot.ids;
        index.next_position = snapshot.next_position;
        replay_from = (
            index.segments.len() - 1,
            index.segments.last().map_or(0, |s| s.len),
        );
    }
    // Segments the checkpoint does not cover (all of them without a checkpoint).
    let covered = index.segments.last().map(|segment| segment.base);
    for &base in bases
        .iter()
        .filter(|&&base| covered.is_none_or(|covered| base > covered))
    {
        index.segments.push(open_segment(io, dir, base, false)?);
    }
    if index.segments.is_empty() {
        index.segments.push(open_segment(io, dir, 0, true)?);
        io.sync_dir(dir).map_err(io_error(dir))?;
        return Ok(index);
    }

    let (first, mut offset) = replay_from;
    let last = index.segments.len() - 1;
    for segment in first..=last {
        if offset == 0 && index.segments[segment].base != index.next_position {
            return Err(OpenError::Corrupt {
                file: index.segments[segment].path.clone(),
                offset: 0,
                reason: format!(
                    "segment starts at position {} but the previous one ends at {}",
                    index.segments[segment].base, index.next_position
                ),
            });
        }
        replay_segment(&mut index, segment, offset, segment == last)?;
        offset = 0;
    }
    // Drop a stale temporary checkpoint of an interrupted checkpoint write.
    let _ = io.remove(&dir.join(format!("{}.tmp", checkpoint::FILE_NAME)));
    Ok(index)
}

/// Opens (or creates) the segment starting at `base`, with nothing indexed yet.
fn open_segment(io: &dyn Io, dir: &Path, base: u64, create: bool) -> Result<Segment, OpenError> {
    let path = segment_path(dir, base);
    let file = io.open(&path, create).map_err(|source| OpenError::Io {
        path: path.clone(),
        source,
    })?;
    Ok(Segment {
        base,
        path,
        file,
        locs: Vec::new(),
        len: 0,
    })
}

fn load_checkpoint(io: &dyn Io, dir: &Path, bases: &[u64]) -> Option<checkpoint::Snapshot> {
    let file = io.open(&dir.join(checkpoint::FILE_NAME), false).ok()?;
    let len = file.size().ok()? as usize;
    let mut bytes = vec![0; len];
    crate::io::read_exact_at(file.as_ref(), &mut bytes, 0).ok()?;
    let Some(snapshot) = checkpoint::decode(&bytes) else {
        tracing::warn!("the index checkpoint is damaged; rebuilding the index from the whole log");
        return None;
    };
    // Every segment the checkpoint covers must still be there, at least as long.
    let consistent = !snapshot.segments.is_empty()
        && snapshot.segments.len() <= bases.len()
        && snapshot
            .segments
            .iter()
            .zip(bases)
            .all(|((base, len, _), &file_base)| {
                *base == file_base
                    && io
                        .open(&segment_path(dir, *base), false)
                        .and_then(|file| file.size())
                        .is_ok_and(|file_len| file_len >= *len)
            });
    if !consistent {
        tracing::warn!(
            "the index checkpoint does not match the segments; rebuilding the index from the whole log"
        );
        return None;
    }
    Some(snapshot)
}

/// One decoded event of an append not yet complete.
struct Pending {
    stream: StreamName,
    version: u64,
    id_hash: u64,
    loc: Loc,
}

fn replay_segment(
    index: &mut Index,
    segment: usize,
    start: u64,
    is_last: bool,
) -> Result<(), OpenError> {
    let file = index.segments[segment].file.clone();
    let path = index.segments[segment].path.clone();
    let io_error = |source| OpenError::Io {
        path: path.clone(),
        source,
    };
    let file_len = file.size().map_err(io_error)?;
    let corrupt = |offset: u64, reason: String| OpenError::Corrupt {
        file: path.clone(),
        offset,
        reason,
    };
    // Keep the segment being replayed last, so `insert_event` appends to it.
    let later = index.segments.split_off(segment + 1);
    index.segments[segment].len = start;

    let mut buf: Vec<u8> = Vec::new();
    let mut buf_offset = start; // file offset of buf[0]
    let mut at = 0usize; // decode cursor in buf
    let mut pending: Vec<Pending> = Vec::new();
    let mut batch_start = start;
    loop {
        let offset = buf_offset + at as u64;
        let damage = match record::decode(&buf[at..]) {
            Ok((record, len)) => {
                if pending.is_empty() {
                    batch_start = offset;
                }
                match record.kind {
                    Kind::Event => {
                        let expected_position = index.next_position + pending.len() as u64;
                        if record.position != expected_position {
                            return Err(corrupt(
                                offset,
                                format!(
                                    "event has position {}, expected {expected_position}",
                                    record.position
                                ),
                            ));
                        }
                        let stream = StreamName::parse_stored(record.stream)
                            .map_err(|error| corrupt(offset, error.to_string()))?;
                        #[derive(serde::Deserialize)]
                        struct IdOnly<'a> {
                            #[serde(borrow)]
                            id: std::borrow::Cow<'a, str>,
                        }
                        let id = serde_json::from_slice::<IdOnly<'_>>(record.payload).map_err(
                            |error| corrupt(offset, format!("event payload has no id: {error}")),
                        )?;
                        pending.push(Pending {
                            stream,
                            version: record.version,
                            id_hash: id_hash(&id.id),
                            loc: Loc {
                                offset: offset as u32,
                                len: len as u32,
                            },
                        });
                        if record.batch_left == 0 {
                            for event in pending.drain(..) {
                                let next_version = index
                                    .streams
                                    .get(&event.stream)
                                    .map_or(0, |s| s.positions.len() as u64);
                                if event.version != next_version {
                                    return Err(corrupt(
                                        u64::from(event.loc.offset),
                                        format!(
                                            "event has version {}, expected {next_version}",
                                            event.version
                                        ),
                                    ));
                                }
                                index.insert_event(
                                    &event.stream,
                                    event.version,
                                    event.id_hash,
                                    event.loc,
                                );
                            }
                        }
                    }
                    Kind::StreamDeleted => {
                        if !pending.is_empty() {
                            return Err(corrupt(
                                offset,
                                "deletion record inside an append".to_owned(),
                            ));
                        }
                        let stream = StreamName::parse_stored(record.stream)
                            .map_err(|error| corrupt(offset, error.to_string()))?;
                        index.insert_deletion(&stream, offset as u32, len as u32);
                    }
                }
                at += len;
                continue;
            }
            Err(DecodeError::Incomplete { needed, .. })
                if offset + (needed.max(1) as u64) <= file_len =>
            {
                // More of the file to read: refill the buffer from the cursor.
                buf.drain(..at);
                buf_offset = offset;
                at = 0;
                let want = needed
                    .max(REPLAY_CHUNK_BYTES)
                    .min((file_len - offset) as usize);
                let have = buf.len();
                buf.resize(want.max(have), 0);
                crate::io::read_exact_at(file.as_ref(), &mut buf[have..], offset + have as u64)
                    .map_err(io_error)?;
                continue;
            }
            Err(DecodeError::Incomplete { .. }) if offset == file_len => {
                if pending.is_empty() {
                    break;
                }
                "the file ends inside an append".to_owned()
            }
            Err(error) => error.to_string(),
        };
        // A record that does not decode, or an append cut short.
        if !is_last {
            return Err(corrupt(offset, damage));
        }
        if let Some(valid) =
            append_after_damage(file.as_ref(), offset + 1, file_len).map_err(io_error)?
        {
            return Err(corrupt(
                offset,
                format!("{damage}; a valid append follows at offset {valid}"),
            ));
        }
        // Cut at the start of the append the damage belongs to.
        let cut = if pending.is_empty() {
            offset
        } else {
            batch_start
        };
        tracing::warn!(
            file = %path.display(),
            offset = cut,
            bytes = file_len - cut,
            reason = %damage,
            "truncating the torn tail of the log (an append that was never acknowledged)"
        );
        file.set_len(cut).map_err(io_error)?;
        file.sync_data().map_err(io_error)?;
        index.segments[segment].len = cut;
        index.segments.extend(later);
        return Ok(());
    }
    index.segments[segment].len = buf_offset + at as u64;
    index.segments.extend(later);
    Ok(())
}

/// Whether a complete, valid append follows damage found before `from`: returns the
/// offset of the first valid record after the damage if so.
///
/// Damage is a torn tail when everything after it is either undecodable or the rest of the
/// same append: a run of valid records to the end of the file in which only the last one
/// closes an append. Damage followed by an append boundary and more records is damage in the
/// middle of the log.
fn append_after_damage(
    file: &dyn IoFile,
    from: u64,
    file_len: u64,
) -> std::io::Result<Option<u64>> {
    if from >= file_len {
        return Ok(None);
    }
    let mut rest = vec![0; (file_len - from) as usize];
    crate::io::read_exact_at(file, &mut rest, from)?;
    let Some(first_valid) = (0..rest.len()).find(|&at| record::decode(&rest[at..]).is_ok()) else {
        return Ok(None);
    };
    let mut at = first_valid;
    while let Ok((record, len)) = record::decode(&rest[at..]) {
        at += len;
        if record.batch_left == 0 {
            // An append ends here: the damage is in the tail only if nothing follows.
            return Ok((at < rest.len()).then_some(from + first_valid as u64));
        }
    }
    // The run stops inside the append the damage belongs to, which is not complete.
    Ok(None)
}
