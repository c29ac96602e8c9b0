//! Live series through the `metrics` facade: Prometheus (with `metrics-exporter-prometheus`),
//! StatsD, OpenTelemetry or whatever recorder the application installed.

use metrics::{Counter, Gauge, Histogram, Unit};
use profilemate_core::{CpuOp, GraphEvent, LifecycleEvent, Phase, Rows, RunManifest, Sink, SinkError, Summaries};
use std::collections::HashMap;

/// Every series [`MetricsSink`] records: name, kind, unit, labels and help text, in the order of
/// the README's table. The names follow Prometheus' conventions: a `profilemate_` prefix, base
/// units (`_seconds`), `_total` on counters, `_ratio` (0 to 1) on shares.
///
/// ```
/// let names: Vec<&str> = profilemate_sinks::METRICS_SERIES.iter().map(|s| s.name).collect();
/// assert!(names.contains(&"profilemate_forward_pass_duration_seconds"));
/// assert!(profilemate_sinks::METRICS_SERIES.iter().all(|s| s.name.starts_with("profilemate_")));
/// ```
pub const METRICS_SERIES: &[SeriesInfo] = &[
    SeriesInfo {
        name: FORWARD_SECONDS,
        kind: SeriesKind::Histogram,
        unit: Some(Unit::Seconds),
        labels: &["phase"],
        help: "Forward pass execution time as the timing backend measured it (device time with CUDA events), \
               one observation per row of forward_pass_timing.csv.",
    },
    SeriesInfo {
        name: CPU_SECONDS,
        kind: SeriesKind::Histogram,
        unit: Some(Unit::Seconds),
        labels: &["operation"],
        help: "Duration of a timed CPU operation of the engine (scheduling, batch_preparation, model_execution, \
               sampling, or a name the engine registered), one observation per row of cpu_operations_timing.csv.",
    },
    SeriesInfo {
        name: STEP_SECONDS,
        kind: SeriesKind::Histogram,
        unit: Some(Unit::Seconds),
        labels: &[],
        help: "Wall time of an engine step: from the start of its `scheduling` operation to the end of the last \
               CPU operation that starts before the next `scheduling` operation (idle time between steps is not \
               counted). Engines that time no `scheduling` operation have no observation.",
    },
    SeriesInfo {
        name: COMPONENT_SECONDS,
        kind: SeriesKind::Histogram,
        unit: Some(Unit::Seconds),
        labels: &["component"],
        help: "Encoder, decoder and cross-attention time, one observation per row of encoder_decoder_timing.csv.",
    },
    SeriesInfo {
        name: STEPS,
        kind: SeriesKind::Counter,
        unit: Some(Unit::Count),
        labels: &["phase"],
        help: "Engine steps that ran a forward pass (rows of forward_pass_timing.csv).",
    },
    SeriesInfo {
        name: TOKENS,
        kind: SeriesKind::Counter,
        unit: Some(Unit::Count),
        labels: &["phase"],
        help: "Tokens processed by forward passes (sum of num_tokens of forward_pass_timing.csv).",
    },
    SeriesInfo {
        name: PREEMPTIONS,
        kind: SeriesKind::Counter,
        unit: Some(Unit::Count),
        labels: &["reason"],
        help: "Requests preempted (`preempted` rows of preemption_events.csv), by reason (`unspecified` when the \
               engine gave none).",
    },
    SeriesInfo {
        name: REQUEST_EVENTS,
        kind: SeriesKind::Counter,
        unit: Some(Unit::Count),
        labels: &["event"],
        help: "Request lifecycle events (rows of preemption_events.csv): started, preempted, resumed, finished, \
               evicted.",
    },
    SeriesInfo {
        name: GRAPH_CAPTURES,
        kind: SeriesKind::Counter,
        unit: Some(Unit::Count),
        labels: &[],
        help: "CUDA graphs captured (`capture` rows of cuda_graph_events.csv).",
    },
    SeriesInfo {
        name: GRAPH_REPLAYS,
        kind: SeriesKind::Counter,
        unit: Some(Unit::Count),
        labels: &[],
        help: "Steps that replayed a captured CUDA graph (`replay` rows of cuda_graph_events.csv).",
    },
    SeriesInfo {
        name: EAGER_STEPS,
        kind: SeriesKind::Counter,
        unit: Some(Unit::Count),
        labels: &[],
        help: "Steps that ran eagerly, without a CUDA graph (`eager` rows of cuda_graph_events.csv).",
    },
    SeriesInfo {
        name: PREFIX_QUERIES,
        kind: SeriesKind::Counter,
        unit: Some(Unit::Count),
        labels: &[],
        help: "Prefix-cache lookups (sum of prefix_cache_queries of kv_cache_usage.csv, in the engine's unit).",
    },
    SeriesInfo {
        name: PREFIX_HITS,
        kind: SeriesKind::Counter,
        unit: Some(Unit::Count),
        labels: &[],
        help: "Prefix-cache hits (sum of prefix_cache_hits of kv_cache_usage.csv).",
    },
    SeriesInfo {
        name: DROPPED,
        kind: SeriesKind::Counter,
        unit: Some(Unit::Count),
        labels: &["profiler", "reason"],
        help: "Events profilemate dropped, per profiler and reason, as profilemate_run.json counts them (updated \
               with every summary and at shutdown).",
    },
    SeriesInfo {
        name: SEQ_UTILIZATION,
        kind: SeriesKind::Gauge,
        unit: None,
        labels: &[],
        help: "Sequences in the latest scheduled batch over the scheduler's limit (max_num_seqs), 0 to 1.",
    },
    SeriesInfo {
        name: TOKEN_UTILIZATION,
        kind: SeriesKind::Gauge,
        unit: None,
        labels: &[],
        help: "Tokens in the latest scheduled batch over the scheduler's token budget (max_num_batched_tokens), \
               0 to 1.",
    },
    SeriesInfo {
        name: RUNNING,
        kind: SeriesKind::Gauge,
        unit: Some(Unit::Count),
        labels: &[],
        help: "Requests in the running queue at the latest scheduled batch.",
    },
    SeriesInfo {
        name: WAITING,
        kind: SeriesKind::Gauge,
        unit: Some(Unit::Count),
        labels: &[],
        help: "Requests in the waiting queue at the latest scheduled batch.",
    },
    SeriesInfo {
        name: KV_USAGE,
        kind: SeriesKind::Gauge,
        unit: None,
        labels: &[],
        help: "KV-cache blocks in use over the blocks in the cache at the latest sample, 0 to 1.",
    },
    SeriesInfo {
        name: KV_USED_BLOCKS,
        kind: SeriesKind::Gauge,
        unit: Some(Unit::Count),
        labels: &[],
        help: "KV-cache blocks in use at the latest sample.",
    },
    SeriesInfo {
        name: MOE_IMBALANCE,
        kind: SeriesKind::Gauge,
        unit: None,
        labels: &[],
        help: "MoE load imbalance over the run so far: the busiest expert's tokens over the mean per expert, in the \
               most imbalanced layer (1 is even; moe_expert_summary.json's max_over_mean).",
    },
];

const FORWARD_SECONDS: &str = "profilemate_forward_pass_duration_seconds";
const CPU_SECONDS: &str = "profilemate_cpu_operation_duration_seconds";
const STEP_SECONDS: &str = "profilemate_step_duration_seconds";
const COMPONENT_SECONDS: &str = "profilemate_component_duration_seconds";
const STEPS: &str = "profilemate_steps_total";
const TOKENS: &str = "profilemate_tokens_total";
const PREEMPTIONS: &str = "profilemate_preemptions_total";
const REQUEST_EVENTS: &str = "profilemate_request_events_total";
const GRAPH_CAPTURES: &str = "profilemate_cuda_graph_captures_total";
const GRAPH_REPLAYS: &str = "profilemate_cuda_graph_replays_total";
const EAGER_STEPS: &str = "profilemate_eager_steps_total";
const PREFIX_QUERIES: &str = "profilemate_prefix_cache_queries_total";
const PREFIX_HITS: &str = "profilemate_prefix_cache_hits_total";
const DROPPED: &str = "profilemate_events_dropped_total";
const SEQ_UTILIZATION: &str = "profilemate_batch_sequence_utilization_ratio";
const TOKEN_UTILIZATION: &str = "profilemate_batch_token_utilization_ratio";
const RUNNING: &str = "profilemate_running_requests";
const WAITING: &str = "profilemate_waiting_requests";
const KV_USAGE: &str = "profilemate_kv_cache_usage_ratio";
const KV_USED_BLOCKS: &str = "profilemate_kv_cache_used_blocks";
const MOE_IMBALANCE: &str = "profilemate_moe_load_imbalance_ratio";

/// Histogram bucket bounds, in seconds, suited to the durations profilemate records (50 us to 10
/// s, about three per decade): give them to the exporter for every `_seconds` series, for
/// example `PrometheusBuilder::set_buckets_for_metric(Matcher::Suffix("_seconds".into()),
/// DURATION_BUCKETS_SECONDS)`, so that Prometheus gets true histograms it can aggregate.
///
/// ```
/// let b = profilemate_sinks::DURATION_BUCKETS_SECONDS;
/// assert!(b.windows(2).all(|w| w[0] < w[1]));
/// ```
pub const DURATION_BUCKETS_SECONDS: &[f64] =
    &[0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Distinct values a free-text label (`operation`, preemption `reason`) may take; further values
/// are recorded under [`OTHER_LABEL`], so that a misbehaving engine cannot flood the time-series
/// database with series.
pub const MAX_LABEL_VALUES: usize = 64;

/// The label value that stands for every value past [`MAX_LABEL_VALUES`].
pub const OTHER_LABEL: &str = "other";

/// What kind of series a [`SeriesInfo`] describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeriesKind {
    /// Only goes up (a Prometheus counter, named `..._total`).
    Counter,
    /// The latest value.
    Gauge,
    /// A distribution (a Prometheus histogram or summary, as the exporter is set up).
    Histogram,
}

/// One series of [`METRICS_SERIES`].
#[derive(Debug, Clone, Copy)]
pub struct SeriesInfo {
    /// The metric name.
    pub name: &'static str,
    /// Counter, gauge or histogram.
    pub kind: SeriesKind,
    /// The unit given to `describe_*` (`None` for ratios from 0 to 1, which have no unit).
    pub unit: Option<Unit>,
    /// The label names (never a request id).
    pub labels: &'static [&'static str],
    /// The help text given to `describe_*`.
    pub help: &'static str,
}

/// Records profilemate's figures as live series through the [`metrics`] facade, into whatever
/// recorder the application installed (with `metrics-exporter-prometheus`, they appear on its
/// `/metrics` endpoint). [`METRICS_SERIES`] lists every series; the README has the table.
///
/// It runs on the collector thread, like every sink: the engine's recording calls are unchanged
/// and never touch the recorder. Handles are registered once, when the sink is built, so **install
/// the recorder before building the session**; a sink built with no recorder installed records
/// into the facade's no-op recorder. Series with a free-text label (`operation`, `reason`) keep
/// at most [`MAX_LABEL_VALUES`] values each (then [`OTHER_LABEL`]).
///
/// Histograms are recorded in seconds; `metrics-exporter-prometheus` renders them as summaries
/// unless buckets are set (`PrometheusBuilder::set_buckets_for_metric`), and buckets are what
/// lets Prometheus aggregate across machines.
///
/// ```
/// use metrics_util::debugging::{DebugValue, DebuggingRecorder};
/// use profilemate_core::{ForwardPassRow, Phase, Rows, Sink};
///
/// let recorder = DebuggingRecorder::new();
/// let snapshotter = recorder.snapshotter();
/// metrics::with_local_recorder(&recorder, || {
///     let mut sink = profilemate_sinks::MetricsSink::new();
///     let mut rows = Rows::default();
///     rows.forward_pass.push(ForwardPassRow {
///         timestamp_ns: 0, phase: Phase::Decode, batch_size: 8, num_tokens: 8, forward_time_ns: 2_500_000, step: Some(1),
///     });
///     sink.write_rows(&rows).unwrap();
/// });
/// let found = snapshotter.snapshot().into_vec().into_iter().any(|(key, _, _, value)| {
///     key.key().name() == "profilemate_forward_pass_duration_seconds"
///         && value == DebugValue::Histogram(vec![0.0025.into()])
/// });
/// assert!(found);
/// ```
pub struct MetricsSink {
    forward_seconds: [Histogram; 3],
    steps: [Counter; 3],
    tokens: [Counter; 3],
    step_seconds: Histogram,
    component_seconds: [Histogram; 3],
    cpu_seconds: LabelledHandles<Histogram>,
    preemptions: LabelledHandles<Counter>,
    request_events: [Counter; 5],
    graph_captures: Counter,
    graph_replays: Counter,
    eager_steps: Counter,
    prefix_queries: Counter,
    prefix_hits: Counter,
    seq_utilization: Gauge,
    token_utilization: Gauge,
    running: Gauge,
    waiting: Gauge,
    kv_usage: Gauge,
    kv_used_blocks: Gauge,
    moe_imbalance: Gauge,
    dropped: HashMap<(String, String), Counter>,
    step_clock: StepClock,
}

impl std::fmt::Debug for MetricsSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsSink").field("step_clock", &self.step_clock).finish_non_exhaustive()
    }
}

impl Default for MetricsSink {
    fn default() -> Self {
        Self::new()
    }
}

/// Handles of one series with one free-text label, at most [`MAX_LABEL_VALUES`] of them.
struct LabelledHandles<H> {
    name: &'static str,
    label: &'static str,
    handles: HashMap<String, H>,
    other: Option<H>,
    register: fn(&'static str, &'static str, String) -> H,
}

impl<H> LabelledHandles<H> {
    fn new(name: &'static str, label: &'static str, register: fn(&'static str, &'static str, String) -> H) -> Self {
        LabelledHandles { name, label, handles: HashMap::new(), other: None, register }
    }

    fn get(&mut self, value: &str) -> &H {
        if self.handles.contains_key(value) {
            return &self.handles[value];
        }
        if self.handles.len() < MAX_LABEL_VALUES {
            let handle = (self.register)(self.name, self.label, value.to_string());
            return self.handles.entry(value.to_string()).or_insert(handle);
        }
        let (name, label, register) = (self.name, self.label, self.register);
        self.other.get_or_insert_with(|| register(name, label, OTHER_LABEL.to_string()))
    }
}

fn phase_index(phase: Phase) -> usize {
    match phase {
        Phase::Prefill => 0,
        Phase::Decode => 1,
        Phase::Mixed => 2,
    }
}

fn per_phase<H>(f: impl Fn(&'static str) -> H) -> [H; 3] {
    [Phase::Prefill, Phase::Decode, Phase::Mixed].map(|p| f(p.as_str()))
}

fn describe_all() {
    for s in METRICS_SERIES {
        match (s.kind, s.unit) {
            (SeriesKind::Counter, Some(u)) => metrics::describe_counter!(s.name, u, s.help),
            (SeriesKind::Counter, None) => metrics::describe_counter!(s.name, s.help),
            (SeriesKind::Gauge, Some(u)) => metrics::describe_gauge!(s.name, u, s.help),
            (SeriesKind::Gauge, None) => metrics::describe_gauge!(s.name, s.help),
            (SeriesKind::Histogram, Some(u)) => metrics::describe_histogram!(s.name, u, s.help),
            (SeriesKind::Histogram, None) => metrics::describe_histogram!(s.name, s.help),
        }
    }
}

impl MetricsSink {
    /// Describes every series (unit and help text) to the recorder in force and registers the
    /// handles of the fixed label sets; the `operation`, `reason` and dropped-event series are
    /// registered when their first value arrives.
    pub fn new() -> MetricsSink {
        describe_all();
        let component =
            |c: profilemate_core::Component| metrics::histogram!(COMPONENT_SECONDS, "component" => c.as_str());
        MetricsSink {
            forward_seconds: per_phase(|p| metrics::histogram!(FORWARD_SECONDS, "phase" => p)),
            steps: per_phase(|p| metrics::counter!(STEPS, "phase" => p)),
            tokens: per_phase(|p| metrics::counter!(TOKENS, "phase" => p)),
            step_seconds: metrics::histogram!(STEP_SECONDS),
            component_seconds: profilemate_core::Component::ALL.map(component),
            cpu_seconds: LabelledHandles::new(CPU_SECONDS, "operation", |n, l, v| metrics::histogram!(n, l => v)),
            preemptions: LabelledHandles::new(PREEMPTIONS, "reason", |n, l, v| metrics::counter!(n, l => v)),
            request_events: LifecycleEvent::ALL.map(|e| metrics::counter!(REQUEST_EVENTS, "event" => e.as_str())),
            graph_captures: metrics::counter!(GRAPH_CAPTURES),
            graph_replays: metrics::counter!(GRAPH_REPLAYS),
            eager_steps: metrics::counter!(EAGER_STEPS),
            prefix_queries: metrics::counter!(PREFIX_QUERIES),
            prefix_hits: metrics::counter!(PREFIX_HITS),
            seq_utilization: metrics::gauge!(SEQ_UTILIZATION),
            token_utilization: metrics::gauge!(TOKEN_UTILIZATION),
            running: metrics::gauge!(RUNNING),
            waiting: metrics::gauge!(WAITING),
            kv_usage: metrics::gauge!(KV_USAGE),
            kv_used_blocks: metrics::gauge!(KV_USED_BLOCKS),
            moe_imbalance: metrics::gauge!(MOE_IMBALANCE),
            dropped: HashMap::new(),
            step_clock: StepClock::default(),
        }
    }

    fn record_drops(&mut self, manifest: &RunManifest) {
        for (profiler, reasons) in &manifest.dropped {
            for (reason, n) in reasons {
                let counter = self.dropped.entry((profiler.clone(), reason.clone())).or_insert_with(
                    || metrics::counter!(DROPPED, "profiler" => profiler.clone(), "reason" => reason.clone()),
                );
                counter.absolute(*n);
            }
        }
    }
}

impl Sink for MetricsSink {
    fn name(&self) -> &str {
        "metrics"
    }

    fn write_rows(&mut self, rows: &Rows) -> Result<(), SinkError> {
        for r in &rows.forward_pass {
            let i = phase_index(r.phase);
            self.forward_seconds[i].record(r.forward_time_ns as f64 / 1e9);
            self.steps[i].increment(1);
            self.tokens[i].increment(u64::from(r.num_tokens));
        }
        for r in &rows.cpu_operations {
            self.cpu_seconds.get(&r.operation).record(r.duration_ns as f64 / 1e9);
            if let Some(step_ns) = self.step_clock.observe(&r.operation, r.timestamp_ns, r.duration_ns) {
                self.step_seconds.record(step_ns as f64 / 1e9);
            }
        }
        for r in &rows.encoder_decoder {
            let i = profilemate_core::Component::ALL.iter().position(|c| *c == r.component).unwrap_or(0);
            self.component_seconds[i].record(r.duration_ns as f64 / 1e9);
        }
        for r in &rows.preemption_events {
            let i = LifecycleEvent::ALL.iter().position(|e| *e == r.event).unwrap_or(0);
            self.request_events[i].increment(1);
            if r.event == LifecycleEvent::Preempted {
                let reason = if r.reason.is_empty() { "unspecified" } else { &r.reason };
                self.preemptions.get(reason).increment(1);
            }
        }
        if let Some(r) = rows.batch_utilization.last() {
            if let Some(pct) = r.seq_utilization_pct {
                self.seq_utilization.set(pct / 100.0);
            }
            if let Some(pct) = r.token_utilization_pct {
                self.token_utilization.set(pct / 100.0);
            }
            self.running.set(f64::from(r.running_queue_len));
            self.waiting.set(f64::from(r.waiting_queue_len));
        }
        for r in &rows.kv_cache {
            self.prefix_queries.increment(r.prefix_cache_queries);
            self.prefix_hits.increment(r.prefix_cache_hits);
        }
        if let Some(r) = rows.kv_cache.last() {
            if let Some(pct) = r.usage_pct() {
                self.kv_usage.set(pct / 100.0);
            }
            self.kv_used_blocks.set(f64::from(r.used_blocks));
        }
        for r in &rows.cuda_graph {
            match r.event {
                GraphEvent::Capture => self.graph_captures.increment(1),
                GraphEvent::Replay => self.graph_replays.increment(1),
                GraphEvent::Eager => self.eager_steps.increment(1),
            }
        }
        Ok(())
    }

    fn write_summaries(&mut self, summaries: &Summaries) -> Result<(), SinkError> {
        if let Some(moe) = &summaries.moe_expert {
            if moe.records > 0 {
                self.moe_imbalance.set(moe.max_over_mean);
            }
        }
        Ok(())
    }

    fn write_manifest(&mut self, manifest: &RunManifest) -> Result<(), SinkError> {
        self.record_drops(manifest);
        Ok(())
    }

    fn finish(&mut self, manifest: &RunManifest) -> Result<(), SinkError> {
        if let Some(step_ns) = self.step_clock.close() {
            self.step_seconds.record(step_ns as f64 / 1e9);
        }
        self.record_drops(manifest);
        Ok(())
    }
}

/// Derives each engine step's wall time from the CPU operation rows, until the core records
/// steps itself: a step opens at the start of a `scheduling` operation and spans to the latest
/// end of the operations that start after it, up to the start of the next `scheduling`
/// operation (which closes it). Rows that start before the open step (another thread's, late)
/// are left out. All of it lives here so that a step timeline can replace it in one place.
#[derive(Debug, Default)]
struct StepClock {
    /// (start, latest end) of the open step, in session nanoseconds.
    open: Option<(u64, u64)>,
}

impl StepClock {
    /// Feeds one CPU operation row; returns the wall time of the step it closes, if any.
    fn observe(&mut self, operation: &str, start_ns: u64, duration_ns: u64) -> Option<u64> {
        let end = start_ns.saturating_add(duration_ns);
        if operation == CpuOp::BUILTIN_NAMES[CpuOp::SCHEDULING.id() as usize] {
            match self.open {
                Some((open_start, _)) if start_ns < open_start => None,
                _ => {
                    let closed = self.close();
                    self.open = Some((start_ns, end));
                    closed
                }
            }
        } else {
            if let Some((open_start, open_end)) = &mut self.open {
                if start_ns >= *open_start {
                    *open_end = (*open_end).max(end);
                }
            }
            None
        }
    }

    /// Closes the open step; returns its wall time.
    fn close(&mut self) -> Option<u64> {
        self.open.take().map(|(start, end)| end - start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_spans_from_scheduling_to_the_last_operation_before_the_next_scheduling() {
        let mut clock = StepClock::default();
        assert_eq!(clock.observe("sampling", 0, 5), None, "no step open yet");
        assert_eq!(clock.observe("scheduling", 100, 10), None);
        assert_eq!(clock.observe("batch_preparation", 110, 20), None);
        assert_eq!(clock.observe("model_execution", 130, 500), None);
        assert_eq!(clock.observe("sampling", 640, 30), None);
        assert_eq!(clock.observe("detokenize", 50, 1000), None, "started before the step: another thread's");
        // Idle from 670 to 1000 is not part of the step.
        assert_eq!(clock.observe("scheduling", 1000, 10), Some(570));
        assert_eq!(clock.observe("scheduling", 900, 10), None, "a late row does not close the step");
        assert_eq!(clock.close(), Some(10));
        assert_eq!(clock.close(), None);
    }
}
