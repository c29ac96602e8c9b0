//! The recording handles an engine calls on its hot path.
//!
//! Every handle is cheap to clone, `Send + Sync`, and has a disabled form whose methods do
//! nothing but test one pointer. Recording never blocks, allocates, locks or returns an error:
//! an event that cannot be buffered is dropped and counted.

use crate::backend::Mark;
use crate::record::*;
use crate::recorder::{Shared, Timing};
use crate::types::{Component, CpuOp, DropReason, GraphEvent, LifecycleEvent, ModelType, Phase, ProfilerKind};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

#[inline]
fn shared_for(shared: &Option<Arc<Shared>>, kind: ProfilerKind) -> Option<Arc<Shared>> {
    shared.as_ref().filter(|s| s.is_enabled(kind)).cloned()
}

/// Converts milliseconds given by the caller to nanoseconds; `None` for negative, NaN or
/// infinite values (dropped and counted as [`DropReason::InvalidValue`]).
#[inline]
fn ms_to_ns(ms: f64) -> Option<u64> {
    (0.0..1.8e13).contains(&ms).then(|| (ms * 1e6).round() as u64)
}

#[inline]
fn dur_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A region timed with the session's timing backend (host clock or device events).
#[derive(Clone, Copy)]
struct Timed {
    start_raw: u64,
    device: Option<Mark>,
}

#[inline(always)]
fn begin(shared: &Shared, kind: ProfilerKind) -> Option<Timed> {
    let start_raw = shared.now();
    match &shared.timing {
        Timing::Host => Some(Timed { start_raw, device: None }),
        Timing::Device(b) => match b.start() {
            Some(m) => Some(Timed { start_raw, device: Some(m) }),
            None => {
                timing_failure(shared, kind);
                None
            }
        },
    }
}

#[cold]
fn timing_failure(shared: &Shared, kind: ProfilerKind) {
    shared.orphan_drops.add(kind, DropReason::Timing, 1);
}

/// Fills words 1..=4 of `slot` for a timed region that ends now. Returns `false` when the
/// device could not mark the end (the event is dropped and counted).
#[inline(always)]
fn end(shared: &Shared, kind: ProfilerKind, t: Timed, slot: &mut Slot) -> bool {
    slot.set_word(1, t.start_raw);
    if let (Some(start), Timing::Device(b)) = (t.device, &shared.timing) {
        let Some(stop) = b.stop(start) else {
            b.release(start, start);
            timing_failure(shared, kind);
            return false;
        };
        slot.0[2] |= F_DEVICE;
        slot.set_word(3, start.0);
        slot.set_word(4, stop.0);
    }
    slot.set_word(2, shared.now());
    true
}

/// Fills words 1 and 2 of `slot` for a region that ended now and lasted `ns`.
#[inline(always)]
fn measured(shared: &Shared, ns: u64, slot: &mut Slot) {
    measured_at(ns, shared.now(), slot);
}

/// Fills words 1 and 2 of `slot` for a region that ended at `end_raw` (a [`HostClock`](crate::HostClock) reading)
/// and lasted `ns`.
#[inline(always)]
fn measured_at(ns: u64, end_raw: u64, slot: &mut Slot) {
    slot.0[2] |= F_DURATION;
    slot.set_word(1, end_raw);
    slot.set_word(2, ns);
}

// ---------------------------------------------------------------------------------------------
// Forward pass

/// Records forward passes (engine steps) for `forward_pass_timing.csv`.
///
/// ```
/// use profilemate_core::{Phase, Session};
/// let session = Session::builder().in_memory_only().build()?;
/// let forward = session.forward_pass();
///
/// let pass = forward.start(Phase::Decode, 32, 32);
/// // ... run the model ...
/// pass.stop();
///
/// // A pass timed elsewhere (for example by the engine's own events):
/// forward.record(Phase::Prefill, 1, 512, std::time::Duration::from_micros(4500));
/// # Ok::<(), profilemate_core::Error>(())
/// ```
#[derive(Clone, Default)]
pub struct ForwardPass {
    shared: Option<Arc<Shared>>,
}

impl ForwardPass {
    pub(crate) fn new(shared: &Option<Arc<Shared>>) -> Self {
        ForwardPass { shared: shared_for(shared, ProfilerKind::ForwardPass) }
    }

    /// A handle that records nothing.
    pub const fn disabled() -> Self {
        ForwardPass { shared: None }
    }

    /// Whether this handle records.
    pub fn is_enabled(&self) -> bool {
        self.shared.is_some()
    }

    /// Starts timing a forward pass; it ends when the guard is stopped or dropped.
    #[inline]
    pub fn start(&self, phase: Phase, batch_size: u32, num_tokens: u32) -> ForwardGuard<'_> {
        let timed = match &self.shared {
            Some(s) => {
                s.open_step_for_forward();
                begin(s, ProfilerKind::ForwardPass)
            }
            None => None,
        };
        ForwardGuard { shared: self.shared.as_ref(), timed, phase, batch_size, num_tokens }
    }

    /// Records a pass that took `duration` and ended now.
    #[inline]
    pub fn record(&self, phase: Phase, batch_size: u32, num_tokens: u32, duration: Duration) {
        if let Some(s) = &self.shared {
            s.open_step_for_forward();
            let mut slot = forward_slot(phase, batch_size, num_tokens);
            measured(s, dur_ns(duration), &mut slot);
            s.push(ProfilerKind::ForwardPass, slot);
        }
    }

    /// Records a pass that took `duration` and ended at `end_raw`: a reading of a [`HostClock`](crate::HostClock)
    /// that the caller took anyway, where the pass ended. Every `HostClock` of a process reads
    /// the one counter that the session stamps its rows with, so one reading serves both the
    /// caller's duration and the row's timestamp (a clock read less per record: the vLLM
    /// binding's step path reads the clock once per region boundary this way). A reading of
    /// anything else gives the row a meaningless timestamp.
    ///
    /// ```
    /// use profilemate_core::{HostClock, Phase, Session};
    /// use std::time::Duration;
    /// let session = Session::builder().in_memory_only().build()?;
    /// let clock = HostClock::new();
    /// let start = clock.raw();
    /// // ... run the model ...
    /// let end = clock.raw();
    /// let took = Duration::from_nanos(clock.delta_ns(start, end));
    /// session.forward_pass().record_ended_at(Phase::Decode, 8, 8, took, end);
    /// # Ok::<(), profilemate_core::Error>(())
    /// ```
    #[inline]
    pub fn record_ended_at(&self, phase: Phase, batch_size: u32, num_tokens: u32, duration: Duration, end_raw: u64) {
        if let Some(s) = &self.shared {
            s.open_step_for_forward();
            let mut slot = forward_slot(phase, batch_size, num_tokens);
            measured_at(dur_ns(duration), end_raw, &mut slot);
            s.push(ProfilerKind::ForwardPass, slot);
        }
    }

    /// Records a pass that took `ms` milliseconds and ended now. Negative, NaN or infinite
    /// values are dropped and counted as [`DropReason::InvalidValue`].
    #[inline]
    pub fn record_ms(&self, phase: Phase, batch_size: u32, num_tokens: u32, ms: f64) {
        if let Some(s) = &self.shared {
            match ms_to_ns(ms) {
                Some(ns) => {
                    s.open_step_for_forward();
                    let mut slot = forward_slot(phase, batch_size, num_tokens);
                    measured(s, ns, &mut slot);
                    s.push(ProfilerKind::ForwardPass, slot);
                }
                None => s.count_drop(ProfilerKind::ForwardPass, DropReason::InvalidValue),
            }
        }
    }
}

#[inline(always)]
fn forward_slot(phase: Phase, batch_size: u32, num_tokens: u32) -> Slot {
    let mut slot = Slot::head(K_FORWARD, phase as u8, 0);
    slot.set_pair(5, batch_size, num_tokens);
    slot
}

/// A forward pass being timed. It is recorded when stopped or dropped.
#[must_use = "dropping the guard ends the forward pass at once; bind it (`let pass = ...`) and call `stop()` after the model ran"]
pub struct ForwardGuard<'a> {
    shared: Option<&'a Arc<Shared>>,
    timed: Option<Timed>,
    phase: Phase,
    batch_size: u32,
    num_tokens: u32,
}

impl ForwardGuard<'_> {
    /// Ends the pass now and records it.
    #[inline]
    pub fn stop(self) {}

    /// Corrects the batch before the pass ends (for engines that learn it late).
    #[inline]
    pub fn set_batch(&mut self, phase: Phase, batch_size: u32, num_tokens: u32) {
        self.phase = phase;
        self.batch_size = batch_size;
        self.num_tokens = num_tokens;
    }

    /// Forgets the pass: nothing is recorded.
    pub fn cancel(mut self) {
        if let (Some(s), Some(t)) = (self.shared, self.timed.take()) {
            if let (Some(m), Timing::Device(b)) = (t.device, &s.timing) {
                b.release(m, m);
            }
        }
    }
}

impl Drop for ForwardGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        if let (Some(s), Some(t)) = (self.shared, self.timed) {
            let mut slot = forward_slot(self.phase, self.batch_size, self.num_tokens);
            if end(s, ProfilerKind::ForwardPass, t, &mut slot) {
                s.push(ProfilerKind::ForwardPass, slot);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// CPU operations

/// Records CPU operations for `cpu_operations_timing.csv`.
///
/// ```
/// use profilemate_core::{CpuOp, Session};
/// let session = Session::builder().in_memory_only().build()?;
/// let cpu = session.cpu_timing();
///
/// {
///     let _scheduling = cpu.start(CpuOp::SCHEDULING);
///     // ... choose the next batch ...
/// }
/// let batch = cpu.time_with(CpuOp::BATCH_PREPARATION, "phase=decode;batch_size=32", || vec![0u32; 32]);
/// assert_eq!(batch.len(), 32);
///
/// let detokenize = session.register_cpu_operation("detokenize")?;
/// cpu.record(detokenize, std::time::Duration::from_micros(40), "");
/// # Ok::<(), profilemate_core::Error>(())
/// ```
#[derive(Clone, Default)]
pub struct CpuTiming {
    shared: Option<Arc<Shared>>,
}

impl CpuTiming {
    pub(crate) fn new(shared: &Option<Arc<Shared>>) -> Self {
        CpuTiming { shared: shared_for(shared, ProfilerKind::CpuTiming) }
    }

    /// A handle that records nothing.
    pub const fn disabled() -> Self {
        CpuTiming { shared: None }
    }

    /// Whether this handle records.
    pub fn is_enabled(&self) -> bool {
        self.shared.is_some()
    }

    /// Starts timing `op`; it ends when the guard is stopped or dropped.
    #[inline]
    pub fn start(&self, op: CpuOp) -> CpuGuard<'_> {
        self.start_with(op, "")
    }

    /// Starts timing `op` with a context (`key=value` pairs separated by `;`).
    #[inline]
    pub fn start_with<'a>(&'a self, op: CpuOp, context: &'a str) -> CpuGuard<'a> {
        let start_raw = self.shared.as_ref().map_or(0, |s| s.now());
        CpuGuard { shared: self.shared.as_ref(), op, context, start_raw }
    }

    /// Times `f` as `op` and returns what it returned.
    #[inline]
    pub fn time<R>(&self, op: CpuOp, f: impl FnOnce() -> R) -> R {
        let _guard = self.start(op);
        f()
    }

    /// Times `f` as `op` with a context and returns what it returned.
    #[inline]
    pub fn time_with<R>(&self, op: CpuOp, context: &str, f: impl FnOnce() -> R) -> R {
        let _guard = self.start_with(op, context);
        f()
    }

    /// Records `op` that took `duration` and ended now.
    #[inline]
    pub fn record(&self, op: CpuOp, duration: Duration, context: &str) {
        if let Some(s) = &self.shared {
            let mut slot = cpu_slot(op, context);
            measured(s, dur_ns(duration), &mut slot);
            s.push_text(ProfilerKind::CpuTiming, slot, CPU_TEXT_AT, &[context.as_bytes()]);
        }
    }

    /// Records `op` that took `duration` and ended at `end_raw`, a [`HostClock`](crate::HostClock) reading the
    /// caller took where it ended (see [`ForwardPass::record_ended_at`]).
    ///
    /// ```
    /// use profilemate_core::{CpuOp, HostClock, Session};
    /// use std::time::Duration;
    /// let session = Session::builder().in_memory_only().build()?;
    /// let clock = HostClock::new();
    /// let start = clock.raw();
    /// // ... schedule ...
    /// let end = clock.raw();
    /// let took = Duration::from_nanos(clock.delta_ns(start, end));
    /// session.cpu_timing().record_ended_at(CpuOp::SCHEDULING, took, end, "phase=decode");
    /// # Ok::<(), profilemate_core::Error>(())
    /// ```
    #[inline]
    pub fn record_ended_at(&self, op: CpuOp, duration: Duration, end_raw: u64, context: &str) {
        if let Some(s) = &self.shared {
            let mut slot = cpu_slot(op, context);
            measured_at(dur_ns(duration), end_raw, &mut slot);
            s.push_text(ProfilerKind::CpuTiming, slot, CPU_TEXT_AT, &[context.as_bytes()]);
        }
    }

    /// Records `op` that took `ms` milliseconds and ended now. Negative, NaN or infinite values
    /// are dropped and counted as [`DropReason::InvalidValue`].
    #[inline]
    pub fn record_ms(&self, op: CpuOp, ms: f64, context: &str) {
        if let Some(s) = &self.shared {
            match ms_to_ns(ms) {
                Some(ns) => {
                    let mut slot = cpu_slot(op, context);
                    measured(s, ns, &mut slot);
                    s.push_text(ProfilerKind::CpuTiming, slot, CPU_TEXT_AT, &[context.as_bytes()]);
                }
                None => s.count_drop(ProfilerKind::CpuTiming, DropReason::InvalidValue),
            }
        }
    }
}

#[inline(always)]
fn cpu_slot(op: CpuOp, context: &str) -> Slot {
    let mut slot = Slot::head(K_CPU, 0, 0);
    slot.set_word(3, context.len() as u64 | u64::from(op.0) << 32);
    slot
}

/// A CPU operation being timed. It is recorded when stopped or dropped.
#[must_use = "dropping the guard ends the operation at once; bind it (`let _op = ...`) for the scope you time"]
pub struct CpuGuard<'a> {
    shared: Option<&'a Arc<Shared>>,
    op: CpuOp,
    context: &'a str,
    start_raw: u64,
}

impl CpuGuard<'_> {
    /// Ends the operation now and records it.
    #[inline]
    pub fn stop(self) {}

    /// Forgets the operation: nothing is recorded.
    pub fn cancel(mut self) {
        self.shared = None;
    }
}

impl Drop for CpuGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        if let Some(s) = self.shared {
            let mut slot = cpu_slot(self.op, self.context);
            slot.set_word(1, self.start_raw);
            slot.set_word(2, s.now());
            if self.context.is_empty() {
                s.push(ProfilerKind::CpuTiming, slot);
            } else {
                s.push_text(ProfilerKind::CpuTiming, slot, CPU_TEXT_AT, &[self.context.as_bytes()]);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Batch utilization

/// One scheduled batch against the scheduler's limits, for `batch_utilization.csv`.
///
/// Percentages are computed by the collector: `num / max * 100`, empty when the limit is 0 and
/// clamped to 100 (and counted in the summary's `over_limit_samples`) when the batch exceeds
/// its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchSample {
    /// Sequences scheduled.
    pub num_seqs: u32,
    /// The scheduler's sequence limit (`max_num_seqs`).
    pub max_num_seqs: u32,
    /// Tokens scheduled.
    pub num_tokens: u32,
    /// The scheduler's token limit (`max_num_batched_tokens`).
    pub max_tokens: u32,
    /// Prefill, decode or mixed.
    pub phase: Phase,
    /// Requests running after scheduling.
    pub running_queue_len: u32,
    /// Requests waiting after scheduling.
    pub waiting_queue_len: u32,
}

/// Records scheduled batches for `batch_utilization.csv`.
///
/// ```
/// use profilemate_core::{BatchSample, Phase, Session};
/// let session = Session::builder().in_memory_only().build()?;
/// let batches = session.batch_utilization();
/// batches.record(&BatchSample {
///     num_seqs: 24, max_num_seqs: 256, num_tokens: 1850, max_tokens: 8192,
///     phase: Phase::Mixed, running_queue_len: 24, waiting_queue_len: 12,
/// });
/// # Ok::<(), profilemate_core::Error>(())
/// ```
#[derive(Clone, Default)]
pub struct BatchUtilization {
    shared: Option<Arc<Shared>>,
}

impl BatchUtilization {
    pub(crate) fn new(shared: &Option<Arc<Shared>>) -> Self {
        BatchUtilization { shared: shared_for(shared, ProfilerKind::BatchUtilization) }
    }

    /// A handle that records nothing.
    pub const fn disabled() -> Self {
        BatchUtilization { shared: None }
    }

    /// Whether this handle records.
    pub fn is_enabled(&self) -> bool {
        self.shared.is_some()
    }

    /// Records one scheduled batch, now.
    #[inline]
    pub fn record(&self, sample: &BatchSample) {
        if let Some(s) = &self.shared {
            self.push(s, sample, s.now());
        }
    }

    /// Records one scheduled batch at `at_raw`, a [`HostClock`](crate::HostClock) reading the caller took (see
    /// [`ForwardPass::record_ended_at`]).
    ///
    /// ```
    /// use profilemate_core::{BatchSample, HostClock, Phase, Session};
    /// let session = Session::builder().in_memory_only().build()?;
    /// let sample = BatchSample {
    ///     num_seqs: 12, max_num_seqs: 16, num_tokens: 12, max_tokens: 2048,
    ///     phase: Phase::Decode, running_queue_len: 12, waiting_queue_len: 0,
    /// };
    /// session.batch_utilization().record_at(&sample, HostClock::new().raw());
    /// # Ok::<(), profilemate_core::Error>(())
    /// ```
    #[inline]
    pub fn record_at(&self, sample: &BatchSample, at_raw: u64) {
        if let Some(s) = &self.shared {
            self.push(s, sample, at_raw);
        }
    }

    #[inline(always)]
    fn push(&self, s: &Arc<Shared>, sample: &BatchSample, at_raw: u64) {
        let mut slot = Slot::head(K_BATCH, sample.phase as u8, 0);
        slot.set_word(1, at_raw);
        slot.set_pair(2, sample.num_seqs, sample.max_num_seqs);
        slot.set_pair(3, sample.num_tokens, sample.max_tokens);
        slot.set_pair(4, sample.running_queue_len, sample.waiting_queue_len);
        s.push(ProfilerKind::BatchUtilization, slot);
    }
}

// ---------------------------------------------------------------------------------------------
// Request lifecycle

/// Records request lifecycle events (`preemption_events.csv`, `request_lifecycle.csv`).
///
/// Request ids are the engine's own strings; any text is kept as given (commas, quotes,
/// newlines and non-ASCII round-trip through the CSV files). An empty id is dropped and counted
/// as [`DropReason::InvalidValue`].
///
/// ```
/// use profilemate_core::Session;
/// let session = Session::builder().in_memory_only().build()?;
/// let requests = session.requests();
/// requests.started("req-1");
/// requests.preempted("req-1", "RECOMPUTE", "num_blocks=128;num_computed_tokens=812");
/// requests.resumed("req-1");
/// requests.finished("req-1", "status=FINISHED_STOPPED");
/// # Ok::<(), profilemate_core::Error>(())
/// ```
#[derive(Clone, Default)]
pub struct Requests {
    shared: Option<Arc<Shared>>,
}

impl Requests {
    pub(crate) fn new(shared: &Option<Arc<Shared>>) -> Self {
        Requests { shared: shared_for(shared, ProfilerKind::Preemption) }
    }

    /// A handle that records nothing.
    pub const fn disabled() -> Self {
        Requests { shared: None }
    }

    /// Whether this handle records.
    pub fn is_enabled(&self) -> bool {
        self.shared.is_some()
    }

    /// The request began processing.
    #[inline]
    pub fn started(&self, request_id: &str) {
        self.record(request_id, LifecycleEvent::Started, "", "");
    }

    /// The request was preempted; `reason` is `RECOMPUTE`, `SWAP`, `kv_cache_full` or an
    /// engine's own word.
    #[inline]
    pub fn preempted(&self, request_id: &str, reason: &str, extra_info: &str) {
        self.record(request_id, LifecycleEvent::Preempted, reason, extra_info);
    }

    /// A preempted request runs again.
    #[inline]
    pub fn resumed(&self, request_id: &str) {
        self.record(request_id, LifecycleEvent::Resumed, "", "");
    }

    /// The request completed.
    #[inline]
    pub fn finished(&self, request_id: &str, extra_info: &str) {
        self.record(request_id, LifecycleEvent::Finished, "", extra_info);
    }

    /// The request was removed before completing.
    #[inline]
    pub fn evicted(&self, request_id: &str, reason: &str, extra_info: &str) {
        self.record(request_id, LifecycleEvent::Evicted, reason, extra_info);
    }

    /// Records any lifecycle event, now.
    #[inline]
    pub fn record(&self, request_id: &str, event: LifecycleEvent, reason: &str, extra_info: &str) {
        if let Some(s) = &self.shared {
            if request_id.is_empty() {
                s.count_drop(ProfilerKind::Preemption, DropReason::InvalidValue);
                return;
            }
            let lens = [request_id.len(), reason.len(), extra_info.len()];
            if lens.iter().sum::<usize>() > MAX_TEXT_BYTES {
                s.count_drop(ProfilerKind::Preemption, DropReason::TextTooLong);
                return;
            }
            let mut slot = Slot::head(K_LIFECYCLE, event as u8, 0);
            slot.set_word(1, s.now());
            slot.set_word(2, lens[0] as u64 | (lens[1] as u64) << 16 | (lens[2] as u64) << 32);
            s.push_text(
                ProfilerKind::Preemption,
                slot,
                LIFECYCLE_TEXT_AT,
                &[request_id.as_bytes(), reason.as_bytes(), extra_info.as_bytes()],
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Encoder / decoder components

/// Records encoder, decoder and cross-attention time for `encoder_decoder_timing.csv`.
///
/// Components are timed with the session's timing backend, like forward passes.
///
/// ```
/// use profilemate_core::{Component, ModelType, Session};
/// let session = Session::builder().in_memory_only().build()?;
/// let components = session.components();
/// components.declare_model_type(ModelType::EncoderDecoder);
/// {
///     let _encoder = components.start(Component::Encoder, "audio_encoder");
///     // ... encode the audio once per request ...
/// }
/// components.record(Component::Decoder, "language_model", std::time::Duration::from_millis(3));
/// # Ok::<(), profilemate_core::Error>(())
/// ```
#[derive(Clone, Default)]
pub struct Components {
    shared: Option<Arc<Shared>>,
}

impl Components {
    pub(crate) fn new(shared: &Option<Arc<Shared>>) -> Self {
        Components { shared: shared_for(shared, ProfilerKind::EncoderDecoder) }
    }

    /// A handle that records nothing.
    pub const fn disabled() -> Self {
        Components { shared: None }
    }

    /// Whether this handle records.
    pub fn is_enabled(&self) -> bool {
        self.shared.is_some()
    }

    /// Declares the model's architecture; without it the summary infers one (any encoder time
    /// means `encoder_decoder`).
    pub fn declare_model_type(&self, model_type: ModelType) {
        if let Some(s) = &self.shared {
            s.model_type.store(model_type as u8 + 1, Ordering::Relaxed);
        }
    }

    /// Starts timing `component`; `context` names the part (`vision_encoder`, `language_model`).
    #[inline]
    pub fn start<'a>(&'a self, component: Component, context: &'a str) -> ComponentGuard<'a> {
        let timed = match &self.shared {
            Some(s) => begin(s, ProfilerKind::EncoderDecoder),
            None => None,
        };
        ComponentGuard { shared: self.shared.as_ref(), timed, component, context }
    }

    /// Records `component` that took `duration` and ended now.
    #[inline]
    pub fn record(&self, component: Component, context: &str, duration: Duration) {
        if let Some(s) = &self.shared {
            let mut slot = component_slot(component, context);
            measured(s, dur_ns(duration), &mut slot);
            s.push_text(ProfilerKind::EncoderDecoder, slot, COMPONENT_TEXT_AT, &[context.as_bytes()]);
        }
    }

    /// Records `component` that took `duration` and ended at `end_raw`, a [`HostClock`](crate::HostClock)
    /// reading the caller took where it ended (see [`ForwardPass::record_ended_at`]).
    ///
    /// ```
    /// use profilemate_core::{Component, HostClock, Session};
    /// use std::time::Duration;
    /// let session = Session::builder().in_memory_only().build()?;
    /// let end = HostClock::new().raw();
    /// session.components().record_ended_at(Component::Decoder, "language_model", Duration::from_micros(900), end);
    /// # Ok::<(), profilemate_core::Error>(())
    /// ```
    #[inline]
    pub fn record_ended_at(&self, component: Component, context: &str, duration: Duration, end_raw: u64) {
        if let Some(s) = &self.shared {
            let mut slot = component_slot(component, context);
            measured_at(dur_ns(duration), end_raw, &mut slot);
            s.push_text(ProfilerKind::EncoderDecoder, slot, COMPONENT_TEXT_AT, &[context.as_bytes()]);
        }
    }

    /// Records `component` that took `ms` milliseconds and ended now. Negative, NaN or infinite
    /// values are dropped and counted as [`DropReason::InvalidValue`].
    #[inline]
    pub fn record_ms(&self, component: Component, context: &str, ms: f64) {
        if let Some(s) = &self.shared {
            match ms_to_ns(ms) {
                Some(ns) => {
                    let mut slot = component_slot(component, context);
                    measured(s, ns, &mut slot);
                    s.push_text(ProfilerKind::EncoderDecoder, slot, COMPONENT_TEXT_AT, &[context.as_bytes()]);
                }
                None => s.count_drop(ProfilerKind::EncoderDecoder, DropReason::InvalidValue),
            }
        }
    }
}

#[inline(always)]
fn component_slot(component: Component, context: &str) -> Slot {
    let mut slot = Slot::head(K_COMPONENT, component as u8, 0);
    slot.set_word(5, context.len() as u64);
    slot
}

/// A component being timed. It is recorded when stopped or dropped.
#[must_use = "dropping the guard ends the component at once; bind it (`let _enc = ...`) for the scope you time"]
pub struct ComponentGuard<'a> {
    shared: Option<&'a Arc<Shared>>,
    timed: Option<Timed>,
    component: Component,
    context: &'a str,
}

impl ComponentGuard<'_> {
    /// Ends the component now and records it.
    #[inline]
    pub fn stop(self) {}

    /// Forgets the component: nothing is recorded.
    pub fn cancel(mut self) {
        if let (Some(s), Some(t)) = (self.shared, self.timed.take()) {
            if let (Some(m), Timing::Device(b)) = (t.device, &s.timing) {
                b.release(m, m);
            }
        }
    }
}

impl Drop for ComponentGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        if let (Some(s), Some(t)) = (self.shared, self.timed) {
            let mut slot = component_slot(self.component, self.context);
            if end(s, ProfilerKind::EncoderDecoder, t, &mut slot) {
                s.push_text(ProfilerKind::EncoderDecoder, slot, COMPONENT_TEXT_AT, &[self.context.as_bytes()]);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Trackers: KV cache, CUDA graphs, MoE experts

/// One reading of the KV cache, for `kv_cache_usage.csv`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KvCacheSample {
    /// Blocks in use.
    pub used_blocks: u32,
    /// Blocks in the cache.
    pub total_blocks: u32,
    /// Prefix-cache lookups since the previous sample.
    pub prefix_cache_queries: u64,
    /// Prefix-cache hits since the previous sample.
    pub prefix_cache_hits: u64,
}

/// Records KV cache usage for `kv_cache_usage.csv`, typically once per step.
///
/// ```
/// use profilemate_core::{KvCacheSample, Session};
/// let session = Session::builder().in_memory_only().build()?;
/// session.kv_cache().record(&KvCacheSample { used_blocks: 96, total_blocks: 128, prefix_cache_queries: 4, prefix_cache_hits: 3 });
/// # Ok::<(), profilemate_core::Error>(())
/// ```
#[derive(Clone, Default)]
pub struct KvCacheUsage {
    shared: Option<Arc<Shared>>,
}

impl KvCacheUsage {
    pub(crate) fn new(shared: &Option<Arc<Shared>>) -> Self {
        KvCacheUsage { shared: shared_for(shared, ProfilerKind::KvCache) }
    }

    /// A handle that records nothing.
    pub const fn disabled() -> Self {
        KvCacheUsage { shared: None }
    }

    /// Whether this handle records.
    pub fn is_enabled(&self) -> bool {
        self.shared.is_some()
    }

    /// Records one reading, now.
    #[inline]
    pub fn record(&self, sample: &KvCacheSample) {
        if let Some(s) = &self.shared {
            self.push(s, sample, s.now());
        }
    }

    /// Records one reading at `at_raw`, a [`HostClock`](crate::HostClock) reading the caller took (see
    /// [`ForwardPass::record_ended_at`]).
    ///
    /// ```
    /// use profilemate_core::{HostClock, KvCacheSample, Session};
    /// let session = Session::builder().in_memory_only().build()?;
    /// let sample = KvCacheSample { used_blocks: 30, total_blocks: 100, prefix_cache_queries: 4, prefix_cache_hits: 1 };
    /// session.kv_cache().record_at(&sample, HostClock::new().raw());
    /// # Ok::<(), profilemate_core::Error>(())
    /// ```
    #[inline]
    pub fn record_at(&self, sample: &KvCacheSample, at_raw: u64) {
        if let Some(s) = &self.shared {
            self.push(s, sample, at_raw);
        }
    }

    #[inline(always)]
    fn push(&self, s: &Arc<Shared>, sample: &KvCacheSample, at_raw: u64) {
        let mut slot = Slot::head(K_KV_CACHE, 0, 0);
        slot.set_word(1, at_raw);
        slot.set_pair(2, sample.used_blocks, sample.total_blocks);
        slot.set_word(3, sample.prefix_cache_queries);
        slot.set_word(4, sample.prefix_cache_hits);
        s.push(ProfilerKind::KvCache, slot);
    }
}

/// Records CUDA graph captures, replays and eager steps for `cuda_graph_events.csv`.
///
/// ```
/// use profilemate_core::Session;
/// use std::time::Duration;
/// let session = Session::builder().in_memory_only().build()?;
/// let graphs = session.cuda_graphs();
/// graphs.capture(8, Duration::from_millis(40));
/// graphs.replay(5, 8);   // a batch of 5 padded to the graph captured for 8
/// graphs.eager(300);     // larger than any captured graph
/// # Ok::<(), profilemate_core::Error>(())
/// ```
#[derive(Clone, Default)]
pub struct CudaGraphs {
    shared: Option<Arc<Shared>>,
}

impl CudaGraphs {
    pub(crate) fn new(shared: &Option<Arc<Shared>>) -> Self {
        CudaGraphs { shared: shared_for(shared, ProfilerKind::CudaGraph) }
    }

    /// A handle that records nothing.
    pub const fn disabled() -> Self {
        CudaGraphs { shared: None }
    }

    /// Whether this handle records.
    pub fn is_enabled(&self) -> bool {
        self.shared.is_some()
    }

    /// A graph for `batch_size` was captured in `duration`.
    #[inline]
    pub fn capture(&self, batch_size: u32, duration: Duration) {
        self.record(GraphEvent::Capture, batch_size, None, Some(duration));
    }

    /// A step of `batch_size` sequences replayed the graph captured for `padded_batch_size`.
    #[inline]
    pub fn replay(&self, batch_size: u32, padded_batch_size: u32) {
        self.record(GraphEvent::Replay, batch_size, Some(padded_batch_size), None);
    }

    /// A step of `batch_size` sequences ran without a graph.
    #[inline]
    pub fn eager(&self, batch_size: u32) {
        self.record(GraphEvent::Eager, batch_size, None, None);
    }

    /// Records any graph event, now; `duration` when it was timed.
    #[inline]
    pub fn record(
        &self,
        event: GraphEvent,
        batch_size: u32,
        padded_batch_size: Option<u32>,
        duration: Option<Duration>,
    ) {
        if let Some(s) = &self.shared {
            let mut slot = Slot::head(K_CUDA_GRAPH, event as u8, 0);
            match duration {
                Some(d) => measured(s, dur_ns(d), &mut slot),
                None => slot.set_word(1, s.now()),
            }
            if let Some(p) = padded_batch_size {
                slot.0[2] |= F_PADDED;
                slot.set_pair(4, p, 0);
            }
            slot.set_pair(3, batch_size, 0);
            s.push(ProfilerKind::CudaGraph, slot);
        }
    }
}

/// Records how a mixture-of-experts router spread one step's tokens over the experts of a
/// layer, for `moe_expert_routing.csv`: one call per layer per step, not one per token.
///
/// The counts are added in place into this thread's per-layer totals (no event is queued, so a
/// model of any size never crowds the forward passes out of the thread's buffer); the collector
/// reads the totals on every pass and writes one row per layer and expert per window of
/// [`Config::moe_window_steps`](crate::Config::moe_window_steps) steps. The totals in
/// `moe_expert_summary.json` are exact for the whole run. With per-step detail on
/// (`PROFILEMATE_MOE_WINDOW=step`), each call also goes to a bounded buffer of its own for one
/// row per step; a detail row that does not fit is dropped and counted, the totals stay exact.
///
/// ```
/// use profilemate_core::Session;
/// let session = Session::builder().in_memory_only().build()?;
/// let moe = session.moe_experts();
/// let tokens_per_expert = [12u32, 0, 3, 41, 8, 0, 0, 0];
/// moe.record_layer(0, &tokens_per_expert);
/// # Ok::<(), profilemate_core::Error>(())
/// ```
#[derive(Clone, Default)]
pub struct MoeRouting {
    shared: Option<Arc<Shared>>,
}

/// The most experts one layer may report (a record holds 4 bytes per expert).
pub const MAX_EXPERTS: usize = MAX_TEXT_BYTES / 4;

impl MoeRouting {
    pub(crate) fn new(shared: &Option<Arc<Shared>>) -> Self {
        MoeRouting { shared: shared_for(shared, ProfilerKind::MoeExpert) }
    }

    /// A handle that records nothing.
    pub const fn disabled() -> Self {
        MoeRouting { shared: None }
    }

    /// Whether this handle records.
    pub fn is_enabled(&self) -> bool {
        self.shared.is_some()
    }

    /// Tokens routed to each expert of `layer` in this step, indexed by expert id. More than
    /// [`MAX_EXPERTS`] experts are dropped and counted as [`DropReason::TextTooLong`]; a layer
    /// index from [`MAX_MOE_LAYERS`](crate::MAX_MOE_LAYERS), or more experts than the layer's
    /// first call reported, as [`DropReason::InvalidValue`].
    #[inline]
    pub fn record_layer(&self, layer: u32, tokens_per_expert: &[u32]) {
        if let Some(s) = &self.shared {
            if tokens_per_expert.len() > MAX_EXPERTS {
                s.count_drop(ProfilerKind::MoeExpert, DropReason::TextTooLong);
                return;
            }
            s.record_moe(layer, tokens_per_expert);
        }
    }
}
