//! The inventory service: reserves the items of paid orders, all of them or none.
//!
//! `PaymentProcessed` → one transaction: the inbox record, then either every item reserved
//! (`available` down, `reserved` up, one reservation row per product) and
//! `InventoryReserved`, or nothing reserved and `InventoryFailed` naming each product that
//! is short and by how much. The outcome is keyed by order, so an order is reserved once.
//!
//! For every product, `available + reserved` is its initial stock, always: the schema
//! refuses a negative count and every change moves units between the two columns in one
//! statement.

use std::collections::BTreeMap;
use std::sync::Arc;

use herald_core::broker::GroupName;
use herald_runtime::{HandlerContext, HandlerError, Router};
use herald_sql::Outbox;
use rusqlite::{OptionalExtension as _, params};
use serde::Serialize;

use crate::catalog;
use crate::db::{self, Db, Migrations, now_ms};
use crate::events::{
    InventoryFailed, InventoryReserved, ItemQuantity, PaymentProcessed, Service, Shortage,
};
use crate::services::{emit, first_delivery, handler_error, signed, unsigned};

pub(crate) const MIGRATIONS: Migrations = &[(
    1,
    "inventory",
    "CREATE TABLE products (
        product_id    TEXT PRIMARY KEY,
        name          TEXT NOT NULL,
        price_cents   INTEGER NOT NULL CHECK (price_cents >= 0),
        initial_stock INTEGER NOT NULL CHECK (initial_stock >= 0),
        available     INTEGER NOT NULL CHECK (available >= 0),
        reserved      INTEGER NOT NULL CHECK (reserved >= 0)
    );
    CREATE TABLE reservations (
        order_id   TEXT NOT NULL,
        product_id TEXT NOT NULL REFERENCES products (product_id),
        quantity   INTEGER NOT NULL CHECK (quantity > 0),
        created_at INTEGER NOT NULL,
        PRIMARY KEY (order_id, product_id)
    );
    CREATE TABLE outcomes (
        order_id   TEXT PRIMARY KEY,
        outcome    TEXT NOT NULL CHECK (outcome IN ('reserved', 'failed')),
        created_at INTEGER NOT NULL
    );",
)];

/// Seeds the catalog with its initial stock (once: existing rows are kept).
pub(crate) async fn seed(db: &Db) -> Result<(), db::Error> {
    db.write(|tx| {
        let mut insert = tx.prepare_cached(
            "INSERT INTO products (product_id, name, price_cents, initial_stock, available,
                                   reserved)
             VALUES (?1, ?2, ?3, ?4, ?4, 0) ON CONFLICT (product_id) DO NOTHING",
        )?;
        for product in catalog::PRODUCTS {
            insert.execute(params![
                product.id,
                product.name,
                signed(product.price_cents, "price")?,
                signed(product.initial_stock, "stock")?,
            ])?;
        }
        Ok(())
    })
    .await
}

/// A product with its stock, as `GET /api/products` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProductView {
    /// The product.
    pub product_id: String,
    /// Its name.
    pub name: String,
    /// Its unit price, in cents.
    pub price_cents: u64,
    /// Units that can be ordered.
    pub available: u64,
    /// Units reserved by orders.
    pub reserved: u64,
    /// The stock the inventory started with.
    pub initial_stock: u64,
}

/// Every product with its stock, in catalog order.
pub(crate) async fn products(db: &Db) -> Result<Vec<ProductView>, db::Error> {
    let rows: Vec<(String, String, i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT product_id, name, price_cents, available, reserved, initial_stock FROM products",
    )
    .fetch_all(db.pool())
    .await?;
    let mut views = rows
        .into_iter()
        .map(
            |(product_id, name, price, available, reserved, initial)| -> Result<_, db::Error> {
                Ok(ProductView {
                    product_id,
                    name,
                    price_cents: unsigned(price, "price")?,
                    available: unsigned(available, "available")?,
                    reserved: unsigned(reserved, "reserved")?,
                    initial_stock: unsigned(initial, "initial stock")?,
                })
            },
        )
        .collect::<Result<Vec<_>, _>>()?;
    let rank = |id: &str| {
        catalog::PRODUCTS
            .iter()
            .position(|product| product.id == id)
            .unwrap_or(usize::MAX)
    };
    views.sort_by_key(|view| rank(&view.product_id));
    Ok(views)
}

/// The inventory service.
pub(crate) struct InventoryService {
    db: Db,
    outbox: Outbox,
    group: GroupName,
}

impl InventoryService {
    pub(crate) fn new(db: Db, outbox: Outbox, group: GroupName) -> Arc<Self> {
        Arc::new(InventoryService { db, outbox, group })
    }

    pub(crate) fn db(&self) -> &Db {
        &self.db
    }

    /// The router of the service's consumer group.
    pub(crate) fn router(self: &Arc<Self>) -> Router {
        let service = Arc::clone(self);
        Router::new().on::<PaymentProcessed, _>(
            "PaymentProcessed",
            move |data: PaymentProcessed, ctx: HandlerContext| {
                let service = Arc::clone(&service);
                async move { service.reserve(data, ctx).await }
            },
        )
    }

    async fn reserve(
        &self,
        paid: PaymentProcessed,
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
                let decided = tx
                    .prepare_cached("SELECT 1 FROM outcomes WHERE order_id = ?1")?
                    .exists([&paid.order_id])?;
                if decided {
                    tracing::warn!(order_id = %paid.order_id, "the order's stock was decided already");
                    return Ok(());
                }
                // The quantity per product, lines of one product added up, in line order.
                let mut wanted: Vec<(String, u64)> = Vec::new();
                let mut index: BTreeMap<&str, usize> = BTreeMap::new();
                for item in &paid.items {
                    match index.get(item.product_id.as_str()) {
                        Some(&at) => wanted[at].1 += u64::from(item.quantity),
                        None => {
                            index.insert(&item.product_id, wanted.len());
                            wanted.push((item.product_id.clone(), u64::from(item.quantity)));
                        }
                    }
                }
                let mut shortages = Vec::new();
                let mut stock =
                    tx.prepare_cached("SELECT available FROM products WHERE product_id = ?1")?;
                for (product_id, requested) in &wanted {
                    let available: Option<i64> = stock
                        .query_row([product_id], |row| row.get(0))
                        .optional()?;
                    // A product the inventory does not stock has none available.
                    let available =
                        available.map_or(Ok(0), |available| unsigned(available, "available"))?;
                    if available < *requested {
                        shortages.push(Shortage {
                            product_id: product_id.clone(),
                            requested: *requested,
                            available,
                        });
                    }
                }
                let now = now_ms();
                let outcome = if shortages.is_empty() { "reserved" } else { "failed" };
                tx.prepare_cached(
                    "INSERT INTO outcomes (order_id, outcome, created_at) VALUES (?1, ?2, ?3)",
                )?
                .execute(params![paid.order_id, outcome, now])?;
                if !shortages.is_empty() {
                    let failed = InventoryFailed {
                        order_id: paid.order_id.clone(),
                        shortages,
                    };
                    return emit(tx, &outbox, Service::Inventory, &failed, &cause);
                }
                let mut take = tx.prepare_cached(
                    "UPDATE products SET available = available - ?2, reserved = reserved + ?2
                     WHERE product_id = ?1 AND available >= ?2",
                )?;
                let mut reserve = tx.prepare_cached(
                    "INSERT INTO reservations (order_id, product_id, quantity, created_at)
                     VALUES (?1, ?2, ?3, ?4)",
                )?;
                for (product_id, quantity) in &wanted {
                    let quantity = signed(*quantity, "quantity")?;
                    if take.execute(params![product_id, quantity])? != 1 {
                        // Checked above in this transaction: a bug if it happens.
                        return Err(db::Error::Inconsistent(format!(
                            "stock of {product_id} changed while reserving"
                        )));
                    }
                    reserve.execute(params![paid.order_id, product_id, quantity, now])?;
                }
                let reserved = InventoryReserved {
                    order_id: paid.order_id.clone(),
                    items: wanted
                        .into_iter()
                        .map(|(product_id, quantity)| ItemQuantity {
                            product_id,
                            quantity: u32::try_from(quantity).unwrap_or(u32::MAX),
                        })
                        .collect(),
                };
                emit(tx, &outbox, Service::Inventory, &reserved, &cause)
            })
            .await
            .map_err(handler_error)
    }
}
