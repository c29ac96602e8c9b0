//! `step_timeline.csv`: one row per engine step, joining what every profiler saw in it by the
//! rows' `step` column, and `step_timeline_summary.json`.
//!
//! The collector feeds every row it writes into [`StepTimeline`], so a step's figures are exactly
//! the sums, counts and last values of the rows that carry its id (the test command recomputes
//! them from the CSV files and compares). A step is written once two later steps have begun (so
//! rows another thread records a little late still join it), and every step still open is
//! written at shutdown. A row that arrives after its step was written keeps its `step` in its
//! own table and is counted in the summary's `late_rows`.

use crate::rows::{Rows, StepTimelineRow};
use crate::stats::DurationStats;
use crate::types::{Component, GraphEvent, LifecycleEvent, Phase};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// CPU operations that enclose the forward pass (an engine's `model_execution` span): their time
/// is the forward pass's, so it is not added to the step's CPU time.
pub const ENCLOSING_OPERATIONS: &[&str] = &["model_execution"];

#[derive(Debug, Default)]
struct StepAcc {
    start: Option<u64>,
    end: u64,
    guard: Option<(u64, u64)>,
    forward_phase: Option<Phase>,
    batch_phase: Option<Phase>,
    batch_size: Option<u32>,
    num_tokens: Option<u32>,
    forward_passes: u32,
    forward_ns: Option<u64>,
    scheduling: Option<u64>,
    preparation: Option<u64>,
    sampling: Option<u64>,
    other_cpu: Option<u64>,
    batch: Option<(Option<f64>, Option<f64>, u32, u32)>,
    kv: Option<Option<f64>>,
    graph: Option<(GraphEvent, u32, Option<u32>)>,
    preemptions: u32,
    resumes: u32,
    components: bool,
    encoder: u64,
    decoder: u64,
    moe: Option<f64>,
}

impl StepAcc {
    fn span(&mut self, start: u64, end: u64) {
        self.start = Some(self.start.map_or(start, |s| s.min(start)));
        self.end = self.end.max(end);
    }
}

fn add(slot: &mut Option<u64>, ns: u64) {
    *slot = Some(slot.unwrap_or(0).saturating_add(ns));
}

/// Statistics of one phase's steps in `step_timeline_summary.json`. Totals are milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct StepPhaseStats {
    pub count: u64,
    pub mean_wall_ms: f64,
    pub p50_wall_ms: f64,
    pub p95_wall_ms: f64,
    pub p99_wall_ms: f64,
    pub max_wall_ms: f64,
    pub total_wall_ms: f64,
    pub total_forward_ms: f64,
    pub total_scheduling_ms: f64,
    pub total_batch_preparation_ms: f64,
    pub total_sampling_ms: f64,
    pub total_other_cpu_ms: f64,
    pub total_unclaimed_ms: f64,
    pub total_host_gap_ms: f64,
    pub total_encoder_ms: f64,
    pub preemptions: u64,
}

/// `step_timeline_summary.json`: steps per phase (`prefill`, `decode`, `mixed`, always present;
/// steps with neither a forward pass nor a batch row count in `steps` only), and the rows that
/// arrived after their step was written.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct StepTimelineSummary {
    pub steps: u64,
    pub late_rows: u64,
    pub prefill: StepPhaseStats,
    pub decode: StepPhaseStats,
    pub mixed: StepPhaseStats,
}

impl StepTimelineSummary {
    /// The summary of the timeline rows `rows`, with the figures the collector computes as it
    /// writes them, and `late_rows` as given (rows alone cannot tell which arrived late). Used to
    /// rebuild `step_timeline_summary.json` from `step_timeline.csv` (`profilemate recover`).
    ///
    /// ```
    /// use profilemate_core::{Phase, StepTimelineRow, StepTimelineSummary};
    /// let row = |step, wall_ns| StepTimelineRow { step, phase: Some(Phase::Decode), wall_ns, ..Default::default() };
    /// let s = StepTimelineSummary::from_rows(&[row(1, 2_000_000), row(2, 4_000_000)], 0);
    /// assert_eq!((s.steps, s.decode.count, s.decode.total_wall_ms), (2, 2, 6.0));
    /// ```
    pub fn from_rows<'a>(rows: impl IntoIterator<Item = &'a StepTimelineRow>, late_rows: u64) -> Self {
        let mut timeline = StepTimeline::new(true);
        for row in rows {
            timeline.aggregate(row);
        }
        timeline.late_rows = late_rows;
        timeline.summary()
    }
}

#[derive(Debug, Default, Clone)]
struct PhaseAgg {
    wall: DurationStats,
    totals: [u64; 8],
    preemptions: u64,
}

/// Joins rows into steps on the collector thread.
#[derive(Debug)]
pub(crate) struct StepTimeline {
    open: BTreeMap<u64, StepAcc>,
    max_seen: u64,
    /// Every step up to this id is written.
    written_up_to: u64,
    last_end: Option<u64>,
    late_rows: u64,
    steps: u64,
    preemption_on: bool,
    phases: [PhaseAgg; 3],
}

impl StepTimeline {
    pub(crate) fn new(preemption_on: bool) -> Self {
        StepTimeline {
            open: BTreeMap::new(),
            max_seen: 0,
            written_up_to: 0,
            last_end: None,
            late_rows: 0,
            steps: 0,
            preemption_on,
            phases: Default::default(),
        }
    }

    fn acc(&mut self, step: u64) -> Option<&mut StepAcc> {
        if step == 0 {
            return None;
        }
        if step <= self.written_up_to && !self.open.contains_key(&step) {
            self.late_rows += 1;
            return None;
        }
        self.max_seen = self.max_seen.max(step);
        Some(self.open.entry(step).or_default())
    }

    pub(crate) fn step_closed(&mut self, step: u64, start: u64, end: u64) {
        if let Some(a) = self.acc(step) {
            a.guard = Some((start, end));
            a.span(start, end);
        }
    }

    pub(crate) fn forward(&mut self, step: u64, start: u64, ns: u64, phase: Phase, batch: u32, tokens: u32) {
        if let Some(a) = self.acc(step) {
            a.span(start, start + ns);
            a.forward_phase = Some(phase);
            a.batch_size = Some(a.batch_size.map_or(batch, |b| b.max(batch)));
            a.num_tokens = Some(a.num_tokens.unwrap_or(0).saturating_add(tokens));
            a.forward_passes += 1;
            add(&mut a.forward_ns, ns);
        }
    }

    pub(crate) fn cpu(&mut self, step: u64, start: u64, ns: u64, name: &str) {
        if let Some(a) = self.acc(step) {
            a.span(start, start + ns);
            match name {
                "scheduling" => add(&mut a.scheduling, ns),
                "batch_preparation" => add(&mut a.preparation, ns),
                "sampling" => add(&mut a.sampling, ns),
                n if ENCLOSING_OPERATIONS.contains(&n) => {}
                _ => add(&mut a.other_cpu, ns),
            }
        }
    }

    pub(crate) fn batch(&mut self, step: u64, at: u64, row: &crate::rows::BatchUtilizationRow) {
        if let Some(a) = self.acc(step) {
            a.span(at, at);
            a.batch_phase = Some(row.phase);
            a.batch = Some((
                row.seq_utilization_pct,
                row.token_utilization_pct,
                row.running_queue_len,
                row.waiting_queue_len,
            ));
        }
    }

    pub(crate) fn lifecycle(&mut self, step: u64, at: u64, event: LifecycleEvent) {
        if let Some(a) = self.acc(step) {
            a.span(at, at);
            match event {
                LifecycleEvent::Preempted => a.preemptions += 1,
                LifecycleEvent::Resumed => a.resumes += 1,
                _ => {}
            }
        }
    }

    pub(crate) fn component(&mut self, step: u64, start: u64, ns: u64, component: Component) {
        if let Some(a) = self.acc(step) {
            a.span(start, start + ns);
            a.components = true;
            match component {
                Component::Encoder => a.encoder = a.encoder.saturating_add(ns),
                Component::Decoder => a.decoder = a.decoder.saturating_add(ns),
                Component::CrossAttention => {}
            }
        }
    }

    pub(crate) fn kv(&mut self, step: u64, at: u64, usage_pct: Option<f64>) {
        if let Some(a) = self.acc(step) {
            a.span(at, at);
            a.kv = Some(usage_pct);
        }
    }

    pub(crate) fn graph(&mut self, step: u64, at: u64, event: GraphEvent, batch: u32, padded: Option<u32>) {
        if event == GraphEvent::Capture {
            return;
        }
        if let Some(a) = self.acc(step) {
            a.span(at, at);
            a.graph = Some((event, batch, padded));
        }
    }

    pub(crate) fn moe(&mut self, step: u64, at: u64, counts: &[u32]) {
        let total: u64 = counts.iter().map(|&c| u64::from(c)).sum();
        let max = counts.iter().copied().max().unwrap_or(0);
        if total == 0 {
            return;
        }
        let ratio = f64::from(max) / (total as f64 / counts.len() as f64);
        if let Some(a) = self.acc(step) {
            a.span(at, at);
            a.moe = Some(a.moe.map_or(ratio, |r: f64| r.max(ratio)));
        }
    }

    /// Writes the steps that two later steps have followed (`all`: every open step) into `rows`,
    /// none from `waiting_for` on (a step with device-timed events still unresolved).
    pub(crate) fn emit(&mut self, rows: &mut Rows, all: bool, waiting_for: Option<u64>) {
        while let Some((&step, _)) = self.open.first_key_value() {
            if !all && (step + 2 > self.max_seen || waiting_for.is_some_and(|w| step >= w)) {
                break;
            }
            let acc = self.open.remove(&step).expect("first key exists");
            self.written_up_to = self.written_up_to.max(step);
            let row = self.row(step, acc);
            rows.step_timeline.push(row);
        }
    }

    fn row(&mut self, step: u64, a: StepAcc) -> StepTimelineRow {
        let start = a.guard.map_or(a.start.unwrap_or(0), |g| g.0);
        let end = a.end;
        let wall = end.saturating_sub(start);
        let gap = self.last_end.map(|e| start.saturating_sub(e));
        self.last_end = Some(end);
        let claimed = [a.forward_ns, a.scheduling, a.preparation, a.sampling, a.other_cpu]
            .iter()
            .fold(0u64, |sum, v| sum.saturating_add(v.unwrap_or(0)));
        let unclaimed = wall.saturating_sub(claimed);
        let phase = a.forward_phase.or(a.batch_phase);
        let (cuda_graph, padded, padding) = match a.graph {
            Some((e, batch, padded)) => {
                let pct = padded.filter(|&p| p > 0).map(|p| f64::from(p.saturating_sub(batch)) / f64::from(p) * 100.0);
                (Some(e), padded, pct)
            }
            None => (None, None, None),
        };
        let row = StepTimelineRow {
            step,
            start_ns: start,
            phase,
            batch_size: a.batch_size,
            num_tokens: a.num_tokens,
            forward_passes: a.forward_passes,
            forward_time_ns: a.forward_ns,
            scheduling_ns: a.scheduling,
            batch_preparation_ns: a.preparation,
            sampling_ns: a.sampling,
            other_cpu_ns: a.other_cpu,
            wall_ns: wall,
            host_gap_before_ns: gap,
            unclaimed_ns: unclaimed,
            seq_utilization_pct: a.batch.and_then(|b| b.0),
            token_utilization_pct: a.batch.and_then(|b| b.1),
            running_queue_len: a.batch.map(|b| b.2),
            waiting_queue_len: a.batch.map(|b| b.3),
            kv_cache_usage_pct: a.kv.flatten(),
            cuda_graph,
            padded_batch_size: padded,
            padding_pct: padding,
            preemptions: self.preemption_on.then_some(a.preemptions),
            resumes: self.preemption_on.then_some(a.resumes),
            encoder_time_ns: a.components.then_some(a.encoder),
            decoder_time_ns: a.components.then_some(a.decoder),
            moe_max_over_mean: a.moe,
        };
        self.aggregate(&row);
        row
    }

    /// Adds a written row to the summary's figures.
    fn aggregate(&mut self, row: &StepTimelineRow) {
        self.steps += 1;
        if let Some(p) = row.phase {
            let agg = &mut self.phases[p.index()];
            agg.wall.record(row.wall_ns);
            let parts = [
                row.forward_time_ns.unwrap_or(0),
                row.scheduling_ns.unwrap_or(0),
                row.batch_preparation_ns.unwrap_or(0),
                row.sampling_ns.unwrap_or(0),
                row.other_cpu_ns.unwrap_or(0),
                row.unclaimed_ns,
                row.host_gap_before_ns.unwrap_or(0),
                row.encoder_time_ns.unwrap_or(0),
            ];
            // Saturating: a duration given by the engine may be anything up to `u64::MAX`.
            for (t, ns) in agg.totals.iter_mut().zip(parts) {
                *t = t.saturating_add(ns);
            }
            agg.preemptions += u64::from(row.preemptions.unwrap_or(0));
        }
    }

    pub(crate) fn summary(&self) -> StepTimelineSummary {
        let stats = |p: Phase| {
            let agg = &self.phases[p.index()];
            let ms = |ns: u64| ns as f64 / 1e6;
            StepPhaseStats {
                count: agg.wall.count(),
                mean_wall_ms: agg.wall.mean_ms(),
                p50_wall_ms: agg.wall.percentile_ms(50.0),
                p95_wall_ms: agg.wall.percentile_ms(95.0),
                p99_wall_ms: agg.wall.percentile_ms(99.0),
                max_wall_ms: agg.wall.max_ms(),
                total_wall_ms: agg.wall.total_ms(),
                total_forward_ms: ms(agg.totals[0]),
                total_scheduling_ms: ms(agg.totals[1]),
                total_batch_preparation_ms: ms(agg.totals[2]),
                total_sampling_ms: ms(agg.totals[3]),
                total_other_cpu_ms: ms(agg.totals[4]),
                total_unclaimed_ms: ms(agg.totals[5]),
                total_host_gap_ms: ms(agg.totals[6]),
                total_encoder_ms: ms(agg.totals[7]),
                preemptions: agg.preemptions,
            }
        };
        StepTimelineSummary {
            steps: self.steps,
            late_rows: self.late_rows,
            prefill: stats(Phase::Prefill),
            decode: stats(Phase::Decode),
            mixed: stats(Phase::Mixed),
        }
    }
}

/// Builds `step_timeline.csv`'s rows and `step_timeline_summary.json` from rows that already
/// carry their `step`, with the same joins as a session's collector: for outputs assembled after
/// the fact from several recordings of one run (the vLLM binding's merge of the engine-core and
/// worker processes' parts, whose rows of one step share its id).
///
/// Rows without a step are left out, as a session leaves them out. A step's beginning and end
/// are its bounds ([`add_bounds`](Self::add_bounds): a guard's, or each recording's own
/// timeline row), joined with the span of its rows. Times are nanoseconds on one time base.
///
/// ```
/// use profilemate_core::{ForwardPassRow, Phase, Rows, StepTimelineBuilder};
/// let mut rows = Rows::default();
/// let pass = |t, step| ForwardPassRow {
///     timestamp_ns: t, phase: Phase::Decode, batch_size: 4, num_tokens: 4, forward_time_ns: 1_000_000, step,
/// };
/// rows.forward_pass = vec![pass(10_000_000, Some(1)), pass(20_000_000, Some(2)), pass(30_000_000, None)];
/// let mut timeline = StepTimelineBuilder::new(true);
/// timeline.add_rows(&rows);
/// // Step 1 as the scheduler's process saw it: from 9 ms to 12 ms.
/// timeline.add_bounds(1, 9_000_000, 12_000_000);
/// let (steps, summary) = timeline.finish();
/// assert_eq!(steps.len(), 2);
/// assert_eq!((steps[0].start_ns, steps[0].wall_ns, steps[0].forward_time_ns), (9_000_000, 3_000_000, Some(1_000_000)));
/// assert_eq!(steps[1].host_gap_before_ns, Some(8_000_000));
/// assert_eq!(summary.decode.count, 2);
/// ```
#[derive(Debug)]
pub struct StepTimelineBuilder {
    timeline: StepTimeline,
}

impl StepTimelineBuilder {
    /// An empty timeline; `preemption_on`: whether the preemption profiler recorded (otherwise
    /// the `preemptions` and `resumes` fields stay empty, as a session leaves them).
    pub fn new(preemption_on: bool) -> Self {
        StepTimelineBuilder { timeline: StepTimeline::new(preemption_on) }
    }

    /// Joins every row of `rows` that carries a step (forward passes, CPU operations, batch
    /// utilization, lifecycle events, components, KV-cache readings, CUDA graph replays and eager
    /// steps). MoE routing rows are not read here: one routing record spans several rows (one
    /// per expert); add them with [`add_moe`](Self::add_moe).
    pub fn add_rows(&mut self, rows: &Rows) {
        let tl = &mut self.timeline;
        for r in &rows.forward_pass {
            if let Some(step) = r.step {
                tl.forward(step, r.timestamp_ns, r.forward_time_ns, r.phase, r.batch_size, r.num_tokens);
            }
        }
        for r in &rows.cpu_operations {
            if let Some(step) = r.step {
                tl.cpu(step, r.timestamp_ns, r.duration_ns, &r.operation);
            }
        }
        for r in &rows.batch_utilization {
            if let Some(step) = r.step {
                tl.batch(step, r.timestamp_ns, r);
            }
        }
        for r in &rows.preemption_events {
            if let Some(step) = r.step {
                tl.lifecycle(step, r.timestamp_ns, r.event);
            }
        }
        for r in &rows.encoder_decoder {
            if let Some(step) = r.step {
                tl.component(step, r.timestamp_ns, r.duration_ns, r.component);
            }
        }
        for r in &rows.kv_cache {
            if let Some(step) = r.step {
                tl.kv(step, r.timestamp_ns, r.usage_pct());
            }
        }
        for r in &rows.cuda_graph {
            if let Some(step) = r.step {
                tl.graph(step, r.timestamp_ns, r.event, r.batch_size, r.padded_batch_size);
            }
        }
    }

    /// One MoE layer's tokens per expert (indexed by expert id, every expert of the layer) in
    /// step `step`, at `at_ns`.
    pub fn add_moe(&mut self, step: u64, at_ns: u64, tokens_per_expert: &[u32]) {
        self.timeline.moe(step, at_ns, tokens_per_expert);
    }

    /// Bounds of step `step` seen by one recording (a step guard's, or a recording's own
    /// timeline row: its start and start plus wall time). Several bounds of one step are joined:
    /// the earliest start and the latest end.
    pub fn add_bounds(&mut self, step: u64, start_ns: u64, end_ns: u64) {
        if let Some(a) = self.timeline.acc(step) {
            let (s, e) = a.guard.map_or((start_ns, end_ns), |(s, e)| (s.min(start_ns), e.max(end_ns)));
            a.guard = Some((s, e));
            a.span(start_ns, end_ns);
        }
    }

    /// The timeline rows, by step, and their summary.
    pub fn finish(mut self) -> (Vec<StepTimelineRow>, StepTimelineSummary) {
        let mut rows = Rows::default();
        self.timeline.emit(&mut rows, true, None);
        (rows.step_timeline, self.timeline.summary())
    }
}
