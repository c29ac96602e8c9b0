//! MoE routing counts accumulated in place on the recording thread.
//!
//! A step of a large mixture-of-experts model routes to thousands of (layer, expert) pairs
//! (58 layers x 256 experts at DeepSeek-V3's shape). Sent as events, that volume would fill the
//! recording thread's buffer and crowd out the forward passes and CPU timings recorded beside
//! it. The counts are additive, so each recording thread adds them into its own table of
//! per-layer totals instead, and the collector reads the totals on every pass: the routing
//! volume never touches the event buffer, and the totals are exact however fast the engine
//! steps.
//!
//! One writer per table (the recording thread), one reader (the collector). Each layer is a
//! seqlock: the writer bumps `seq` to odd, adds the step's counts, bumps it to even; the reader
//! retries a layer it caught mid-update, so a snapshot never holds half a step. The writer never
//! waits. A layer's table is allocated the first time the thread records that layer (once per
//! thread and layer); nothing is allocated per record.

use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;

/// The most MoE layers one session tracks; a larger layer index is dropped and counted as an
/// invalid value.
pub const MAX_MOE_LAYERS: usize = 1024;

/// One layer's running totals.
pub(crate) struct LayerCounts {
    seq: AtomicU64,
    /// Routing calls recorded for this layer (one per step).
    calls: AtomicU64,
    /// Clock reading of the latest call.
    last_raw: AtomicU64,
    /// Tokens routed to each expert, summed over every call.
    tokens: Box<[AtomicU64]>,
}

/// A consistent reading of one layer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct LayerSnapshot {
    pub(crate) calls: u64,
    pub(crate) last_raw: u64,
    pub(crate) tokens: Vec<u64>,
}

/// One recording thread's totals, for every layer it recorded.
pub(crate) struct MoeCounts {
    layers: Box<[OnceLock<LayerCounts>]>,
    /// One more than the highest layer allocated so far.
    layer_end: AtomicU32,
}

impl MoeCounts {
    pub(crate) fn new() -> MoeCounts {
        MoeCounts { layers: (0..MAX_MOE_LAYERS).map(|_| OnceLock::new()).collect(), layer_end: AtomicU32::new(0) }
    }

    /// Adds one call's counts (recording thread only). Returns the call's index for this layer
    /// (0 for the first), or `None` when the layer is out of range or reports more experts than
    /// its first call did.
    #[inline]
    pub(crate) fn add(&self, layer: u32, now_raw: u64, tokens_per_expert: &[u32]) -> Option<u64> {
        let slot = self.layers.get(layer as usize)?;
        let counts = match slot.get() {
            Some(c) => c,
            None => self.allocate(slot, layer, tokens_per_expert.len()),
        };
        if tokens_per_expert.len() > counts.tokens.len() {
            return None;
        }
        // Single writer: plain loads and stores, no read-modify-write instructions.
        let seq = counts.seq.load(Ordering::Relaxed);
        counts.seq.store(seq.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::Release);
        for (total, &n) in counts.tokens.iter().zip(tokens_per_expert) {
            if n != 0 {
                total.store(total.load(Ordering::Relaxed) + u64::from(n), Ordering::Relaxed);
            }
        }
        let call = counts.calls.load(Ordering::Relaxed);
        counts.calls.store(call + 1, Ordering::Relaxed);
        counts.last_raw.store(now_raw, Ordering::Relaxed);
        counts.seq.store(seq.wrapping_add(2), Ordering::Release);
        Some(call)
    }

    #[cold]
    #[inline(never)]
    fn allocate<'a>(&self, slot: &'a OnceLock<LayerCounts>, layer: u32, experts: usize) -> &'a LayerCounts {
        let counts = slot.get_or_init(|| LayerCounts {
            seq: AtomicU64::new(0),
            calls: AtomicU64::new(0),
            last_raw: AtomicU64::new(0),
            tokens: (0..experts).map(|_| AtomicU64::new(0)).collect(),
        });
        self.layer_end.fetch_max(layer + 1, Ordering::Release);
        counts
    }

    /// One more than the highest layer recorded so far.
    pub(crate) fn layer_end(&self) -> u32 {
        self.layer_end.load(Ordering::Acquire)
    }

    /// A consistent reading of `layer` into `out` (collector only): `Ok(true)` when taken,
    /// `Ok(false)` when the thread never recorded the layer, `Err(())` when the writer kept it
    /// busy through every retry (read it on the next pass).
    pub(crate) fn snapshot(&self, layer: u32, out: &mut LayerSnapshot) -> Result<bool, ()> {
        let Some(counts) = self.layers.get(layer as usize).and_then(OnceLock::get) else { return Ok(false) };
        for attempt in 0..1000 {
            let before = counts.seq.load(Ordering::Acquire);
            if before % 2 == 1 {
                if attempt > 16 {
                    std::thread::yield_now();
                }
                std::hint::spin_loop();
                continue;
            }
            out.tokens.clear();
            out.tokens.extend(counts.tokens.iter().map(|t| t.load(Ordering::Relaxed)));
            out.calls = counts.calls.load(Ordering::Relaxed);
            out.last_raw = counts.last_raw.load(Ordering::Relaxed);
            fence(Ordering::Acquire);
            if counts.seq.load(Ordering::Relaxed) == before {
                return Ok(true);
            }
        }
        Err(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn totals_are_exact_and_snapshots_whole() {
        let counts = Arc::new(MoeCounts::new());
        let writer = {
            let counts = counts.clone();
            std::thread::spawn(move || {
                for step in 0..20_000u64 {
                    // Every call routes 8 tokens to each of 4 experts: a whole step sums to 32.
                    assert_eq!(counts.add(3, step, &[8, 8, 8, 8, 0, 0]), Some(step));
                }
            })
        };
        let mut snap = LayerSnapshot::default();
        while !writer.is_finished() {
            if counts.snapshot(3, &mut snap) == Ok(true) {
                assert_eq!(snap.tokens.iter().sum::<u64>(), snap.calls * 32, "a snapshot holds whole calls");
            }
        }
        writer.join().unwrap();
        assert_eq!(counts.snapshot(3, &mut snap), Ok(true));
        assert_eq!(snap.calls, 20_000);
        assert_eq!(snap.tokens, [160_000, 160_000, 160_000, 160_000, 0, 0]);
        assert_eq!(counts.layer_end(), 4);
        assert_eq!(counts.snapshot(2, &mut snap), Ok(false));
        assert_eq!(counts.add(MAX_MOE_LAYERS as u32, 0, &[1]), None);
        assert_eq!(counts.add(3, 0, &[1; 7]), None, "more experts than the layer's first call");
    }
}
