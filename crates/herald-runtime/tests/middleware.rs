//! Each middleware layer on its own, around a scripted inner service, under paused time.

mod common;

use std::time::Duration;

use common::{Calls, clock, delivery, epoch, order_placed};
use herald_core::Event;
use herald_runtime::{
    DeadLetterLayer, Delivery, ErrorKind, Failure, HandlerError, MetricsLayer, Outcome, RetryLayer,
    RetryOptions, SPAN_NAME, TimedOut, TimeoutLayer, TraceLayer,
};
use rand::SeedableRng as _;
use rand::rngs::StdRng;
use tower::{Layer as _, ServiceExt as _};

type Script = Box<dyn Fn(usize) -> Result<Outcome, HandlerError> + Send + Sync>;

/// An inner service answering its `n`th call (from 1) with `script(n)`, recording each call.
fn scripted(
    calls: &Calls,
    script: impl Fn(usize) -> Result<Outcome, HandlerError> + Send + Sync + 'static,
) -> tower::util::ServiceFn<
    impl FnMut(Delivery) -> std::future::Ready<Result<Outcome, HandlerError>> + Clone + Send + 'static,
> {
    let calls = calls.clone();
    let script: std::sync::Arc<Script> = std::sync::Arc::new(Box::new(script));
    tower::service_fn(move |_delivery: Delivery| std::future::ready(script(calls.record())))
}

fn handled() -> Result<Outcome, HandlerError> {
    Ok(Outcome::Handled { published: vec![] })
}

fn unavailable(_: usize) -> Result<Outcome, HandlerError> {
    Err(HandlerError::transient("inventory service unavailable"))
}

fn retry_options(attempts_max: u32, delay_initial_ms: u64, delay_max_ms: u64) -> RetryOptions {
    RetryOptions {
        attempts_max,
        elapsed_max_ms: 3_600_000,
        delay_initial_ms,
        delay_max_ms,
    }
}

fn retry_layer(options: RetryOptions, seed: u64) -> RetryLayer {
    RetryLayer::new(options, StdRng::seed_from_u64(seed), clock())
}

mod timeout {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_attempt_that_runs_too_long_fails_as_transient() {
        let slow = tower::service_fn(|_: Delivery| async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            handled()
        });
        let started = tokio::time::Instant::now();
        let error = TimeoutLayer::new(1_000)
            .layer(slow)
            .oneshot(delivery(order_placed()))
            .await
            .unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Transient);
        assert_eq!(
            error.get_ref().downcast_ref::<TimedOut>(),
            Some(&TimedOut { timeout_ms: 1_000 })
        );
        assert_eq!(error.to_string(), "handler timed out after 1000 ms");
        assert_eq!(started.elapsed(), Duration::from_millis(1_000));
    }

    #[tokio::test(start_paused = true)]
    async fn an_attempt_within_the_timeout_is_untouched() {
        let quick = tower::service_fn(|_: Delivery| async {
            tokio::time::sleep(Duration::from_millis(999)).await;
            Err::<Outcome, _>(HandlerError::permanent("bad order"))
        });
        let error = TimeoutLayer::new(1_000)
            .layer(quick)
            .oneshot(delivery(order_placed()))
            .await
            .unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Permanent);
        assert_eq!(error.message(), "bad order");
    }
}

mod retry {
    use super::*;

    async fn run(
        layer: RetryLayer,
        calls: &Calls,
        script: fn(usize) -> Result<Outcome, HandlerError>,
    ) -> Result<Outcome, Failure> {
        layer
            .layer(scripted(calls, script))
            .oneshot(delivery(order_placed()))
            .await
    }

    #[tokio::test(start_paused = true)]
    async fn delays_follow_the_jittered_exponential_schedule() {
        let options = retry_options(7, 100, 800);
        let calls = Calls::default();
        let failure = run(retry_layer(options, 7), &calls, unavailable)
            .await
            .unwrap_err();
        assert_eq!(failure.attempts, 7);

        let ceilings: Vec<u64> = (1..=6)
            .map(|retry| options.delay_ceiling_ms(retry))
            .collect();
        assert_eq!(
            ceilings,
            [100, 200, 400, 800, 800, 800],
            "doubling, then capped"
        );
        let gaps = calls.gaps_ms();
        assert_eq!(gaps.len(), 6);
        for (gap, ceiling) in gaps.iter().zip(&ceilings) {
            assert!(
                gap <= ceiling,
                "delay {gap} ms above its ceiling {ceiling} ms"
            );
        }
        // The same seed gives the same schedule: the delays are the generator's draws.
        let mut rng = StdRng::seed_from_u64(7);
        let expected: Vec<u64> = (1..=6)
            .map(|retry| options.delay_ms(retry, &mut rng))
            .collect();
        assert_eq!(gaps, expected);
    }

    #[tokio::test(start_paused = true)]
    async fn stops_after_attempts_max() {
        let calls = Calls::default();
        let failure = run(
            retry_layer(retry_options(3, 10, 100), 1),
            &calls,
            unavailable,
        )
        .await
        .unwrap_err();
        assert_eq!(calls.count(), 3);
        assert_eq!(failure.attempts, 3);
        assert!(!failure.abandoned);
        assert_eq!(failure.error.kind(), ErrorKind::Transient);
        assert_eq!(failure.error.message(), "inventory service unavailable");
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_max_of_one_never_retries() {
        let calls = Calls::default();
        let failure = run(
            retry_layer(retry_options(1, 10, 100), 1),
            &calls,
            unavailable,
        )
        .await
        .unwrap_err();
        assert_eq!((calls.count(), failure.attempts), (1, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn no_attempt_starts_after_elapsed_max() {
        let options = RetryOptions {
            attempts_max: 1_000,
            elapsed_max_ms: 2_500,
            delay_initial_ms: 1_000,
            delay_max_ms: 1_000,
        };
        let calls = Calls::default();
        let started = tokio::time::Instant::now();
        let failure = run(retry_layer(options, 3), &calls, unavailable)
            .await
            .unwrap_err();
        let budget = Duration::from_millis(2_500);
        assert!(
            started.elapsed() <= budget,
            "gave up after {:?}",
            started.elapsed()
        );
        for time in calls.times() {
            assert!(time - started <= budget);
        }
        assert!(
            calls.count() > 1 && calls.count() < 1_000,
            "{} calls",
            calls.count()
        );
        assert_eq!(failure.attempts as usize, calls.count());
        assert!(!failure.abandoned);
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_errors_are_not_retried() {
        let calls = Calls::default();
        let failure = run(retry_layer(retry_options(5, 10, 100), 1), &calls, |_| {
            Err(HandlerError::permanent("order total is negative"))
        })
        .await
        .unwrap_err();
        assert_eq!(calls.count(), 1);
        assert_eq!(failure.attempts, 1);
        assert_eq!(failure.error.kind(), ErrorKind::Permanent);
    }

    #[tokio::test(start_paused = true)]
    async fn succeeds_once_a_transient_failure_clears() {
        let calls = Calls::default();
        let outcome = run(retry_layer(retry_options(5, 10, 100), 1), &calls, |n| {
            if n < 3 { unavailable(n) } else { handled() }
        })
        .await
        .unwrap();
        assert_eq!(outcome, Outcome::Handled { published: vec![] });
        assert_eq!(calls.count(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_stops_the_wait_at_once() {
        let calls = Calls::default();
        let delivery = delivery(order_placed());
        let shutdown = delivery.shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            shutdown.cancel();
        });
        let started = tokio::time::Instant::now();
        // Delays of up to a minute: only the shutdown can end this within 10 ms.
        let failure = retry_layer(retry_options(100, 60_000, 60_000), 5)
            .layer(scripted(&calls, unavailable))
            .oneshot(delivery)
            .await
            .unwrap_err();
        assert!(failure.abandoned);
        assert_eq!(failure.error.kind(), ErrorKind::Transient);
        assert_eq!(started.elapsed(), Duration::from_millis(10));
    }

    #[tokio::test(start_paused = true)]
    async fn no_retry_starts_after_shutdown() {
        let calls = Calls::default();
        let delivery = delivery(order_placed());
        delivery.shutdown.cancel();
        let failure = retry_layer(retry_options(100, 60_000, 60_000), 5)
            .layer(scripted(&calls, unavailable))
            .oneshot(delivery)
            .await
            .unwrap_err();
        assert!(failure.abandoned);
        assert_eq!((calls.count(), failure.attempts), (1, 1));
    }
}

mod dead_letter {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn exhausted_retries_give_a_complete_record() {
        let calls = Calls::default();
        let event = order_placed();
        let pipeline = DeadLetterLayer::new(clock()).layer(
            retry_layer(retry_options(3, 1_000, 10_000), 11).layer(scripted(&calls, unavailable)),
        );
        let outcome = pipeline.oneshot(delivery(event.clone())).await.unwrap();
        let Outcome::DeadLettered(record) = outcome else {
            panic!("not dead-lettered: {outcome:?}");
        };
        let waited_ms: u64 = calls.gaps_ms().iter().sum();
        assert_eq!(record.event, event, "the event is kept unchanged");
        assert_eq!(record.reason, "inventory service unavailable");
        assert_eq!(record.error_kind, ErrorKind::Transient);
        assert_eq!(record.attempts, 3);
        assert_eq!(record.handler, "OrderPlaced");
        assert_eq!(record.group.as_str(), common::GROUP);
        assert_eq!(record.topic.as_str(), common::TOPIC);
        assert_eq!(record.partition, common::PARTITION);
        assert_eq!(record.offset, common::OFFSET);
        assert_eq!(record.first_failure_at, epoch());
        assert_eq!(
            record.last_failure_at,
            epoch() + chrono::Duration::milliseconds(waited_ms as i64)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_permanent_error_is_dead_lettered_at_once() {
        let calls = Calls::default();
        let pipeline = DeadLetterLayer::new(clock()).layer(
            retry_layer(retry_options(5, 1_000, 10_000), 1).layer(scripted(&calls, |_| {
                Err(HandlerError::permanent("unknown sku"))
            })),
        );
        let Outcome::DeadLettered(record) =
            pipeline.oneshot(delivery(order_placed())).await.unwrap()
        else {
            panic!("not dead-lettered");
        };
        assert_eq!(calls.count(), 1);
        assert_eq!(
            (record.error_kind, record.attempts),
            (ErrorKind::Permanent, 1)
        );
        assert_eq!(record.reason, "unknown sku");
        assert_eq!(record.first_failure_at, record.last_failure_at);
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_delivery_is_not_dead_lettered() {
        let calls = Calls::default();
        let delivery = delivery(order_placed());
        delivery.shutdown.cancel();
        let pipeline = DeadLetterLayer::new(clock()).layer(
            retry_layer(retry_options(5, 1_000, 10_000), 1).layer(scripted(&calls, unavailable)),
        );
        assert_eq!(
            pipeline.oneshot(delivery).await.unwrap(),
            Outcome::Abandoned
        );
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_retry_layer_the_failure_is_timed_by_the_clock() {
        let clock = clock();
        tokio::time::advance(Duration::from_secs(5)).await;
        let calls = Calls::default();
        let pipeline = DeadLetterLayer::new(clock).layer(scripted(&calls, unavailable));
        let Outcome::DeadLettered(record) =
            pipeline.oneshot(delivery(order_placed())).await.unwrap()
        else {
            panic!("not dead-lettered");
        };
        assert_eq!(record.attempts, 1);
        assert_eq!(
            record.first_failure_at,
            epoch() + chrono::Duration::seconds(5)
        );
        assert_eq!(record.last_failure_at, record.first_failure_at);
    }

    #[tokio::test(start_paused = true)]
    async fn success_passes_through() {
        let calls = Calls::default();
        let published = vec![Event::new("/payments", "PaymentProcessed")];
        let answer = published.clone();
        let pipeline = DeadLetterLayer::new(clock()).layer(scripted(&calls, move |_| {
            Ok(Outcome::Handled {
                published: answer.clone(),
            })
        }));
        let outcome = pipeline.oneshot(delivery(order_placed())).await.unwrap();
        assert_eq!(outcome, Outcome::Handled { published });
    }
}

mod trace {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_span_per_delivery_names_the_event_and_its_lineage() {
        let capture = common::spans();
        let calls = Calls::default();
        let outcome = TraceLayer::new()
            .layer(scripted(&calls, |_| handled()))
            .oneshot(delivery(order_placed().with_id("evt-traced")))
            .await
            .unwrap();
        assert_eq!(outcome, Outcome::Handled { published: vec![] });

        let spans = capture.deliveries_of("evt-traced");
        assert_eq!(spans.len(), 1);
        assert_eq!(spans[0].name, SPAN_NAME);
        let fields = &spans[0].fields;
        let field = |name: &str| fields.get(name).map(String::as_str);
        assert_eq!(field("event.type"), Some("OrderPlaced"));
        assert_eq!(field("correlation_id"), Some("order-7"));
        assert_eq!(field("causation_id"), Some("cmd-0"));
        assert_eq!(field("group"), Some(common::GROUP));
        assert_eq!(field("topic"), Some(common::TOPIC));
        assert_eq!(field("partition"), Some("3"));
        assert_eq!(field("offset"), Some("42"));
        assert_eq!(field("attempt"), Some("1"));
        assert_eq!(field("outcome"), Some("handled"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_is_recorded_as_the_outcome() {
        let capture = common::spans();
        let calls = Calls::default();
        let error = TraceLayer::new()
            .layer(scripted(&calls, unavailable))
            .oneshot(delivery(
                Event::new("/orders", "OrderPlaced").with_id("evt-trace-failed"),
            ))
            .await
            .unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Transient);
        let spans = capture.deliveries_of("evt-trace-failed");
        assert_eq!(
            spans[0].fields.get("outcome").map(String::as_str),
            Some("failed")
        );
        assert!(
            !spans[0].fields.contains_key("correlation_id"),
            "absent ids stay empty"
        );
    }
}

mod metrics {
    use super::*;

    const HANDLED: &str =
        "herald_events_handled_total{group=billing,outcome=handled,type=OrderPlaced}";
    const SKIPPED: &str =
        "herald_events_handled_total{group=billing,outcome=skipped,type=OrderPlaced}";
    const FAILED: &str =
        "herald_events_handled_total{group=billing,outcome=failed,type=OrderPlaced}";
    const DURATION: &str = "herald_handler_duration_seconds{group=billing,type=OrderPlaced}";

    #[test]
    fn counts_outcomes_and_times_handling() {
        let recorder = common::TestRecorder::default();
        common::with_recorder(&recorder, async {
            let answers = [
                Outcome::Handled { published: vec![] },
                Outcome::Handled { published: vec![] },
                Outcome::Skipped,
            ];
            for answer in answers {
                let slow = tower::service_fn(move |_: Delivery| {
                    let answer = answer.clone();
                    async move {
                        tokio::time::sleep(Duration::from_millis(250)).await;
                        Ok::<_, HandlerError>(answer)
                    }
                });
                MetricsLayer::new()
                    .layer(slow)
                    .oneshot(delivery(order_placed()))
                    .await
                    .unwrap();
            }
            let calls = Calls::default();
            MetricsLayer::new()
                .layer(scripted(&calls, unavailable))
                .oneshot(delivery(order_placed()))
                .await
                .unwrap_err();
        });
        assert_eq!(recorder.counter(HANDLED), 2);
        assert_eq!(recorder.counter(SKIPPED), 1);
        assert_eq!(recorder.counter(FAILED), 1);
        assert_eq!(recorder.samples(DURATION), [0.25, 0.25, 0.25, 0.0]);
    }
}
