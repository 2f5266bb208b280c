//! Herald's embedded event log: a durable, crash-safe, append-only log on local disk that
//! implements [`herald_core::EventStore`] and needs no server.
//!
//! - Events are appended to segment files as CRC32C-protected records (layout in
//!   [`record`] and `docs/log-format.md`).
//! - One writer thread gathers the appends of many tasks into one write and one
//!   `fdatasync` (group commit); each caller is acknowledged only after the sync.
//! - On open, a torn or partial tail is truncated; damage before the tail is reported with
//!   its file and offset, and the log refuses to open past it.
//! - An in-memory index, checkpointed to disk, answers `read_stream`, expected-version and
//!   idempotency checks without scanning the log. A rejected append (wrong expected
//!   version, duplicate id) is answered together with the group it was checked in, after
//!   that group's sync: a caller told its append conflicts finds, when it reads next, the
//!   events it conflicted with.
//! - The events appended last stay parsed in memory for a while, so that readers at the
//!   head (live subscriptions) do not read and parse them back.
//! - The data directory is locked: a second process gets [`OpenError::Locked`].
//!
//! **Architecture invariant:** every byte goes through the [`io::Io`] layer, so tests can
//! simulate power loss and failing syncs ([`io::sim::SimIo`]).

#![forbid(unsafe_code)]

pub mod broker;
pub mod io;
pub mod record;

mod cache;
mod index;
mod read;
mod recover;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use herald_core::store::{Error, Subscription};
use herald_core::{
    Appended, Direction, Event, EventStore, ExpectedVersion, Position, RecordedEvent, StreamName,
    Version,
};
use parking_lot::{Mutex, RwLock};
use tokio::sync::{mpsc, oneshot, watch};

use crate::index::Index;
use crate::io::{Io, StdIo};

/// When an append is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// After the write and an `fdatasync` of it: an acknowledged append survives a process
    /// crash, an operating-system crash and a power loss.
    #[default]
    Fsync,
    /// After the write reaches the operating system, without a sync: an acknowledged append
    /// survives a crash of the process (`kill -9`) but may be lost by an operating-system
    /// crash or power loss, for as long as the kernel keeps dirty pages before writing them
    /// back (on Linux `vm.dirty_expire_centisecs`, 30 s by default). On recovery such a loss
    /// is a clean truncation of the tail, never a torn event.
    Os,
}

/// How the log is opened. Every bound is named with its unit last.
#[derive(Debug, Clone)]
pub struct Options {
    /// The directory holding segments, the index checkpoint and the lock.
    pub data_dir: PathBuf,
    /// When appends are acknowledged.
    pub durability: Durability,
    /// A segment is closed and a new one started when the next append would grow it
    /// past this size.
    pub segment_size_max_bytes: u64,
    /// The largest single append (all its records) accepted.
    pub append_size_max_bytes: u64,
    /// The writer stops gathering appends into one write + sync past this many bytes.
    pub group_commit_bytes_max: u64,
    /// Appends waiting for the writer; further callers wait for room (backpressure).
    pub append_queue_len_max: usize,
    /// The index is checkpointed after this many events.
    pub index_checkpoint_interval_events: u64,
    /// About how much memory the events appended last may take while they are kept parsed
    /// for readers at the head (counted as each event's JSON size plus a fixed overhead);
    /// 0 keeps none, and every read then reads and parses records. Events are kept only
    /// while some reader reads that close to the head.
    pub read_cache_bytes_max: u64,
}

impl Options {
    /// Defaults for a log in `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Options {
            data_dir: data_dir.into(),
            durability: Durability::Fsync,
            segment_size_max_bytes: 256 * 1024 * 1024,
            append_size_max_bytes: 16 * 1024 * 1024,
            group_commit_bytes_max: 4 * 1024 * 1024,
            append_queue_len_max: 4096,
            index_checkpoint_interval_events: 262_144,
            read_cache_bytes_max: 64 * 1024 * 1024,
        }
    }
}

/// Why the log could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// Another process (or another `Log` in this one) has the directory open.
    #[error("data directory {} is locked by another process; stop the other herald process or use another --data-dir", dir.display())]
    Locked {
        /// The data directory.
        dir: PathBuf,
    },
    /// A file could not be read or written.
    #[error("i/o error on {}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A record before the tail of the log is damaged; the log refuses to open past it
    /// rather than silently drop the valid records that follow it.
    #[error("log damaged in {} at offset {offset}: {reason}; valid records follow, so it was not truncated", file.display())]
    Corrupt {
        /// The segment file.
        file: PathBuf,
        /// Byte offset of the damaged record in it.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// The options are inconsistent.
    #[error("invalid options: {0}")]
    InvalidOptions(&'static str),
}

/// The embedded event log. Cheap to clone; every clone is a handle to the same log.
#[derive(Clone)]
pub struct Log {
    shared: Arc<Shared>,
    appends: mpsc::Sender<writer::Request>,
}

/// State shared by the handles, the writer and the readers.
pub(crate) struct Shared {
    pub(crate) options: Options,
    pub(crate) index: RwLock<Index>,
    /// Number of events visible to readers: everything below it is synced.
    pub(crate) head: watch::Sender<u64>,
    /// Set when a write or sync failed; the log then accepts no more writes.
    pub(crate) failed: Mutex<Option<Arc<std::io::Error>>>,
    pub(crate) io: Arc<dyn Io>,
    /// The events appended last, parsed.
    pub(crate) cache: cache::ReadCache,
    lock: Mutex<Option<Box<dyn std::any::Any + Send + Sync>>>,
}

impl Log {
    /// Opens (or creates) the log in `options.data_dir` on the real file system.
    ///
    /// Blocking: it recovers the log and rebuilds the index. From async code, call it
    /// through `tokio::task::spawn_blocking`.
    pub fn open(options: Options) -> Result<Log, OpenError> {
        Self::open_with_io(options, Arc::new(StdIo))
    }

    /// Opens the log through the given I/O layer (tests use [`io::sim::SimIo`]).
    pub fn open_with_io(options: Options, io: Arc<dyn Io>) -> Result<Log, OpenError> {
        if options.append_size_max_bytes > options.segment_size_max_bytes
            || options.segment_size_max_bytes > u64::from(u32::MAX)
        {
            return Err(OpenError::InvalidOptions(
                "append_size_max_bytes must not exceed segment_size_max_bytes, which must be below 4 GiB",
            ));
        }
        let dir = options.data_dir.clone();
        let io_error = |path: &Path| {
            let path = path.to_owned();
            move |source| OpenError::Io { path, source }
        };
        io.create_dir_all(&dir).map_err(io_error(&dir))?;
        let lock = io.lock_dir(&dir).map_err(|error| match error.kind() {
            std::io::ErrorKind::WouldBlock => OpenError::Locked { dir: dir.clone() },
            _ => OpenError::Io {
                path: dir.join("LOCK"),
                source: error,
            },
        })?;
        let index = recover::recover(&options, io.as_ref())?;
        let head = index.next_position;
        let (appends, requests) = mpsc::channel(options.append_queue_len_max.max(1));
        let shared = Arc::new(Shared {
            cache: cache::ReadCache::new(options.read_cache_bytes_max),
            options,
            index: RwLock::new(index),
            head: watch::Sender::new(head),
            failed: Mutex::new(None),
            io,
            lock: Mutex::new(Some(lock)),
        });
        writer::spawn(shared.clone(), requests).map_err(io_error(&dir))?;
        Ok(Log { shared, appends })
    }

    /// Finishes the appends already queued, checkpoints the index and releases the
    /// directory lock. Later appends and deletes on any handle fail with [`Error::Closed`].
    pub async fn close(&self) -> Result<(), Error> {
        let (reply, done) = oneshot::channel();
        if self
            .appends
            .send(writer::Request::Close { reply })
            .await
            .is_ok()
        {
            // The writer answers once it has stopped; a dropped reply means it already had.
            let _ = done.await;
        }
        self.shared.lock.lock().take();
        Ok(())
    }

    /// The directory this log lives in.
    pub fn data_dir(&self) -> &Path {
        &self.shared.options.data_dir
    }

    async fn request<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, Error>>) -> writer::Request,
    ) -> Result<T, Error> {
        let (reply, response) = oneshot::channel();
        self.appends
            .send(make(reply))
            .await
            .map_err(|_| Error::Closed)?;
        response.await.map_err(|_| Error::Closed)?
    }

    async fn blocking<T: Send + 'static>(
        &self,
        read: impl FnOnce(&Shared) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || read(&shared))
            .await
            .map_err(|error| Error::Backend(Box::new(error)))?
    }
}

#[async_trait]
impl EventStore for Log {
    async fn append(
        &self,
        stream: &StreamName,
        expected: ExpectedVersion,
        events: Vec<Event>,
    ) -> Result<Appended, Error> {
        // Validation and serialisation happen here, in the caller's task, so the single
        // writer thread only frames, writes and syncs.
        herald_core::store::check_append(&events)?;
        let payloads = writer::Payloads::of(&events);
        let size = payloads
            .iter()
            .map(|payload| (record::HEADER_LEN + stream.as_str().len() + payload.len()) as u64)
            .sum();
        let limit = self.shared.options.append_size_max_bytes;
        if size > limit {
            return Err(Error::AppendTooLarge { size, limit });
        }
        let id_hashes = events
            .iter()
            .map(|event| index::id_hash(&event.id))
            .collect();
        // The events go to the read cache when it keeps them; otherwise only their ids are
        // needed.
        let (ids, events) = if self.shared.cache.is_keeping(*self.shared.head.borrow()) {
            (
                events.iter().map(|event| event.id.clone()).collect(),
                events,
            )
        } else {
            (
                events.into_iter().map(|event| event.id).collect(),
                Vec::new(),
            )
        };
        let append = writer::Append {
            stream: stream.clone(),
            expected,
            ids,
            id_hashes,
            payloads,
            events,
        };
        let placed = self
            .request(|reply| writer::Request::Append { append, reply })
            .await?;
        Ok(placed.into_appended())
    }

    async fn read_stream(
        &self,
        stream: &StreamName,
        from: Version,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, Error> {
        let stream = stream.clone();
        self.blocking(move |shared| {
            read::read_stream(shared, &stream, from, direction, limit, read::Reader::Api)
        })
        .await
    }

    async fn read_all(
        &self,
        from: Position,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, Error> {
        self.blocking(move |shared| {
            read::read_all(shared, from, direction, limit, read::Reader::Api)
        })
        .await
    }

    async fn stream_version(&self, stream: &StreamName) -> Result<Option<Version>, Error> {
        let head = *self.shared.head.borrow();
        let index = self.shared.index.read();
        Ok(index
            .streams
            .get(stream)
            .and_then(|state| state.last_version(head))
            .map(Version))
    }

    async fn head(&self) -> Result<Option<Position>, Error> {
        let head = *self.shared.head.borrow();
        Ok(head.checked_sub(1).map(Position))
    }

    async fn subscribe_all(&self, from: Position) -> Result<Subscription, Error> {
        Ok(read::subscribe(self.shared.clone(), None, from.0))
    }

    async fn subscribe_stream(
        &self,
        stream: &StreamName,
        from: Version,
    ) -> Result<Subscription, Error> {
        Ok(read::subscribe(
            self.shared.clone(),
            Some(stream.clone()),
            from.0,
        ))
    }

    async fn delete_stream(
        &self,
        stream: &StreamName,
        expected: ExpectedVersion,
    ) -> Result<(), Error> {
        let stream = stream.clone();
        self.request(|reply| writer::Request::Delete {
            stream,
            expected,
            reply,
        })
        .await
    }
}
