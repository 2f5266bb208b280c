//! Throwaway services for Herald's tests, started from the binaries installed on the machine.
//!
//! Today: a private PostgreSQL ([`PostgresServer`]). Each server lives in a temporary
//! directory of its own, listens on a free port of `127.0.0.1` (and a unix socket in that
//! directory), trusts every local connection, and is stopped and deleted when dropped — or,
//! if the test process never drops it (a `static`, a crash), when the process exits: a small
//! watchdog process, tied to the test process by a pipe, stops the server and removes the
//! directory as soon as the pipe closes.
//!
//! # Skip policy
//!
//! A plain `cargo test` must pass on a machine without the services, so tests ask through
//! [`require_postgres`] or [`shared_postgres`], which return `None` — after printing a
//! visible `skipped: …` line to stderr — where PostgreSQL is not installed. With
//! `HERALD_REQUIRE_SERVICES=1` (set by CI) a missing service is a failure instead: they
//! panic with what to install. A service that is installed but fails to start is always a
//! failure, never a skip.
//!
//! # Contract
//!
//! - [`PostgresServer::start`] returns only once the server accepts connections (it waits
//!   with `pg_ctl start -w`, bounded by [`PostgresOptions::startup_timeout_s`]).
//! - Dropping a [`PostgresServer`] stops it (`pg_ctl stop -m fast`, then `SIGKILL` to the
//!   postmaster if that fails) and removes its directory before `drop` returns.
//! - Servers are independent: each has its own directory, port and processes, so tests may
//!   start several at once.

#![forbid(unsafe_code)]

mod postgres;

pub use postgres::{
    DATABASE_NAME_LEN_MAX, Error, POSTGRES_BINDIR_ENV, PostgresOptions, PostgresServer,
    require_postgres, shared_postgres,
};

/// Whether process `pid` is running: it exists and is not a zombie (reads Linux's
/// `/proc`). Tests use it to check that a server or a child process is gone.
pub fn process_running(pid: u32) -> bool {
    postgres::process_running(pid)
}

/// The environment variable that turns a missing service from a skip into a failure.
pub const REQUIRE_SERVICES_ENV: &str = "HERALD_REQUIRE_SERVICES";

/// Whether missing services must fail the tests (`HERALD_REQUIRE_SERVICES` is set to
/// anything but empty or `0`).
pub fn services_required() -> bool {
    std::env::var_os(REQUIRE_SERVICES_ENV).is_some_and(|value| !value.is_empty() && value != "0")
}
