//! How a handler reports failure: classified once, as transient or permanent.

use std::error::Error as StdError;
use std::fmt;

/// A boxed error, as handlers produce them.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// Whether a failure may go away if the event is handled again.
///
/// The classification, not the message, drives the runtime: the retry layer retries
/// [`Transient`](ErrorKind::Transient) failures only, and the dead-letter layer dead-letters a
/// [`Permanent`](ErrorKind::Permanent) one at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Worth retrying: a timeout, an unavailable dependency, a conflict.
    Transient,
    /// Retrying cannot help: invalid data, a broken invariant, an unknown event type.
    Permanent,
}

impl ErrorKind {
    /// The kind as a lower-case word, for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Transient => "transient",
            ErrorKind::Permanent => "permanent",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A handler's failure, classified by [`ErrorKind`].
///
/// It wraps the error the handler gave, as [`std::io::Error::other`] does: it displays as
/// that error, and its [`source`](StdError::source) is that error's source, so a report that
/// walks the chain does not print the same message twice.
#[derive(Debug)]
pub struct HandlerError {
    kind: ErrorKind,
    message: String,
    source: BoxError,
}

impl HandlerError {
    /// A failure worth retrying.
    pub fn transient(error: impl Into<BoxError>) -> Self {
        Self::new(ErrorKind::Transient, error)
    }

    /// A failure retrying cannot fix; the event is dead-lettered at once.
    pub fn permanent(error: impl Into<BoxError>) -> Self {
        Self::new(ErrorKind::Permanent, error)
    }

    /// A failure of the given kind.
    pub fn new(kind: ErrorKind, error: impl Into<BoxError>) -> Self {
        let source = error.into();
        HandlerError {
            kind,
            message: source.to_string(),
            source,
        }
    }

    /// Whether the failure is transient or permanent.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The wrapped error's message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The error the handler gave.
    pub fn get_ref(&self) -> &(dyn StdError + Send + Sync + 'static) {
        &*self.source
    }

    /// The error the handler gave, by value.
    pub fn into_inner(self) -> BoxError {
        self.source
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl StdError for HandlerError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source.source()
    }
}

/// Why the router itself failed a delivery, before or instead of calling a handler.
///
/// The router reports each of these as a [`HandlerError::permanent`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RouteError {
    /// No handler is registered for the event's type, and the policy is to dead-letter.
    #[error("no handler for event type `{ty}`")]
    UnknownType {
        /// The event's type.
        ty: String,
    },
    /// The event has no `data`, and the handler's type cannot be made from JSON `null`.
    #[error("event of type `{ty}` has no data")]
    MissingData {
        /// The event's type.
        ty: String,
    },
    /// The event's `data` does not deserialise into the handler's type.
    #[error("data of event type `{ty}` does not match the handler's type")]
    Data {
        /// The event's type.
        ty: String,
        /// What serde reported.
        #[source]
        source: serde_json::Error,
    },
}

/// A handler attempt ran longer than the timeout layer allows; reported as transient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("handler timed out after {timeout_ms} ms")]
pub struct TimedOut {
    /// The timeout that elapsed.
    pub timeout_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps_without_repeating_the_message_in_the_chain() {
        let inner = RouteError::Data {
            ty: "OrderPlaced".to_owned(),
            source: serde_json::from_str::<u32>("\"x\"").unwrap_err(),
        };
        let error = HandlerError::permanent(inner);
        assert_eq!(error.kind(), ErrorKind::Permanent);
        assert_eq!(
            error.to_string(),
            "data of event type `OrderPlaced` does not match the handler's type"
        );
        assert_eq!(error.message(), error.to_string());
        let source = StdError::source(&error).unwrap();
        assert!(source.to_string().starts_with("invalid type"), "{source}");
        assert!(error.get_ref().is::<RouteError>());

        let text = HandlerError::transient("database unavailable");
        assert_eq!(text.kind(), ErrorKind::Transient);
        assert_eq!(text.to_string(), "database unavailable");
        assert!(StdError::source(&text).is_none());
    }
}
