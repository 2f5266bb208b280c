//! [`Checkpoints`]: herald-core's [`CheckpointStore`] on a SQL database.
//!
//! Keeps the [contract](herald_core::checkpoint#contract-of-a-checkpointstore): a
//! checkpoint only moves forward (`GREATEST` / `max` in the upsert), and a save is durable
//! when it returns — PostgreSQL's commit, or SQLite with
//! [`sqlite_connect_options`](crate::sqlite_connect_options) (`synchronous = FULL`).
//! Positions are stored as `BIGINT`: at most `i64::MAX` ([`POSITION_MAX`]).
//!
//! A projection that writes its read model in SQL saves its checkpoint in the same
//! transaction with [`save_in`], so the read model and its position never disagree.

use std::fmt;

use async_trait::async_trait;
use herald_core::checkpoint::{self, CheckpointStore, check_name};
use sqlx::{Pool, Transaction};

use crate::backend::Backend;

/// The greatest position a SQL checkpoint keeps (a signed 64-bit column).
pub const POSITION_MAX: u64 = i64::MAX as u64;

/// Checkpoints in the `herald_checkpoints` table of a pool's database. Cheap to clone.
#[derive(Clone)]
pub struct Checkpoints<DB: Backend> {
    pool: Pool<DB>,
}

impl<DB: Backend> fmt::Debug for Checkpoints<DB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Checkpoints").finish_non_exhaustive()
    }
}

impl<DB: Backend> Checkpoints<DB> {
    /// The checkpoints of `pool`'s database (migrated with [`migrate`](crate::migrate)).
    pub fn new(pool: Pool<DB>) -> Self {
        Checkpoints { pool }
    }
}

fn backend(error: sqlx::Error) -> checkpoint::Error {
    checkpoint::Error::Backend(Box::new(error))
}

fn stored_position(position: i64) -> Result<u64, checkpoint::Error> {
    u64::try_from(position).map_err(|_| {
        checkpoint::Error::Backend(Box::new(std::io::Error::other(format!(
            "a negative position ({position}) is stored"
        ))))
    })
}

fn column_position(position: u64) -> Result<i64, checkpoint::Error> {
    i64::try_from(position).map_err(|_| checkpoint::Error::PositionOutOfRange {
        position,
        max: POSITION_MAX,
    })
}

/// Saves `position` under `name` in the caller's transaction `tx`, unless a greater
/// position is stored; returns the position stored. Durable when `tx` commits.
pub async fn save_in<DB: Backend>(
    tx: &mut Transaction<'_, DB>,
    name: &str,
    position: u64,
) -> Result<u64, checkpoint::Error> {
    check_name(name)?;
    let position = column_position(position)?;
    let stored = DB::checkpoint_save(&mut **tx, name, position)
        .await
        .map_err(backend)?;
    stored_position(stored)
}

#[async_trait]
impl<DB: Backend> CheckpointStore for Checkpoints<DB> {
    async fn load(&self, name: &str) -> Result<Option<u64>, checkpoint::Error> {
        check_name(name)?;
        let mut conn = self.pool.acquire().await.map_err(backend)?;
        DB::checkpoint_load(&mut conn, name)
            .await
            .map_err(backend)?
            .map(stored_position)
            .transpose()
    }

    async fn save(&self, name: &str, position: u64) -> Result<u64, checkpoint::Error> {
        check_name(name)?;
        let position = column_position(position)?;
        let mut conn = self.pool.acquire().await.map_err(backend)?;
        let stored = DB::checkpoint_save(&mut conn, name, position)
            .await
            .map_err(backend)?;
        stored_position(stored)
    }

    async fn delete(&self, name: &str) -> Result<(), checkpoint::Error> {
        check_name(name)?;
        let mut conn = self.pool.acquire().await.map_err(backend)?;
        DB::checkpoint_delete(&mut conn, name)
            .await
            .map_err(backend)
    }
}
