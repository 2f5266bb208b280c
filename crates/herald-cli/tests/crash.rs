//! Crash safety of the embedded log: `kill -9` a writing process, over and over, in one data
//! directory, and check after each kill that nothing acknowledged was lost and nothing
//! half-written became visible.
//!
//! The writer is `herald debug crash-writer`: several tasks append batches of 1 to 20 events
//! to a handful of streams and print a line per acknowledged append. The test reads a random
//! number of those lines (reading them is the only synchronisation), kills the writer with
//! SIGKILL, then opens the log in this process and checks:
//!
//! - every acknowledged event is stored exactly once, at the stream, version and position
//!   its acknowledgement gave;
//! - positions are contiguous from 0, and so is every stream's versions;
//! - every batch is all there or not at all: as many events carry its `batchid` as its
//!   `batchsize` says, in one stream, at consecutive positions and versions;
//! - `read_stream` agrees with `read_all`, and `head` is the last position.
//!
//! `HERALD_CRASH_SEED` replays a run (the seed is printed); `HERALD_CRASH_CYCLES` changes the
//! number of kills.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use herald_core::{Direction, EventStore as _, ExtensionValue, Position, RecordedEvent, Version};
use herald_log::{Log, Options};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde::Deserialize;

mod common;

use common::{PAGE_LEN, env_or, herald_command, read_all, runtime_multi_thread, spawn_lines};

/// Kills per run, unless `HERALD_CRASH_CYCLES` says otherwise.
const CYCLES_DEFAULT: usize = 50;
/// The most acknowledgements read before a kill.
const ACKS_BEFORE_KILL_MAX: usize = 40;
/// A hang guard, not a synchronisation: how long one acknowledgement may take to arrive.
const ACK_WAIT_MAX: Duration = Duration::from_secs(120);

/// One line of `herald debug crash-writer`.
#[derive(Debug, Deserialize)]
struct AckLine {
    stream: String,
    batchid: String,
    batchsize: usize,
    events: Vec<AckedEvent>,
}

/// One acknowledged event of an [`AckLine`].
#[derive(Debug, Clone, Deserialize)]
struct AckedEvent {
    id: String,
    version: u64,
    position: u64,
}

/// Where an acknowledgement said an event was stored.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stored {
    stream: String,
    batchid: String,
    version: u64,
    position: u64,
}

#[test]
fn acknowledged_appends_survive_kill_9() {
    let seed = env_or("HERALD_CRASH_SEED", 0x5EED_C0FF_EE00);
    let cycles = env_or("HERALD_CRASH_CYCLES", CYCLES_DEFAULT as u64) as usize;
    eprintln!("crash test: seed {seed} (set HERALD_CRASH_SEED to replay), {cycles} cycles");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime_multi_thread();
    let mut acknowledged: HashMap<String, Stored> = HashMap::new();
    let mut acks_total = 0;

    for cycle in 0..cycles {
        // Zero sometimes: a kill while the writer is still opening (recovering) the log.
        let acks_wanted = if rng.gen_ratio(1, 10) {
            0
        } else {
            rng.gen_range(1..=ACKS_BEFORE_KILL_MAX)
        };
        let writer_seed = rng.r#gen::<u32>();
        let acks = run_and_kill(dir.path(), writer_seed, acks_wanted, cycle);
        acks_total += acks.len();
        for ack in acks {
            assert_eq!(ack.events.len(), ack.batchsize, "cycle {cycle}: {ack:?}");
            for event in ack.events {
                let stored = Stored {
                    stream: ack.stream.clone(),
                    batchid: ack.batchid.clone(),
                    version: event.version,
                    position: event.position,
                };
                let previous = acknowledged.insert(event.id.clone(), stored);
                assert!(
                    previous.is_none(),
                    "cycle {cycle}: event {} acknowledged twice",
                    event.id
                );
            }
        }
        runtime.block_on(verify(dir.path(), &acknowledged, cycle));
    }
    eprintln!(
        "crash test: {cycles} kills, {acks_total} acknowledged appends, {} acknowledged events",
        acknowledged.len()
    );
    assert!(
        acks_total > 0,
        "no append was ever acknowledged: the test checked nothing"
    );
}

/// Starts a crash writer, reads `acks_wanted` acknowledgements, kills it with SIGKILL, and
/// returns every acknowledgement it printed in full before it died.
fn run_and_kill(dir: &Path, seed: u32, acks_wanted: usize, cycle: usize) -> Vec<AckLine> {
    let mut writer = herald_command(dir);
    writer.args(["debug", "crash-writer", "--seed", &seed.to_string()]);
    let (mut child, lines) = spawn_lines(writer);
    let mut acks = Vec::new();
    for _ in 0..acks_wanted {
        match lines.recv_timeout(ACK_WAIT_MAX) {
            Ok(line) => acks.push(parse(&line, cycle)),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                panic!(
                    "cycle {cycle}: no acknowledgement within {ACK_WAIT_MAX:?}: the writer hangs"
                );
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = child.wait().unwrap();
                panic!(
                    "cycle {cycle}: the writer stopped after {} acknowledgements ({status}); \
                     its error is above",
                    acks.len()
                );
            }
        }
    }
    child.kill().expect("SIGKILL is delivered");
    child.wait().unwrap();
    // Lines printed before the kill are acknowledgements too. The reader ends at the end of
    // the pipe, which the kill closed.
    acks.extend(lines.iter().map(|line| parse(&line, cycle)));
    acks
}

fn parse(line: &str, cycle: usize) -> AckLine {
    serde_json::from_str(line)
        .unwrap_or_else(|error| panic!("cycle {cycle}: bad acknowledgement {line:?}: {error}"))
}

/// Opens the log and checks every promise against it and against `acknowledged`.
async fn verify(dir: &Path, acknowledged: &HashMap<String, Stored>, cycle: usize) {
    let options = Options::new(dir);
    let log = tokio::task::spawn_blocking(move || Log::open(options))
        .await
        .unwrap()
        .unwrap_or_else(|error| panic!("cycle {cycle}: the log does not open: {error}"));
    let all = read_all(&log).await;

    // Positions are contiguous from 0; `head` is the last one.
    for (index, record) in all.iter().enumerate() {
        assert_eq!(
            record.position,
            Position(index as u64),
            "cycle {cycle}: positions are not contiguous"
        );
    }
    let head = log.head().await.unwrap();
    assert_eq!(
        head,
        all.last().map(|record| record.position),
        "cycle {cycle}: head"
    );

    // Every event is stored once; every acknowledged one where it was acknowledged.
    let mut ids = HashSet::new();
    for record in &all {
        assert!(
            ids.insert(record.event.id.as_str()),
            "cycle {cycle}: event {} stored twice",
            record.event.id
        );
    }
    let by_id: HashMap<&str, &RecordedEvent> = all
        .iter()
        .map(|record| (record.event.id.as_str(), record))
        .collect();
    for (id, stored) in acknowledged {
        let record = by_id
            .get(id.as_str())
            .unwrap_or_else(|| panic!("cycle {cycle}: acknowledged event {id} was lost"));
        let found = Stored {
            stream: record.stream.to_string(),
            batchid: record
                .event
                .extension_str("batchid")
                .unwrap_or_default()
                .to_owned(),
            version: record.version.0,
            position: record.position.0,
        };
        assert_eq!(&found, stored, "cycle {cycle}: event {id} moved");
    }

    // Every stream's versions are contiguous from 0, and read_stream agrees with read_all.
    let mut streams: BTreeMap<&str, Vec<&RecordedEvent>> = BTreeMap::new();
    for record in &all {
        streams
            .entry(record.stream.as_str())
            .or_default()
            .push(record);
    }
    for (name, records) in &streams {
        for (index, record) in records.iter().enumerate() {
            assert_eq!(
                record.version,
                Version(index as u64),
                "cycle {cycle}: stream {name}: versions are not contiguous"
            );
        }
        let stream = &records[0].stream;
        let read = read_stream(&log, stream).await;
        let ids_all: Vec<&str> = records.iter().map(|r| r.event.id.as_str()).collect();
        let ids_stream: Vec<&str> = read.iter().map(|r| r.event.id.as_str()).collect();
        assert_eq!(
            ids_stream, ids_all,
            "cycle {cycle}: read_stream({name}) disagrees with read_all"
        );
    }

    // Every batch is complete, in one stream, at consecutive positions and versions.
    let mut batches: HashMap<&str, Vec<&RecordedEvent>> = HashMap::new();
    for record in &all {
        let Some(batchid) = record.event.extension_str("batchid") else {
            panic!("cycle {cycle}: event {} has no batchid", record.event.id);
        };
        batches.entry(batchid).or_default().push(record);
    }
    for (batchid, records) in &batches {
        let Some(ExtensionValue::Integer(size)) = records[0].event.extensions.get("batchsize")
        else {
            panic!("cycle {cycle}: batch {batchid} has no integer batchsize");
        };
        assert_eq!(
            records.len(),
            *size as usize,
            "cycle {cycle}: batch {batchid} is torn"
        );
        for pair in records.windows(2) {
            assert_eq!(
                pair[0].stream, pair[1].stream,
                "cycle {cycle}: batch {batchid} spans streams"
            );
            assert_eq!(
                pair[0].position.0 + 1,
                pair[1].position.0,
                "batch {batchid}"
            );
            assert_eq!(pair[0].version.0 + 1, pair[1].version.0, "batch {batchid}");
        }
    }

    log.close()
        .await
        .unwrap_or_else(|error| panic!("cycle {cycle}: close failed: {error}"));
}

async fn read_stream(log: &Log, stream: &herald_core::StreamName) -> Vec<RecordedEvent> {
    let mut records = Vec::new();
    loop {
        let from = Version(records.len() as u64);
        let page = log
            .read_stream(stream, from, Direction::Forward, PAGE_LEN)
            .await
            .unwrap();
        let done = page.len() < PAGE_LEN;
        records.extend(page);
        if done {
            return records;
        }
    }
}
