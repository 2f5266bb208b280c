//! The configuration of `herald up`, against the real binary: the TOML file alone, the
//! environment over the file, the flags over the environment, tokens from each layer
//! enforced, and clear errors (that never show a token's secret) for what is wrong.
//!
//! Each layer is told apart by what can be seen from outside: the loopback address the
//! server prints (127.0.0.2, .3 or .4), whether a 500-byte event gets 201 or 413 under the
//! body limit, and which directory the event log is created in.

use std::path::Path;

use hyper::{Method, StatusCode};
use serde_json::json;

mod common;

use common::http::{Herald, command, failure_to_start};

const STRUCTURED: &str = "application/cloudevents+json";

/// A body limit the test event is over.
const SMALL_LIMIT: usize = 300;
/// A body limit the test event is under.
const LARGE_LIMIT: usize = 100_000;

/// A structured event of about 500 bytes.
fn event(id: &str) -> Vec<u8> {
    json!({"specversion": "1.0", "id": id, "source": "/tests", "type": "test.happened",
           "data": {"padding": "x".repeat(400)}})
    .to_string()
    .into_bytes()
}

/// The status of appending [`event`] to `stream`.
async fn append_status(server: &Herald, id: &str) -> StatusCode {
    server
        .post("/streams/config", STRUCTURED, event(id))
        .await
        .status
}

/// Writes a configuration file whose every value the tests can recognise.
fn write_file(path: &Path) {
    std::fs::write(
        path,
        format!(
            "# herald up, as the file sets it\n\
             data_dir = \"file-data\"\n\
             \n\
             [server]\n\
             listen = \"127.0.0.2:0\"\n\
             body_size_max_bytes = {SMALL_LIMIT}\n\
             tokens = []\n"
        ),
    )
    .unwrap();
}

#[tokio::test]
async fn the_file_in_the_working_directory_configures_herald_up() {
    let cwd = tempfile::tempdir().unwrap();
    write_file(&cwd.path().join("herald.toml"));

    let server = Herald::spawn(command(cwd.path()));
    assert_eq!(server.addr().ip().to_string(), "127.0.0.2");
    assert_eq!(
        append_status(&server, "big").await,
        413,
        "the file's body limit"
    );
    assert!(server.terminate().success());
    // The file's relative data directory is relative to the file.
    assert!(cwd.path().join("file-data").is_dir());
}

#[tokio::test]
async fn the_environment_overrides_the_file_and_the_flags_override_the_environment() {
    let cwd = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let file = elsewhere.path().join("custom.toml");
    write_file(&file);
    let env_data = cwd.path().join("env-data");
    let flag_data = cwd.path().join("flag-data");

    // The file named by HERALD_CONFIG, its values overridden by the environment.
    let mut with_env = command(cwd.path());
    with_env
        .env("HERALD_CONFIG", &file)
        .env("HERALD_LISTEN", "127.0.0.3:0")
        .env("HERALD_BODY_SIZE_MAX_BYTES", LARGE_LIMIT.to_string())
        .env("HERALD_DATA_DIR", &env_data);
    let server = Herald::spawn(with_env);
    assert_eq!(server.addr().ip().to_string(), "127.0.0.3");
    assert_eq!(
        append_status(&server, "a").await,
        201,
        "the environment's limit"
    );
    assert!(server.terminate().success());
    assert!(env_data.is_dir());
    assert!(!elsewhere.path().join("file-data").exists());

    // The same environment, overridden in turn by flags.
    let mut with_flags = command(cwd.path());
    with_flags
        .env("HERALD_CONFIG", cwd.path().join("missing.toml"))
        .env("HERALD_LISTEN", "127.0.0.3:0")
        .env("HERALD_BODY_SIZE_MAX_BYTES", LARGE_LIMIT.to_string())
        .env("HERALD_DATA_DIR", &env_data)
        .arg("--config")
        .arg(&file)
        .args(["--listen", "127.0.0.4:0"])
        .args(["--body-size-max-bytes", &SMALL_LIMIT.to_string()])
        .arg("--data-dir")
        .arg(&flag_data);
    let server = Herald::spawn(with_flags);
    assert_eq!(server.addr().ip().to_string(), "127.0.0.4");
    assert_eq!(append_status(&server, "b").await, 413, "the flag's limit");
    assert!(server.terminate().success());
    assert!(flag_data.is_dir());
}

#[test]
fn an_unknown_key_is_refused_with_its_file_key_and_line() {
    let cwd = tempfile::tempdir().unwrap();
    std::fs::write(
        cwd.path().join("herald.toml"),
        "[server]\nlisten = \"127.0.0.1:0\"\nbody_size_max = 10\n",
    )
    .unwrap();
    let stderr = failure_to_start(command(cwd.path()).output().unwrap());
    assert!(stderr.contains("herald.toml"), "{stderr}");
    assert!(
        stderr.contains("`server.body_size_max` at line 3"),
        "{stderr}"
    );
    assert!(stderr.contains("unknown field `body_size_max`"), "{stderr}");
    assert!(
        stderr.contains("\nhint: fix `server.body_size_max`"),
        "{stderr}"
    );
    assert!(
        !cwd.path().join("herald-data").exists(),
        "no log was opened"
    );
}

#[test]
fn a_missing_config_file_is_an_error_when_named() {
    let cwd = tempfile::tempdir().unwrap();
    let stderr = failure_to_start(
        command(cwd.path())
            .args(["--config", "nowhere.toml"])
            .output()
            .unwrap(),
    );
    assert!(
        stderr.contains("cannot read the configuration file nowhere.toml"),
        "{stderr}"
    );
    assert!(stderr.contains("hint: pass --config"), "{stderr}");
}

#[test]
fn bad_tokens_are_refused_without_showing_the_secret() {
    let cwd = tempfile::tempdir().unwrap();
    let secret = "hunter2secret";

    // A scope that does not exist, from the environment and from a flag.
    let mut from_env = command(cwd.path());
    from_env
        .args(["--listen", "127.0.0.1:0"])
        .env("HERALD_TOKENS", format!("read:ok,admin:{secret}"));
    let stderr = failure_to_start(from_env.output().unwrap());
    assert!(
        stderr.contains("invalid token 2 of --token or HERALD_TOKENS"),
        "{stderr}"
    );
    assert!(stderr.contains("scope"), "{stderr}");
    assert!(
        stderr.contains("hint: give each token as SCOPE:SECRET"),
        "{stderr}"
    );
    assert!(!stderr.contains(secret), "the secret leaked: {stderr}");

    for spec in [secret.to_owned(), format!("write:{secret} with spaces")] {
        let stderr = failure_to_start(
            command(cwd.path())
                .args(["--listen", "127.0.0.1:0", "--token", &spec])
                .output()
                .unwrap(),
        );
        assert!(stderr.contains("invalid token 1"), "{stderr}");
        assert!(!stderr.contains(secret), "the secret leaked: {stderr}");
    }

    // In the file.
    std::fs::write(
        cwd.path().join("herald.toml"),
        format!("[server]\ntokens = [{{ token = \"{secret}\", scope = \"owner\" }}]\n"),
    )
    .unwrap();
    let stderr = failure_to_start(command(cwd.path()).output().unwrap());
    assert!(stderr.contains("server.tokens[0]"), "{stderr}");
    assert!(!stderr.contains(secret), "the secret leaked: {stderr}");

    // Help shows the variable, never its value.
    let help = command(cwd.path())
        .arg("--help")
        .env("HERALD_TOKENS", format!("write:{secret}"))
        .output()
        .unwrap();
    assert!(help.status.success());
    let help = String::from_utf8(help.stdout).unwrap();
    assert!(help.contains("HERALD_TOKENS"), "{help}");
    assert!(!help.contains(secret), "the secret leaked: {help}");
}

#[tokio::test]
async fn tokens_from_each_layer_are_enforced_and_replace_the_lower_layers() {
    let cwd = tempfile::tempdir().unwrap();
    std::fs::write(
        cwd.path().join("herald.toml"),
        "[server]\nlisten = \"127.0.0.1:0\"\n\
         tokens = [{ token = \"file-writer\", scope = \"write\" }]\n",
    )
    .unwrap();
    let server = Herald::spawn(command(cwd.path()));
    assert_eq!(post_as(&server, None).await, 401);
    assert_eq!(post_as(&server, Some("file-writer")).await, 201);
    assert!(server.terminate().success());

    // The flag replaces the environment's tokens, which would replace the file's.
    let mut overridden = command(cwd.path());
    overridden
        .env("HERALD_TOKENS", "write:env-writer,read:env-reader==")
        .args(["--token", "read:flag-reader"]);
    let server = Herald::spawn(overridden);
    assert_eq!(
        post_as(&server, Some("flag-reader")).await,
        403,
        "a read token"
    );
    assert_eq!(post_as(&server, Some("env-writer")).await, 401);
    assert_eq!(post_as(&server, Some("file-writer")).await, 401);
    let read = server
        .send(
            Method::GET,
            "/all",
            &[("authorization", "Bearer flag-reader")],
            "",
        )
        .await
        .unwrap();
    assert_eq!(read.status, 200, "{}", read.body);
    assert!(server.terminate().success());

    // Without the flag, the environment's tokens hold.
    let mut from_env = command(cwd.path());
    from_env.env("HERALD_TOKENS", "write:env-writer,read:env-reader==");
    let server = Herald::spawn(from_env);
    assert_eq!(post_as(&server, Some("env-writer")).await, 201);
    assert_eq!(post_as(&server, Some("env-reader==")).await, 403);
    assert_eq!(post_as(&server, Some("file-writer")).await, 401);
    assert!(server.terminate().success());
}

/// The status of appending a small event with `token`, if any.
async fn post_as(server: &Herald, token: Option<&str>) -> StatusCode {
    let bearer = token.map(|token| format!("Bearer {token}"));
    let mut headers = vec![("content-type", STRUCTURED)];
    if let Some(bearer) = &bearer {
        headers.push(("authorization", bearer));
    }
    let body = json!({"specversion": "1.0", "source": "/tests", "type": "test.happened",
                      "id": format!("{token:?}-{}", server.addr())});
    server
        .send(Method::POST, "/streams/tokens", &headers, body.to_string())
        .await
        .unwrap()
        .status
}
