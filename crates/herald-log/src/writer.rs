//! The writer thread: the only code that mutates the log.
//!
//! It takes the first queued request, gathers every other request already waiting (up to
//! `group_commit_bytes_max`), checks and frames them all, writes them in one go, syncs once,
//! and only then makes them visible and acknowledges them (group commit). While it syncs,
//! new requests queue up and form the next group, so the more concurrent writers there
//! are, the more events each sync carries.
//!
//! If a write or a sync fails, nothing of the group is acknowledged, every waiting caller
//! gets the error, and the log accepts no more writes: after a failed `fsync` the kernel may
//! have dropped the unsynced pages and a retried sync could falsely succeed (PostgreSQL's
//! "fsyncgate"), so the only safe recovery is to reopen, which re-reads what is on disk.

use std::path::PathBuf;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use herald_core::store::{AppendedEvent, Error};
use herald_core::{Appended, Event, ExpectedVersion, RecordedEvent, StreamName, Version};
use tokio::sync::{mpsc, oneshot};

use crate::index::{Index, Loc, Segment, checkpoint};
use crate::record::{Kind, Record};
use crate::{Durability, Shared, cache, read};

/// What callers ask of the writer.
pub(crate) enum Request {
    Append {
        append: Append,
        reply: oneshot::Sender<Result<Placed, Error>>,
    },
    Delete {
        stream: StreamName,
        expected: ExpectedVersion,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    Close {
        reply: oneshot::Sender<()>,
    },
}

/// An append, validated and serialised by the caller, so that the single writer thread only
/// checks, frames, writes and syncs.
pub(crate) struct Append {
    pub(crate) stream: StreamName,
    pub(crate) expected: ExpectedVersion,
    pub(crate) ids: Vec<String>,
    /// The [`id_hash`](crate::index::id_hash) of each id.
    pub(crate) id_hashes: Vec<u64>,
    /// The events in JSON structured format.
    pub(crate) payloads: Payloads,
    /// The events themselves, for the read cache; empty when it keeps nothing.
    pub(crate) events: Vec<Event>,
}

/// Where an append went; the caller turns it into an [`Appended`], so that the writer does
/// not build results.
pub(crate) enum Placed {
    /// Stored at consecutive versions and positions from these.
    New {
        ids: Vec<String>,
        first_version: u64,
        first_position: u64,
    },
    /// An idempotent retry, answered with what the first append stored.
    Retry(Appended),
}

impl Placed {
    pub(crate) fn into_appended(self) -> Appended {
        match self {
            Placed::New {
                ids,
                first_version,
                first_position,
            } => Appended {
                events: ids
                    .into_iter()
                    .zip(0u64..)
                    .map(|(id, i)| AppendedEvent {
                        id,
                        version: Version(first_version + i),
                        position: herald_core::Position(first_position + i),
                    })
                    .collect(),
            },
            Placed::Retry(appended) => appended,
        }
    }
}

/// The JSON documents of one append, back to back in one buffer: one allocation per append
/// rather than one (and its regrowths) per event.
pub(crate) struct Payloads {
    bytes: Vec<u8>,
    /// Where each document ends in `bytes`.
    ends: Vec<usize>,
}

impl Payloads {
    /// The documents of `events`, each exactly as [`Event::to_json`] writes it.
    pub(crate) fn of(events: &[Event]) -> Payloads {
        let mut payloads = Payloads {
            bytes: Vec::new(),
            ends: Vec::with_capacity(events.len()),
        };
        for event in events {
            serde_json::to_writer(&mut payloads.bytes, event)
                .expect("an event always serialises to JSON");
            if payloads.ends.is_empty() {
                // Events of one append tend to be alike: size the buffer on the first.
                payloads
                    .bytes
                    .reserve(payloads.bytes.len() * (events.len() - 1));
            }
            payloads.ends.push(payloads.bytes.len());
        }
        payloads
    }

    /// The documents, in order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &[u8]> {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts
            .zip(&self.ends)
            .map(|(start, &end)| &self.bytes[start..end])
    }
}

pub(crate) fn spawn(shared: Arc<Shared>, requests: mpsc::Receiver<Request>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("herald-log-writer".to_owned())
        .spawn(move || Writer::new(shared).run(requests))?;
    Ok(())
}

struct Writer {
    shared: Arc<Shared>,
    events_since_checkpoint: u64,
    /// The checkpoint being written in the background, if any.
    checkpointing: Option<std::thread::JoinHandle<()>>,
}

/// Requests checked and framed, waiting for the group's write and sync.
#[derive(Default)]
struct Group {
    /// Bytes to write: (segment index, file offset, bytes).
    chunks: Vec<(usize, u64, Vec<u8>)>,
    bytes: u64,
    replies: Vec<Reply>,
    /// The group's events for the read cache, in position order.
    cached: Vec<cache::Entry>,
}

enum Reply {
    Append(oneshot::Sender<Result<Placed, Error>>, Placed),
    Delete(oneshot::Sender<Result<(), Error>>),
    /// A rejected append or delete, answered with the group rather than at once: a conflict
    /// may be with an append of this very group, and a caller told "wrong expected version"
    /// must find the stream as the conflict saw it when it reads next.
    RejectedAppend(oneshot::Sender<Result<Placed, Error>>, Error),
    RejectedDelete(oneshot::Sender<Result<(), Error>>, Error),
}

impl Writer {
    fn new(shared: Arc<Shared>) -> Self {
        Writer {
            shared,
            events_since_checkpoint: 0,
            checkpointing: None,
        }
    }

    fn run(mut self, mut requests: mpsc::Receiver<Request>) {
        let mut closing = None;
        while closing.is_none() {
            let Some(first) = requests.blocking_recv() else {
                break;
            };
            let mut group = Group::default();
            closing = self.take(first, &mut group);
            while closing.is_none() && group.bytes < self.shared.options.group_commit_bytes_max {
                match requests.try_recv() {
                    Ok(request) => closing = self.take(request, &mut group),
                    Err(_) => break,
                }
            }
            self.commit(group);
            if self.events_since_checkpoint >= self.shared.options.index_checkpoint_interval_events
            {
                self.checkpoint(false);
            }
        }
        // Answer what is still queued rather than leave callers waiting.
        requests.close();
        while let Ok(request) = requests.try_recv() {
            reject(request, || Error::Closed);
        }
        if self.events_since_checkpoint > 0 || self.checkpointing.is_some() {
            self.checkpoint(true);
        }
        if let Some(reply) = closing {
            let _ = reply.send(());
        }
    }

    /// Checks and frames one request into the group; returns the reply channel of a
    /// close request.
    fn take(&mut self, request: Request, group: &mut Group) -> Option<oneshot::Sender<()>> {
        if let Some(error) = self.shared.failed.lock().clone() {
            reject(request, || Error::Failed(error.clone()));
            return None;
        }
        match request {
            Request::Append { append, reply } => {
                match self.frame_append(&append, group) {
                    Ok(framed) => {
                        let Append {
                            stream,
                            ids,
                            payloads,
                            events,
                            ..
                        } = append;
                        let recorded_at =
                            DateTime::<Utc>::from_timestamp_micros(framed.recorded_at_us)
                                .unwrap_or_default();
                        for ((event, json), i) in
                            events.into_iter().zip(payloads.iter()).zip(0u64..)
                        {
                            group.cached.push(cache::Entry {
                                event: RecordedEvent {
                                    stream: stream.clone(),
                                    version: Version(framed.first_version + i),
                                    position: herald_core::Position(framed.first_position + i),
                                    recorded_at,
                                    event,
                                },
                                json_bytes: json.len() as u64,
                            });
                        }
                        let placed = Placed::New {
                            ids,
                            first_version: framed.first_version,
                            first_position: framed.first_position,
                        };
                        group.replies.push(Reply::Append(reply, placed));
                    }
                    // An idempotent retry: answered at once with what the first append stored.
                    Err(FrameError::Retry(appended)) => {
                        let _ = reply.send(Ok(Placed::Retry(appended)));
                    }
                    Err(FrameError::Rejected(error)) => {
                        group.replies.push(Reply::RejectedAppend(reply, error));
                    }
                }
            }
            Request::Delete {
                stream,
                expected,
                reply,
            } => match self.frame_delete(&stream, expected, group) {
                Ok(()) => group.replies.push(Reply::Delete(reply)),
                Err(error) => group.replies.push(Reply::RejectedDelete(reply, error)),
            },
            Request::Close { reply } => return Some(reply),
        }
        None
    }

    /// Checks an append and frames it into the group.
    fn frame_append(&mut self, append: &Append, group: &mut Group) -> Result<Framed, FrameError> {
        let Append {
            stream,
            expected,
            ids,
            id_hashes,
            payloads,
            ..
        } = append;
        let expected = *expected;
        // An append whose ids are all new — the usual case — cannot be a retry: one lookup
        // per id tells, and the costlier checks below are skipped.
        let seen = {
            let index = self.shared.index.read();
            id_hashes
                .iter()
                .any(|&hash| !index.ids.candidates(hash).is_empty())
        };
        // Checking a retry reads stored records; commit first if one may be pending.
        if seen && self.may_repeat_pending(id_hashes) {
            self.commit(std::mem::take(group));
        }
        // Pending (unsynced) events of this group count: they commit or fail together.
        let pending_head = u64::MAX;
        let (current, next_version) = {
            let index = self.shared.index.read();
            let state = index.streams.get(stream);
            let current = state
                .and_then(|state| state.last_version(pending_head))
                .map(Version);
            if seen && let Some(retry) = self.retry_of(&index, stream, expected, ids, id_hashes)? {
                return Err(FrameError::Retry(retry));
            }
            (
                current,
                state.map_or(0, |state| state.positions.len() as u64),
            )
        };
        if !expected.admits(current) {
            return Err(FrameError::Rejected(Error::WrongExpectedVersion {
                stream: stream.clone(),
                expected,
                actual: current,
            }));
        }
        let size: u64 = payloads
            .iter()
            .map(|payload| {
                (crate::record::HEADER_LEN + stream.as_str().len() + payload.len()) as u64
            })
            .sum();
        let (segment, mut offset) = self.room_for(size, group).map_err(FrameError::Rejected)?;
        let recorded_at_us = chrono::Utc::now().timestamp_micros();
        // Only this thread moves the next position, so it holds until the insert below.
        let first_position = self.shared.index.read().next_position;
        // Framed straight into the group's buffer: no copy of the records per append. The
        // encoding happens outside the index lock, which is taken only for the inserts, so
        // that readers wait for it as little as possible.
        let bytes = group.buffer_at(segment, offset, size);
        let mut locs = Vec::with_capacity(ids.len());
        for (i, payload) in payloads.iter().enumerate() {
            let start = bytes.len();
            Record {
                kind: Kind::Event,
                batch_left: (ids.len() - 1 - i) as u32,
                position: first_position + i as u64,
                version: next_version + i as u64,
                recorded_at_us,
                stream: stream.as_str(),
                payload,
            }
            .encode_into(bytes);
            let len = (bytes.len() - start) as u32;
            locs.push(Loc {
                offset: offset as u32,
                len,
            });
            offset += u64::from(len);
        }
        let mut index = self.shared.index.write();
        debug_assert_eq!(index.next_position, first_position);
        for ((&id_hash, loc), version) in id_hashes.iter().zip(locs).zip(next_version..) {
            index.insert_event(stream, version, id_hash, loc);
        }
        drop(index);
        group.bytes += size;
        self.events_since_checkpoint += ids.len() as u64;
        Ok(Framed {
            first_version: next_version,
            first_position,
            recorded_at_us,
        })
    }

    /// Whether an id may already be stored by an event of the group not yet written.
    fn may_repeat_pending(&self, id_hashes: &[u64]) -> bool {
        let head = *self.shared.head.borrow();
        let index = self.shared.index.read();
        index.next_position > head
            && id_hashes.iter().any(|&hash| {
                index
                    .ids
                    .candidates(hash)
                    .iter()
                    .any(|&position| position >= head)
            })
    }

    /// If `ids` were all stored by one earlier append to `stream` under an expectation
    /// that `expected` also describes, that append's result; an error if some id is stored
    /// otherwise; `None` if no id is stored.
    fn retry_of(
        &self,
        index: &Index,
        stream: &StreamName,
        expected: ExpectedVersion,
        ids: &[String],
        id_hashes: &[u64],
    ) -> Result<Option<Appended>, FrameError> {
        let mut found = Vec::with_capacity(ids.len());
        for (id, &hash) in ids.iter().zip(id_hashes) {
            let stored = index
                .ids
                .candidates(hash)
                .iter()
                .copied()
                .find(|&position| {
                    read::event_id_at(index, position).as_deref() == Some(id.as_str())
                });
            found.push(stored);
        }
        let Some(first_stored) = found.iter().position(Option::is_some) else {
            return Ok(None);
        };
        let duplicate = |at: usize| {
            let position = found[at].expect("found");
            let (stream, version) = read::stream_and_version_at(index, position)
                .unwrap_or_else(|| (stream.clone(), Version(0)));
            FrameError::Rejected(Error::DuplicateEventId {
                id: ids[at].clone(),
                stream,
                version,
            })
        };
        let Some(positions) = found.iter().copied().collect::<Option<Vec<u64>>>() else {
            return Err(duplicate(first_stored));
        };
        // The same append again: contiguous positions in this stream forming exactly one
        // stored batch (the first starts a batch, the last ends it).
        let contiguous = positions.windows(2).all(|pair| pair[1] == pair[0] + 1);
        let Some(state) = index.streams.get(stream) else {
            return Err(duplicate(0));
        };
        let Some(first_version) = state.positions.iter().position(|&p| p == positions[0]) else {
            return Err(duplicate(0));
        };
        let first_version = first_version as u64;
        let same_batch = contiguous
            && state
                .positions
                .get(first_version as usize..first_version as usize + positions.len())
                == Some(positions.as_slice())
            && read::starts_batch(index, positions[0])
            && read::batch_left_at(index, positions[positions.len() - 1]) == Some(0);
        let expectation_held = match expected {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoStream => first_version == 0 || first_version == state.visible_from,
            ExpectedVersion::StreamExists => first_version > 0,
            ExpectedVersion::Exact(Version(version)) => first_version == version + 1,
        };
        if !same_batch || !expectation_held {
            return Err(duplicate(0));
        }
        Ok(Some(Appended {
            events: ids
                .iter()
                .zip(&positions)
                .enumerate()
                .map(|(i, (id, &position))| AppendedEvent {
                    id: id.clone(),
                    version: Version(first_version + i as u64),
                    position: herald_core::Position(position),
                })
                .collect(),
        }))
    }

    fn frame_delete(
        &mut self,
        stream: &StreamName,
        expected: ExpectedVersion,
        group: &mut Group,
    ) -> Result<(), Error> {
        // The expectation is checked first, as for an append; then the stream must exist.
        let (current, last) = {
            let index = self.shared.index.read();
            let state = index.streams.get(stream);
            (
                state
                    .and_then(|state| state.last_version(u64::MAX))
                    .map(Version),
                state.and_then(|state| state.positions.len().checked_sub(1)),
            )
        };
        if !expected.admits(current) {
            return Err(Error::WrongExpectedVersion {
                stream: stream.clone(),
                expected,
                actual: current,
            });
        }
        let last = match (current, last) {
            (Some(_), Some(last)) => last as u64,
            (None, Some(_)) => {
                return Err(Error::StreamDeleted {
                    stream: stream.clone(),
                });
            }
            (_, None) => {
                return Err(Error::StreamNotFound {
                    stream: stream.clone(),
                });
            }
        };
        let size = (crate::record::HEADER_LEN + stream.as_str().len()) as u64;
        let (segment, offset) = self.room_for(size, group)?;
        let mut bytes = Vec::with_capacity(size as usize);
        let mut index = self.shared.index.write();
        Record {
            kind: Kind::StreamDeleted,
            batch_left: 0,
            position: index.next_position,
            version: last,
            recorded_at_us: chrono::Utc::now().timestamp_micros(),
            stream: stream.as_str(),
            payload: &[],
        }
        .encode_into(&mut bytes);
        index.insert_deletion(stream, offset as u32, bytes.len() as u32);
        drop(index);
        group.add(segment, offset, bytes);
        Ok(())
    }

    /// The segment (index) and offset where `size` more bytes go. When the current segment
    /// would grow past its limit, the group so far is committed and the segment synced
    /// before a new one is started, so only the last segment can ever have a torn tail.
    fn room_for(&mut self, size: u64, group: &mut Group) -> Result<(usize, u64), Error> {
        {
            let index = self.shared.index.read();
            let last = index.segments.len() - 1;
            let segment = &index.segments[last];
            if segment.len == 0 || segment.len + size <= self.shared.options.segment_size_max_bytes
            {
                return Ok((last, segment.len));
            }
        }
        self.commit(std::mem::take(group));
        if let Some(error) = self.shared.failed.lock().clone() {
            return Err(Error::Failed(error));
        }
        let (old, base) = {
            let index = self.shared.index.read();
            (
                index.segments[index.segments.len() - 1].file.clone(),
                index.next_position,
            )
        };
        let path = segment_path(&self.shared.options.data_dir, base);
        let file = old
            .sync_data()
            .and_then(|()| self.shared.io.open(&path, true))
            .and_then(|file| {
                self.shared
                    .io
                    .sync_dir(&self.shared.options.data_dir)
                    .map(|()| file)
            })
            .map_err(|error| self.fail(error))?;
        let mut index = self.shared.index.write();
        index.segments.push(Segment {
            base,
            path,
            file,
            locs: Vec::new(),
            len: 0,
        });
        Ok((index.segments.len() - 1, 0))
    }

    /// Writes and syncs the group, then publishes and acknowledges it.
    fn commit(&mut self, group: Group) {
        if group.replies.is_empty() {
            return;
        }
        let failed = self.shared.failed.lock().clone();
        let result = match failed {
            Some(error) => Err(Error::Failed(error)),
            None if group.chunks.is_empty() => Ok(()),
            None => self
                .write_and_sync(&group)
                .map_err(|error| self.fail(error)),
        };
        if let Err(error) = result {
            for reply in group.replies {
                match reply {
                    Reply::Append(reply, _) => {
                        let _ = reply.send(Err(clone_error(&error)));
                    }
                    Reply::Delete(reply) => {
                        let _ = reply.send(Err(clone_error(&error)));
                    }
                    // A rejection holds whatever became of the group.
                    Reply::RejectedAppend(reply, rejection) => {
                        let _ = reply.send(Err(rejection));
                    }
                    Reply::RejectedDelete(reply, rejection) => {
                        let _ = reply.send(Err(rejection));
                    }
                }
            }
            return;
        }
        // Cached before the head moves, so that the readers it wakes find them there.
        self.shared.cache.extend(group.cached);
        let head = self.shared.index.read().next_position;
        self.shared.head.send_replace(head);
        for reply in group.replies {
            match reply {
                Reply::Append(reply, appended) => {
                    let _ = reply.send(Ok(appended));
                }
                Reply::Delete(reply) => {
                    let _ = reply.send(Ok(()));
                }
                Reply::RejectedAppend(reply, rejection) => {
                    let _ = reply.send(Err(rejection));
                }
                Reply::RejectedDelete(reply, rejection) => {
                    let _ = reply.send(Err(rejection));
                }
            }
        }
    }

    fn write_and_sync(&self, group: &Group) -> std::io::Result<()> {
        let files: Vec<_> = {
            let index = self.shared.index.read();
            group
                .chunks
                .iter()
                .map(|(segment, _, _)| index.segments[*segment].file.clone())
                .collect()
        };
        for ((_, offset, bytes), file) in group.chunks.iter().zip(&files) {
            file.write_at(bytes, *offset)?;
        }
        if self.shared.options.durability == Durability::Fsync {
            let mut synced: Vec<usize> = Vec::new();
            for ((segment, _, _), file) in group.chunks.iter().zip(&files) {
                if !synced.contains(segment) {
                    file.sync_data()?;
                    synced.push(*segment);
                }
            }
        }
        Ok(())
    }

    /// Marks the log failed; returns the error for the callers.
    fn fail(&self, error: std::io::Error) -> Error {
        tracing::error!(error = %error, "the log failed to write or sync; it accepts no more writes until reopened");
        let error = Arc::new(error);
        *self.shared.failed.lock() = Some(error.clone());
        Error::Failed(error)
    }

    /// Persists the index so the next open replays only what follows.
    fn checkpoint(&mut self, wait: bool) {
        if self.shared.failed.lock().is_some() {
            return;
        }
        // One checkpoint at a time: while one is being written, later ones are skipped,
        // except the last one on close, which waits for it.
        if let Some(running) = self.checkpointing.take() {
            if !wait && !running.is_finished() {
                self.checkpointing = Some(running);
                return;
            }
            let _ = running.join();
        }
        // A checkpoint must only cover synced records; without per-append syncs, sync the
        // last segment first (earlier ones were synced when they were closed).
        if self.shared.options.durability == Durability::Os {
            let last = self
                .shared
                .index
                .read()
                .segments
                .last()
                .map(|segment| segment.file.clone());
            if let Some(Err(error)) = last.map(|file| file.sync_data()) {
                self.fail(error);
                return;
            }
        }
        // Cut here, between groups, so it covers exactly the synced events; encoded and
        // written on another thread so appends do not wait for it.
        let cut = checkpoint::Cut::of(&self.shared.index.read());
        self.events_since_checkpoint = 0;
        let shared = self.shared.clone();
        let write = move || {
            let Some(bytes) = checkpoint::encode(&cut, &shared.index) else {
                tracing::error!("the index does not hold one id per event: checkpoint skipped");
                return;
            };
            if let Err(error) =
                write_checkpoint(shared.io.as_ref(), &shared.options.data_dir, &bytes)
            {
                // Not fatal: the log is intact, the next open just replays more of it.
                tracing::warn!(error = %error, "writing the index checkpoint failed");
            }
        };
        if wait {
            write();
            return;
        }
        match std::thread::Builder::new()
            .name("herald-log-checkpoint".to_owned())
            .spawn(write)
        {
            Ok(handle) => self.checkpointing = Some(handle),
            Err(error) => tracing::warn!(error = %error, "could not start the checkpoint thread"),
        }
    }
}

impl Group {
    fn add(&mut self, segment: usize, offset: u64, bytes: Vec<u8>) {
        self.buffer_at(segment, offset, bytes.len() as u64)
            .extend_from_slice(&bytes);
        self.bytes += bytes.len() as u64;
    }

    /// The buffer whose next byte goes to `offset` in `segment`, with room for `size`
    /// more: the last chunk when the bytes continue it, else a new one.
    fn buffer_at(&mut self, segment: usize, offset: u64, size: u64) -> &mut Vec<u8> {
        let continues = matches!(
            self.chunks.last(),
            Some((last, start, chunk)) if *last == segment && *start + chunk.len() as u64 == offset
        );
        if !continues {
            self.chunks.push((segment, offset, Vec::new()));
        }
        let (_, _, chunk) = self.chunks.last_mut().expect("a chunk was just ensured");
        chunk.reserve(size as usize);
        chunk
    }
}

/// Where [`Writer::frame_append`] put an append.
struct Framed {
    first_version: u64,
    first_position: u64,
    recorded_at_us: i64,
}

enum FrameError {
    Retry(Appended),
    Rejected(Error),
}

fn write_checkpoint(
    io: &dyn crate::io::Io,
    dir: &std::path::Path,
    bytes: &[u8],
) -> std::io::Result<()> {
    let temporary = dir.join(format!("{}.tmp", checkpoint::FILE_NAME));
    let file = io.open(&temporary, true)?;
    file.set_len(0)?;
    file.write_at(bytes, 0)?;
    file.sync_data()?;
    io.rename(&temporary, &dir.join(checkpoint::FILE_NAME))?;
    io.sync_dir(dir)
}

pub(crate) fn segment_path(dir: &std::path::Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.log"))
}

fn reject(request: Request, error: impl Fn() -> Error) {
    match request {
        Request::Append { reply, .. } => {
            let _ = reply.send(Err(error()));
        }
        Request::Delete { reply, .. } => {
            let _ = reply.send(Err(error()));
        }
        Request::Close { reply } => {
            let _ = reply.send(());
        }
    }
}

fn clone_error(error: &Error) -> Error {
    match error {
        Error::Failed(source) => Error::Failed(source.clone()),
        _ => Error::Closed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_the_events_json() {
        let events: Vec<Event> = (0..5)
            .map(|n| {
                Event::new("/test", "Tested")
                    .with_subject(format!("subject-{n}"))
                    .with_data(serde_json::json!({ "n": n, "text": "é\"\n".repeat(n) }))
            })
            .collect();
        let payloads = Payloads::of(&events);
        let expected: Vec<Vec<u8>> = events.iter().map(Event::to_json).collect();
        let actual: Vec<Vec<u8>> = payloads.iter().map(<[u8]>::to_vec).collect();
        assert_eq!(actual, expected);
    }
}
