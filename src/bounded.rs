//! A bounded map with second-chance FIFO (CLOCK) eviction, for the verified-token and
//! assertion caches.
//!
//! Every insert into a full map evicts a bounded number of old entries, so the cost of
//! eviction is spread evenly over inserts. The caches it replaced evicted in bulk (an
//! eighth of the token cache, or the whole assertion cache, at once): under a flood of
//! new identities that freed tens of thousands of entries inside one request on the
//! single-threaded runtime, a p99 of several hundred milliseconds (benches/README.md).
//!
//! An entry read since it was inserted (or since it last came up for eviction) gets one
//! more trip round the queue, so a pipeline's hot token survives a flood of one-off ones.

use std::collections::hash_map::{Entry as MapEntry, HashMap};
use std::collections::VecDeque;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, Ordering};

/// At most this many second chances are handed out per insert; after that the oldest
/// entry goes even if it was read, which bounds an insert's work.
const MAX_SECOND_CHANCES: usize = 8;

#[derive(Debug)]
struct Slot<V> {
    value: V,
    /// Which insert of this key the slot belongs to; queue entries of earlier inserts
    /// (removed or replaced since) are skipped.
    generation: u64,
    referenced: AtomicBool,
}

#[derive(Debug)]
pub(crate) struct BoundedMap<K, V> {
    map: HashMap<K, Slot<V>>,
    /// Keys in insertion order, with the generation they were inserted as.
    queue: VecDeque<(K, u64)>,
    capacity: usize,
    generation: u64,
}

impl<K: Copy + Eq + Hash, V> BoundedMap<K, V> {
    pub fn new(capacity: usize) -> Self {
        Self {
            map: HashMap::new(),
            queue: VecDeque::new(),
            capacity: capacity.max(1),
            generation: 0,
        }
    }

    /// The value for `key`, marking it as recently used. Takes `&self`, so readers can
    /// share a read lock.
    pub fn get(&self, key: &K) -> Option<&V> {
        let slot = self.map.get(key)?;
        if !slot.referenced.load(Ordering::Relaxed) {
            slot.referenced.store(true, Ordering::Relaxed);
        }
        Some(&slot.value)
    }

    /// Insert or replace; a full map first makes room by evicting old entries.
    pub fn insert(&mut self, key: K, value: V) {
        self.generation += 1;
        let generation = self.generation;
        match self.map.entry(key) {
            MapEntry::Occupied(mut o) => {
                // A replaced value starts a new trip round the queue.
                *o.get_mut() = Slot { value, generation, referenced: AtomicBool::new(false) };
            }
            MapEntry::Vacant(_) => {
                self.make_room();
                self.map
                    .insert(key, Slot { value, generation, referenced: AtomicBool::new(false) });
            }
        }
        self.queue.push_back((key, generation));
        self.compact_if_needed();
    }

    pub fn remove(&mut self, key: &K) -> Option<V> {
        self.map.remove(key).map(|slot| slot.value)
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.len()
    }

    fn make_room(&mut self) {
        let mut chances = 0;
        while self.map.len() >= self.capacity {
            let Some((key, generation)) = self.queue.pop_front() else { break };
            let Some(slot) = self.map.get(&key) else { continue };
            if slot.generation != generation {
                continue; // stale: the key was removed or replaced since
            }
            if chances < MAX_SECOND_CHANCES && slot.referenced.swap(false, Ordering::Relaxed) {
                chances += 1;
                self.queue.push_back((key, generation));
                continue;
            }
            self.map.remove(&key);
        }
    }

    /// Removals and replacements leave stale queue entries behind; drop them once they
    /// outnumber the live ones, so the queue stays within twice the capacity.
    fn compact_if_needed(&mut self) {
        if self.queue.len() > 2 * self.capacity {
            let map = &self.map;
            self.queue.retain(|(k, g)| map.get(k).is_some_and(|s| s.generation == *g));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_exceeds_its_capacity_and_evicts_the_oldest_first() {
        let mut m = BoundedMap::new(4);
        for i in 0..100u32 {
            m.insert(i, i);
            assert!(m.len() <= 4);
        }
        // Nothing was read, so eviction is plain FIFO: the last four remain.
        assert_eq!((96..100).filter(|i| m.get(i).is_some()).count(), 4);
        assert!(m.get(&95).is_none());
    }

    #[test]
    fn an_entry_in_use_survives_a_flood_of_one_off_entries() {
        let mut m = BoundedMap::new(16);
        m.insert(u32::MAX, 0);
        for i in 0..10_000u32 {
            // A pipeline's repeated calls keep reading its token between one-off inserts.
            assert!(m.get(&u32::MAX).is_some(), "hot entry evicted after {i} inserts");
            m.insert(i, i);
        }
        assert_eq!(m.len(), 16);
    }

    #[test]
    fn removal_and_replacement_leave_no_stale_evictions_and_the_queue_bounded() {
        let mut m = BoundedMap::new(2);
        m.insert(1u32, "a");
        m.insert(2, "b");
        assert_eq!(m.remove(&1), Some("a"));
        // 1 is inserted again: its old queue entry must not evict the new one.
        m.insert(1, "c");
        m.insert(3, "d"); // full: evicts 2, the oldest live entry
        assert_eq!(m.get(&1), Some(&"c"));
        assert_eq!(m.get(&3), Some(&"d"));
        assert!(m.get(&2).is_none());

        for i in 0..1_000u32 {
            m.insert(7, "x");
            m.remove(&7);
            m.insert(i % 3, "y");
        }
        assert!(m.queue.len() <= 2 * 2 + 1, "queue grew to {}", m.queue.len());
        assert!(m.len() <= 2);
    }

    #[test]
    fn an_insert_does_bounded_work_even_when_every_entry_was_read() {
        let mut m = BoundedMap::new(1_000);
        for i in 0..1_000u32 {
            m.insert(i, i);
            m.get(&i);
        }
        m.insert(5_000, 0);
        assert_eq!(m.len(), 1_000);
        // Eight entries got a second chance, the ninth oldest (8) was evicted.
        assert!(m.get(&8).is_none());
        assert!((0..8).all(|i| m.get(&i).is_some()));
    }
}
