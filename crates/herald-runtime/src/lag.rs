//! Consumer lag: how far a consumer group is behind the head of each partition of its
//! topic, as the gauge [`CONSUMER_LAG`] (`herald_consumer_lag{group,topic,partition}`).
//!
//! The broker knows the lag ([`Subscriber::lag`]: head minus the group's durable committed
//! offset, per partition); this module turns it into metrics through the `metrics` facade,
//! whatever recorder the application installed (a Prometheus exporter, typically).
//!
//! - [`record_lag`] reads the lag once and sets the gauges: for a one-off check, or a
//!   scrape handler that wants fresh numbers.
//! - [`LagOptions::build`] makes a [`Reporter`] that, once [run](Reporter::run), reads and
//!   records the lag every [`interval_ms`](LagOptions::interval_ms) until its shutdown
//!   token is cancelled; a consumer spawns one next to its member. Its cheap [`Handle`]
//!   gives the latest reading.
//!
//! The gauge is the group's lag, not one member's: every member of a group reporting it
//! sets the same values. Because the committed offsets are durable ones, acks the broker
//! has not committed yet still count as lag (on the embedded broker, until its commit task's
//! next append), and so do acks beyond a gap of un-acked messages.

use std::sync::Arc;
use std::time::Duration;

use herald_core::broker::{self, GroupName, PartitionLag, Subscriber, TopicName};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

/// Gauge of the messages a consumer group has yet to commit in one partition (head minus
/// durable committed offset), labelled `group`, `topic` and `partition`.
pub const CONSUMER_LAG: &str = "herald_consumer_lag";

/// How a [`Reporter`] behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LagOptions {
    /// How often the lag is read and recorded (default 10 s, under a typical Prometheus
    /// scrape interval); at least 1. The first reading is taken at once.
    pub interval_ms: u64,
}

impl Default for LagOptions {
    fn default() -> Self {
        LagOptions {
            interval_ms: 10_000,
        }
    }
}

/// Why [`LagOptions::build`] refused the options.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// A bound is out of range.
    #[error("`{option}` must be {expected}")]
    Bound {
        /// The option.
        option: &'static str,
        /// What it must be.
        expected: &'static str,
    },
}

/// Reads a group's lag on a topic every interval and records it in [`CONSUMER_LAG`]; made by
/// [`LagOptions::build`], driven by [`Reporter::run`].
pub struct Reporter {
    options: LagOptions,
    subscriber: Arc<dyn Subscriber>,
    topic: TopicName,
    group: GroupName,
    readings: watch::Sender<Option<Reading>>,
}

/// A cheap handle to a [`Reporter`]: its latest reading. Clone it freely.
#[derive(Debug, Clone)]
pub struct Handle {
    readings: watch::Receiver<Option<Reading>>,
}

/// One reading of the lag by a [`Reporter`].
#[derive(Debug, Clone)]
pub struct Reading {
    /// 1 for the reporter's first reading, one more for each after it.
    pub sequence: u64,
    /// What [`Subscriber::lag`] answered; the gauges were set from it when it is `Ok`, and
    /// left as they were when it is not.
    pub lag: Result<Vec<PartitionLag>, Arc<broker::Error>>,
}

impl LagOptions {
    /// A reporter of `group`'s lag on `topic`, read from `subscriber`.
    pub fn build(
        self,
        subscriber: Arc<dyn Subscriber>,
        topic: TopicName,
        group: GroupName,
    ) -> Result<Reporter, BuildError> {
        if self.interval_ms == 0 {
            return Err(BuildError::Bound {
                option: "interval_ms",
                expected: "at least 1",
            });
        }
        Ok(Reporter {
            options: self,
            subscriber,
            topic,
            group,
            readings: watch::Sender::new(None),
        })
    }
}

impl Reporter {
    /// A handle to this reporter's readings.
    pub fn handle(&self) -> Handle {
        Handle {
            readings: self.readings.subscribe(),
        }
    }

    /// Reads and records the lag at once, then every interval, until `shutdown` is
    /// cancelled (a reading in progress is abandoned). A failed reading is logged and
    /// leaves the gauges as they were; the next interval tries again.
    ///
    /// Runs in a span named `herald.consumer.lag`. Intervals follow tokio's clock, so the
    /// reporter runs under paused time in tests; a reading slower than the interval delays
    /// the next one rather than bunching them up.
    pub async fn run(self, shutdown: CancellationToken) {
        let span = tracing::info_span!(
            "herald.consumer.lag",
            topic = %self.topic,
            group = %self.group
        );
        self.report(shutdown).instrument(span).await;
    }

    async fn report(self, shutdown: CancellationToken) {
        let mut ticks = tokio::time::interval(Duration::from_millis(self.options.interval_ms));
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut sequence = 0;
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let lag = tokio::select! {
                biased;
                () = shutdown.cancelled() => return,
                lag = record_lag(&*self.subscriber, &self.topic, &self.group) => lag,
            };
            if let Err(error) = &lag {
                tracing::warn!(error = %error, "reading the consumer lag failed");
            }
            sequence += 1;
            self.readings.send_replace(Some(Reading {
                sequence,
                lag: lag.map_err(Arc::new),
            }));
        }
    }
}

impl std::fmt::Debug for Reporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reporter")
            .field("options", &self.options)
            .field("topic", &self.topic)
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

impl Handle {
    /// The reporter's latest reading; `None` before the first.
    pub fn latest(&self) -> Option<Reading> {
        self.readings.borrow().clone()
    }

    /// Waits for the reading numbered `sequence` or a later one, and returns the latest;
    /// `None` if the reporter stops before taking it.
    pub async fn reading(&mut self, sequence: u64) -> Option<Reading> {
        let reached = |reading: &Option<Reading>| {
            reading
                .as_ref()
                .is_some_and(|reading| reading.sequence >= sequence)
        };
        if let Ok(reading) = self.readings.wait_for(reached).await {
            return reading.clone();
        }
        // The reporter is gone; its last reading may still be the one asked for.
        self.latest().filter(|reading| reading.sequence >= sequence)
    }
}

/// Reads `group`'s lag on `topic` from `subscriber` once, sets [`CONSUMER_LAG`] for every
/// partition, and returns the lag. On failure the gauges are left as they were.
pub async fn record_lag(
    subscriber: &dyn Subscriber,
    topic: &TopicName,
    group: &GroupName,
) -> Result<Vec<PartitionLag>, broker::Error> {
    let lag = subscriber.lag(topic, group).await?;
    for partition in &lag {
        metrics::gauge!(
            CONSUMER_LAG,
            "group" => group.as_str().to_owned(),
            "topic" => topic.as_str().to_owned(),
            "partition" => partition.partition.to_string(),
        )
        // A gauge is an f64: exact up to 2^53 messages behind.
        .set(partition.lag as f64);
    }
    Ok(lag)
}
