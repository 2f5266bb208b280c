//! The router: from an event's type to the typed handler registered for it.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use herald_core::Event;
use herald_core::broker::{GroupName, Message};
use herald_core::event::{CAUSATION_ID, CORRELATION_ID, TRACE_PARENT};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use crate::delivery::{Delivery, Outcome};
use crate::error::{HandlerError, RouteError};

/// What the router does with an event whose type has no handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnknownType {
    /// Answer [`Outcome::Skipped`] (counted by [`Router::skipped_count`] and by the metrics
    /// layer), so the message is acked. The default: a group usually subscribes to a topic
    /// carrying more types than it cares about.
    #[default]
    Skip,
    /// Fail with a permanent [`RouteError::UnknownType`], so the event is dead-lettered.
    DeadLetter,
}

/// An async function handling events whose `data` deserialises into `T`.
///
/// Implemented for every `Fn(T, HandlerContext) -> impl Future<Output = Result<(),
/// HandlerError>>`, so an `async fn` registers as it is.
pub trait Handler<T>: Send + Sync + 'static {
    /// Handles one event.
    fn call(&self, data: T, ctx: HandlerContext) -> BoxFuture<'static, Result<(), HandlerError>>;
}

impl<T, F, Fut> Handler<T> for F
where
    F: Fn(T, HandlerContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    fn call(&self, data: T, ctx: HandlerContext) -> BoxFuture<'static, Result<(), HandlerError>> {
        Box::pin(self(data, ctx))
    }
}

/// Routes each delivery to the handler registered for its event type.
///
/// A [`tower::Service`] of [`Delivery`]: it answers [`Outcome::Handled`] or
/// [`Outcome::Skipped`], and fails with the handler's [`HandlerError`] (or a permanent one
/// when `data` does not deserialise). Cheap to clone; clones share their handlers.
///
/// ```
/// use herald_runtime::{HandlerContext, HandlerError, Router};
///
/// #[derive(serde::Deserialize)]
/// struct OrderPlaced {
///     order_id: String,
/// }
///
/// async fn on_order_placed(order: OrderPlaced, ctx: HandlerContext) -> Result<(), HandlerError> {
///     let reply = herald_core::Event::new("/payments", "PaymentProcessed")
///         .with_data(serde_json::json!({ "order_id": order.order_id }));
///     ctx.publish(reply);
///     Ok(())
/// }
///
/// let router = Router::new().on::<OrderPlaced, _>("OrderPlaced", on_order_placed);
/// ```
#[derive(Clone)]
pub struct Router {
    routes: Arc<HashMap<String, Arc<dyn Route>>>,
    unknown_type: UnknownType,
    skipped: Arc<AtomicU64>,
}

/// What a handler gets besides its data: the delivery it is handling, and a way to publish
/// events caused by it.
///
/// Events published through the context are collected and returned in
/// [`Outcome::Handled`]; those of an attempt that fails are discarded with it, so a retried
/// handler does not publish twice.
#[derive(Clone)]
pub struct HandlerContext {
    delivery: Delivery,
    published: Arc<Mutex<Vec<Event>>>,
}

impl Router {
    /// A router with no handlers that skips unknown types.
    pub fn new() -> Self {
        Router {
            routes: Arc::new(HashMap::new()),
            unknown_type: UnknownType::default(),
            skipped: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Registers `handler` for events of type `ty`, with `data` deserialised into `T`
    /// (by [`Event::data_as`]); an event without `data` is handed `T` made from JSON
    /// `null`, which suits `()` and `Option<_>`. Replaces an earlier handler of `ty`.
    pub fn on<T, H>(mut self, ty: impl Into<String>, handler: H) -> Self
    where
        T: DeserializeOwned + Send + 'static,
        H: Handler<T>,
    {
        let route: Arc<dyn Route> = Arc::new(Typed {
            handler,
            _data: PhantomData,
        });
        Arc::make_mut(&mut self.routes).insert(ty.into(), route);
        self
    }

    /// Sets the policy for events whose type has no handler.
    pub fn unknown_type(mut self, policy: UnknownType) -> Self {
        self.unknown_type = policy;
        self
    }

    /// The types this router has a handler for, in no particular order.
    pub fn types(&self) -> impl Iterator<Item = &str> {
        self.routes.keys().map(String::as_str)
    }

    /// How many deliveries this router (and its clones) skipped for an unknown type.
    pub fn skipped_count(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }
}

impl Default for Router {
    fn default() -> Self {
        Router::new()
    }
}

impl fmt::Debug for Router {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut types: Vec<&str> = self.routes.keys().map(String::as_str).collect();
        types.sort_unstable();
        f.debug_struct("Router")
            .field("types", &types)
            .field("unknown_type", &self.unknown_type)
            .finish()
    }
}

impl tower_service::Service<Delivery> for Router {
    type Response = Outcome;
    type Error = HandlerError;
    type Future = BoxFuture<'static, Result<Outcome, HandlerError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, delivery: Delivery) -> Self::Future {
        let ty = &delivery.event().ty;
        let Some(route) = self.routes.get(ty) else {
            let result = match self.unknown_type {
                UnknownType::Skip => {
                    self.skipped.fetch_add(1, Ordering::Relaxed);
                    Ok(Outcome::Skipped)
                }
                UnknownType::DeadLetter => Err(HandlerError::permanent(RouteError::UnknownType {
                    ty: ty.clone(),
                })),
            };
            return Box::pin(std::future::ready(result));
        };
        let ctx = HandlerContext {
            delivery: delivery.clone(),
            published: Arc::new(Mutex::new(Vec::new())),
        };
        let handling = route.call(ctx.clone());
        Box::pin(async move {
            handling?.await?;
            let published = std::mem::take(&mut *ctx.published.lock().expect("not poisoned"));
            Ok(Outcome::Handled { published })
        })
    }
}

impl HandlerContext {
    /// The message being handled.
    pub fn message(&self) -> &Message {
        &self.delivery.message
    }

    /// The event being handled.
    pub fn event(&self) -> &Event {
        self.delivery.event()
    }

    /// The consumer group handling it.
    pub fn group(&self) -> &GroupName {
        &self.delivery.group
    }

    /// Cancelled when the consumer shuts down; a long handler may watch it.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.delivery.shutdown
    }

    /// Queues `event` to be published once the handler succeeds, as caused by the event
    /// being handled: its `causationid` becomes the current event's id, its
    /// `correlationid` the current event's correlation id (or, when it has none, its id),
    /// and the current event's `traceparent`, when there is one, is carried over.
    pub fn publish(&self, event: Event) {
        let current = self.event();
        let correlation_id = current.correlation_id().unwrap_or(&current.id).to_owned();
        let mut event = event
            .with_extension(CAUSATION_ID, current.id.as_str())
            .with_extension(CORRELATION_ID, correlation_id);
        if let Some(traceparent) = current.traceparent() {
            event = event.with_extension(TRACE_PARENT, traceparent);
        }
        // Not held across an await: pushing is all that happens under the lock.
        self.published.lock().expect("not poisoned").push(event);
    }
}

impl fmt::Debug for HandlerContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerContext")
            .field("event_id", &self.event().id)
            .field("group", &self.delivery.group)
            .finish_non_exhaustive()
    }
}

/// A handler with its data type erased, so handlers of different types share one map.
trait Route: Send + Sync + 'static {
    /// Deserialises the data and starts the handler; fails (permanently) when the data
    /// does not fit.
    fn call(
        &self,
        ctx: HandlerContext,
    ) -> Result<BoxFuture<'static, Result<(), HandlerError>>, HandlerError>;
}

struct Typed<H, T> {
    handler: H,
    // `fn() -> T`: the route stores no `T`, so it is Send and Sync whatever `T` is.
    _data: PhantomData<fn() -> T>,
}

impl<H, T> Route for Typed<H, T>
where
    T: DeserializeOwned + Send + 'static,
    H: Handler<T>,
{
    fn call(
        &self,
        ctx: HandlerContext,
    ) -> Result<BoxFuture<'static, Result<(), HandlerError>>, HandlerError> {
        let event = ctx.event();
        let data = match event.data_as::<T>() {
            Ok(Some(data)) => data,
            Ok(None) => serde_json::from_str("null").map_err(|_| {
                HandlerError::permanent(RouteError::MissingData {
                    ty: event.ty.clone(),
                })
            })?,
            Err(source) => {
                return Err(HandlerError::permanent(RouteError::Data {
                    ty: event.ty.clone(),
                    source,
                }));
            }
        };
        Ok(self.handler.call(data, ctx))
    }
}
