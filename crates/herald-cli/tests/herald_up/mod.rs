//! A real `herald up` process for the tests that configure it, kill it or talk to it from
//! another language, and a one-shot HTTP/1.1 request for the tests that need no keep-alive
//! client.
#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};

use serde_json::Value;

/// The variables `herald up` reads; the tests set the ones they mean and remove the rest, so
/// that the developer's own environment cannot change what a test sees.
pub const HERALD_VARIABLES: [&str; 6] = [
    "HERALD_CONFIG",
    "HERALD_DATA_DIR",
    "HERALD_LISTEN",
    "HERALD_BODY_SIZE_MAX_BYTES",
    "HERALD_TOKENS",
    "RUST_LOG",
];

/// `herald up` run in `cwd`, with none of [`HERALD_VARIABLES`] set; add flags and variables
/// before [`HeraldUp::spawn`].
pub fn command(cwd: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_herald"));
    command.arg("up").current_dir(cwd);
    for variable in HERALD_VARIABLES {
        command.env_remove(variable);
    }
    command
}

/// A running `herald up`.
pub struct HeraldUp {
    child: Child,
    addr: SocketAddr,
}

impl HeraldUp {
    /// Spawns `command` and reads the address it prints once listening; panics, with what
    /// the process printed, if it exits instead.
    pub fn spawn(mut command: Command) -> HeraldUp {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("herald up starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout is piped"))
            .read_line(&mut line)
            .expect("the output of herald up is readable");
        if line.is_empty() {
            let status = child.wait().expect("herald up exits");
            panic!("herald up exited ({status}) before listening; its error is above");
        }
        let printed: Value = serde_json::from_str(&line)
            .unwrap_or_else(|error| panic!("herald up printed {line:?}: {error}"));
        let addr = printed["listen"]
            .as_str()
            .and_then(|addr| addr.parse().ok())
            .unwrap_or_else(|| panic!("herald up printed no address: {line:?}"));
        HeraldUp { child, addr }
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Kills it with SIGKILL: no shutdown, no sync, no unlock.
    pub fn kill_9(mut self) {
        self.child.kill().expect("SIGKILL is delivered");
        self.child.wait().expect("herald up is reaped");
    }

    /// Sends SIGTERM and waits for it to exit.
    pub fn terminate(mut self) -> ExitStatus {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(sent.success(), "SIGTERM is delivered");
        self.child.wait().expect("herald up exits")
    }
}

impl Drop for HeraldUp {
    fn drop(&mut self) {
        // A failed test must not leave a server behind; after `kill_9` or `terminate` the
        // process is already reaped and this does nothing.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The status and body of a response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

impl Response {
    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|error| panic!("not JSON ({error}): {}", self.body))
    }
}

/// Sends one request on a new connection (`Connection: close`) and reads the whole response.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    let mut socket = TcpStream::connect(addr).expect("herald up accepts connections");
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nhost: herald\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    socket.write_all(head.as_bytes()).unwrap();
    socket.write_all(body).unwrap();
    let mut raw = Vec::new();
    socket.read_to_end(&mut raw).unwrap();
    let raw = String::from_utf8(raw).expect("the response is UTF-8");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a complete response");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|status| status.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Response { status, body }
}

/// Joins the chunks of a chunked body.
fn dechunk(mut chunked: &str) -> String {
    let mut body = String::new();
    loop {
        let (size, rest) = chunked.split_once("\r\n").expect("a chunk size line");
        let size = usize::from_str_radix(size.trim(), 16).expect("a hex chunk size");
        if size == 0 {
            return body;
        }
        body.push_str(&rest[..size]);
        chunked = &rest[size + 2..];
    }
}
