//! The order API: the `/api/*` routes of [`System::api_router`](crate::System::api_router).
//!
//! | method and path                      | what it does                                      |
//! |--------------------------------------|---------------------------------------------------|
//! | `POST /api/orders`                   | places an order (`Idempotency-Key` honoured)      |
//! | `GET /api/orders/{id}`               | the order, its payment and its events; `?waitMs=` waits for it to settle |
//! | `GET /api/orders`                    | the newest orders: `?status=&limit=`              |
//! | `GET /api/products`                  | the catalog with its stock                        |
//! | `GET /api/analytics`                 | the read model                                    |
//! | `GET /api/audit?correlationId=`      | the events of a flow, in causal order             |
//! | `GET /api/notifications?orderId=`    | the e-mails sent (about one order)                |
//! | `GET /api/idle`                      | whether the system is idle; `?waitMs=` waits for it to be |
//!
//! # Contract
//!
//! - Every error MUST be an `application/problem+json` document; a `POST` answered with a
//!   `4xx` MUST have stored nothing.
//! - `POST /api/orders` takes `application/json` of at most [`ORDER_BODY_SIZE_MAX_BYTES`]
//!   (else `415`, `413`): `{customerId, items: [{productId, quantity}], shippingAddress,
//!   paymentMethod}`. JSON that does not parse, or members of the wrong type or unknown, is
//!   `400` (`invalid-json`); values that are not acceptable (a missing member, an unknown
//!   customer or product, a quantity out of range…) are `422` (`invalid-order`) with every
//!   fault listed in `errors` (`pointer`, `reason`). A new order is `201` with `Location`
//!   and the order (`orderId`, `correlationId`, …), once it and its `OrderPlaced` event are
//!   committed.
//! - `Idempotency-Key` (1 to [`IDEMPOTENCY_KEY_LEN_MAX`] visible ASCII characters, else
//!   `400`): the first request with a key places the order; a later one with the same key
//!   and the same order (after validation, so formatting does not matter) answers `201` with
//!   that order and `Idempotent-Replayed: true`, placing nothing; with another order it is
//!   `422` (`idempotency-key-reused`). Keys do not expire.
//! - Lists hold at most [`ORDERS_LEN_MAX`] orders (default [`ORDERS_LEN_DEFAULT`]), and
//!   `waitMs` is at most [`WAIT_MS_MAX`].
//! - `GET /api/idle` answers `{"idle": true}` once every outbox is empty, every consumer
//!   group has committed the whole topic and the analytics projection has read the whole
//!   log ([`SystemHandle::wait_idle`]); after `waitMs` (default 0) without that, `{"idle":
//!   false, "busy": "…"}` saying what is still busy. At most [`IDLE_WAITERS_MAX`] such
//!   requests wait at once; more are `503` (`too-many-waiters`), as is a wait the server's
//!   shutdown ends (`unavailable`). Scripts and tests use it to wait for the effects of what
//!   they did (an audit trail, a dead letter) without polling.

use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::problem::Problem;
use crate::services::audit::{self, AuditEntry};
use crate::services::notification::{self, NOTIFICATIONS_LEN_MAX};
use crate::services::order::{
    IDEMPOTENCY_KEY_LEN_MAX, OrderRequest, OrderStatus, OrderView, Placed, WaitError,
};
use crate::services::payment::{self, PaymentSummary};
use crate::services::{analytics, inventory};
use crate::system::{IdleError, SystemHandle};

/// The largest `POST /api/orders` body accepted, in bytes.
pub const ORDER_BODY_SIZE_MAX_BYTES: usize = 64 * 1024;
/// The most orders `GET /api/orders` returns.
pub const ORDERS_LEN_MAX: u32 = 500;
/// How many orders `GET /api/orders` returns without `limit`.
pub const ORDERS_LEN_DEFAULT: u32 = 50;
/// The longest `waitMs` of `GET /api/orders/{id}`.
pub const WAIT_MS_MAX: u64 = 30_000;
/// The most `GET /api/idle` requests waiting at once.
pub const IDLE_WAITERS_MAX: usize = 16;
/// The header marking an answer replayed for a reused `Idempotency-Key`.
pub const IDEMPOTENT_REPLAYED_HEADER: &str = "idempotent-replayed";

/// The routes; see the [module documentation](self).
pub(crate) fn router(system: SystemHandle) -> Router {
    Router::new()
        .route(
            "/api/orders",
            post(place_order)
                .get(list_orders)
                .fallback(method_not_allowed)
                .layer(DefaultBodyLimit::max(ORDER_BODY_SIZE_MAX_BYTES)),
        )
        .route(
            "/api/orders/{id}",
            get(get_order).fallback(method_not_allowed),
        )
        .route("/api/products", get(products).fallback(method_not_allowed))
        .route(
            "/api/analytics",
            get(analytics).fallback(method_not_allowed),
        )
        .route("/api/audit", get(audit).fallback(method_not_allowed))
        .route(
            "/api/notifications",
            get(notifications).fallback(method_not_allowed),
        )
        .route("/api/idle", get(idle).fallback(method_not_allowed))
        .with_state(system)
}

/// An order with its payment and its events, as `GET /api/orders/{id}` shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct OrderDetails {
    #[serde(flatten)]
    order: OrderView,
    payment: PaymentSummary,
    events: Vec<AuditEntry>,
}

async fn place_order(
    State(system): State<SystemHandle>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match place(&system, &headers, body).await {
        Ok(response) => response,
        Err(problem) => problem.into_response(),
    }
}

async fn place(
    system: &SystemHandle,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    check_json_content_type(headers)?;
    let key = idempotency_key(headers)?;
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body-too-large",
                "Request body too large",
                format!("the body is larger than {ORDER_BODY_SIZE_MAX_BYTES} bytes"),
            )
            .with("limit", ORDER_BODY_SIZE_MAX_BYTES as u64)
        } else {
            Problem::bad_request(
                "unreadable-body",
                "Unreadable request body",
                rejection.body_text(),
            )
        }
    })?;
    let request: OrderRequest = serde_json::from_slice(&body).map_err(|error| {
        Problem::bad_request(
            "invalid-json",
            "Invalid JSON",
            format!("the body is not an order: {error}"),
        )
        .with("line", error.line() as u64)
        .with("column", error.column() as u64)
    })?;
    let order = request.validate().map_err(|faults| {
        let detail = faults
            .iter()
            .map(|fault| format!("{} {}", fault.pointer, fault.reason))
            .collect::<Vec<_>>()
            .join("; ");
        Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-order",
            "Invalid order",
            detail,
        )
        .with("errors", json!(faults))
    })?;
    let placed = system
        .order_service()
        .place(order, key)
        .await
        .map_err(|error| Problem::internal(&error))?;
    let (view, replayed) = match placed {
        Placed::New(view) => (view, false),
        Placed::Replayed(view) => (view, true),
        Placed::KeyReused { order_id } => {
            return Err(Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency-key-reused",
                "Idempotency key reused",
                "the Idempotency-Key was used before with another order",
            )
            .with("orderId", order_id));
        }
    };
    let location = format!("/api/orders/{}", view.order_id);
    let mut response = (StatusCode::CREATED, Json(&view)).into_response();
    let headers = response.headers_mut();
    if let Ok(location) = HeaderValue::from_str(&location) {
        headers.insert(header::LOCATION, location);
    }
    if replayed {
        headers.insert(IDEMPOTENT_REPLAYED_HEADER, HeaderValue::from_static("true"));
    }
    Ok(response)
}

fn check_json_content_type(headers: &HeaderMap) -> Result<(), Problem> {
    let media_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .map(|value| value.split(';').next().unwrap_or("").trim());
    match media_type {
        Some(media_type) if media_type.eq_ignore_ascii_case("application/json") => Ok(()),
        _ => Err(Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "Unsupported media type",
            "an order is sent as application/json",
        )),
    }
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, Problem> {
    let mut values = headers.get_all("idempotency-key").iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    let invalid = |detail: String| {
        Problem::bad_request("invalid-idempotency-key", "Invalid Idempotency-Key", detail)
    };
    if values.next().is_some() {
        return Err(invalid(
            "Idempotency-Key is given more than once".to_owned(),
        ));
    }
    let bytes = value.as_bytes();
    if bytes.is_empty()
        || bytes.len() > IDEMPOTENCY_KEY_LEN_MAX
        || !bytes.iter().all(|byte| (0x21..=0x7e).contains(byte))
    {
        return Err(invalid(format!(
            "Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_LEN_MAX} visible ASCII characters"
        )));
    }
    Ok(Some(String::from_utf8_lossy(bytes).into_owned()))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WaitQuery {
    wait_ms: Option<u64>,
}

/// The answer of `GET /api/idle`.
#[derive(Debug, Serialize)]
struct Idleness {
    idle: bool,
    /// What was still busy at the last look, when not idle.
    #[serde(skip_serializing_if = "Option::is_none")]
    busy: Option<String>,
}

async fn idle(
    State(system): State<SystemHandle>,
    query: Result<Query<WaitQuery>, QueryRejection>,
) -> Result<Json<Idleness>, Problem> {
    let wait_ms = wait_ms(query)?;
    let Ok(_waiting) = system.idle_waiters().try_acquire() else {
        return Err(too_many_waiters("idleness"));
    };
    match system.wait_idle(Duration::from_millis(wait_ms)).await {
        Ok(()) => Ok(Json(Idleness {
            idle: true,
            busy: None,
        })),
        Err(IdleError::TimedOut { busy, .. }) => Ok(Json(Idleness {
            idle: false,
            busy: Some(busy),
        })),
        Err(IdleError::Stopping) => Err(Problem::stopping()),
        Err(error @ IdleError::Check(_)) => Err(Problem::internal(&error)),
    }
}

/// The `waitMs` of a query, checked: 0 when absent.
fn wait_ms(query: Result<Query<WaitQuery>, QueryRejection>) -> Result<u64, Problem> {
    let Query(query) = query.map_err(invalid_query)?;
    let wait_ms = query.wait_ms.unwrap_or(0);
    if wait_ms > WAIT_MS_MAX {
        return Err(Problem::bad_request(
            "invalid-query",
            "Invalid query",
            format!("waitMs must be at most {WAIT_MS_MAX}"),
        ));
    }
    Ok(wait_ms)
}

/// More requests wait than the server keeps waiting.
fn too_many_waiters(what: &str) -> Problem {
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "too-many-waiters",
        "Too many waiting requests",
        format!("too many requests are waiting for {what}; retry without waitMs"),
    )
}

async fn get_order(
    State(system): State<SystemHandle>,
    Path(order_id): Path<String>,
    query: Result<Query<WaitQuery>, QueryRejection>,
) -> Result<Json<OrderDetails>, Problem> {
    let wait_ms = wait_ms(query)?;
    let order = if wait_ms == 0 {
        system
            .order_service()
            .get(&order_id)
            .map_err(|error| Problem::internal(&error))?
    } else {
        match system
            .order_service()
            .wait_settled(&order_id, Duration::from_millis(wait_ms))
            .await
        {
            Ok(order) => order,
            Err(WaitError::TooManyWaiters) => return Err(too_many_waiters("orders")),
            Err(WaitError::Db(error)) => return Err(Problem::internal(&error)),
        }
    };
    let Some(order) = order else {
        return Err(Problem::new(
            StatusCode::NOT_FOUND,
            "order-not-found",
            "Order not found",
            format!("there is no order {order_id}"),
        ));
    };
    let payment = payment::summary(system.payment_db(), &order.order_id)
        .map_err(|error| Problem::internal(&error))?;
    let events = audit::trail(system.audit_db(), &order.correlation_id)
        .await
        .map_err(|error| Problem::internal(&error))?;
    Ok(Json(OrderDetails {
        order,
        payment,
        events,
    }))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListQuery {
    status: Option<String>,
    limit: Option<u32>,
}

async fn list_orders(
    State(system): State<SystemHandle>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<serde_json::Value>, Problem> {
    let Query(query) = query.map_err(invalid_query)?;
    let status = query
        .status
        .as_deref()
        .map(|status| {
            OrderStatus::parse(status).ok_or_else(|| {
                Problem::bad_request(
                    "invalid-query",
                    "Invalid query",
                    "status must be pending, completed or cancelled",
                )
            })
        })
        .transpose()?;
    let limit = limit(query.limit, ORDERS_LEN_DEFAULT, ORDERS_LEN_MAX)?;
    let orders = system
        .order_service()
        .list(status, limit)
        .map_err(|error| Problem::internal(&error))?;
    Ok(Json(json!({ "orders": orders })))
}

async fn products(State(system): State<SystemHandle>) -> Result<Json<serde_json::Value>, Problem> {
    let products = inventory::products(system.inventory_db())
        .await
        .map_err(|error| Problem::internal(&error))?;
    Ok(Json(json!({ "products": products })))
}

async fn analytics(
    State(system): State<SystemHandle>,
) -> Result<Json<analytics::AnalyticsView>, Problem> {
    let view = analytics::read(system.analytics_db())
        .await
        .map_err(|error| Problem::internal(&error))?;
    Ok(Json(view))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AuditQuery {
    correlation_id: Option<String>,
}

async fn audit(
    State(system): State<SystemHandle>,
    query: Result<Query<AuditQuery>, QueryRejection>,
) -> Result<Json<serde_json::Value>, Problem> {
    let Query(query) = query.map_err(invalid_query)?;
    let Some(correlation_id) = query.correlation_id.filter(|id| !id.is_empty()) else {
        return Err(Problem::bad_request(
            "invalid-query",
            "Invalid query",
            "correlationId is required",
        ));
    };
    let events = audit::trail(system.audit_db(), &correlation_id)
        .await
        .map_err(|error| Problem::internal(&error))?;
    Ok(Json(
        json!({ "correlationId": correlation_id, "events": events }),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NotificationsQuery {
    order_id: Option<String>,
    limit: Option<u32>,
}

async fn notifications(
    State(system): State<SystemHandle>,
    query: Result<Query<NotificationsQuery>, QueryRejection>,
) -> Result<Json<serde_json::Value>, Problem> {
    let Query(query) = query.map_err(invalid_query)?;
    let limit = limit(query.limit, NOTIFICATIONS_LEN_MAX, NOTIFICATIONS_LEN_MAX)?;
    let emails = notification::emails(system.notification_db(), query.order_id.as_deref(), limit)
        .await
        .map_err(|error| Problem::internal(&error))?;
    Ok(Json(json!({ "notifications": emails })))
}

fn limit(given: Option<u32>, default: u32, max: u32) -> Result<u32, Problem> {
    match given {
        None => Ok(default),
        Some(limit) if (1..=max).contains(&limit) => Ok(limit),
        Some(_) => Err(Problem::bad_request(
            "invalid-query",
            "Invalid query",
            format!("limit must be between 1 and {max}"),
        )),
    }
}

fn invalid_query(rejection: QueryRejection) -> Problem {
    Problem::bad_request("invalid-query", "Invalid query", rejection.body_text())
}

async fn method_not_allowed(method: Method, uri: Uri) -> Problem {
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "Method not allowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
}
