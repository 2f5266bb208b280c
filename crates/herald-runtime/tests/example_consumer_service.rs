//! The example consumer service (`examples/consumer_service.rs`) does what its
//! documentation says: charges, retries the flaky order, dead-letters the invalid one, and
//! shuts down gracefully.

#![allow(dead_code, missing_docs, unreachable_pub)]

#[path = "../examples/consumer_service.rs"]
mod example;

use std::sync::Arc;

use futures::StreamExt as _;
use herald_core::broker::GroupName;
use herald_core::{EventStore as _, Position};
use herald_log::{Log, Options};
use herald_runtime::{DeadLetterStore as _, EventStoreDeadLetters};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_service_charges_retries_dead_letters_and_shuts_down() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(Options::new(dir.path())).unwrap();
    let mut everything = log.subscribe_all(Position(0)).await.unwrap();
    let shutdown = CancellationToken::new();
    let service = tokio::spawn(example::run(log.clone(), true, shutdown.clone()));

    // Wait for both charges to be announced and the free order to be dead-lettered.
    let mut payments = Vec::new();
    let mut dead_letters = 0;
    while payments.len() < 2 || dead_letters < 1 {
        let recorded = everything.next().await.unwrap().unwrap();
        match recorded.event.ty.as_str() {
            "PaymentProcessed" => payments.push(recorded.event),
            "herald.dead_letter.stored" => dead_letters += 1,
            _ => {}
        }
    }
    shutdown.cancel();
    let report = service.await.unwrap().unwrap();
    assert_eq!((report.handled, report.dead_lettered), (2, 1));
    assert_eq!((report.abandoned, report.held), (0, 0));

    let mut charged: Vec<_> = payments
        .iter()
        .map(|event| event.causation_id().unwrap().to_owned())
        .collect();
    charged.sort();
    assert_eq!(charged, ["order-placed-flaky", "order-placed-o-1"]);

    let log = Log::open(Options::new(dir.path())).unwrap();
    let store = EventStoreDeadLetters::new(Arc::new(log.clone()));
    let billing = GroupName::new("billing").unwrap();
    let dead_letter = store
        .get(&billing, "order-placed-free")
        .await
        .unwrap()
        .expect("the free order is a dead letter");
    assert_eq!(dead_letter.reason, "an order of 0 cents cannot be charged");
    assert_eq!(dead_letter.attempts, 1, "permanent: not retried");
    log.close().await.unwrap();
}
