//! The invariants of the order system, checked on the services' databases.
//!
//! [`check`] reads every service's database under `<data_dir>/services/` (the system may be
//! running or stopped) and reports each order and product that breaks one of these:
//!
//! - **Stock.** For every product, `available + reserved` is its initial stock, which is
//!   the catalog's, and `reserved` is the sum of its reservations.
//! - **Money.** For every settled order, charges − refunds is its amount if completed, else
//!   0; a completed order was charged its amount and not refunded, an order cancelled for a
//!   declined payment was not charged, one cancelled for a shortage was refunded in full.
//! - **Goods.** A completed order has exactly its lines reserved and one shipment; a
//!   cancelled one has neither.
//! - **E-mails.** Exactly one "received" e-mail per order, and exactly one confirmation
//!   (completed) or cancellation (cancelled) e-mail per settled order, none for a pending
//!   one.
//! - **Audit.** The trail of every order (its correlation id) is one unbroken causal
//!   chain: it starts at the order's `OrderPlaced`, each event was caused by the one before,
//!   and the types are exactly those of its outcome (for a pending order, the start of one
//!   of them):
//!   - completed: `OrderPlaced`, `PaymentProcessed`, `InventoryReserved`,
//!     `ShippingScheduled`, `OrderCompleted`;
//!   - payment declined: `OrderPlaced`, `PaymentFailed`, `OrderCancelled`;
//!   - out of stock: `OrderPlaced`, `PaymentProcessed`, `InventoryFailed`,
//!     `PaymentRefunded`, `OrderCancelled`.
//! - **References.** Every payment, reservation, shipment, e-mail and audited event is about
//!   an order the order service knows.
//! - **Analytics.** The read model's counts of placed, completed and cancelled orders and
//!   its revenue equal the order service's.
//!
//! A running system passes only when it is idle
//! ([`SystemHandle::wait_idle`](crate::SystemHandle::wait_idle)): events in flight make
//! the services momentarily disagree. The report also counts pending orders, which a caller
//! that expects every order settled (a crash test) checks itself.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use sqlx::sqlite::SqlitePoolOptions;
use sqlx::{Row as _, SqlitePool};

use crate::catalog;
use crate::db::{self, Durability, connect_options};
use crate::events::{CancelReason, Service};
use crate::services::order::OrderStatus;
use crate::services::{analytics, unsigned};
use crate::system::SERVICES_DIR;

/// The chain of event types of a completed order.
pub const COMPLETED_CHAIN: &[&str] = &[
    "OrderPlaced",
    "PaymentProcessed",
    "InventoryReserved",
    "ShippingScheduled",
    "OrderCompleted",
];
/// The chain of event types of an order cancelled for a declined payment.
pub const DECLINED_CHAIN: &[&str] = &["OrderPlaced", "PaymentFailed", "OrderCancelled"];
/// The chain of event types of an order cancelled for a shortage.
pub const OUT_OF_STOCK_CHAIN: &[&str] = &[
    "OrderPlaced",
    "PaymentProcessed",
    "InventoryFailed",
    "PaymentRefunded",
    "OrderCancelled",
];

/// What [`check`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct InvariantReport {
    /// Orders the order service holds.
    pub orders: u64,
    /// Of which pending.
    pub pending: u64,
    /// Of which completed.
    pub completed: u64,
    /// Of which cancelled.
    pub cancelled: u64,
    /// Every broken invariant.
    pub violations: Vec<Violation>,
}

impl InvariantReport {
    /// Whether every invariant holds.
    pub fn holds(&self) -> bool {
        self.violations.is_empty()
    }
}

impl fmt::Display for InvariantReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} orders ({} pending, {} completed, {} cancelled), {} violations",
            self.orders,
            self.pending,
            self.completed,
            self.cancelled,
            self.violations.len()
        )?;
        for violation in &self.violations {
            write!(f, "\n  {violation}")?;
        }
        Ok(())
    }
}

/// Which invariant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Invariant {
    /// Stock conservation.
    Stock,
    /// Charges and refunds.
    Money,
    /// Reservations and shipments.
    Goods,
    /// One e-mail per placed and settled order.
    Emails,
    /// The causal chain of each order.
    Audit,
    /// Rows about unknown orders.
    References,
    /// The read model against the orders.
    Analytics,
}

/// One broken invariant: which, about what, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The invariant.
    pub invariant: Invariant,
    /// What breaks it: an order id, a product id, a counter.
    pub subject: String,
    /// How.
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} {}: {}", self.invariant, self.subject, self.detail)
    }
}

/// Why the invariants could not be checked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckError {
    /// A service's database does not exist.
    #[error("the database of the {service} service is missing: {}", path.display())]
    Missing {
        /// The service.
        service: Service,
        /// Where it should be.
        path: PathBuf,
    },
    /// Reading a service's database failed.
    #[error("reading the database of the {service} service failed")]
    Db {
        /// The service.
        service: Service,
        /// The error.
        #[source]
        source: db::Error,
    },
}

/// Checks the invariants on the databases under `<data_dir>/services/`; see the
/// [module documentation](self).
pub async fn check(data_dir: &Path) -> Result<InvariantReport, CheckError> {
    let dir = data_dir.join(SERVICES_DIR);
    let mut pools = BTreeMap::new();
    for service in Service::ALL {
        let path = dir.join(format!("{service}.sqlite"));
        if !path.exists() {
            return Err(CheckError::Missing { service, path });
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(connect_options(&path, Durability::Fsync).create_if_missing(false))
            .await
            .map_err(|error| CheckError::Db {
                service,
                source: error.into(),
            })?;
        pools.insert(service, pool);
    }
    let state = State::read(&pools).await;
    for pool in pools.values() {
        pool.close().await;
    }
    Ok(state?.check())
}

/// An order as the order service holds it.
struct Order {
    correlation_id: String,
    status: OrderStatus,
    cancel_reason: Option<CancelReason>,
    total_cents: u64,
    placed_event_id: String,
    lines: BTreeMap<String, u64>,
}

/// An audited event.
struct Audited {
    event_id: String,
    ty: String,
    causation_id: Option<String>,
    subject: Option<String>,
}

/// Everything the checks need, read from the databases.
struct State {
    orders: BTreeMap<String, Order>,
    products: Vec<(String, u64, u64, u64)>,
    reservations: BTreeMap<String, BTreeMap<String, u64>>,
    charged: HashMap<String, u64>,
    declined: HashMap<String, u64>,
    refunded: HashMap<String, u64>,
    shipments: HashMap<String, u64>,
    emails: HashMap<(String, String), u64>,
    trails: HashMap<String, Vec<Audited>>,
    analytics: analytics::AnalyticsView,
}

impl State {
    async fn read(pools: &BTreeMap<Service, SqlitePool>) -> Result<State, CheckError> {
        let pool = |service: Service| &pools[&service];
        let failed = |service: Service| move |source: db::Error| CheckError::Db { service, source };
        let sql = |service: Service| {
            move |error: sqlx::Error| CheckError::Db {
                service,
                source: error.into(),
            }
        };

        let rows: Vec<(String, String, String, Option<String>, i64, String)> = sqlx::query_as(
            "SELECT order_id, correlation_id, status, cancel_reason, total_cents, placed_event_id
             FROM orders",
        )
        .fetch_all(pool(Service::Order))
        .await
        .map_err(sql(Service::Order))?;
        let mut orders = BTreeMap::new();
        for (order_id, correlation_id, status, reason, total, placed_event_id) in rows {
            let inconsistent = |what: String| failed(Service::Order)(db::Error::Inconsistent(what));
            let status = OrderStatus::parse(&status)
                .ok_or_else(|| inconsistent(format!("order {order_id} has status {status:?}")))?;
            let cancel_reason = match reason {
                None => None,
                Some(reason) => Some(CancelReason::parse(&reason).ok_or_else(|| {
                    inconsistent(format!("order {order_id} has cancel reason {reason:?}"))
                })?),
            };
            orders.insert(
                order_id,
                Order {
                    correlation_id,
                    status,
                    cancel_reason,
                    total_cents: unsigned(total, "total").map_err(failed(Service::Order))?,
                    placed_event_id,
                    lines: BTreeMap::new(),
                },
            );
        }
        let lines: Vec<(String, String, i64)> =
            sqlx::query_as("SELECT order_id, product_id, quantity FROM order_lines")
                .fetch_all(pool(Service::Order))
                .await
                .map_err(sql(Service::Order))?;
        for (order_id, product_id, quantity) in lines {
            let quantity = unsigned(quantity, "quantity").map_err(failed(Service::Order))?;
            if let Some(order) = orders.get_mut(&order_id) {
                *order.lines.entry(product_id).or_default() += quantity;
            }
        }

        let rows: Vec<(String, i64, i64, i64)> = sqlx::query_as(
            "SELECT product_id, initial_stock, available, reserved FROM products ORDER BY product_id",
        )
        .fetch_all(pool(Service::Inventory))
        .await
        .map_err(sql(Service::Inventory))?;
        let products = rows
            .into_iter()
            .map(|(id, initial, available, reserved)| {
                Ok((
                    id,
                    unsigned(initial, "initial stock")?,
                    unsigned(available, "available")?,
                    unsigned(reserved, "reserved")?,
                ))
            })
            .collect::<Result<Vec<_>, db::Error>>()
            .map_err(failed(Service::Inventory))?;
        let rows: Vec<(String, String, i64)> =
            sqlx::query_as("SELECT order_id, product_id, quantity FROM reservations")
                .fetch_all(pool(Service::Inventory))
                .await
                .map_err(sql(Service::Inventory))?;
        let mut reservations: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        for (order_id, product_id, quantity) in rows {
            let quantity = unsigned(quantity, "quantity").map_err(failed(Service::Inventory))?;
            *reservations
                .entry(order_id)
                .or_default()
                .entry(product_id)
                .or_default() += quantity;
        }

        let rows: Vec<(String, String, i64)> =
            sqlx::query_as("SELECT order_id, status, amount_cents FROM payments")
                .fetch_all(pool(Service::Payment))
                .await
                .map_err(sql(Service::Payment))?;
        let (mut charged, mut declined) = (HashMap::new(), HashMap::new());
        for (order_id, status, amount) in rows {
            let amount = unsigned(amount, "amount").map_err(failed(Service::Payment))?;
            if status == "charged" {
                charged.insert(order_id, amount);
            } else {
                declined.insert(order_id, amount);
            }
        }
        let rows: Vec<(String, i64)> = sqlx::query_as("SELECT order_id, amount_cents FROM refunds")
            .fetch_all(pool(Service::Payment))
            .await
            .map_err(sql(Service::Payment))?;
        let mut refunded = HashMap::new();
        for (order_id, amount) in rows {
            refunded.insert(
                order_id,
                unsigned(amount, "refund").map_err(failed(Service::Payment))?,
            );
        }

        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT order_id, count(*) FROM shipments GROUP BY order_id")
                .fetch_all(pool(Service::Shipping))
                .await
                .map_err(sql(Service::Shipping))?;
        let shipments = rows
            .into_iter()
            .map(|(order_id, count)| (order_id, count.unsigned_abs()))
            .collect();

        let rows: Vec<(String, String, i64)> =
            sqlx::query_as("SELECT order_id, kind, count(*) FROM emails GROUP BY order_id, kind")
                .fetch_all(pool(Service::Notification))
                .await
                .map_err(sql(Service::Notification))?;
        let emails = rows
            .into_iter()
            .map(|(order_id, kind, count)| ((order_id, kind), count.unsigned_abs()))
            .collect();

        let rows = sqlx::query(
            "SELECT event_id, type, correlation_id, causation_id, subject FROM audit_events
             ORDER BY seq",
        )
        .fetch_all(pool(Service::Audit))
        .await
        .map_err(sql(Service::Audit))?;
        let mut trails: HashMap<String, Vec<Audited>> = HashMap::new();
        for row in rows {
            let column = |name: &str| row.try_get::<Option<String>, _>(name);
            let audited = (|| {
                Ok::<_, sqlx::Error>((
                    column("correlation_id")?.unwrap_or_default(),
                    Audited {
                        event_id: row.try_get("event_id")?,
                        ty: row.try_get("type")?,
                        causation_id: column("causation_id")?,
                        subject: column("subject")?,
                    },
                ))
            })()
            .map_err(sql(Service::Audit))?;
            trails.entry(audited.0).or_default().push(audited.1);
        }

        let analytics = analytics::read_pool(pool(Service::Analytics))
            .await
            .map_err(failed(Service::Analytics))?;
        Ok(State {
            orders,
            products,
            reservations,
            charged,
            declined,
            refunded,
            shipments,
            emails,
            trails,
            analytics,
        })
    }

    fn check(self) -> InvariantReport {
        let mut report = InvariantReport::default();
        let mut violate = |invariant: Invariant, subject: &str, detail: String| {
            report.violations.push(Violation {
                invariant,
                subject: subject.to_owned(),
                detail,
            })
        };

        // Stock.
        let mut reserved_by_product: BTreeMap<&str, u64> = BTreeMap::new();
        for lines in self.reservations.values() {
            for (product_id, quantity) in lines {
                *reserved_by_product.entry(product_id).or_default() += quantity;
            }
        }
        for (product_id, initial, available, reserved) in &self.products {
            if available + reserved != *initial {
                violate(
                    Invariant::Stock,
                    product_id,
                    format!("available {available} + reserved {reserved} != initial {initial}"),
                );
            }
            match catalog::product(product_id) {
                Some(product) if product.initial_stock != *initial => violate(
                    Invariant::Stock,
                    product_id,
                    format!(
                        "initial stock {initial}, the catalog says {}",
                        product.initial_stock
                    ),
                ),
                None => violate(
                    Invariant::Stock,
                    product_id,
                    "not in the catalog".to_owned(),
                ),
                Some(_) => {}
            }
            let in_reservations = reserved_by_product
                .get(product_id.as_str())
                .copied()
                .unwrap_or(0);
            if in_reservations != *reserved {
                violate(
                    Invariant::Stock,
                    product_id,
                    format!("reserved {reserved}, reservations add up to {in_reservations}"),
                );
            }
        }

        // References.
        let known = |order_id: &str| self.orders.contains_key(order_id);
        let foreign = [
            (
                "payment",
                self.charged
                    .keys()
                    .chain(self.declined.keys())
                    .collect::<Vec<_>>(),
            ),
            ("refund", self.refunded.keys().collect()),
            ("reservation", self.reservations.keys().collect()),
            ("shipment", self.shipments.keys().collect()),
            (
                "e-mail",
                self.emails.keys().map(|(order_id, _)| order_id).collect(),
            ),
        ];
        for (what, order_ids) in foreign {
            for order_id in order_ids {
                if !known(order_id) {
                    violate(
                        Invariant::References,
                        order_id,
                        format!("a {what} of an order the order service does not know"),
                    );
                }
            }
        }
        let correlations: HashMap<&str, &str> = self
            .orders
            .iter()
            .map(|(order_id, order)| (order.correlation_id.as_str(), order_id.as_str()))
            .collect();
        for (correlation_id, trail) in &self.trails {
            if !correlations.contains_key(correlation_id.as_str()) {
                violate(
                    Invariant::References,
                    correlation_id,
                    format!("{} audited events of no known order", trail.len()),
                );
            }
        }

        for (order_id, order) in &self.orders {
            report.orders += 1;
            match order.status {
                OrderStatus::Pending => report.pending += 1,
                OrderStatus::Completed => report.completed += 1,
                OrderStatus::Cancelled => report.cancelled += 1,
            }
            let charged = self.charged.get(order_id).copied().unwrap_or(0);
            let refunded = self.refunded.get(order_id).copied().unwrap_or(0);
            let reserved = self.reservations.get(order_id);
            let shipments = self.shipments.get(order_id).copied().unwrap_or(0);
            let email = |kind: &str| {
                self.emails
                    .get(&(order_id.clone(), kind.to_owned()))
                    .copied()
                    .unwrap_or(0)
            };
            let (received, confirmed, cancelled) = (
                email("order_received"),
                email("order_confirmed"),
                email("order_cancelled"),
            );

            // Money and goods.
            if refunded > charged {
                violate(
                    Invariant::Money,
                    order_id,
                    format!("refunded {refunded} more than charged {charged}"),
                );
            }
            let net = charged.saturating_sub(refunded);
            match (order.status, order.cancel_reason) {
                (OrderStatus::Completed, _) => {
                    if charged != order.total_cents || refunded != 0 {
                        violate(
                            Invariant::Money,
                            order_id,
                            format!(
                                "completed: charged {charged}, refunded {refunded}, amount {}",
                                order.total_cents
                            ),
                        );
                    }
                    if reserved != Some(&order.lines) {
                        violate(
                            Invariant::Goods,
                            order_id,
                            format!("completed: reserved {reserved:?}, lines {:?}", order.lines),
                        );
                    }
                    if shipments != 1 {
                        violate(
                            Invariant::Goods,
                            order_id,
                            format!("completed with {shipments} shipments"),
                        );
                    }
                }
                (OrderStatus::Cancelled, reason) => {
                    if net != 0 {
                        violate(
                            Invariant::Money,
                            order_id,
                            format!("cancelled: charged {charged}, refunded {refunded}"),
                        );
                    }
                    if reason == Some(CancelReason::PaymentDeclined) && charged != 0 {
                        violate(
                            Invariant::Money,
                            order_id,
                            format!("declined, yet charged {charged}"),
                        );
                    }
                    if reason == Some(CancelReason::OutOfStock) && refunded != order.total_cents {
                        violate(
                            Invariant::Money,
                            order_id,
                            format!(
                                "out of stock: refunded {refunded}, amount {}",
                                order.total_cents
                            ),
                        );
                    }
                    if reason.is_none() {
                        violate(
                            Invariant::Money,
                            order_id,
                            "cancelled without a reason".to_owned(),
                        );
                    }
                    if reserved.is_some() || shipments != 0 {
                        violate(
                            Invariant::Goods,
                            order_id,
                            format!("cancelled: reserved {reserved:?}, {shipments} shipments"),
                        );
                    }
                }
                (OrderStatus::Pending, _) => {}
            }

            // E-mails.
            let (want_confirmed, want_cancelled) = match order.status {
                OrderStatus::Pending => (0, 0),
                OrderStatus::Completed => (1, 0),
                OrderStatus::Cancelled => (0, 1),
            };
            if received != 1 || confirmed != want_confirmed || cancelled != want_cancelled {
                violate(
                    Invariant::Emails,
                    order_id,
                    format!(
                        "{}: {received} received, {confirmed} confirmed, {cancelled} cancelled e-mails",
                        order.status.as_str()
                    ),
                );
            }

            // Audit.
            let trail = self
                .trails
                .get(&order.correlation_id)
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            if let Err(detail) = check_chain(order_id, order, trail) {
                violate(Invariant::Audit, order_id, detail);
            }
        }

        // Analytics.
        let revenue: u64 = self
            .orders
            .values()
            .filter(|order| order.status == OrderStatus::Completed)
            .map(|order| order.total_cents)
            .sum();
        let counts = &self.analytics.orders;
        for (what, projected, actual) in [
            ("placed", counts.placed, report.orders),
            ("completed", counts.completed, report.completed),
            ("cancelled", counts.cancelled, report.cancelled),
            ("revenue_cents", self.analytics.revenue_cents, revenue),
        ] {
            if projected != actual {
                violate(
                    Invariant::Analytics,
                    what,
                    format!("the read model says {projected}, the orders {actual}"),
                );
            }
        }
        report
    }
}

/// Checks that `trail` (in recorded order) is one causal chain from the order's
/// `OrderPlaced`, with the types of its outcome.
fn check_chain(order_id: &str, order: &Order, trail: &[Audited]) -> Result<(), String> {
    if trail.is_empty() && order.status == OrderStatus::Pending {
        return Ok(());
    }
    let Some(root) = trail.iter().find(|event| event.causation_id.is_none()) else {
        return Err(format!("no root among {} audited events", trail.len()));
    };
    if root.event_id != order.placed_event_id {
        return Err(format!(
            "the root {} ({}) is not the order's OrderPlaced {}",
            root.event_id, root.ty, order.placed_event_id
        ));
    }
    let mut chain = vec![root];
    while let Some(last) = chain.last() {
        let mut caused = trail
            .iter()
            .filter(|event| event.causation_id.as_deref() == Some(last.event_id.as_str()));
        let Some(next) = caused.next() else { break };
        if let Some(other) = caused.next() {
            return Err(format!(
                "{} caused both {} ({}) and {} ({})",
                last.event_id, next.event_id, next.ty, other.event_id, other.ty
            ));
        }
        if chain.len() > trail.len() {
            return Err("the causation ids make a cycle".to_owned());
        }
        chain.push(next);
    }
    if chain.len() != trail.len() {
        return Err(format!(
            "{} of {} audited events are off the causal chain",
            trail.len() - chain.len(),
            trail.len()
        ));
    }
    if let Some(stray) = chain
        .iter()
        .find(|event| event.subject.as_deref() != Some(order_id))
    {
        return Err(format!(
            "event {} ({}) is about {:?}",
            stray.event_id, stray.ty, stray.subject
        ));
    }
    let types: Vec<&str> = chain.iter().map(|event| event.ty.as_str()).collect();
    let fits = match (order.status, order.cancel_reason) {
        (OrderStatus::Completed, _) => types == COMPLETED_CHAIN,
        (OrderStatus::Cancelled, Some(CancelReason::PaymentDeclined)) => types == DECLINED_CHAIN,
        (OrderStatus::Cancelled, Some(CancelReason::OutOfStock)) => types == OUT_OF_STOCK_CHAIN,
        (OrderStatus::Cancelled, None) => false,
        (OrderStatus::Pending, _) => [COMPLETED_CHAIN, DECLINED_CHAIN, OUT_OF_STOCK_CHAIN]
            .iter()
            .any(|full| full.starts_with(&types) && types.len() < full.len()),
    };
    if !fits {
        return Err(format!(
            "{} order has the chain {}",
            order.status.as_str(),
            types.join(" → ")
        ));
    }
    Ok(())
}
