//! Power loss, simulated through the I/O layer: everything not synced is lost and the last
//! unsynced write may be torn. Over many seeds, with concurrent writers interrupted at a
//! random moment, every acknowledged event survives exactly once, nothing unacknowledged
//! appears half-written, and no append is ever partly visible.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use herald_core::{Event, EventStore, ExpectedVersion, StreamName};
use herald_log::Log;
use herald_log::io::Io;
use herald_log::io::sim::SimIo;
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;

const SEEDS: u64 = 120;
const WRITERS: usize = 4;
const CRASHES_PER_SEED: usize = 3;

/// What the writers attempted and what was acknowledged.
#[derive(Default)]
struct Ledger {
    /// Every attempted append: its event ids.
    batches: Vec<Vec<String>>,
    /// Events as attempted, by id.
    events: HashMap<String, Event>,
    /// Ids of acknowledged events.
    acked: HashSet<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_appends_survive_power_loss() {
    for seed in 0..SEEDS {
        run_seed(seed).await;
    }
}

async fn run_seed(seed: u64) {
    let dir = std::path::Path::new("/sim/data");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut sim = SimIo::new();
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    for crash in 0..CRASHES_PER_SEED {
        let io: Arc<dyn Io> = Arc::new(sim.clone());
        let log = Log::open_with_io(common::options(dir), io)
            .unwrap_or_else(|error| panic!("seed {seed}, crash {crash}: reopen failed: {error}"));
        verify(&log, &ledger, seed).await;

        // Writers append until the crash; the test crashes after a random number of acks.
        let (acks, mut ack_count) = watch::channel(0usize);
        let acks = Arc::new(acks);
        let mut tasks = Vec::new();
        for writer in 0..WRITERS {
            let log = log.clone();
            let ledger = ledger.clone();
            let acks = acks.clone();
            let mut rng = StdRng::seed_from_u64(seed * 1000 + crash as u64 * 10 + writer as u64);
            tasks.push(tokio::spawn(async move {
                loop {
                    let stream =
                        StreamName::new(format!("stream-{}", rng.gen_range(0..3))).unwrap();
                    let size = rng.gen_range(1..=8);
                    let events: Vec<Event> = (0..size)
                        .map(|_| {
                            Event::new("/power-loss", "Written").with_data(
                                serde_json::json!({ "pad": "p".repeat(rng.gen_range(0..300)) }),
                            )
                        })
                        .collect();
                    {
                        let mut ledger = ledger.lock();
                        ledger
                            .batches
                            .push(events.iter().map(|event| event.id.clone()).collect());
                        for event in &events {
                            ledger.events.insert(event.id.clone(), event.clone());
                        }
                    }
                    let ids: Vec<String> = events.iter().map(|event| event.id.clone()).collect();
                    match log.append(&stream, ExpectedVersion::Any, events).await {
                        Ok(_) => {
                            ledger.lock().acked.extend(ids);
                            acks.send_modify(|count| *count += 1);
                        }
                        // After the crash the old process's I/O fails: the writer stops.
                        Err(_) => return,
                    }
                }
            }));
        }
        let crash_after = rng.gen_range(1..60);
        ack_count
            .wait_for(|count| *count >= crash_after)
            .await
            .expect("writers are running");
        // Acks counted from here on may or may not survive; only the ones before count.
        let acked_before_crash = ledger.lock().acked.clone();
        sim = sim.crash(seed * 31 + crash as u64);
        for task in tasks {
            task.await.expect("writer task");
        }
        ledger.lock().acked = acked_before_crash;
    }
    let io: Arc<dyn Io> = Arc::new(sim.clone());
    let log = Log::open_with_io(common::options(dir), io).expect("final reopen");
    verify(&log, &ledger, seed).await;
}

/// Checks the log against the ledger.
async fn verify(log: &Log, ledger: &Mutex<Ledger>, seed: u64) {
    let all = common::read_everything(log).await;
    let ledger = ledger.lock();
    let mut seen = HashSet::new();
    let mut versions: HashMap<StreamName, u64> = HashMap::new();
    for (n, recorded) in all.iter().enumerate() {
        assert_eq!(
            recorded.position.0, n as u64,
            "seed {seed}: positions are contiguous"
        );
        let id = &recorded.event.id;
        assert!(
            seen.insert(id.clone()),
            "seed {seed}: event {id} stored twice"
        );
        let attempted = ledger
            .events
            .get(id)
            .unwrap_or_else(|| panic!("seed {seed}: unknown event {id}"));
        assert_eq!(
            &recorded.event, attempted,
            "seed {seed}: event {id} stored intact"
        );
        let next = versions.entry(recorded.stream.clone()).or_insert(0);
        assert_eq!(
            recorded.version.0, *next,
            "seed {seed}: versions of {} are contiguous",
            recorded.stream
        );
        *next += 1;
    }
    for id in &ledger.acked {
        assert!(
            seen.contains(id),
            "seed {seed}: acknowledged event {id} was lost"
        );
    }
    for batch in &ledger.batches {
        let present = batch.iter().filter(|id| seen.contains(*id)).count();
        assert!(
            present == 0 || present == batch.len(),
            "seed {seed}: an append is partly visible ({present} of {})",
            batch.len()
        );
    }
}
