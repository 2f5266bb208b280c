//! Reads and subscriptions.
//!
//! Readers see only events below the published head, i.e. events whose group has been
//! written and synced. Events still in the read cache (the last ones appended) are cloned
//! from it. The others are read from their records: runs of consecutive positions in one
//! segment are fetched with one read, then decoded record by record, and every decoded
//! record is checked against the index (position, kind) before it is returned.

use std::collections::VecDeque;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use herald_core::store::{Error, Subscription};
use herald_core::{Direction, Event, Position, RecordedEvent, StreamName, Version};

use crate::Shared;
use crate::index::Index;
use crate::io::read_exact_at;
use crate::record::{self, Kind};

/// Events a subscription reads per step.
const SUBSCRIPTION_PAGE_LEN: usize = 512;

/// Reads of at least this many events parse them on several threads.
const PARALLEL_DECODE_LEN_MIN: usize = 256;

/// Threads a single read parses events on, at most.
const DECODE_THREADS_MAX: usize = 4;

/// Who reads, which decides how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reader {
    /// A caller of `read_all` or `read_stream`: a deleted or unknown stream is an error, and
    /// a large read is parsed on several threads.
    Api,
    /// A subscription: a deleted or unknown stream reads as empty, and a page is parsed on
    /// the calling thread alone. Subscriptions run next to the application's own work, and
    /// usually several at once, so starting threads for each page would cost more CPU than
    /// it saves time.
    Subscription,
}

pub(crate) fn read_all(
    shared: &Shared,
    from: Position,
    direction: Direction,
    limit: usize,
    reader: Reader,
) -> Result<Vec<RecordedEvent>, Error> {
    let head = *shared.head.borrow();
    let positions: Vec<u64> = match direction {
        Direction::Forward => (from.0..head).take(limit).collect(),
        Direction::Backward => {
            if head == 0 {
                return Ok(Vec::new());
            }
            let start = from.0.min(head - 1);
            (0..=start).rev().take(limit).collect()
        }
    };
    read_positions(shared, &positions, reader)
}

/// Reads a stream.
pub(crate) fn read_stream(
    shared: &Shared,
    stream: &StreamName,
    from: Version,
    direction: Direction,
    limit: usize,
    reader: Reader,
) -> Result<Vec<RecordedEvent>, Error> {
    let for_subscription = reader == Reader::Subscription;
    let head = *shared.head.borrow();
    let positions: Vec<u64> = {
        let index = shared.index.read();
        let state = match index.streams.get(stream) {
            Some(state) => state,
            None if for_subscription => return Ok(Vec::new()),
            None => {
                return Err(Error::StreamNotFound {
                    stream: stream.clone(),
                });
            }
        };
        let visible = state.positions.partition_point(|&position| position < head) as u64;
        if !for_subscription {
            if state.deleted {
                return Err(Error::StreamDeleted {
                    stream: stream.clone(),
                });
            }
            if visible == 0 {
                return Err(Error::StreamNotFound {
                    stream: stream.clone(),
                });
            }
        }
        let first = state.visible_from;
        let versions: Box<dyn Iterator<Item = u64>> = match direction {
            Direction::Forward => Box::new(from.0.max(first)..visible),
            Direction::Backward if visible == 0 || from.0 < first => Box::new(std::iter::empty()),
            Direction::Backward => Box::new((first..=from.0.min(visible - 1)).rev()),
        };
        versions
            .take(limit)
            .map(|version| state.positions[version as usize])
            .collect()
    };
    read_positions(shared, &positions, reader)
}

/// Whether `stream` has an event visible below `head` at version `from` or later.
fn stream_has_events(index: &Index, stream: &StreamName, from: u64, head: u64) -> bool {
    index.streams.get(stream).is_some_and(|state| {
        let from = from.max(state.visible_from);
        state
            .positions
            .get(usize::try_from(from).unwrap_or(usize::MAX))
            .is_some_and(|&position| position < head)
    })
}

/// Reads the events at `positions` (all below the head), in the order given: those still
/// in the read cache from there, the others from their records.
fn read_positions(
    shared: &Shared,
    positions: &[u64],
    reader: Reader,
) -> Result<Vec<RecordedEvent>, Error> {
    if let Some(&first) = positions.iter().min() {
        shared.cache.note_read(first, *shared.head.borrow());
    }
    let cached = shared.cache.lookup(positions);
    if cached.iter().all(Option::is_none) {
        return read_records(shared, positions, reader);
    }
    let missing: Vec<u64> = positions
        .iter()
        .zip(&cached)
        .filter(|(_, cached)| cached.is_none())
        .map(|(&position, _)| position)
        .collect();
    let mut read = read_records(shared, &missing, reader)?.into_iter();
    cached
        .into_iter()
        .map(|cached| match cached {
            Some(event) => Ok(RecordedEvent::clone(&event)),
            None => read.next().ok_or_else(|| Error::Corrupt {
                detail: "fewer records read than asked for".to_owned(),
            }),
        })
        .collect()
}

/// Reads and decodes the records of the events at `positions` (all below the head), in the
/// order given.
fn read_records(
    shared: &Shared,
    positions: &[u64],
    reader: Reader,
) -> Result<Vec<RecordedEvent>, Error> {
    // Plan the reads under the lock, perform them without it.
    let mut spans = Vec::new();
    {
        let index = shared.index.read();
        let mut i = 0;
        while i < positions.len() {
            let (segment, at) = index.locate(positions[i]).ok_or_else(|| Error::Corrupt {
                detail: format!("position {} is not in the index", positions[i]),
            })?;
            // Extend the run while positions stay consecutive (either way) in this segment.
            let step: i64 = match positions.get(i + 1) {
                Some(&next) if next == positions[i] + 1 => 1,
                Some(&next) if next + 1 == positions[i] => -1,
                _ => 0,
            };
            let mut j = i + 1;
            while step != 0
                && j < positions.len()
                && positions[j] as i64 == positions[j - 1] as i64 + step
                && index
                    .locate(positions[j])
                    .is_some_and(|(other, _)| other.base == segment.base)
            {
                j += 1;
            }
            let run = j - i;
            let (low, high) = if step >= 0 {
                (at, at + run - 1)
            } else {
                (at + 1 - run, at)
            };
            let start = segment.locs[low].offset;
            let end = segment.locs[high].offset + segment.locs[high].len;
            spans.push(Span {
                file: segment.file.clone(),
                path: segment.path.clone(),
                offset: u64::from(start),
                len: (end - start) as usize,
                first_position: segment.base + low as u64,
                count: run,
                reverse: step < 0,
            });
            i = j;
        }
    }
    let mut events = Vec::with_capacity(positions.len());
    for span in spans {
        span.read_into(&mut events, reader)?;
    }
    Ok(events)
}

struct Span {
    file: Arc<dyn crate::io::IoFile>,
    path: std::path::PathBuf,
    offset: u64,
    len: usize,
    first_position: u64,
    count: usize,
    reverse: bool,
}

impl Span {
    fn read_into(self, events: &mut Vec<RecordedEvent>, reader: Reader) -> Result<(), Error> {
        let mut buf = vec![0; self.len];
        read_exact_at(self.file.as_ref(), &mut buf, self.offset)?;
        // Frame and check the records first (cheap), then parse their payloads, the costly
        // part, on several threads when there are many.
        let mut records = Vec::with_capacity(self.count);
        let mut at = 0;
        let mut expected = self.first_position;
        while records.len() < self.count {
            let (record, len) =
                record::decode(&buf[at..]).map_err(|error| self.corrupt(at, &error.to_string()))?;
            // Deletion records may sit between events; they have no position.
            if record.kind == Kind::Event {
                if record.position != expected {
                    return Err(self.corrupt(at, "record position does not match the index"));
                }
                expected += 1;
                records.push((at, record));
            }
            at += len;
        }
        let threads = if reader == Reader::Api && records.len() >= PARALLEL_DECODE_LEN_MIN {
            std::thread::available_parallelism().map_or(1, |n| n.get().min(DECODE_THREADS_MAX))
        } else {
            1
        };
        let chunk_len = records.len().div_ceil(threads).max(1);
        let decoded: Vec<Result<Vec<RecordedEvent>, Error>> = std::thread::scope(|scope| {
            let mut chunks = records.chunks(chunk_len);
            let first = chunks.next().unwrap_or_default();
            let others: Vec<_> = chunks
                .map(|chunk| scope.spawn(|| self.decode_events(chunk)))
                .collect();
            let mut results = vec![self.decode_events(first)];
            results.extend(others.into_iter().map(|handle| {
                handle
                    .join()
                    .unwrap_or_else(|_| panic!("a decode thread panicked"))
            }));
            results
        });
        let start = events.len();
        for chunk in decoded {
            events.extend(chunk?);
        }
        if self.reverse {
            events[start..].reverse();
        }
        Ok(())
    }

    fn decode_events(
        &self,
        records: &[(usize, record::Record<'_>)],
    ) -> Result<Vec<RecordedEvent>, Error> {
        let mut events = Vec::with_capacity(records.len());
        // Runs of events of one stream share one name allocation.
        let mut last_stream: Option<StreamName> = None;
        for (at, record) in records {
            let stream = match last_stream.take() {
                Some(name) if name.as_str() == record.stream => name,
                _ => StreamName::parse_stored(record.stream)
                    .map_err(|error| self.corrupt(*at, &error.to_string()))?,
            };
            let event = Event::from_json(record.payload)
                .map_err(|error| self.corrupt(*at, &error.to_string()))?;
            events.push(RecordedEvent {
                stream: stream.clone(),
                version: Version(record.version),
                position: Position(record.position),
                recorded_at: DateTime::<Utc>::from_timestamp_micros(record.recorded_at_us)
                    .unwrap_or_default(),
                event,
            });
            last_stream = Some(stream);
        }
        Ok(events)
    }

    fn corrupt(&self, at: usize, reason: &str) -> Error {
        Error::Corrupt {
            detail: format!(
                "{} at offset {}: {reason}",
                self.path.display(),
                self.offset + at as u64
            ),
        }
    }
}

/// Reads the single record of the event at `position`, which may not be synced yet (the
/// writer checks its own pending events); `None` if it cannot be read.
fn raw_record_at(index: &Index, position: u64) -> Option<Vec<u8>> {
    let (segment, at) = index.locate(position)?;
    let loc = segment.locs[at];
    let mut buf = vec![0; loc.len as usize];
    read_exact_at(segment.file.as_ref(), &mut buf, u64::from(loc.offset)).ok()?;
    Some(buf)
}

/// The id of the event stored at `position`.
pub(crate) fn event_id_at(index: &Index, position: u64) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct IdOnly {
        id: String,
    }
    let buf = raw_record_at(index, position)?;
    let (record, _) = record::decode(&buf).ok()?;
    serde_json::from_slice::<IdOnly>(record.payload)
        .ok()
        .map(|doc| doc.id)
}

/// The stream and version of the event stored at `position`.
pub(crate) fn stream_and_version_at(index: &Index, position: u64) -> Option<(StreamName, Version)> {
    let buf = raw_record_at(index, position)?;
    let (record, _) = record::decode(&buf).ok()?;
    Some((
        StreamName::parse_stored(record.stream).ok()?,
        Version(record.version),
    ))
}

/// `batch_left` of the event stored at `position`.
pub(crate) fn batch_left_at(index: &Index, position: u64) -> Option<u32> {
    let buf = raw_record_at(index, position)?;
    record::decode(&buf)
        .ok()
        .map(|(record, _)| record.batch_left)
}

/// Whether the event at `position` is the first of its append.
pub(crate) fn starts_batch(index: &Index, position: u64) -> bool {
    position == 0 || batch_left_at(index, position - 1) == Some(0)
}

/// Catch-up, then live: reads pages from `from` up to the published head; when caught up,
/// waits for the head to move. Reading by position from the index (rather than receiving
/// events from the writer) is what makes the switch from catch-up to live free of gaps and
/// duplicates, and lets a slow subscriber fall behind without bounding anything.
pub(crate) fn subscribe(
    shared: Arc<Shared>,
    stream: Option<StreamName>,
    from: u64,
) -> Subscription {
    struct State {
        shared: Arc<Shared>,
        stream: Option<StreamName>,
        next: u64,
        buffer: VecDeque<RecordedEvent>,
        head: tokio::sync::watch::Receiver<u64>,
        done: bool,
    }
    let head = shared.head.subscribe();
    let state = State {
        shared,
        stream,
        next: from,
        buffer: VecDeque::new(),
        head,
        done: false,
    };
    Box::pin(futures::stream::unfold(state, |mut state| async move {
        loop {
            if state.done {
                return None;
            }
            if let Some(event) = state.buffer.pop_front() {
                return Some((Ok(event), state));
            }
            let seen_head = *state.head.borrow_and_update();
            let next = state.next;
            // Most wake-ups of a stream subscription are for other streams' events: the
            // index tells at once, without a trip to the blocking pool.
            let readable = match &state.stream {
                None => next < seen_head,
                Some(stream) => {
                    stream_has_events(&state.shared.index.read(), stream, next, seen_head)
                }
            };
            if !readable {
                // Caught up: wait until the writer publishes more. The head was read
                // before the index, so an append published since wakes us at once.
                if state.head.changed().await.is_err() {
                    return None;
                }
                continue;
            }
            let shared = state.shared.clone();
            let stream = state.stream.clone();
            let page = tokio::task::spawn_blocking(move || match &stream {
                None => read_all(
                    &shared,
                    Position(next),
                    Direction::Forward,
                    SUBSCRIPTION_PAGE_LEN,
                    Reader::Subscription,
                ),
                Some(stream) => read_stream(
                    &shared,
                    stream,
                    Version(next),
                    Direction::Forward,
                    SUBSCRIPTION_PAGE_LEN,
                    Reader::Subscription,
                ),
            })
            .await
            .map_err(|error| Error::Backend(Box::new(error)))
            .and_then(|result| result);
            match page {
                Err(error) => {
                    state.done = true;
                    return Some((Err(error), state));
                }
                Ok(page) if page.is_empty() => {
                    // Caught up: wait until the writer publishes more. The head was read
                    // before the page, so an append published since wakes us at once.
                    if state.head.changed().await.is_err() {
                        return None;
                    }
                }
                Ok(page) => {
                    state.next = match &state.stream {
                        None => page.last().map_or(next, |event| event.position.0 + 1),
                        Some(_) => page.last().map_or(next, |event| event.version.0 + 1),
                    };
                    state.buffer.extend(page);
                }
            }
        }
    }))
}
