//! Checkpoints on SQLite and PostgreSQL: the core conformance suite, and saving in the
//! caller's transaction.

mod common;

use common::Business;
use herald_core::CheckpointStore as _;
use herald_core::checkpoint::conformance;
use herald_sql::Checkpoints;
use herald_sql::checkpoint::{POSITION_MAX, save_in};
use sqlx::Pool;

on_both_backends! {
    checkpoints_keep_the_contract => contract;
    a_checkpoint_saved_in_a_transaction_commits_with_it => in_transaction;
}

async fn contract<DB: Business>(pool: Pool<DB>) {
    conformance::run(&Checkpoints::new(pool), POSITION_MAX).await;
}

async fn in_transaction<DB: Business>(pool: Pool<DB>) {
    let checkpoints = Checkpoints::new(pool.clone());
    checkpoints.save("projection", 5).await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    assert_eq!(save_in(&mut tx, "projection", 9).await.unwrap(), 9);
    tx.rollback().await.unwrap();
    assert_eq!(checkpoints.load("projection").await.unwrap(), Some(5));

    let mut tx = pool.begin().await.unwrap();
    assert_eq!(
        save_in(&mut tx, "projection", 3).await.unwrap(),
        5,
        "never back"
    );
    assert_eq!(save_in(&mut tx, "projection", 12).await.unwrap(), 12);
    tx.commit().await.unwrap();
    assert_eq!(checkpoints.load("projection").await.unwrap(), Some(12));
}
