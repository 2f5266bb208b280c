//! The payment service: charges placed orders through a simulated gateway and refunds the
//! orders the inventory could not fill.
//!
//! - `OrderPlaced` → the [`Gateway`] decides, then one transaction records the payment
//!   (charged or declined) and emits `PaymentProcessed` or `PaymentFailed`. A payment is
//!   keyed by its order (primary key), on top of the inbox: an order is never charged twice,
//!   even if its `OrderPlaced` came twice under different ids.
//! - `InventoryFailed` → one transaction records the refund (keyed by order: never twice)
//!   and emits `PaymentRefunded`.
//!
//! The gateway's transient errors fail the handler as transient, so the runtime's retry
//! layer calls it again; when retries run out the event is dead-lettered, and the order
//! stays pending until the dead letter is replayed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use herald_core::broker::GroupName;
use herald_runtime::{HandlerContext, HandlerError, Router};
use herald_sql::Outbox;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use rusqlite::{OptionalExtension as _, params};
use serde::Serialize;

use crate::catalog;
use crate::db::{self, Db, Migrations, now_ms};
use crate::events::{
    DeclineReason, InventoryFailed, ItemQuantity, OrderPlaced, PaymentFailed, PaymentProcessed,
    PaymentRefunded, Service,
};
use crate::services::{emit, first_delivery, handler_error, signed, unsigned};

pub(crate) const MIGRATIONS: Migrations = &[(
    1,
    "payments",
    "CREATE TABLE customers (
        customer_id        TEXT PRIMARY KEY,
        credit_limit_cents INTEGER NOT NULL CHECK (credit_limit_cents >= 0)
    );
    CREATE TABLE payments (
        order_id       TEXT PRIMARY KEY,
        payment_id     TEXT NOT NULL UNIQUE,
        customer_id    TEXT NOT NULL,
        amount_cents   INTEGER NOT NULL CHECK (amount_cents >= 0),
        status         TEXT NOT NULL CHECK (status IN ('charged', 'declined')),
        decline_reason TEXT,
        created_at     INTEGER NOT NULL
    );
    CREATE TABLE refunds (
        order_id     TEXT PRIMARY KEY REFERENCES payments (order_id),
        refund_id    TEXT NOT NULL UNIQUE,
        amount_cents INTEGER NOT NULL CHECK (amount_cents >= 0),
        detail       TEXT NOT NULL,
        created_at   INTEGER NOT NULL
    );",
)];

/// Seeds the customers' credit limits (once: existing rows are kept).
pub(crate) async fn seed(db: &Db) -> Result<(), db::Error> {
    db.write(|tx| {
        let mut insert = tx.prepare_cached(
            "INSERT INTO customers (customer_id, credit_limit_cents) VALUES (?1, ?2)
             ON CONFLICT (customer_id) DO NOTHING",
        )?;
        for customer in catalog::CUSTOMERS {
            insert.execute(params![
                customer.id,
                signed(customer.credit_limit_cents, "credit limit")?
            ])?;
        }
        Ok(())
    })
    .await
}

/// What the payment service holds about an order, as `GET /api/orders/{id}` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentSummary {
    /// `charged`, `declined`, or `None` before the payment service handled the order.
    pub status: Option<String>,
    /// Why it was declined.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decline_reason: Option<String>,
    /// The amount charged, in cents.
    pub charged_cents: u64,
    /// The amount refunded, in cents.
    pub refunded_cents: u64,
}

/// The payment and refund of `order_id`.
pub(crate) fn summary(db: &Db, order_id: &str) -> Result<PaymentSummary, db::Error> {
    let (payment, refunded) = db.read(|tx| {
        let payment: Option<(String, Option<String>, i64)> = tx
            .prepare_cached(
                "SELECT status, decline_reason, amount_cents FROM payments WHERE order_id = ?1",
            )?
            .query_row([order_id], |row| row.try_into())
            .optional()?;
        let refunded: Option<i64> = tx
            .prepare_cached("SELECT amount_cents FROM refunds WHERE order_id = ?1")?
            .query_row([order_id], |row| row.get(0))
            .optional()?;
        Ok((payment, refunded))
    })?;
    let charged_cents = match &payment {
        Some((status, _, amount)) if status == "charged" => unsigned(*amount, "amount")?,
        _ => 0,
    };
    let (status, decline_reason) = match payment {
        Some((status, reason, _)) => (Some(status), reason),
        None => (None, None),
    };
    Ok(PaymentSummary {
        status,
        decline_reason,
        charged_cents,
        refunded_cents: refunded.map_or(Ok(0), |amount| unsigned(amount, "refund"))?,
    })
}

/// A rate that is not a probability.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
#[error("a rate must be between 0 and 1, not {0}")]
pub struct InvalidRate(pub f64);

/// The simulated payment gateway, with deterministic rules and two switches for demos and
/// tests. Its rules, in order:
///
/// 1. With probability `transient_error_rate` (drawn from a generator seeded at build), the
///    call fails with a transient error ("gateway unavailable").
/// 2. Payment method `card_declined` is declined.
/// 3. An amount above the customer's credit limit is declined.
/// 4. With probability `fail_payment_rate` the charge is declined; the draw is a hash of the
///    seed and the order id, so an order is declined or not the same way every time.
/// 5. Otherwise it is approved.
///
/// The switches can be changed while the system runs.
#[derive(Debug)]
pub struct Gateway {
    seed: u64,
    fail_payment_rate: AtomicU64,
    transient_error_rate: AtomicU64,
    // Locked only to draw one number.
    rng: Mutex<StdRng>,
    transient_errors: AtomicU64,
    calls: AtomicU64,
}

/// The gateway is unavailable for now; try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the payment gateway is unavailable (simulated transient error)")]
pub struct Unavailable;

/// What the gateway decided.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Decision {
    Approved,
    Declined(DeclineReason, String),
}

impl Gateway {
    pub(crate) fn new(
        seed: u64,
        fail_payment_rate: f64,
        transient_error_rate: f64,
    ) -> Result<Self, InvalidRate> {
        let gateway = Gateway {
            seed,
            fail_payment_rate: AtomicU64::new(0),
            transient_error_rate: AtomicU64::new(0),
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            transient_errors: AtomicU64::new(0),
            calls: AtomicU64::new(0),
        };
        gateway.set_fail_payment_rate(fail_payment_rate)?;
        gateway.set_transient_error_rate(transient_error_rate)?;
        Ok(gateway)
    }

    /// Sets the share of charges declined at random (rule 4).
    pub fn set_fail_payment_rate(&self, rate: f64) -> Result<(), InvalidRate> {
        self.fail_payment_rate
            .store(check_rate(rate)?.to_bits(), Ordering::Relaxed);
        Ok(())
    }

    /// Sets the share of calls that fail with a transient error (rule 1).
    pub fn set_transient_error_rate(&self, rate: f64) -> Result<(), InvalidRate> {
        self.transient_error_rate
            .store(check_rate(rate)?.to_bits(), Ordering::Relaxed);
        Ok(())
    }

    /// The share of charges declined at random.
    pub fn fail_payment_rate(&self) -> f64 {
        f64::from_bits(self.fail_payment_rate.load(Ordering::Relaxed))
    }

    /// The share of calls that fail with a transient error.
    pub fn transient_error_rate(&self) -> f64 {
        f64::from_bits(self.transient_error_rate.load(Ordering::Relaxed))
    }

    /// How many calls failed with a transient error so far.
    pub fn transient_errors(&self) -> u64 {
        self.transient_errors.load(Ordering::Relaxed)
    }

    /// How many calls were made so far.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    fn authorize(&self, order: &OrderPlaced, limit_cents: u64) -> Result<Decision, Unavailable> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let transient_rate = self.transient_error_rate();
        if transient_rate > 0.0 {
            let draw: f64 = self.rng.lock().expect("not poisoned").r#gen();
            if draw < transient_rate {
                self.transient_errors.fetch_add(1, Ordering::Relaxed);
                return Err(Unavailable);
            }
        }
        if order.payment_method == "card_declined" {
            return Ok(Decision::Declined(
                DeclineReason::CardDeclined,
                "the card was declined".to_owned(),
            ));
        }
        if order.total_cents > limit_cents {
            return Ok(Decision::Declined(
                DeclineReason::OverLimit,
                format!(
                    "the amount of {} cents is above the customer's limit of {limit_cents} cents",
                    order.total_cents
                ),
            ));
        }
        if unit_hash(self.seed, &order.order_id) < self.fail_payment_rate() {
            return Ok(Decision::Declined(
                DeclineReason::GatewayDeclined,
                "the gateway declined the charge".to_owned(),
            ));
        }
        Ok(Decision::Approved)
    }
}

fn check_rate(rate: f64) -> Result<f64, InvalidRate> {
    if (0.0..=1.0).contains(&rate) {
        Ok(rate)
    } else {
        Err(InvalidRate(rate))
    }
}

/// A number in `[0, 1)` that depends only on `seed` and `key` (FNV-1a, then the SplitMix64
/// finaliser to spread the bits).
fn unit_hash(seed: u64, key: &str) -> f64 {
    let mut hash = 0xcbf2_9ce4_8422_2325_u64 ^ seed;
    for byte in key.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash = (hash ^ (hash >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash = (hash ^ (hash >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^= hash >> 31;
    (hash >> 11) as f64 / (1_u64 << 53) as f64
}

/// The payment service.
pub(crate) struct PaymentService {
    db: Db,
    outbox: Outbox,
    group: GroupName,
    gateway: Arc<Gateway>,
}

impl PaymentService {
    pub(crate) fn new(
        db: Db,
        outbox: Outbox,
        group: GroupName,
        gateway: Arc<Gateway>,
    ) -> Arc<Self> {
        Arc::new(PaymentService {
            db,
            outbox,
            group,
            gateway,
        })
    }

    pub(crate) fn db(&self) -> &Db {
        &self.db
    }

    /// The router of the service's consumer group.
    pub(crate) fn router(self: &Arc<Self>) -> Router {
        let on_placed = Arc::clone(self);
        let on_short = Arc::clone(self);
        Router::new()
            .on::<OrderPlaced, _>(
                "OrderPlaced",
                move |data: OrderPlaced, ctx: HandlerContext| {
                    let service = Arc::clone(&on_placed);
                    async move { service.charge(data, ctx).await }
                },
            )
            .on::<InventoryFailed, _>(
                "InventoryFailed",
                move |data: InventoryFailed, ctx: HandlerContext| {
                    let service = Arc::clone(&on_short);
                    async move { service.refund(data, ctx).await }
                },
            )
    }

    async fn charge(&self, order: OrderPlaced, ctx: HandlerContext) -> Result<(), HandlerError> {
        // A redelivery of a charged order must not reach the gateway again; an unknown
        // customer has no credit line.
        let (recorded, limit) = self
            .db
            .read(|tx| {
                let read: (Option<i64>, Option<i64>) = tx
                    .prepare_cached(
                        "SELECT (SELECT 1 FROM payments WHERE order_id = ?1),
                                (SELECT credit_limit_cents FROM customers WHERE customer_id = ?2)",
                    )?
                    .query_row(params![order.order_id, order.customer_id], |row| {
                        row.try_into()
                    })?;
                Ok(read)
            })
            .map_err(handler_error)?;
        if recorded.is_some() {
            return Ok(());
        }
        let limit = limit
            .map_or(Ok(0), |limit| unsigned(limit, "credit limit"))
            .map_err(handler_error)?;
        let decision = self
            .gateway
            .authorize(&order, limit)
            .map_err(HandlerError::transient)?;

        let cause = ctx.event().clone();
        let group = self.group.clone();
        let outbox = self.outbox.clone();
        self.db
            .write(move |tx| {
                if !first_delivery(tx, &group, &cause)? {
                    return Ok(());
                }
                let payment_id = format!("pay_{}", uuid::Uuid::now_v7().simple());
                let (status, reason) = match &decision {
                    Decision::Approved => ("charged", None),
                    Decision::Declined(reason, _) => ("declined", Some(reason.as_str())),
                };
                let recorded =
                    tx.prepare_cached(
                        "INSERT INTO payments (order_id, payment_id, customer_id, amount_cents,
                                               status, decline_reason, created_at)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                         ON CONFLICT (order_id) DO NOTHING",
                    )?
                    .execute(params![
                        order.order_id,
                        payment_id,
                        order.customer_id,
                        signed(order.total_cents, "amount")?,
                        status,
                        reason,
                        now_ms(),
                    ])? == 1;
                if !recorded {
                    tracing::warn!(order_id = %order.order_id, event_id = %cause.id,
                        "the order already has a payment; not charged again");
                    return Ok(());
                }
                match decision {
                    Decision::Approved => {
                        let processed = PaymentProcessed {
                            order_id: order.order_id.clone(),
                            customer_id: order.customer_id.clone(),
                            charge_id: payment_id,
                            amount_cents: order.total_cents,
                            items: order.items.iter().map(ItemQuantity::from).collect(),
                        };
                        emit(tx, &outbox, Service::Payment, &processed, &cause)
                    }
                    Decision::Declined(reason, detail) => {
                        let failed = PaymentFailed {
                            order_id: order.order_id.clone(),
                            customer_id: order.customer_id.clone(),
                            amount_cents: order.total_cents,
                            reason,
                            detail,
                        };
                        emit(tx, &outbox, Service::Payment, &failed, &cause)
                    }
                }
            })
            .await
            .map_err(handler_error)
    }

    async fn refund(
        &self,
        short: InventoryFailed,
        ctx: HandlerContext,
    ) -> Result<(), HandlerError> {
        let cause = ctx.event().clone();
        let group = self.group.clone();
        let outbox = self.outbox.clone();
        self.db
            .write(move |tx| {
                if !first_delivery(tx, &group, &cause)? {
                    return Ok(());
                }
                let charge: Option<(String, String, i64)> = tx
                    .prepare_cached(
                        "SELECT payment_id, customer_id, amount_cents FROM payments
                         WHERE order_id = ?1 AND status = 'charged'",
                    )?
                    .query_row([&short.order_id], |row| row.try_into())
                    .optional()?;
                let Some((payment_id, customer_id, amount_cents)) = charge else {
                    return Err(db::Error::Inconsistent(format!(
                        "order {} has no charge to refund",
                        short.order_id
                    )));
                };
                let detail = shortage_detail(&short);
                let refunded = tx
                    .prepare_cached(
                        "INSERT INTO refunds (order_id, refund_id, amount_cents, detail, created_at)
                         VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (order_id) DO NOTHING",
                    )?
                    .execute(params![
                        short.order_id,
                        format!("ref_{}", uuid::Uuid::now_v7().simple()),
                        amount_cents,
                        detail,
                        now_ms(),
                    ])?
                    == 1;
                if !refunded {
                    tracing::warn!(order_id = %short.order_id, "the order was refunded already");
                    return Ok(());
                }
                let payload = PaymentRefunded {
                    order_id: short.order_id.clone(),
                    customer_id,
                    charge_id: payment_id,
                    amount_cents: unsigned(amount_cents, "amount")?,
                    detail,
                };
                emit(tx, &outbox, Service::Payment, &payload, &cause)
            })
            .await
            .map_err(handler_error)
    }
}

/// "out of stock: prod-gpu (3 requested, 1 available)", for every shortage.
fn shortage_detail(short: &InventoryFailed) -> String {
    let parts: Vec<String> = short
        .shortages
        .iter()
        .map(|shortage| {
            format!(
                "{} ({} requested, {} available)",
                shortage.product_id, shortage.requested, shortage.available
            )
        })
        .collect();
    format!("out of stock: {}", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(id: &str, method: &str, total_cents: u64) -> OrderPlaced {
        OrderPlaced {
            order_id: id.to_owned(),
            customer_id: "cust-alice".to_owned(),
            items: Vec::new(),
            total_cents,
            shipping_address: "1 Main St".to_owned(),
            payment_method: method.to_owned(),
        }
    }

    #[test]
    fn the_rules_decide_in_order() {
        let gateway = Gateway::new(7, 0.0, 0.0).unwrap();
        assert_eq!(
            gateway.authorize(&order("o-1", "card", 100), 1_000),
            Ok(Decision::Approved)
        );
        assert!(matches!(
            gateway.authorize(&order("o-1", "card_declined", 100), 1_000),
            Ok(Decision::Declined(DeclineReason::CardDeclined, _))
        ));
        assert!(matches!(
            gateway.authorize(&order("o-1", "card", 1_001), 1_000),
            Ok(Decision::Declined(DeclineReason::OverLimit, _))
        ));
        gateway.set_transient_error_rate(1.0).unwrap();
        assert_eq!(
            gateway.authorize(&order("o-1", "card", 100), 1_000),
            Err(Unavailable)
        );
        assert_eq!(gateway.transient_errors(), 1);
        assert_eq!(gateway.calls(), 4);
        assert_eq!(gateway.set_transient_error_rate(1.5), Err(InvalidRate(1.5)));
        assert!(Gateway::new(7, -0.1, 0.0).is_err());
    }

    #[test]
    fn random_declines_are_a_function_of_seed_and_order() {
        let gateway = Gateway::new(7, 0.3, 0.0).unwrap();
        let declined = |gateway: &Gateway, id: &str| {
            matches!(
                gateway.authorize(&order(id, "card", 1), 10),
                Ok(Decision::Declined(DeclineReason::GatewayDeclined, _))
            )
        };
        let first: Vec<bool> = (0..1_000)
            .map(|n| declined(&gateway, &format!("o-{n}")))
            .collect();
        let again: Vec<bool> = (0..1_000)
            .map(|n| declined(&gateway, &format!("o-{n}")))
            .collect();
        assert_eq!(first, again, "the same orders, the same answers");
        let share = first.iter().filter(|declined| **declined).count();
        assert!((200..400).contains(&share), "about 30% declined: {share}");
        let other = Gateway::new(8, 0.3, 0.0).unwrap();
        let other: Vec<bool> = (0..1_000)
            .map(|n| declined(&other, &format!("o-{n}")))
            .collect();
        assert_ne!(first, other, "another seed, other answers");
    }
}
