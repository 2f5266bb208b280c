//! Places orders in process, `concurrency` at a time, and prints how fast they settle.
//!
//! ```text
//! cargo run --release -p herald-orders --example orders_load -- [orders] [concurrency] [fsync|os]
//! ```
//!
//! A rough gauge for development; `herald bench orders` is the benchmark of record.

use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_log::{Durability as LogDurability, Log, Options};
use herald_orders::{Durability, OrderRequest, OrderStatus, SystemOptions};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_default_env() {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .init();
    }
    let mut args = std::env::args().skip(1);
    let orders: usize = args.next().map_or(Ok(2_000), |n| n.parse())?;
    let concurrency: usize = args.next().map_or(Ok(256), |n| n.parse())?;
    let os = args.next().as_deref() == Some("os");

    let dir = tempfile::tempdir()?;
    let mut log_options = Options::new(dir.path());
    if os {
        log_options.durability = LogDurability::Os;
    }
    let log = Log::open(log_options)?;
    let mut options = SystemOptions {
        data_dir: dir.path().to_owned(),
        ..SystemOptions::default()
    };
    if os {
        options.db.durability = Durability::Os;
    }
    let system = options.build(log.clone()).await?;
    let handle = system.handle();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(system.run(shutdown.clone()));

    let customers = [
        "cust-alice",
        "cust-bob",
        "cust-carol",
        "cust-grace",
        "cust-dave",
    ];
    let products = [
        "prod-mouse",
        "prod-keyboard",
        "prod-webcam",
        "prod-notebook",
        "prod-gpu",
    ];
    let permits = Arc::new(Semaphore::new(concurrency));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..orders {
        let permit = Arc::clone(&permits).acquire_owned().await?;
        let handle = handle.clone();
        let request: OrderRequest = serde_json::from_value(serde_json::json!({
            "customerId": customers[n % customers.len()],
            "items": [{ "productId": products[n % products.len()], "quantity": 1 + n % 3 }],
            "shippingAddress": "1 Main St",
            "paymentMethod": if n % 50 == 0 { "card_declined" } else { "card" },
        }))?;
        tasks.spawn(async move {
            let placed_at = Instant::now();
            let order = handle.place(request, None).await.expect("placed");
            let order = handle
                .wait_settled(&order.order_id, Duration::from_secs(60))
                .await
                .expect("waited")
                .expect("exists");
            drop(permit);
            (order.status, placed_at.elapsed())
        });
    }
    let mut latencies = Vec::with_capacity(orders);
    let mut pending = 0;
    while let Some(done) = tasks.join_next().await {
        let (status, latency) = done?;
        if status == OrderStatus::Pending {
            pending += 1;
        }
        latencies.push(latency);
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    println!(
        "{{\"orders\":{orders},\"concurrency\":{concurrency},\"durability\":\"{}\",\"orders_per_sec\":{:.0},\"p50_ms\":{:.1},\"p99_ms\":{:.1},\"pending\":{pending}}}",
        if os { "os" } else { "fsync" },
        orders as f64 / elapsed.as_secs_f64(),
        at(0.50).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3,
    );
    handle.wait_idle(Duration::from_secs(120)).await?;
    let report = handle.check_invariants().await?;
    eprintln!("{report}");
    shutdown.cancel();
    task.await??;
    log.close().await?;
    Ok(())
}
