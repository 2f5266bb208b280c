//! `herald migrate` and `herald outbox status` end to end: the real binary on a SQLite file
//! and on PostgreSQL (herald-testkit's throwaway server, with its skip policy), and the
//! errors, each with its hint, for URLs that cannot work.

use std::path::Path;
use std::process::{Command, Output};
use std::str::FromStr as _;

use herald_core::Event;
use herald_core::broker::TopicName;
use herald_sql::Outbox;
use serde_json::{Value, json};
use sqlx::{Pool, Sqlite};

mod common;

use common::{failure, herald, success};

fn sqlite_url(dir: &Path) -> String {
    format!("sqlite://{}?mode=rwc", dir.join("app.db").display())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// `herald ARGS…` with `HERALD_DATABASE_URL` set to `url`.
fn herald_with_url(dir: &Path, url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_herald"))
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .env("HERALD_DATABASE_URL", url)
        .env_remove("HERALD_DATA_DIR")
        .env_remove("RUST_LOG")
        .output()
        .expect("the herald binary runs")
}

#[test]
fn migrate_applies_once_then_reports_nothing_to_apply() {
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_url(dir.path());
    let first = success(herald(dir.path(), &["migrate", "--database-url", &url]));
    assert_eq!(
        first,
        "applied 1000000001 herald outbox inbox checkpoints\n"
    );
    let again = success(herald(dir.path(), &["migrate", "--database-url", &url]));
    assert_eq!(again, "nothing to apply: the database is up to date\n");
    // The URL can come from the environment.
    let json: Value = serde_json::from_str(&success(herald_with_url(
        dir.path(),
        &url,
        &["migrate", "--json"],
    )))
    .unwrap();
    assert_eq!(json, json!({ "database": "sqlite", "applied": [] }));
}

#[test]
fn status_of_a_fresh_outbox_is_empty() {
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_url(dir.path());
    success(herald(dir.path(), &["migrate", "--database-url", &url]));
    let status = status_json(dir.path(), &url);
    assert_eq!(status["database"], "sqlite");
    assert_eq!(status["backlog"], 0);
    assert_eq!(status["oldest_age_seconds"], Value::Null);
    assert_eq!(status["failing"], json!([]));
    assert_eq!(status["relays"], json!([]));
    assert_eq!(status["free_partitions"].as_array().unwrap().len(), 32);
    assert_eq!(status["leases"].as_array().unwrap().len(), 32);
    let table = success(herald(
        dir.path(),
        &["outbox", "status", "--database-url", &url],
    ));
    assert!(table.contains("backlog:         0 rows"), "{table}");
    assert!(table.contains("free partitions: 0-31"), "{table}");
    assert!(table.contains("relays:          none"), "{table}");
}

#[test]
fn status_shows_the_backlog_the_failing_rows_and_who_holds_which_lease() {
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_url(dir.path());
    success(herald(dir.path(), &["migrate", "--database-url", &url]));
    let expires_ms = chrono::Utc::now().timestamp_millis() + 3_600_000;
    runtime().block_on(async {
        let pool = sqlite_pool(&url).await;
        let outbox = Outbox::new(TopicName::new("orders").unwrap());
        let mut tx = pool.begin().await.unwrap();
        for n in 0..3 {
            let event = Event::new("/orders", "OrderPlaced").with_id(format!("e-{n}"));
            outbox.enqueue(&mut tx, &event).await.unwrap();
        }
        tx.commit().await.unwrap();
        // What a relay records after failed publishes, and the leases of one that died.
        sqlx::query(
            "UPDATE herald_outbox SET attempts = 3, last_error = 'broker unreachable',
                                      next_attempt_at = ?1
             WHERE id = 'e-1'",
        )
        .bind(expires_ms)
        .execute(&pool)
        .await
        .unwrap();
        sqlx::query(
            "UPDATE herald_outbox_leases SET holder = 'relay-a', expires_at = ?1
             WHERE partition IN (0, 1, 2, 7)",
        )
        .bind(expires_ms)
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;
    });

    let status = status_json(dir.path(), &url);
    assert_eq!(status["backlog"], 3);
    assert!(status["oldest_age_seconds"].as_f64().unwrap() >= 0.0);
    let failing = status["failing"].as_array().unwrap();
    assert_eq!(failing.len(), 1, "{status}");
    assert_eq!(failing[0]["id"], "e-1");
    assert_eq!(failing[0]["attempts"], 3);
    assert_eq!(failing[0]["last_error"], "broker unreachable");
    assert!(failing[0]["next_attempt_at"].is_string());
    let relays = status["relays"].as_array().unwrap();
    assert_eq!(relays.len(), 1, "{status}");
    assert_eq!(relays[0]["holder"], "relay-a");
    assert_eq!(
        relays[0]["alive"], false,
        "not registered: only its leases remain"
    );
    assert_eq!(relays[0]["partitions"], json!([0, 1, 2, 7]));
    assert!(relays[0]["leases_expire_at"].is_string());
    assert_eq!(status["free_partitions"].as_array().unwrap().len(), 28);

    let table = success(herald(
        dir.path(),
        &["outbox", "status", "--database-url", &url],
    ));
    assert!(table.contains("backlog:         3 rows"), "{table}");
    assert!(table.contains("free partitions: 3-6, 8-31"), "{table}");
    assert!(table.contains("relay-a"), "{table}");
    assert!(table.contains("0-2, 7"), "{table}");
    assert!(table.contains("broker unreachable"), "{table}");
}

#[test]
fn a_missing_sqlite_file_is_not_created_without_mode_rwc() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing.db");
    let url = format!("sqlite://{}", path.display());
    let stderr = failure(herald(dir.path(), &["migrate", "--database-url", &url]));
    assert!(
        stderr.starts_with("error: cannot connect to sqlite://"),
        "{stderr}"
    );
    assert!(
        stderr.contains("hint:") && stderr.contains("mode=rwc"),
        "{stderr}"
    );
    assert!(!path.exists());
}

#[test]
fn status_of_an_unmigrated_database_says_to_migrate() {
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_url(dir.path());
    let stderr = failure(herald(
        dir.path(),
        &["outbox", "status", "--database-url", &url],
    ));
    assert!(stderr.contains("no such table"), "{stderr}");
    assert!(
        stderr.contains("hint:") && stderr.contains("herald migrate"),
        "{stderr}"
    );
}

#[test]
fn urls_of_other_databases_are_refused_with_the_forms_accepted() {
    let dir = tempfile::tempdir().unwrap();
    for url in ["mysql://localhost/app", "herald.db"] {
        let stderr = failure(herald(dir.path(), &["migrate", "--database-url", url]));
        assert!(stderr.starts_with("error: "), "{stderr}");
        assert!(
            stderr.contains("hint:") && stderr.contains("sqlite://"),
            "{stderr}"
        );
    }
    let stderr = failure(herald(dir.path(), &["outbox", "status"]));
    assert!(
        stderr.contains("--database-url"),
        "the URL is required: {stderr}"
    );
}

#[test]
fn an_unreachable_postgres_is_reported_without_its_password() {
    let dir = tempfile::tempdir().unwrap();
    // A port nothing listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgres://herald:hunter2@127.0.0.1:{port}/app");
    let stderr = failure(herald(dir.path(), &["migrate", "--database-url", &url]));
    assert!(
        stderr.starts_with(&format!(
            "error: cannot connect to postgres://herald:***@127.0.0.1:{port}/app"
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");
    assert!(
        stderr.contains("hint:") && stderr.contains("pg_isready"),
        "{stderr}"
    );
}

#[test]
fn postgres_migrate_and_status() {
    let runtime = runtime();
    let Some(server) = herald_testkit::shared_postgres() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let url = runtime
        .block_on(server.create_database("outbox_cli"))
        .unwrap();
    let first = success(herald(dir.path(), &["migrate", "--database-url", &url]));
    assert_eq!(
        first,
        "applied 1000000001 herald outbox inbox checkpoints\n\
         applied 1000000002 herald inbox handled_at index\n"
    );
    let again = success(herald(dir.path(), &["migrate", "--database-url", &url]));
    assert_eq!(again, "nothing to apply: the database is up to date\n");
    let status = status_json(dir.path(), &url);
    assert_eq!(status["database"], "postgres");
    assert_eq!(status["backlog"], 0);
    assert_eq!(status["free_partitions"].as_array().unwrap().len(), 32);

    // A database that does not exist.
    let missing = server.database_url("no_such_database");
    let stderr = failure(herald(dir.path(), &["migrate", "--database-url", &missing]));
    assert!(
        stderr.contains("hint:") && stderr.contains("createdb"),
        "{stderr}"
    );
}

fn status_json(dir: &Path, url: &str) -> Value {
    let output = success(herald(
        dir,
        &["outbox", "status", "--database-url", url, "--json"],
    ));
    serde_json::from_str(&output).unwrap()
}

async fn sqlite_pool(url: &str) -> Pool<Sqlite> {
    let options = sqlx::sqlite::SqliteConnectOptions::from_str(url).unwrap();
    sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(herald_sql::sqlite_configure(options))
        .await
        .unwrap()
}
