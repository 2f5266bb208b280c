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

use herald_core::store::{AppendedEvent, Error};
use herald_core::{Appended, ExpectedVersion, StreamName, Version};
use tokio::sync::{mpsc, oneshot};

use crate::index::{Index, Loc, Segment, checkpoint, id_hash};
use crate::record::{Kind, Record};
use crate::{Durability, Shared, read};

/// What callers ask of the writer.
pub(crate) enum Request {
    Append {
        stream: StreamName,
        expected: ExpectedVersion,
        ids: Vec<String>,
        /// Each event in JSON structured format, already validated.
        payloads: Vec<Vec<u8>>,
        reply: oneshot::Sender<Result<Appended, Error>>,
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
}

enum Reply {
    Append(oneshot::Sender<Result<Appended, Error>>, Appended),
    Delete(oneshot::Sender<Result<(), Error>>),
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
            Request::Append {
                stream,
                expected,
                ids,
                payloads,
                reply,
            } => {
                // Checking a retry reads stored records; commit first if one may be pending.
                if self.may_repeat_pending(&ids) {
                    self.commit(std::mem::take(group));
                }
                match self.frame_append(&stream, expected, &ids, &payloads, group) {
                    Ok(appended) => group.replies.push(Reply::Append(reply, appended)),
                    // An idempotent retry: answered at once with what the first append stored.
                    Err(FrameError::Retry(appended)) => {
                        let _ = reply.send(Ok(appended));
                    }
                    Err(FrameError::Rejected(error)) => {
                        let _ = reply.send(Err(error));
                    }
                }
            }
            Request::Delete {
                stream,
                expected,
                reply,
            } => match self.frame_delete(&stream, expected, group) {
                Ok(()) => group.replies.push(Reply::Delete(reply)),
                Err(error) => {
                    let _ = reply.send(Err(error));
                }
            },
            Request::Close { reply } => return Some(reply),
        }
        None
    }

    fn frame_append(
        &mut self,
        stream: &StreamName,
        expected: ExpectedVersion,
        ids: &[String],
        payloads: &[Vec<u8>],
        group: &mut Group,
    ) -> Result<Appended, FrameError> {
        // Pending (unsynced) events of this group count: they commit or fail together.
        let pending_head = u64::MAX;
        let (current, next_version) = {
            let index = self.shared.index.read();
            let state = index.streams.get(stream);
            let current = state
                .and_then(|state| state.last_version(pending_head))
                .map(Version);
            if let Some(retry) = self.retry_of(&index, stream, expected, ids)? {
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
        let mut bytes = Vec::with_capacity(size as usize);
        let mut appended = Appended {
            events: Vec::with_capacity(ids.len()),
        };
        let mut index = self.shared.index.write();
        for (i, (id, payload)) in ids.iter().zip(payloads).enumerate() {
            let version = next_version + i as u64;
            let position = index.next_position;
            let start = bytes.len();
            Record {
                kind: Kind::Event,
                batch_left: (ids.len() - 1 - i) as u32,
                position,
                version,
                recorded_at_us,
                stream: stream.as_str(),
                payload,
            }
            .encode_into(&mut bytes);
            let len = (bytes.len() - start) as u32;
            index.insert_event(
                stream,
                version,
                id_hash(id),
                Loc {
                    offset: offset as u32,
                    len,
                },
            );
            offset += u64::from(len);
            appended.events.push(AppendedEvent {
                id: id.clone(),
                version: Version(version),
                position: herald_core::Position(position),
            });
        }
        drop(index);
        group.add(segment, offset - size, bytes);
        self.events_since_checkpoint += ids.len() as u64;
        Ok(appended)
    }

    /// Whether an id may already be stored by an event of the group not yet written.
    fn may_repeat_pending(&self, ids: &[String]) -> bool {
        let head = *self.shared.head.borrow();
        let index = self.shared.index.read();
        index.next_position > head
            && ids.iter().any(|id| {
                index
                    .id_candidates(id)
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
    ) -> Result<Option<Appended>, FrameError> {
        let mut found = Vec::with_capacity(ids.len());
        for id in ids {
            let stored = index.id_candidates(id).iter().copied().find(|&position| {
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
                }
            }
            return;
        }
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
        // Encoded here, between groups, so it covers exactly the synced events; written on
        // another thread so appends do not wait for it.
        let bytes = checkpoint::encode(&self.shared.index.read());
        self.events_since_checkpoint = 0;
        let shared = self.shared.clone();
        let write = move || {
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
        self.bytes += bytes.len() as u64;
        match self.chunks.last_mut() {
            Some((last, end, chunk)) if *last == segment && *end + chunk.len() as u64 == offset => {
                chunk.extend_from_slice(&bytes)
            }
            _ => self.chunks.push((segment, offset, bytes)),
        }
    }
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
