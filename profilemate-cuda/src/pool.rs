//! A fixed set of event slots handed out without locks.
//!
//! The engine thread takes slots (`start`/`stop`) while the collector thread gives them back
//! (`release`), so acquisition must neither lock nor allocate. The free slots form a Treiber
//! stack threaded through `next`; the head packs a 32-bit slot index with a 32-bit tag bumped on
//! every change, so a head that was popped and pushed back between a load and a
//! compare-exchange (ABA) fails the exchange. Taking a slot is one load and one compare-exchange;
//! it retries only while another thread changed the head in between (the collector giving slots
//! back), and never waits for anyone. The stack hands out the most recently freed slot first,
//! whose event is the likeliest to be warm in the driver's caches.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

const NIL: u32 = u32::MAX;

/// The largest pool: slot indices must stay below [`NIL`].
pub(crate) const MAX_SLOTS: usize = 1 << 24;

#[inline]
fn pack(tag: u32, index: u32) -> u64 {
    (u64::from(tag) << 32) | u64::from(index)
}

#[inline]
fn unpack(head: u64) -> (u32, u32) {
    ((head >> 32) as u32, head as u32)
}

pub(crate) struct SlotPool {
    head: AtomicU64,
    next: Box<[AtomicU32]>,
    taken: Box<[AtomicBool]>,
}

impl SlotPool {
    /// A pool of `len` free slots (`len <= MAX_SLOTS`).
    pub(crate) fn new(len: usize) -> SlotPool {
        debug_assert!(len <= MAX_SLOTS);
        let next = (0..len).map(|i| AtomicU32::new(if i + 1 < len { (i + 1) as u32 } else { NIL })).collect();
        let taken = (0..len).map(|_| AtomicBool::new(false)).collect();
        let first = if len == 0 { NIL } else { 0 };
        SlotPool { head: AtomicU64::new(pack(0, first)), next, taken }
    }

    pub(crate) fn len(&self) -> usize {
        self.next.len()
    }

    /// Takes a free slot; `None` when every slot is taken.
    #[inline]
    pub(crate) fn acquire(&self) -> Option<usize> {
        let mut head = self.head.load(Ordering::Acquire);
        loop {
            let (tag, index) = unpack(head);
            if index == NIL {
                return None;
            }
            // May read a stale link if another thread took `index` meanwhile: the tag then no
            // longer matches and the exchange below fails.
            let next = self.next[index as usize].load(Ordering::Relaxed);
            match self.head.compare_exchange_weak(
                head,
                pack(tag.wrapping_add(1), next),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    self.taken[index as usize].store(true, Ordering::Relaxed);
                    return Some(index as usize);
                }
                Err(now) => head = now,
            }
        }
    }

    /// Gives a slot back. Returns `false`, and changes nothing, for an index out of range or a
    /// slot that is not taken (a second release of the same slot).
    #[inline]
    pub(crate) fn release(&self, index: usize) -> bool {
        let Some(taken) = self.taken.get(index) else { return false };
        if !taken.swap(false, Ordering::AcqRel) {
            return false;
        }
        let mut head = self.head.load(Ordering::Relaxed);
        loop {
            let (tag, first) = unpack(head);
            self.next[index].store(first, Ordering::Relaxed);
            match self.head.compare_exchange_weak(
                head,
                pack(tag.wrapping_add(1), index as u32),
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(now) => head = now,
            }
        }
    }

    /// Whether `index` is currently handed out.
    pub(crate) fn is_taken(&self, index: usize) -> bool {
        self.taken.get(index).is_some_and(|t| t.load(Ordering::Relaxed))
    }

    /// Slots handed out now (a snapshot; exact only when no thread is taking or giving back).
    pub(crate) fn taken_count(&self) -> usize {
        self.taken.iter().filter(|t| t.load(Ordering::Relaxed)).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::Arc;

    #[test]
    fn hands_out_each_slot_once_until_released() {
        let pool = SlotPool::new(4);
        let got: HashSet<usize> = (0..4).map(|_| pool.acquire().unwrap()).collect();
        assert_eq!(got.len(), 4);
        assert_eq!(pool.acquire(), None);
        assert_eq!(pool.taken_count(), 4);
        assert!(pool.release(2));
        assert!(!pool.release(2), "a second release is ignored");
        assert!(!pool.release(99), "an unknown slot is ignored");
        assert_eq!(pool.acquire(), Some(2));
        assert_eq!(pool.acquire(), None);
    }

    #[test]
    fn empty_pool_gives_nothing() {
        let pool = SlotPool::new(0);
        assert_eq!(pool.acquire(), None);
        assert!(!pool.release(0));
    }

    #[test]
    fn concurrent_takers_and_givers_never_share_a_slot() {
        const SLOTS: usize = 64;
        let pool = Arc::new(SlotPool::new(SLOTS));
        let owners: Arc<Vec<AtomicU32>> = Arc::new((0..SLOTS).map(|_| AtomicU32::new(0)).collect());
        let threads: Vec<_> = (1..=4u32)
            .map(|id| {
                let (pool, owners) = (pool.clone(), owners.clone());
                std::thread::spawn(move || {
                    let mut held = Vec::new();
                    for round in 0..20_000u32 {
                        if let Some(i) = pool.acquire() {
                            let prev = owners[i].swap(id, Ordering::SeqCst);
                            assert_eq!(prev, 0, "slot {i} handed out twice");
                            held.push(i);
                        }
                        if held.len() > 8 || (round % 3 == 0 && !held.is_empty()) {
                            let i = held.remove(0);
                            owners[i].store(0, Ordering::SeqCst);
                            assert!(pool.release(i));
                        }
                    }
                    for i in held {
                        owners[i].store(0, Ordering::SeqCst);
                        assert!(pool.release(i));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(pool.taken_count(), 0);
        let all: HashSet<usize> = (0..SLOTS).map(|_| pool.acquire().unwrap()).collect();
        assert_eq!(all.len(), SLOTS);
    }
}
