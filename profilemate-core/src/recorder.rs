//! The engine-thread side: per-thread bounded buffers found through a thread-local, and drop
//! counters. No lock, allocation or I/O per event; a thread takes a lock and allocates its
//! buffer once, the first time it records into a session.

use crate::backend::{HostClock, TimingBackend};
use crate::moe_counts::MoeCounts;
use crate::record::{push_plain, push_with_text, Slot, K_MOE, MAX_STEP_ID, MOE_DATA_AT};
use crate::ring::{heap_ring, BufferFile, RingConsumer, RingKind, RingProducer};
use crate::types::{DropReason, ModelType, ProfilerKind};
use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock};

const KINDS: usize = ProfilerKind::ALL.len();
const REASONS: usize = DropReason::ALL.len();

/// Drop counts per profiler and reason.
#[derive(Debug, Default)]
pub(crate) struct DropCounters {
    counts: [[AtomicU64; REASONS]; KINDS],
}

impl DropCounters {
    #[inline]
    pub(crate) fn add(&self, kind: ProfilerKind, reason: DropReason, n: u64) {
        self.counts[kind.index()][reason.index()].fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn get(&self, kind: ProfilerKind, reason: DropReason) -> u64 {
        self.counts[kind.index()][reason.index()].load(Ordering::Relaxed)
    }
}

/// The collector's end of one thread's buffer.
pub(crate) struct ThreadBuffer {
    pub(crate) consumer: RingConsumer,
    pub(crate) drops: Arc<DropCounters>,
}

/// The collector's end of one thread's MoE routing totals, and of its per-step detail buffer
/// when `moe_expert_routing.csv` holds one row per step.
pub(crate) struct MoeSource {
    pub(crate) counts: Arc<MoeCounts>,
    pub(crate) detail: Option<RingConsumer>,
}

struct LocalBuffer {
    session: u64,
    producer: RingProducer,
    drops: Arc<DropCounters>,
    shared: std::sync::Weak<Shared>,
    /// MoE routing totals, accumulated in place; made the first time the thread records one.
    moe: Option<(Arc<MoeCounts>, Option<RingProducer>)>,
}

thread_local! {
    static LOCAL: RefCell<Vec<LocalBuffer>> = const { RefCell::new(Vec::new()) };
}

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

/// The timing used for forward passes and components.
pub(crate) enum Timing {
    Host,
    Device(Arc<dyn TimingBackend>),
}

/// State shared by the session, its handles and its collector.
pub(crate) struct Shared {
    pub(crate) id: u64,
    pub(crate) clock: HostClock,
    pub(crate) start_raw: u64,
    pub(crate) timing: Timing,
    pub(crate) enabled: [bool; KINDS],
    pub(crate) closed: AtomicBool,
    pub(crate) buffer_events: usize,
    /// Buffers of threads that started recording since the collector last looked.
    pub(crate) incoming: Mutex<Vec<ThreadBuffer>>,
    /// Drops that could not be charged to a thread buffer (thread shutting down, session
    /// closed).
    pub(crate) orphan_drops: DropCounters,
    /// CPU operation names by id.
    pub(crate) operations: RwLock<Vec<Arc<str>>>,
    /// 0: not declared; otherwise 1 + ModelType.
    pub(crate) model_type: AtomicU8,
    /// MoE routing: per-step detail rows (through a buffer of their own) besides the totals.
    pub(crate) moe_detail: bool,
    /// MoE totals of threads that started recording routing since the collector last looked.
    pub(crate) incoming_moe: Mutex<Vec<MoeSource>>,
    /// The open step: `id << 1 | by_guard`, 0 when none is open (see [`crate::Steps`]).
    pub(crate) step: AtomicU64,
    /// The highest step id handed out.
    pub(crate) last_step: AtomicU64,
    /// When the step opened by `Steps::open` began (a raw clock reading).
    pub(crate) step_start: AtomicU64,
    /// Where thread buffers live when the session writes files: a mapping that outlives the
    /// process (see [`crate::ring`]). `None`: heap buffers.
    pub(crate) buffer_file: Option<Arc<BufferFile>>,
    /// Session time of a raw clock reading: `(raw, ns)`; `(start_raw, 0)` for a live session,
    /// the dead collector's last anchor for a replay.
    pub(crate) anchor: (u64, u64),
}

impl Shared {
    pub(crate) fn new(clock: HostClock, timing: Timing, enabled: [bool; KINDS], buffer_events: usize) -> Shared {
        let start_raw = clock.raw();
        Shared {
            id: NEXT_SESSION.fetch_add(1, Ordering::Relaxed),
            clock,
            start_raw,
            timing,
            enabled,
            closed: AtomicBool::new(false),
            buffer_events,
            incoming: Mutex::new(Vec::new()),
            orphan_drops: DropCounters::default(),
            operations: RwLock::new(crate::types::CpuOp::BUILTIN_NAMES.iter().map(|n| Arc::from(*n)).collect()),
            model_type: AtomicU8::new(0),
            moe_detail: false,
            incoming_moe: Mutex::new(Vec::new()),
            step: AtomicU64::new(0),
            last_step: AtomicU64::new(0),
            step_start: AtomicU64::new(0),
            buffer_file: None,
            anchor: (start_raw, 0),
        }
    }

    /// Session time in ns of a raw clock reading.
    #[inline]
    pub(crate) fn session_ns(&self, raw: u64) -> u64 {
        let (at, ns) = self.anchor;
        if raw >= at {
            ns + self.clock.delta_ns(at, raw)
        } else {
            ns.saturating_sub(self.clock.delta_ns(raw, at))
        }
    }

    /// A new ring for this session: in the buffer file when there is one, else (or when the
    /// file cannot take it) on the heap.
    #[cold]
    fn new_ring(&self, kind: RingKind) -> (RingProducer, RingConsumer) {
        if let Some(file) = &self.buffer_file {
            match file.new_ring(kind) {
                Ok(ring) => return ring,
                Err(e) => warn_once(&format!(
                    "cannot add a thread buffer to {} ({e}): this thread records into memory, which a kill \
                     of the process loses",
                    file.path().display()
                )),
            }
        }
        heap_ring(self.buffer_events)
    }

    /// The step every event recorded now belongs to (0: none).
    #[inline(always)]
    pub(crate) fn current_step(&self) -> u64 {
        self.step.load(Ordering::Relaxed) >> 1
    }

    /// A forward pass starts: unless a step guard holds a step open, it opens the next step.
    /// Plain load and store, no read-modify-write: the hot path stays as cheap as a field read.
    /// Engines that start forward passes from several threads at once open steps with a guard.
    #[inline(always)]
    pub(crate) fn open_step_for_forward(&self) {
        if self.step.load(Ordering::Relaxed) & 1 == 0 {
            let id = (self.last_step.load(Ordering::Relaxed) + 1) & MAX_STEP_ID;
            self.last_step.store(id, Ordering::Relaxed);
            self.step.store(id << 1, Ordering::Relaxed);
        }
    }

    /// Pushes a step record that carries its own id.
    pub(crate) fn push_step(self: &Arc<Self>, slot: Slot) {
        self.with_local(ProfilerKind::ForwardPass, |p| push_plain(p, slot));
    }

    #[inline(always)]
    pub(crate) fn is_enabled(&self, kind: ProfilerKind) -> bool {
        self.enabled[kind.index()]
    }

    #[inline(always)]
    pub(crate) fn now(&self) -> u64 {
        self.clock.raw()
    }

    pub(crate) fn declared_model_type(&self) -> Option<ModelType> {
        match self.model_type.load(Ordering::Relaxed) {
            1 => Some(ModelType::EncoderDecoder),
            2 => Some(ModelType::DecoderOnly),
            _ => None,
        }
    }

    /// Counts a drop that happened before anything reached a buffer.
    #[cold]
    pub(crate) fn count_drop(self: &Arc<Self>, kind: ProfilerKind, reason: DropReason) {
        self.with_local(kind, |_| Err(reason));
    }

    #[inline(always)]
    pub(crate) fn push(self: &Arc<Self>, kind: ProfilerKind, mut slot: Slot) {
        slot.set_step(self.current_step());
        self.with_local(kind, |p| push_plain(p, slot));
    }

    #[inline]
    pub(crate) fn push_text(self: &Arc<Self>, kind: ProfilerKind, mut slot: Slot, inline_at: usize, texts: &[&[u8]]) {
        slot.set_step(self.current_step());
        self.with_local(kind, |p| push_with_text(p, slot, inline_at, texts));
    }

    /// Adds one layer's routing to this thread's MoE totals and, with per-step detail on, sends
    /// it to the detail buffer. The totals never share the event buffer with the profilers.
    #[inline]
    pub(crate) fn record_moe(self: &Arc<Self>, layer: u32, tokens_per_expert: &[u32]) {
        let now = self.now();
        self.with_thread(ProfilerKind::MoeExpert, |local| {
            let (counts, detail) = match &mut local.moe {
                Some(m) => m,
                None => local.moe.insert(self.register_moe()),
            };
            let call = counts.add(layer, now, tokens_per_expert).ok_or(DropReason::InvalidValue)?;
            let Some(detail) = detail else { return Ok(()) };
            let mut slot = Slot::head(K_MOE, 0, 0);
            slot.set_step(self.current_step());
            slot.set_word(1, now);
            slot.set_pair(2, layer, tokens_per_expert.len() as u32);
            slot.set_word(3, call);
            // SAFETY: a `u32` slice viewed as bytes: same memory, 4 bytes per element, no
            // padding, and `u8` has no alignment requirement.
            let bytes = unsafe {
                std::slice::from_raw_parts(
                    tokens_per_expert.as_ptr().cast::<u8>(),
                    std::mem::size_of_val(tokens_per_expert),
                )
            };
            push_with_text(detail, slot, MOE_DATA_AT, &[bytes])
        });
    }

    /// Creates this thread's MoE totals (and detail buffer): once per thread and session.
    #[cold]
    #[inline(never)]
    fn register_moe(&self) -> (Arc<MoeCounts>, Option<RingProducer>) {
        let counts = Arc::new(MoeCounts::new());
        let (producer, consumer) = if self.moe_detail {
            let (p, c) = self.new_ring(RingKind::MoeDetail);
            (Some(p), Some(c))
        } else {
            (None, None)
        };
        let mut incoming = self.incoming_moe.lock().unwrap_or_else(|p| p.into_inner());
        incoming.push(MoeSource { counts: counts.clone(), detail: consumer });
        (counts, producer)
    }

    /// Runs `write` against this thread's buffer for this session, counting a drop if it fails.
    #[inline(always)]
    fn with_local(
        self: &Arc<Self>,
        kind: ProfilerKind,
        write: impl FnOnce(&mut RingProducer) -> Result<(), DropReason>,
    ) {
        self.with_thread(kind, |local| write(&mut local.producer));
    }

    /// Runs `write` against this thread's state for this session, counting a drop if it fails.
    #[inline(always)]
    fn with_thread(
        self: &Arc<Self>,
        kind: ProfilerKind,
        write: impl FnOnce(&mut LocalBuffer) -> Result<(), DropReason>,
    ) {
        if self.closed.load(Ordering::Relaxed) {
            self.orphan_drops.add(kind, DropReason::SessionClosed, 1);
            return;
        }
        let done = LOCAL.try_with(|cell| {
            let Ok(mut buffers) = cell.try_borrow_mut() else { return false };
            let index = match buffers.iter().position(|b| b.session == self.id) {
                Some(i) => i,
                None => self.register(&mut buffers),
            };
            let local = &mut buffers[index];
            if let Err(reason) = write(local) {
                local.drops.add(kind, reason, 1);
            }
            true
        });
        if done != Ok(true) {
            self.orphan_drops.add(kind, DropReason::BufferFull, 1);
        }
    }

    /// Creates this thread's buffer: once per thread and session.
    #[cold]
    #[inline(never)]
    fn register(self: &Arc<Self>, buffers: &mut Vec<LocalBuffer>) -> usize {
        // Forget buffers of sessions that are gone, so a long-lived thread does not collect them.
        buffers.retain(|b| b.shared.upgrade().is_some_and(|s| !s.closed.load(Ordering::Relaxed)));
        let shared = Arc::downgrade(self);
        let (producer, consumer) = self.new_ring(RingKind::Events);
        let drops = Arc::new(DropCounters::default());
        let mut incoming = self.incoming.lock().unwrap_or_else(|p| p.into_inner());
        incoming.push(ThreadBuffer { consumer, drops: drops.clone() });
        drop(incoming);
        buffers.push(LocalBuffer { session: self.id, producer, drops, shared, moe: None });
        buffers.len() - 1
    }
}

/// Prints `msg` to stderr once per process (a message said again is not repeated): a profiler
/// that cannot do part of its job says why once, off the hot path.
pub(crate) fn warn_once(msg: &str) {
    use std::sync::Mutex;
    static SEEN: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let mut seen = SEEN.lock().unwrap_or_else(|p| p.into_inner());
    if !seen.iter().any(|m| m == msg) {
        seen.push(msg.to_string());
        eprintln!("profilemate: {msg}");
    }
}
