//! Helpers shared by the CLI's integration tests that run `herald` on a data directory.
#![allow(dead_code, unreachable_pub)]

use std::path::Path;
use std::process::{Command, Output};

pub mod http;

/// Runs `herald --data-dir DIR ARGS…`.
pub fn herald(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_herald"))
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .env_remove("HERALD_DATA_DIR")
        .env_remove("RUST_LOG")
        .output()
        .expect("the herald binary runs")
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
