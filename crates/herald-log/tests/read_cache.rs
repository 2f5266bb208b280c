//! The read cache: the events appended last are read from memory, and what is read from
//! there is exactly what reading their records gives.

mod common;

use chrono::{DateTime, FixedOffset};
use herald_core::event::Data;
use herald_core::{Direction, Event, EventStore, ExpectedVersion, Position, StreamName, Version};
use herald_log::{Log, Options};

/// Events using every attribute the format has, so that a difference between an event as
/// appended and as decoded from its record would show.
fn event(n: usize) -> Event {
    let time: DateTime<FixedOffset> =
        DateTime::parse_from_rfc3339("2024-02-29T23:59:59.123456789+05:30").unwrap();
    let event = Event::new("/orders", "OrderPlaced")
        .with_id(format!("event-{n}"))
        .with_time(time)
        .with_subject(format!("order-{n}"))
        .with_dataschema("https://example.com/order.json")
        .with_extension("attempt", n as i32)
        .with_extension("urgent", n.is_multiple_of(2))
        .with_correlation_id("correlation \"quoted\" é")
        .with_partition_key(format!("key-{}", n % 3));
    match n % 3 {
        0 => event.with_binary_data("application/octet-stream", vec![0, 1, 2, n as u8]),
        1 => Event {
            // Raw JSON keeps its text, inner whitespace included.
            data: Some(Data::Json(
                serde_json::value::RawValue::from_string(format!("{{ \"n\" : [ {n}, 2 ] }}"))
                    .unwrap(),
            )),
            datacontenttype: Some("application/json".to_owned()),
            ..event
        },
        _ => event.with_data(serde_json::json!({ "n": n, "text": "x".repeat(n) })),
    }
}

fn options(dir: &std::path::Path, read_cache_bytes_max: u64) -> Options {
    Options {
        read_cache_bytes_max,
        ..common::options(dir)
    }
}

/// Appends `events` in batches; with `live`, reads each batch back after its append, as a
/// subscriber keeping up with the log does.
async fn append_all(log: &Log, events: &[Event], live: bool) {
    for (n, batch) in events.chunks(7).enumerate() {
        let stream = StreamName::new(if n.is_multiple_of(2) { "even" } else { "odd" }).unwrap();
        let appended = log
            .append(&stream, ExpectedVersion::Any, batch.to_vec())
            .await
            .unwrap();
        if live {
            let first = appended.events[0].position;
            let read = log.read_all(first, Direction::Forward, 100).await.unwrap();
            assert_eq!(read.len(), batch.len());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_events_equal_their_records() {
    let dir = tempfile::tempdir().unwrap();
    let events: Vec<Event> = (0..120).map(event).collect();
    // Small enough that a read of everything takes the first events from their records
    // and the last ones from the cache.
    let log = Log::open(options(dir.path(), 16 * 1024)).unwrap();
    append_all(&log, &events, true).await;
    let all = common::read_everything(&log).await;
    let backward = log
        .read_all(Position(119), Direction::Backward, 200)
        .await
        .unwrap();
    let odd = log
        .read_stream(
            &StreamName::new("odd").unwrap(),
            Version::START,
            Direction::Forward,
            100,
        )
        .await
        .unwrap();
    log.close().await.unwrap();

    let log = Log::open(options(dir.path(), 0)).unwrap();
    assert_eq!(all, common::read_everything(&log).await);
    let appended: Vec<Event> = all.iter().map(|recorded| recorded.event.clone()).collect();
    assert_eq!(appended, events);
    assert_eq!(
        backward,
        log.read_all(Position(119), Direction::Backward, 200)
            .await
            .unwrap()
    );
    assert_eq!(
        odd,
        log.read_stream(
            &StreamName::new("odd").unwrap(),
            Version::START,
            Direction::Forward,
            100,
        )
        .await
        .unwrap()
    );
}

/// Zeroes every segment: from then on only the cache can answer.
fn destroy_segments(dir: &std::path::Path) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|ext| ext == "log") {
            let len = std::fs::metadata(&path).unwrap().len();
            std::fs::write(&path, vec![0; len as usize]).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_events_appended_last_are_read_from_memory() {
    let events: Vec<Event> = (0..120).map(event).collect();
    let last = |log: &Log| {
        let log = log.clone();
        async move { log.read_all(Position(110), Direction::Forward, 10).await }
    };

    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(options(dir.path(), 64 * 1024)).unwrap();
    append_all(&log, &events, true).await;
    destroy_segments(dir.path());
    let read = last(&log).await.unwrap();
    let read: Vec<Event> = read.into_iter().map(|recorded| recorded.event).collect();
    assert_eq!(read, events[110..]);
    // The first events left the cache: their records are read, and found damaged.
    assert!(
        log.read_all(Position(0), Direction::Forward, 10)
            .await
            .is_err()
    );

    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(options(dir.path(), 0)).unwrap();
    append_all(&log, &events, true).await;
    destroy_segments(dir.path());
    assert!(
        last(&log).await.is_err(),
        "without a cache, records are read"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_nobody_reads_live_are_not_kept() {
    let events: Vec<Event> = (0..120).map(event).collect();
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(options(dir.path(), 64 * 1024)).unwrap();
    append_all(&log, &events, false).await;
    destroy_segments(dir.path());
    let last = log.read_all(Position(110), Direction::Forward, 10).await;
    assert!(last.is_err(), "the records are read, and found damaged");
}
