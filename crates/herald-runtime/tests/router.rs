//! The router: typed handlers, publishing through the context, unknown types, bad data.

mod common;

use std::sync::{Arc, Mutex};

use common::{GROUP, delivery, order_placed};
use herald_core::Event;
use herald_runtime::{
    ErrorKind, HandlerContext, HandlerError, Outcome, RouteError, Router, UnknownType,
};
use serde::Deserialize;
use tower::ServiceExt as _;

#[derive(Debug, Clone, PartialEq, Deserialize)]
struct OrderPlaced {
    order_id: String,
    total_cents: u64,
}

async fn charge(order: OrderPlaced, ctx: HandlerContext) -> Result<(), HandlerError> {
    let payment = Event::new("/payments", "PaymentProcessed")
        .with_id("evt-2")
        .with_data(serde_json::json!({ "order_id": order.order_id, "cents": order.total_cents }));
    ctx.publish(payment);
    Ok(())
}

fn route_error(error: &HandlerError) -> &RouteError {
    error.get_ref().downcast_ref::<RouteError>().unwrap()
}

#[tokio::test]
async fn a_typed_handler_gets_its_data_and_the_delivery() {
    let seen = Arc::new(Mutex::new(None));
    let router = Router::new().on::<OrderPlaced, _>("OrderPlaced", {
        let seen = Arc::clone(&seen);
        move |order: OrderPlaced, ctx: HandlerContext| {
            let seen = Arc::clone(&seen);
            async move {
                let partition = ctx.message().partition;
                *seen.lock().unwrap() = Some((order, ctx.group().to_string(), partition));
                Ok(())
            }
        }
    });
    let outcome = router.oneshot(delivery(order_placed())).await.unwrap();
    assert_eq!(outcome, Outcome::Handled { published: vec![] });
    let expected = OrderPlaced {
        order_id: "order-7".to_owned(),
        total_cents: 1250,
    };
    assert_eq!(
        seen.lock().unwrap().take(),
        Some((expected, GROUP.to_owned(), common::PARTITION))
    );
}

#[tokio::test]
async fn published_events_are_caused_by_the_current_event() {
    let router = Router::new().on::<OrderPlaced, _>("OrderPlaced", charge);
    let current = order_placed();
    let Outcome::Handled { published } = router.oneshot(delivery(current.clone())).await.unwrap()
    else {
        panic!("not handled");
    };
    assert_eq!(published.len(), 1);
    let payment = &published[0];
    assert_eq!(payment.ty, "PaymentProcessed");
    assert_eq!(payment.causation_id(), Some(current.id.as_str()));
    assert_eq!(payment.correlation_id(), Some("order-7"));
    assert_eq!(payment.traceparent(), current.traceparent());
    payment.validate().unwrap();
}

#[tokio::test]
async fn without_a_correlation_id_the_current_event_starts_the_flow() {
    let router = Router::new().on::<OrderPlaced, _>("OrderPlaced", charge);
    let current = Event::new("/orders", "OrderPlaced")
        .with_data(serde_json::json!({ "order_id": "order-8", "total_cents": 1 }));
    let Outcome::Handled { published } = router.oneshot(delivery(current.clone())).await.unwrap()
    else {
        panic!("not handled");
    };
    assert_eq!(published[0].causation_id(), Some(current.id.as_str()));
    assert_eq!(published[0].correlation_id(), Some(current.id.as_str()));
    assert_eq!(published[0].traceparent(), None);
}

#[tokio::test]
async fn a_failed_handler_publishes_nothing_and_keeps_its_classification() {
    let router = Router::new().on::<OrderPlaced, _>(
        "OrderPlaced",
        |_: OrderPlaced, ctx: HandlerContext| async move {
            ctx.publish(Event::new("/payments", "PaymentProcessed"));
            Err(HandlerError::transient("payment gateway unavailable"))
        },
    );
    let error = router.oneshot(delivery(order_placed())).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Transient);
    assert_eq!(error.message(), "payment gateway unavailable");
}

#[tokio::test]
async fn data_that_does_not_deserialise_is_a_permanent_error() {
    let router = Router::new().on::<OrderPlaced, _>("OrderPlaced", charge);
    let wrong = order_placed().with_data(serde_json::json!({ "order_id": 7 }));
    let error = router.clone().oneshot(delivery(wrong)).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Permanent);
    assert!(matches!(route_error(&error), RouteError::Data { ty, .. } if ty == "OrderPlaced"));

    let binary = order_placed().with_binary_data("application/octet-stream", vec![1, 2, 3]);
    let error = router.clone().oneshot(delivery(binary)).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Permanent);

    let mut empty = order_placed();
    empty.data = None;
    let error = router.oneshot(delivery(empty)).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Permanent);
    assert!(matches!(
        route_error(&error),
        RouteError::MissingData { .. }
    ));
}

#[tokio::test]
async fn a_handler_of_unit_accepts_events_without_data() {
    let router =
        Router::new().on::<(), _>("OrderShipped", |(), _ctx: HandlerContext| async { Ok(()) });
    let outcome = router
        .oneshot(delivery(Event::new("/orders", "OrderShipped")))
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Handled { published: vec![] });
}

#[tokio::test]
async fn unknown_types_are_skipped_and_counted_by_default() {
    let router = Router::new().on::<OrderPlaced, _>("OrderPlaced", charge);
    for _ in 0..2 {
        let outcome = router
            .clone()
            .oneshot(delivery(Event::new("/orders", "OrderCancelled")))
            .await
            .unwrap();
        assert_eq!(outcome, Outcome::Skipped);
    }
    assert_eq!(router.skipped_count(), 2);
}

#[tokio::test]
async fn unknown_types_can_be_dead_lettered() {
    let router = Router::new()
        .on::<OrderPlaced, _>("OrderPlaced", charge)
        .unknown_type(UnknownType::DeadLetter);
    let error = router
        .clone()
        .oneshot(delivery(Event::new("/orders", "OrderCancelled")))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Permanent);
    assert!(
        matches!(route_error(&error), RouteError::UnknownType { ty } if ty == "OrderCancelled")
    );
    assert_eq!(router.skipped_count(), 0);
}
