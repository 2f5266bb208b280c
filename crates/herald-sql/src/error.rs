//! The crate's error type.

use herald_core::event;

/// Why an outbox, relay, inbox or migration operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The database failed or refused a statement. On PostgreSQL a failed statement aborts
    /// the caller's transaction: it can only be rolled back.
    #[error("database operation failed")]
    Database(#[source] sqlx::Error),
    /// Applying the migrations failed.
    #[error("migrating the database failed")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    /// The event is not a valid CloudEvent; nothing was written.
    #[error("the event is invalid")]
    InvalidEvent(#[source] event::Error),
    /// An event with this id is already in the outbox (event ids are unique there, until
    /// retention deletes the published row).
    #[error("event id `{id}` is already in the outbox")]
    DuplicateEventId {
        /// The event id.
        id: String,
    },
    /// The database holds a schema this version of Herald does not expect.
    #[error("unexpected schema: {reason}")]
    Schema {
        /// What is wrong.
        reason: String,
    },
    /// An option is out of its range.
    #[error("invalid option `{option}`: {reason}")]
    InvalidOptions {
        /// The option's name.
        option: &'static str,
        /// Why it is refused.
        reason: String,
    },
}

impl From<sqlx::Error> for Error {
    fn from(error: sqlx::Error) -> Self {
        Error::Database(error)
    }
}
