//! The read cache: the most recently appended events, kept parsed.
//!
//! Readers near the head of the log — live subscriptions above all, which read each event
//! moments after it was appended — would otherwise read back every record just written and
//! parse its JSON again, which costs more than anything else they do. The writer already
//! holds those events, so when it publishes a group it keeps them here, and a read of a
//! position still here clones the event instead.
//!
//! The cache holds a contiguous run of positions ending at the head, bounded by an
//! estimate of its memory ([`Options::read_cache_bytes_max`](crate::Options)); the oldest
//! are dropped first. It changes nothing a reader sees: an event is cached only once its
//! group is synced and about to be published, and a cached event is equal to what decoding
//! its record gives, because the record's payload is the event's own JSON and the event
//! format round-trips.
//!
//! Keeping events is not free: they stay allocated instead of being freed at once by the
//! appending task, and they are freed later, cold, by the writer. So the cache keeps new
//! events only while some reader reads near the head — within the span of events the
//! cache can hold — and stops as soon as no read has come that near during one such span:
//! a log nobody reads live, or whose readers lag far behind (a backlog being worked off),
//! pays nothing for it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use herald_core::RecordedEvent;
use parking_lot::Mutex;

/// Bytes counted for a cached event on top of its JSON: the event's fields, their
/// allocations and the cache's own bookkeeping, roughly.
const ENTRY_OVERHEAD_BYTES: u64 = 256;

/// Bytes counted per event before any is cached, to tell how many events the cache holds.
const ENTRY_BYTES_GUESS: u64 = 1024;

/// See the [module documentation](self).
pub(crate) struct ReadCache {
    bytes_max: u64,
    /// One more than the head as of the last read near it; 0: no read came near yet.
    near_read_head: AtomicU64,
    /// How many events the cache holds when full, from the sizes of those cached so far.
    span_events: AtomicU64,
    inner: Mutex<Inner>,
}

struct Inner {
    /// The position of `entries[0]`.
    first: u64,
    /// Consecutive positions from `first`, each with the bytes counted for it.
    entries: VecDeque<(Arc<RecordedEvent>, u64)>,
    /// The sum of the bytes counted for the entries.
    bytes: u64,
}

/// An event on its way into the cache, with the size of its JSON.
pub(crate) struct Entry {
    pub(crate) event: RecordedEvent,
    pub(crate) json_bytes: u64,
}

impl ReadCache {
    /// A cache of at most about `bytes_max` bytes; 0 keeps nothing.
    pub(crate) fn new(bytes_max: u64) -> ReadCache {
        ReadCache {
            bytes_max,
            near_read_head: AtomicU64::new(0),
            span_events: AtomicU64::new(bytes_max / ENTRY_BYTES_GUESS),
            inner: Mutex::new(Inner {
                first: 0,
                entries: VecDeque::new(),
                bytes: 0,
            }),
        }
    }

    /// Whether events appended now should be kept, the head being at `head`: only while
    /// a read came within the cache's span of the head during the last span of appends.
    pub(crate) fn is_keeping(&self, head: u64) -> bool {
        let near = self.near_read_head.load(Ordering::Relaxed);
        self.bytes_max > 0
            && near > 0
            && head.saturating_sub(near - 1) <= self.span_events.load(Ordering::Relaxed)
    }

    /// Notes a read of events from position `first` on, the head being at `head`.
    pub(crate) fn note_read(&self, first: u64, head: u64) {
        if head.saturating_sub(first) <= self.span_events.load(Ordering::Relaxed) {
            self.near_read_head.fetch_max(head + 1, Ordering::Relaxed);
        }
    }

    /// Adds events that follow each other, in position order, dropping the oldest past the
    /// bound. Events that do not continue the cached run (the first after a failure, say)
    /// start a new run.
    pub(crate) fn extend(&self, events: Vec<Entry>) {
        if events.is_empty() {
            return;
        }
        let mut evicted = Vec::new();
        {
            let mut inner = self.inner.lock();
            // The events of one group need not be contiguous: appends made while the cache
            // was not keeping carry no events. A gap restarts the cache at the event after
            // it, so that an entry's place always tells its position.
            for entry in events {
                let position = entry.event.position.0;
                if inner.first + inner.entries.len() as u64 != position {
                    evicted.extend(inner.entries.drain(..));
                    inner.first = position;
                    inner.bytes = 0;
                }
                let bytes = entry.json_bytes + ENTRY_OVERHEAD_BYTES;
                inner.bytes += bytes;
                inner.entries.push_back((Arc::new(entry.event), bytes));
            }
            while inner.bytes > self.bytes_max {
                let Some((event, bytes)) = inner.entries.pop_front() else {
                    break;
                };
                inner.bytes -= bytes;
                inner.first += 1;
                evicted.push((event, bytes));
            }
            debug_assert!(
                inner
                    .entries
                    .iter()
                    .enumerate()
                    .all(|(at, (event, _))| event.position.0 == inner.first + at as u64)
            );
            if inner.bytes > 0 {
                let entry_bytes = inner.bytes.div_ceil(inner.entries.len() as u64);
                self.span_events
                    .store(self.bytes_max / entry_bytes, Ordering::Relaxed);
            }
        }
        drop(evicted);
    }

    /// The cached event of each of `positions`, `None` where it is not cached.
    pub(crate) fn lookup(&self, positions: &[u64]) -> Vec<Option<Arc<RecordedEvent>>> {
        let inner = self.inner.lock();
        let end = inner.first + inner.entries.len() as u64;
        positions
            .iter()
            .map(|&position| {
                (inner.first..end).contains(&position).then(|| {
                    let event = &inner.entries[(position - inner.first) as usize].0;
                    assert_eq!(event.position.0, position, "a cache entry out of place");
                    Arc::clone(event)
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use chrono::{DateTime, Utc};
    use herald_core::{Event, Position, StreamName, Version};

    use super::*;

    fn entry(position: u64) -> Entry {
        Entry {
            event: RecordedEvent {
                stream: StreamName::new("orders").unwrap(),
                version: Version(position),
                position: Position(position),
                recorded_at: DateTime::<Utc>::UNIX_EPOCH,
                event: Event::new("/test", "Tested"),
            },
            json_bytes: 0,
        }
    }

    fn cached(cache: &ReadCache, positions: &[u64]) -> Vec<Option<u64>> {
        cache
            .lookup(positions)
            .into_iter()
            .map(|event| event.map(|event| event.position.0))
            .collect()
    }

    #[test]
    fn a_gap_within_one_extend_restarts_the_cache_after_it() {
        let cache = ReadCache::new(100 * ENTRY_OVERHEAD_BYTES);
        cache.extend([0, 1, 5, 6].into_iter().map(entry).collect());
        assert_eq!(
            cached(&cache, &[0, 1, 2, 5, 6]),
            [None, None, None, Some(5), Some(6)]
        );
        cache.extend([7].into_iter().map(entry).collect());
        assert_eq!(cached(&cache, &[6, 7]), [Some(6), Some(7)]);
    }

    #[test]
    fn keeps_the_newest_events_within_its_bound() {
        let cache = ReadCache::new(3 * ENTRY_OVERHEAD_BYTES);
        cache.extend((0..2).map(entry).collect());
        assert_eq!(cached(&cache, &[0, 1, 2]), [Some(0), Some(1), None]);
        cache.extend((2..4).map(entry).collect());
        assert_eq!(
            cached(&cache, &[3, 2, 1, 0, 4]),
            [Some(3), Some(2), Some(1), None, None]
        );
    }

    #[test]
    fn a_gap_starts_a_new_run() {
        let cache = ReadCache::new(100 * ENTRY_OVERHEAD_BYTES);
        cache.extend((0..3).map(entry).collect());
        cache.extend((5..7).map(entry).collect());
        assert_eq!(
            cached(&cache, &[2, 3, 4, 5, 6, 7]),
            [None, None, None, Some(5), Some(6), None]
        );
    }

    #[test]
    fn a_zero_bound_keeps_nothing() {
        let cache = ReadCache::new(0);
        cache.note_read(0, 0);
        assert!(!cache.is_keeping(0));
        cache.extend((0..3).map(entry).collect());
        assert_eq!(cached(&cache, &[0, 1, 2]), [None, None, None]);
    }

    #[test]
    fn keeps_events_while_reads_come_near_the_head() {
        // Entries of the overhead alone: the span is 10 events.
        let cache = ReadCache::new(10 * ENTRY_OVERHEAD_BYTES);
        cache.extend(vec![entry(0)]);
        assert!(!cache.is_keeping(1), "no read yet");
        cache.note_read(0, 1);
        assert!(cache.is_keeping(1));
        assert!(cache.is_keeping(11), "a span of appends after that read");
        assert!(!cache.is_keeping(12));
        // A reader far behind does not count; one within the span does.
        cache.note_read(1, 12);
        assert!(!cache.is_keeping(12));
        cache.note_read(2, 12);
        assert!(cache.is_keeping(12));
    }
}
