//! The notification service: renders an e-mail for `OrderPlaced`, `OrderCompleted` and
//! `OrderCancelled`, and stores it as sent, exactly once per event: the e-mail is keyed by
//! the event id, so its row is its own inbox record and a redelivery sends nothing.

use std::sync::Arc;

use herald_runtime::{HandlerContext, HandlerError, Router};
use rusqlite::{OptionalExtension as _, params};
use serde::Serialize;

use crate::catalog;
use crate::db::{self, Db, Migrations, now_ms, rfc3339};
use crate::events::{OrderCancelled, OrderCompleted, OrderPlaced};
use crate::services::handler_error;

/// The most e-mails `GET /api/notifications` returns.
pub const NOTIFICATIONS_LEN_MAX: u32 = 1_000;

pub(crate) const MIGRATIONS: Migrations = &[(
    1,
    "emails",
    "CREATE TABLE customers (
        customer_id TEXT PRIMARY KEY,
        name        TEXT NOT NULL,
        email       TEXT NOT NULL
    );
    CREATE TABLE emails (
        email_id   INTEGER PRIMARY KEY AUTOINCREMENT,
        event_id   TEXT NOT NULL UNIQUE,
        order_id   TEXT NOT NULL,
        kind       TEXT NOT NULL
                   CHECK (kind IN ('order_received', 'order_confirmed', 'order_cancelled')),
        recipient  TEXT NOT NULL,
        subject    TEXT NOT NULL,
        body       TEXT NOT NULL,
        sent_at    INTEGER NOT NULL
    );
    CREATE INDEX emails_by_order ON emails (order_id, email_id);",
)];

/// Seeds the customers' addresses (once: existing rows are kept).
pub(crate) async fn seed(db: &Db) -> Result<(), db::Error> {
    db.write(|tx| {
        let mut insert = tx.prepare_cached(
            "INSERT INTO customers (customer_id, name, email) VALUES (?1, ?2, ?3)
             ON CONFLICT (customer_id) DO NOTHING",
        )?;
        for customer in catalog::CUSTOMERS {
            insert.execute(params![customer.id, customer.name, customer.email])?;
        }
        Ok(())
    })
    .await
}

/// What an e-mail is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EmailKind {
    /// The order was received (`OrderPlaced`).
    OrderReceived,
    /// The order is on its way (`OrderCompleted`).
    OrderConfirmed,
    /// The order was cancelled (`OrderCancelled`).
    OrderCancelled,
}

impl EmailKind {
    /// The kind as a snake_case word.
    pub fn as_str(self) -> &'static str {
        match self {
            EmailKind::OrderReceived => "order_received",
            EmailKind::OrderConfirmed => "order_confirmed",
            EmailKind::OrderCancelled => "order_cancelled",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        match text {
            "order_received" => Some(EmailKind::OrderReceived),
            "order_confirmed" => Some(EmailKind::OrderConfirmed),
            "order_cancelled" => Some(EmailKind::OrderCancelled),
            _ => None,
        }
    }
}

/// An e-mail as sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Email {
    /// The event it was sent for.
    pub event_id: String,
    /// The order it is about.
    pub order_id: String,
    /// What it is about.
    pub kind: EmailKind,
    /// Its recipient.
    pub recipient: String,
    /// Its subject line.
    pub subject: String,
    /// Its text.
    pub body: String,
    /// When it was sent (RFC 3339).
    pub sent_at: String,
}

/// The e-mails about `order_id` (all orders when `None`), oldest first; at most `limit`.
pub(crate) async fn emails(
    db: &Db,
    order_id: Option<&str>,
    limit: u32,
) -> Result<Vec<Email>, db::Error> {
    let rows: Vec<(String, String, String, String, String, String, i64)> = sqlx::query_as(
        "SELECT event_id, order_id, kind, recipient, subject, body, sent_at FROM emails
         WHERE ?1 IS NULL OR order_id = ?1 ORDER BY email_id LIMIT ?2",
    )
    .bind(order_id)
    .bind(i64::from(limit))
    .fetch_all(db.pool())
    .await?;
    rows.into_iter()
        .map(
            |(event_id, order_id, kind, recipient, subject, body, sent_at)| {
                Ok(Email {
                    event_id,
                    order_id,
                    kind: EmailKind::parse(&kind).ok_or_else(|| {
                        db::Error::Inconsistent(format!("unknown e-mail kind {kind:?}"))
                    })?,
                    recipient,
                    subject,
                    body,
                    sent_at: rfc3339(sent_at),
                })
            },
        )
        .collect()
}

/// The notification service.
pub(crate) struct NotificationService {
    db: Db,
}

/// An e-mail to store: the order, the kind, the customer, and the text for them.
struct Draft {
    order_id: String,
    customer_id: String,
    kind: EmailKind,
    subject: String,
    body: String,
}

impl NotificationService {
    pub(crate) fn new(db: Db) -> Arc<Self> {
        Arc::new(NotificationService { db })
    }

    pub(crate) fn db(&self) -> &Db {
        &self.db
    }

    /// The router of the service's consumer group.
    pub(crate) fn router(self: &Arc<Self>) -> Router {
        let on_placed = Arc::clone(self);
        let on_completed = Arc::clone(self);
        let on_cancelled = Arc::clone(self);
        Router::new()
            .on::<OrderPlaced, _>(
                "OrderPlaced",
                move |order: OrderPlaced, ctx: HandlerContext| {
                    let service = Arc::clone(&on_placed);
                    async move {
                        let draft = Draft {
                            subject: format!("We received your order {}", order.order_id),
                            body: format!(
                                "Thank you for your order of {} item(s), {} in total. We will let \
                             you know when it ships.",
                                order
                                    .items
                                    .iter()
                                    .map(|line| u64::from(line.quantity))
                                    .sum::<u64>(),
                                money(order.total_cents)
                            ),
                            order_id: order.order_id,
                            customer_id: order.customer_id,
                            kind: EmailKind::OrderReceived,
                        };
                        service.send(draft, ctx).await
                    }
                },
            )
            .on::<OrderCompleted, _>(
                "OrderCompleted",
                move |order: OrderCompleted, ctx: HandlerContext| {
                    let service = Arc::clone(&on_completed);
                    async move {
                        let draft = Draft {
                            subject: format!("Your order {} is on its way", order.order_id),
                            body: format!(
                                "We charged {} and shipped your order. Tracking number: {}.",
                                money(order.total_cents),
                                order.tracking_number
                            ),
                            order_id: order.order_id,
                            customer_id: order.customer_id,
                            kind: EmailKind::OrderConfirmed,
                        };
                        service.send(draft, ctx).await
                    }
                },
            )
            .on::<OrderCancelled, _>(
                "OrderCancelled",
                move |order: OrderCancelled, ctx: HandlerContext| {
                    let service = Arc::clone(&on_cancelled);
                    async move {
                        let draft = Draft {
                            subject: format!("Your order {} was cancelled", order.order_id),
                            body: format!(
                                "We are sorry: your order was cancelled ({}). Nothing was charged, \
                             or the charge was refunded.",
                                order.detail
                            ),
                            order_id: order.order_id,
                            customer_id: order.customer_id,
                            kind: EmailKind::OrderCancelled,
                        };
                        service.send(draft, ctx).await
                    }
                },
            )
    }

    async fn send(&self, draft: Draft, ctx: HandlerContext) -> Result<(), HandlerError> {
        let cause = ctx.event().clone();
        self.db
            .write(move |tx| {
                let recipient: Option<(String, String)> = tx
                    .prepare_cached("SELECT name, email FROM customers WHERE customer_id = ?1")?
                    .query_row([&draft.customer_id], |row| row.try_into())
                    .optional()?;
                let Some((name, email)) = recipient else {
                    return Err(db::Error::Inconsistent(format!(
                        "customer {} has no e-mail address",
                        draft.customer_id
                    )));
                };
                tx.prepare_cached(
                    "INSERT INTO emails (event_id, order_id, kind, recipient, subject, body,
                                         sent_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (event_id) DO NOTHING",
                )?
                .execute(params![
                    cause.id,
                    draft.order_id,
                    draft.kind.as_str(),
                    format!("{name} <{email}>"),
                    draft.subject,
                    format!("Hello {name},\n\n{}\n\nHerald Shop", draft.body),
                    now_ms(),
                ])?;
                Ok(())
            })
            .await
            .map_err(handler_error)
    }
}

/// `1234` cents as `$12.34`.
fn money(cents: u64) -> String {
    format!("${}.{:02}", cents / 100, cents % 100)
}
