//! The SQL database of the outbox commands (`herald migrate`, `herald outbox`, `herald debug
//! relay`): named by `--database-url` or `HERALD_DATABASE_URL`, on PostgreSQL or SQLite, and
//! the hints shown under the errors of reaching it.
//!
//! URLs: `postgres://user:password@host:port/database` (or `postgresql://`, with sqlx's
//! query parameters), and `sqlite://path` or `sqlite:path`, where `?mode=rwc` creates a
//! missing file. SQLite databases are opened with Herald's settings (write-ahead log,
//! `synchronous = FULL`, a busy timeout: [`herald_sql::sqlite_configure`]). A URL is never
//! printed with its password.

use std::str::FromStr as _;
use std::time::Duration;

use clap::Args;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use sqlx::{ConnectOptions as _, Connection as _};
use sqlx::{PgPool, SqlitePool};

/// How long connecting to the database may take before the command gives up.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The `--database-url` option of the commands that work on a SQL database.
#[derive(Debug, Args)]
pub(crate) struct DatabaseArgs {
    /// The database: postgres://user:password@host:port/database, or sqlite://path (add
    /// ?mode=rwc to create a missing file)
    #[arg(
        long,
        env = "HERALD_DATABASE_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub(crate) database_url: String,
}

/// A connected database: a pool of one of the two backends.
#[derive(Debug, Clone)]
pub(crate) enum Database {
    /// PostgreSQL.
    Postgres(PgPool),
    /// SQLite.
    Sqlite(SqlitePool),
}

/// Runs `$body` with `$pool` bound to the sqlx pool of whichever backend `$database` is:
/// the body is compiled once per backend, so it may call the generic `herald_sql` API.
macro_rules! with_pool {
    ($database:expr, $pool:ident => $body:expr) => {
        match $database {
            $crate::database::Database::Postgres($pool) => $body,
            $crate::database::Database::Sqlite($pool) => $body,
        }
    };
}
pub(crate) use with_pool;

impl Database {
    /// `postgres` or `sqlite`.
    pub(crate) fn backend(&self) -> &'static str {
        match self {
            Database::Postgres(_) => "postgres",
            Database::Sqlite(_) => "sqlite",
        }
    }

    /// Closes every connection of the pool.
    pub(crate) async fn close(&self) {
        with_pool!(self, pool => pool.close().await);
    }
}

/// Why the database could not be reached.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// The URL does not parse.
    #[error("`{url}` is not a database URL")]
    InvalidUrl {
        /// The URL, without its password.
        url: String,
        /// Why, when the driver said.
        #[source]
        source: Option<sqlx::Error>,
    },
    /// The URL names a database Herald does not run on.
    #[error("unsupported database `{scheme}` in `{url}`")]
    UnsupportedScheme {
        /// The URL's scheme.
        scheme: String,
        /// The URL, without its password.
        url: String,
    },
    /// Connecting failed.
    #[error("cannot connect to {url}")]
    Connect {
        /// The URL, without its password.
        url: String,
        /// Whether it is PostgreSQL (else SQLite).
        postgres: bool,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
}

/// Connects to the database at `url`, with at most `connections_max` connections.
pub(crate) async fn connect(url: &str, connections_max: u32) -> Result<Database, Error> {
    let shown = redacted(url);
    let scheme = url
        .split_once(':')
        .map(|(scheme, _)| scheme)
        .filter(|scheme| !scheme.is_empty() && !scheme.contains('/'))
        .ok_or_else(|| Error::InvalidUrl {
            url: shown.clone(),
            source: None,
        })?;
    let invalid = |source| Error::InvalidUrl {
        url: shown.clone(),
        source: Some(source),
    };
    let connect_failed = |postgres, source| Error::Connect {
        url: shown.clone(),
        postgres,
        source,
    };
    match scheme {
        "postgres" | "postgresql" => {
            let options = PgConnectOptions::from_str(url).map_err(invalid)?;
            // One connection first, alone: the pool retries a refused connection until its
            // timeout and then reports only the timeout, not why.
            let probe = tokio::time::timeout(CONNECT_TIMEOUT, options.connect())
                .await
                .unwrap_or_else(|_| {
                    Err(sqlx::Error::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no answer within {} s", CONNECT_TIMEOUT.as_secs()),
                    )))
                })
                .map_err(|source| connect_failed(true, source))?;
            let _ = probe.close().await;
            let pool = PgPoolOptions::new()
                .max_connections(connections_max)
                .acquire_timeout(CONNECT_TIMEOUT)
                .connect_with(options)
                .await
                .map_err(|source| connect_failed(true, source))?;
            Ok(Database::Postgres(pool))
        }
        "sqlite" => {
            let options = SqliteConnectOptions::from_str(url).map_err(invalid)?;
            let pool = SqlitePoolOptions::new()
                .max_connections(connections_max)
                .acquire_timeout(CONNECT_TIMEOUT)
                .connect_with(herald_sql::sqlite_configure(options))
                .await
                .map_err(|source| connect_failed(false, source))?;
            Ok(Database::Sqlite(pool))
        }
        other => Err(Error::UnsupportedScheme {
            scheme: other.to_owned(),
            url: shown,
        }),
    }
}

/// `url` with its password replaced by `***`, to be printed.
pub(crate) fn redacted(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            // Only URLs that cannot have a password refuse one.
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        Ok(_) => url.to_owned(),
        // Unparsable: whatever precedes an `@` may be credentials.
        Err(_) => match (url.split_once("://"), url.rsplit_once('@')) {
            (Some((scheme, _)), Some((_, host))) => format!("{scheme}://***@{host}"),
            _ => url.to_owned(),
        },
    }
}

/// The forms of URL the commands take, for hints.
const URL_FORMS: &str = "postgres://user:password@host:5432/database, or \
                         sqlite://path/to/herald.db?mode=rwc (mode=rwc creates the file)";

/// What the user can do about `error`, when it is a database error they can act on.
pub(crate) fn hint(error: &anyhow::Error) -> Option<String> {
    error.chain().find_map(|cause| {
        if let Some(error) = cause.downcast_ref::<Error>() {
            return Some(connect_hint(error));
        }
        if let Some(herald_sql::Error::Migrate(error)) = cause.downcast_ref::<herald_sql::Error>() {
            return migrate_hint(error);
        }
        cause.downcast_ref::<sqlx::Error>().and_then(sql_hint)
    })
}

fn connect_hint(error: &Error) -> String {
    match error {
        Error::InvalidUrl { .. } | Error::UnsupportedScheme { .. } => {
            format!("give --database-url (or HERALD_DATABASE_URL) as {URL_FORMS}")
        }
        Error::Connect {
            postgres: true,
            source,
            ..
        } => match database_code(source).as_deref() {
            // invalid_password, invalid_authorization_specification
            Some("28P01" | "28000") => {
                "check the user name and the password in the URL (a password with special \
                 characters must be percent-encoded)"
                    .to_owned()
            }
            // invalid_catalog_name
            Some("3D000") => "create the database first (`createdb NAME`), or name an \
                              existing one in the URL's path"
                .to_owned(),
            _ => "check that PostgreSQL is running and accepts TCP connections at the URL's \
                  host and port (`pg_isready -h HOST -p PORT` tells), and that the URL is right"
                .to_owned(),
        },
        Error::Connect {
            postgres: false, ..
        } => "check the path of the SQLite file and its directory's permissions; add \
              ?mode=rwc to the URL to create a missing file"
            .to_owned(),
    }
}

fn migrate_hint(error: &sqlx::migrate::MigrateError) -> Option<String> {
    use sqlx::migrate::MigrateError;
    match error {
        MigrateError::Dirty(version) => Some(format!(
            "migration {version} failed partway in an earlier run: repair the schema by hand, \
             then delete its row from _sqlx_migrations and run `herald migrate` again"
        )),
        MigrateError::VersionMismatch(version) => Some(format!(
            "migration {version} applied in this database differs from the one this herald \
             ships: the database was migrated by another version of Herald"
        )),
        MigrateError::Execute(error) => sql_hint(error),
        _ => None,
    }
}

fn sql_hint(error: &sqlx::Error) -> Option<String> {
    let sqlx::Error::Database(database) = error else {
        return None;
    };
    // PostgreSQL's undefined_table, SQLite's message.
    let undefined_table = database.code().as_deref() == Some("42P01")
        || database.message().starts_with("no such table");
    undefined_table.then(|| {
        "Herald's tables are missing: run `herald migrate --database-url URL` on this \
         database first"
            .to_owned()
    })
}

/// The SQLSTATE (PostgreSQL) or result code (SQLite) of a database error.
fn database_code(error: &sqlx::Error) -> Option<String> {
    match error {
        sqlx::Error::Database(database) => database.code().map(|code| code.into_owned()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_not_shown() {
        assert_eq!(
            redacted("postgres://herald:hunter2@db.example:5432/app"),
            "postgres://herald:***@db.example:5432/app"
        );
        assert_eq!(
            redacted("postgres://herald@db.example/app"),
            "postgres://herald@db.example/app"
        );
        assert_eq!(
            redacted("sqlite://data/herald.db?mode=rwc"),
            "sqlite://data/herald.db?mode=rwc"
        );
        assert!(!redacted("postgres://u:hunter2@[bad/app").contains("hunter2"));
    }

    #[tokio::test]
    async fn urls_herald_cannot_use_are_refused_with_a_hint() {
        for url in [
            "mysql://localhost/app",
            "no-scheme",
            "://x",
            "/path/herald.db",
        ] {
            let error = connect(url, 1).await.unwrap_err();
            assert!(
                matches!(
                    error,
                    Error::InvalidUrl { .. } | Error::UnsupportedScheme { .. }
                ),
                "{url}: {error:?}"
            );
            let hint = hint(&anyhow::Error::new(error)).unwrap();
            assert!(hint.contains("sqlite://"), "{hint}");
        }
    }
}
