//! The default stack: the layers in their documented order, observed from outside.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{clock, delivery, order_placed};
use herald_core::Event;
use herald_runtime::{
    ErrorKind, HandlerContext, HandlerError, Outcome, PipelineOptions, RetryOptions, Router,
    SPAN_NAME,
};
use rand::SeedableRng as _;
use rand::rngs::StdRng;
use tower::ServiceExt as _;

const OPTIONS: PipelineOptions = PipelineOptions {
    timeout_ms: 1_000,
    retry: RetryOptions {
        attempts_max: 3,
        elapsed_max_ms: 60_000,
        delay_initial_ms: 100,
        delay_max_ms: 1_000,
    },
};

#[derive(serde::Deserialize)]
struct OrderPlaced {
    order_id: String,
}

/// The names of the spans the handler's attempts ran in.
type SpansSeen = Arc<Mutex<Vec<Option<&'static str>>>>;

fn router(calls: &Arc<AtomicUsize>, fail_first: usize, how: fn() -> HandlerError) -> Router {
    traced_router(calls, &SpansSeen::default(), fail_first, how)
}

fn traced_router(
    calls: &Arc<AtomicUsize>,
    spans: &SpansSeen,
    fail_first: usize,
    how: fn() -> HandlerError,
) -> Router {
    let calls = Arc::clone(calls);
    let spans = Arc::clone(spans);
    Router::new().on::<OrderPlaced, _>(
        "OrderPlaced",
        move |order: OrderPlaced, ctx: HandlerContext| {
            let call = calls.fetch_add(1, Ordering::SeqCst) + 1;
            let spans = Arc::clone(&spans);
            async move {
                let span = tracing::Span::current().metadata().map(|m| m.name());
                spans.lock().unwrap().push(span);
                if call <= fail_first {
                    return Err(how());
                }
                ctx.publish(
                    Event::new("/payments", "PaymentRequested").with_subject(order.order_id),
                );
                Ok(())
            }
        },
    )
}

fn pipeline(router: Router) -> herald_runtime::Pipeline {
    // Every test here goes through the trace layer: install the subscriber first.
    common::spans();
    OPTIONS.build(router, StdRng::seed_from_u64(1), clock())
}

#[tokio::test(start_paused = true)]
async fn each_attempt_has_its_own_timeout_inside_retry() {
    let calls = Arc::new(AtomicUsize::new(0));
    let hangs = Router::new().on::<OrderPlaced, _>("OrderPlaced", {
        let calls = Arc::clone(&calls);
        move |_: OrderPlaced, _ctx: HandlerContext| {
            let call = calls.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                if call == 1 {
                    tokio::time::sleep(Duration::from_secs(3_600)).await;
                }
                Ok(())
            }
        }
    });
    let outcome = pipeline(hangs)
        .oneshot(delivery(order_placed()))
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Handled { published: vec![] });
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "the timed-out attempt was retried"
    );
}

#[test]
fn one_span_and_one_count_per_delivery_with_the_final_outcome() {
    let capture = common::spans();
    let recorder = common::TestRecorder::default();
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = SpansSeen::default();
    let outcome = common::with_recorder(&recorder, async {
        let router = traced_router(&calls, &seen, usize::MAX, || {
            HandlerError::transient("ledger locked")
        });
        pipeline(router)
            .oneshot(delivery(order_placed().with_id("evt-order")))
            .await
            .unwrap()
    });

    // Dead-letter is outside retry: it sees the failure only once retries ran out.
    let Outcome::DeadLettered(record) = outcome else {
        panic!("not dead-lettered: {outcome:?}");
    };
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(
        (record.attempts, record.error_kind),
        (3, ErrorKind::Transient)
    );

    // Trace is outermost: one span for the three attempts, closed with the final outcome.
    let spans = capture.deliveries_of("evt-order");
    assert_eq!(spans.len(), 1);
    assert_eq!(
        spans[0].fields.get("outcome").map(String::as_str),
        Some("dead_lettered")
    );
    assert_eq!(
        *seen.lock().unwrap(),
        [Some(SPAN_NAME); 3],
        "every attempt ran inside the delivery's span"
    );

    // Metrics is outside dead-letter and retry: one count, by the final outcome.
    assert_eq!(
        recorder.counter_keys(),
        ["herald_events_handled_total{group=billing,outcome=dead_lettered,type=OrderPlaced}"]
    );
    assert_eq!(
        recorder.counter(
            "herald_events_handled_total{group=billing,outcome=dead_lettered,type=OrderPlaced}"
        ),
        1
    );
}

#[tokio::test(start_paused = true)]
async fn a_handler_that_recovers_publishes_once() {
    let calls = Arc::new(AtomicUsize::new(0));
    let router = router(&calls, 2, || HandlerError::transient("ledger locked"));
    let outcome = pipeline(router)
        .oneshot(delivery(order_placed()))
        .await
        .unwrap();
    let Outcome::Handled { published } = outcome else {
        panic!("not handled: {outcome:?}");
    };
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(published.len(), 1, "failed attempts publish nothing");
    assert_eq!(published[0].subject.as_deref(), Some("order-7"));
    assert_eq!(published[0].causation_id(), Some("evt-1"));
}

#[tokio::test(start_paused = true)]
async fn bad_data_is_dead_lettered_without_retry() {
    let calls = Arc::new(AtomicUsize::new(0));
    let router = router(&calls, 0, || HandlerError::transient("unused"));
    let bad = order_placed().with_data(serde_json::json!({ "order": 7 }));
    let outcome = pipeline(router)
        .oneshot(delivery(bad.clone()))
        .await
        .unwrap();
    let Outcome::DeadLettered(record) = outcome else {
        panic!("not dead-lettered: {outcome:?}");
    };
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert_eq!(
        (record.attempts, record.error_kind),
        (1, ErrorKind::Permanent)
    );
    assert_eq!(record.event, bad);
}

#[tokio::test(start_paused = true)]
async fn shutdown_during_retry_abandons_the_delivery() {
    let calls = Arc::new(AtomicUsize::new(0));
    let router = router(&calls, usize::MAX, || {
        HandlerError::transient("ledger locked")
    });
    let delivery = delivery(order_placed());
    delivery.shutdown.cancel();
    let outcome = pipeline(router).oneshot(delivery).await.unwrap();
    assert_eq!(outcome, Outcome::Abandoned);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[test]
fn options_have_defaults_and_reject_unknown_fields() {
    let options: PipelineOptions =
        serde_json::from_str(r#"{ "timeout_ms": 5000, "retry": { "attempts_max": 2 } }"#).unwrap();
    assert_eq!(options.timeout_ms, 5_000);
    assert_eq!(options.retry.attempts_max, 2);
    assert_eq!(
        options.retry.delay_max_ms,
        RetryOptions::default().delay_max_ms
    );
    assert!(serde_json::from_str::<PipelineOptions>(r#"{ "timeout": 1 }"#).is_err());
    let defaults: PipelineOptions = serde_json::from_str("{}").unwrap();
    assert_eq!(defaults, PipelineOptions::default());
    assert_eq!(
        defaults.timeout_ms, 30_000,
        "a handler gets a usable timeout by default"
    );
}
