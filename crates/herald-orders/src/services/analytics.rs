//! The analytics service: a read model of the business (orders by status, revenue, top
//! products), projected from the topic's events in the embedded log.
//!
//! # Contract
//!
//! - The projection follows the log from its checkpoint (`subscribe_all`), keeps the events
//!   of the topic's partition streams (`$topic:<topic>:<partition>`, the embedded broker's
//!   layout) and applies those of the flow. The events that arrived together (at most
//!   `projection_batch_len_max`) are applied in **one** transaction that also moves the
//!   checkpoint past them, so the read model and its checkpoint never disagree and every
//!   event counts exactly once, whatever crashes (the log stores each event id once).
//! - [`AnalyticsService::rebuild`] empties the read model and sets the checkpoint to the
//!   start of the log in one transaction; the projection then replays the whole log. While
//!   it catches up, readers see partial figures.
//! - A failing subscription (the log closing, a read error) is logged and resumed from the
//!   last checkpoint after `projection_retry_delay_ms`.
//!
//! The checkpoint is kept in the service's own table, not in herald-sql's checkpoints:
//! those only move forward, and a rebuild moves it back to the start.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use herald_core::{EventStore as _, Position, RecordedEvent};
use herald_log::Log;
use rusqlite::params;
use serde::Serialize;
use sqlx::SqlitePool;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::db::{self, Db, Migrations, Tx, now_ms};
use crate::events::{CancelReason, DeclineReason, Payload};
use crate::services::{signed, unsigned};

/// How many products `GET /api/analytics` ranks.
pub const TOP_PRODUCTS_LEN_MAX: u32 = 10;

pub(crate) const MIGRATIONS: Migrations = &[(
    1,
    "analytics",
    "CREATE TABLE analytics_counters (
        name  TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    );
    CREATE TABLE analytics_products (
        product_id    TEXT PRIMARY KEY,
        units_sold    INTEGER NOT NULL,
        revenue_cents INTEGER NOT NULL
    );
    CREATE TABLE analytics_checkpoint (
        id         INTEGER PRIMARY KEY CHECK (id = 1),
        position   INTEGER NOT NULL CHECK (position >= 0),
        rebuilds   INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    );
    INSERT INTO analytics_checkpoint (id, position, rebuilds, updated_at) VALUES (1, 0, 0, 0);",
)];

/// The read model, as `GET /api/analytics` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AnalyticsView {
    /// Orders by status.
    pub orders: OrderCounts,
    /// Payments by outcome.
    pub payments: PaymentCounts,
    /// The amounts of completed orders, in cents.
    pub revenue_cents: u64,
    /// The amounts charged, in cents.
    pub charged_cents: u64,
    /// The amounts refunded, in cents.
    pub refunded_cents: u64,
    /// The products sold most (by units, in completed orders), at most
    /// [`TOP_PRODUCTS_LEN_MAX`].
    pub top_products: Vec<ProductSales>,
    /// Events applied, by type.
    pub events: BTreeMap<String, u64>,
    /// Where the projection is in the log.
    pub checkpoint: Checkpoint,
}

/// Orders by status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderCounts {
    /// Placed.
    pub placed: u64,
    /// Placed and not settled yet.
    pub pending: u64,
    /// Completed.
    pub completed: u64,
    /// Cancelled.
    pub cancelled: u64,
    /// Cancelled, by reason.
    pub cancelled_by_reason: BTreeMap<String, u64>,
}

/// Payments by outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentCounts {
    /// Charged.
    pub charged: u64,
    /// Declined.
    pub declined: u64,
    /// Declined, by reason.
    pub declined_by_reason: BTreeMap<String, u64>,
    /// Refunded.
    pub refunded: u64,
}

/// A product's sales in completed orders.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProductSales {
    /// The product.
    pub product_id: String,
    /// Units sold.
    pub units_sold: u64,
    /// Their amount, in cents.
    pub revenue_cents: u64,
}

/// Where the projection is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Checkpoint {
    /// The log position the projection continues from: every event before it is applied.
    pub position: u64,
    /// How many times the read model was rebuilt.
    pub rebuilds: u64,
}

/// The read model of `db`.
pub(crate) async fn read(db: &Db) -> Result<AnalyticsView, db::Error> {
    read_pool(db.pool()).await
}

/// The read model in the analytics database of `pool`.
pub(crate) async fn read_pool(pool: &SqlitePool) -> Result<AnalyticsView, db::Error> {
    let counters: Vec<(String, i64)> = sqlx::query_as("SELECT name, value FROM analytics_counters")
        .fetch_all(pool)
        .await?;
    let mut counts = BTreeMap::new();
    for (name, value) in counters {
        counts.insert(name, unsigned(value, "counter")?);
    }
    let count = |name: &str| counts.get(name).copied().unwrap_or(0);
    let by_prefix = |prefix: &str| -> BTreeMap<String, u64> {
        counts
            .iter()
            .filter_map(|(name, value)| Some((name.strip_prefix(prefix)?.to_owned(), *value)))
            .collect()
    };
    let placed = count("orders_placed");
    let completed = count("orders_completed");
    let cancelled = count("orders_cancelled");
    let products: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT product_id, units_sold, revenue_cents FROM analytics_products
         ORDER BY units_sold DESC, product_id LIMIT ?1",
    )
    .bind(i64::from(TOP_PRODUCTS_LEN_MAX))
    .fetch_all(pool)
    .await?;
    let (position, rebuilds): (i64, i64) =
        sqlx::query_as("SELECT position, rebuilds FROM analytics_checkpoint WHERE id = 1")
            .fetch_one(pool)
            .await?;
    Ok(AnalyticsView {
        orders: OrderCounts {
            placed,
            pending: placed.saturating_sub(completed + cancelled),
            completed,
            cancelled,
            cancelled_by_reason: by_prefix("orders_cancelled:"),
        },
        payments: PaymentCounts {
            charged: count("payments_charged"),
            declined: count("payments_declined"),
            declined_by_reason: by_prefix("payments_declined:"),
            refunded: count("payments_refunded"),
        },
        revenue_cents: count("revenue_cents"),
        charged_cents: count("charged_cents"),
        refunded_cents: count("refunded_cents"),
        top_products: products
            .into_iter()
            .map(|(product_id, units, revenue)| {
                Ok(ProductSales {
                    product_id,
                    units_sold: unsigned(units, "units")?,
                    revenue_cents: unsigned(revenue, "revenue")?,
                })
            })
            .collect::<Result<_, db::Error>>()?,
        events: by_prefix("events:"),
        checkpoint: Checkpoint {
            position: unsigned(position, "position")?,
            rebuilds: unsigned(rebuilds, "rebuilds")?,
        },
    })
}

/// The bounds of the projection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProjectionOptions {
    pub(crate) batch_len_max: usize,
    pub(crate) retry_delay_ms: u64,
}

enum Command {
    Rebuild(oneshot::Sender<Result<(), db::Error>>),
}

/// The analytics service: its database and a way to talk to its projection. Cheap to
/// share.
pub(crate) struct AnalyticsService {
    db: Db,
    commands: mpsc::Sender<Command>,
    consumed: watch::Receiver<u64>,
}

/// The projection task, before it runs.
pub(crate) struct Projection {
    db: Db,
    log: Log,
    stream_prefix: String,
    options: ProjectionOptions,
    commands: mpsc::Receiver<Command>,
    consumed: watch::Sender<u64>,
}

/// Why a rebuild failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RebuildError {
    /// The projection is not running.
    #[error("the analytics projection is not running")]
    Stopped,
    /// Resetting the read model failed.
    #[error("resetting the read model failed")]
    Db(#[from] db::Error),
}

impl AnalyticsService {
    pub(crate) fn new(
        db: Db,
        log: Log,
        topic: &str,
        options: ProjectionOptions,
    ) -> (Arc<Self>, Projection) {
        let (commands_tx, commands_rx) = mpsc::channel(1);
        let (consumed_tx, consumed_rx) = watch::channel(0);
        (
            Arc::new(AnalyticsService {
                db: db.clone(),
                commands: commands_tx,
                consumed: consumed_rx,
            }),
            Projection {
                db,
                log,
                stream_prefix: format!("$topic:{topic}:"),
                options,
                commands: commands_rx,
                consumed: consumed_tx,
            },
        )
    }

    pub(crate) fn db(&self) -> &Db {
        &self.db
    }

    /// Empties the read model and replays the log from its start; returns once the reset
    /// is committed (the replay goes on in the background).
    pub(crate) async fn rebuild(&self) -> Result<(), RebuildError> {
        let (reply, done) = oneshot::channel();
        self.commands
            .send(Command::Rebuild(reply))
            .await
            .map_err(|_| RebuildError::Stopped)?;
        Ok(done.await.map_err(|_| RebuildError::Stopped)??)
    }

    /// The log position the projection has read up to (applied, or skipped as not of the
    /// topic): every event before it is accounted for.
    pub(crate) fn consumed(&self) -> watch::Receiver<u64> {
        self.consumed.clone()
    }
}

impl Projection {
    /// Follows the log until `shutdown` is cancelled.
    pub(crate) async fn run(mut self, shutdown: CancellationToken) {
        let retry_delay = Duration::from_millis(self.options.retry_delay_ms);
        let mut commands_open = true;
        'subscribe: loop {
            let from = match self.checkpoint().await {
                Ok(from) => from,
                Err(error) => {
                    tracing::warn!(error = %error, "reading the analytics checkpoint failed");
                    if self.pause(&shutdown, retry_delay).await {
                        return;
                    }
                    continue;
                }
            };
            self.consumed.send_replace(from);
            let subscription = match self.log.subscribe_all(Position(from)).await {
                Ok(subscription) => subscription,
                Err(error) => {
                    tracing::warn!(error = %error, "subscribing to the log failed");
                    if self.pause(&shutdown, retry_delay).await {
                        return;
                    }
                    continue;
                }
            };
            let mut batches = subscription.ready_chunks(self.options.batch_len_max.max(1));
            loop {
                tokio::select! {
                    biased;
                    () = shutdown.cancelled() => return,
                    command = self.commands.recv(), if commands_open => match command {
                        Some(Command::Rebuild(reply)) => {
                            let reset = reset(&self.db).await;
                            let ok = reset.is_ok();
                            let _ = reply.send(reset);
                            if ok {
                                tracing::info!("analytics read model reset; replaying the log");
                                continue 'subscribe;
                            }
                        }
                        // Every sender is gone: nobody can ask for a rebuild any more.
                        None => commands_open = false,
                    },
                    batch = batches.next() => {
                        let Some(batch) = batch else {
                            tracing::warn!("the log subscription ended; resubscribing");
                            if self.pause(&shutdown, retry_delay).await {
                                return;
                            }
                            continue 'subscribe;
                        };
                        if let Err(error) = self.apply(batch).await {
                            tracing::warn!(error = %error, "projecting events failed; resuming from the checkpoint");
                            if self.pause(&shutdown, retry_delay).await {
                                return;
                            }
                            continue 'subscribe;
                        }
                    }
                }
            }
        }
    }

    /// Waits `delay`; `true` if `shutdown` came first.
    async fn pause(&self, shutdown: &CancellationToken, delay: Duration) -> bool {
        tokio::select! {
            () = shutdown.cancelled() => true,
            () = tokio::time::sleep(delay) => false,
        }
    }

    async fn checkpoint(&self) -> Result<u64, db::Error> {
        let position: i64 =
            sqlx::query_scalar("SELECT position FROM analytics_checkpoint WHERE id = 1")
                .fetch_one(self.db.pool())
                .await?;
        unsigned(position, "position")
    }

    /// Applies the events of the topic in `batch` and moves the checkpoint past the batch,
    /// in one transaction (none when the batch holds none of the topic's events).
    async fn apply(
        &self,
        batch: Vec<Result<RecordedEvent, herald_core::store::Error>>,
    ) -> Result<(), ApplyError> {
        let mut next = None;
        let mut payloads = Vec::new();
        let mut failure = None;
        for recorded in batch {
            let recorded = match recorded {
                Ok(recorded) => recorded,
                Err(error) => {
                    failure = Some(error);
                    break;
                }
            };
            next = Some(recorded.position.0 + 1);
            if !recorded.stream.as_str().starts_with(&self.stream_prefix) {
                continue;
            }
            match Payload::of(&recorded.event) {
                Ok(Some(payload)) => payloads.push((recorded.event.ty.clone(), payload)),
                Ok(None) => {}
                Err(error) => tracing::warn!(
                    event_id = %recorded.event.id, ty = %recorded.event.ty, error = %error,
                    "an event's data does not match its type; not counted"
                ),
            }
        }
        if let Some(next) = next {
            if !payloads.is_empty() {
                let position = signed(next, "position")?;
                self.db
                    .write(move |tx| {
                        for (ty, payload) in &payloads {
                            project(tx, ty, payload)?;
                        }
                        tx.prepare_cached(
                            "UPDATE analytics_checkpoint SET position = ?1, updated_at = ?2
                             WHERE id = 1",
                        )?
                        .execute(params![position, now_ms()])?;
                        Ok(())
                    })
                    .await?;
            }
            self.consumed.send_replace(next);
        }
        match failure {
            Some(error) => Err(ApplyError::Log(error)),
            None => Ok(()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum ApplyError {
    #[error("reading the log failed")]
    Log(#[source] herald_core::store::Error),
    #[error("writing the read model failed")]
    Db(#[from] db::Error),
}

/// Empties the read model and moves the checkpoint to the start of the log.
async fn reset(db: &Db) -> Result<(), db::Error> {
    db.write(|tx| {
        tx.execute_batch("DELETE FROM analytics_counters; DELETE FROM analytics_products;")?;
        tx.execute(
            "UPDATE analytics_checkpoint SET position = 0, rebuilds = rebuilds + 1,
                                             updated_at = ?1
             WHERE id = 1",
            [now_ms()],
        )?;
        Ok(())
    })
    .await
}

fn add(tx: &Tx<'_>, name: &str, value: u64) -> Result<(), db::Error> {
    tx.prepare_cached(
        "INSERT INTO analytics_counters (name, value) VALUES (?1, ?2)
         ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
    )?
    .execute(params![name, signed(value, "counter")?])?;
    Ok(())
}

fn project(tx: &Tx<'_>, ty: &str, payload: &Payload) -> Result<(), db::Error> {
    add(tx, &format!("events:{ty}"), 1)?;
    match payload {
        Payload::OrderPlaced(placed) => {
            add(tx, "orders_placed", 1)?;
            add(tx, "placed_cents", placed.total_cents)?;
        }
        Payload::PaymentProcessed(paid) => {
            add(tx, "payments_charged", 1)?;
            add(tx, "charged_cents", paid.amount_cents)?;
        }
        Payload::PaymentFailed(failed) => {
            add(tx, "payments_declined", 1)?;
            add(tx, &declined(failed.reason), 1)?;
        }
        Payload::PaymentRefunded(refunded) => {
            add(tx, "payments_refunded", 1)?;
            add(tx, "refunded_cents", refunded.amount_cents)?;
        }
        Payload::OrderCompleted(completed) => {
            add(tx, "orders_completed", 1)?;
            add(tx, "revenue_cents", completed.total_cents)?;
            let mut sold = tx.prepare_cached(
                "INSERT INTO analytics_products (product_id, units_sold, revenue_cents)
                 VALUES (?1, ?2, ?3)
                 ON CONFLICT (product_id) DO UPDATE SET
                     units_sold = units_sold + excluded.units_sold,
                     revenue_cents = revenue_cents + excluded.revenue_cents",
            )?;
            for line in &completed.items {
                let units = i64::from(line.quantity);
                let revenue = signed(u64::from(line.quantity) * line.unit_price_cents, "revenue")?;
                sold.execute(params![line.product_id, units, revenue])?;
            }
        }
        Payload::OrderCancelled(cancelled) => {
            add(tx, "orders_cancelled", 1)?;
            add(tx, &cancel(cancelled.reason), 1)?;
        }
        Payload::InventoryReserved(_)
        | Payload::InventoryFailed(_)
        | Payload::ShippingScheduled(_) => {}
    }
    Ok(())
}

fn declined(reason: DeclineReason) -> String {
    format!("payments_declined:{}", reason.as_str())
}

fn cancel(reason: CancelReason) -> String {
    format!("orders_cancelled:{}", reason.as_str())
}
