//! A real `herald up` process on a free port, with a keep-alive HTTP client to it, for the
//! tests that configure it, talk to it, `kill -9` it or stop it with SIGTERM; and a reader of
//! Server-Sent Events.
//!
//! Contract: a [`Herald`] is listening once it is returned (it printed its `{"listen": …}`
//! line), and its process is killed and reaped when it is dropped, so that a failed test
//! leaves no server behind. The client needs a tokio runtime only when a request is sent.

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};

use http_body_util::{BodyExt as _, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

/// The variables `herald up` reads; the tests set the ones they mean and remove the rest, so
/// that the developer's own environment cannot change what a test sees.
pub const HERALD_VARIABLES: [&str; 9] = [
    "HERALD_CONFIG",
    "HERALD_DATA_DIR",
    "HERALD_LISTEN",
    "HERALD_BODY_SIZE_MAX_BYTES",
    "HERALD_TOKENS",
    "HERALD_NO_ORDERS",
    "HERALD_FAIL_PAYMENT_RATE",
    "HERALD_TRANSIENT_ERROR_RATE",
    "RUST_LOG",
];

/// `herald up` run in `cwd`, with none of [`HERALD_VARIABLES`] set; add flags and variables
/// before [`Herald::spawn`], or run it to completion for a start that must fail.
pub fn command(cwd: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_herald"));
    command.arg("up").current_dir(cwd);
    for variable in HERALD_VARIABLES {
        command.env_remove(variable);
    }
    command
}

/// The standard error of a `herald up` (run with `command(…).output()`) that must fail
/// before listening.
pub fn failure_to_start(output: Output) -> String {
    assert!(
        !output.status.success(),
        "herald up should have failed; it printed {}",
        String::from_utf8_lossy(&output.stdout)
    );
    assert!(output.stdout.is_empty(), "it never listened");
    String::from_utf8(output.stderr).expect("the error of herald up is UTF-8")
}

/// A running `herald up` and a keep-alive client to it.
pub struct Herald {
    child: Child,
    addr: SocketAddr,
    client: Client<HttpConnector, Full<Bytes>>,
}

/// One response, its body parsed as JSON when it is JSON.
#[derive(Debug)]
pub struct Reply {
    /// The status.
    pub status: StatusCode,
    /// The `Content-Type`, or empty.
    pub content_type: String,
    /// The response headers.
    pub headers: hyper::HeaderMap,
    /// The body: JSON, or a JSON string holding the text.
    pub body: Value,
}

impl Herald {
    /// Starts `herald up ARGS…` on a free port of the loopback, with `dir` as its data
    /// directory and working directory.
    pub fn start(dir: &Path, args: &[&str]) -> Herald {
        Herald::start_with_env(dir, args, &[])
    }

    /// [`Herald::start`] with `env` set in the process's environment.
    pub fn start_with_env(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Herald {
        let mut up = command(dir);
        up.args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir)
            .args(args);
        for (name, value) in env {
            up.env(name, value);
        }
        Herald::spawn(up)
    }

    /// Spawns `command` (see [`command`]) and reads the address it prints once listening;
    /// panics, with what the process printed, if it exits instead.
    pub fn spawn(mut command: Command) -> Herald {
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
        Herald {
            child,
            addr,
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Kills it with SIGKILL and reaps it: no shutdown, no sync, no unlock.
    pub fn kill_9(mut self) {
        self.child.kill().expect("SIGKILL is delivered");
        self.child.wait().expect("herald up is reaped");
    }

    /// Sends SIGTERM and waits for it to exit.
    pub fn terminate(self) -> ExitStatus {
        self.sigterm();
        self.wait()
    }

    /// Sends SIGTERM and returns at once, so that a test can watch the shutdown; then
    /// [`Herald::wait`].
    pub fn sigterm(&self) {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(sent.success(), "SIGTERM is delivered");
    }

    /// Waits for it to exit, after [`Herald::sigterm`].
    pub fn wait(mut self) -> ExitStatus {
        self.child.wait().expect("herald up exits")
    }

    /// Sends a request and reads the whole response.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Result<Reply, hyper_util::client::legacy::Error> {
        let response = self.open(method, path, headers, body).await?;
        let status = response.status();
        let headers = response.headers().clone();
        let content_type = headers
            .get("content-type")
            .map(|value| value.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let body = if content_type.contains("json") {
            serde_json::from_slice(&bytes).unwrap()
        } else {
            Value::String(String::from_utf8_lossy(&bytes).into_owned())
        };
        Ok(Reply {
            status,
            content_type,
            headers,
            body,
        })
    }

    /// Sends a request and returns the response as soon as its head arrives, its body
    /// unread: for live responses.
    pub async fn open(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        self.client
            .request(request.body(Full::new(body.into())).unwrap())
            .await
    }

    /// `POST`s `body` as `content_type`.
    pub async fn post(&self, path: &str, content_type: &str, body: impl Into<Bytes>) -> Reply {
        self.send(Method::POST, path, &[("content-type", content_type)], body)
            .await
            .unwrap()
    }

    /// `GET`s `path`.
    pub async fn get(&self, path: &str) -> Reply {
        self.send(Method::GET, path, &[], Bytes::new())
            .await
            .unwrap()
    }
}

impl Drop for Herald {
    fn drop(&mut self) {
        // A failed test must not leave a server behind; after `kill_9`, `terminate` or
        // `wait` the process is already reaped and this does nothing.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One Server-Sent Event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `id:` field.
    pub id: Option<String>,
    /// The `event:` field.
    pub event: Option<String>,
    /// The `data:` lines, joined with newlines.
    pub data: String,
}

/// Reads Server-Sent Events from a response body as they arrive.
pub struct SseReader {
    body: Incoming,
    buffer: String,
}

impl SseReader {
    /// Reads the body of `response`.
    pub fn new(response: Response<Incoming>) -> Self {
        SseReader {
            body: response.into_body(),
            buffer: String::new(),
        }
    }

    /// The next event, comments skipped; `None` once the response ended.
    pub async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                if let Some(event) = parse_event(&block) {
                    return Some(event);
                }
                continue;
            }
            let frame = match self.body.frame().await? {
                Ok(frame) => frame,
                // The connection went away: the response ended, though not cleanly.
                Err(_) => return None,
            };
            if let Ok(data) = frame.into_data() {
                self.buffer
                    .push_str(std::str::from_utf8(&data).expect("SSE is UTF-8"));
            }
        }
    }
}

/// One event block; `None` for a block of comments only.
fn parse_event(block: &str) -> Option<SseEvent> {
    let mut event = SseEvent {
        id: None,
        event: None,
        data: String::new(),
    };
    let mut has_data = false;
    for line in block.lines() {
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "" => {} // a comment: the keep-alive
            "id" => event.id = Some(value.to_owned()),
            "event" => event.event = Some(value.to_owned()),
            "data" => {
                if has_data {
                    event.data.push('\n');
                }
                event.data.push_str(value);
                has_data = true;
            }
            _ => {}
        }
    }
    has_data.then_some(event)
}
