//! The conformance suite every [`EventStore`] backend runs.
//!
//! A backend is done when the whole suite passes. Run it with
//! [`event_store_conformance!`](crate::event_store_conformance), which expands to one test per
//! case, each on a fresh store from the given factory:
//!
//! ```
//! // tests/conformance.rs of a backend crate
//! herald_core::event_store_conformance!(|| async {
//!     // A backend on disk returns its `tempfile::TempDir` here instead of `()`: the guard
//!     // lives until the case has finished, and is dropped after the store.
//!     (herald_core::memory::InMemoryStore::new(), ())
//! });
//! # fn main() {}
//! ```
//!
//! Every case is also a public `async fn` taking an `Arc<dyn EventStore>`, so a backend can
//! run one case on its own (for instance after a restart) and a test can prove that a case
//! fails against a broken store.
//!
//! Each case needs a **fresh, empty store**; it panics with a message naming the broken
//! promise when the store does not keep it. Timeouts in the suite are hang guards only (a
//! case that waits [`WAIT_MAX`] for an event has failed); nothing is synchronised by
//! sleeping.
//!
//! # What each case checks
//!
//! - [`append_assigns_versions_and_positions`]: appending `n` events to a new stream MUST
//!   return versions `0..n` and contiguous positions, continuing from the log's head; the
//!   result MUST list the events in the order given, with their ids. `stream_version` MUST be
//!   the version of the stream's last event (`None` for an unknown stream) and `head` the
//!   position of the log's last event (`None` for an empty log).
//! - [`read_stream_forward_and_backward`]: reading forward from version `v` MUST return the
//!   stream's events with versions `>= v` in ascending order; backward from `v` those with
//!   versions `<= v` in descending order, so [`Version::END`] starts at the last event. At
//!   most `limit` events MUST be returned; `limit == 0` returns none and `usize::MAX` MUST
//!   work. Reading past the end MUST return an empty list, not an error. Every event MUST
//!   carry its stream, version, position and the event as appended.
//! - [`read_all_forward_and_backward`]: the same for the global log and positions, with
//!   [`Position::END`]; an empty log MUST read as empty in both directions.
//! - [`expected_version_accepts_when_it_holds`]: `NoStream` MUST be accepted for a new stream,
//!   `StreamExists` for an existing one, `Exact(v)` when `v` is the stream's last version,
//!   and `Any` always.
//! - [`wrong_expected_version_reports_actual`]: an expectation that does not hold MUST fail
//!   with [`Error::WrongExpectedVersion`] naming the stream, the expectation and the actual
//!   version (`None` when the stream does not exist), and MUST NOT change the store.
//! - [`failed_append_stores_nothing`]: an append that fails (an invalid event in the middle →
//!   [`Error::InvalidEvent`] with its index; an id twice in the batch →
//!   [`Error::DuplicateInBatch`]; a wrong expected version; an already stored id →
//!   [`Error::DuplicateEventId`]) MUST store none of its events: `head`, `stream_version` and
//!   `read_all` are unchanged, a new stream stays unknown, and the batch's valid events can
//!   be appended afterwards (their ids were not consumed).
//! - [`retried_append_returns_original_result`]: re-appending a batch (the same ids in the
//!   same order, to the same stream) with an expected version that held for the original
//!   append — the same one, `Any`, or another that held then — MUST return `Ok` with the
//!   original versions and positions, even after the stream has moved on, and MUST store
//!   nothing.
//! - [`reused_event_ids_are_rejected`]: a batch that reuses stored ids but is not such a
//!   retry (a subset, a superset, another order, another stream, an expected version that
//!   would not have held for the original, a new event next to a stored one) MUST fail with
//!   [`Error::DuplicateEventId`] naming one of the reused ids, the stream and version where
//!   it is stored, and MUST store nothing.
//! - [`events_round_trip_exactly`]: every attribute, extension (string, integer, boolean),
//!   JSON payload (byte for byte, whitespace and key order included), binary payload
//!   (every byte value, and empty) and `time` (offset and nanoseconds) MUST read back exactly
//!   as appended from `read_stream`, `read_all` and both subscriptions; the event's JSON
//!   encoding MUST be identical, and `recorded_at` MUST be the same value on every path.
//! - [`concurrent_appends_keep_one_global_order`]: with concurrent writers on their own and on
//!   shared streams (with `Any`, and with optimistic retries on `Exact`), positions MUST be
//!   contiguous from 0, every acknowledged event MUST be in the log exactly once where its
//!   acknowledgement said, versions of every stream MUST be contiguous from 0 and rise with
//!   position, and an append that started after another was acknowledged MUST get greater
//!   positions. A concurrent reader MUST never see a gap or part of a batch; paged reads MUST
//!   agree with one full read.
//! - [`subscribe_all_from_start_under_concurrent_writes`]: a subscription from position 0,
//!   opened while writers are running, MUST deliver exactly the log, in position order, with
//!   no gap and no duplicate across the switch from catch-up to live.
//! - [`subscribe_all_from_middle_and_future_positions`]: the same from a position in the middle
//!   of the log, and from a position beyond the head, which delivers the events from that
//!   position once they are appended.
//! - [`subscribe_stream_under_concurrent_writes`]: a stream subscription MUST deliver exactly
//!   that stream's events from the requested version, in version order, under concurrent
//!   writers to it and to other streams; subscribing to a stream that does not exist yet MUST
//!   work and deliver its events once appended.
//! - [`soft_delete_hides_stream_and_append_revives_it`]: `delete_stream` MUST honour its
//!   expected version; afterwards `read_stream` MUST fail with [`Error::StreamDeleted`],
//!   `stream_version` MUST be `None` (so `NoStream` holds and `Exact(last)` does not), and the
//!   events MUST stay in `read_all`. Appending again MUST revive the stream with versions
//!   continuing after the last one, and only the new events MUST be visible in it.
//! - [`delete_of_missing_stream_is_rejected`]: the expected version is checked first, as for
//!   an append (`StreamExists`/`Exact` on a missing stream → [`Error::WrongExpectedVersion`]
//!   with `actual: None`); when it holds, deleting a stream that never existed MUST fail with
//!   [`Error::StreamNotFound`] and deleting a deleted one with [`Error::StreamDeleted`].
//!   Neither changes the store.
//! - [`unknown_stream_and_empty_append_are_errors`]: reading an unknown stream MUST fail with
//!   [`Error::StreamNotFound`] (its `stream_version` is `None`); an append without events
//!   MUST fail with [`Error::EmptyAppend`] and change nothing.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use chrono::{FixedOffset, TimeZone as _};
use futures::StreamExt as _;
use serde_json::json;
use serde_json::value::RawValue;
use tokio::sync::watch;

use crate::event::{Data, Event};
use crate::store::{Appended, Error, EventStore, RecordedEvent, Subscription};
use crate::stream::{Direction, ExpectedVersion, Position, StreamName, Version};

/// How long a case waits for one event of a subscription or one progress signal before it
/// declares the store hung. A hang guard, never a synchronisation.
pub const WAIT_MAX: Duration = Duration::from_secs(30);

/// How long one whole case may run before it is declared hung.
pub const CASE_DURATION_MAX: Duration = Duration::from_secs(300);

/// How many worker threads the runtime of each case has.
pub const WORKER_THREADS: usize = 4;

/// How often a writer retries an optimistic append after conflicts before the case fails.
const CAS_ATTEMPTS_MAX: usize = 10_000;

/// Expands to one test per conformance case, each running on a fresh store.
///
/// `$factory` is an expression callable once per case — typically a closure returning a
/// future — whose output is `(store, guard)`: `store` implements
/// [`EventStore`](crate::EventStore), and `guard` (any type; `()` when nothing needs to
/// live on) is kept alive until the case has finished and the store has been dropped, e.g. a
/// `tempfile::TempDir` holding the store's files.
///
/// Each test runs on its own multi-threaded tokio runtime with
/// [`WORKER_THREADS`](crate::conformance::WORKER_THREADS) workers, the equivalent of
/// `#[tokio::test(flavor = "multi_thread", worker_threads = 4)]`, built by
/// [`run`](crate::conformance::run) so the calling crate needs no tokio features of its own.
/// The tests are named after the cases; invoke the macro once per module.
///
/// ```
/// mod in_memory {
///     herald_core::event_store_conformance!(|| async {
///         (herald_core::memory::InMemoryStore::new(), ())
///     });
/// }
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! event_store_conformance {
    ($factory:expr $(,)?) => {
        $crate::event_store_conformance!(@cases ($factory)
            append_assigns_versions_and_positions,
            read_stream_forward_and_backward,
            read_all_forward_and_backward,
            expected_version_accepts_when_it_holds,
            wrong_expected_version_reports_actual,
            failed_append_stores_nothing,
            retried_append_returns_original_result,
            reused_event_ids_are_rejected,
            events_round_trip_exactly,
            concurrent_appends_keep_one_global_order,
            subscribe_all_from_start_under_concurrent_writes,
            subscribe_all_from_middle_and_future_positions,
            subscribe_stream_under_concurrent_writes,
            soft_delete_hides_stream_and_append_revives_it,
            delete_of_missing_stream_is_rejected,
            unknown_stream_and_empty_append_are_errors,
        );
    };
    (@cases ($factory:expr) $($case:ident,)*) => {
        $(
            #[test]
            fn $case() {
                $crate::conformance::run($factory, $crate::conformance::$case);
            }
        )*
    };
}

/// Runs one case on a fresh store from `factory`, on a multi-threaded tokio runtime with
/// [`WORKER_THREADS`] workers, within [`CASE_DURATION_MAX`].
///
/// The store is dropped after the case, then the guard.
pub fn run<F, Fut, S, G, C, CaseFut>(factory: F, case: C)
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = (S, G)>,
    S: EventStore,
    C: FnOnce(Arc<dyn EventStore>) -> CaseFut,
    CaseFut: Future<Output = ()>,
{
    block_on_case("store", async move {
        let (store, guard) = factory().await;
        let store: Arc<dyn EventStore> = Arc::new(store);
        case(Arc::clone(&store)).await;
        drop(store);
        drop(guard);
    });
}

/// Runs a conformance case on its own multi-threaded runtime with [`WORKER_THREADS`]
/// workers, failing it if it takes longer than [`CASE_DURATION_MAX`] (the `subject` hangs).
pub(crate) fn block_on_case(subject: &str, case: impl Future<Output = ()>) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKER_THREADS)
        .enable_all()
        .build()
        .expect("a tokio runtime for the conformance case");
    runtime.block_on(async move {
        if tokio::time::timeout(CASE_DURATION_MAX, case).await.is_err() {
            panic!("the case did not finish within {CASE_DURATION_MAX:?}: the {subject} hangs");
        }
    });
}

// ---------------------------------------------------------------------------------------
// Appends, reads, versions and positions
// ---------------------------------------------------------------------------------------

/// Appends assign versions `0..n` and contiguous positions; `stream_version` and `head`
/// follow.
pub async fn append_assigns_versions_and_positions(store: Arc<dyn EventStore>) {
    let store = &*store;
    assert_fresh(store).await;
    let a = stream("conformance-a");
    let b = stream("conformance-b");

    let first = events("a", 3);
    let appended = append_ok(store, &a, ExpectedVersion::NoStream, &first).await;
    check_appended("first append to a new stream", &appended, &first, 0, 0);
    assert_eq!(
        appended.last_version(),
        Some(Version(2)),
        "last_version of the first append"
    );
    assert_eq!(
        head(store).await,
        Some(Position(2)),
        "head after one append"
    );
    assert_eq!(version_of(store, &a).await, Some(Version(2)));
    assert_eq!(
        version_of(store, &b).await,
        None,
        "stream_version of a stream never appended to"
    );

    let second = events("b", 2);
    let appended = append_ok(store, &b, ExpectedVersion::NoStream, &second).await;
    check_appended("first append to a second stream", &appended, &second, 0, 3);

    let third = events("a-again", 1);
    let appended = append_ok(store, &a, ExpectedVersion::Exact(Version(2)), &third).await;
    check_appended("second append to the first stream", &appended, &third, 3, 5);

    assert_eq!(
        head(store).await,
        Some(Position(5)),
        "head after three appends"
    );
    assert_eq!(version_of(store, &a).await, Some(Version(3)));
    assert_eq!(version_of(store, &b).await, Some(Version(1)));
}

/// `read_stream` honours `from`, `direction` and `limit`, including [`Version::END`].
pub async fn read_stream_forward_and_backward(store: Arc<dyn EventStore>) {
    let store = &*store;
    assert_fresh(store).await;
    let s = stream("conformance-read");
    let other = stream("conformance-other");
    // Interleave another stream so that versions and positions differ.
    append_ok(store, &other, ExpectedVersion::Any, &events("o", 2)).await;
    let mut want = append_expect(store, &s, ExpectedVersion::NoStream, &events("s", 3)).await;
    append_ok(store, &other, ExpectedVersion::Any, &events("o2", 1)).await;
    let more = append_expect(
        store,
        &s,
        ExpectedVersion::Exact(Version(2)),
        &events("s2", 2),
    )
    .await;
    want.extend(more);
    assert_eq!(want.len(), 5);

    let fwd =
        |from: u64, limit: usize| read_stream(store, &s, Version(from), Direction::Forward, limit);
    let bwd =
        |from: u64, limit: usize| read_stream(store, &s, Version(from), Direction::Backward, limit);

    check_events("forward from 0, no limit", &fwd(0, usize::MAX).await, &want);
    check_events("forward from 0, limit 5", &fwd(0, 5).await, &want);
    check_events("forward from 2, limit 2", &fwd(2, 2).await, &want[2..4]);
    check_events("forward from 4, limit 10", &fwd(4, 10).await, &want[4..]);
    check_events("forward from 5 (past the end)", &fwd(5, 10).await, &[]);
    check_events("forward from 1000", &fwd(1000, 10).await, &[]);
    check_events("forward from 0, limit 0", &fwd(0, 0).await, &[]);

    let rev = |slice: &[Expected]| slice.iter().rev().cloned().collect::<Vec<_>>();
    check_events(
        "backward from END, no limit",
        &bwd(u64::MAX, usize::MAX).await,
        &rev(&want),
    );
    check_events(
        "backward from END, limit 2",
        &bwd(u64::MAX, 2).await,
        &rev(&want[3..]),
    );
    check_events(
        "backward from 2, limit 10",
        &bwd(2, 10).await,
        &rev(&want[..3]),
    );
    check_events(
        "backward from 3, limit 2",
        &bwd(3, 2).await,
        &rev(&want[2..4]),
    );
    check_events("backward from 0", &bwd(0, 10).await, &want[..1]);
    check_events(
        "backward from 1000 (past the end), limit 1",
        &bwd(1000, 1).await,
        &want[4..],
    );
    check_events("backward from END, limit 0", &bwd(u64::MAX, 0).await, &[]);
}

/// `read_all` honours `from`, `direction` and `limit`, including [`Position::END`].
pub async fn read_all_forward_and_backward(store: Arc<dyn EventStore>) {
    let store = &*store;
    assert_fresh(store).await;
    check_events("forward on an empty log", &whole_log(store).await, &[]);
    check_events(
        "backward from END on an empty log",
        &read_all(store, Position::END, Direction::Backward, usize::MAX).await,
        &[],
    );

    let a = stream("conformance-a");
    let b = stream("conformance-b");
    let mut log = Vec::new();
    log.extend(append_expect(store, &a, ExpectedVersion::NoStream, &events("a", 3)).await);
    log.extend(append_expect(store, &b, ExpectedVersion::NoStream, &events("b", 2)).await);
    log.extend(
        append_expect(
            store,
            &a,
            ExpectedVersion::Exact(Version(2)),
            &events("a2", 3),
        )
        .await,
    );
    assert_eq!(log.len(), 8);

    let fwd = |from: u64, limit: usize| read_all(store, Position(from), Direction::Forward, limit);
    let bwd = |from: u64, limit: usize| read_all(store, Position(from), Direction::Backward, limit);
    let rev = |slice: &[Expected]| slice.iter().rev().cloned().collect::<Vec<_>>();

    check_events("forward from 0, no limit", &fwd(0, usize::MAX).await, &log);
    check_events("forward from 3, limit 2", &fwd(3, 2).await, &log[3..5]);
    check_events("forward from 7, limit 10", &fwd(7, 10).await, &log[7..]);
    check_events("forward from 8 (past the end)", &fwd(8, 10).await, &[]);
    check_events(
        "forward from u64::MAX - 1",
        &fwd(u64::MAX - 1, 10).await,
        &[],
    );
    check_events("forward from 0, limit 0", &fwd(0, 0).await, &[]);
    check_events(
        "backward from END, no limit",
        &bwd(u64::MAX, usize::MAX).await,
        &rev(&log),
    );
    check_events(
        "backward from END, limit 3",
        &bwd(u64::MAX, 3).await,
        &rev(&log[5..]),
    );
    check_events(
        "backward from 4, limit 10",
        &bwd(4, 10).await,
        &rev(&log[..5]),
    );
    check_events("backward from 0", &bwd(0, 10).await, &log[..1]);
    check_events(
        "backward from 100 (past the end), limit 2",
        &bwd(100, 2).await,
        &rev(&log[6..]),
    );
    check_events("backward from END, limit 0", &bwd(u64::MAX, 0).await, &[]);
}

// ---------------------------------------------------------------------------------------
// Expected versions, atomicity, idempotency
// ---------------------------------------------------------------------------------------

/// Every [`ExpectedVersion`] is accepted when it holds.
pub async fn expected_version_accepts_when_it_holds(store: Arc<dyn EventStore>) {
    let store = &*store;
    assert_fresh(store).await;
    let s = stream("conformance-expected");
    let t = stream("conformance-any");

    append_ok(
        store,
        &s,
        ExpectedVersion::NoStream,
        &events("no-stream", 1),
    )
    .await;
    append_ok(
        store,
        &s,
        ExpectedVersion::StreamExists,
        &events("exists", 2),
    )
    .await;
    append_ok(
        store,
        &s,
        ExpectedVersion::Exact(Version(2)),
        &events("exact", 1),
    )
    .await;
    append_ok(store, &s, ExpectedVersion::Any, &events("any", 1)).await;
    append_ok(store, &t, ExpectedVersion::Any, &events("any-new", 1)).await;
    append_ok(
        store,
        &t,
        ExpectedVersion::Exact(Version(0)),
        &events("exact-0", 1),
    )
    .await;

    assert_eq!(version_of(store, &s).await, Some(Version(4)));
    assert_eq!(version_of(store, &t).await, Some(Version(1)));
    assert_eq!(head(store).await, Some(Position(6)));
}

/// An expectation that does not hold fails with the stream's actual version and changes
/// nothing.
pub async fn wrong_expected_version_reports_actual(store: Arc<dyn EventStore>) {
    let store = &*store;
    assert_fresh(store).await;
    let s = stream("conformance-existing");
    let missing = stream("conformance-missing");
    append_ok(store, &s, ExpectedVersion::NoStream, &events("s", 2)).await;
    let before = snapshot(store).await;

    let cases = [
        (&s, ExpectedVersion::NoStream, Some(Version(1))),
        (&s, ExpectedVersion::Exact(Version(0)), Some(Version(1))),
        (&s, ExpectedVersion::Exact(Version(2)), Some(Version(1))),
        (&missing, ExpectedVersion::StreamExists, None),
        (&missing, ExpectedVersion::Exact(Version(0)), None),
    ];
    for (target, expected, actual) in cases {
        let result = store.append(target, expected, events("rejected", 2)).await;
        expect_wrong_expected_version(
            &format!("append to `{target}` expecting {expected}"),
            result,
            target,
            expected,
            actual,
        );
        check_unchanged(
            store,
            &before,
            &format!("a rejected append expecting {expected}"),
        )
        .await;
    }
    assert_eq!(version_of(store, &missing).await, None);
}

/// A failing append stores none of its events and consumes none of their ids.
pub async fn failed_append_stores_nothing(store: Arc<dyn EventStore>) {
    let store = &*store;
    assert_fresh(store).await;
    let s = stream("conformance-atomic");
    let fresh = stream("conformance-never");
    let stored = events("stored", 2);
    append_ok(store, &s, ExpectedVersion::NoStream, &stored).await;
    let before = snapshot(store).await;
    let valid = events("valid", 2);

    // An invalid event in the middle.
    let mut invalid = event("invalid");
    invalid.ty = String::new();
    let batch = vec![valid[0].clone(), invalid, valid[1].clone()];
    for (target, expected) in [
        (&s, ExpectedVersion::Any),
        (&fresh, ExpectedVersion::NoStream),
    ] {
        match store.append(target, expected, batch.clone()).await {
            Err(Error::InvalidEvent { index: 1, .. }) => {}
            other => panic!(
                "an append whose event 1 has an empty `type` must fail with InvalidEvent {{ index: 1 }}, got {}",
                describe(&other)
            ),
        }
        check_unchanged(store, &before, "an append with an invalid event").await;
    }

    // The same id twice in the batch.
    let twice = vec![valid[0].clone(), valid[1].clone(), valid[0].clone()];
    match store.append(&fresh, ExpectedVersion::Any, twice).await {
        Err(Error::DuplicateInBatch { id }) if id == valid[0].id => {}
        other => panic!(
            "an append carrying id `{}` twice must fail with DuplicateInBatch naming it, got {}",
            valid[0].id,
            describe(&other)
        ),
    }
    check_unchanged(store, &before, "an append with an id twice").await;

    // A wrong expected version.
    let result = store
        .append(&s, ExpectedVersion::Exact(Version(0)), valid.clone())
        .await;
    expect_wrong_expected_version(
        "a conflicting append",
        result,
        &s,
        ExpectedVersion::Exact(Version(0)),
        Some(Version(1)),
    );
    check_unchanged(store, &before, "an append with a wrong expected version").await;

    // An id already stored, at the end of the batch.
    let reuse = vec![valid[0].clone(), valid[1].clone(), stored[1].clone()];
    match store.append(&fresh, ExpectedVersion::Any, reuse).await {
        Err(Error::DuplicateEventId { id, .. }) if id == stored[1].id => {}
        other => panic!(
            "an append reusing the stored id `{}` must fail with DuplicateEventId, got {}",
            stored[1].id,
            describe(&other)
        ),
    }
    check_unchanged(store, &before, "an append reusing a stored id").await;
    expect_stream_not_found(store, &fresh, "a stream whose every append failed").await;

    // None of the failed appends consumed the ids of their valid events.
    let want = append_expect(store, &fresh, ExpectedVersion::NoStream, &valid).await;
    check_events(
        "the valid events of the failed appends, appended at last",
        &whole_stream(store, &fresh).await,
        &want,
    );
}

/// Retrying an append returns the original result and stores nothing.
pub async fn retried_append_returns_original_result(store: Arc<dyn EventStore>) {
    let store = &*store;
    assert_fresh(store).await;
    let s = stream("conformance-retry");
    let u = stream("conformance-unrelated");
    let v = stream("conformance-any");

    let first = events("first", 3);
    let original_first = append_ok(store, &s, ExpectedVersion::NoStream, &first).await;
    let before = snapshot(store).await;
    let retried = append_ok(store, &s, ExpectedVersion::NoStream, &first).await;
    assert_eq!(
        retried, original_first,
        "a retry with the same expected version must return the original result"
    );
    check_unchanged(store, &before, "an immediate retry").await;

    let second = events("second", 2);
    let original_second = append_ok(store, &s, ExpectedVersion::Exact(Version(2)), &second).await;
    append_ok(store, &u, ExpectedVersion::Any, &events("unrelated", 2)).await;
    let by_any = events("by-any", 2);
    let original_by_any = append_ok(store, &v, ExpectedVersion::Any, &by_any).await;
    let before = snapshot(store).await;

    let retries = [
        (
            &s,
            &first,
            ExpectedVersion::NoStream,
            &original_first,
            "the first append, after the stream moved on",
        ),
        (
            &s,
            &first,
            ExpectedVersion::Any,
            &original_first,
            "the first append, with Any",
        ),
        (
            &s,
            &second,
            ExpectedVersion::Exact(Version(2)),
            &original_second,
            "the second append, same Exact",
        ),
        (
            &s,
            &second,
            ExpectedVersion::StreamExists,
            &original_second,
            "the second append, with StreamExists (held then)",
        ),
        (
            &s,
            &second,
            ExpectedVersion::Any,
            &original_second,
            "the second append, with Any",
        ),
        (
            &v,
            &by_any,
            ExpectedVersion::Any,
            &original_by_any,
            "an append made with Any, with Any",
        ),
        (
            &v,
            &by_any,
            ExpectedVersion::NoStream,
            &original_by_any,
            "an append made with Any, with NoStream (held then)",
        ),
    ];
    for (target, batch, expected, original, what) in retries {
        let result = append_ok(store, target, expected, batch).await;
        assert_eq!(
            &result, original,
            "retrying {what} must return the original versions and positions"
        );
        check_unchanged(store, &before, &format!("retrying {what}")).await;
    }
}

/// Reusing stored ids in anything but a retry fails with [`Error::DuplicateEventId`].
pub async fn reused_event_ids_are_rejected(store: Arc<dyn EventStore>) {
    let store = &*store;
    assert_fresh(store).await;
    let s = stream("conformance-ids");
    let t = stream("conformance-elsewhere");
    let stored = events("stored", 3);
    let appended = append_ok(store, &s, ExpectedVersion::NoStream, &stored).await;
    let where_stored: HashMap<String, Version> = appended
        .events
        .iter()
        .map(|event| (event.id.clone(), event.version))
        .collect();
    append_ok(
        store,
        &s,
        ExpectedVersion::Exact(Version(2)),
        &events("later", 1),
    )
    .await;
    let before = snapshot(store).await;
    let new = event("new");

    let cat = |parts: &[&Event]| {
        parts
            .iter()
            .map(|event| (*event).clone())
            .collect::<Vec<_>>()
    };
    let attempts = [
        (
            "a subset",
            &s,
            ExpectedVersion::NoStream,
            cat(&[&stored[0], &stored[1]]),
        ),
        (
            "a superset",
            &s,
            ExpectedVersion::NoStream,
            cat(&[&stored[0], &stored[1], &stored[2], &new]),
        ),
        (
            "another order",
            &s,
            ExpectedVersion::NoStream,
            cat(&[&stored[2], &stored[1], &stored[0]]),
        ),
        (
            "another stream",
            &t,
            ExpectedVersion::NoStream,
            stored.clone(),
        ),
        (
            "another stream, with Any",
            &t,
            ExpectedVersion::Any,
            stored.clone(),
        ),
        (
            "an expected version that did not hold (Exact 0)",
            &s,
            ExpectedVersion::Exact(Version(0)),
            stored.clone(),
        ),
        (
            "an expected version that did not hold (StreamExists)",
            &s,
            ExpectedVersion::StreamExists,
            stored.clone(),
        ),
        (
            "a new event before a stored one",
            &s,
            ExpectedVersion::Any,
            cat(&[&new, &stored[1]]),
        ),
        (
            "a single stored event",
            &t,
            ExpectedVersion::Any,
            cat(&[&stored[2]]),
        ),
    ];
    for (what, target, expected, batch) in attempts {
        let reused: Vec<&str> = batch
            .iter()
            .map(|event| event.id.as_str())
            .filter(|id| where_stored.contains_key(*id))
            .collect();
        match store.append(target, expected, batch.clone()).await {
            Err(Error::DuplicateEventId {
                id,
                stream,
                version,
            }) => {
                assert!(
                    reused.contains(&id.as_str()),
                    "{what}: DuplicateEventId names `{id}`, which is not one of the reused ids {reused:?}"
                );
                assert_eq!(
                    stream, s,
                    "{what}: DuplicateEventId names the wrong stream for `{id}`"
                );
                assert_eq!(
                    Some(&version),
                    where_stored.get(&id),
                    "{what}: DuplicateEventId names the wrong version for `{id}`"
                );
            }
            other => panic!(
                "reusing stored ids in {what} must fail with DuplicateEventId, got {}",
                describe(&other)
            ),
        }
        check_unchanged(store, &before, &format!("reusing ids in {what}")).await;
    }
    expect_stream_not_found(store, &t, "a stream whose every append reused ids").await;
    append_ok(
        store,
        &t,
        ExpectedVersion::NoStream,
        std::slice::from_ref(&new),
    )
    .await;
}

// ---------------------------------------------------------------------------------------
// Round trip
// ---------------------------------------------------------------------------------------

/// Events read back exactly as appended, on every read path.
pub async fn events_round_trip_exactly(store: Arc<dyn EventStore>) {
    let store = &*store;
    assert_fresh(store).await;
    let s = stream("conformance-round-trip");
    let originals = round_trip_events();
    let mut by_stream = store
        .subscribe_stream(&s, Version::START)
        .await
        .unwrap_or_else(|error| panic!("subscribe_stream failed: {error}"));
    let mut by_all = store
        .subscribe_all(Position::START)
        .await
        .unwrap_or_else(|error| panic!("subscribe_all failed: {error}"));
    let want = append_expect(store, &s, ExpectedVersion::NoStream, &originals).await;

    let from_stream = whole_stream(store, &s).await;
    let from_all = whole_log(store).await;
    let mut from_subscription = Vec::new();
    let mut from_all_subscription = Vec::new();
    for _ in 0..originals.len() {
        from_subscription.push(next_event(&mut by_stream, "subscribe_stream").await);
        from_all_subscription.push(next_event(&mut by_all, "subscribe_all").await);
    }
    for (path, got) in [
        ("read_stream", &from_stream),
        ("read_all", &from_all),
        ("subscribe_stream", &from_subscription),
        ("subscribe_all", &from_all_subscription),
    ] {
        check_events(path, got, &want);
        for (got, original) in got.iter().zip(&originals) {
            check_exact(path, &got.event, original);
            assert_eq!(
                got.recorded_at, from_stream[got.version.0 as usize].recorded_at,
                "{path}: recorded_at of version {} differs from read_stream's",
                got.version
            );
        }
    }
}

/// Events with every attribute, extension type and payload kind the envelope allows.
pub(crate) fn round_trip_events() -> Vec<Event> {
    let plus_0530 = FixedOffset::east_opt(5 * 3600 + 30 * 60).expect("a valid offset");
    let minus_0300 = FixedOffset::west_opt(3 * 3600).expect("a valid offset");
    let utc = FixedOffset::east_opt(0).expect("a valid offset");
    let time = |offset: FixedOffset, nanos: u32| {
        offset
            .with_ymd_and_hms(2026, 11, 23, 17, 31, 7)
            .single()
            .expect("an unambiguous time")
            + chrono::Duration::nanoseconds(i64::from(nanos))
    };
    let raw = |text: &str| Data::Json(RawValue::from_string(text.to_owned()).expect("valid JSON"));

    let mut everything = event("everything")
        .with_time(time(plus_0530, 123_456_789))
        .with_subject("Zürich/ü/😀")
        .with_dataschema("https://schemas.example.com/order/placed/v3.json")
        .with_correlation_id("corr-1")
        .with_causation_id("cause-1")
        .with_partition_key("order-42")
        .with_traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
        .with_extension("dataversion", "3")
        .with_extension("count", 42)
        .with_extension("negative", i32::MIN)
        .with_extension("largest", i32::MAX)
        .with_extension("flag", true)
        .with_extension("off", false)
        .with_extension("empty", "");
    everything.data = Some(raw(
        "{ \"z\": 1.50, \"a\" :[true,null, -0.0, 1e3, \"\\u00e9\\n\", {}],\n  \"m\": {\"k\": []} }",
    ));
    everything.datacontenttype = Some("application/json; charset=utf-8".to_owned());

    let all_bytes: Vec<u8> = (0..=255).collect();
    vec![
        everything,
        event("binary")
            .with_binary_data("application/octet-stream", all_bytes)
            .with_time(time(utc, 0)),
        event("empty-binary").with_binary_data("application/octet-stream", Vec::new()),
        Event::new("/conformance", "minimal"),
        {
            let mut text = event("text").with_time(time(minus_0300, 1_000_000));
            text.data = Some(raw("\"plain text, not JSON\""));
            text.datacontenttype = Some("text/plain".to_owned());
            text
        },
        {
            let mut array = event("array");
            array.data = Some(raw("[1,2,3]"));
            array.datacontenttype = None;
            array
        },
        {
            let mut number = event("number").with_time(time(utc, 120_000));
            number.data = Some(raw("-12.5e-3"));
            number
        },
    ]
}

// ---------------------------------------------------------------------------------------
// Concurrency and subscriptions
// ---------------------------------------------------------------------------------------

/// Concurrent writers on own and shared streams keep one contiguous global order.
pub async fn concurrent_appends_keep_one_global_order(store: Arc<dyn EventStore>) {
    assert_fresh(&*store).await;
    let streams = [
        (stream("conformance-shared-any"), Mode::Any),
        (stream("conformance-shared-cas"), Mode::Optimistic),
        (stream("conformance-shared-2"), Mode::Any),
    ];
    let plan = Plan::new(8, 20, &streams);
    let batches_by_id = plan.batch_of_each_id();
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let store = Arc::clone(&store);
        let done = Arc::clone(&done);
        let batches_by_id = batches_by_id.clone();
        tokio::spawn(async move {
            let mut reads = 0_usize;
            while !done.load(Ordering::Acquire) || reads == 0 {
                let log = whole_log(&*store).await;
                check_consistent_prefix(&log, &batches_by_id);
                reads += 1;
                tokio::task::yield_now().await;
            }
            reads
        })
    };
    let acks = plan.run(&store, &[]).finish().await;
    done.store(true, Ordering::Release);
    reader.await.expect("the concurrent reader panicked");

    let log = whole_log(&*store).await;
    check_consistent_prefix(&log, &batches_by_id);
    assert_eq!(
        log.len(),
        acks.len(),
        "the log must hold exactly the acknowledged events"
    );
    let by_id: HashMap<&str, &RecordedEvent> = log
        .iter()
        .map(|recorded| (recorded.event.id.as_str(), recorded))
        .collect();
    assert_eq!(
        by_id.len(),
        log.len(),
        "an event id appears twice in the log"
    );
    for ack in &acks {
        let recorded = by_id.get(ack.id.as_str()).unwrap_or_else(|| {
            panic!(
                "the acknowledged event `{}` is missing from the log",
                ack.id
            )
        });
        assert_eq!(
            (&recorded.stream, recorded.version, recorded.position),
            (&ack.stream, ack.version, ack.position),
            "event `{}` is not where its acknowledgement said",
            ack.id
        );
    }
    assert_eq!(
        head(&*store).await,
        Some(Position(log.len() as u64 - 1)),
        "head after concurrent appends"
    );
    let mut last_versions: HashMap<&StreamName, u64> = HashMap::new();
    for recorded in &log {
        let next = last_versions.entry(&recorded.stream).or_insert(0);
        *next = recorded.version.0 + 1;
    }
    for (name, next) in last_versions {
        assert_eq!(
            version_of(&*store, name).await,
            Some(Version(next - 1)),
            "stream_version of `{name}` after concurrent appends"
        );
    }

    // Paged reads agree with the full read.
    let mut paged = Vec::new();
    let mut from = Position::START;
    loop {
        let page = read_all(&*store, from, Direction::Forward, 7).await;
        let Some(last) = page.last() else { break };
        from = Position(last.position.0 + 1);
        paged.extend(page);
    }
    assert_same_records("paged read_all", &paged, &log);
}

/// A subscription from position 0 opened under concurrent writes sees exactly the log.
pub async fn subscribe_all_from_start_under_concurrent_writes(store: Arc<dyn EventStore>) {
    assert_fresh(&*store).await;
    let streams = [
        (stream("conformance-s0"), Mode::Any),
        (stream("conformance-s1"), Mode::Optimistic),
        (stream("conformance-s2"), Mode::Any),
    ];
    preload(&*store, &streams, 40).await;
    let sentinel = event("sentinel");
    // The writers pause twice; a subscription is opened at each pause, and the writers
    // resume while it catches up.
    let mut writers = Plan::new(4, 24, &streams).run(&store, &[6, 16]);

    writers.reach(0).await;
    let early = subscribe_all(&*store, Position::START).await;
    let early = spawn_collect(early, &sentinel, "subscribe_all(0) opened early");
    writers.release(0);
    writers.reach(1).await;
    let late = subscribe_all(&*store, Position::START).await;
    let late = spawn_collect(late, &sentinel, "subscribe_all(0) opened late");
    writers.release(1);

    writers.finish().await;
    append_ok(
        &*store,
        &streams[0].0,
        ExpectedVersion::Any,
        std::slice::from_ref(&sentinel),
    )
    .await;
    let log = whole_log(&*store).await;
    assert_same_records(
        "subscribe_all(0) opened early",
        &join_collector(early).await,
        &log,
    );
    assert_same_records(
        "subscribe_all(0) opened late",
        &join_collector(late).await,
        &log,
    );
}

/// Subscriptions from the middle of the log and from beyond its head.
pub async fn subscribe_all_from_middle_and_future_positions(store: Arc<dyn EventStore>) {
    assert_fresh(&*store).await;
    let streams = [
        (stream("conformance-m0"), Mode::Any),
        (stream("conformance-m1"), Mode::Optimistic),
    ];
    preload(&*store, &streams, 30).await;
    let head_before = head(&*store).await.expect("the preloaded log has a head");
    let sentinel = event("sentinel");

    let future = Position(head_before.0 + 5);
    let from_future = subscribe_all(&*store, future).await;
    let from_future = spawn_collect(from_future, &sentinel, "subscribe_all from beyond the head");

    let mut writers = Plan::new(3, 20, &streams).run(&store, &[7]);
    writers.reach(0).await;
    let middle = Position(13);
    let from_middle = subscribe_all(&*store, middle).await;
    let from_middle = spawn_collect(from_middle, &sentinel, "subscribe_all from the middle");
    writers.release(0);

    writers.finish().await;
    append_ok(
        &*store,
        &streams[0].0,
        ExpectedVersion::Any,
        std::slice::from_ref(&sentinel),
    )
    .await;
    assert_same_records(
        "subscribe_all from the middle",
        &join_collector(from_middle).await,
        &read_all(&*store, middle, Direction::Forward, usize::MAX).await,
    );
    assert_same_records(
        "subscribe_all from beyond the head",
        &join_collector(from_future).await,
        &read_all(&*store, future, Direction::Forward, usize::MAX).await,
    );
}

/// Stream subscriptions see exactly their stream, including one that did not exist yet.
pub async fn subscribe_stream_under_concurrent_writes(store: Arc<dyn EventStore>) {
    assert_fresh(&*store).await;
    let target = stream("conformance-target");
    let later = stream("conformance-later");
    let other = stream("conformance-noise");
    append_ok(
        &*store,
        &target,
        ExpectedVersion::NoStream,
        &events("target", 10),
    )
    .await;
    let target_sentinel = event("target-sentinel");
    let later_sentinel = event("later-sentinel");

    let from_nothing = subscribe_stream(&*store, &later, Version::START).await;
    let from_nothing = spawn_collect(
        from_nothing,
        &later_sentinel,
        "subscribe_stream before the stream exists",
    );

    let streams = [
        (target.clone(), Mode::Any),
        (other.clone(), Mode::Any),
        (later.clone(), Mode::Optimistic),
        (target.clone(), Mode::Optimistic),
    ];
    let mut writers = Plan::new(3, 20, &streams).run(&store, &[7]);
    writers.reach(0).await;
    let from_start = subscribe_stream(&*store, &target, Version::START).await;
    let from_start = spawn_collect(
        from_start,
        &target_sentinel,
        "subscribe_stream from version 0",
    );
    let from_seven = subscribe_stream(&*store, &target, Version(7)).await;
    let from_seven = spawn_collect(
        from_seven,
        &target_sentinel,
        "subscribe_stream from version 7",
    );
    writers.release(0);

    writers.finish().await;
    append_ok(
        &*store,
        &later,
        ExpectedVersion::Any,
        std::slice::from_ref(&later_sentinel),
    )
    .await;
    append_ok(
        &*store,
        &target,
        ExpectedVersion::Any,
        std::slice::from_ref(&target_sentinel),
    )
    .await;
    assert_same_records(
        "subscribe_stream from version 0",
        &join_collector(from_start).await,
        &whole_stream(&*store, &target).await,
    );
    assert_same_records(
        "subscribe_stream from version 7",
        &join_collector(from_seven).await,
        &read_stream(&*store, &target, Version(7), Direction::Forward, usize::MAX).await,
    );
    assert_same_records(
        "subscribe_stream before the stream exists",
        &join_collector(from_nothing).await,
        &whole_stream(&*store, &later).await,
    );
}

// ---------------------------------------------------------------------------------------
// Soft delete, missing streams, empty appends
// ---------------------------------------------------------------------------------------

/// A soft-deleted stream reads as deleted, stays in the log, and revives on append.
pub async fn soft_delete_hides_stream_and_append_revives_it(store: Arc<dyn EventStore>) {
    let store = &*store;
    assert_fresh(store).await;
    let s = stream("conformance-deleted");
    let other = stream("conformance-kept");
    let mut log = append_expect(store, &s, ExpectedVersion::NoStream, &events("s", 3)).await;
    log.extend(append_expect(store, &other, ExpectedVersion::NoStream, &events("o", 1)).await);

    expect_wrong_expected_version(
        "delete expecting a stale version",
        store
            .delete_stream(&s, ExpectedVersion::Exact(Version(1)))
            .await,
        &s,
        ExpectedVersion::Exact(Version(1)),
        Some(Version(2)),
    );
    check_events(
        "a stream whose delete was rejected",
        &whole_stream(store, &s).await,
        &log[..3],
    );

    store
        .delete_stream(&s, ExpectedVersion::Exact(Version(2)))
        .await
        .unwrap_or_else(|error| panic!("delete expecting the current version failed: {error}"));
    for direction in [Direction::Forward, Direction::Backward] {
        match store
            .read_stream(&s, Version::START, direction, usize::MAX)
            .await
        {
            Err(Error::StreamDeleted { stream }) if stream == s => {}
            other => panic!(
                "reading a deleted stream ({direction:?}) must fail with StreamDeleted, got {}",
                describe(&other)
            ),
        }
    }
    assert_eq!(
        version_of(store, &s).await,
        None,
        "stream_version of a deleted stream"
    );
    assert_eq!(
        head(store).await,
        Some(Position(3)),
        "a delete appends nothing to the log"
    );
    check_events(
        "read_all after a soft delete",
        &whole_log(store).await,
        &log,
    );

    for expected in [
        ExpectedVersion::Exact(Version(2)),
        ExpectedVersion::StreamExists,
    ] {
        expect_wrong_expected_version(
            &format!("append to a deleted stream expecting {expected}"),
            store.append(&s, expected, events("rejected", 1)).await,
            &s,
            expected,
            None,
        );
    }

    let revival = events("revived", 2);
    let appended = append_ok(store, &s, ExpectedVersion::NoStream, &revival).await;
    check_appended(
        "the append reviving a deleted stream",
        &appended,
        &revival,
        3,
        4,
    );
    let revived = expected_from(&s, &revival, &appended);
    assert_eq!(version_of(store, &s).await, Some(Version(4)));
    let read = |from: Version, direction| read_stream(store, &s, from, direction, usize::MAX);
    check_events(
        "a revived stream, forward",
        &read(Version::START, Direction::Forward).await,
        &revived,
    );
    check_events(
        "a revived stream, forward from 1",
        &read(Version(1), Direction::Forward).await,
        &revived,
    );
    check_events(
        "a revived stream, forward from 4",
        &read(Version(4), Direction::Forward).await,
        &revived[1..],
    );
    let backward: Vec<_> = revived.iter().rev().cloned().collect();
    check_events(
        "a revived stream, backward from END",
        &read(Version::END, Direction::Backward).await,
        &backward,
    );
    check_events(
        "a revived stream, backward from a deleted version",
        &read(Version(2), Direction::Backward).await,
        &[],
    );
    let retried = append_ok(store, &s, ExpectedVersion::NoStream, &revival).await;
    assert_eq!(
        retried, appended,
        "retrying the reviving append must return its original result"
    );

    store
        .delete_stream(&s, ExpectedVersion::Any)
        .await
        .unwrap_or_else(|error| panic!("delete with Any failed: {error}"));
    let again = events("revived-again", 1);
    let appended = append_ok(store, &s, ExpectedVersion::Any, &again).await;
    check_appended(
        "the append reviving a stream deleted twice",
        &appended,
        &again,
        5,
        6,
    );
    check_events(
        "a stream revived twice",
        &read(Version::START, Direction::Forward).await,
        &expected_from(&s, &again, &appended),
    );
    assert_eq!(
        whole_log(store).await.len(),
        7,
        "soft deletes keep every event in the log"
    );
}

/// Deleting a stream that does not exist, or no longer does, is rejected.
pub async fn delete_of_missing_stream_is_rejected(store: Arc<dyn EventStore>) {
    let store = &*store;
    assert_fresh(store).await;
    let never = stream("conformance-never");
    let deleted = stream("conformance-deleted");
    append_ok(store, &deleted, ExpectedVersion::NoStream, &events("d", 2)).await;
    store
        .delete_stream(&deleted, ExpectedVersion::Exact(Version(1)))
        .await
        .unwrap_or_else(|error| panic!("deleting an existing stream failed: {error}"));
    let before = snapshot(store).await;

    for expected in [ExpectedVersion::Any, ExpectedVersion::NoStream] {
        match store.delete_stream(&never, expected).await {
            Err(Error::StreamNotFound { stream }) if stream == never => {}
            other => panic!(
                "deleting a stream that never existed, expecting {expected}, must fail with StreamNotFound, got {}",
                describe(&other)
            ),
        }
        match store.delete_stream(&deleted, expected).await {
            Err(Error::StreamDeleted { stream }) if stream == deleted => {}
            other => panic!(
                "deleting a deleted stream, expecting {expected}, must fail with StreamDeleted, got {}",
                describe(&other)
            ),
        }
    }
    for target in [&never, &deleted] {
        for expected in [
            ExpectedVersion::StreamExists,
            ExpectedVersion::Exact(Version(0)),
            ExpectedVersion::Exact(Version(1)),
        ] {
            expect_wrong_expected_version(
                &format!("deleting missing stream `{target}` expecting {expected}"),
                store.delete_stream(target, expected).await,
                target,
                expected,
                None,
            );
        }
    }
    check_unchanged(store, &before, "rejected deletes").await;
    expect_stream_not_found(store, &never, "a stream never appended to, after deletes").await;
}

/// Unknown streams read as [`Error::StreamNotFound`]; empty appends fail.
pub async fn unknown_stream_and_empty_append_are_errors(store: Arc<dyn EventStore>) {
    let store = &*store;
    assert_fresh(store).await;
    let unknown = stream("conformance-unknown");
    expect_stream_not_found(store, &unknown, "a stream never appended to").await;
    assert_eq!(version_of(store, &unknown).await, None);

    for expected in [ExpectedVersion::Any, ExpectedVersion::NoStream] {
        match store.append(&unknown, expected, Vec::new()).await {
            Err(Error::EmptyAppend) => {}
            other => panic!(
                "an append without events must fail with EmptyAppend, got {}",
                describe(&other)
            ),
        }
    }
    expect_stream_not_found(store, &unknown, "a stream whose only append was empty").await;
    assert_eq!(
        head(store).await,
        None,
        "an empty append must not change the head"
    );

    let known = stream("conformance-known");
    append_ok(store, &known, ExpectedVersion::NoStream, &events("k", 1)).await;
    let before = snapshot(store).await;
    match store
        .append(&known, ExpectedVersion::Exact(Version(0)), Vec::new())
        .await
    {
        Err(Error::EmptyAppend) => {}
        other => panic!(
            "an empty append to an existing stream must fail with EmptyAppend, got {}",
            describe(&other)
        ),
    }
    check_unchanged(store, &before, "an empty append to an existing stream").await;
}

// ---------------------------------------------------------------------------------------
// The workload of concurrent writers
// ---------------------------------------------------------------------------------------

/// How a writer appends to a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// With [`ExpectedVersion::Any`].
    Any,
    /// Reads the stream's version, appends with `NoStream`/`Exact`, retries on conflict.
    Optimistic,
}

/// One planned append.
#[derive(Clone)]
struct Batch {
    stream: StreamName,
    mode: Mode,
    events: Vec<Event>,
}

/// The appends of every writer, fixed in advance so that a concurrent reader knows which
/// events belong together.
struct Plan {
    writers: Vec<Vec<Batch>>,
}

/// Where an acknowledged event was stored.
#[derive(Debug, Clone)]
struct Ack {
    id: String,
    stream: StreamName,
    version: Version,
    position: Position,
}

impl Plan {
    /// `writers` writers making `appends` appends each, to `streams` and to a stream of
    /// their own, in batches of 1 to 3 events.
    fn new(writers: usize, appends: usize, streams: &[(StreamName, Mode)]) -> Plan {
        let writers = (0..writers)
            .map(|writer| {
                let own_stream = stream(&format!("conformance-own-{writer}"));
                (0..appends)
                    .map(|append| {
                        let pick = (writer * 7 + append * 3) % (streams.len() + 1);
                        let (stream, mode) = match streams.get(pick) {
                            Some((stream, mode)) => (stream.clone(), *mode),
                            None => (own_stream.clone(), Mode::Optimistic),
                        };
                        let len = 1 + (writer + append) % 3;
                        Batch {
                            stream,
                            mode,
                            events: events(&format!("w{writer}-a{append}"), len),
                        }
                    })
                    .collect()
            })
            .collect();
        Plan { writers }
    }

    /// Every event id → the ids of its batch.
    fn batch_of_each_id(&self) -> Arc<HashMap<String, Arc<Vec<String>>>> {
        let mut map = HashMap::new();
        for batch in self.writers.iter().flatten() {
            let ids: Arc<Vec<String>> =
                Arc::new(batch.events.iter().map(|event| event.id.clone()).collect());
            for id in ids.iter() {
                map.insert(id.clone(), Arc::clone(&ids));
            }
        }
        Arc::new(map)
    }

    /// Starts the writers. Each writer stops before its append number `pauses[k]` until
    /// [`Running::release`]`(k)`; `pauses` must be ascending.
    fn run(self, store: &Arc<dyn EventStore>, pauses: &[usize]) -> Running {
        let (progress, progress_rx) = watch::channel(0_usize);
        let progress = Arc::new(progress);
        let (gate, gate_rx) = watch::channel(0_usize);
        // One past the greatest acknowledged position so far (0: none yet).
        let acked_end = Arc::new(AtomicU64::new(0));
        let writer_count = self.writers.len();
        let handles = self
            .writers
            .into_iter()
            .map(|batches| {
                let store = Arc::clone(store);
                let progress = Arc::clone(&progress);
                let acked_end = Arc::clone(&acked_end);
                let mut gate = gate_rx.clone();
                let pauses = pauses.to_vec();
                tokio::spawn(async move {
                    let mut acks = Vec::new();
                    for (index, batch) in batches.into_iter().enumerate() {
                        if let Some(stage) = pauses.iter().position(|pause| *pause == index) {
                            wait_until(&mut gate, stage + 1, "the case to release the writers")
                                .await;
                        }
                        let floor = acked_end.load(Ordering::Acquire);
                        let appended = write(&*store, &batch).await;
                        for event in &appended.events {
                            assert!(
                                event.position.0 >= floor,
                                "event `{}` got position {} although position {} was acknowledged before its append started",
                                event.id,
                                event.position,
                                floor.saturating_sub(1)
                            );
                            acks.push(Ack {
                                id: event.id.clone(),
                                stream: batch.stream.clone(),
                                version: event.version,
                                position: event.position,
                            });
                        }
                        let end = appended.events.iter().map(|event| event.position.0 + 1).max();
                        acked_end.fetch_max(end.unwrap_or(0), Ordering::AcqRel);
                        progress.send_modify(|count| *count += 1);
                        // Let subscribers and readers run between appends.
                        tokio::task::yield_now().await;
                    }
                    acks
                })
            })
            .collect();
        Running {
            handles,
            progress: progress_rx,
            gate,
            writer_count,
            pauses: pauses.to_vec(),
        }
    }
}

/// Writers at work.
struct Running {
    handles: Vec<tokio::task::JoinHandle<Vec<Ack>>>,
    /// The number of acknowledged appends.
    progress: watch::Receiver<usize>,
    /// The number of pauses released.
    gate: watch::Sender<usize>,
    writer_count: usize,
    pauses: Vec<usize>,
}

impl Running {
    /// Waits until every writer has stopped at pause `stage`.
    async fn reach(&mut self, stage: usize) {
        let appends = self.writer_count * self.pauses[stage];
        wait_until(&mut self.progress, appends, "the writers to reach a pause").await;
    }

    /// Lets the writers go on past pause `stage`.
    fn release(&self, stage: usize) {
        self.gate.send_replace(stage + 1);
    }

    /// Releases every pause and waits for the writers; their acknowledgements.
    async fn finish(self) -> Vec<Ack> {
        self.gate.send_replace(self.pauses.len());
        let mut acks = Vec::new();
        for handle in self.handles {
            acks.extend(handle.await.expect("a writer task panicked"));
        }
        acks
    }
}

/// Waits until `counter` reaches `target`, within [`WAIT_MAX`].
async fn wait_until(counter: &mut watch::Receiver<usize>, target: usize, what: &str) {
    let waited = tokio::time::timeout(WAIT_MAX, counter.wait_for(|count| *count >= target)).await;
    match waited {
        Ok(Ok(_)) => {}
        Ok(Err(_)) => panic!("gave up waiting for {what}: the other side is gone"),
        Err(_) => panic!("waited {WAIT_MAX:?} for {what}"),
    }
}

async fn write(store: &dyn EventStore, batch: &Batch) -> Appended {
    let appended = match batch.mode {
        Mode::Any => append_ok(store, &batch.stream, ExpectedVersion::Any, &batch.events).await,
        Mode::Optimistic => {
            let mut attempts = 0;
            loop {
                attempts += 1;
                assert!(
                    attempts <= CAS_ATTEMPTS_MAX,
                    "an optimistic append to `{}` conflicted {CAS_ATTEMPTS_MAX} times",
                    batch.stream
                );
                let current = version_of(store, &batch.stream).await;
                let expected = current.map_or(ExpectedVersion::NoStream, ExpectedVersion::Exact);
                match store
                    .append(&batch.stream, expected, batch.events.clone())
                    .await
                {
                    Ok(appended) => {
                        let first = current.map_or(0, |version| version.0 + 1);
                        assert_eq!(
                            appended.events[0].version,
                            Version(first),
                            "an append to `{}` expecting {expected} must start at version {first}",
                            batch.stream
                        );
                        break appended;
                    }
                    Err(Error::WrongExpectedVersion { .. }) => continue,
                    Err(error) => {
                        panic!("an optimistic append to `{}` failed: {error}", batch.stream)
                    }
                }
            }
        }
    };
    assert_eq!(
        appended.events.len(),
        batch.events.len(),
        "an append must report one entry per event"
    );
    appended
}

/// Appends `count` events spread over `streams`, one writer.
async fn preload(store: &dyn EventStore, streams: &[(StreamName, Mode)], count: usize) {
    let mut written = 0;
    let mut round = 0;
    while written < count {
        let (name, _) = &streams[round % streams.len()];
        let len = (1 + round % 3).min(count - written);
        append_ok(
            store,
            name,
            ExpectedVersion::Any,
            &events(&format!("pre{round}"), len),
        )
        .await;
        written += len;
        round += 1;
    }
}

/// Checks what a reader saw while writers were running: contiguous positions from 0,
/// contiguous versions per stream, and every batch complete or absent.
fn check_consistent_prefix(log: &[RecordedEvent], batches: &HashMap<String, Arc<Vec<String>>>) {
    let mut next_version: HashMap<&StreamName, u64> = HashMap::new();
    let ids: HashSet<&str> = log
        .iter()
        .map(|recorded| recorded.event.id.as_str())
        .collect();
    for (index, recorded) in log.iter().enumerate() {
        assert_eq!(
            recorded.position,
            Position(index as u64),
            "read_all must return contiguous positions from 0, found a gap before `{}`",
            recorded.event.id
        );
        let next = next_version.entry(&recorded.stream).or_insert(0);
        assert_eq!(
            recorded.version,
            Version(*next),
            "versions of `{}` must be contiguous and rise with position",
            recorded.stream
        );
        *next += 1;
        if let Some(batch) = batches.get(&recorded.event.id) {
            let missing: Vec<&String> = batch
                .iter()
                .filter(|id| !ids.contains(id.as_str()))
                .collect();
            assert!(
                missing.is_empty(),
                "a reader saw part of a batch: `{}` is visible but {missing:?} of its batch are not",
                recorded.event.id
            );
        }
    }
}

fn spawn_collect(
    subscription: Subscription,
    sentinel: &Event,
    what: &'static str,
) -> tokio::task::JoinHandle<Vec<RecordedEvent>> {
    let sentinel = sentinel.id.clone();
    tokio::spawn(async move {
        let mut subscription = subscription;
        let mut got = Vec::new();
        loop {
            let next = next_event(&mut subscription, what).await;
            let done = next.event.id == sentinel;
            got.push(next);
            if done {
                return got;
            }
        }
    })
}

async fn join_collector(
    collector: tokio::task::JoinHandle<Vec<RecordedEvent>>,
) -> Vec<RecordedEvent> {
    collector.await.expect("a subscriber task panicked")
}

async fn next_event(subscription: &mut Subscription, what: &str) -> RecordedEvent {
    match tokio::time::timeout(WAIT_MAX, subscription.next()).await {
        Err(_) => panic!(
            "{what}: no event within {WAIT_MAX:?}; the subscription hangs or skipped an event"
        ),
        Ok(None) => panic!("{what}: the subscription ended"),
        Ok(Some(Err(error))) => panic!("{what}: the subscription failed: {error}"),
        Ok(Some(Ok(recorded))) => recorded,
    }
}

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

const SOURCE: &str = "/herald/conformance";
const TYPE: &str = "herald.conformance.tested";

/// What a read must return for one event.
#[derive(Debug, Clone)]
struct Expected {
    stream: StreamName,
    version: Version,
    position: Position,
    event: Event,
}

/// The state a failed operation must leave untouched.
struct Snapshot {
    head: Option<Position>,
    log: Vec<RecordedEvent>,
    versions: HashMap<StreamName, Option<Version>>,
}

fn stream(name: &str) -> StreamName {
    StreamName::new(name).expect("the suite's stream names are valid")
}

fn event(label: &str) -> Event {
    Event::new(SOURCE, TYPE)
        .with_subject(label)
        .with_data(json!({ "label": label }))
}

fn events(prefix: &str, count: usize) -> Vec<Event> {
    (0..count)
        .map(|n| event(&format!("{prefix}-{n}")))
        .collect()
}

async fn assert_fresh(store: &dyn EventStore) {
    assert_eq!(
        head(store).await,
        None,
        "each conformance case needs a fresh, empty store"
    );
}

async fn append_ok(
    store: &dyn EventStore,
    stream: &StreamName,
    expected: ExpectedVersion,
    events: &[Event],
) -> Appended {
    store
        .append(stream, expected, events.to_vec())
        .await
        .unwrap_or_else(|error| {
            panic!(
                "appending {} events to `{stream}` expecting {expected} failed: {error}",
                events.len()
            )
        })
}

async fn append_expect(
    store: &dyn EventStore,
    stream: &StreamName,
    expected: ExpectedVersion,
    events: &[Event],
) -> Vec<Expected> {
    let appended = append_ok(store, stream, expected, events).await;
    expected_from(stream, events, &appended)
}

fn expected_from(stream: &StreamName, events: &[Event], appended: &Appended) -> Vec<Expected> {
    assert_eq!(
        appended.events.len(),
        events.len(),
        "an append must report one entry per event"
    );
    events
        .iter()
        .zip(&appended.events)
        .map(|(event, at)| Expected {
            stream: stream.clone(),
            version: at.version,
            position: at.position,
            event: event.clone(),
        })
        .collect()
}

fn check_appended(what: &str, appended: &Appended, events: &[Event], version: u64, position: u64) {
    let got: Vec<(&str, Version, Position)> = appended
        .events
        .iter()
        .map(|event| (event.id.as_str(), event.version, event.position))
        .collect();
    let want: Vec<(&str, Version, Position)> = events
        .iter()
        .enumerate()
        .map(|(n, event)| {
            (
                event.id.as_str(),
                Version(version + n as u64),
                Position(position + n as u64),
            )
        })
        .collect();
    assert_eq!(
        got, want,
        "{what}: (id, version, position) of each appended event"
    );
}

async fn head(store: &dyn EventStore) -> Option<Position> {
    store
        .head()
        .await
        .unwrap_or_else(|error| panic!("head failed: {error}"))
}

async fn version_of(store: &dyn EventStore, stream: &StreamName) -> Option<Version> {
    store
        .stream_version(stream)
        .await
        .unwrap_or_else(|error| panic!("stream_version of `{stream}` failed: {error}"))
}

async fn read_stream(
    store: &dyn EventStore,
    stream: &StreamName,
    from: Version,
    direction: Direction,
    limit: usize,
) -> Vec<RecordedEvent> {
    store
        .read_stream(stream, from, direction, limit)
        .await
        .unwrap_or_else(|error| {
            panic!(
                "read_stream of `{stream}` from {from} {direction:?} limit {limit} failed: {error}"
            )
        })
}

async fn read_all(
    store: &dyn EventStore,
    from: Position,
    direction: Direction,
    limit: usize,
) -> Vec<RecordedEvent> {
    store
        .read_all(from, direction, limit)
        .await
        .unwrap_or_else(|error| {
            panic!("read_all from {from} {direction:?} limit {limit} failed: {error}")
        })
}

/// Every event of `stream`, forward.
async fn whole_stream(store: &dyn EventStore, stream: &StreamName) -> Vec<RecordedEvent> {
    read_stream(
        store,
        stream,
        Version::START,
        Direction::Forward,
        usize::MAX,
    )
    .await
}

/// Every event of the log, forward.
async fn whole_log(store: &dyn EventStore) -> Vec<RecordedEvent> {
    read_all(store, Position::START, Direction::Forward, usize::MAX).await
}

async fn subscribe_all(store: &dyn EventStore, from: Position) -> Subscription {
    store
        .subscribe_all(from)
        .await
        .unwrap_or_else(|error| panic!("subscribe_all from {from} failed: {error}"))
}

async fn subscribe_stream(
    store: &dyn EventStore,
    stream: &StreamName,
    from: Version,
) -> Subscription {
    store
        .subscribe_stream(stream, from)
        .await
        .unwrap_or_else(|error| panic!("subscribe_stream `{stream}` from {from} failed: {error}"))
}

async fn snapshot(store: &dyn EventStore) -> Snapshot {
    let log = whole_log(store).await;
    let mut versions = HashMap::new();
    for recorded in &log {
        if !versions.contains_key(&recorded.stream) {
            let version = version_of(store, &recorded.stream).await;
            versions.insert(recorded.stream.clone(), version);
        }
    }
    Snapshot {
        head: head(store).await,
        log,
        versions,
    }
}

async fn check_unchanged(store: &dyn EventStore, before: &Snapshot, what: &str) {
    assert_eq!(
        head(store).await,
        before.head,
        "{what} must not change the head"
    );
    for (name, version) in &before.versions {
        assert_eq!(
            &version_of(store, name).await,
            version,
            "{what} must not change the version of `{name}`"
        );
    }
    let log = whole_log(store).await;
    assert_same_records(&format!("the log after {what}"), &log, &before.log);
}

async fn expect_stream_not_found(store: &dyn EventStore, stream: &StreamName, what: &str) {
    for direction in [Direction::Forward, Direction::Backward] {
        match store
            .read_stream(stream, Version::START, direction, usize::MAX)
            .await
        {
            Err(Error::StreamNotFound { stream: named }) if named == *stream => {}
            other => panic!(
                "reading {what} ({direction:?}) must fail with StreamNotFound, got {}",
                describe(&other)
            ),
        }
    }
    assert_eq!(
        version_of(store, stream).await,
        None,
        "stream_version of {what}"
    );
}

fn expect_wrong_expected_version<T: std::fmt::Debug>(
    what: &str,
    result: Result<T, Error>,
    stream: &StreamName,
    expected: ExpectedVersion,
    actual: Option<Version>,
) {
    match result {
        Err(Error::WrongExpectedVersion {
            stream: named,
            expected: reported,
            actual: reported_actual,
        }) => {
            assert_eq!(
                &named, stream,
                "{what}: WrongExpectedVersion names the wrong stream"
            );
            assert_eq!(
                reported, expected,
                "{what}: WrongExpectedVersion reports the wrong expectation"
            );
            assert_eq!(
                reported_actual, actual,
                "{what}: WrongExpectedVersion must carry the stream's actual version"
            );
        }
        other => panic!(
            "{what} must fail with WrongExpectedVersion (actual {actual:?}), got {}",
            describe(&other)
        ),
    }
}

fn describe<T: std::fmt::Debug>(result: &Result<T, Error>) -> String {
    match result {
        Ok(value) => format!("Ok({value:?})"),
        Err(error) => format!("Err({error:?})"),
    }
}

fn summary(stream: &StreamName, version: Version, position: Position, id: &str) -> String {
    format!("{stream}@{version}#{position}({id})")
}

fn check_events(what: &str, got: &[RecordedEvent], want: &[Expected]) {
    let got_summary: Vec<String> = got
        .iter()
        .map(|r| summary(&r.stream, r.version, r.position, &r.event.id))
        .collect();
    let want_summary: Vec<String> = want
        .iter()
        .map(|e| summary(&e.stream, e.version, e.position, &e.event.id))
        .collect();
    assert_eq!(
        got_summary, want_summary,
        "{what}: stream@version#position(id) of each event"
    );
    for (got, want) in got.iter().zip(want) {
        assert_eq!(
            got.event, want.event,
            "{what}: the event at {} differs from the one appended",
            got.position
        );
    }
}

fn assert_same_records(what: &str, got: &[RecordedEvent], want: &[RecordedEvent]) {
    let summarise = |records: &[RecordedEvent]| -> Vec<String> {
        records
            .iter()
            .map(|r| summary(&r.stream, r.version, r.position, &r.event.id))
            .collect()
    };
    let (got_summary, want_summary) = (summarise(got), summarise(want));
    if got_summary != want_summary {
        let diverge = got_summary
            .iter()
            .zip(&want_summary)
            .position(|(a, b)| a != b)
            .unwrap_or(got_summary.len().min(want_summary.len()));
        panic!(
            "{what}: got {} events, want {}; first difference at index {diverge}: got {:?}, want {:?}",
            got.len(),
            want.len(),
            got_summary.get(diverge),
            want_summary.get(diverge)
        );
    }
    for (got, want) in got.iter().zip(want) {
        assert_eq!(
            got.event, want.event,
            "{what}: the event at {} differs",
            got.position
        );
    }
}

/// Equality, plus what [`Event`]'s `PartialEq` does not see: the time's offset (chrono
/// compares instants) and the exact encoding.
pub(crate) fn check_exact(what: &str, got: &Event, want: &Event) {
    assert_eq!(
        got, want,
        "{what}: event `{}` differs from the one appended",
        want.id
    );
    assert_eq!(
        got.time.map(|time| *time.offset()),
        want.time.map(|time| *time.offset()),
        "{what}: event `{}` lost the offset of its time",
        want.id
    );
    assert_eq!(
        String::from_utf8_lossy(&got.to_json()),
        String::from_utf8_lossy(&want.to_json()),
        "{what}: event `{}` encodes differently from the one appended",
        want.id
    );
}
