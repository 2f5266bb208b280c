//! Checkpoints: a named position that a subscription or a projection has processed up to.
//!
//! A subscription or a projection reads events in order and, every so often, saves how far
//! it got under a name of its own (e.g. `projection:order-summary`). On restart it loads
//! the checkpoint and resumes after it. Delivery is at least once: events after the saved
//! position are processed again after a crash, so what is saved is the position of an
//! event whose effects are all done.
//!
//! # Contract of a [`CheckpointStore`]
//!
//! - [`load`](CheckpointStore::load) MUST return the greatest position saved under the name
//!   by a `save` that returned `Ok` before the `load` started, or `None` if there is none
//!   (never saved, or [`delete`](CheckpointStore::delete)d since).
//! - [`save`](CheckpointStore::save) MUST be durable (per the backend's documented
//!   durability) when it returns `Ok`.
//! - **A checkpoint only moves forward.** A `save` of a position lower than the stored one
//!   keeps the stored one; `save` returns the position stored after it. So a slow instance
//!   that saves late (two members during a rebalance, a retried save) never moves a
//!   checkpoint back. To start again from the beginning (rebuild a projection), `delete`
//!   the checkpoint, or use a new name.
//! - Names are any string of 1 to [`CHECKPOINT_NAME_LEN_MAX`] bytes; two different names
//!   are two checkpoints. Any other name fails with [`Error::InvalidName`] and stores
//!   nothing.
//! - A failure is reported as an [`Error`], never by a panic; after a failed `save` the
//!   position may or may not be stored, and a later `load` tells.
//!
//! [`InMemoryCheckpointStore`] is the implementation for tests. The
//! [conformance suite](conformance) (feature `test-util`) checks a store against the
//! contract.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;

/// The longest checkpoint name, in bytes.
pub const CHECKPOINT_NAME_LEN_MAX: usize = 255;

/// Why a checkpoint operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The name is empty or longer than [`CHECKPOINT_NAME_LEN_MAX`] bytes.
    #[error("invalid checkpoint name of {len} bytes: 1 to {CHECKPOINT_NAME_LEN_MAX} allowed")]
    InvalidName {
        /// The name's length in bytes.
        len: usize,
    },
    /// The position cannot be stored by this backend (e.g. beyond a signed 64-bit column).
    #[error("position {position} is out of this store's range (at most {max})")]
    PositionOutOfRange {
        /// The position given.
        position: u64,
        /// The greatest position the store keeps.
        max: u64,
    },
    /// A backend-specific failure.
    #[error("checkpoint store failure")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Checks a checkpoint name against the [contract](self#contract-of-a-checkpointstore).
pub fn check_name(name: &str) -> Result<(), Error> {
    if name.is_empty() || name.len() > CHECKPOINT_NAME_LEN_MAX {
        return Err(Error::InvalidName { len: name.len() });
    }
    Ok(())
}

/// Stores named positions; see the [module documentation](self) for the contract.
///
/// Object-safe: components hold `Arc<dyn CheckpointStore>`.
#[async_trait]
pub trait CheckpointStore: Send + Sync + 'static {
    /// The position saved under `name`, or `None` if there is none.
    async fn load(&self, name: &str) -> Result<Option<u64>, Error>;

    /// Saves `position` under `name` unless a greater position is stored; durable when it
    /// returns. Returns the position stored after the call (`position` or greater).
    async fn save(&self, name: &str, position: u64) -> Result<u64, Error>;

    /// Removes the checkpoint `name`, so that the next `load` returns `None`. Removing a
    /// checkpoint that does not exist succeeds.
    async fn delete(&self, name: &str) -> Result<(), Error>;
}

/// A [`CheckpointStore`] in memory, for tests: not durable.
#[derive(Debug, Default)]
pub struct InMemoryCheckpointStore {
    // Locked only for map operations, never across an await.
    positions: Mutex<HashMap<String, u64>>,
}

impl InMemoryCheckpointStore {
    /// An empty store.
    pub fn new() -> Self {
        InMemoryCheckpointStore::default()
    }
}

#[async_trait]
impl CheckpointStore for InMemoryCheckpointStore {
    async fn load(&self, name: &str) -> Result<Option<u64>, Error> {
        check_name(name)?;
        Ok(self
            .positions
            .lock()
            .expect("not poisoned")
            .get(name)
            .copied())
    }

    async fn save(&self, name: &str, position: u64) -> Result<u64, Error> {
        check_name(name)?;
        let mut positions = self.positions.lock().expect("not poisoned");
        let stored = positions.entry(name.to_owned()).or_insert(position);
        *stored = (*stored).max(position);
        Ok(*stored)
    }

    async fn delete(&self, name: &str) -> Result<(), Error> {
        check_name(name)?;
        self.positions.lock().expect("not poisoned").remove(name);
        Ok(())
    }
}

/// The conformance suite of [`CheckpointStore`]: every backend runs it.
#[cfg(feature = "test-util")]
pub mod conformance {
    use super::*;

    /// Checks `store` against the [contract](super#contract-of-a-checkpointstore); panics
    /// at the first broken promise. `max` is the greatest position the store keeps
    /// (`u64::MAX`, or `i64::MAX as u64` for a signed 64-bit column). The store must hold
    /// no checkpoint whose name starts with `conformance`.
    pub async fn run(store: &dyn CheckpointStore, max: u64) {
        // Never saved.
        assert_eq!(store.load("conformance-a").await.unwrap(), None);

        // Saved, loaded; moves forward; never back.
        assert_eq!(store.save("conformance-a", 10).await.unwrap(), 10);
        assert_eq!(store.load("conformance-a").await.unwrap(), Some(10));
        assert_eq!(store.save("conformance-a", 25).await.unwrap(), 25);
        assert_eq!(
            store.save("conformance-a", 3).await.unwrap(),
            25,
            "a lower save keeps the stored position"
        );
        assert_eq!(store.load("conformance-a").await.unwrap(), Some(25));
        assert_eq!(store.save("conformance-a", 25).await.unwrap(), 25);

        // Position 0 is a position, and names do not collide.
        assert_eq!(store.save("conformance-b", 0).await.unwrap(), 0);
        assert_eq!(store.load("conformance-b").await.unwrap(), Some(0));
        assert_eq!(store.load("conformance-a").await.unwrap(), Some(25));
        let awkward = [
            "conformance:projection/orders v2",
            "conformance-é 注文 🎉",
            "conformance-'quoted\"",
        ];
        for (index, name) in awkward.iter().enumerate() {
            let position = 100 + index as u64;
            assert_eq!(
                store.save(name, position).await.unwrap(),
                position,
                "{name}"
            );
        }
        for (index, name) in awkward.iter().enumerate() {
            assert_eq!(
                store.load(name).await.unwrap(),
                Some(100 + index as u64),
                "{name}"
            );
        }
        let longest = format!("conformance{}", "x".repeat(CHECKPOINT_NAME_LEN_MAX - 11));
        assert_eq!(store.save(&longest, 7).await.unwrap(), 7);
        assert_eq!(store.load(&longest).await.unwrap(), Some(7));

        // The range's end.
        assert_eq!(store.save("conformance-max", max).await.unwrap(), max);
        assert_eq!(store.load("conformance-max").await.unwrap(), Some(max));
        if max < u64::MAX {
            let error = store.save("conformance-over", max + 1).await.unwrap_err();
            assert!(
                matches!(error, Error::PositionOutOfRange { .. }),
                "{error:?}"
            );
            assert_eq!(store.load("conformance-over").await.unwrap(), None);
        }

        // Delete: gone, and the name starts again from scratch.
        store.delete("conformance-a").await.unwrap();
        assert_eq!(store.load("conformance-a").await.unwrap(), None);
        store.delete("conformance-a").await.unwrap();
        assert_eq!(store.save("conformance-a", 1).await.unwrap(), 1);
        assert_eq!(store.load("conformance-b").await.unwrap(), Some(0));

        // Invalid names store nothing.
        let too_long = "x".repeat(CHECKPOINT_NAME_LEN_MAX + 1);
        for name in ["", too_long.as_str()] {
            assert!(matches!(
                store.save(name, 1).await,
                Err(Error::InvalidName { .. })
            ));
            assert!(matches!(
                store.load(name).await,
                Err(Error::InvalidName { .. })
            ));
            assert!(matches!(
                store.delete(name).await,
                Err(Error::InvalidName { .. })
            ));
        }

        // Concurrent saves: the greatest wins, whatever the order they land in.
        let saves = (0..16_u64).map(|position| store.save("conformance-race", position * 7));
        let stored = futures::future::join_all(saves).await;
        for result in &stored {
            let stored = *result.as_ref().unwrap();
            assert!(stored <= 15 * 7);
        }
        assert_eq!(store.load("conformance-race").await.unwrap(), Some(15 * 7));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    // Keeps the store object-safe: this stops compiling if it ever isn't.
    #[allow(dead_code)]
    fn object_safe(store: Arc<dyn CheckpointStore>) -> Arc<dyn CheckpointStore> {
        store
    }

    #[tokio::test]
    async fn the_in_memory_store_passes_the_conformance_suite() {
        conformance::run(&InMemoryCheckpointStore::new(), u64::MAX).await;
    }
}
