//! Crash safety over HTTP: clients append concurrently to a real `herald up`, which is
//! killed with SIGKILL again and again and restarted on the same data directory; at the end,
//! after a graceful restart, everything acknowledged with `201 Created` is read back over HTTP.
//!
//! 16 client tasks share one keep-alive client. Each appends batches of 1 to 5 events, to
//! shared streams without an expected version or to a stream of its own with
//! `Herald-Expected-Version` set to the version it last saw (`no-stream` at first), and
//! records every answer: a `201` with its ids, versions and positions, or a connection
//! error (the batch may or may not be stored). After a connection error a client appends to
//! its own stream once without a version, to learn it again; any other answer, a `409`
//! included, fails the test.
//! The test waits for a random number of new `201`s — counting them is the only
//! synchronisation — kills the server, restarts it on a new port and tells the clients.
//!
//! After the last cycle the clients stop, the server gets SIGTERM (and must exit 0), and a
//! fresh one is read over `GET /all` and `GET /streams/{stream}`, paging. Then:
//!
//! - positions are contiguous from 0, and so is every stream's versions;
//! - every acknowledged event is there exactly once, in the stream, at the version and at
//!   the position its `201` gave;
//! - every stored batch is whole (as many events carry its `batchid` as its `batchsize`
//!   says, in one stream, at consecutive versions and positions), and was either
//!   acknowledged or failed with a connection error;
//! - each stream read alone holds the same events as the global log.
//!
//! `HERALD_CRASH_SEED` replays a run (the seed is printed); `HERALD_HTTP_CRASH_CYCLES`
//! changes the number of kills.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde_json::{Value, json};

mod common;

use common::http::Herald;
use common::{env_or, runtime_multi_thread};

/// Kills per run, unless `HERALD_HTTP_CRASH_CYCLES` says otherwise.
const CYCLES_DEFAULT: u64 = 20;
/// Concurrent client tasks.
const CLIENTS: u64 = 16;
/// Streams every client appends to without an expected version.
const SHARED_STREAMS: u64 = 4;
/// The most events in one request.
const BATCH_SIZE_MAX: u64 = 5;
/// The most new `201`s waited for before a kill.
const ACKS_BEFORE_KILL_MAX: u64 = 60;
/// `201`s waited for after the last restart, before the graceful stop.
const ACKS_AFTER_LAST_KILL: u64 = 20;
/// A hang guard, not a synchronisation: how long a wait for `201`s or for a restarted
/// server may take.
const WAIT_MAX: Duration = Duration::from_secs(120);
/// Events per page when reading back.
const PAGE_LEN: usize = 1000;

const BATCH: &str = "application/cloudevents-batch+json";

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// What a client learned of one of its requests.
#[derive(Debug)]
enum Outcome {
    /// `201`: where each event was stored, in batch order.
    Acked {
        stream: String,
        batchid: String,
        events: Vec<(String, u64, u64)>,
    },
    /// A connection error: the batch may be stored, whole.
    Unknown { batchid: String },
}

/// The server the clients talk to: its address, and how many restarts it has seen.
#[derive(Debug, Clone, Copy)]
struct Generation {
    index: u64,
    addr: SocketAddr,
}

/// What the clients and the test share.
struct Shared {
    client: HttpClient,
    generation: tokio::sync::watch::Receiver<Generation>,
    /// `201`s so far, and the condition the test waits on for more.
    acks: Mutex<u64>,
    acked: Condvar,
    stop: AtomicBool,
}

#[test]
fn acknowledged_http_appends_survive_kill_9() {
    let seed = env_or("HERALD_CRASH_SEED", 0x0417_7C8A_5E00);
    let cycles = env_or("HERALD_HTTP_CRASH_CYCLES", CYCLES_DEFAULT);
    eprintln!("http crash test: seed {seed} (set HERALD_CRASH_SEED to replay), {cycles} cycles");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime_multi_thread();

    // The event API alone: `/all` is read back whole and must hold only this test's events
    // (the order system would add its topic's creation).
    let mut server = Herald::start(dir.path(), &["--no-orders"]);
    let (generation, receiver) = tokio::sync::watch::channel(Generation {
        index: 0,
        addr: server.addr(),
    });
    let shared = Arc::new(Shared {
        client: Client::builder(TokioExecutor::new()).build_http(),
        generation: receiver,
        acks: Mutex::new(0),
        acked: Condvar::new(),
        stop: AtomicBool::new(false),
    });
    let clients: Vec<_> = (0..CLIENTS)
        .map(|client| runtime.spawn(run_client(shared.clone(), client, seed ^ client)))
        .collect();

    for cycle in 1..=cycles {
        wait_for_acks(&shared, rng.gen_range(1..=ACKS_BEFORE_KILL_MAX));
        server.kill_9();
        server = Herald::start(dir.path(), &["--no-orders"]);
        generation.send_replace(Generation {
            index: cycle,
            addr: server.addr(),
        });
    }
    wait_for_acks(&shared, ACKS_AFTER_LAST_KILL);
    shared.stop.store(true, Ordering::SeqCst);
    let outcomes: Vec<Outcome> = clients
        .into_iter()
        .flat_map(|client| runtime.block_on(client).expect("a client panicked"))
        .collect();
    assert!(server.terminate().success(), "herald up exits 0 on SIGTERM");

    let server = Herald::start(dir.path(), &["--no-orders"]);
    runtime.block_on(verify(&shared.client, server.addr(), &outcomes));
    assert!(server.terminate().success());
}

/// Waits until the clients got `more` new `201`s.
fn wait_for_acks(shared: &Shared, more: u64) {
    let acks = shared.acks.lock().unwrap();
    let wanted = *acks + more;
    let (acks, timeout) = shared
        .acked
        .wait_timeout_while(acks, WAIT_MAX, |acks| *acks < wanted)
        .unwrap();
    assert!(
        !timeout.timed_out(),
        "only {} of {wanted} appends acknowledged within {WAIT_MAX:?}: the server hangs",
        *acks
    );
}

/// One client: appends until told to stop, and returns what it learned.
async fn run_client(shared: Arc<Shared>, client: u64, seed: u64) -> Vec<Outcome> {
    let mut rng = StdRng::seed_from_u64(seed);
    let own = format!("own-{client}");
    // The version of the client's own stream, when it knows it; `None` after a request
    // whose outcome is unknown.
    let mut own_version: Option<Option<u64>> = Some(None);
    let mut generation = shared.generation.clone();
    let mut outcomes = Vec::new();
    for seq in 0u64.. {
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let current = *generation.borrow_and_update();
        let to_own = rng.gen_ratio(1, 3);
        let stream = if to_own {
            own.clone()
        } else {
            format!("shared-{}", rng.gen_range(0..SHARED_STREAMS))
        };
        let expected = match (to_own, own_version) {
            (true, Some(None)) => Some("no-stream".to_owned()),
            (true, Some(Some(version))) => Some(version.to_string()),
            _ => None,
        };
        let batchid = format!("c{client}-{seq}");
        let size = rng.gen_range(1..=BATCH_SIZE_MAX);
        let events: Vec<Value> = (0..size)
            .map(|index| {
                json!({"specversion": "1.0", "id": format!("{batchid}-{index}"),
                       "source": "/http-crash", "type": "crash.appended",
                       "batchid": batchid, "batchsize": size,
                       "data": {"client": client, "seq": seq, "index": index}})
            })
            .collect();
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(format!("http://{}/streams/{stream}", current.addr))
            .header("content-type", BATCH);
        if let Some(expected) = &expected {
            request = request.header("herald-expected-version", expected);
        }
        let request = request
            .body(Full::new(Bytes::from(Value::Array(events).to_string())))
            .unwrap();
        match send(&shared.client, request).await {
            Ok((StatusCode::CREATED, body)) => {
                let events: Vec<(String, u64, u64)> = body["events"]
                    .as_array()
                    .unwrap_or_else(|| panic!("a 201 without events: {body}"))
                    .iter()
                    .map(|event| {
                        (
                            event["id"].as_str().unwrap().to_owned(),
                            event["version"].as_u64().unwrap(),
                            event["position"].as_u64().unwrap(),
                        )
                    })
                    .collect();
                assert_eq!(events.len() as u64, size, "{batchid}: {body}");
                if to_own {
                    own_version = Some(Some(events.last().unwrap().1));
                }
                outcomes.push(Outcome::Acked {
                    stream,
                    batchid,
                    events,
                });
                *shared.acks.lock().unwrap() += 1;
                shared.acked.notify_all();
            }
            Ok((StatusCode::CONFLICT, body)) => {
                // Only an append with an expected version can conflict, and only when a
                // request of unknown outcome did store its batch; which cannot be, since
                // after one the client appends without a version until it learns it again.
                panic!("{batchid}: 409 on {stream} expecting {expected:?}: {body}");
            }
            Ok((status, body)) => panic!("{batchid}: unexpected {status}: {body}"),
            Err(error) => {
                if to_own {
                    own_version = None;
                }
                outcomes.push(Outcome::Unknown { batchid });
                // The server was killed: wait for the next one.
                tokio::time::timeout(
                    WAIT_MAX,
                    generation.wait_for(|next| next.index > current.index),
                )
                .await
                .unwrap_or_else(|_| {
                    panic!("client {client}: no new server within {WAIT_MAX:?} after {error}")
                })
                .expect("the test keeps the generation sender");
            }
        }
    }
    outcomes
}

/// Sends `request`; the status and the JSON body, or the connection error.
async fn send(
    client: &HttpClient,
    request: Request<Full<Bytes>>,
) -> Result<(StatusCode, Value), String> {
    let response = client
        .request(request)
        .await
        .map_err(|error| error.to_string())?;
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(|error| error.to_string())?
        .to_bytes();
    let body = serde_json::from_slice(&bytes).unwrap_or_else(|error| {
        panic!(
            "{status}: a body that is not JSON ({error}): {}",
            String::from_utf8_lossy(&bytes)
        )
    });
    Ok((status, body))
}

/// One stored event as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stored {
    stream: String,
    version: u64,
    position: u64,
    id: String,
    batchid: String,
    batchsize: u64,
}

/// Reads every page from `path` on, following `next`.
async fn read_pages(client: &HttpClient, addr: SocketAddr, path: &str) -> Vec<Stored> {
    let mut stored = Vec::new();
    let mut next = Some(format!("{path}?limit={PAGE_LEN}"));
    while let Some(path) = next {
        let request = Request::get(format!("http://{addr}{path}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let (status, page) = send(client, request).await.expect("the server answers");
        assert_eq!(status, StatusCode::OK, "{path}: {page}");
        for record in page["events"].as_array().expect("a page of events") {
            let event = &record["event"];
            stored.push(Stored {
                stream: record["stream"].as_str().unwrap().to_owned(),
                version: record["version"].as_u64().unwrap(),
                position: record["position"].as_u64().unwrap(),
                id: event["id"].as_str().unwrap().to_owned(),
                batchid: event["batchid"].as_str().unwrap().to_owned(),
                batchsize: event["batchsize"].as_u64().unwrap(),
            });
        }
        next = page["next"].as_str().map(str::to_owned);
    }
    stored
}

/// Reads the whole log back over HTTP and checks it against what the clients learned.
async fn verify(client: &HttpClient, addr: SocketAddr, outcomes: &[Outcome]) {
    let all = read_pages(client, addr, "/all").await;

    // Positions are contiguous from 0; every event is stored once.
    for (index, stored) in all.iter().enumerate() {
        assert_eq!(
            stored.position, index as u64,
            "positions are not contiguous"
        );
    }
    let mut ids = HashSet::new();
    for stored in &all {
        assert!(ids.insert(stored.id.as_str()), "{} stored twice", stored.id);
    }

    // Every acknowledged event is where its 201 said.
    let by_id: HashMap<&str, &Stored> = all
        .iter()
        .map(|stored| (stored.id.as_str(), stored))
        .collect();
    let mut acked_events = 0;
    let mut acked_batches = HashSet::new();
    let mut unknown_batches = HashSet::new();
    for outcome in outcomes {
        match outcome {
            Outcome::Acked {
                stream,
                batchid,
                events,
            } => {
                acked_batches.insert(batchid.as_str());
                for (id, version, position) in events {
                    let stored = by_id
                        .get(id.as_str())
                        .unwrap_or_else(|| panic!("acknowledged event {id} was lost"));
                    assert_eq!(
                        (&stored.stream, stored.version, stored.position),
                        (stream, *version, *position),
                        "acknowledged event {id} moved"
                    );
                    acked_events += 1;
                }
            }
            Outcome::Unknown { batchid } => {
                unknown_batches.insert(batchid.as_str());
            }
        }
    }

    // Every stored batch is whole and came from a request that was acknowledged or whose
    // outcome is unknown.
    let mut batches: BTreeMap<&str, Vec<&Stored>> = BTreeMap::new();
    for stored in &all {
        batches
            .entry(stored.batchid.as_str())
            .or_default()
            .push(stored);
    }
    let mut unknown_stored = 0;
    for (batchid, events) in &batches {
        let first = events[0];
        assert_eq!(
            events.len() as u64,
            first.batchsize,
            "batch {batchid} is torn"
        );
        for (offset, stored) in events.iter().enumerate() {
            assert_eq!(stored.stream, first.stream, "batch {batchid} spans streams");
            assert_eq!(stored.position, first.position + offset as u64, "{batchid}");
            assert_eq!(stored.version, first.version + offset as u64, "{batchid}");
            assert_eq!(stored.id, format!("{batchid}-{offset}"), "{batchid}");
        }
        if !acked_batches.contains(batchid) {
            assert!(
                unknown_batches.contains(batchid),
                "batch {batchid} is stored but was never sent"
            );
            unknown_stored += 1;
        }
    }

    // Every stream's versions are contiguous from 0, and reading it alone gives the same.
    let mut streams: BTreeMap<&str, Vec<Stored>> = BTreeMap::new();
    for stored in &all {
        streams
            .entry(stored.stream.as_str())
            .or_default()
            .push(stored.clone());
    }
    for (stream, events) in &streams {
        for (index, stored) in events.iter().enumerate() {
            assert_eq!(
                stored.version, index as u64,
                "{stream}: versions have a gap"
            );
        }
        let alone = read_pages(client, addr, &format!("/streams/{stream}")).await;
        assert_eq!(&alone, events, "{stream}: read alone differs from /all");
    }

    eprintln!(
        "http crash test: {} events stored, {acked_events} acknowledged in {} appends; {} \
         appends of unknown outcome ({unknown_stored} of them stored)",
        all.len(),
        acked_batches.len(),
        unknown_batches.len()
    );
    assert!(
        acked_events > 0,
        "nothing was acknowledged: the test checked nothing"
    );
}
