//! Helpers shared by the CLI's integration tests: running `herald` on a data directory and
//! reading what it printed, following a long-running `herald` line by line, reading a data
//! directory back, and ([`http`]) a real `herald up` with a client to it.
//!
//! Every `herald` started here runs without the `HERALD_*` and `RUST_LOG` variables of the
//! caller's environment, unless a test sets them, so that the developer's own settings cannot
//! change what a test sees.
#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::sync::mpsc;

use herald_core::{Direction, EventStore as _, Position, RecordedEvent};
use herald_log::Log;

pub mod http;

/// Events per read when a test reads a whole log back.
pub const PAGE_LEN: usize = 1_000;
/// Worker threads of [`runtime_multi_thread`]: as many as the test machines have cores.
pub const RUNTIME_WORKERS: usize = 2;

/// `herald --data-dir DIR`, without `HERALD_DATA_DIR` and `RUST_LOG`; add the subcommand and
/// its arguments.
pub fn herald_command(dir: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_herald"));
    command
        .arg("--data-dir")
        .arg(dir)
        .env_remove("HERALD_DATA_DIR")
        .env_remove("RUST_LOG");
    command
}

/// Runs `herald --data-dir DIR ARGS…` with empty standard input.
pub fn herald(dir: &Path, args: &[&str]) -> Output {
    herald_with_stdin(dir, args, b"")
}

/// Runs `herald --data-dir DIR ARGS…`, feeding `stdin` to it.
pub fn herald_with_stdin(dir: &Path, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = herald_command(dir)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the herald binary starts");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

/// Starts a long-running `command` (see [`herald_command`]) with standard input closed and
/// standard error passed through; its standard output is read line by line ([`read_lines`]).
pub fn spawn_lines(mut command: Command) -> (Child, mpsc::Receiver<String>) {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the herald binary starts");
    let lines = read_lines(child.stdout.take().expect("stdout is piped"));
    (child, lines)
}

/// The standard output of a run that must succeed.
pub fn success(output: Output) -> String {
    assert!(
        output.status.success(),
        "herald failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// The standard error of a run that must fail.
pub fn failure(output: Output) -> String {
    assert!(
        !output.status.success(),
        "herald should have failed; it printed {}",
        String::from_utf8_lossy(&output.stdout)
    );
    String::from_utf8(output.stderr).unwrap()
}

/// Reads complete lines from `stdout` on a thread, as they come; a partial last line (the
/// process was killed while printing it) is dropped. The receiver disconnects at the end of
/// the pipe.
pub fn read_lines(stdout: ChildStdout) -> mpsc::Receiver<String> {
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) if !line.ends_with('\n') => return,
                Ok(_) => {
                    if sender.send(line).is_err() {
                        return;
                    }
                }
            }
        }
    });
    receiver
}

/// Every event of `log`, in position order, read [`PAGE_LEN`] at a time.
pub async fn read_all(log: &Log) -> Vec<RecordedEvent> {
    let mut all = Vec::new();
    loop {
        let from = Position(all.len() as u64);
        let page = log
            .read_all(from, Direction::Forward, PAGE_LEN)
            .await
            .unwrap();
        let done = page.len() < PAGE_LEN;
        all.extend(page);
        if done {
            return all;
        }
    }
}

/// A runtime on the calling thread, for a synchronous test that awaits some setup or check.
pub fn runtime_current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime starts")
}

/// A runtime with [`RUNTIME_WORKERS`] worker threads, for a test whose tasks run while its
/// own thread drives processes.
pub fn runtime_multi_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(RUNTIME_WORKERS)
        .enable_all()
        .build()
        .expect("a tokio runtime starts")
}

/// The number in the variable `name`, or `default` when it is not set; a test setting that
/// is not a number fails the test.
pub fn env_or(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, not {value:?}")),
        Err(_) => default,
    }
}
