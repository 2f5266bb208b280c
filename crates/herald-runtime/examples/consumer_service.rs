//! A complete consumer service on the embedded default, to copy from.
//!
//! The billing service charges every `OrderPlaced` event of the topic `orders` and
//! announces each charge as a `PaymentProcessed` event on the topic `payments`:
//!
//! - a **typed handler** receives the event's `data` as `OrderPlaced`;
//! - a gateway timeout is a **transient** error, retried with exponential backoff;
//!   an order of 0 cents is a **permanent** error, dead-lettered at once;
//! - **dead letters** are kept in the log (`herald dlq ls --group billing` lists them);
//! - the **idempotency** layer records each handled event, so a redelivered order is not
//!   charged twice and its `PaymentProcessed` is not published twice;
//! - Ctrl-C (or SIGTERM) starts a **graceful shutdown**: in-flight charges finish, their
//!   messages are acked, offsets are committed, the log is closed.
//!
//! ```text
//! cargo run -p herald-runtime --example consumer_service -- ./herald-data --demo
//! ```
//!
//! `--demo` publishes three orders first (one charged, one flaky, one invalid).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::Context as _;
use herald_core::Event;
use herald_core::broker::{GroupName, Publisher as _, TopicName};
use herald_log::broker::{Broker, BrokerOptions};
use herald_log::{Log, Options};
use herald_runtime::consumer::Report;
use herald_runtime::{
    ConsumerOptions, EventStoreDeadLetters, EventStoreIdempotency, HandlerContext, HandlerError,
    PipelineOptions, Router, SystemClock,
};
use rand::SeedableRng as _;
use rand::rngs::StdRng;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

/// The event this service reacts to.
#[derive(Debug, Deserialize)]
struct OrderPlaced {
    order_id: String,
    total_cents: u64,
}

/// A payment gateway that times out on its first two calls for the order `flaky`.
#[derive(Default)]
struct Gateway {
    flaky_calls: AtomicU32,
}

impl Gateway {
    async fn charge(&self, order: &OrderPlaced) -> Result<String, HandlerError> {
        if order.order_id == "flaky" && self.flaky_calls.fetch_add(1, Ordering::SeqCst) < 2 {
            return Err(HandlerError::transient("payment gateway timed out"));
        }
        Ok(format!("charge-{}", order.order_id))
    }
}

async fn on_order_placed(
    gateway: Arc<Gateway>,
    order: OrderPlaced,
    ctx: HandlerContext,
) -> Result<(), HandlerError> {
    if order.total_cents == 0 {
        return Err(HandlerError::permanent(
            "an order of 0 cents cannot be charged",
        ));
    }
    let charge_id = gateway.charge(&order).await?;
    // Published after the handler returns; `causationid` and `correlationid` are set.
    ctx.publish(
        Event::new("/billing", "PaymentProcessed")
            .with_partition_key(order.order_id.as_str())
            .with_data(serde_json::json!({
                "order_id": order.order_id,
                "charge_id": charge_id,
                "amount_cents": order.total_cents,
            })),
    );
    Ok(())
}

/// Runs the billing service on `log` until `shutdown` is cancelled, then closes the log.
pub(crate) async fn run(
    log: Log,
    demo: bool,
    shutdown: CancellationToken,
) -> anyhow::Result<Report> {
    let broker = Broker::new(log.clone(), BrokerOptions::default());
    let orders = TopicName::new("orders")?;
    if demo {
        let order = |id: &str, cents: u64| {
            Event::new("/shop", "OrderPlaced")
                .with_id(format!("order-placed-{id}"))
                .with_partition_key(id)
                .with_data(serde_json::json!({ "order_id": id, "total_cents": cents }))
        };
        let demo_orders = vec![order("o-1", 4_200), order("flaky", 990), order("free", 0)];
        broker.publish(&orders, demo_orders).await?;
    }

    let gateway = Arc::new(Gateway::default());
    let router = Router::new().on::<OrderPlaced, _>("OrderPlaced", move |order, ctx| {
        on_order_placed(Arc::clone(&gateway), order, ctx)
    });
    let pipeline = PipelineOptions::default().build_idempotent(
        router,
        Arc::new(EventStoreIdempotency::new(Arc::new(log.clone()))),
        StdRng::from_entropy(),
        Arc::new(SystemClock),
    );
    let consumer = ConsumerOptions {
        publish_topic: Some("payments".to_owned()),
        ..ConsumerOptions::default()
    }
    .build(
        Arc::new(broker.clone()),
        Arc::new(broker.clone()),
        Arc::new(EventStoreDeadLetters::new(Arc::new(log.clone()))),
        orders,
        GroupName::new("billing")?,
        pipeline,
    )?;
    let report = consumer.run(shutdown).await;
    // Whatever the consumer did, stop the broker's commit tasks and close the log cleanly.
    broker.shutdown().await;
    log.close().await.context("cannot close the log")?;
    Ok(report?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let mut args = std::env::args().skip(1);
    let data_dir = args.next().unwrap_or_else(|| "herald-data".to_owned());
    let demo = args.next().as_deref() == Some("--demo");

    let shutdown = CancellationToken::new();
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            shutdown_signal().await;
            tracing::info!("shutting down: finishing the charges in flight");
            shutdown.cancel();
        }
    });
    let log = Log::open(Options::new(&data_dir))
        .with_context(|| format!("cannot open the log in {data_dir}"))?;
    tracing::info!(data_dir, "billing service running; Ctrl-C stops it");
    let report = run(log, demo, shutdown).await?;
    tracing::info!(?report, "billing service stopped");
    Ok(())
}

/// Ctrl-C, or SIGTERM as a service manager sends it.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("a SIGTERM handler can be installed");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
