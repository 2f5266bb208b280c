//! The relay: publishes the outbox's rows through a [`Publisher`], in order per key, with
//! several instances sharing the work.
//!
//! # Contract
//!
//! - **At least once.** Every committed outbox row is published, eventually, as long as a
//!   relay runs and the publisher recovers. A row is marked published (or deleted, per
//!   [`OnPublish`]) only after the publisher acknowledged it; a relay that dies between the
//!   publish and the mark leaves the row to be published again. Consumers deduplicate by
//!   event id (the runtime's idempotency layer, the [inbox](crate::inbox)).
//! - **Order per key.** The key space is split into [`LEASE_PARTITIONS`] lease
//!   partitions (the partition of a row is the stable hash of its partition key, computed
//!   at enqueue). A relay publishes only rows of partitions it holds a lease on, and each
//!   partition's rows in `seq` order. When a publish fails, that partition's later rows
//!   wait: no row is published past an earlier unpublished row of its partition. So, of
//!   the deliveries of one key, the first deliveries come in `seq` order (a re-published
//!   row can repeat after later ones only as a duplicate of an earlier delivery).
//! - **Leases.** Each relay registers in `herald_outbox_relays` and, on PostgreSQL, takes
//!   its fair share of the partitions (the partition count divided by the live relays; the
//!   relays sorted by holder id take the remainder one each) from the free or expired
//!   leases, and gives back partitions beyond its share, so that a relay that joins gets
//!   work. It renews its leases every `lease_ttl_ms / 3`. A relay that dies keeps its
//!   leases until they expire, at most `lease_ttl_ms` after its last renewal: then the
//!   others take them (bounded fail-over). A relay whose lease was taken stops touching
//!   that partition. On SQLite one relay holds every partition; another takes over when
//!   that lease expires. A relay that knows it is alone on its database
//!   ([`RelayOptions::take_over_on_start`]) releases every other holder's leases when it
//!   starts, so a restart after a crash does not wait for them to expire.
//! - **Claim (PostgreSQL).** A batch runs in one transaction that first locks the lease
//!   rows of the partitions the relay holds (`FOR UPDATE SKIP LOCKED`, renewing them), and
//!   keeps them locked through the publish until the rows are marked: a lease can change
//!   hands only between two batches, never during one. The claim reads, for each locked
//!   partition, its first unpublished rows by `seq`, so a row that commits late (a lower
//!   `seq` than rows already published) is still found and published: no high-water mark
//!   can skip it. Each partition gives at most its limit: an equal share of
//!   `batch_len_max` among the partitions held, doubled (up to `batch_len_max`) for the
//!   next claim while a partition fills it, so a busy key soon gets whole batches while a
//!   claim reads about one batch of rows, not `batch_len_max` per partition. A batch in
//!   which a partition filled its limit counts as full: the relay claims again at once.
//!   A publish is bounded by `publish_timeout_ms`, shorter than
//!   `lease_ttl_ms`, so a relay cut off from the database stops publishing before another
//!   can take its leases over.
//! - **Claim (SQLite).** The relay reads without a transaction and marks the rows in a
//!   short write transaction afterwards: SQLite's single write lock is never held across a
//!   publish.
//! - **Failures.** A failed publish (an error, or no answer within `publish_timeout_ms`)
//!   counts an attempt on each row of the failed publish, records the error in
//!   `last_error`, and sets `next_attempt_at` after an exponential, fully jittered backoff
//!   (`retry_delay_initial_ms` doubling up to `retry_delay_max_ms`). Until then the
//!   partition is skipped; other partitions go on. A row is never dropped: after any number
//!   of failures it waits and is tried again. A row that cannot be decoded (edited by
//!   hand) fails the same way, with the reason.
//! - **Duplicates refused by the broker.** A publisher that refuses an event because its
//!   id is already stored (`herald_core::store::Error::DuplicateEventId` as the backend
//!   error: the embedded broker, when a batch is published again grouped differently after
//!   a crash) has the event: the relay publishes the batch again one event at a time and
//!   counts each event so refused as published.
//! - **Wake-up.** On PostgreSQL the relay listens on
//!   [`NOTIFY_CHANNEL`](crate::outbox::NOTIFY_CHANNEL) and claims as soon as an enqueuing
//!   transaction commits; it also polls every `poll_interval_ms` (notifications are lost
//!   while the listening connection is down). On SQLite it polls, and
//!   [`Handle::wake`] lets an enqueuer in the same process wake it at once.
//! - **Retention.** With [`OnPublish::Mark`], published rows older than `retention_ms` are
//!   deleted every `retention_interval_ms`, at most `retention_delete_len_max` per
//!   statement.
//! - **Metrics** (the `metrics` facade), every `metrics_interval_ms`:
//!   [`OUTBOX_BACKLOG`] (unpublished rows) and [`OUTBOX_OLDEST_AGE_SECONDS`] (age of the
//!   oldest); and counters [`OUTBOX_PUBLISHED_TOTAL`] and
//!   [`OUTBOX_PUBLISH_FAILURES_TOTAL`] (rows).
//! - **Shutdown.** When `shutdown` is cancelled, [`Relay::run`] finishes the batch in
//!   flight (its publish bounded by `publish_timeout_ms`), marks it, releases its leases
//!   and unregisters, so that a clean restart does not wait for the leases to expire.
//!   Database errors while running are logged and retried after
//!   `database_retry_delay_ms`; they never stop the relay.
//!
//! # Connections
//!
//! A relay uses one connection of its pool at a time for its batches and, on PostgreSQL
//! with `listen`, one more for `LISTEN` (held as long as it runs).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use herald_core::broker::{self, Publisher, TopicName};
use herald_core::{Event, store};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde::{Deserialize, Serialize};
use sqlx::Pool;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::backend::{Backend, ClaimedRow, Failure};
use crate::error::Error;
use crate::outbox::{self, LEASE_PARTITIONS};

/// Gauge: rows not yet published.
pub const OUTBOX_BACKLOG: &str = "herald_outbox_backlog";
/// Gauge: how long the oldest unpublished row has waited, in seconds (0 when none).
pub const OUTBOX_OLDEST_AGE_SECONDS: &str = "herald_outbox_oldest_age_seconds";
/// Counter: rows published by this process's relays.
pub const OUTBOX_PUBLISHED_TOTAL: &str = "herald_outbox_published_total";
/// Counter: rows whose publish failed (each failed attempt counts).
pub const OUTBOX_PUBLISH_FAILURES_TOTAL: &str = "herald_outbox_publish_failures_total";

/// The longest `last_error` recorded, in bytes (longer messages are cut).
pub const LAST_ERROR_LEN_MAX: usize = 2_000;
/// The longest relay name, in bytes.
pub const NAME_LEN_MAX: usize = 100;

/// What the relay does with a row once it is published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnPublish {
    /// Sets `published_at`; retention deletes the row later.
    Mark,
    /// Deletes the row at once.
    Delete,
}

/// How a [`Relay`] behaves. Every bound is named with its unit last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RelayOptions {
    /// The most rows one batch claims (and publishes before marking them). Each batch
    /// costs a few round trips and two syncs (the broker's, the mark's commit) whatever
    /// its size, so large batches carry a backlog fastest; a relay killed mid-batch
    /// publishes up to this many rows again.
    pub batch_len_max: u32,
    /// How often the relay looks for rows without being woken.
    pub poll_interval_ms: u64,
    /// How long a lease lasts unless renewed; renewed every third of it. A dead relay's
    /// partitions move to the others this long after its last renewal, at most.
    pub lease_ttl_ms: u64,
    /// How long one publish may take before it counts as failed; below `lease_ttl_ms`.
    pub publish_timeout_ms: u64,
    /// The backoff after a row's first failed publish.
    pub retry_delay_initial_ms: u64,
    /// The longest backoff between two attempts of a row.
    pub retry_delay_max_ms: u64,
    /// What to do with published rows.
    pub on_publish: OnPublish,
    /// How long published rows are kept (with [`OnPublish::Mark`]).
    pub retention_ms: u64,
    /// How often the retention job runs.
    pub retention_interval_ms: u64,
    /// The most rows one retention statement deletes.
    pub retention_delete_len_max: u32,
    /// How often the backlog gauges are updated.
    pub metrics_interval_ms: u64,
    /// Whether to wake on PostgreSQL notifications (ignored on SQLite).
    pub listen: bool,
    /// How long to wait before trying again after a database error.
    pub database_retry_delay_ms: u64,
    /// A name for this relay, the start of its holder id in the lease table (e.g. the
    /// host name); at most [`NAME_LEN_MAX`] bytes.
    pub name: Option<String>,
    /// On start, release the leases every other relay holds, live or not, instead of
    /// waiting up to `lease_ttl_ms` for those of a relay that died to expire. Only for a
    /// relay that knows no other can be running on its database, e.g. because its process
    /// holds an exclusive lock that any other relay's process would need: set on a shared
    /// database, two relays would publish the same partitions.
    pub take_over_on_start: bool,
}

impl Default for RelayOptions {
    fn default() -> Self {
        RelayOptions {
            batch_len_max: 2_000,
            poll_interval_ms: 1_000,
            lease_ttl_ms: 15_000,
            publish_timeout_ms: 5_000,
            retry_delay_initial_ms: 200,
            retry_delay_max_ms: 60_000,
            on_publish: OnPublish::Mark,
            retention_ms: 7 * 24 * 3_600_000,
            retention_interval_ms: 60_000,
            retention_delete_len_max: 10_000,
            metrics_interval_ms: 5_000,
            listen: true,
            database_retry_delay_ms: 1_000,
            name: None,
            take_over_on_start: false,
        }
    }
}

impl RelayOptions {
    /// Checks the options and makes a relay publishing `pool`'s outbox through
    /// `publisher`. Its backoff jitter comes from an entropy-seeded generator
    /// (see [`Relay::with_rng`]).
    pub fn build<DB: Backend>(
        self,
        pool: Pool<DB>,
        publisher: Arc<dyn Publisher>,
    ) -> Result<Relay<DB>, Error> {
        self.check()?;
        let id = uuid::Uuid::now_v7();
        let holder = match &self.name {
            Some(name) => format!("{name}/{id}"),
            None => id.to_string(),
        };
        Ok(Relay {
            shared: Arc::new(Shared {
                wake: Arc::new(Notify::new()),
                holder: holder.clone(),
                progress: watch::Sender::new(Progress::default()),
            }),
            options: self,
            pool,
            publisher,
            holder,
            rng: StdRng::from_entropy(),
            partition_len_max: vec![0; LEASE_PARTITIONS as usize],
        })
    }

    fn check(&self) -> Result<(), Error> {
        let invalid = |option: &'static str, reason: &str| {
            Err(Error::InvalidOptions {
                option,
                reason: reason.to_owned(),
            })
        };
        let positive: [(&'static str, u64); 8] = [
            ("batch_len_max", u64::from(self.batch_len_max)),
            ("poll_interval_ms", self.poll_interval_ms),
            ("publish_timeout_ms", self.publish_timeout_ms),
            ("retry_delay_initial_ms", self.retry_delay_initial_ms),
            ("retention_interval_ms", self.retention_interval_ms),
            (
                "retention_delete_len_max",
                u64::from(self.retention_delete_len_max),
            ),
            ("metrics_interval_ms", self.metrics_interval_ms),
            ("database_retry_delay_ms", self.database_retry_delay_ms),
        ];
        for (option, value) in positive {
            if value == 0 {
                return invalid(option, "must be at least 1");
            }
        }
        // Milliseconds go to the database as signed 64-bit integers.
        let millis: [(&'static str, u64); 4] = [
            ("lease_ttl_ms", self.lease_ttl_ms),
            ("retry_delay_max_ms", self.retry_delay_max_ms),
            ("retention_ms", self.retention_ms),
            ("publish_timeout_ms", self.publish_timeout_ms),
        ];
        for (option, value) in millis {
            if value > i64::MAX as u64 / 2 {
                return invalid(option, "is out of range");
            }
        }
        if self.lease_ttl_ms < 3 {
            return invalid("lease_ttl_ms", "must be at least 3 (renewed every third)");
        }
        if self.publish_timeout_ms >= self.lease_ttl_ms {
            return invalid(
                "publish_timeout_ms",
                "must be below lease_ttl_ms, so that a publish ends before its lease can move",
            );
        }
        if self.retry_delay_max_ms < self.retry_delay_initial_ms {
            return invalid(
                "retry_delay_max_ms",
                "must be at least retry_delay_initial_ms",
            );
        }
        if self
            .name
            .as_ref()
            .is_some_and(|name| name.len() > NAME_LEN_MAX)
        {
            return invalid("name", "is longer than 100 bytes");
        }
        Ok(())
    }

    /// The ceiling of the backoff before attempt `attempt + 1` of a row that failed
    /// `attempt` times: `retry_delay_initial_ms` doubled per earlier failure, at most
    /// `retry_delay_max_ms`.
    pub fn retry_delay_ceiling_ms(&self, attempt: u32) -> u64 {
        let doublings = attempt.saturating_sub(1).min(63);
        self.retry_delay_initial_ms
            .saturating_mul(1_u64 << doublings)
            .min(self.retry_delay_max_ms)
    }
}

/// Publishes the outbox; see the [module documentation](self). Made by
/// [`RelayOptions::build`], run by [`Relay::run`].
pub struct Relay<DB: Backend> {
    options: RelayOptions,
    pool: Pool<DB>,
    publisher: Arc<dyn Publisher>,
    holder: String,
    rng: StdRng,
    shared: Arc<Shared>,
    /// Per partition, how many rows the next claim should read from it at least (see
    /// [`Relay::partition_limits`]).
    partition_len_max: Vec<i64>,
}

struct Shared {
    wake: Arc<Notify>,
    holder: String,
    progress: watch::Sender<Progress>,
}

/// What a running relay has done so far, as its [`Handle`] shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Progress {
    /// Rows published.
    pub published: u64,
    /// Rows whose publish failed (each failed attempt counts).
    pub publish_failures: u64,
    /// The partitions held at the last lease renewal (none once stopped).
    pub held: Vec<u32>,
    /// Claims made (with or without rows).
    pub claims: u64,
}

/// A cheap handle to a [`Relay`], usable while it runs.
#[derive(Clone)]
pub struct Handle {
    shared: Arc<Shared>,
}

/// What a relay did, returned when it stops.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Report {
    /// Rows published.
    pub published: u64,
    /// Rows whose publish failed (each failed attempt counts).
    pub publish_failures: u64,
    /// Batches that claimed at least one row.
    pub batches: u64,
}

impl<DB: Backend> std::fmt::Debug for Relay<DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("holder", &self.holder)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle")
            .field("holder", &self.shared.holder)
            .finish_non_exhaustive()
    }
}

impl Handle {
    /// Wakes the relay to look for rows now (e.g. after committing an enqueue on SQLite).
    pub fn wake(&self) {
        self.shared.wake.notify_one();
    }

    /// The relay's holder id in the lease table.
    pub fn holder(&self) -> &str {
        &self.shared.holder
    }

    /// What the relay has done so far.
    pub fn progress(&self) -> Progress {
        self.shared.progress.borrow().clone()
    }

    /// Waits until `done` holds for the relay's progress (checked on every change), and
    /// returns that progress. Never returns if it never holds: bound it with a timeout.
    pub async fn wait_for(&self, mut done: impl FnMut(&Progress) -> bool) -> Progress {
        let mut progress = self.shared.progress.subscribe();
        let seen = progress
            .wait_for(|progress| done(progress))
            .await
            .expect("the handle keeps the sender");
        seen.clone()
    }
}

/// What publishing one partition's claimed rows did.
#[derive(Default)]
struct PartitionOutcome {
    published: Vec<i64>,
    failed: Option<FailedRun>,
}

/// Rows of one publish that failed, and the rows of the partition after them (untouched).
struct FailedRun {
    seqs: Vec<i64>,
    error: String,
    /// The failures of the run's first row before this one.
    attempts: i32,
}

impl<DB: Backend> Relay<DB> {
    /// Replaces the generator the backoff jitter is drawn from (a seeded one makes the
    /// delays reproducible).
    pub fn with_rng(mut self, rng: StdRng) -> Self {
        self.rng = rng;
        self
    }

    /// This relay's holder id in the lease table: its name (if any), `/`, a UUIDv7.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// A handle to the relay.
    pub fn handle(&self) -> Handle {
        Handle {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Publishes until `shutdown` is cancelled, then releases its leases; see the
    /// [module documentation](self). Fails only at the start: when the database cannot be
    /// reached or its schema is not the expected one; later database errors are logged and
    /// retried.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<Report, Error> {
        let partitions = DB::lease_partitions(&self.pool).await?;
        if partitions != i64::from(LEASE_PARTITIONS) {
            return Err(Error::Schema {
                reason: format!(
                    "herald_outbox_leases has {partitions} partitions, this relay expects \
                     {LEASE_PARTITIONS}"
                ),
            });
        }
        if self.options.take_over_on_start {
            DB::take_over(&self.pool, &self.holder).await?;
        }
        let listening = shutdown.child_token();
        let listener = (DB::NOTIFIES && self.options.listen).then(|| {
            tokio::spawn(
                DB::listen(
                    self.pool.clone(),
                    Arc::clone(&self.shared.wake),
                    listening.clone(),
                    self.options.database_retry_delay_ms,
                )
                .instrument(tracing::info_span!("herald.outbox.listen", holder = %self.holder)),
            )
        });

        let mut report = Report::default();
        let renew_interval = Duration::from_millis(self.options.lease_ttl_ms / 3);
        let poll_interval = Duration::from_millis(self.options.poll_interval_ms);
        let retry_delay = Duration::from_millis(self.options.database_retry_delay_ms);
        let metrics_interval = Duration::from_millis(self.options.metrics_interval_ms);
        let retention_interval = Duration::from_millis(self.options.retention_interval_ms);
        let start = Instant::now();
        let (mut leases_due, mut metrics_due, mut retention_due) = (start, start, start);
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            let now = Instant::now();
            if now >= leases_due {
                leases_due = match self.maintain_leases().await {
                    Ok(()) => now + renew_interval,
                    Err(error) => {
                        tracing::warn!(error = %error, cause = %Causes(&error), "renewing outbox leases failed");
                        now + retry_delay.min(renew_interval)
                    }
                };
            }
            if now >= metrics_due {
                metrics_due = now + metrics_interval;
                if let Err(error) = self.record_metrics().await {
                    tracing::warn!(error = %error, cause = %Causes(&error), "reading the outbox backlog failed");
                }
            }
            if now >= retention_due && self.options.on_publish == OnPublish::Mark {
                retention_due = now + retention_interval;
                if let Err(error) = self.delete_expired(&shutdown).await {
                    tracing::warn!(error = %error, cause = %Causes(&error), "outbox retention failed");
                }
            }
            let mut wake_at = (now + poll_interval)
                .min(leases_due)
                .min(metrics_due)
                .min(retention_due);
            match self.batch(&mut report).await {
                Ok(true) => continue,
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(error = %error, cause = %Causes(&error), "relaying an outbox batch failed");
                    wake_at = wake_at.min(Instant::now() + retry_delay);
                }
            }
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                () = self.shared.wake.notified() => {}
                () = tokio::time::sleep_until(wake_at) => {}
            }
        }

        listening.cancel();
        if let Some(listener) = listener {
            // A listener that panicked has nothing left to stop.
            let _ = listener.await;
        }
        if let Err(error) = DB::leave(&self.pool, &self.holder).await {
            tracing::warn!(error = %error, "releasing the outbox leases failed; they expire instead");
        }
        self.shared
            .progress
            .send_modify(|progress| progress.held.clear());
        Ok(report)
    }

    /// Registers as alive, renews the leases held, and takes or gives back leases to hold
    /// a fair share.
    async fn maintain_leases(&mut self) -> Result<(), Error> {
        let ttl_ms = self.options.lease_ttl_ms as i64;
        let live = DB::heartbeat(&self.pool, &self.holder, ttl_ms).await?;
        let mut held = DB::renew(&self.pool, &self.holder, ttl_ms).await?;
        held.sort_unstable();
        let share = if DB::SINGLE_RELAY {
            LEASE_PARTITIONS as usize
        } else {
            fair_share(LEASE_PARTITIONS, &live, &self.holder) as usize
        };
        if held.len() > share {
            let extra = held.split_off(share);
            DB::release(&self.pool, &self.holder, &extra).await?;
            tracing::debug!(released = ?extra, "gave back outbox leases beyond the fair share");
        } else if held.len() < share {
            let want = (share - held.len()) as i64;
            let taken = DB::acquire(&self.pool, &self.holder, want, ttl_ms).await?;
            if !taken.is_empty() {
                tracing::debug!(taken = ?taken, "took outbox leases");
            }
            held.extend(taken);
            held.sort_unstable();
            held.dedup();
        }
        let held = held.into_iter().map(|p| p as u32).collect();
        self.shared
            .progress
            .send_modify(|progress| progress.held = held);
        Ok(())
    }

    async fn record_metrics(&self) -> Result<(), Error> {
        let status = DB::status(&self.pool, 0).await?;
        metrics::gauge!(OUTBOX_BACKLOG).set(status.backlog as f64);
        metrics::gauge!(OUTBOX_OLDEST_AGE_SECONDS)
            .set(status.oldest_age.map_or(0.0, |age| age.as_secs_f64()));
        Ok(())
    }

    /// Deletes the published rows older than the retention, a bounded statement at a time.
    async fn delete_expired(&self, shutdown: &CancellationToken) -> Result<u64, Error> {
        let len_max = i64::from(self.options.retention_delete_len_max);
        let mut deleted = 0;
        while !shutdown.is_cancelled() {
            let done =
                DB::delete_published(&self.pool, self.options.retention_ms as i64, len_max).await?;
            deleted += done;
            if done < len_max as u64 {
                break;
            }
        }
        if deleted > 0 {
            tracing::debug!(deleted, "deleted published outbox rows past retention");
        }
        Ok(deleted)
    }

    /// The most rows the next claim reads from each partition (indexed by partition), on
    /// a backend that claims per partition: an equal share of `batch_len_max` among the
    /// partitions held, or more where a partition's last claims asked for it.
    fn partition_limits(&self) -> Vec<i64> {
        let len_max = i64::from(self.options.batch_len_max);
        let held = self.shared.progress.borrow().held.len().max(1) as i64;
        let share = (len_max + held - 1) / held;
        self.partition_len_max
            .iter()
            .map(|&wanted| wanted.max(share).min(len_max))
            .collect()
    }

    /// Adapts the per-partition limits to what a claim with `limits` yielded: a partition
    /// that filled its limit (a busy key) may hold more, and its limit doubles, up to
    /// `batch_len_max`; any other asks next time for twice what it yielded (at least the
    /// equal share). Returns whether some partition filled its limit.
    fn adapt_partition_limits(
        &mut self,
        limits: &[i64],
        by_partition: &BTreeMap<i32, Vec<ClaimedRow>>,
    ) -> bool {
        if !DB::CLAIMS_PER_PARTITION {
            return false;
        }
        let len_max = i64::from(self.options.batch_len_max);
        let mut cut = false;
        for (partition, wanted) in self.partition_len_max.iter_mut().enumerate() {
            let yielded = by_partition
                .get(&(partition as i32))
                .map_or(0, |rows| rows.len() as i64);
            *wanted = if yielded > 0 && yielded >= limits[partition] {
                cut = true;
                limits[partition].saturating_mul(2).min(len_max)
            } else {
                (yielded * 2).min(len_max)
            };
        }
        cut
    }

    /// Claims, publishes and settles one batch; whether it was full (more may be waiting).
    async fn batch(&mut self, report: &mut Report) -> Result<bool, Error> {
        let len_max = self.options.batch_len_max as usize;
        let limits = self.partition_limits();
        let (claim, rows) = DB::claim(
            &self.pool,
            &self.holder,
            self.options.lease_ttl_ms as i64,
            self.options.publish_timeout_ms as i64,
            len_max as i64,
            &limits,
        )
        .await?;
        let delete = self.options.on_publish == OnPublish::Delete;
        let claimed = rows.len();
        let mut by_partition: BTreeMap<i32, Vec<ClaimedRow>> = BTreeMap::new();
        for row in rows {
            by_partition.entry(row.partition).or_default().push(row);
        }
        let cut = self.adapt_partition_limits(&limits, &by_partition);
        if claimed == 0 {
            DB::settle(&self.pool, claim, &[], &[], delete).await?;
            self.shared
                .progress
                .send_modify(|progress| progress.claims += 1);
            return Ok(false);
        }
        // A partition cut short by its limit may hold more rows, as may a full batch.
        let full = claimed >= len_max || cut;
        // Partitions are independent: published concurrently, so that a broker with group
        // commit (the embedded log) syncs them together.
        let timeout = Duration::from_millis(self.options.publish_timeout_ms);
        let publisher = &*self.publisher;
        let outcomes = futures::future::join_all(
            by_partition
                .into_values()
                .map(|rows| publish_partition(publisher, rows, timeout)),
        )
        .await;

        let mut published = Vec::new();
        let mut failures = Vec::new();
        for outcome in outcomes {
            published.extend(outcome.published);
            if let Some(failed) = outcome.failed {
                let ceiling = self
                    .options
                    .retry_delay_ceiling_ms(failed.attempts.max(0) as u32 + 1);
                let delay_ms = self.rng.gen_range(0..=ceiling) as i64;
                tracing::warn!(
                    rows = failed.seqs.len(),
                    first_seq = failed.seqs[0],
                    attempts = failed.attempts + 1,
                    retry_in_ms = delay_ms,
                    error = %failed.error,
                    "publishing outbox rows failed; their partition waits"
                );
                failures.push(Failure {
                    seqs: failed.seqs,
                    error: failed.error,
                    delay_ms,
                });
            }
        }
        DB::settle(&self.pool, claim, &published, &failures, delete).await?;

        let failed_rows: u64 = failures.iter().map(|f| f.seqs.len() as u64).sum();
        report.published += published.len() as u64;
        report.publish_failures += failed_rows;
        report.batches += 1;
        self.shared.progress.send_modify(|progress| {
            progress.published += published.len() as u64;
            progress.publish_failures += failed_rows;
            progress.claims += 1;
        });
        metrics::counter!(OUTBOX_PUBLISHED_TOTAL).increment(published.len() as u64);
        if failed_rows > 0 {
            metrics::counter!(OUTBOX_PUBLISH_FAILURES_TOTAL).increment(failed_rows);
        }
        Ok(full)
    }
}

/// The number of partitions `holder` should hold among the `live` relays (sorted): an
/// equal share, the first relays taking the remainder one each.
fn fair_share(partitions: u32, live: &[String], holder: &str) -> u32 {
    let (count, rank) = match live.iter().position(|other| other == holder) {
        Some(rank) => (live.len() as u32, rank as u32),
        None => (live.len() as u32 + 1, live.len() as u32),
    };
    partitions / count + u32::from(rank < partitions % count)
}

/// Publishes one partition's claimed rows in `seq` order, a publish per run of rows with
/// the same topic, stopping at the first failure.
async fn publish_partition(
    publisher: &dyn Publisher,
    rows: Vec<ClaimedRow>,
    timeout: Duration,
) -> PartitionOutcome {
    let mut outcome = PartitionOutcome::default();
    let mut run: Vec<(i64, i32, Event)> = Vec::new();
    let mut run_topic: Option<TopicName> = None;
    for row in rows {
        let decoded = outbox::decode(&row);
        let same_topic =
            matches!((&decoded, &run_topic), (Ok((topic, _)), Some(current)) if topic == current);
        if !same_topic && let Some(topic) = run_topic.take() {
            let failed = publish_run(
                publisher,
                &topic,
                std::mem::take(&mut run),
                timeout,
                &mut outcome.published,
            )
            .await;
            if failed.is_some() {
                outcome.failed = failed;
                return outcome;
            }
        }
        match decoded {
            Ok((topic, event)) => {
                run_topic.get_or_insert(topic);
                run.push((row.seq, row.attempts, event));
            }
            Err(reason) => {
                outcome.failed = Some(FailedRun {
                    seqs: vec![row.seq],
                    error: truncate(format!("the outbox row cannot be decoded: {reason}")),
                    attempts: row.attempts,
                });
                return outcome;
            }
        }
    }
    if let Some(topic) = run_topic {
        outcome.failed = publish_run(publisher, &topic, run, timeout, &mut outcome.published).await;
    }
    outcome
}

/// Publishes one run; the seqs published go to `published`, a failure is returned.
async fn publish_run(
    publisher: &dyn Publisher,
    topic: &TopicName,
    run: Vec<(i64, i32, Event)>,
    timeout: Duration,
    published: &mut Vec<i64>,
) -> Option<FailedRun> {
    let seqs: Vec<i64> = run.iter().map(|(seq, _, _)| *seq).collect();
    let head_attempts = run[0].1;
    // Kept for the one-at-a-time retry, needed only for a run of several.
    let kept: Option<Vec<Event>> =
        (run.len() > 1).then(|| run.iter().map(|(_, _, event)| event.clone()).collect());
    let events: Vec<Event> = run.into_iter().map(|(_, _, event)| event).collect();
    let error = match publish(publisher, topic, events, timeout).await {
        Ok(()) => {
            published.extend(seqs);
            return None;
        }
        Err(error) => error,
    };
    if !error.already_stored {
        return Some(FailedRun {
            seqs,
            error: error.message,
            attempts: head_attempts,
        });
    }
    let Some(events) = kept else {
        // A single event the broker already has.
        published.extend(seqs);
        return None;
    };
    for (index, event) in events.into_iter().enumerate() {
        match publish(publisher, topic, vec![event], timeout).await {
            Err(error) if !error.already_stored => {
                return Some(FailedRun {
                    seqs: seqs[index..].to_vec(),
                    error: error.message,
                    attempts: head_attempts,
                });
            }
            _ => published.push(seqs[index]),
        }
    }
    None
}

struct PublishError {
    message: String,
    already_stored: bool,
}

async fn publish(
    publisher: &dyn Publisher,
    topic: &TopicName,
    events: Vec<Event>,
    timeout: Duration,
) -> Result<(), PublishError> {
    match tokio::time::timeout(timeout, publisher.publish(topic, events)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(error)) => Err(PublishError {
            already_stored: already_stored(&error),
            message: truncate(format!("{error}{}", CausesSuffix(&error))),
        }),
        Err(_) => Err(PublishError {
            message: format!(
                "no answer from the publisher within {} ms",
                timeout.as_millis()
            ),
            already_stored: false,
        }),
    }
}

/// Whether the broker refused the publish because an event id is already stored.
fn already_stored(error: &broker::Error) -> bool {
    match error {
        broker::Error::Backend(source) => source
            .downcast_ref::<store::Error>()
            .is_some_and(|error| matches!(error, store::Error::DuplicateEventId { .. })),
        _ => false,
    }
}

/// `message`, cut to [`LAST_ERROR_LEN_MAX`] bytes on a character boundary.
fn truncate(mut message: String) -> String {
    if message.len() > LAST_ERROR_LEN_MAX {
        let mut end = LAST_ERROR_LEN_MAX;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
    }
    message
}

/// An error's causes, `why: why that`, for a log field next to the error itself.
struct Causes<'a>(&'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Causes<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut cause = self.0.source();
        let mut first = true;
        while let Some(error) = cause {
            if !first {
                f.write_str(": ")?;
            }
            write!(f, "{error}")?;
            first = false;
            cause = error.source();
        }
        Ok(())
    }
}

/// An error's causes as `: why: why that`, to follow the error in one message.
struct CausesSuffix<'a>(&'a (dyn std::error::Error + 'static));

impl std::fmt::Display for CausesSuffix<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.source().is_some() {
            write!(f, ": {}", Causes(self.0))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fair_shares_add_up_to_every_partition() {
        let live: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let shares: Vec<u32> = live.iter().map(|h| fair_share(32, &live, h)).collect();
        assert_eq!(shares, [11, 11, 10]);
        for count in 1..=40 {
            let live: Vec<String> = (0..count).map(|n| format!("relay-{n:02}")).collect();
            let total: u32 = live.iter().map(|h| fair_share(32, &live, h)).sum();
            assert_eq!(total, 32, "{count} relays");
        }
        // Not registered yet: counted as one more.
        assert_eq!(fair_share(32, &live, "d"), 8);
    }

    #[test]
    fn retry_delays_double_up_to_the_ceiling() {
        let options = RelayOptions {
            retry_delay_initial_ms: 100,
            retry_delay_max_ms: 1_000,
            ..RelayOptions::default()
        };
        let ceilings: Vec<u64> = (1..=6).map(|a| options.retry_delay_ceiling_ms(a)).collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1_000, 1_000]);
        assert_eq!(options.retry_delay_ceiling_ms(u32::MAX), 1_000);
    }

    #[test]
    fn options_out_of_range_are_refused() {
        type Spoil = fn(&mut RelayOptions);
        let cases: [(&str, Spoil); 6] = [
            ("batch_len_max", |o| o.batch_len_max = 0),
            ("poll_interval_ms", |o| o.poll_interval_ms = 0),
            ("publish_timeout_ms", |o| {
                o.publish_timeout_ms = o.lease_ttl_ms
            }),
            ("lease_ttl_ms", |o| o.lease_ttl_ms = 2),
            ("retry_delay_max_ms", |o| o.retry_delay_max_ms = 1),
            ("name", |o| o.name = Some("x".repeat(101))),
        ];
        for (name, spoil) in cases {
            let mut options = RelayOptions::default();
            spoil(&mut options);
            match options.check() {
                Err(Error::InvalidOptions { option, .. }) => assert_eq!(option, name),
                other => panic!("{name}: {other:?}"),
            }
        }
        RelayOptions::default().check().unwrap();
    }

    #[test]
    fn options_read_from_json_with_defaults() {
        let options: RelayOptions =
            serde_json::from_str(r#"{"batch_len_max": 10, "on_publish": "delete"}"#).unwrap();
        assert_eq!(options.batch_len_max, 10);
        assert_eq!(options.on_publish, OnPublish::Delete);
        assert_eq!(options.lease_ttl_ms, RelayOptions::default().lease_ttl_ms);
        assert!(serde_json::from_str::<RelayOptions>(r#"{"batch_size": 1}"#).is_err());
    }

    #[test]
    fn long_errors_are_cut_on_a_character_boundary() {
        let message = "é".repeat(LAST_ERROR_LEN_MAX);
        let cut = truncate(message);
        assert!(cut.len() <= LAST_ERROR_LEN_MAX);
        assert!(cut.chars().all(|c| c == 'é'));
    }

    #[test]
    fn a_duplicate_id_refusal_is_recognised() {
        let duplicate = broker::Error::Backend(Box::new(store::Error::DuplicateEventId {
            id: "e-1".to_owned(),
            stream: herald_core::StreamName::new("orders").unwrap(),
            version: herald_core::Version(0),
        }));
        assert!(already_stored(&duplicate));
        let other = broker::Error::Backend(Box::new(std::io::Error::other("down")));
        assert!(!already_stored(&other));
        assert!(!already_stored(&broker::Error::Closed));
    }
}
