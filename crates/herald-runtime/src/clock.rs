//! Wall-clock time, injected so that dead-letter timestamps are deterministic in tests.

use std::fmt;

use chrono::{DateTime, Utc};

/// A source of wall-clock time.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// The current time.
    fn now(&self) -> DateTime<Utc>;
}

/// The system's clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A wall clock driven by tokio's clock: `start` plus the tokio time elapsed since it was
/// made. Under paused tokio time (`start_paused = true`) it advances exactly as the test's
/// timers do, so timestamps are deterministic.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    start: DateTime<Utc>,
    started: tokio::time::Instant,
}

impl TokioClock {
    /// A clock that reads `start` now. Call inside a tokio runtime.
    pub fn starting_at(start: DateTime<Utc>) -> Self {
        TokioClock {
            start,
            started: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    fn now(&self) -> DateTime<Utc> {
        let elapsed = chrono::Duration::from_std(self.started.elapsed())
            .expect("a test clock runs for less than 292 years");
        self.start + elapsed
    }
}
