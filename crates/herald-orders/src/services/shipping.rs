//! The shipping service: schedules a shipment for every reserved order.
//!
//! `InventoryReserved` → one transaction: the inbox record, the shipment (one per order: the
//! order id is unique) with a tracking number, and `ShippingScheduled`.

use std::sync::Arc;

use herald_core::broker::GroupName;
use herald_runtime::{HandlerContext, HandlerError, Router};
use herald_sql::Outbox;
use rusqlite::{OptionalExtension as _, params};

use crate::db::{Db, Migrations, now_ms};
use crate::events::{InventoryReserved, Service, ShippingScheduled};
use crate::services::{emit, first_delivery, handler_error};

/// The carrier every shipment goes with.
pub const CARRIER: &str = "Herald Express";

pub(crate) const MIGRATIONS: Migrations = &[(
    1,
    "shipments",
    "CREATE TABLE shipments (
        shipment_id     INTEGER PRIMARY KEY AUTOINCREMENT,
        order_id        TEXT NOT NULL UNIQUE,
        tracking_number TEXT NOT NULL UNIQUE,
        carrier         TEXT NOT NULL,
        created_at      INTEGER NOT NULL
    );",
)];

/// The shipping service.
pub(crate) struct ShippingService {
    db: Db,
    outbox: Outbox,
    group: GroupName,
}

impl ShippingService {
    pub(crate) fn new(db: Db, outbox: Outbox, group: GroupName) -> Arc<Self> {
        Arc::new(ShippingService { db, outbox, group })
    }

    pub(crate) fn db(&self) -> &Db {
        &self.db
    }

    /// The router of the service's consumer group.
    pub(crate) fn router(self: &Arc<Self>) -> Router {
        let service = Arc::clone(self);
        Router::new().on::<InventoryReserved, _>(
            "InventoryReserved",
            move |data: InventoryReserved, ctx: HandlerContext| {
                let service = Arc::clone(&service);
                async move { service.schedule(data, ctx).await }
            },
        )
    }

    async fn schedule(
        &self,
        reserved: InventoryReserved,
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
                // The next shipment id, read under the write lock the batch holds: the
                // tracking number is unique because the id is.
                let scheduled: Option<(i64, String)> = tx
                    .prepare_cached(
                        "INSERT INTO shipments (order_id, tracking_number, carrier, created_at)
                         VALUES (?1,
                                 'HX' || printf('%010d',
                                     (SELECT coalesce(max(shipment_id), 0) + 1 FROM shipments)),
                                 ?2, ?3)
                         ON CONFLICT (order_id) DO NOTHING
                         RETURNING shipment_id, tracking_number",
                    )?
                    .query_row(params![reserved.order_id, CARRIER, now_ms()], |row| {
                        row.try_into()
                    })
                    .optional()?;
                let Some((shipment_id, tracking_number)) = scheduled else {
                    tracing::warn!(order_id = %reserved.order_id, "the order has a shipment already");
                    return Ok(());
                };
                let payload = ShippingScheduled {
                    order_id: reserved.order_id.clone(),
                    shipment_id: format!("shp_{shipment_id}"),
                    tracking_number,
                    carrier: CARRIER.to_owned(),
                };
                emit(tx, &outbox, Service::Shipping, &payload, &cause)
            })
            .await
            .map_err(handler_error)
    }
}
