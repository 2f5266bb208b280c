//! Crash safety of a consumer: `kill -9` a consuming process mid-stream, over and over, on
//! one data directory, and check that every event was handled at least once and that, with
//! the idempotency layer, the output topic holds exactly one effect per distinct event.
//!
//! The test publishes the inputs (over 100 keys) to the topic `inputs` of the embedded
//! broker in this process, then runs `herald debug consume`: the default pipeline with the
//! idempotency layer on the log, whose handler appends the input's id to a file and syncs
//! it (a record of every handler run), then publishes one output to `effects`. Each cycle
//! reads a random number of the consumer's progress lines (the only synchronisation) and
//! kills it with SIGKILL; one more run is stopped with SIGTERM and must exit cleanly; a
//! last run is started with `--expect`, stops by itself once every input has its effect,
//! and must exit cleanly too. Then, with the log opened here:
//!
//! - every input id is in the handled file (at least once), and nothing else is;
//! - the partitions of `effects` hold exactly one event per input: as many events as
//!   inputs, their causation ids exactly the input ids, no id twice.
//!
//! How many handler runs exceeded the number of inputs — redeliveries after a kill whose
//! outputs the idempotency layer kept from being published twice — is printed: it depends
//! on where the kills land.
//!
//! `HERALD_CONSUMER_CRASH_SEED` replays a run (the seed is printed);
//! `HERALD_CONSUMER_CRASH_KILLS` changes the number of kills.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Child, Command, ExitStatus};
use std::sync::mpsc;
use std::time::Duration;

use herald_core::broker::{Publisher as _, TopicName};
use herald_core::{Event, RecordedEvent};
use herald_log::broker::{Broker, BrokerOptions};
use herald_log::{Log, Options};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};

mod common;

use common::{env_or, herald_command, read_all, runtime_multi_thread, spawn_lines};

/// Input events published before the first run.
const INPUTS: usize = 3_000;
/// Distinct partition keys among the inputs.
const KEYS: usize = 100;
/// Inputs per publish.
const PUBLISH_BATCH_LEN: usize = 100;
/// Kills per run, unless `HERALD_CONSUMER_CRASH_KILLS` says otherwise.
const KILLS_DEFAULT: u64 = 5;
/// The consumer prints a progress line every this many handler runs.
const PROGRESS_EVERY: usize = 50;
/// The most progress lines read before a kill. Kills × this × `PROGRESS_EVERY` stays
/// below `INPUTS`, so every process finds enough new inputs to print what is awaited.
const PROGRESS_BEFORE_KILL_MAX: usize = 8;
/// A hang guard, not a synchronisation: how long one line of the consumer may take.
const LINE_WAIT_MAX: Duration = Duration::from_secs(120);

#[test]
fn a_consumer_killed_mid_stream_handles_everything_and_publishes_each_effect_once() {
    let seed = env_or("HERALD_CONSUMER_CRASH_SEED", 0xC0_FFEE_0C4A);
    let kills = env_or("HERALD_CONSUMER_CRASH_KILLS", KILLS_DEFAULT) as usize;
    assert!(
        (kills + 1) * PROGRESS_BEFORE_KILL_MAX * PROGRESS_EVERY < INPUTS,
        "too many kills for {INPUTS} inputs"
    );
    eprintln!(
        "consumer crash test: seed {seed} (set HERALD_CONSUMER_CRASH_SEED to replay), \
         {kills} kills"
    );
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let handled_log = dir.path().join("handled.log");
    let runtime = runtime_multi_thread();
    let inputs = runtime.block_on(publish_inputs(&data));

    for cycle in 0..kills {
        let wanted = rng.gen_range(1..=PROGRESS_BEFORE_KILL_MAX);
        let mut consumer = Consumer::start(&data, &handled_log, None);
        consumer.read_progress(wanted, &format!("kill {cycle}"));
        consumer.child.kill().expect("SIGKILL is delivered");
        consumer.child.wait().unwrap();
        eprintln!("kill {cycle}: after {wanted} progress lines");
    }

    // A graceful stop mid-stream: SIGTERM drains, commits and exits 0.
    let mut consumer = Consumer::start(&data, &handled_log, None);
    consumer.read_progress(1, "sigterm");
    let terminated = Command::new("kill")
        .args(["-TERM", &consumer.child.id().to_string()])
        .status()
        .unwrap();
    assert!(terminated.success(), "kill -TERM failed");
    let (status, lines) = consumer.finish("sigterm");
    assert!(status.success(), "a SIGTERM stop exits 0, not {status}");
    let mut duplicates = report_duplicates(&lines, "sigterm");

    // The last run stops by itself once every input has its effect.
    let consumer = Consumer::start(&data, &handled_log, Some(INPUTS));
    let (status, lines) = consumer.finish("last run");
    assert!(status.success(), "the last run exits 0, not {status}");
    duplicates += report_duplicates(&lines, "last run");

    let runs = runtime.block_on(verify(&data, &handled_log, &inputs));
    // Runs beyond one per input: a kill came after the run and before its record was
    // stored, so its outputs were never published. Duplicates: redelivered inputs whose
    // record stood, answered with the recorded outputs instead of a second run (counted by
    // the two runs that stopped cleanly; the killed ones cannot report).
    eprintln!(
        "consumer crash test: {INPUTS} inputs, {runs} handler runs ({} beyond one per \
         input), {duplicates} duplicates in the clean runs, {INPUTS} effects",
        runs - INPUTS
    );
}

/// The `duplicates` of the report line a cleanly stopped consumer printed last.
fn report_duplicates(lines: &[String], what: &str) -> u64 {
    let report: serde_json::Value = lines
        .iter()
        .rev()
        .find_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .and_then(|line| line.get("report").cloned())
        .unwrap_or_else(|| panic!("{what}: a clean stop prints its report last: {lines:?}"));
    report["duplicates"]
        .as_u64()
        .unwrap_or_else(|| panic!("{what}: no duplicates in {report}"))
}

/// Publishes the inputs to `inputs` through an embedded broker on a fresh log in `data`,
/// then closes the log; returns their ids.
async fn publish_inputs(data: &Path) -> Vec<String> {
    let options = Options::new(data);
    let log = tokio::task::spawn_blocking(move || Log::open(options))
        .await
        .unwrap()
        .unwrap();
    let broker = Broker::new(log.clone(), BrokerOptions::new());
    let topic = TopicName::new("inputs").unwrap();
    // Both topics exist before the consumer starts, as a deployment provisions them: the
    // consumer's first publishes to `effects` do not race to create it.
    for name in ["inputs", "effects"] {
        let partitions = BrokerOptions::new().partitions_default;
        broker
            .create_topic(&TopicName::new(name).unwrap(), partitions)
            .await
            .unwrap();
    }
    let events: Vec<Event> = (0..INPUTS)
        .map(|n| {
            Event::new("/herald/test/consumer-crash", "CrashInput")
                .with_id(format!("input-{n:05}"))
                .with_partition_key(format!("key-{}", n % KEYS))
                .with_data(serde_json::json!({ "n": n }))
        })
        .collect();
    let ids = events.iter().map(|event| event.id.clone()).collect();
    for batch in events.chunks(PUBLISH_BATCH_LEN) {
        broker.publish(&topic, batch.to_vec()).await.unwrap();
    }
    broker.shutdown().await;
    log.close().await.unwrap();
    ids
}

/// A running `herald debug consume`, with its stdout read line by line on a thread.
struct Consumer {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Consumer {
    fn start(data: &Path, handled_log: &Path, expect: Option<usize>) -> Self {
        let mut command = herald_command(data);
        command
            .args(["debug", "consume", "--handled-log"])
            .arg(handled_log)
            .args(["--progress-every", &PROGRESS_EVERY.to_string()]);
        if let Some(expect) = expect {
            command.args(["--expect", &expect.to_string()]);
        }
        let (child, lines) = spawn_lines(command);
        Consumer { child, lines }
    }

    /// Reads `count` progress lines.
    fn read_progress(&mut self, count: usize, what: &str) {
        let mut read = 0;
        while read < count {
            match self.lines.recv_timeout(LINE_WAIT_MAX) {
                Ok(line) if line.contains("\"handled\"") => read += 1,
                Ok(line) => panic!("{what}: unexpected line {line:?}"),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let _ = self.child.kill();
                    panic!("{what}: no progress within {LINE_WAIT_MAX:?}: the consumer hangs");
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().unwrap();
                    panic!(
                        "{what}: the consumer stopped after {read} lines ({status}); its error is above"
                    );
                }
            }
        }
    }

    /// Reads every line until the consumer closes its stdout, then waits for it to exit.
    fn finish(mut self, what: &str) -> (ExitStatus, Vec<String>) {
        let mut lines = Vec::new();
        loop {
            match self.lines.recv_timeout(LINE_WAIT_MAX) {
                Ok(line) => lines.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let _ = self.child.kill();
                    panic!("{what}: silent for {LINE_WAIT_MAX:?}: the consumer hangs");
                }
            }
        }
        (self.child.wait().unwrap(), lines)
    }
}

/// Checks the handled file and the `effects` topic against `inputs`; returns the number of
/// handler runs.
async fn verify(data: &Path, handled_log: &Path, inputs: &[String]) -> usize {
    let expected: HashSet<&str> = inputs.iter().map(String::as_str).collect();

    // Every input handled at least once, and nothing else.
    let handled = std::fs::read_to_string(handled_log).unwrap();
    assert!(
        handled.ends_with('\n'),
        "the handled file ends with a whole line"
    );
    let mut runs: HashMap<&str, usize> = HashMap::new();
    for id in handled.lines() {
        assert!(expected.contains(id), "handled an unknown input {id:?}");
        *runs.entry(id).or_default() += 1;
    }
    let missing: Vec<&&str> = expected
        .iter()
        .filter(|id| !runs.contains_key(**id))
        .collect();
    assert!(missing.is_empty(), "inputs never handled: {missing:?}");

    // Exactly one effect per input.
    let options = Options::new(data);
    let log = tokio::task::spawn_blocking(move || Log::open(options))
        .await
        .unwrap()
        .unwrap();
    let effects: Vec<RecordedEvent> = read_all(&log)
        .await
        .into_iter()
        .filter(|record| record.stream.as_str().starts_with("$topic:effects:"))
        .collect();
    let mut ids = HashSet::new();
    let mut causes: HashMap<&str, usize> = HashMap::new();
    for record in &effects {
        let event = &record.event;
        assert!(
            ids.insert(event.id.as_str()),
            "effect {} stored twice",
            event.id
        );
        let cause = event.causation_id().expect("an effect names its input");
        let data: serde_json::Value = event.data_as().unwrap().unwrap();
        assert_eq!(data["input"], cause, "effect {}", event.id);
        *causes.entry(cause).or_default() += 1;
    }
    let doubled: Vec<(&&str, &usize)> = causes.iter().filter(|(_, count)| **count > 1).collect();
    assert!(
        doubled.is_empty(),
        "inputs with more than one effect: {doubled:?}"
    );
    assert_eq!(
        causes.keys().copied().collect::<HashSet<&str>>(),
        expected,
        "the effects' causes are the inputs"
    );
    assert_eq!(effects.len(), inputs.len());
    log.close().await.unwrap();
    runs.values().sum()
}
