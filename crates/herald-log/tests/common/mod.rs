//! Helpers shared by the log's integration tests.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::path::Path;
use std::sync::Arc;

use herald_core::{Direction, Event, EventStore, Position, RecordedEvent};
use herald_log::io::Io;
use herald_log::{Log, Options};

pub fn options(dir: &Path) -> Options {
    let mut options = Options::new(dir);
    options.segment_size_max_bytes = 64 * 1024;
    options.append_size_max_bytes = 32 * 1024;
    options.index_checkpoint_interval_events = 50;
    options
}

pub fn open(io: &Arc<dyn Io>, dir: &Path) -> Log {
    Log::open_with_io(options(dir), io.clone()).expect("the log opens")
}

pub fn event(n: usize) -> Event {
    Event::new("/test", "TestEvent")
        .with_id(format!("event-{n}"))
        .with_data(serde_json::json!({ "n": n, "pad": "x".repeat(n % 200) }))
}

pub async fn read_everything(log: &Log) -> Vec<RecordedEvent> {
    let mut all = Vec::new();
    loop {
        let from = Position(all.len() as u64);
        let page = log
            .read_all(from, Direction::Forward, 1000)
            .await
            .expect("read_all");
        if page.is_empty() {
            return all;
        }
        all.extend(page);
    }
}
