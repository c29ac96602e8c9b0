//! The per-step timing of the vLLM binding, kept on the native side.
//!
//! vLLM's engine step passes through seven Python methods that the plugin wraps (the scheduler's
//! `schedule` and `update_from_output`, the worker's and the model runner's `execute_model`,
//! `_prepare_inputs`, `_model_forward`, `sample_tokens`). Each wrapper used to read
//! `time.perf_counter_ns` twice and hand durations, phases and counts to the recorder in calls of
//! three to twelve arguments: about 35 ns per clock read and 5 to 10 ns per argument, several
//! times a step. Here each timed region is two calls without arguments (a mark when it begins,
//! the record when it ends), the clock is the core's host clock (a TSC read where the CPU has a
//! reliable one), and what a step shares between its regions (whether a step is running, its
//! phase, batch and tokens, the forward time accumulated over `_model_forward` calls, whether its
//! sampling is still to come) lives here, in relaxed atomics: the engine calls in from one thread
//! at a time, under the GIL, and the atomics only make the type `Sync` at no cost.
//!
//! What is recorded is unchanged: `scheduling`, `batch_preparation`, `model_execution` and
//! `sampling` CPU operations with `phase=...` as context, the batch against the scheduler's
//! limits, a KV cache reading, the forward pass and the language model's (decoder) time. A
//! region whose end comes without its beginning (an exception in vLLM between the two, or a
//! call outside a step) records nothing.

use profilemate::{
    BatchSample, BatchUtilization, Component, Components, CpuOp, CpuTiming, ForwardPass, HostClock, KvCacheSample,
    KvCacheUsage, Phase, Session, Steps,
};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

const PHASES: [Phase; 3] = [Phase::Prefill, Phase::Decode, Phase::Mixed];
const PHASE_CONTEXT: [&str; 3] = ["phase=prefill", "phase=decode", "phase=mixed"];
/// The CPU operations a wrapper times with [`StepPath::op_begin`] / [`StepPath::op_end`], by the
/// binding's operation codes (0 scheduling, 1 batch_preparation, 2 model_execution, 3 sampling).
const OPS: [CpuOp; 4] = [CpuOp::SCHEDULING, CpuOp::BATCH_PREPARATION, CpuOp::MODEL_EXECUTION, CpuOp::SAMPLING];

/// The handles a step records through, and the step's state (see the module's documentation).
pub(crate) struct StepPath {
    clock: HostClock,
    forward: ForwardPass,
    cpu: CpuTiming,
    batch: BatchUtilization,
    components: Components,
    kv_cache: KvCacheUsage,
    steps: Steps,
    // The scheduler's limits (set once per scheduler): max_num_seqs, max_num_batched_tokens, and
    // the KV cache's blocks (-1: no reading).
    max_num_seqs: AtomicU32,
    max_tokens: AtomicU32,
    kv_total_blocks: AtomicI64,
    // The last scheduled step, as the scheduler's process classified it: in one process the
    // model runner's step reuses it.
    scheduled_phase: AtomicUsize,
    scheduled_seqs: AtomicU32,
    scheduled_tokens: AtomicU32,
    // The model runner's step under way.
    in_step: AtomicBool,
    phase: AtomicUsize,
    num_seqs: AtomicU32,
    num_tokens: AtomicU32,
    forward_ns: AtomicU64,
    sample_pending: AtomicBool,
    // Raw clock marks of the regions begun and not yet ended (0: none).
    schedule_mark: AtomicU64,
    execute_mark: AtomicU64,
    forward_mark: AtomicU64,
    op_marks: [AtomicU64; 4],
    // Records of steps since the process started (the idle flusher watches it).
    activity: AtomicU64,
}

impl StepPath {
    /// The step path of `session`, recording through its handles.
    pub(crate) fn new(session: &Session) -> Self {
        StepPath {
            clock: HostClock::new(),
            forward: session.forward_pass(),
            cpu: session.cpu_timing(),
            batch: session.batch_utilization(),
            components: session.components(),
            kv_cache: session.kv_cache(),
            steps: session.steps(),
            max_num_seqs: AtomicU32::new(0),
            max_tokens: AtomicU32::new(0),
            kv_total_blocks: AtomicI64::new(-1),
            scheduled_phase: AtomicUsize::new(1),
            scheduled_seqs: AtomicU32::new(0),
            scheduled_tokens: AtomicU32::new(0),
            in_step: AtomicBool::new(false),
            phase: AtomicUsize::new(1),
            num_seqs: AtomicU32::new(0),
            num_tokens: AtomicU32::new(0),
            forward_ns: AtomicU64::new(0),
            sample_pending: AtomicBool::new(false),
            schedule_mark: AtomicU64::new(0),
            execute_mark: AtomicU64::new(0),
            forward_mark: AtomicU64::new(0),
            op_marks: [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)],
            activity: AtomicU64::new(0),
        }
    }

    /// A raw clock reading, never 0 (0 means "no mark").
    #[inline(always)]
    fn mark(&self) -> u64 {
        self.clock.raw().max(1)
    }

    /// Nanoseconds since the mark in `slot`, which is cleared; `None` without a mark.
    #[inline(always)]
    fn since(&self, slot: &AtomicU64) -> Option<u64> {
        self.since_until(slot, self.clock.raw())
    }

    /// Nanoseconds from the mark in `slot` (cleared) to the reading `end`; `None` without a
    /// mark. A region's end reading is also the timestamp of what it records (the handles'
    /// `record_ended_at`/`record_at`): one clock read per region boundary.
    #[inline(always)]
    fn since_until(&self, slot: &AtomicU64, end: u64) -> Option<u64> {
        match slot.swap(0, Relaxed) {
            0 => None,
            start => Some(self.clock.delta_ns(start, end)),
        }
    }

    /// The scheduler's limits: `max_num_seqs`, `max_num_batched_tokens`, and the KV cache's
    /// blocks (negative: no KV cache reading per step).
    pub(crate) fn set_limits(&self, max_num_seqs: u32, max_tokens: u32, kv_total_blocks: i64) {
        self.max_num_seqs.store(max_num_seqs, Relaxed);
        self.max_tokens.store(max_tokens, Relaxed);
        self.kv_total_blocks.store(kv_total_blocks, Relaxed);
    }

    /// Opens engine step `step`: every row recorded until [`close_step`](Self::close_step)
    /// carries it. `false` for an id out of range (0, or above `profilemate::MAX_STEP`) while
    /// steps are recorded.
    #[inline]
    pub(crate) fn open_step(&self, step: u64) -> bool {
        self.steps.open(step) || !self.steps.is_enabled()
    }

    /// Closes the open step (nothing when none is open).
    #[inline]
    pub(crate) fn close_step(&self) {
        self.steps.close();
    }

    /// `Scheduler.schedule` begins: its scheduling time starts, and engine step `step` opens
    /// at the same clock reading (the result as for [`open_step`](Self::open_step)). An id out
    /// of range starts no scheduling time either, as for any other id the caller cannot give.
    #[inline]
    pub(crate) fn schedule_begin(&self, step: u64) -> bool {
        let t = self.mark();
        let opened = self.steps.open_at(step, t) || !self.steps.is_enabled();
        self.schedule_mark.store(if opened { t } else { 0 }, Relaxed);
        opened
    }

    /// `Scheduler.schedule` returned a step with tokens to run: its scheduling time (since
    /// [`schedule_begin`](Self::schedule_begin)), the batch against the limits, and a KV cache
    /// reading (blocks used: the limits' total less `kv_free_blocks`; none when either is
    /// negative). The phase, batch
    /// and tokens are kept for [`execute_begin`](Self::execute_begin). A phase code out of range
    /// (0 prefill, 1 decode, 2 mixed) records nothing.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn scheduled(
        &self,
        phase: usize,
        num_seqs: u32,
        num_tokens: u32,
        running_queue_len: u32,
        waiting_queue_len: u32,
        kv_free_blocks: i64,
        prefix_cache_queries: i64,
        prefix_cache_hits: i64,
    ) {
        let Some(&p) = PHASES.get(phase) else {
            self.schedule_mark.store(0, Relaxed);
            return;
        };
        let now = self.clock.raw();
        if let Some(ns) = self.since_until(&self.schedule_mark, now) {
            self.cpu.record_ended_at(CpuOp::SCHEDULING, Duration::from_nanos(ns), now, PHASE_CONTEXT[phase]);
        }
        let batch = BatchSample {
            num_seqs,
            max_num_seqs: self.max_num_seqs.load(Relaxed),
            num_tokens,
            max_tokens: self.max_tokens.load(Relaxed),
            phase: p,
            running_queue_len,
            waiting_queue_len,
        };
        self.batch.record_at(&batch, now);
        if let (Ok(free_blocks), Ok(total_blocks)) =
            (u32::try_from(kv_free_blocks), u32::try_from(self.kv_total_blocks.load(Relaxed)))
        {
            let kv = KvCacheSample {
                used_blocks: total_blocks.saturating_sub(free_blocks),
                total_blocks,
                prefix_cache_queries: u64::try_from(prefix_cache_queries).unwrap_or(0),
                prefix_cache_hits: u64::try_from(prefix_cache_hits).unwrap_or(0),
            };
            self.kv_cache.record_at(&kv, now);
        }
        self.scheduled_phase.store(phase, Relaxed);
        self.scheduled_seqs.store(num_seqs, Relaxed);
        self.scheduled_tokens.store(num_tokens, Relaxed);
        self.activity.fetch_add(1, Relaxed);
    }

    /// The model runner's step begins, with the phase, batch and tokens that the scheduler of
    /// this process recorded last ([`scheduled`](Self::scheduled)).
    #[inline]
    pub(crate) fn execute_begin(&self) {
        self.begin_step(
            self.scheduled_phase.load(Relaxed),
            self.scheduled_seqs.load(Relaxed),
            self.scheduled_tokens.load(Relaxed),
        );
    }

    /// The model runner's step begins, classified by the caller (a worker process).
    #[inline]
    pub(crate) fn execute_begin_with(&self, phase: usize, num_seqs: u32, num_tokens: u32) {
        self.begin_step(phase.min(2), num_seqs, num_tokens);
    }

    #[inline(always)]
    fn begin_step(&self, phase: usize, num_seqs: u32, num_tokens: u32) {
        self.phase.store(phase, Relaxed);
        self.num_seqs.store(num_seqs, Relaxed);
        self.num_tokens.store(num_tokens, Relaxed);
        self.forward_ns.store(0, Relaxed);
        self.forward_mark.store(0, Relaxed);
        self.op_marks[1].store(0, Relaxed);
        self.in_step.store(true, Relaxed);
        self.execute_mark.store(self.mark(), Relaxed);
    }

    /// The model runner's step ended: its `model_execution` time and, with `forward`, the
    /// forward pass and the language model's (decoder) time: the `_model_forward` calls' sum,
    /// or the whole step when none was timed. Without `forward` (CUDA events time the pass) only
    /// `model_execution`. Sampling, if it follows, is timed next ([`sample_begin`]).
    ///
    /// [`sample_begin`]: Self::sample_begin
    pub(crate) fn execute_end(&self, forward: bool) {
        if !self.in_step.swap(false, Relaxed) {
            return;
        }
        let now = self.clock.raw();
        let Some(ns) = self.since_until(&self.execute_mark, now) else { return };
        let phase = self.phase.load(Relaxed);
        self.cpu.record_ended_at(CpuOp::MODEL_EXECUTION, Duration::from_nanos(ns), now, PHASE_CONTEXT[phase]);
        if forward {
            let forward = match self.forward_ns.load(Relaxed) {
                0 => ns,
                f => f,
            };
            let forward = Duration::from_nanos(forward);
            let (seqs, tokens) = (self.num_seqs.load(Relaxed), self.num_tokens.load(Relaxed));
            self.forward.record_ended_at(PHASES[phase], seqs, tokens, forward, now);
            self.components.record_ended_at(Component::Decoder, "language_model", forward, now);
        }
        self.sample_pending.store(true, Relaxed);
        self.activity.fetch_add(1, Relaxed);
    }

    /// `_model_forward` begins (counted only inside a model runner's step).
    #[inline]
    pub(crate) fn forward_begin(&self) {
        if self.in_step.load(Relaxed) {
            self.forward_mark.store(self.mark(), Relaxed);
        }
    }

    /// `_model_forward` ended: its time adds to the step's forward time.
    #[inline]
    pub(crate) fn forward_end(&self) {
        if let Some(ns) = self.since(&self.forward_mark) {
            self.forward_ns.fetch_add(ns, Relaxed);
        }
    }

    /// CPU operation `op` (1 batch_preparation; any code of [`OPS`]) begins; timed only inside
    /// a model runner's step.
    #[inline]
    pub(crate) fn op_begin(&self, op: usize) {
        if let Some(slot) = self.op_marks.get(op) {
            if self.in_step.load(Relaxed) {
                slot.store(self.mark(), Relaxed);
            }
        }
    }

    /// CPU operation `op` ended: recorded with the step's phase as context.
    #[inline]
    pub(crate) fn op_end(&self, op: usize) {
        if let Some(slot) = self.op_marks.get(op) {
            let now = self.clock.raw();
            if let Some(ns) = self.since_until(slot, now) {
                let context = PHASE_CONTEXT[self.phase.load(Relaxed)];
                self.cpu.record_ended_at(OPS[op], Duration::from_nanos(ns), now, context);
            }
        }
    }

    /// `sample_tokens` begins: timed when it follows a step's `execute_model` (vLLM also calls
    /// it with nothing to sample). Returns whether it does.
    #[inline]
    pub(crate) fn sample_begin(&self) -> bool {
        if self.sample_pending.swap(false, Relaxed) {
            self.op_marks[3].store(self.mark(), Relaxed);
            true
        } else {
            false
        }
    }

    /// `sample_tokens` ended: its `sampling` time, if [`sample_begin`](Self::sample_begin)
    /// started one.
    #[inline]
    pub(crate) fn sample_end(&self) {
        self.op_end(3);
    }

    /// Whether a model runner's step is under way.
    pub(crate) fn in_step(&self) -> bool {
        self.in_step.load(Relaxed)
    }

    /// Steps recorded so far (scheduled and executed), for the idle flusher.
    pub(crate) fn activity(&self) -> u64 {
        self.activity.load(Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use profilemate::MemorySink;

    fn spin(d: Duration) {
        let t = std::time::Instant::now();
        while t.elapsed() < d {}
    }

    /// An in-process step: scheduled, executed with two forward calls and a batch preparation,
    /// sampled. Every row, its phase, batch and tokens, and the forward time as the sum of the
    /// `_model_forward` regions (not the whole execute region).
    #[test]
    fn one_step_records_every_region_with_the_scheduled_phase_and_batch() {
        let memory = MemorySink::new();
        let session = Session::builder().in_memory_only().sink(memory.clone()).build().unwrap();
        let p = StepPath::new(&session);
        p.set_limits(8, 512, 100);
        assert!(p.schedule_begin(3));
        spin(Duration::from_micros(50));
        p.scheduled(2, 5, 40, 5, 3, 70, 4, 1);
        p.execute_begin();
        p.op_begin(1);
        spin(Duration::from_micros(50));
        p.op_end(1);
        for _ in 0..2 {
            p.forward_begin();
            spin(Duration::from_micros(200));
            p.forward_end();
        }
        spin(Duration::from_micros(300));
        p.execute_end(true);
        assert!(!p.in_step());
        assert!(p.sample_begin());
        assert!(!p.sample_begin(), "sampling is timed once per step");
        spin(Duration::from_micros(20));
        p.sample_end();
        assert_eq!(p.activity(), 2);
        session.shutdown().unwrap();
        let rows = memory.rows();
        assert_eq!(rows.forward_pass.len(), 1);
        let f = &rows.forward_pass[0];
        assert_eq!((f.phase, f.batch_size, f.num_tokens), (Phase::Mixed, 5, 40));
        assert!(f.forward_time_ns >= 400_000, "the two forward regions: {}", f.forward_time_ns);
        let cpu: Vec<(&str, &str, u64)> =
            rows.cpu_operations.iter().map(|r| (&*r.operation, r.context.as_str(), r.duration_ns)).collect();
        let ops: Vec<(&str, &str)> = cpu.iter().map(|(o, c, _)| (*o, *c)).collect();
        assert_eq!(
            ops,
            [
                ("scheduling", "phase=mixed"),
                ("batch_preparation", "phase=mixed"),
                ("model_execution", "phase=mixed"),
                ("sampling", "phase=mixed")
            ]
        );
        let execution = cpu[2].2;
        assert!(execution >= f.forward_time_ns + 300_000, "execution {execution} vs forward {}", f.forward_time_ns);
        assert!(cpu[0].2 >= 50_000 && cpu[1].2 >= 50_000 && cpu[3].2 >= 20_000, "{cpu:?}");
        let b = &rows.batch_utilization[0];
        assert_eq!((b.num_seqs, b.max_num_seqs, b.num_tokens, b.max_tokens), (5, 8, 40, 512));
        assert_eq!((b.running_queue_len, b.waiting_queue_len), (5, 3));
        let kv = &rows.kv_cache[0];
        assert_eq!((kv.used_blocks, kv.total_blocks, kv.prefix_cache_queries, kv.prefix_cache_hits), (30, 100, 4, 1));
        assert_eq!(rows.encoder_decoder.len(), 1);
        assert_eq!(rows.encoder_decoder[0].duration_ns, f.forward_time_ns);
    }

    /// Regions outside a step, an end without its beginning, an unknown phase or operation, no
    /// KV cache total: nothing recorded, nothing panics. Without `_model_forward` calls the
    /// forward pass is the whole step; without `forward` only `model_execution`.
    #[test]
    fn regions_outside_a_step_or_without_a_beginning_record_nothing() {
        let memory = MemorySink::new();
        let session = Session::builder().in_memory_only().sink(memory.clone()).build().unwrap();
        let p = StepPath::new(&session);
        p.forward_begin();
        p.forward_end();
        p.op_begin(1);
        p.op_end(1);
        p.op_begin(9);
        p.op_end(9);
        p.sample_end();
        assert!(!p.sample_begin());
        p.execute_end(true);
        p.scheduled(3, 1, 1, 0, 0, 1, 0, 0); // unknown phase
        assert!(!p.schedule_begin(0), "step id 0 is refused, and starts no scheduling time");
        p.scheduled(1, 2, 2, 2, 0, 5, 0, 0); // no scheduling start, no KV total: batch row only
        assert_eq!(memory.rows().cpu_operations.len(), 0);
        p.execute_begin_with(7, 2, 2); // phase clamped to mixed
        p.execute_end(true);
        p.execute_begin_with(1, 3, 3);
        p.execute_end(false);
        session.shutdown().unwrap();
        let rows = memory.rows();
        assert_eq!(rows.batch_utilization.len(), 1);
        assert_eq!(rows.kv_cache.len(), 0);
        assert_eq!(rows.forward_pass.len(), 1, "the second step's pass is timed elsewhere");
        assert_eq!(rows.forward_pass[0].phase, Phase::Mixed);
        let executions: Vec<u64> = rows.cpu_operations.iter().map(|r| r.duration_ns).collect();
        assert_eq!(executions.len(), 2);
        assert_eq!(rows.forward_pass[0].forward_time_ns, executions[0], "no _model_forward: the whole step");
    }
}
