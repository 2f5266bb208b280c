//! [`PostgresServer`]: a private PostgreSQL in a temporary directory.

use std::fmt;
use std::io::{self, Read as _, Seek as _, SeekFrom, Write as _};
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;

use sqlx::Connection as _;

use crate::{REQUIRE_SERVICES_ENV, services_required};

/// The longest database name PostgreSQL keeps (`NAMEDATALEN - 1`).
pub const DATABASE_NAME_LEN_MAX: usize = 63;

/// The environment variable naming the directory of PostgreSQL's server binaries, to
/// choose a version, or (set to a directory without them) to see the tests skip.
pub const POSTGRES_BINDIR_ENV: &str = "HERALD_POSTGRES_BINDIR";

/// How many bytes of the server log an error quotes at most (its end).
const LOG_TAIL_BYTES_MAX: u64 = 4_096;

/// How long `pg_ctl stop` may wait for the server to shut down before the postmaster is
/// killed.
const STOP_TIMEOUT_S: u32 = 30;

/// How often a stopping server is checked for having exited.
const EXIT_POLL_INTERVAL: std::time::Duration = std::time::Duration::from_millis(10);

/// The user PostgreSQL runs as when the tests run as root (`initdb` refuses root).
const POSTGRES_USER: &str = "postgres";

/// How a [`PostgresServer`] is set up. Every bound is named with its unit last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresOptions {
    /// Whether commits are synced to disk (`fsync`, `synchronous_commit` and
    /// `full_page_writes` on, PostgreSQL's defaults). Off by default: a throwaway server
    /// does not need to survive a power loss, and tests run faster without syncs. A
    /// benchmark that compares against raw `INSERT`s with real syncs turns it on.
    pub durable: bool,
    /// How long `pg_ctl start -w` waits for the server to accept connections.
    pub startup_timeout_s: u32,
    /// How many ports to try: a free port found by binding port 0 can be taken by another
    /// process before the server binds it, and the start is then retried on a new one.
    pub port_attempts_max: u32,
    /// The server's `max_connections`.
    pub connections_max: u32,
}

impl PostgresOptions {
    /// The defaults: not durable, 60 s to start, 5 ports, 200 connections.
    pub fn new() -> Self {
        PostgresOptions {
            durable: false,
            startup_timeout_s: 60,
            port_attempts_max: 5,
            connections_max: 200,
        }
    }

    /// Sets [`durable`](Self::durable).
    pub fn durable(mut self, durable: bool) -> Self {
        self.durable = durable;
        self
    }

    /// Starts a server with these options; see [`PostgresServer::start`].
    pub fn start(self) -> Result<PostgresServer, Error> {
        let bindir = find_bindir().ok_or(Error::NotInstalled)?;
        PostgresServer::start_in(&bindir, self)
    }
}

impl Default for PostgresOptions {
    fn default() -> Self {
        Self::new()
    }
}

/// Why a server could not be started or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No PostgreSQL server binaries were found.
    #[error(
        "PostgreSQL is not installed: no `initdb` via `pg_config --bindir` nor in \
         /usr/lib/postgresql/*/bin (install Debian's `postgresql` package)"
    )]
    NotInstalled,
    /// A command failed.
    #[error("`{command}` failed ({status}): {output}")]
    Command {
        /// The command, as run.
        command: String,
        /// Its exit status.
        status: String,
        /// What it printed, and the end of the server log where there is one.
        output: String,
    },
    /// A file-system or process operation failed.
    #[error("{action} failed")]
    Io {
        /// What was being done.
        action: String,
        /// The failure.
        #[source]
        source: io::Error,
    },
    /// A database name that is not a plain lower-case identifier.
    #[error(
        "invalid database name `{name}`: use 1 to {DATABASE_NAME_LEN_MAX} characters among \
         `a-z`, `0-9` and `_`, not starting with a digit"
    )]
    InvalidDatabaseName {
        /// The name given.
        name: String,
    },
    /// A statement sent to the server failed.
    #[error("statement failed")]
    Sql(#[source] sqlx::Error),
}

fn io_error(action: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let action = action.into();
    move |source| Error::Io { action, source }
}

/// A private PostgreSQL server: started by [`PostgresServer::start`], stopped and deleted
/// on drop (see the [crate documentation](crate) for the contract).
///
/// Every local connection is trusted; the superuser is `postgres`.
pub struct PostgresServer {
    /// Removed on drop, after the server has stopped. `None` once dropped.
    dir: Option<tempfile::TempDir>,
    data_dir: PathBuf,
    port: u16,
    bindir: PathBuf,
    /// Whether the server's commands run as [`POSTGRES_USER`] (the tests run as root).
    as_postgres_user: bool,
    /// Stops the server and removes the directory when this process exits without
    /// dropping the server; see [`spawn_watchdog`].
    watchdog: Option<Child>,
}

impl fmt::Debug for PostgresServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresServer")
            .field("data_dir", &self.data_dir)
            .field("port", &self.port)
            .field("bindir", &self.bindir)
            .finish_non_exhaustive()
    }
}

impl PostgresServer {
    /// Starts a server with the default [`PostgresOptions`] (not durable).
    ///
    /// Blocks the calling thread while `initdb` and the server start (about a second):
    /// call it before a runtime's other work, or through `spawn_blocking`.
    pub fn start() -> Result<PostgresServer, Error> {
        PostgresOptions::new().start()
    }

    fn start_in(bindir: &Path, options: PostgresOptions) -> Result<PostgresServer, Error> {
        let as_postgres_user = running_as_root()?;
        let dir = tempfile::Builder::new()
            .prefix("herald-pg-")
            .tempdir()
            .map_err(io_error("creating the server's temporary directory"))?;
        let socket_dir = dir.path().join("socket");
        std::fs::create_dir(&socket_dir).map_err(io_error("creating the socket directory"))?;
        if as_postgres_user {
            let (uid, gid) = postgres_user_ids()?;
            for path in [dir.path(), socket_dir.as_path()] {
                std::os::unix::fs::chown(path, Some(uid), Some(gid))
                    .map_err(io_error(format!("handing {} to postgres", path.display())))?;
            }
        }
        let data_dir = dir.path().join("data");
        let mut server = PostgresServer {
            watchdog: Some(spawn_watchdog(dir.path())?),
            dir: Some(dir),
            data_dir,
            port: 0,
            bindir: bindir.to_owned(),
            as_postgres_user,
        };

        let mut initdb = server.command("initdb");
        initdb
            .arg("--pgdata")
            .arg(&server.data_dir)
            .args(["--username", "postgres", "--auth", "trust"])
            .args(["--encoding", "UTF8", "--locale", "C", "--no-sync"]);
        run(initdb, None)?;
        server.configure(&socket_dir, &options)?;

        for attempt in 1..=options.port_attempts_max.max(1) {
            server.port = free_port()?;
            let mut start = server.command("pg_ctl");
            start
                .arg("start")
                .arg("--pgdata")
                .arg(&server.data_dir)
                .arg("--log")
                .arg(server.log_path())
                .args(["--wait", "--timeout"])
                .arg(options.startup_timeout_s.to_string())
                .args(["-o", &format!("-p {}", server.port)]);
            match run(start, Some(&server.log_path())) {
                Ok(()) => return Ok(server),
                Err(error) if attempt < options.port_attempts_max && port_taken(&error) => {
                    continue;
                }
                Err(error) => return Err(error),
            }
        }
        unreachable!("the last attempt returns")
    }

    /// The URL of the `postgres` database, as the `postgres` superuser.
    pub fn url(&self) -> String {
        self.database_url("postgres")
    }

    /// The URL of database `name`, as the `postgres` superuser.
    pub fn database_url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// The TCP port the server listens on, on `127.0.0.1`.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's data directory (inside its temporary directory).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The process id of the postmaster, read from its `postmaster.pid`.
    pub fn postmaster_pid(&self) -> Result<u32, Error> {
        read_postmaster_pid(&self.data_dir)
    }

    /// Creates database `name` and returns its URL: tests sharing one server each take a
    /// database of their own. `name` is a lower-case identifier (`a-z`, `0-9`, `_`).
    pub async fn create_database(&self, name: &str) -> Result<String, Error> {
        let valid = !name.is_empty()
            && name.len() <= DATABASE_NAME_LEN_MAX
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !valid {
            return Err(Error::InvalidDatabaseName {
                name: name.to_owned(),
            });
        }
        let mut connection = sqlx::PgConnection::connect(&self.url())
            .await
            .map_err(Error::Sql)?;
        // The name is checked above: an identifier needs no quoting.
        sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
            .execute(&mut connection)
            .await
            .map_err(Error::Sql)?;
        connection.close().await.map_err(Error::Sql)?;
        Ok(self.database_url(name))
    }

    fn log_path(&self) -> PathBuf {
        self.data_dir.with_file_name("postgres.log")
    }

    /// A command running `program` from the server's binaries, as the `postgres` user when
    /// the tests run as root.
    fn command(&self, program: &str) -> Command {
        let program = self.bindir.join(program);
        let mut command = if self.as_postgres_user {
            let mut command = Command::new("runuser");
            command.args(["-u", POSTGRES_USER, "--"]).arg(program);
            command
        } else {
            Command::new(program)
        };
        command.stdin(Stdio::null());
        command
    }

    /// Appends the test settings to `postgresql.conf` (appending keeps the file's owner).
    fn configure(&self, socket_dir: &Path, options: &PostgresOptions) -> Result<(), Error> {
        let mut settings = format!(
            "\n# herald-testkit\n\
             listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{}'\n\
             max_connections = {}\n\
             max_wal_size = '1GB'\n",
            socket_dir.display(),
            options.connections_max,
        );
        if !options.durable {
            settings.push_str("fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n");
        }
        let conf = self.data_dir.join("postgresql.conf");
        std::fs::OpenOptions::new()
            .append(true)
            .open(&conf)
            .and_then(|mut file| file.write_all(settings.as_bytes()))
            .map_err(io_error(format!("writing {}", conf.display())))
    }

    /// Stops the server: `pg_ctl stop -m fast`, then `SIGKILL` to the postmaster if that
    /// fails.
    fn stop(&mut self) {
        let Ok(pid) = self.postmaster_pid() else {
            return;
        };
        let mut stop = self.command("pg_ctl");
        stop.arg("stop")
            .arg("--pgdata")
            .arg(&self.data_dir)
            .args(["--mode", "fast", "--wait", "--timeout"])
            .arg(STOP_TIMEOUT_S.to_string());
        // `pg_ctl stop` returns when the pid file is gone, a moment before the postmaster
        // has exited.
        if run(stop, None).is_err() || !exited_within(pid, STOP_TIMEOUT_S) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            exited_within(pid, STOP_TIMEOUT_S);
        }
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        self.stop();
        if let Some(dir) = self.dir.take() {
            let path = dir.path().to_owned();
            if let Err(error) = dir.close() {
                eprintln!(
                    "herald-testkit: removing {} failed: {error}",
                    path.display()
                );
            }
        }
        if let Some(mut watchdog) = self.watchdog.take() {
            // Closing its stdin lets it run: it finds nothing left to stop or remove.
            drop(watchdog.stdin.take());
            let _ = watchdog.wait();
        }
    }
}

/// A private server for this test, or `None` — after a visible `skipped:` line on stderr —
/// where PostgreSQL is not installed and [`services_required`] is false.
///
/// # Panics
///
/// Where PostgreSQL is not installed and `HERALD_REQUIRE_SERVICES=1`, and wherever it is
/// installed but does not start.
pub fn require_postgres() -> Option<PostgresServer> {
    let bindir = installed_or_skip(find_bindir(), services_required())?;
    match PostgresServer::start_in(&bindir, PostgresOptions::new()) {
        Ok(server) => Some(server),
        Err(error) => panic!("PostgreSQL is installed but did not start: {error}"),
    }
}

/// One server shared by every test of this process, started by the first caller; each test
/// then takes a database of its own with [`PostgresServer::create_database`]. The same skip
/// policy as [`require_postgres`].
///
/// The server is never dropped (it is a `static`): its watchdog stops it and removes its
/// directory when the process exits.
///
/// # Panics
///
/// As [`require_postgres`]: a missing PostgreSQL under `HERALD_REQUIRE_SERVICES=1`, or one
/// that does not start (every caller panics then).
pub fn shared_postgres() -> Option<&'static PostgresServer> {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    let shared = SHARED.get_or_init(|| match find_bindir() {
        None => Shared::NotInstalled,
        Some(bindir) => match PostgresServer::start_in(&bindir, PostgresOptions::new()) {
            Ok(server) => Shared::Running(server),
            Err(error) => Shared::Failed(error.to_string()),
        },
    });
    match shared {
        Shared::Running(server) => Some(server),
        Shared::NotInstalled => {
            // Prints the skip, or panics when services are required.
            installed_or_skip(None, services_required());
            None
        }
        Shared::Failed(error) => panic!("PostgreSQL is installed but did not start: {error}"),
    }
}

enum Shared {
    Running(PostgresServer),
    NotInstalled,
    Failed(String),
}

/// Applies the skip policy to what [`find_bindir`] found.
fn installed_or_skip(bindir: Option<PathBuf>, required: bool) -> Option<PathBuf> {
    if bindir.is_some() {
        return bindir;
    }
    if required {
        panic!(
            "{} ({REQUIRE_SERVICES_ENV} is set): install Debian's `postgresql` package \
             (`apt-get install postgresql`, or run scripts/install-test-deps.sh)",
            Error::NotInstalled
        );
    }
    let test = std::thread::current()
        .name()
        .map(|name| format!(" {name}"))
        .unwrap_or_default();
    // Written to the process's stderr, not through `eprintln!`, which the test harness
    // captures: a skip must show in a plain `cargo test`.
    let _ = writeln!(
        io::stderr(),
        "skipped{test}: PostgreSQL not installed (set {REQUIRE_SERVICES_ENV}=1 to fail instead)"
    );
    None
}

/// The directory of the server binaries: [`POSTGRES_BINDIR_ENV`] if set (and only it),
/// else `pg_config --bindir` if it holds `initdb`, else the newest
/// `/usr/lib/postgresql/<version>/bin` that does.
fn find_bindir() -> Option<PathBuf> {
    let has_server = |dir: &Path| {
        ["initdb", "pg_ctl", "postgres"]
            .iter()
            .all(|program| dir.join(program).is_file())
    };
    if let Some(dir) = std::env::var_os(POSTGRES_BINDIR_ENV) {
        let dir = PathBuf::from(dir);
        return has_server(&dir).then_some(dir);
    }
    let from_pg_config = Command::new("pg_config")
        .arg("--bindir")
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()));
    if let Some(dir) = from_pg_config.filter(|dir| has_server(dir)) {
        return Some(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .filter(|(_, dir)| has_server(dir))
        .collect();
    versions.sort();
    versions.pop().map(|(_, dir)| dir)
}

fn running_as_root() -> Result<bool, Error> {
    let output = Command::new("id")
        .arg("-u")
        .output()
        .map_err(io_error("running `id -u`"))?;
    Ok(String::from_utf8_lossy(&output.stdout).trim() == "0")
}

/// The uid and gid of [`POSTGRES_USER`].
fn postgres_user_ids() -> Result<(u32, u32), Error> {
    let id = |flag: &str| -> Result<u32, Error> {
        let mut command = Command::new("id");
        command.args([flag, POSTGRES_USER]);
        let output = command
            .output()
            .map_err(io_error(format!("running `id {flag} {POSTGRES_USER}`")))?;
        String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .map_err(|_| Error::Command {
                command: format!("id {flag} {POSTGRES_USER}"),
                status: output.status.to_string(),
                output: format!(
                    "initdb refuses to run as root, and there is no `{POSTGRES_USER}` user \
                     to run it as (Debian's `postgresql` package creates it): {}",
                    String::from_utf8_lossy(&output.stderr).trim()
                ),
            })
    };
    Ok((id("-u")?, id("-g")?))
}

/// A port of `127.0.0.1` that nothing listens on right now.
fn free_port() -> Result<u16, Error> {
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(io_error("finding a free port"))?;
    let port = listener
        .local_addr()
        .map_err(io_error("finding a free port"))?
        .port();
    Ok(port)
}

/// Whether a failed start failed because another process took the port.
fn port_taken(error: &Error) -> bool {
    matches!(error, Error::Command { output, .. }
        if output.contains("could not bind") || output.contains("Address already in use"))
}

/// Runs `command` to completion; a failure carries its output and the end of `log`.
fn run(mut command: Command, log: Option<&Path>) -> Result<(), Error> {
    let description = format!("{command:?}");
    let Output {
        status,
        stdout,
        stderr,
    } = command
        .output()
        .map_err(io_error(format!("running {description}")))?;
    if status.success() {
        return Ok(());
    }
    let mut output = format!(
        "{}{}",
        String::from_utf8_lossy(&stdout),
        String::from_utf8_lossy(&stderr)
    );
    if let Some(log) = log {
        output.push_str("\nserver log (end):\n");
        output.push_str(&log_tail(log));
    }
    Err(Error::Command {
        command: description,
        status: status.to_string(),
        output,
    })
}

fn log_tail(path: &Path) -> String {
    let read = || -> io::Result<String> {
        let mut file = std::fs::File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES_MAX)))?;
        let mut tail = Vec::new();
        file.read_to_end(&mut tail)?;
        Ok(String::from_utf8_lossy(&tail).into_owned())
    };
    read().unwrap_or_else(|error| format!("(unreadable: {error})"))
}

fn read_postmaster_pid(data_dir: &Path) -> Result<u32, Error> {
    let path = data_dir.join("postmaster.pid");
    let text =
        std::fs::read_to_string(&path).map_err(io_error(format!("reading {}", path.display())))?;
    text.lines()
        .next()
        .and_then(|line| line.trim().parse().ok())
        .ok_or_else(|| Error::Io {
            action: format!("reading {}", path.display()),
            source: io::Error::new(io::ErrorKind::InvalidData, "no process id on line 1"),
        })
}

/// Whether process `pid` is running: it exists and is not a zombie (Linux `/proc`).
pub(crate) fn process_running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Polls until process `pid` is no longer running, at most `timeout_s`; whether it exited.
fn exited_within(pid: u32, timeout_s: u32) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(timeout_s.into());
    while process_running(pid) {
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(EXIT_POLL_INTERVAL);
    }
    true
}

/// The cleanup a test process that never drops its server (a `static`, a crash, a
/// `kill -9`) still gets: a shell waiting on a pipe whose only writer is this process.
/// When the process exits the pipe closes, and the shell interrupts the postmaster (fast
/// shutdown), waits for it (at most 10 s, then kills it) and removes the directory. On an
/// ordinary drop the server is already gone and the shell finds nothing to do.
fn spawn_watchdog(dir: &Path) -> Result<Child, Error> {
    const SCRIPT: &str = r#"
cat > /dev/null
pid=$(head -n 1 "$1/data/postmaster.pid" 2>/dev/null)
if [ -n "$pid" ]; then
  kill -INT "$pid" 2>/dev/null
  i=0
  while kill -0 "$pid" 2>/dev/null && [ "$i" -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
  kill -KILL "$pid" 2>/dev/null
fi
rm -rf "$1"
"#;
    Command::new("sh")
        .args(["-c", SCRIPT, "herald-testkit-watchdog"])
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(io_error("starting the server's watchdog"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_postgres_is_skipped_when_services_are_optional() {
        assert_eq!(installed_or_skip(None, false), None);
        let found = PathBuf::from("/usr/lib/postgresql/15/bin");
        assert_eq!(installed_or_skip(Some(found.clone()), true), Some(found));
    }

    #[test]
    #[should_panic(expected = "PostgreSQL is not installed")]
    fn a_missing_postgres_fails_when_services_are_required() {
        installed_or_skip(None, true);
    }

    #[test]
    fn a_taken_port_is_recognised_in_the_server_log() {
        let taken = Error::Command {
            command: "pg_ctl start".to_owned(),
            status: "exit status: 1".to_owned(),
            output: "LOG:  could not bind IPv4 address \"127.0.0.1\": Address already in use"
                .to_owned(),
        };
        assert!(port_taken(&taken));
        let other = Error::Command {
            command: "pg_ctl start".to_owned(),
            status: "exit status: 1".to_owned(),
            output: "FATAL:  data directory has wrong ownership".to_owned(),
        };
        assert!(!port_taken(&other));
    }
}
