//! The thin file-system layer the log does all its I/O through.
//!
//! [`StdIo`] is the real one. [`sim::SimIo`] keeps files in memory and models what a power
//! loss does to them — bytes not yet synced are lost and the last unsynced write may be torn
//! — and can fail a write or a sync on request, so tests can check what `kill -9` cannot:
//! that nothing acknowledged depends on a sync that did not happen.

use std::any::Any;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A directory tree of files.
pub trait Io: Send + Sync + 'static {
    /// Creates `dir` and its parents.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// The names of the files in `dir`.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Opens `path` for reading and writing, creating it if `create`.
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn IoFile>>;
    /// Removes a file.
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Atomically replaces `to` with `from`.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Makes the creation, removal and renaming of files in `dir` durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Takes an exclusive lock on `dir`, held until the returned guard is dropped; fails at
    /// once with [`io::ErrorKind::WouldBlock`] if another holder has it.
    fn lock_dir(&self, dir: &Path) -> io::Result<Box<dyn Any + Send + Sync>>;
}

/// An open file.
pub trait IoFile: Send + Sync + 'static {
    /// Reads up to `buf.len()` bytes at `offset`; fewer only at the end of the file.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Writes all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every write so far durable (`fdatasync`).
    fn sync_data(&self) -> io::Result<()>;
    /// The file's size in bytes.
    fn size(&self) -> io::Result<u64>;
    /// Truncates or extends the file.
    fn set_len(&self, len: u64) -> io::Result<()>;
}

/// Reads exactly `buf.len()` bytes at `offset`, or fails with `UnexpectedEof`.
pub(crate) fn read_exact_at(file: &dyn IoFile, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64)? {
            0 => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
            n => done += n,
        }
    }
    Ok(())
}

/// The real file system.
#[derive(Debug, Clone, Copy, Default)]
pub struct StdIo;

struct StdFile(File);

impl Io for StdIo {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                names.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        Ok(names)
    }

    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn IoFile>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .open(path)?;
        Ok(Arc::new(StdFile(file)))
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }

    fn lock_dir(&self, dir: &Path) -> io::Result<Box<dyn Any + Send + Sync>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join("LOCK"))?;
        match file.try_lock() {
            Ok(()) => Ok(Box::new(file)),
            Err(std::fs::TryLockError::WouldBlock) => Err(io::ErrorKind::WouldBlock.into()),
            Err(std::fs::TryLockError::Error(error)) => Err(error),
        }
    }
}

impl IoFile for StdFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.0.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
}

/// A simulated file system for power-loss and fault-injection tests.
pub mod sim {
    use super::*;
    use parking_lot::Mutex;
    use std::collections::{BTreeMap, BTreeSet};

    /// An in-memory file system that remembers which bytes are durable.
    ///
    /// Each file keeps its durable content (as of its last sync) and the writes made since.
    /// [`SimIo::crash`] simulates a power loss: every file falls back to its durable
    /// content plus, chosen by a seed, some of its unsynced writes in order, the last of
    /// which may be torn (only a prefix of it reaches the disk). File creations, removals
    /// and renames not made durable by a directory sync may be undone.
    #[derive(Clone, Default)]
    pub struct SimIo {
        state: Arc<Mutex<State>>,
        /// Cleared by a crash: the "process" that used this handle is gone, and everything
        /// it still tries to do fails.
        alive: Arc<Alive>,
    }

    struct Alive(std::sync::atomic::AtomicBool);

    impl Default for Alive {
        fn default() -> Self {
            Alive(std::sync::atomic::AtomicBool::new(true))
        }
    }

    impl Alive {
        fn check(&self) -> io::Result<()> {
            if self.0.load(std::sync::atomic::Ordering::SeqCst) {
                Ok(())
            } else {
                Err(io::Error::other(
                    "simulated power loss: this process is gone",
                ))
            }
        }
    }

    #[derive(Default)]
    struct State {
        /// Current directory entries: path → file.
        names: BTreeMap<PathBuf, Arc<SimFile>>,
        /// Directory entries as of the last directory sync.
        durable_names: BTreeMap<PathBuf, Arc<SimFile>>,
        dirs: BTreeSet<PathBuf>,
        locked: BTreeSet<PathBuf>,
        faults: Faults,
    }

    #[derive(Default)]
    struct Faults {
        /// Fail the n-th sync from now (1 = the next one).
        fail_sync_in: Option<u64>,
        /// Fail the n-th write from now.
        fail_write_in: Option<u64>,
    }

    #[derive(Default)]
    struct SimFile {
        content: Mutex<FileState>,
        faults: Arc<Mutex<State>>,
        alive: Arc<Alive>,
    }

    #[derive(Default, Clone)]
    struct FileState {
        current: Vec<u8>,
        durable: Vec<u8>,
        /// Writes and truncations since the last sync, in order.
        pending: Vec<Op>,
    }

    #[derive(Clone)]
    enum Op {
        Write { offset: u64, bytes: Vec<u8> },
        SetLen(u64),
    }

    struct SimLock {
        dir: PathBuf,
        state: Arc<Mutex<State>>,
    }

    impl Drop for SimLock {
        fn drop(&mut self) {
            self.state.lock().locked.remove(&self.dir);
        }
    }

    impl SimIo {
        /// An empty file system.
        pub fn new() -> Self {
            Self::default()
        }

        /// Makes the `n`-th sync from now fail (1 = the next one).
        pub fn fail_sync_in(&self, n: u64) {
            self.state.lock().faults.fail_sync_in = Some(n);
        }

        /// Makes the `n`-th write from now fail (1 = the next one).
        pub fn fail_write_in(&self, n: u64) {
            self.state.lock().faults.fail_write_in = Some(n);
        }

        /// Simulates a power loss, choosing what survives of unsynced data from `seed`, and
        /// returns the file system as the machine finds it on reboot.
        ///
        /// This handle and every file opened through it stop working (their operations fail),
        /// as if the process using them died with the machine; open the log again through
        /// the returned handle.
        pub fn crash(&self, seed: u64) -> SimIo {
            let mut rng = SplitMix(seed);
            let state = self.state.lock();
            self.alive
                .0
                .store(false, std::sync::atomic::Ordering::SeqCst);
            // Undo directory changes that were not synced, or keep them, at random.
            let same = |a: &BTreeMap<PathBuf, Arc<SimFile>>,
                        b: &BTreeMap<PathBuf, Arc<SimFile>>| {
                a.len() == b.len()
                    && a.iter()
                        .zip(b)
                        .all(|((pa, fa), (pb, fb))| pa == pb && Arc::ptr_eq(fa, fb))
            };
            let names = if !same(&state.names, &state.durable_names) && rng.next().is_multiple_of(2)
            {
                &state.durable_names
            } else {
                &state.names
            };
            let rebooted = SimIo::default();
            let mut survived = BTreeMap::new();
            for (path, file) in names {
                let content = file.content.lock().clone();
                let mut bytes = content.durable.clone();
                let keep = (rng.next() % (content.pending.len() as u64 + 1)) as usize;
                for (i, op) in content.pending.iter().enumerate().take(keep + 1) {
                    let torn = i == keep;
                    match op {
                        Op::Write {
                            offset,
                            bytes: data,
                        } => {
                            let len = if torn {
                                (rng.next() % (data.len() as u64 + 1)) as usize
                            } else {
                                data.len()
                            };
                            apply_write(&mut bytes, *offset, &data[..len]);
                        }
                        Op::SetLen(len) if !torn => bytes.resize(*len as usize, 0),
                        Op::SetLen(_) => {}
                    }
                }
                survived.insert(path.clone(), rebooted.file(bytes));
            }
            {
                let mut new_state = rebooted.state.lock();
                new_state.names = survived.clone();
                new_state.durable_names = survived;
                new_state.dirs = state.dirs.clone();
            }
            rebooted
        }

        fn file(&self, bytes: Vec<u8>) -> Arc<SimFile> {
            Arc::new(SimFile {
                content: Mutex::new(FileState {
                    current: bytes.clone(),
                    durable: bytes,
                    pending: Vec::new(),
                }),
                faults: self.state.clone(),
                alive: self.alive.clone(),
            })
        }

        /// The current content of a file, for tests that damage it.
        pub fn read_file(&self, path: &Path) -> Option<Vec<u8>> {
            let state = self.state.lock();
            state
                .names
                .get(path)
                .map(|file| file.content.lock().current.clone())
        }

        /// Replaces a file's content, durably, for tests that damage it.
        pub fn write_file(&self, path: &Path, bytes: Vec<u8>) {
            let file = self.file(bytes);
            let mut state = self.state.lock();
            state.names.insert(path.to_owned(), file.clone());
            state.durable_names.insert(path.to_owned(), file);
        }
    }

    fn apply_write(bytes: &mut Vec<u8>, offset: u64, data: &[u8]) {
        let end = offset as usize + data.len();
        if bytes.len() < end {
            bytes.resize(end, 0);
        }
        bytes[offset as usize..end].copy_from_slice(data);
    }

    fn injected(counter: &mut Option<u64>, what: &str) -> io::Result<()> {
        if let Some(n) = counter {
            *n -= 1;
            if *n == 0 {
                *counter = None;
                return Err(io::Error::other(format!("injected {what} failure")));
            }
        }
        Ok(())
    }

    impl Io for SimIo {
        fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
            self.alive.check()?;
            self.state.lock().dirs.insert(dir.to_owned());
            Ok(())
        }

        fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
            self.alive.check()?;
            let state = self.state.lock();
            Ok(state
                .names
                .keys()
                .filter(|path| path.parent() == Some(dir))
                .filter_map(|path| {
                    path.file_name()
                        .map(|name| name.to_string_lossy().into_owned())
                })
                .collect())
        }

        fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn IoFile>> {
            self.alive.check()?;
            let mut state = self.state.lock();
            if let Some(file) = state.names.get(path) {
                return Ok(file.clone());
            }
            if !create {
                return Err(io::ErrorKind::NotFound.into());
            }
            let file = Arc::new(SimFile {
                content: Mutex::default(),
                faults: self.state.clone(),
                alive: self.alive.clone(),
            });
            state.names.insert(path.to_owned(), file.clone());
            Ok(file)
        }

        fn remove(&self, path: &Path) -> io::Result<()> {
            self.alive.check()?;
            match self.state.lock().names.remove(path) {
                Some(_) => Ok(()),
                None => Err(io::ErrorKind::NotFound.into()),
            }
        }

        fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
            self.alive.check()?;
            let mut state = self.state.lock();
            let file = state.names.remove(from).ok_or(io::ErrorKind::NotFound)?;
            state.names.insert(to.to_owned(), file);
            Ok(())
        }

        fn sync_dir(&self, dir: &Path) -> io::Result<()> {
            self.alive.check()?;
            let mut state = self.state.lock();
            injected(&mut state.faults.fail_sync_in, "directory sync")?;
            let in_dir = |path: &PathBuf| path.parent() == Some(dir);
            let current: Vec<_> = state
                .names
                .iter()
                .filter(|(path, _)| in_dir(path))
                .map(|(path, file)| (path.clone(), file.clone()))
                .collect();
            state.durable_names.retain(|path, _| !in_dir(path));
            state.durable_names.extend(current);
            Ok(())
        }

        fn lock_dir(&self, dir: &Path) -> io::Result<Box<dyn Any + Send + Sync>> {
            self.alive.check()?;
            let mut state = self.state.lock();
            if !state.locked.insert(dir.to_owned()) {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(Box::new(SimLock {
                dir: dir.to_owned(),
                state: self.state.clone(),
            }))
        }
    }

    impl IoFile for SimFile {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
            self.alive.check()?;
            let content = self.content.lock();
            let start = (offset as usize).min(content.current.len());
            let n = buf.len().min(content.current.len() - start);
            buf[..n].copy_from_slice(&content.current[start..start + n]);
            Ok(n)
        }

        fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            self.alive.check()?;
            injected(&mut self.faults.lock().faults.fail_write_in, "write")?;
            let mut content = self.content.lock();
            apply_write(&mut content.current, offset, buf);
            content.pending.push(Op::Write {
                offset,
                bytes: buf.to_vec(),
            });
            Ok(())
        }

        fn sync_data(&self) -> io::Result<()> {
            self.alive.check()?;
            let failed = injected(&mut self.faults.lock().faults.fail_sync_in, "sync");
            let mut content = self.content.lock();
            if failed.is_err() {
                // As Linux does after a failed fsync: the dirty pages are dropped, the
                // unsynced writes are gone, and a later sync would report success.
                content.current = content.durable.clone();
                content.pending.clear();
                return failed;
            }
            content.durable = content.current.clone();
            content.pending.clear();
            Ok(())
        }

        fn size(&self) -> io::Result<u64> {
            self.alive.check()?;
            Ok(self.content.lock().current.len() as u64)
        }

        fn set_len(&self, len: u64) -> io::Result<()> {
            self.alive.check()?;
            let mut content = self.content.lock();
            content.current.resize(len as usize, 0);
            content.pending.push(Op::SetLen(len));
            Ok(())
        }
    }

    /// A tiny seeded generator, so a crash is reproducible from its seed alone.
    struct SplitMix(u64);

    impl SplitMix {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
    }
}
