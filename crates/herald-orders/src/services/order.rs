//! The order service: takes orders (the HTTP API calls [`OrderService::place`]) and settles
//! them when the flow ends.
//!
//! - **Place.** One transaction: the idempotency key (if any), the order row and its lines,
//!   and `OrderPlaced` in the outbox. The order's correlation id is made here, once.
//! - **Settle.** `ShippingScheduled` → completed, `OrderCompleted`; `PaymentFailed` →
//!   cancelled (payment declined), `OrderCancelled`; `PaymentRefunded` → cancelled (out of
//!   stock), `OrderCancelled`. Only a pending order is settled: a settled order ignores
//!   later settling events, so it is settled once.
//! - **Wait.** [`OrderService::wait_settled`] answers when an order is settled, woken by the
//!   handler that settled it (no polling), or at its timeout.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use herald_core::Event;
use herald_core::broker::GroupName;
use herald_runtime::{HandlerContext, HandlerError, Router};
use herald_sql::Outbox;
use rusqlite::{OptionalExtension as _, params};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::catalog;
use crate::db::{self, Db, Migrations, Tx, now_ms, rfc3339};
use crate::events::{
    CancelReason, OrderCancelled, OrderCompleted, OrderLine, OrderPlaced, PaymentFailed,
    PaymentRefunded, Service, ShippingScheduled, first_event,
};
use crate::services::{emit, enqueue, first_delivery, handler_error, signed, unsigned};

/// The most lines one order may have.
pub const ORDER_LINES_MAX: usize = 50;
/// The most units of one product one order may ask for.
pub const QUANTITY_MAX: i64 = 1_000;
/// The longest shipping address, in characters.
pub const ADDRESS_LEN_MAX: usize = 500;
/// The longest `Idempotency-Key`, in bytes.
pub const IDEMPOTENCY_KEY_LEN_MAX: usize = 255;
/// The payment methods an order may name. `card_declined` is the test method the payment
/// gateway always declines.
pub const PAYMENT_METHODS: &[&str] = &["card", "paypal", "card_declined"];

pub(crate) const MIGRATIONS: Migrations = &[(
    1,
    "orders",
    "CREATE TABLE orders (
        order_id         TEXT PRIMARY KEY,
        correlation_id   TEXT NOT NULL,
        customer_id      TEXT NOT NULL,
        status           TEXT NOT NULL CHECK (status IN ('pending', 'completed', 'cancelled')),
        total_cents      INTEGER NOT NULL CHECK (total_cents >= 0),
        payment_method   TEXT NOT NULL,
        shipping_address TEXT NOT NULL,
        cancel_reason    TEXT,
        cancel_detail    TEXT,
        tracking_number  TEXT,
        placed_event_id  TEXT NOT NULL,
        created_at       INTEGER NOT NULL,
        updated_at       INTEGER NOT NULL
    );
    CREATE INDEX orders_by_status ON orders (status, order_id);
    CREATE TABLE order_lines (
        order_id         TEXT NOT NULL REFERENCES orders (order_id),
        line             INTEGER NOT NULL,
        product_id       TEXT NOT NULL,
        quantity         INTEGER NOT NULL CHECK (quantity > 0),
        unit_price_cents INTEGER NOT NULL CHECK (unit_price_cents >= 0),
        PRIMARY KEY (order_id, line)
    );
    CREATE TABLE idempotency_keys (
        idempotency_key TEXT PRIMARY KEY,
        request         TEXT NOT NULL,
        order_id        TEXT NOT NULL REFERENCES orders (order_id),
        created_at      INTEGER NOT NULL
    );",
)];

/// Where an order is in its flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    /// Placed; payment, inventory and shipping are under way.
    Pending,
    /// Charged, reserved and shipped.
    Completed,
    /// Declined, or refunded after a shortage.
    Cancelled,
}

impl OrderStatus {
    /// The status as a snake_case word.
    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Pending => "pending",
            OrderStatus::Completed => "completed",
            OrderStatus::Cancelled => "cancelled",
        }
    }

    /// The status named by [`as_str`](Self::as_str).
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "pending" => Some(OrderStatus::Pending),
            "completed" => Some(OrderStatus::Completed),
            "cancelled" => Some(OrderStatus::Cancelled),
            _ => None,
        }
    }

    /// Whether the flow has ended.
    pub fn is_settled(self) -> bool {
        self != OrderStatus::Pending
    }
}

/// `POST /api/orders` as sent: every member optional, so that a missing one is reported
/// with the others rather than as a parse error.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OrderRequest {
    /// Who orders.
    pub customer_id: Option<String>,
    /// What.
    pub items: Option<Vec<ItemRequest>>,
    /// Where to ship.
    pub shipping_address: Option<String>,
    /// How to pay.
    pub payment_method: Option<String>,
}

/// One line of an [`OrderRequest`].
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ItemRequest {
    /// The product.
    pub product_id: Option<String>,
    /// How many.
    pub quantity: Option<i64>,
}

/// A member of a request that is not acceptable, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InvalidField {
    /// A JSON pointer to the member, e.g. `/items/0/quantity`.
    pub pointer: String,
    /// Why it is refused.
    pub reason: String,
}

/// An order that passed validation, priced from the catalog.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct NewOrder {
    customer_id: String,
    items: Vec<OrderLine>,
    total_cents: u64,
    shipping_address: String,
    payment_method: String,
}

impl OrderRequest {
    /// Checks every member and prices the lines; every fault is reported, not the first.
    pub(crate) fn validate(self) -> Result<NewOrder, Vec<InvalidField>> {
        let mut faults = Vec::new();
        let mut fault = |pointer: String, reason: &str| {
            faults.push(InvalidField {
                pointer,
                reason: reason.to_owned(),
            })
        };
        match self.customer_id.as_deref() {
            None => fault("/customerId".to_owned(), "is required"),
            Some(id) if catalog::customer(id).is_none() => {
                fault("/customerId".to_owned(), "is not a known customer")
            }
            Some(_) => {}
        }
        let mut lines = Vec::new();
        match &self.items {
            None => fault("/items".to_owned(), "is required"),
            Some(items) if items.is_empty() => fault("/items".to_owned(), "must not be empty"),
            Some(items) if items.len() > ORDER_LINES_MAX => fault(
                "/items".to_owned(),
                &format!("must have at most {ORDER_LINES_MAX} lines"),
            ),
            Some(items) => {
                for (index, item) in items.iter().enumerate() {
                    let product = match item.product_id.as_deref() {
                        None => {
                            fault(format!("/items/{index}/productId"), "is required");
                            None
                        }
                        Some(id) => match catalog::product(id) {
                            None => {
                                fault(
                                    format!("/items/{index}/productId"),
                                    "is not a known product",
                                );
                                None
                            }
                            Some(product) => {
                                if items[..index]
                                    .iter()
                                    .any(|earlier| earlier.product_id.as_deref() == Some(id))
                                {
                                    fault(
                                        format!("/items/{index}/productId"),
                                        "appears on an earlier line; order it once with the total quantity",
                                    );
                                }
                                Some(product)
                            }
                        },
                    };
                    let quantity = match item.quantity {
                        None => {
                            fault(format!("/items/{index}/quantity"), "is required");
                            None
                        }
                        Some(quantity) if !(1..=QUANTITY_MAX).contains(&quantity) => {
                            fault(
                                format!("/items/{index}/quantity"),
                                &format!("must be between 1 and {QUANTITY_MAX}"),
                            );
                            None
                        }
                        Some(quantity) => u32::try_from(quantity).ok(),
                    };
                    if let (Some(product), Some(quantity)) = (product, quantity) {
                        lines.push(OrderLine {
                            product_id: product.id.to_owned(),
                            quantity,
                            unit_price_cents: product.price_cents,
                        });
                    }
                }
            }
        }
        match self.shipping_address.as_deref() {
            None => fault("/shippingAddress".to_owned(), "is required"),
            Some(address) if address.trim().is_empty() => {
                fault("/shippingAddress".to_owned(), "must not be blank")
            }
            Some(address) if address.chars().count() > ADDRESS_LEN_MAX => fault(
                "/shippingAddress".to_owned(),
                &format!("must be at most {ADDRESS_LEN_MAX} characters"),
            ),
            Some(address) if address.chars().any(|c| c.is_control() && c != '\n') => fault(
                "/shippingAddress".to_owned(),
                "must not contain control characters other than line breaks",
            ),
            Some(_) => {}
        }
        match self.payment_method.as_deref() {
            None => fault("/paymentMethod".to_owned(), "is required"),
            Some(method) if !PAYMENT_METHODS.contains(&method) => fault(
                "/paymentMethod".to_owned(),
                &format!("must be one of {}", PAYMENT_METHODS.join(", ")),
            ),
            Some(_) => {}
        }
        if !faults.is_empty() {
            return Err(faults);
        }
        let total_cents = lines
            .iter()
            .map(|line| u64::from(line.quantity) * line.unit_price_cents)
            .sum();
        Ok(NewOrder {
            customer_id: self.customer_id.unwrap_or_default(),
            items: lines,
            total_cents,
            shipping_address: self.shipping_address.unwrap_or_default(),
            payment_method: self.payment_method.unwrap_or_default(),
        })
    }
}

/// An order as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderView {
    /// The order.
    pub order_id: String,
    /// The correlation id of every event of its flow.
    pub correlation_id: String,
    /// Who ordered.
    pub customer_id: String,
    /// Where it is.
    pub status: OrderStatus,
    /// What, priced.
    pub items: Vec<OrderLine>,
    /// The order's amount, in cents.
    pub total_cents: u64,
    /// How it is paid.
    pub payment_method: String,
    /// Where it ships.
    pub shipping_address: String,
    /// Why it was cancelled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cancel_reason: Option<CancelReason>,
    /// Why it was cancelled, in words.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cancel_detail: Option<String>,
    /// Its shipment's tracking number, once completed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tracking_number: Option<String>,
    /// The id of its `OrderPlaced` event.
    pub placed_event_id: String,
    /// When it was placed (RFC 3339).
    pub created_at: String,
    /// When it last changed (RFC 3339).
    pub updated_at: String,
}

/// What [`OrderService::place`] did.
#[derive(Debug)]
pub(crate) enum Placed {
    /// A new order.
    New(OrderView),
    /// The idempotency key was used before with the same request: its order.
    Replayed(OrderView),
    /// The idempotency key was used before with another request.
    KeyReused {
        /// The order of the first request.
        order_id: String,
    },
}

/// Why waiting for an order failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WaitError {
    /// [`WAITERS_MAX`] callers are waiting already.
    #[error("too many callers are waiting for orders")]
    TooManyWaiters,
    /// Reading the order failed.
    #[error("reading the order failed")]
    Db(#[from] db::Error),
}

/// The most callers waiting for orders to settle at once.
pub const WAITERS_MAX: usize = 100_000;

/// The order service.
pub(crate) struct OrderService {
    db: Db,
    outbox: Outbox,
    group: GroupName,
    waiters: Waiters,
    /// Once cancelled, waits for settlement end at once (the server is shutting down).
    waits_end: CancellationToken,
}

impl OrderService {
    pub(crate) fn new(
        db: Db,
        outbox: Outbox,
        group: GroupName,
        waits_end: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(OrderService {
            db,
            outbox,
            group,
            waiters: Waiters::default(),
            waits_end,
        })
    }

    pub(crate) fn db(&self) -> &Db {
        &self.db
    }

    /// The router of the service's consumer group.
    pub(crate) fn router(self: &Arc<Self>) -> Router {
        let on_shipped = Arc::clone(self);
        let on_declined = Arc::clone(self);
        let on_refunded = Arc::clone(self);
        Router::new()
            .on::<ShippingScheduled, _>(
                "ShippingScheduled",
                move |data: ShippingScheduled, ctx: HandlerContext| {
                    let service = Arc::clone(&on_shipped);
                    async move {
                        service
                            .settle(
                                ctx,
                                &data.order_id,
                                Settle::Completed(data.tracking_number.clone()),
                            )
                            .await
                    }
                },
            )
            .on::<PaymentFailed, _>(
                "PaymentFailed",
                move |data: PaymentFailed, ctx: HandlerContext| {
                    let service = Arc::clone(&on_declined);
                    async move {
                        let settle =
                            Settle::Cancelled(CancelReason::PaymentDeclined, data.detail.clone());
                        service.settle(ctx, &data.order_id, settle).await
                    }
                },
            )
            .on::<PaymentRefunded, _>(
                "PaymentRefunded",
                move |data: PaymentRefunded, ctx: HandlerContext| {
                    let service = Arc::clone(&on_refunded);
                    async move {
                        let settle =
                            Settle::Cancelled(CancelReason::OutOfStock, data.detail.clone());
                        service.settle(ctx, &data.order_id, settle).await
                    }
                },
            )
    }

    /// Stores `order` and its `OrderPlaced` event in one transaction, honouring
    /// `idempotency_key`.
    pub(crate) async fn place(
        &self,
        order: NewOrder,
        idempotency_key: Option<String>,
    ) -> Result<Placed, db::Error> {
        let outbox = self.outbox.clone();
        let request = serde_json::to_string(&order).expect("an order serialises");
        let placed = self
            .db
            .write(move |tx| {
                // The batch holds the write lock (BEGIN IMMEDIATE): no other request can
                // claim the key between this read and the insert below.
                if let Some(key) = &idempotency_key {
                    let first: Option<(String, String)> = tx
                        .prepare_cached(
                            "SELECT request, order_id FROM idempotency_keys
                             WHERE idempotency_key = ?1",
                        )?
                        .query_row([key], |row| row.try_into())
                        .optional()?;
                    if let Some((first_request, first_order)) = first {
                        if first_request != request {
                            return Ok(Err(first_order));
                        }
                        return Ok(Ok(Err(first_order)));
                    }
                }
                let order_id = uuid::Uuid::now_v7().to_string();
                let view = insert(tx, &outbox, &order_id, &order)?;
                if let Some(key) = &idempotency_key {
                    tx.prepare_cached(
                        "INSERT INTO idempotency_keys (idempotency_key, request, order_id,
                                                       created_at)
                         VALUES (?1, ?2, ?3, ?4)",
                    )?
                    .execute(params![key, request, order_id, now_ms()])?;
                }
                Ok(Ok(Ok(view)))
            })
            .await?;
        match placed {
            Err(order_id) => Ok(Placed::KeyReused { order_id }),
            Ok(Ok(view)) => Ok(Placed::New(view)),
            Ok(Err(order_id)) => {
                let view = self.get(&order_id)?.ok_or_else(|| {
                    db::Error::Inconsistent(format!("the key's order {order_id} is missing"))
                })?;
                Ok(Placed::Replayed(view))
            }
        }
    }

    /// Deletes the idempotency keys made before `before`, `len_max` at a time; how many.
    pub(crate) async fn prune_idempotency_keys(
        &self,
        before: chrono::DateTime<chrono::Utc>,
        len_max: u32,
    ) -> Result<u64, db::Error> {
        let before_ms = before.timestamp_millis();
        let mut pruned = 0;
        loop {
            let deleted = self
                .db
                .write(move |tx| {
                    // Rowids follow insertion: the oldest keys come first, found without an
                    // index by reading at most `len_max` rows from the start.
                    let deleted = tx
                        .prepare_cached(
                            "DELETE FROM idempotency_keys
                             WHERE rowid <= (SELECT max(rowid) FROM (
                                               SELECT rowid, created_at FROM idempotency_keys
                                               ORDER BY rowid LIMIT ?2)
                                             WHERE created_at < ?1)
                               AND created_at < ?1",
                        )?
                        .execute(params![before_ms, len_max])?;
                    Ok(deleted as u64)
                })
                .await?;
            pruned += deleted;
            if deleted < u64::from(len_max) {
                return Ok(pruned);
            }
        }
    }

    /// The order `order_id`.
    pub(crate) fn get(&self, order_id: &str) -> Result<Option<OrderView>, db::Error> {
        self.db.read(|tx| {
            let mut select = tx.prepare_cached(&format!("{ORDERS} WHERE order_id = ?1"))?;
            let mut rows = select.query([order_id])?;
            let Some(row) = rows.next()? else {
                return Ok(None);
            };
            let mut view = order_view(row)?;
            view.items = lines(tx, order_id)?;
            Ok(Some(view))
        })
    }

    /// The newest orders (by id, newest first), of `status` if given; at most `limit`.
    pub(crate) fn list(
        &self,
        status: Option<OrderStatus>,
        limit: u32,
    ) -> Result<Vec<OrderView>, db::Error> {
        self.db.read(|tx| {
            let mut select = tx.prepare_cached(&format!(
                "{ORDERS} WHERE ?1 IS NULL OR status = ?1 ORDER BY order_id DESC LIMIT ?2"
            ))?;
            let mut rows = select.query(params![status.map(OrderStatus::as_str), limit])?;
            let mut views = Vec::new();
            while let Some(row) = rows.next()? {
                let mut view = order_view(row)?;
                view.items = lines(tx, &view.order_id)?;
                views.push(view);
            }
            Ok(views)
        })
    }

    /// The order once it is settled, or as it is when `timeout` elapses; `None` if there is
    /// no such order. Woken by the handler that settles it.
    pub(crate) async fn wait_settled(
        &self,
        order_id: &str,
        timeout: Duration,
    ) -> Result<Option<OrderView>, WaitError> {
        // Registered before reading, so that a settlement between the read and the wait
        // still wakes this caller.
        let woken = self.waiters.register(order_id)?;
        let order = self.get(order_id);
        let order = match order {
            Ok(Some(order)) if !order.status.is_settled() => order,
            other => {
                drop(woken);
                self.waiters.forget(order_id);
                return Ok(other?);
            }
        };
        let settled = tokio::select! {
            woken = tokio::time::timeout(timeout, woken) => woken.is_ok(),
            () = self.waits_end.cancelled() => false,
        };
        if !settled {
            self.waiters.forget(order_id);
            return Ok(Some(order));
        }
        Ok(self.get(order_id)?)
    }

    async fn settle(
        &self,
        ctx: HandlerContext,
        order_id: &str,
        settle: Settle,
    ) -> Result<(), HandlerError> {
        let cause = ctx.event().clone();
        let group = self.group.clone();
        let outbox = self.outbox.clone();
        let id = order_id.to_owned();
        let settled = self
            .db
            .write(move |tx| {
                if !first_delivery(tx, &group, &cause)? {
                    return Ok(false);
                }
                settle_in(tx, &outbox, &cause, &id, settle)
            })
            .await
            .map_err(handler_error)?;
        if settled {
            self.waiters.notify(order_id);
        }
        Ok(())
    }
}

/// How an order's flow ended.
#[derive(Debug, Clone)]
enum Settle {
    Completed(String),
    Cancelled(CancelReason, String),
}

/// Inserts `order` and its `OrderPlaced` event; returns the order as stored.
fn insert(
    tx: &Tx<'_>,
    outbox: &Outbox,
    order_id: &str,
    order: &NewOrder,
) -> Result<OrderView, db::Error> {
    let correlation_id = uuid::Uuid::now_v7().to_string();
    let placed = OrderPlaced {
        order_id: order_id.to_owned(),
        customer_id: order.customer_id.clone(),
        items: order.items.clone(),
        total_cents: order.total_cents,
        shipping_address: order.shipping_address.clone(),
        payment_method: order.payment_method.clone(),
    };
    let event = first_event(Service::Order, &placed, &correlation_id);
    let now = now_ms();
    tx.prepare_cached(
        "INSERT INTO orders (order_id, correlation_id, customer_id, status, total_cents,
                             payment_method, shipping_address, placed_event_id, created_at,
                             updated_at)
         VALUES (?1, ?2, ?3, 'pending', ?4, ?5, ?6, ?7, ?8, ?8)",
    )?
    .execute(params![
        order_id,
        correlation_id,
        order.customer_id,
        signed(order.total_cents, "total")?,
        order.payment_method,
        order.shipping_address,
        event.id,
        now,
    ])?;
    let mut insert_line = tx.prepare_cached(
        "INSERT INTO order_lines (order_id, line, product_id, quantity, unit_price_cents)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    for (line, item) in order.items.iter().enumerate() {
        insert_line.execute(params![
            order_id,
            line as i64,
            item.product_id,
            i64::from(item.quantity),
            signed(item.unit_price_cents, "price")?,
        ])?;
    }
    enqueue(tx, outbox, &event)?;
    Ok(OrderView {
        order_id: order_id.to_owned(),
        correlation_id,
        customer_id: order.customer_id.clone(),
        status: OrderStatus::Pending,
        items: order.items.clone(),
        total_cents: order.total_cents,
        payment_method: order.payment_method.clone(),
        shipping_address: order.shipping_address.clone(),
        cancel_reason: None,
        cancel_detail: None,
        tracking_number: None,
        placed_event_id: event.id.clone(),
        created_at: rfc3339(now),
        updated_at: rfc3339(now),
    })
}

/// Settles the pending order `order_id` in `tx`; `false` when it is already settled.
fn settle_in(
    tx: &Tx<'_>,
    outbox: &Outbox,
    cause: &Event,
    order_id: &str,
    settle: Settle,
) -> Result<bool, db::Error> {
    let row: Option<(String, String, i64)> = tx
        .prepare_cached("SELECT status, customer_id, total_cents FROM orders WHERE order_id = ?1")?
        .query_row([order_id], |row| row.try_into())
        .optional()?;
    let Some((status, customer_id, total_cents)) = row else {
        return Err(db::Error::Inconsistent(format!(
            "event {} settles order {order_id}, which does not exist",
            cause.id
        )));
    };
    if status != OrderStatus::Pending.as_str() {
        tracing::warn!(order_id, status, event_id = %cause.id, ty = %cause.ty,
            "an event settles an order already settled; ignored");
        return Ok(false);
    }
    let total_cents = unsigned(total_cents, "total")?;
    match settle {
        Settle::Completed(tracking_number) => {
            tx.prepare_cached(
                "UPDATE orders SET status = 'completed', tracking_number = ?2, updated_at = ?3
                 WHERE order_id = ?1",
            )?
            .execute(params![order_id, tracking_number, now_ms()])?;
            let completed = OrderCompleted {
                order_id: order_id.to_owned(),
                customer_id,
                items: lines(tx, order_id)?,
                total_cents,
                tracking_number,
            };
            emit(tx, outbox, Service::Order, &completed, cause)?;
        }
        Settle::Cancelled(reason, detail) => {
            tx.prepare_cached(
                "UPDATE orders SET status = 'cancelled', cancel_reason = ?2, cancel_detail = ?3,
                                   updated_at = ?4
                 WHERE order_id = ?1",
            )?
            .execute(params![order_id, reason.as_str(), detail, now_ms()])?;
            let cancelled = OrderCancelled {
                order_id: order_id.to_owned(),
                customer_id,
                total_cents,
                reason,
                detail,
            };
            emit(tx, outbox, Service::Order, &cancelled, cause)?;
        }
    }
    Ok(true)
}

/// The lines of order `?1`, in order: product id, quantity, unit price.
const LINES: &str = "SELECT product_id, quantity, unit_price_cents FROM order_lines
                     WHERE order_id = ?1 ORDER BY line";

/// An order line as [`LINES`] reads it.
fn order_line(
    (product_id, quantity, unit_price_cents): (String, i64, i64),
) -> Result<OrderLine, db::Error> {
    Ok(OrderLine {
        product_id,
        quantity: u32::try_from(quantity)
            .map_err(|_| db::Error::Inconsistent(format!("quantity out of range: {quantity}")))?,
        unit_price_cents: unsigned(unit_price_cents, "price")?,
    })
}

/// The lines of order `order_id`, in order.
fn lines(tx: &Tx<'_>, order_id: &str) -> Result<Vec<OrderLine>, db::Error> {
    tx.prepare_cached(LINES)?
        .query_map([order_id], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        })?
        .map(|line| order_line(line?))
        .collect()
}

/// The columns of an order, as [`order_view`] reads them.
const ORDERS: &str = "SELECT order_id, correlation_id, customer_id, status, total_cents,
                             payment_method, shipping_address, cancel_reason, cancel_detail,
                             tracking_number, placed_event_id, created_at, updated_at
                      FROM orders";

/// The order of a row of [`ORDERS`], without its lines.
fn order_view(row: &rusqlite::Row<'_>) -> Result<OrderView, db::Error> {
    let status: String = row.get("status")?;
    let cancel_reason: Option<String> = row.get("cancel_reason")?;
    Ok(OrderView {
        order_id: row.get("order_id")?,
        correlation_id: row.get("correlation_id")?,
        customer_id: row.get("customer_id")?,
        status: OrderStatus::parse(&status)
            .ok_or_else(|| db::Error::Inconsistent(format!("unknown order status {status:?}")))?,
        items: Vec::new(),
        total_cents: unsigned(row.get("total_cents")?, "total")?,
        payment_method: row.get("payment_method")?,
        shipping_address: row.get("shipping_address")?,
        cancel_reason: cancel_reason
            .map(|reason| {
                CancelReason::parse(&reason).ok_or_else(|| {
                    db::Error::Inconsistent(format!("unknown cancel reason {reason:?}"))
                })
            })
            .transpose()?,
        cancel_detail: row.get("cancel_detail")?,
        tracking_number: row.get("tracking_number")?,
        placed_event_id: row.get("placed_event_id")?,
        created_at: rfc3339(row.get("created_at")?),
        updated_at: rfc3339(row.get("updated_at")?),
    })
}

/// The callers waiting for orders to settle, by order id.
#[derive(Default)]
struct Waiters {
    // Locked only to add or take senders, never across an await.
    inner: Mutex<WaitersInner>,
}

#[derive(Default)]
struct WaitersInner {
    by_order: HashMap<String, Vec<oneshot::Sender<()>>>,
    /// The senders in `by_order`.
    len: usize,
}

impl Waiters {
    fn register(&self, order_id: &str) -> Result<oneshot::Receiver<()>, WaitError> {
        let mut inner = self.inner.lock().expect("not poisoned");
        if inner.len >= WAITERS_MAX {
            return Err(WaitError::TooManyWaiters);
        }
        let (wake, woken) = oneshot::channel();
        inner
            .by_order
            .entry(order_id.to_owned())
            .or_default()
            .push(wake);
        inner.len += 1;
        Ok(woken)
    }

    fn notify(&self, order_id: &str) {
        let waiting = {
            let mut inner = self.inner.lock().expect("not poisoned");
            let waiting = inner.by_order.remove(order_id).unwrap_or_default();
            inner.len -= waiting.len();
            waiting
        };
        for wake in waiting {
            let _ = wake.send(());
        }
    }

    /// Drops the senders of callers that stopped waiting for `order_id` (their receivers
    /// are gone).
    fn forget(&self, order_id: &str) {
        let mut inner = self.inner.lock().expect("not poisoned");
        let Some(waiting) = inner.by_order.get_mut(order_id) else {
            return;
        };
        let before = waiting.len();
        waiting.retain(|wake| !wake.is_closed());
        let removed = before - waiting.len();
        if waiting.is_empty() {
            inner.by_order.remove(order_id);
        }
        inner.len -= removed;
    }
}
