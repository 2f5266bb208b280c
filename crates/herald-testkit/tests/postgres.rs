//! The throwaway PostgreSQL: it starts, serves queries, and leaves nothing behind.

use herald_testkit::{
    PostgresOptions, PostgresServer, process_running, require_postgres, shared_postgres,
};
use sqlx::Connection as _;

async fn answer(url: &str) -> i32 {
    let mut connection = sqlx::PgConnection::connect(url).await.unwrap();
    let (answer,): (i32,) = sqlx::query_as("SELECT 6 * 7")
        .fetch_one(&mut connection)
        .await
        .unwrap();
    connection.close().await.unwrap();
    answer
}

#[tokio::test]
async fn a_server_serves_queries_and_is_gone_after_drop() {
    let Some(server) = require_postgres() else {
        return;
    };
    assert_eq!(answer(&server.url()).await, 42);

    let url = server.create_database("herald_testkit_one").await.unwrap();
    assert!(url.ends_with("/herald_testkit_one"), "{url}");
    assert_eq!(answer(&url).await, 42);
    let refused = server.create_database("Not-An-Identifier").await;
    assert!(refused.is_err(), "{refused:?}");

    let pid = server.postmaster_pid().unwrap();
    let dir = server.data_dir().parent().unwrap().to_owned();
    assert!(process_running(pid));
    assert!(dir.exists());
    drop(server);
    assert!(
        !process_running(pid),
        "the postmaster {pid} is still running"
    );
    assert!(!dir.exists(), "{} was not removed", dir.display());
}

#[tokio::test]
async fn a_durable_server_syncs_its_commits() {
    if require_postgres().is_none() {
        return;
    }
    let server = PostgresOptions::new().durable(true).start().unwrap();
    let mut connection = sqlx::PgConnection::connect(&server.url()).await.unwrap();
    let (fsync,): (String,) = sqlx::query_as("SHOW fsync")
        .fetch_one(&mut connection)
        .await
        .unwrap();
    assert_eq!(fsync, "on");
    connection.close().await.unwrap();

    let fast = PostgresServer::start().unwrap();
    let mut connection = sqlx::PgConnection::connect(&fast.url()).await.unwrap();
    let (fsync,): (String,) = sqlx::query_as("SHOW fsync")
        .fetch_one(&mut connection)
        .await
        .unwrap();
    assert_eq!(fsync, "off");
    connection.close().await.unwrap();
}

#[tokio::test]
async fn the_shared_server_is_one_server_for_the_process() {
    let Some(first) = shared_postgres() else {
        return;
    };
    let second = shared_postgres().unwrap();
    assert_eq!(first.port(), second.port());
    let url = first
        .create_database("herald_testkit_shared")
        .await
        .unwrap();
    assert_eq!(answer(&url).await, 42);
}
