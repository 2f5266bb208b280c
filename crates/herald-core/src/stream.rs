//! Stream names, stream versions, global positions and expected versions.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// The longest stream name, in bytes.
pub const STREAM_NAME_LEN_MAX: usize = 256;

/// The name of a stream, e.g. `order-0192f3`.
///
/// 1 to [`STREAM_NAME_LEN_MAX`] bytes of ASCII letters, digits and `-`, `_`, `.`, `:`, `@`,
/// not starting with `$` (reserved for Herald's own streams) and never containing `/`, so a
/// name is always safe as one URL path segment and one file name component.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamName(Arc<str>);

/// Why a stream name was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid stream name {name:?}: {reason}")]
pub struct InvalidStreamName {
    /// The name as given.
    pub name: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl StreamName {
    /// Validates `name`.
    pub fn new(name: impl AsRef<str>) -> Result<Self, InvalidStreamName> {
        let name = name.as_ref();
        let reject = |reason| {
            Err(InvalidStreamName {
                name: name.to_owned(),
                reason,
            })
        };
        if name.is_empty() {
            return reject("must not be empty");
        }
        if name.len() > STREAM_NAME_LEN_MAX {
            return reject("must be at most 256 bytes long");
        }
        if name.starts_with('$') {
            return reject("names starting with `$` are reserved");
        }
        let allowed =
            |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '@');
        if !name.chars().all(allowed) {
            return reject("only ASCII letters, digits and `-_.:@` are allowed");
        }
        if name == "." || name == ".." {
            return reject("`.` and `..` are not stream names");
        }
        Ok(StreamName(Arc::from(name)))
    }

    /// A name reserved for Herald's own streams (e.g. a broker's partitions and
    /// committed offsets): `$` followed by a name that [`StreamName::new`] accepts.
    /// User input can never produce one, so system streams never collide with user streams.
    pub fn system(name: impl AsRef<str>) -> Result<Self, InvalidStreamName> {
        let name = name.as_ref();
        Self::new(name)?;
        if name.len() >= STREAM_NAME_LEN_MAX {
            return Err(InvalidStreamName {
                name: name.to_owned(),
                reason: "must be at most 255 bytes long for a system stream",
            });
        }
        Ok(StreamName(Arc::from(format!("${name}"))))
    }

    /// Parses a name as stored: a user stream name or a system one (`$…`). For names read
    /// back from storage, never for user input.
    pub fn parse_stored(name: &str) -> Result<Self, InvalidStreamName> {
        match name.strip_prefix('$') {
            Some(system) => Self::system(system),
            None => Self::new(name),
        }
    }

    /// Whether this is one of Herald's own streams (see [`StreamName::system`]).
    pub fn is_system(&self) -> bool {
        self.0.starts_with('$')
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for StreamName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for StreamName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl FromStr for StreamName {
    type Err = InvalidStreamName;
    fn from_str(name: &str) -> Result<Self, Self::Err> {
        StreamName::new(name)
    }
}

impl AsRef<str> for StreamName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// The version of an event within its stream: the first event of a stream has version 0,
/// and versions are contiguous.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Version(pub u64);

/// The position of an event in the global log: the first event ever appended has position 0,
/// and positions are contiguous and follow the one total order of the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Position(pub u64);

impl Version {
    /// The first version of a stream.
    pub const START: Version = Version(0);
    /// The largest version; reading backward from it starts at a stream's last event.
    pub const END: Version = Version(u64::MAX);
}

impl Position {
    /// The first position of the log.
    pub const START: Position = Position(0);
    /// The largest position; reading backward from it starts at the log's last event.
    pub const END: Position = Position(u64::MAX);
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What the writer believes about a stream's current state; an append whose belief is wrong
/// is rejected with the stream's actual version (optimistic concurrency).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExpectedVersion {
    /// No check.
    Any,
    /// The stream has no events (or has been deleted).
    NoStream,
    /// The stream has at least one event.
    StreamExists,
    /// The stream's last event has exactly this version.
    Exact(Version),
}

impl ExpectedVersion {
    /// Whether a stream whose last version is `current` (`None`: no stream) satisfies this
    /// expectation.
    pub fn admits(self, current: Option<Version>) -> bool {
        match self {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoStream => current.is_none(),
            ExpectedVersion::StreamExists => current.is_some(),
            ExpectedVersion::Exact(version) => current == Some(version),
        }
    }
}

impl fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExpectedVersion::Any => f.write_str("any"),
            ExpectedVersion::NoStream => f.write_str("no-stream"),
            ExpectedVersion::StreamExists => f.write_str("exists"),
            ExpectedVersion::Exact(version) => write!(f, "{version}"),
        }
    }
}

/// Why an expected version could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid expected version {0:?}: use `any`, `no-stream`, `exists` or a non-negative integer"
)]
pub struct InvalidExpectedVersion(pub String);

impl FromStr for ExpectedVersion {
    type Err = InvalidExpectedVersion;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "any" => Ok(ExpectedVersion::Any),
            "no-stream" => Ok(ExpectedVersion::NoStream),
            "exists" => Ok(ExpectedVersion::StreamExists),
            number => number
                .parse::<u64>()
                .map(|n| ExpectedVersion::Exact(Version(n)))
                .map_err(|_| InvalidExpectedVersion(text.to_owned())),
        }
    }
}

/// The direction of a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Direction {
    /// From older to newer.
    #[default]
    Forward,
    /// From newer to older.
    Backward,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_names_are_validated() {
        assert!(StreamName::new("order-123").is_ok());
        assert!(StreamName::new("tenant:a@b.c_d").is_ok());
        for bad in ["", "$all", "a/b", "a b", "é", ".", ".."] {
            assert!(StreamName::new(bad).is_err(), "{bad:?} should be rejected");
        }
        assert!(StreamName::new("x".repeat(257)).is_err());
        let system = StreamName::system("topic:orders:0").unwrap();
        assert_eq!(system.as_str(), "$topic:orders:0");
        assert!(system.is_system() && !StreamName::new("orders").unwrap().is_system());
    }

    #[test]
    fn expected_versions_parse_and_admit() {
        assert_eq!("any".parse(), Ok(ExpectedVersion::Any));
        assert_eq!("7".parse(), Ok(ExpectedVersion::Exact(Version(7))));
        assert!("-1".parse::<ExpectedVersion>().is_err());
        assert!(ExpectedVersion::NoStream.admits(None));
        assert!(!ExpectedVersion::NoStream.admits(Some(Version(0))));
        assert!(ExpectedVersion::Exact(Version(3)).admits(Some(Version(3))));
        assert!(!ExpectedVersion::StreamExists.admits(None));
    }
}
