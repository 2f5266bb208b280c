//! The configuration of `herald up`, from four layers: the command line's flags override the
//! `HERALD_*` environment variables, which override a TOML file, which overrides the defaults.
//!
//! # The file
//!
//! `--config PATH` (or `HERALD_CONFIG`) names it; without either, `./herald.toml` is read when
//! it exists, and nothing otherwise. It holds:
//!
//! ```toml
//! data_dir = "herald-data"          # relative to the file's own directory
//!
//! [server]                          # exactly herald_server::ServerOptions
//! listen = "127.0.0.1:8080"
//! body_size_max_bytes = 4194304
//! tokens = [{ token = "s3cret", scope = "write" }, { token = "r3ader", scope = "read" }]
//!
//! [orders]                          # the order system (herald_orders::SystemOptions)
//! enabled = true                    # false: the event API only (as --no-orders)
//! fail_payment_rate = 0.0           # share of charges declined at random, 0 to 1
//! transient_error_rate = 0.0        # share of gateway calls failing transiently, 0 to 1
//! seed = 42                         # seeds the gateway's draws and the retry jitter
//! partitions = 8                    # partitions of the `orders` topic, when created
//! ```
//!
//! Every key is optional; an unknown key is an error, never ignored.
//!
//! # Contract
//!
//! - Flags and environment variables are merged by clap (a flag wins over its variable);
//!   whatever either of them gives wins over the file, key by key. `--token` (or
//!   `HERALD_TOKENS`) replaces the file's whole token list rather than adding to it.
//! - An error names the file, the key, the line and column when known, and what is wrong;
//!   [`hint`] says what to do about it.
//! - A token's secret MUST NOT appear in an error or a log line: token specs are kept in a
//!   type whose `Debug` redacts them, and their errors name the token by its index only.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use herald_server::{Scope, ServerOptions, Token};
use serde::Deserialize;

/// The file read when neither `--config` nor `HERALD_CONFIG` is given, if it exists.
pub(crate) const CONFIG_FILE_DEFAULT: &str = "herald.toml";

/// The data directory used when neither the flag, the environment nor the file gives one.
pub(crate) const DATA_DIR_DEFAULT: &str = "herald-data";

/// What the command line and the environment gave `herald up`; `None` (or empty) when neither
/// did.
#[derive(Debug, Default)]
pub(crate) struct Overrides {
    /// `--config` / `HERALD_CONFIG`.
    pub(crate) config: Option<PathBuf>,
    /// `--data-dir` / `HERALD_DATA_DIR`.
    pub(crate) data_dir: Option<PathBuf>,
    /// `--listen` / `HERALD_LISTEN`.
    pub(crate) listen: Option<SocketAddr>,
    /// `--body-size-max-bytes` / `HERALD_BODY_SIZE_MAX_BYTES`.
    pub(crate) body_size_max_bytes: Option<usize>,
    /// `--token` (repeatable) / `HERALD_TOKENS` (comma-separated).
    pub(crate) tokens: Vec<TokenSpec>,
    /// `--no-orders` / `HERALD_NO_ORDERS`: `true` turns the order system off.
    pub(crate) no_orders: bool,
    /// `--fail-payment-rate` / `HERALD_FAIL_PAYMENT_RATE`.
    pub(crate) fail_payment_rate: Option<f64>,
    /// `--transient-error-rate` / `HERALD_TRANSIENT_ERROR_RATE`.
    pub(crate) transient_error_rate: Option<f64>,
}

/// The settings `herald up` runs with, each from the strongest layer that gives it.
#[derive(Debug)]
pub(crate) struct Config {
    /// The configuration file read, if any.
    pub(crate) file: Option<PathBuf>,
    /// The data directory of the event log.
    pub(crate) data_dir: PathBuf,
    /// The HTTP server's options.
    pub(crate) server: ServerOptions,
    /// The order system's settings.
    pub(crate) orders: OrdersConfig,
}

/// The `[orders]` table: the order system `herald up` runs next to the event API. The rates
/// are checked (0 to 1) when the system is built.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct OrdersConfig {
    /// Whether the order system runs; `false` serves the event API only.
    pub(crate) enabled: bool,
    /// [`herald_orders::SystemOptions::fail_payment_rate`].
    pub(crate) fail_payment_rate: f64,
    /// [`herald_orders::SystemOptions::transient_error_rate`].
    pub(crate) transient_error_rate: f64,
    /// [`herald_orders::SystemOptions::seed`].
    pub(crate) seed: u64,
    /// [`herald_orders::SystemOptions::partitions`].
    pub(crate) partitions: u32,
}

impl Default for OrdersConfig {
    fn default() -> Self {
        let defaults = herald_orders::SystemOptions::default();
        OrdersConfig {
            enabled: true,
            fail_payment_rate: defaults.fail_payment_rate,
            transient_error_rate: defaults.transient_error_rate,
            seed: defaults.seed,
            partitions: defaults.partitions,
        }
    }
}

impl OrdersConfig {
    /// The order system's options on `data_dir`, the rest at their defaults.
    pub(crate) fn system_options(&self, data_dir: &Path) -> herald_orders::SystemOptions {
        herald_orders::SystemOptions {
            data_dir: data_dir.to_owned(),
            fail_payment_rate: self.fail_payment_rate,
            transient_error_rate: self.transient_error_rate,
            seed: self.seed,
            partitions: self.partitions,
            ..herald_orders::SystemOptions::default()
        }
    }
}

/// A `SCOPE:TOKEN` as given on the command line or in `HERALD_TOKENS`, not yet checked.
///
/// Its `Debug` hides the secret, so that printing the parsed command line leaks nothing.
#[derive(Clone)]
pub(crate) struct TokenSpec(String);

impl std::fmt::Debug for TokenSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenSpec(<redacted>)")
    }
}

impl TokenSpec {
    /// The clap value parser. It never fails: clap would print the rejected value, secret
    /// included, so checking waits for [`resolve`], whose errors do not.
    pub(crate) fn parse(spec: &str) -> Result<TokenSpec, std::convert::Infallible> {
        Ok(TokenSpec(spec.to_owned()))
    }
}

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// The file could not be read.
    #[error("cannot read the configuration file {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The file is not valid TOML or does not fit the configuration's shape.
    #[error("invalid configuration file {}: {}{message}", path.display(), location(key.as_deref(), *line_column))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The dotted key the error is about, when it can be told.
        key: Option<String>,
        /// Where, 1-based, when it can be told.
        line_column: Option<(usize, usize)>,
        /// What is wrong.
        message: String,
    },
    /// An entry of the file's `server.tokens` is invalid.
    #[error("invalid configuration file {}: server.tokens[{index}]: {reason}", path.display())]
    FileToken {
        /// The file.
        path: PathBuf,
        /// The entry's index, from 0.
        index: usize,
        /// What is wrong (never the secret).
        reason: String,
    },
    /// A `--token` or `HERALD_TOKENS` spec is invalid.
    #[error("invalid token {number} of --token or HERALD_TOKENS: {reason}")]
    TokenSpec {
        /// Which spec, from 1, in the order given.
        number: usize,
        /// What is wrong (never the secret).
        reason: &'static str,
    },
}

impl Error {
    /// What the user can do about the error.
    fn hint(&self) -> String {
        match self {
            Error::Read { .. } => format!(
                "pass --config (or HERALD_CONFIG) a readable TOML file, or neither to read \
                 ./{CONFIG_FILE_DEFAULT} only when it exists"
            ),
            Error::Invalid { path, key, .. } => format!(
                "fix {} in {}: the file may hold `data_dir` and a [server] table with \
                 `listen`, `body_size_max_bytes` and `tokens = [{{ token = \"...\", scope = \
                 \"read\" }}]` (scope `read` or `write`), and an [orders] table with `enabled`, \
                 `fail_payment_rate`, `transient_error_rate`, `seed` and `partitions`, nothing \
                 else",
                key.as_deref()
                    .map_or_else(|| "the error".to_owned(), |key| format!("`{key}`")),
                path.display()
            ),
            Error::FileToken { path, index, .. } => format!(
                "write entry {index} of `server.tokens` in {} as {{ token = \"SECRET\", scope = \
                 \"read\" }} or scope \"write\"; a secret is 1 or more of A-Z a-z 0-9 - . _ ~ + /, \
                 optionally followed by =",
                path.display()
            ),
            Error::TokenSpec { .. } => "give each token as SCOPE:SECRET, e.g. `--token \
                 write:SECRET` or `HERALD_TOKENS=write:SECRET1,read:SECRET2`, with SCOPE `read` \
                 or `write` and a SECRET of A-Z a-z 0-9 - . _ ~ + / (optionally followed by =)"
                .to_owned(),
        }
    }
}

/// What the user can do about `error`, when it is a configuration error.
pub(crate) fn hint(error: &anyhow::Error) -> Option<String> {
    error
        .chain()
        .find_map(|cause| cause.downcast_ref::<Error>())
        .map(Error::hint)
}

/// Resolves the configuration: reads the file (the one given, or `./herald.toml` if it
/// exists), then lays the environment and the flags over it.
pub(crate) fn resolve(overrides: Overrides) -> Result<Config, Error> {
    let path = match overrides.config {
        Some(path) => Some(path),
        None => Some(PathBuf::from(CONFIG_FILE_DEFAULT)).filter(|path| path.exists()),
    };
    let file = match &path {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
                path: path.clone(),
                source,
            })?;
            parse(path, &text)?
        }
        None => File::default(),
    };

    let data_dir = match (overrides.data_dir, file.data_dir, &path) {
        (Some(dir), _, _) => dir,
        // A relative directory in the file is relative to the file, not to where herald runs.
        (None, Some(dir), Some(path)) => path.parent().unwrap_or(Path::new("")).join(dir),
        (None, Some(dir), None) => dir,
        (None, None, _) => PathBuf::from(DATA_DIR_DEFAULT),
    };
    let mut server = file.server;
    if let Some(listen) = overrides.listen {
        server.listen = listen;
    }
    if let Some(bytes) = overrides.body_size_max_bytes {
        server.body_size_max_bytes = bytes;
    }
    if !overrides.tokens.is_empty() {
        server.tokens = overrides
            .tokens
            .iter()
            .enumerate()
            .map(|(index, spec)| {
                parse_spec(&spec.0).map_err(|reason| Error::TokenSpec {
                    number: index + 1,
                    reason,
                })
            })
            .collect::<Result<_, _>>()?;
    }
    let mut orders = file.orders;
    if overrides.no_orders {
        orders.enabled = false;
    }
    if let Some(rate) = overrides.fail_payment_rate {
        orders.fail_payment_rate = rate;
    }
    if let Some(rate) = overrides.transient_error_rate {
        orders.transient_error_rate = rate;
    }
    Ok(Config {
        file: path,
        data_dir,
        server,
        orders,
    })
}

/// What the file holds.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct File {
    data_dir: Option<PathBuf>,
    server: ServerOptions,
    orders: OrdersConfig,
}

/// Parses the file's text.
///
/// The tokens are checked by hand before the whole file is deserialised: a serde error
/// about a token could quote its secret (`invalid type: string "…"`), so by the time serde
/// runs, no such error is left to make.
fn parse(path: &Path, text: &str) -> Result<File, Error> {
    let invalid = |error: toml::de::Error| {
        let span = error.span();
        Error::Invalid {
            path: path.to_owned(),
            key: span.as_ref().and_then(|span| key_at(text, span.start)),
            line_column: span.map(|span| line_column(text, span.start)),
            message: error.message().trim_end().to_owned(),
        }
    };
    let table: toml::Table = toml::from_str(text).map_err(invalid)?;
    if let Some(tokens) = table
        .get("server")
        .and_then(toml::Value::as_table)
        .and_then(|server| server.get("tokens"))
    {
        check_file_tokens(tokens).map_err(|(index, reason)| Error::FileToken {
            path: path.to_owned(),
            index,
            reason,
        })?;
    }
    toml::from_str(text).map_err(invalid)
}

/// Checks the file's `server.tokens`; an error gives the index of the bad entry (0 for a
/// list that is not one) and a reason that quotes no value but a scope's.
fn check_file_tokens(tokens: &toml::Value) -> Result<(), (usize, String)> {
    let entries = tokens.as_array().ok_or_else(|| {
        (
            0,
            "`tokens` must be a list of { token, scope } tables".to_owned(),
        )
    })?;
    for (index, entry) in entries.iter().enumerate() {
        let fail = |reason: String| Err((index, reason));
        let Some(entry) = entry.as_table() else {
            return fail("not a { token = \"...\", scope = \"...\" } table".to_owned());
        };
        if let Some(key) = entry
            .keys()
            .find(|key| !matches!(key.as_str(), "token" | "scope"))
        {
            return fail(format!(
                "unknown key `{key}`: an entry has `token` and `scope`"
            ));
        }
        match entry.get("token") {
            None => return fail("no `token`".to_owned()),
            Some(toml::Value::String(secret)) if !is_token(secret) => {
                return fail("the token has a character a bearer token cannot carry".to_owned());
            }
            Some(toml::Value::String(_)) => {}
            Some(_) => return fail("the token is not a string".to_owned()),
        }
        match entry.get("scope").map(toml::Value::as_str) {
            None => return fail("no `scope`".to_owned()),
            Some(Some("read" | "write")) => {}
            // A scope is not secret, but a secret pasted into the wrong field would be.
            Some(_) => return fail("the scope is neither \"read\" nor \"write\"".to_owned()),
        }
    }
    Ok(())
}

/// Parses `SCOPE:SECRET`; the error never holds the secret.
fn parse_spec(spec: &str) -> Result<Token, &'static str> {
    let (scope, secret) = spec
        .split_once(':')
        .ok_or("it is not SCOPE:SECRET (no `:`)")?;
    let scope = match scope {
        "read" => Scope::Read,
        "write" => Scope::Write,
        _ => return Err("the scope is neither `read` nor `write`"),
    };
    if !is_token(secret) {
        return Err("the secret is empty or has a character a bearer token cannot carry");
    }
    Ok(Token {
        token: secret.to_owned(),
        scope,
    })
}

/// Whether `secret` can be sent as `Authorization: Bearer <secret>`: RFC 6750's `b64token`,
/// `1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="`.
fn is_token(secret: &str) -> bool {
    let body = secret.trim_end_matches('=');
    !body.is_empty()
        && body
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || b"-._~+/".contains(&byte))
}

/// `key `a.b`, line L, column C: ` for an error message, as much of it as is known.
fn location(key: Option<&str>, line_column: Option<(usize, usize)>) -> String {
    match (key, line_column) {
        (Some(key), Some((line, column))) => format!("`{key}` at line {line}, column {column}: "),
        (None, Some((line, column))) => format!("line {line}, column {column}: "),
        (Some(key), None) => format!("`{key}`: "),
        (None, None) => String::new(),
    }
}

/// The 1-based line and column (in characters) of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = floor_char_boundary(text, offset);
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
    let line = before.matches('\n').count() + 1;
    (line, before[line_start..].chars().count() + 1)
}

/// The dotted key on the line holding byte `offset`: the line's `key =`, under the nearest
/// `[table]` header above it. A heuristic for the message, good for the flat files this
/// configuration has; `None` when the line has no key.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let offset = floor_char_boundary(text, offset);
    let line_start = text[..offset].rfind('\n').map_or(0, |newline| newline + 1);
    let line = text[line_start..].lines().next().unwrap_or("").trim();
    let table = text[..line_start].lines().rev().find_map(|line| {
        let line = line.trim();
        (line.starts_with('[') && !line.starts_with("[[")).then(|| {
            line.trim_matches(|c| c == '[' || c == ']')
                .trim()
                .to_owned()
        })
    });
    if line.starts_with('[') {
        return Some(
            line.trim_matches(|c| c == '[' || c == ']')
                .trim()
                .to_owned(),
        );
    }
    let key = line.split_once('=')?.0.trim().trim_matches('"');
    if key.is_empty() {
        return None;
    }
    Some(match table {
        Some(table) if !table.is_empty() => format!("{table}.{key}"),
        _ => key.to_owned(),
    })
}

/// The largest char boundary of `text` at or before `offset`.
fn floor_char_boundary(text: &str, offset: usize) -> usize {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    offset
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> Result<File, Error> {
        parse(Path::new("herald.toml"), text)
    }

    #[test]
    fn the_server_table_is_server_options() {
        let parsed = file(
            "data_dir = \"d\"\n[server]\nlisten = \"127.0.0.2:9\"\nbody_size_max_bytes = 7\n\
             tokens = [{ token = \"abc\", scope = \"read\" }]\n",
        )
        .unwrap();
        assert_eq!(parsed.data_dir, Some(PathBuf::from("d")));
        assert_eq!(parsed.server.listen.to_string(), "127.0.0.2:9");
        assert_eq!(parsed.server.body_size_max_bytes, 7);
        assert_eq!(
            parsed.server.tokens,
            [Token {
                token: "abc".into(),
                scope: Scope::Read
            }]
        );
        let empty = file("").unwrap();
        assert_eq!(empty.server, ServerOptions::default());
    }

    #[test]
    fn the_orders_table_sets_the_order_system_and_flags_override_it() {
        let empty = file("").unwrap();
        assert_eq!(empty.orders, OrdersConfig::default());
        assert!(empty.orders.enabled);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("herald.toml");
        std::fs::write(
            &path,
            "[orders]\nenabled = true\nfail_payment_rate = 0.25\ntransient_error_rate = 0.5\n\
             seed = 7\npartitions = 3\n",
        )
        .unwrap();
        let from_file = resolve(Overrides {
            config: Some(path.clone()),
            ..Overrides::default()
        })
        .unwrap();
        assert_eq!(
            from_file.orders,
            OrdersConfig {
                enabled: true,
                fail_payment_rate: 0.25,
                transient_error_rate: 0.5,
                seed: 7,
                partitions: 3,
            }
        );
        let options = from_file.orders.system_options(Path::new("data"));
        assert_eq!(options.data_dir, Path::new("data"));
        assert_eq!(options.fail_payment_rate, 0.25);
        assert_eq!(options.partitions, 3);

        let overridden = resolve(Overrides {
            config: Some(path),
            no_orders: true,
            fail_payment_rate: Some(0.0),
            transient_error_rate: Some(0.1),
            ..Overrides::default()
        })
        .unwrap();
        assert!(!overridden.orders.enabled);
        assert_eq!(overridden.orders.fail_payment_rate, 0.0);
        assert_eq!(overridden.orders.transient_error_rate, 0.1);
        assert_eq!(overridden.orders.seed, 7);

        let error = file("[orders]\nfail_rate = 1\n").unwrap_err().to_string();
        assert!(error.contains("`orders.fail_rate`"), "{error}");
    }

    #[test]
    fn an_unknown_key_is_named_with_its_line() {
        let error = file("[server]\nlisten = \"127.0.0.1:0\"\nlisen = 3\n").unwrap_err();
        let text = error.to_string();
        assert!(
            text.contains("`server.lisen` at line 3, column 1"),
            "{text}"
        );
        assert!(text.contains("unknown field `lisen`"), "{text}");
        let error = file("port = 3\n").unwrap_err().to_string();
        assert!(error.contains("`port`"), "{error}");
    }

    #[test]
    fn a_bad_value_is_named_with_its_key() {
        let error = file("[server]\nbody_size_max_bytes = \"big\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("`server.body_size_max_bytes` at line 2"),
            "{error}"
        );
        let error = file("data_dir = [").unwrap_err().to_string();
        assert!(error.contains("line 1"), "{error}");
    }

    #[test]
    fn token_errors_never_show_the_secret() {
        for text in [
            "[server]\ntokens = [{ token = \"hunter2\", scope = \"admin\" }]",
            "[server]\ntokens = [{ token = \"write\", scope = \"hunter2\" }]",
            "[server]\ntokens = [\"hunter2\"]",
            "[server]\ntokens = \"hunter2\"",
            "[server]\ntokens = [{ token = \"hunter2\", scope = \"read\", x = 1 }]",
            "[server]\ntokens = [{ token = \"hunter2 \", scope = \"read\" }]",
            "[server]\ntokens = [{ secret = \"hunter2\", scope = \"read\" }]",
        ] {
            let error = file(text).unwrap_err();
            assert!(matches!(error, Error::FileToken { .. }), "{text}: {error}");
            assert!(!error.to_string().contains("hunter2"), "{error}");
            assert!(!error.hint().contains("hunter2"));
        }
    }

    #[test]
    fn token_specs_parse_and_their_errors_hide_the_secret() {
        assert_eq!(
            parse_spec("write:abc=").unwrap(),
            Token {
                token: "abc=".into(),
                scope: Scope::Write
            }
        );
        assert_eq!(
            parse_spec("read:a:b").unwrap_err(),
            parse_spec("read:").unwrap_err()
        );
        for bad in [
            "hunter2",
            "admin:hunter2",
            "read:",
            "read:hunter 2",
            "READ:hunter2",
        ] {
            let error = parse_spec(bad).unwrap_err();
            assert!(!error.contains("hunter"), "{bad}: {error}");
        }
        assert_eq!(
            format!("{:?}", TokenSpec::parse("read:hunter2").unwrap()),
            "TokenSpec(<redacted>)"
        );
    }

    #[test]
    fn positions_count_characters_from_one() {
        assert_eq!(line_column("ab\ncü d", 7), (2, 4));
        assert_eq!(line_column("", 0), (1, 1));
        assert_eq!(key_at("a = 1\n[t]\n\"b\" = 2", 12), Some("t.b".to_owned()));
    }
}
