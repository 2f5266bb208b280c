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

use std::collections::VecDeque;
use std::sync::Arc;

use herald_core::RecordedEvent;
use parking_lot::Mutex;

/// Bytes counted for a cached event on top of its JSON: the event's fields, their
/// allocations and the cache's own bookkeeping, roughly.
const ENTRY_OVERHEAD_BYTES: u64 = 256;

/// See the [module documentation](self).
pub(crate) struct ReadCache {
    bytes_max: u64,
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
            inner: Mutex::new(Inner {
                first: 0,
                entries: VecDeque::new(),
                bytes: 0,
            }),
        }
    }

    /// Whether it keeps anything: when not, the writer need not hand it events.
    pub(crate) fn is_enabled(&self) -> bool {
        self.bytes_max > 0
    }

    /// Adds events that follow each other, in position order, dropping the oldest past the
    /// bound. Events that do not continue the cached run (the first after a failure, say)
    /// start a new run.
    pub(crate) fn extend(&self, events: Vec<Entry>) {
        let Some(first) = events.first().map(|entry| entry.event.position.0) else {
            return;
        };
        let mut added: VecDeque<(Arc<RecordedEvent>, u64)> = events
            .into_iter()
            .map(|entry| {
                let bytes = entry.json_bytes + ENTRY_OVERHEAD_BYTES;
                (Arc::new(entry.event), bytes)
            })
            .collect();
        // The events leaving the cache are dropped after the lock is released.
        let mut evicted = Vec::new();
        {
            let mut inner = self.inner.lock();
            if inner.first + inner.entries.len() as u64 != first {
                evicted.extend(inner.entries.drain(..));
                inner.first = first;
                inner.bytes = 0;
            }
            inner.bytes += added.iter().map(|(_, bytes)| bytes).sum::<u64>();
            inner.entries.append(&mut added);
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
                    .all(|(at, (event, _))| { event.position.0 == inner.first + at as u64 })
            );
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
                (inner.first..end)
                    .contains(&position)
                    .then(|| Arc::clone(&inner.entries[(position - inner.first) as usize].0))
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
        assert!(!cache.is_enabled());
        cache.extend((0..3).map(entry).collect());
        assert_eq!(cached(&cache, &[0, 1, 2]), [None, None, None]);
    }
}
