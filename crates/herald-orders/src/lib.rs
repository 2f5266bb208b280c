//! Herald's reference order system: the order flow of the design, running on the embedded
//! log and broker, each service with its own SQLite database, transactional outbox and
//! inbox.
//!
//! ```text
//! POST /api/orders  ─► Order: { orders row + outbox row } ─relay─► OrderPlaced
//! OrderPlaced       ─► Payment: charge        ─► PaymentProcessed | PaymentFailed
//! PaymentProcessed  ─► Inventory: reserve all ─► InventoryReserved | InventoryFailed
//! InventoryReserved ─► Shipping: schedule     ─► ShippingScheduled
//! ShippingScheduled ─► Order                  ─► OrderCompleted
//! PaymentFailed     ─► Order                  ─► OrderCancelled
//! InventoryFailed   ─► Payment: refund        ─► PaymentRefunded ─► Order ─► OrderCancelled
//! every event       ─► Notification (e-mails), Audit (append-only trail)
//! the log           ─► Analytics (read model with a checkpoint, rebuildable)
//! ```
//!
//! # Shape
//!
//! - One topic (default `orders`) carries every event of the flow, partitioned by order id,
//!   so an order's events are stored and delivered in causal order ([`events`]).
//! - Order, payment, inventory, shipping, notification and audit each run a
//!   [`ConsumerService`](herald_runtime::ConsumerService) in a consumer group named after
//!   the service; its router handles the types the service cares about and skips (and
//!   counts) the rest. A handler does its inbox record, state change and outbox rows in
//!   one transaction of the service's database (`<data_dir>/services/<service>.sqlite`),
//!   so a redelivery changes nothing; each emitting service's outbox is published by its
//!   own herald-sql relay. The database writer commits the transactions of concurrent
//!   handlers together (group commit).
//! - Analytics projects the topic's events from the log with a checkpoint in the same
//!   transaction as its read model, and can be rebuilt from the start of the log.
//! - [`SystemOptions::build`] → [`System::run`] runs it all in one process;
//!   [`System::api_router`] serves the HTTP API ([`api`]); [`SystemHandle`] places orders,
//!   waits for them to settle (woken by the order service, never polling), waits for the
//!   whole system to be idle, and checks the [`invariants`].
//!
//! # Dependencies
//!
//! **API Boundary:** the services talk to each other only through events of the topic; the
//! API reads their databases (an order's payment and audit trail) but writes only through
//! the order service.
//!
//! What it does not do yet: run its services as separate processes, or on PostgreSQL and
//! another broker; expire idempotency keys and inbox records.

#![forbid(unsafe_code)]

pub mod api;
pub mod catalog;
mod db;
pub mod events;
pub mod invariants;
mod problem;
mod services;
mod system;

pub use db::{DbOptions, Durability, Error as StateError};
pub use events::{CancelReason, DeclineReason, Service};
pub use invariants::{CheckError, InvariantReport, Violation};
pub use problem::PROBLEM_JSON;
pub use services::analytics::{
    AnalyticsView, Checkpoint, OrderCounts, PaymentCounts, ProductSales, RebuildError,
    TOP_PRODUCTS_LEN_MAX,
};
pub use services::audit::{AUDIT_EVENTS_MAX, AuditEntry};
pub use services::inventory::ProductView;
pub use services::notification::{Email, EmailKind, NOTIFICATIONS_LEN_MAX};
pub use services::order::{
    ADDRESS_LEN_MAX, IDEMPOTENCY_KEY_LEN_MAX, InvalidField, ItemRequest, ORDER_LINES_MAX,
    OrderRequest, OrderStatus, OrderView, PAYMENT_METHODS, QUANTITY_MAX, WAITERS_MAX, WaitError,
};
pub use services::payment::{Gateway, InvalidRate, PaymentSummary, Unavailable};
pub use services::shipping::CARRIER;
pub use system::{
    BuildError, DEAD_LETTERS_LEN_MAX, IdleError, PlaceError, Pruned, RetentionOptions, RunError,
    RunReport, SERVICES_DIR, System, SystemHandle, SystemOptions, TOPIC_DEFAULT,
};
