//! The collector thread: drains every thread's buffer, resolves times, feeds the profilers and
//! hands rows and summaries to the sinks.

use crate::backend::{Mark, Resolution};
use crate::config::Config;
use crate::event::Event;
use crate::handles::{BatchSample, KvCacheSample};
use crate::manifest::{OutputBudgetReport, RunManifest, FORMAT_VERSION, MANIFEST_FILE};
use crate::moe_counts::LayerSnapshot;
use crate::profilers::*;
use crate::record::*;
use crate::recorder::{warn_once, DropCounters, MoeSource, Shared, ThreadBuffer, Timing};
use crate::rows::{Rows, Table};
use crate::sink::{write_atomic, Sink};
use crate::step_timeline::StepTimeline;
use crate::summary::Summaries;
use crate::types::{Component, DropReason, GraphEvent, LifecycleEvent, Phase, ProfilerKind};
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Messages from the session to its collector.
pub(crate) enum Control {
    Flush(SyncSender<()>),
    Shutdown,
}

/// Static facts about the run, fixed when the session was built.
pub(crate) struct RunInfo {
    pub(crate) config: Config,
    pub(crate) manifest_dir: Option<PathBuf>,
    pub(crate) started_at: String,
    pub(crate) monotonic_start_ns: u64,
    pub(crate) host: String,
    pub(crate) timing_backend: String,
}

/// One event read from a buffer, with its own text.
#[derive(Default)]
struct Decoded {
    kind: u8,
    tag: u8,
    flags: u8,
    op: u16,
    /// The step the event belongs to; 0 outside any step.
    step: u64,
    /// Start (or, with `F_DURATION`, end) reading.
    t0: u64,
    /// End reading, or duration in ns.
    t1: u64,
    device: (u64, u64),
    a: (u32, u32),
    b: (u32, u32),
    c: (u32, u32),
    texts: [String; 3],
    /// MoE routing counts.
    counts: Vec<u32>,
}

impl Decoded {
    fn decode<'s>(head: &'s Slot, rest: &mut dyn Iterator<Item = &'s Slot>, scratch: &mut Vec<u8>) -> Decoded {
        let mut d = Decoded {
            kind: head.kind(),
            tag: head.tag(),
            flags: head.flags(),
            op: 0,
            step: head.step(),
            t0: head.word(1),
            t1: 0,
            device: (0, 0),
            a: (0, 0),
            b: (0, 0),
            c: (0, 0),
            texts: Default::default(),
            counts: Vec::new(),
        };
        let mut text = |inline_at: usize, lens: &[usize], rest: &mut dyn Iterator<Item = &'s Slot>| {
            scratch.clear();
            let total = lens.iter().sum();
            let mut it = &mut *rest;
            read_text(head, inline_at, total, &mut it, scratch);
            let mut texts: [String; 3] = Default::default();
            let mut at = 0;
            for (i, len) in lens.iter().enumerate() {
                let end = (at + len).min(scratch.len());
                texts[i] = String::from_utf8_lossy(&scratch[at..end]).into_owned();
                at = end;
            }
            texts
        };
        match d.kind {
            K_FORWARD => {
                d.t1 = head.word(2);
                d.device = (head.word(3), head.word(4));
                d.a = head.pair(5);
            }
            K_CPU => {
                d.t1 = head.word(2);
                let w = head.word(3);
                d.op = (w >> 32) as u16;
                d.texts = text(CPU_TEXT_AT, &[(w & 0xffff_ffff) as usize], rest);
            }
            K_COMPONENT => {
                d.t1 = head.word(2);
                d.device = (head.word(3), head.word(4));
                d.texts = text(COMPONENT_TEXT_AT, &[head.word(5) as usize], rest);
            }
            K_BATCH => {
                d.a = head.pair(2);
                d.b = head.pair(3);
                d.c = head.pair(4);
            }
            K_KV_CACHE => {
                d.a = head.pair(2);
                d.device = (head.word(3), head.word(4));
            }
            K_STEP => d.t1 = head.word(2),
            K_CUDA_GRAPH => {
                d.t1 = head.word(2);
                d.a = head.pair(3);
                d.b = head.pair(4);
            }
            K_MOE => {
                d.a = head.pair(2);
                scratch.clear();
                let mut it = &mut *rest;
                read_text(head, MOE_DATA_AT, d.a.1 as usize * 4, &mut it, scratch);
                d.counts = scratch.chunks_exact(4).map(|c| u32::from_ne_bytes([c[0], c[1], c[2], c[3]])).collect();
            }
            K_LIFECYCLE => {
                let w = head.word(2);
                let lens = [(w & 0xffff) as usize, ((w >> 16) & 0xffff) as usize, ((w >> 32) & 0xffff) as usize];
                d.texts = text(LIFECYCLE_TEXT_AT, &lens, rest);
            }
            _ => {}
        }
        d
    }

    fn profiler(&self) -> ProfilerKind {
        match self.kind {
            K_FORWARD => ProfilerKind::ForwardPass,
            K_CPU => ProfilerKind::CpuTiming,
            K_BATCH => ProfilerKind::BatchUtilization,
            K_LIFECYCLE => ProfilerKind::Preemption,
            K_KV_CACHE => ProfilerKind::KvCache,
            K_CUDA_GRAPH => ProfilerKind::CudaGraph,
            K_MOE => ProfilerKind::MoeExpert,
            _ => ProfilerKind::EncoderDecoder,
        }
    }

    fn needs_device(&self) -> bool {
        self.flags & F_DEVICE != 0
    }

    /// Start reading, for ordering events of one drain.
    fn start_raw(&self) -> u64 {
        self.t0
    }
}

/// Sorts `keys`, cheaply when they are nearly in order already.
///
/// A thread records an event when it ends, so its events arrive in order of their ends; ordered
/// by start, only an enclosing span (a forward pass around its decoder call) comes after what it
/// encloses, a step or two late. Insertion sort puts those back in a few moves per event; when
/// the moves exceed a small budget per key (several threads' batches one after another, a span
/// enclosing many events), the rest is left to `sort_unstable`.
fn sort_nearly_sorted(keys: &mut [(u64, u32)]) {
    const MOVES_PER_KEY: usize = 4;
    let mut budget = keys.len() * MOVES_PER_KEY;
    for i in 1..keys.len() {
        let key = keys[i];
        let mut j = i;
        while j > 0 && keys[j - 1] > key {
            if budget == 0 {
                keys[j] = key;
                keys.sort_unstable();
                return;
            }
            budget -= 1;
            keys[j] = keys[j - 1];
            j -= 1;
        }
        keys[j] = key;
    }
}

pub(crate) struct Collector {
    shared: Arc<Shared>,
    info: RunInfo,
    buffers: Vec<ThreadBuffer>,
    retired_drops: Vec<Arc<DropCounters>>,
    sinks: Vec<Box<dyn Sink>>,
    sink_errors: BTreeMap<String, u64>,
    sinks_warned: HashSet<usize>,
    forward: Option<ForwardPassProfiler>,
    cpu: Option<CpuTimingProfiler>,
    batch: Option<BatchUtilizationProfiler>,
    preemption: Option<PreemptionProfiler>,
    encoder_decoder: Option<EncoderDecoderProfiler>,
    kv_cache: Option<KvCacheProfiler>,
    cuda_graph: Option<CudaGraphProfiler>,
    moe: Option<MoeExpertProfiler>,
    timeline: StepTimeline,
    rows: Rows,
    rows_written: [u64; Table::ALL.len()],
    sink_drops: DropCounters,
    batch_events: Vec<Decoded>,
    /// (start reading, index) of `batch_events`, when they need ordering.
    order: Vec<(u64, u32)>,
    pending: VecDeque<Decoded>,
    scratch: Vec<u8>,
    /// Every thread's MoE routing totals (kept after the thread exits: they are its counts).
    moe_sources: Vec<MoeSource>,
    moe_snapshot: LayerSnapshot,
    moe_tokens: Vec<u64>,
    moe_detail: Vec<(u64, u32, u64, u64, Vec<u32>)>,
    last_summary_step: u64,
    /// Records drained (a replay reports them).
    drained_events: u64,
    summaries_dirty: bool,
    last_file_flush: Instant,
    last_summary_time: Instant,
}

/// Files are flushed after every collector pass: a killed process loses at most the rows of
/// about one collector period (100 ms by default), not a second's.
const FILE_FLUSH_EVERY: Duration = Duration::ZERO;
const SUMMARY_AT_LEAST_EVERY: Duration = Duration::from_secs(10);
const SHUTDOWN_DEVICE_WAIT: Duration = Duration::from_secs(10);

impl Collector {
    pub(crate) fn new(shared: Arc<Shared>, info: RunInfo, sinks: Vec<Box<dyn Sink>>) -> Collector {
        let on = |k: ProfilerKind| shared.is_enabled(k);
        let threshold = info.config.underutilization_threshold_pct;
        Collector {
            forward: on(ProfilerKind::ForwardPass).then(ForwardPassProfiler::new),
            cpu: on(ProfilerKind::CpuTiming).then(CpuTimingProfiler::new),
            batch: on(ProfilerKind::BatchUtilization).then(|| BatchUtilizationProfiler::new(threshold)),
            preemption: on(ProfilerKind::Preemption).then(PreemptionProfiler::new),
            encoder_decoder: on(ProfilerKind::EncoderDecoder).then(EncoderDecoderProfiler::new),
            kv_cache: on(ProfilerKind::KvCache).then(KvCacheProfiler::new),
            cuda_graph: on(ProfilerKind::CudaGraph).then(CudaGraphProfiler::new),
            moe: on(ProfilerKind::MoeExpert).then(MoeExpertProfiler::new),
            timeline: StepTimeline::new(on(ProfilerKind::Preemption)),
            shared,
            info,
            buffers: Vec::new(),
            retired_drops: Vec::new(),
            sinks,
            sink_errors: BTreeMap::new(),
            sinks_warned: HashSet::new(),
            rows: Rows::default(),
            rows_written: [0; Table::ALL.len()],
            sink_drops: DropCounters::default(),
            batch_events: Vec::new(),
            order: Vec::new(),
            pending: VecDeque::new(),
            scratch: Vec::new(),
            moe_sources: Vec::new(),
            moe_snapshot: LayerSnapshot::default(),
            moe_tokens: Vec::new(),
            moe_detail: Vec::new(),
            last_summary_step: 0,
            drained_events: 0,
            summaries_dirty: false,
            last_file_flush: Instant::now(),
            last_summary_time: Instant::now(),
        }
    }

    pub(crate) fn run(mut self, rx: Receiver<Control>) -> RunManifest {
        let period = Duration::from_millis(self.info.config.flush_interval_ms);
        loop {
            let msg = rx.recv_timeout(period);
            self.begin_pass();
            self.cycle();
            match msg {
                Ok(Control::Flush(ack)) => {
                    self.write_summaries();
                    self.flush_sinks();
                    // Flushed means committed too: a kill from here on replays none of it.
                    self.end_pass();
                    let _ = ack.send(());
                }
                Ok(Control::Shutdown) | Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {}
            }
            if self.last_file_flush.elapsed() >= FILE_FLUSH_EVERY {
                self.flush_sinks();
                self.end_pass();
            }
        }
        self.shutdown()
    }

    /// Feeds the lifecycle events already in the files to the preemption profiler, rows
    /// discarded (they are in the files): the requests they started are then known when the
    /// replayed records finish them.
    pub(crate) fn seed_lifecycle(&mut self, events: &[crate::rows::PreemptionEventRow]) {
        let Some(p) = &mut self.preemption else { return };
        let mut discard = Rows::default();
        for e in events {
            let ev = Event::Lifecycle {
                timestamp_ns: e.timestamp_ns,
                request_id: &e.request_id,
                event: e.event,
                reason: &e.reason,
                extra_info: &e.extra_info,
            };
            p.observe(&ev, &mut discard);
            discard.clear();
        }
    }

    /// Replays a dead session's buffers (see [`crate::replay`]): drains them once, writes the
    /// rows and flushes. Returns the records read, the rows written per file and the sinks'
    /// errors.
    pub(crate) fn replay(
        mut self,
        buffers: Vec<ThreadBuffer>,
        moe: Vec<MoeSource>,
    ) -> (u64, BTreeMap<String, u64>, BTreeMap<String, u64>) {
        self.buffers = buffers;
        self.moe_sources = moe;
        self.drain_buffers();
        self.collect_moe(false);
        self.resolve_pending(false);
        self.write_rows();
        self.flush_sinks();
        let rows = Table::ALL
            .iter()
            .enumerate()
            .filter(|(i, _)| self.rows_written[*i] > 0)
            .map(|(i, t)| (t.file_name().to_string(), self.rows_written[i]))
            .collect();
        (self.drained_events, rows, std::mem::take(&mut self.sink_errors))
    }

    /// The length of every enabled table's file, for the buffer file's journal.
    fn table_lengths(&self) -> Vec<Option<u64>> {
        let Some(dir) = &self.info.manifest_dir else { return Vec::new() };
        Table::ALL
            .iter()
            .map(|t| {
                self.shared
                    .is_enabled(t.profiler())
                    .then(|| std::fs::metadata(dir.join(t.file_name())).ok().map(|m| m.len()))
                    .flatten()
            })
            .collect()
    }

    /// Journal step 1 (see [`crate::ring`]): the files are flushed; note their lengths and
    /// where each ring's replay would start.
    fn begin_pass(&mut self) {
        let Some(file) = &self.shared.buffer_file else { return };
        let now = self.shared.now();
        let anchor = (now, self.shared.session_ns(now));
        file.begin_pass(&self.table_lengths(), anchor);
    }

    /// Journal step 3: the rows of everything drained are in the files; hand the slots back.
    fn end_pass(&mut self) {
        let Some(file) = &self.shared.buffer_file else { return };
        for b in &self.buffers {
            b.consumer.commit();
        }
        for c in self.moe_sources.iter().filter_map(|m| m.detail.as_ref()) {
            c.commit();
        }
        file.end_pass(self.pending.len() as u64);
    }

    /// One pass: drain, resolve, observe, write rows, and summaries when due.
    fn cycle(&mut self) {
        self.drain_buffers();
        self.collect_moe(false);
        self.resolve_pending(false);
        // A step waits for its device-timed events: nothing from the oldest pending one's on.
        let waiting_for = self.pending.iter().map(|d| d.step).filter(|&s| s != 0).min();
        // The timeline is the forward pass profiler's table: off with it.
        if self.forward.is_some() {
            self.timeline.emit(&mut self.rows, false, waiting_for);
        }
        self.write_rows();
        let steps = self.steps();
        let interval = self.info.config.log_interval;
        let due_by_steps = steps / interval > self.last_summary_step / interval;
        let due_by_time = self.summaries_dirty && self.last_summary_time.elapsed() >= SUMMARY_AT_LEAST_EVERY;
        if due_by_steps || due_by_time {
            self.write_summaries();
        }
    }

    fn steps(&self) -> u64 {
        self.forward.as_ref().map_or(0, |f| f.steps())
    }

    fn drain_buffers(&mut self) {
        {
            let mut incoming = self.shared.incoming.lock().unwrap_or_else(|p| p.into_inner());
            self.buffers.append(&mut incoming);
        }
        let mut events = std::mem::take(&mut self.batch_events);
        let scratch = &mut self.scratch;
        for buf in &mut self.buffers {
            drain(&mut buf.consumer, |head, rest| events.push(Decoded::decode(head, rest, scratch)));
        }
        // Buffers of threads that exited are empty now: retire them, keeping their drop counts.
        let retired = &mut self.retired_drops;
        self.buffers.retain(|b| {
            let gone = b.consumer.is_abandoned() && b.consumer.is_empty() && b.consumer.is_committed();
            if gone {
                retired.push(b.drops.clone());
            }
            !gone
        });
        self.drained_events += events.len() as u64;
        // Threads are drained one after another: take this batch in time order. Each thread's
        // events already are, so with one recording thread there is nothing to sort; otherwise
        // sort small keys, not the events themselves.
        let mut order = std::mem::take(&mut self.order);
        order.clear();
        if !events.is_sorted_by_key(Decoded::start_raw) {
            order.extend(events.iter().enumerate().map(|(i, d)| (d.start_raw(), i as u32)));
            sort_nearly_sorted(&mut order);
        }
        let mut next = 0;
        while next < events.len() {
            let i = order.get(next).map_or(next, |o| o.1 as usize);
            next += 1;
            let d = &events[i];
            if d.needs_device() || (!self.pending.is_empty() && matches!(d.kind, K_FORWARD | K_COMPONENT)) {
                self.pending.push_back(std::mem::take(&mut events[i]));
            } else {
                self.dispatch(d, None);
            }
        }
        events.clear();
        self.batch_events = events;
        self.order = order;
    }

    /// Reads every thread's MoE routing totals into the tracker (and the per-step detail
    /// buffers, when on). `close` ends every open window (shutdown).
    fn collect_moe(&mut self, close: bool) {
        {
            let mut incoming = self.shared.incoming_moe.lock().unwrap_or_else(|p| p.into_inner());
            self.moe_sources.append(&mut incoming);
        }
        let Some(p) = &mut self.moe else { return };
        let mut rows = std::mem::take(&mut self.rows);
        let shared = &self.shared;
        // Per-step detail first, so a step's rows come before a window that holds it.
        let detail = &mut self.moe_detail;
        for src in &mut self.moe_sources {
            let Some(consumer) = &mut src.detail else { continue };
            let scratch = &mut self.scratch;
            drain(consumer, |head, rest| {
                let (layer, experts) = head.pair(2);
                scratch.clear();
                let mut it = &mut *rest;
                read_text(head, MOE_DATA_AT, experts as usize * 4, &mut it, scratch);
                let counts = scratch.chunks_exact(4).map(|c| u32::from_ne_bytes([c[0], c[1], c[2], c[3]])).collect();
                detail.push((head.word(1), layer, head.word(3), head.step(), counts));
            });
        }
        // The step timeline's MoE imbalance comes from these per-step rows only: windowed rows
        // span steps, so without per-step detail the timeline leaves it empty.
        let mut timeline = self.forward.is_some().then_some(&mut self.timeline);
        self.drained_events += detail.len() as u64;
        for (raw, layer, call, step, counts) in detail.drain(..) {
            let ts = shared.session_ns(raw);
            p.detail(ts, layer, call, (step != 0).then_some(step), &counts, &mut rows);
            if let (Some(tl), true) = (timeline.as_deref_mut(), step != 0) {
                tl.moe(step, ts, &counts);
            }
        }
        let window = (self.info.config.moe_window_steps > 0).then_some(self.info.config.moe_window_steps);
        let end = self.moe_sources.iter().map(|s| s.counts.layer_end()).max().unwrap_or(0);
        let snap = &mut self.moe_snapshot;
        'layers: for layer in 0..end {
            let (mut calls, mut last_raw, mut seen) = (0u64, 0u64, false);
            self.moe_tokens.clear();
            for src in &self.moe_sources {
                match src.counts.snapshot(layer, snap) {
                    Ok(false) => continue,
                    Ok(true) => {}
                    // A writer mid-update through every retry: the whole layer waits a pass.
                    Err(()) => continue 'layers,
                }
                seen = true;
                calls += snap.calls;
                last_raw = last_raw.max(snap.last_raw);
                if self.moe_tokens.len() < snap.tokens.len() {
                    self.moe_tokens.resize(snap.tokens.len(), 0);
                }
                for (total, n) in self.moe_tokens.iter_mut().zip(&snap.tokens) {
                    *total += n;
                }
            }
            if seen {
                let ts = shared.session_ns(last_raw);
                p.observe_totals(layer, calls, ts, &self.moe_tokens, window, close, &mut rows);
            }
        }
        self.rows = rows;
    }

    /// Resolves device-timed events in order, in batches of `cuda_event_batch` queries, batch
    /// after batch until the oldest pending event is not done yet (so the engine's step rate,
    /// not the batch size, sets the pace). With `wait`, keeps polling (shutdown) until all are
    /// done or the wait runs out.
    fn resolve_pending(&mut self, wait: bool) {
        let Timing::Device(backend) = &self.shared.timing else {
            // Host timing never leaves events pending.
            while let Some(d) = self.pending.pop_front() {
                self.dispatch(&d, None);
            }
            return;
        };
        let backend = backend.clone();
        let batch = backend.batch_size().unwrap_or(self.info.config.cuda_event_batch).max(1);
        let deadline = Instant::now() + SHUTDOWN_DEVICE_WAIT;
        loop {
            let mut polled = 0;
            let mut blocked = false;
            while polled < batch {
                let Some(front) = self.pending.front() else { break };
                if !front.needs_device() {
                    let d = self.pending.pop_front().expect("front exists");
                    self.dispatch(&d, None);
                    continue;
                }
                let (start, end) = (Mark(front.device.0), Mark(front.device.1));
                polled += 1;
                match backend.poll(start, end) {
                    Resolution::Pending => {
                        blocked = true;
                        break;
                    }
                    Resolution::Ready(d) => {
                        backend.release(start, end);
                        let ev = self.pending.pop_front().expect("front exists");
                        self.dispatch(&ev, Some(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)));
                    }
                    Resolution::Failed(why) => {
                        backend.release(start, end);
                        let ev = self.pending.pop_front().expect("front exists");
                        self.sink_drops.add(ev.profiler(), DropReason::Timing, 1);
                        warn_once(&format!("timing backend `{}` could not time an event: {why}", backend.name()));
                    }
                }
            }
            if self.pending.is_empty() {
                return;
            }
            if !blocked {
                // A whole batch resolved: the next may be done too.
                continue;
            }
            if !wait {
                return;
            }
            if Instant::now() >= deadline {
                for ev in self.pending.drain(..) {
                    if ev.needs_device() {
                        backend.release(Mark(ev.device.0), Mark(ev.device.1));
                    }
                    self.sink_drops.add(ev.profiler(), DropReason::Timing, 1);
                }
                warn_once("device events still unfinished at shutdown were dropped (counted in the manifest)");
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn ts(&self, raw: u64) -> u64 {
        self.shared.session_ns(raw)
    }

    /// (timestamp, duration) of a timed record; `device_ns` overrides the host duration.
    fn span(&self, d: &Decoded, device_ns: Option<u64>) -> (u64, u64) {
        if d.flags & F_DURATION != 0 {
            let end = self.ts(d.t0);
            (end.saturating_sub(d.t1), d.t1)
        } else {
            let host = self.shared.clock.delta_ns(d.t0, d.t1);
            (self.ts(d.t0), device_ns.unwrap_or(host))
        }
    }

    fn dispatch(&mut self, d: &Decoded, device_ns: Option<u64>) {
        let mut rows = std::mem::take(&mut self.rows);
        let before: [usize; Table::ALL.len()] = std::array::from_fn(|i| rows.len(Table::ALL[i]));
        self.dispatch_to_profilers(d, device_ns, &mut rows);
        if d.step != 0 {
            self.join_step(d, &mut rows, &before);
        }
        self.rows = rows;
    }

    /// Gives the rows `d` produced its step id and feeds them to the step timeline.
    fn join_step(&mut self, d: &Decoded, rows: &mut Rows, before: &[usize; Table::ALL.len()]) {
        let step = Some(d.step);
        let at = |t: Table| before[Table::ALL.iter().position(|x| *x == t).expect("listed")];
        let tl = &mut self.timeline;
        for r in &mut rows.forward_pass[at(Table::ForwardPass)..] {
            r.step = step;
            tl.forward(d.step, r.timestamp_ns, r.forward_time_ns, r.phase, r.batch_size, r.num_tokens);
        }
        for r in &mut rows.cpu_operations[at(Table::CpuOperations)..] {
            r.step = step;
            tl.cpu(d.step, r.timestamp_ns, r.duration_ns, &r.operation);
        }
        for r in &mut rows.batch_utilization[at(Table::BatchUtilization)..] {
            r.step = step;
            tl.batch(d.step, r.timestamp_ns, r);
        }
        for r in &mut rows.preemption_events[at(Table::PreemptionEvents)..] {
            r.step = step;
            tl.lifecycle(d.step, r.timestamp_ns, r.event);
        }
        for r in &mut rows.encoder_decoder[at(Table::EncoderDecoder)..] {
            r.step = step;
            tl.component(d.step, r.timestamp_ns, r.duration_ns, r.component);
        }
        for r in &mut rows.kv_cache[at(Table::KvCacheUsage)..] {
            r.step = step;
            tl.kv(d.step, r.timestamp_ns, r.usage_pct());
        }
        for r in &mut rows.cuda_graph[at(Table::CudaGraphEvents)..] {
            r.step = step;
            tl.graph(d.step, r.timestamp_ns, r.event, r.batch_size, r.padded_batch_size);
        }
        let moe_at = at(Table::MoeExpertRouting);
        for r in &mut rows.moe_routing[moe_at..] {
            r.step = step;
        }
        if d.kind == K_MOE && self.moe.is_some() {
            let at = self.ts(d.t0);
            self.timeline.moe(d.step, at, &d.counts);
        }
        if d.kind == K_STEP {
            let (start, end) = (self.ts(d.t0), self.ts(d.t1));
            self.timeline.step_closed(d.step, start, end);
        }
    }

    fn dispatch_to_profilers(&mut self, d: &Decoded, device_ns: Option<u64>, rows: &mut Rows) {
        match d.kind {
            K_FORWARD => {
                let (timestamp_ns, duration_ns) = self.span(d, device_ns);
                if let Some(p) = &mut self.forward {
                    let ev = Event::ForwardPass {
                        timestamp_ns,
                        phase: Phase::from_index(d.tag),
                        batch_size: d.a.0,
                        num_tokens: d.a.1,
                        duration_ns,
                    };
                    p.observe(&ev, rows);
                }
            }
            K_CPU => {
                let (timestamp_ns, duration_ns) = self.span(d, None);
                let name = {
                    let ops = self.shared.operations.read().unwrap_or_else(|p| p.into_inner());
                    ops.get(usize::from(d.op)).cloned()
                };
                match (&mut self.cpu, name) {
                    (Some(p), Some(name)) => {
                        let ev = Event::CpuOperation {
                            timestamp_ns,
                            operation: d.op,
                            name: &name,
                            duration_ns,
                            context: &d.texts[0],
                        };
                        p.observe(&ev, rows);
                    }
                    // An id this session never registered (another session's, or a disabled
                    // session's): dropped, and counted rather than lost silently.
                    (Some(_), None) => self.sink_drops.add(ProfilerKind::CpuTiming, DropReason::InvalidValue, 1),
                    (None, _) => {}
                }
            }
            K_BATCH => {
                let timestamp_ns = self.ts(d.t0);
                if let Some(p) = &mut self.batch {
                    let sample = BatchSample {
                        num_seqs: d.a.0,
                        max_num_seqs: d.a.1,
                        num_tokens: d.b.0,
                        max_tokens: d.b.1,
                        phase: Phase::from_index(d.tag),
                        running_queue_len: d.c.0,
                        waiting_queue_len: d.c.1,
                    };
                    p.observe(&Event::Batch { timestamp_ns, sample }, rows);
                }
            }
            K_LIFECYCLE => {
                let timestamp_ns = self.ts(d.t0);
                if let Some(p) = &mut self.preemption {
                    let ev = Event::Lifecycle {
                        timestamp_ns,
                        request_id: &d.texts[0],
                        event: LifecycleEvent::from_index(d.tag),
                        reason: &d.texts[1],
                        extra_info: &d.texts[2],
                    };
                    p.observe(&ev, rows);
                }
            }
            K_COMPONENT => {
                let (timestamp_ns, duration_ns) = self.span(d, device_ns);
                if let Some(p) = &mut self.encoder_decoder {
                    let ev = Event::Component {
                        timestamp_ns,
                        component: Component::from_index(d.tag),
                        duration_ns,
                        context: &d.texts[0],
                    };
                    p.observe(&ev, rows);
                }
            }
            K_KV_CACHE => {
                let timestamp_ns = self.ts(d.t0);
                if let Some(p) = &mut self.kv_cache {
                    let sample = KvCacheSample {
                        used_blocks: d.a.0,
                        total_blocks: d.a.1,
                        prefix_cache_queries: d.device.0,
                        prefix_cache_hits: d.device.1,
                    };
                    p.observe(&Event::KvCache { timestamp_ns, sample }, rows);
                }
            }
            K_CUDA_GRAPH => {
                let (timestamp_ns, duration_ns) = if d.flags & F_DURATION != 0 {
                    let (t, ns) = self.span(d, None);
                    (t, Some(ns))
                } else {
                    (self.ts(d.t0), None)
                };
                if let Some(p) = &mut self.cuda_graph {
                    let ev = Event::CudaGraph {
                        timestamp_ns,
                        event: GraphEvent::from_index(d.tag),
                        batch_size: d.a.0,
                        padded_batch_size: (d.flags & F_PADDED != 0).then_some(d.b.0),
                        duration_ns,
                    };
                    p.observe(&ev, rows);
                }
            }
            K_MOE => {
                let timestamp_ns = self.ts(d.t0);
                if let Some(p) = &mut self.moe {
                    p.observe(&Event::MoeRouting { timestamp_ns, layer: d.a.0, tokens_per_expert: &d.counts }, rows);
                }
            }
            _ => {}
        }
    }

    fn write_rows(&mut self) {
        if self.rows.is_empty() {
            return;
        }
        self.summaries_dirty = true;
        for (i, t) in Table::ALL.iter().enumerate() {
            self.rows_written[i] += self.rows.len(*t) as u64;
        }
        for i in 0..self.sinks.len() {
            if let Err(e) = self.sinks[i].write_rows(&self.rows) {
                self.sink_failed(i, "write rows", &*e);
                // Step timeline rows are derived from events already counted in their own tables.
                for t in Table::ALL.into_iter().filter(|t| *t != Table::StepTimeline) {
                    self.sink_drops.add(t.profiler(), DropReason::SinkError, self.rows.len(t) as u64);
                }
            }
        }
        self.rows.clear();
    }

    fn summaries(&mut self) -> Summaries {
        let mut s = Summaries::default();
        if let Some(p) = &self.forward {
            p.summarize(&mut s);
        }
        if let Some(p) = &self.cpu {
            p.summarize(&mut s);
        }
        if let Some(p) = &self.batch {
            p.summarize(&mut s);
        }
        if let Some(p) = &self.preemption {
            p.summarize(&mut s);
        }
        if let Some(p) = &mut self.encoder_decoder {
            p.set_declared_model_type(self.shared.declared_model_type());
            p.summarize(&mut s);
        }
        if let Some(p) = &self.kv_cache {
            p.summarize(&mut s);
        }
        if let Some(p) = &self.cuda_graph {
            p.summarize(&mut s);
        }
        if let Some(p) = &self.moe {
            p.summarize(&mut s);
        }
        if self.forward.is_some() {
            s.step_timeline = Some(self.timeline.summary());
        }
        s
    }

    fn write_summaries(&mut self) {
        self.last_summary_step = self.steps();
        self.last_summary_time = Instant::now();
        self.summaries_dirty = false;
        let summaries = self.summaries();
        for i in 0..self.sinks.len() {
            if let Err(e) = self.sinks[i].write_summaries(&summaries) {
                self.sink_failed(i, "write summaries", &*e);
            }
        }
        if self.info.config.verbose {
            log_summaries(&summaries, self.steps());
        }
        let manifest = self.manifest(false);
        for i in 0..self.sinks.len() {
            if let Err(e) = self.sinks[i].write_manifest(&manifest) {
                self.sink_failed(i, "write the manifest", &*e);
            }
        }
        self.write_manifest(&manifest);
    }

    fn flush_sinks(&mut self) {
        self.last_file_flush = Instant::now();
        for i in 0..self.sinks.len() {
            if let Err(e) = self.sinks[i].flush() {
                self.sink_failed(i, "flush", &*e);
            }
        }
    }

    fn sink_failed(&mut self, i: usize, what: &str, e: &(dyn std::error::Error + 'static)) {
        let name = self.sinks[i].name().to_string();
        *self.sink_errors.entry(name.clone()).or_insert(0) += 1;
        if self.sinks_warned.insert(i) {
            eprintln!(
                "profilemate: sink `{name}` failed to {what}: {e} (the session goes on; further errors of this \
                 sink are counted in {MANIFEST_FILE})"
            );
        }
    }

    fn write_manifest(&mut self, manifest: &RunManifest) {
        let Some(dir) = &self.info.manifest_dir else { return };
        let result = serde_json::to_vec_pretty(manifest)
            .map_err(std::io::Error::other)
            .and_then(|bytes| write_atomic(&dir.join(MANIFEST_FILE), &bytes));
        if let Err(e) = result {
            let first = !self.sink_errors.contains_key("manifest");
            *self.sink_errors.entry("manifest".to_string()).or_insert(0) += 1;
            if first {
                eprintln!("profilemate: cannot write {}: {e} (the session goes on)", dir.join(MANIFEST_FILE).display());
            }
        }
    }

    pub(crate) fn manifest(&self, finished: bool) -> RunManifest {
        let mut dropped = BTreeMap::new();
        for kind in ProfilerKind::ALL.into_iter().filter(|k| self.shared.is_enabled(*k)) {
            let mut reasons = BTreeMap::new();
            for reason in DropReason::ALL {
                let mut n = self.shared.orphan_drops.get(kind, reason) + self.sink_drops.get(kind, reason);
                n += self.buffers.iter().map(|b| b.drops.get(kind, reason)).sum::<u64>();
                n += self.retired_drops.iter().map(|d| d.get(kind, reason)).sum::<u64>();
                reasons.insert(reason.as_str().to_string(), n);
            }
            dropped.insert(kind.as_str().to_string(), reasons);
        }
        let config = &self.info.config;
        let mut manifest = RunManifest {
            format_version: FORMAT_VERSION,
            profilemate_version: env!("CARGO_PKG_VERSION").to_string(),
            started_at: self.info.started_at.clone(),
            monotonic_start_ns: self.info.monotonic_start_ns,
            pid: std::process::id(),
            host: self.info.host.clone(),
            config: config.clone(),
            timing_backend: self.info.timing_backend.clone(),
            profilers: ProfilerKind::ALL
                .iter()
                .filter(|k| self.shared.is_enabled(**k))
                .map(|k| k.as_str().to_string())
                .collect(),
            sinks: self.sinks.iter().map(|s| s.name().to_string()).collect(),
            rows: Table::ALL
                .iter()
                .enumerate()
                .filter(|(_, t)| self.shared.is_enabled(t.profiler()))
                .map(|(i, t)| (t.file_name().to_string(), self.rows_written[i]))
                .collect(),
            dropped,
            sink_errors: self.sink_errors.clone(),
            steps: self.steps(),
            elapsed_sec: self.ts(self.shared.now()) as f64 / 1e9,
            finished,
            bytes_per_step: BTreeMap::new(),
            bytes_written: BTreeMap::new(),
            output_budget: config
                .max_output_bytes
                .map(|max_bytes| OutputBudgetReport { max_bytes, ..Default::default() }),
        };
        for files in self.sinks.iter().filter_map(|s| s.output_files()) {
            manifest.bytes_written.extend(files.bytes_written);
            if let Some(budget) = &mut manifest.output_budget {
                budget.rolled_files.extend(files.rolled);
                budget.removed_files.extend(files.removed);
            }
        }
        let steps = manifest.steps;
        manifest.bytes_per_step = manifest
            .bytes_written
            .iter()
            .map(|(file, bytes)| (file.clone(), if steps > 0 { *bytes as f64 / steps as f64 } else { 0.0 }))
            .collect();
        manifest
    }

    fn shutdown(mut self) -> RunManifest {
        self.drain_buffers();
        self.collect_moe(true);
        self.resolve_pending(true);
        let now = self.ts(self.shared.now());
        let mut rows = std::mem::take(&mut self.rows);
        if let Some(p) = &mut self.preemption {
            p.finish(now, &mut rows);
        }
        if self.forward.is_some() {
            self.timeline.emit(&mut rows, true, None);
        }
        self.rows = rows;
        self.write_rows();
        self.write_summaries();
        let manifest = self.manifest(true);
        for i in 0..self.sinks.len() {
            if let Err(e) = self.sinks[i].finish(&manifest) {
                self.sink_failed(i, "finish", &*e);
            }
        }
        // Every record is in the files: the buffers go, before the manifest says `finished`.
        self.end_pass();
        if let Some(file) = &self.shared.buffer_file {
            file.remove();
        }
        // Sink errors at finish belong in the manifest too.
        let manifest = self.manifest(true);
        self.write_manifest(&manifest);
        manifest
    }
}

fn log_summaries(s: &Summaries, steps: u64) {
    let mut line = format!("profilemate: {steps} steps");
    if let Some(f) = &s.forward_pass {
        line += &format!(
            "; forward prefill/decode/mixed {}/{}/{} (decode mean {:.3} ms)",
            f.prefill.count, f.decode.count, f.mixed.count, f.decode.mean_ms
        );
    }
    if let Some(c) = &s.cpu_timing {
        let n: u64 = c.values().map(|o| o.count).sum();
        line += &format!("; cpu ops {n}");
    }
    if let Some(b) = &s.batch_utilization {
        line += &format!("; batches {} (token util {:.1}%)", b.total_samples, b.mean_token_utilization_pct);
    }
    if let Some(p) = &s.preemption {
        line += &format!("; requests {} preemptions {}", p.total_requests, p.total_preemptions);
    }
    if let Some(e) = &s.encoder_decoder {
        line += &format!("; encoder {:.1}%", e.encoder_pct);
    }
    eprintln!("{line}");
}

#[cfg(test)]
mod tests {
    use super::sort_nearly_sorted;
    use proptest::prelude::*;

    fn check(mut keys: Vec<(u64, u32)>) {
        let mut expected = keys.clone();
        expected.sort_unstable();
        sort_nearly_sorted(&mut keys);
        assert_eq!(keys, expected);
    }

    #[test]
    fn enclosing_spans_and_fallback() {
        // A step: decoder (start 3) recorded before the forward pass around it (start 2).
        check(vec![(1, 0), (3, 1), (2, 2), (5, 3), (4, 4)]);
        // One span enclosing many events: over the move budget, sorted by the fallback.
        check((1..100u64).map(|t| (t, t as u32)).chain([(0, 100)]).collect());
        // Two threads' batches one after the other.
        check((0..50u64).map(|t| (2 * t, 0)).chain((0..50u64).map(|t| (2 * t + 1, 1))).collect());
        check(vec![]);
        check(vec![(7, 0)]);
    }

    proptest! {
        #[test]
        fn sorts_like_sort_unstable(keys in proptest::collection::vec((0u64..64, 0u32..8), 0..300)) {
            check(keys);
        }

        #[test]
        fn sorts_nearly_sorted_input(
            swaps in proptest::collection::vec(0usize..500, 0..40),
        ) {
            let mut keys: Vec<(u64, u32)> = (0..500u64).map(|t| (t * 10, t as u32)).collect();
            for s in swaps {
                keys.swap(s, (s + 1).min(499));
            }
            check(keys);
        }
    }
}
