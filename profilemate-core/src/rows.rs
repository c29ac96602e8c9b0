//! The rows of the contract tables, as the collector hands them to sinks.

use crate::types::{Component, GraphEvent, LifecycleEvent, Phase};
use std::sync::Arc;

/// One of the six contract CSV tables.
///
/// ```
/// use profilemate_core::Table;
/// assert_eq!(Table::ForwardPass.file_name(), "forward_pass_timing.csv");
/// assert_eq!(Table::ForwardPass.columns()[0], "timestamp_sec");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    /// `forward_pass_timing.csv`
    ForwardPass,
    /// `cpu_operations_timing.csv`
    CpuOperations,
    /// `batch_utilization.csv`
    BatchUtilization,
    /// `preemption_events.csv`
    PreemptionEvents,
    /// `request_lifecycle.csv`
    RequestLifecycle,
    /// `encoder_decoder_timing.csv`
    EncoderDecoder,
    /// `kv_cache_usage.csv`
    KvCacheUsage,
    /// `cuda_graph_events.csv`
    CudaGraphEvents,
    /// `moe_expert_routing.csv`
    MoeExpertRouting,
    /// `step_timeline.csv`: one row per engine step, joining the other tables by `step`.
    StepTimeline,
}

impl Table {
    /// All tables.
    pub const ALL: [Table; 10] = [
        Table::ForwardPass,
        Table::CpuOperations,
        Table::BatchUtilization,
        Table::PreemptionEvents,
        Table::RequestLifecycle,
        Table::EncoderDecoder,
        Table::KvCacheUsage,
        Table::CudaGraphEvents,
        Table::MoeExpertRouting,
        Table::StepTimeline,
    ];

    /// The table's base name (file name without extension).
    pub const fn name(self) -> &'static str {
        match self {
            Table::ForwardPass => "forward_pass_timing",
            Table::CpuOperations => "cpu_operations_timing",
            Table::BatchUtilization => "batch_utilization",
            Table::PreemptionEvents => "preemption_events",
            Table::RequestLifecycle => "request_lifecycle",
            Table::EncoderDecoder => "encoder_decoder_timing",
            Table::KvCacheUsage => "kv_cache_usage",
            Table::CudaGraphEvents => "cuda_graph_events",
            Table::MoeExpertRouting => "moe_expert_routing",
            Table::StepTimeline => "step_timeline",
        }
    }

    /// The CSV file name.
    pub const fn file_name(self) -> &'static str {
        match self {
            Table::ForwardPass => "forward_pass_timing.csv",
            Table::CpuOperations => "cpu_operations_timing.csv",
            Table::BatchUtilization => "batch_utilization.csv",
            Table::PreemptionEvents => "preemption_events.csv",
            Table::RequestLifecycle => "request_lifecycle.csv",
            Table::EncoderDecoder => "encoder_decoder_timing.csv",
            Table::KvCacheUsage => "kv_cache_usage.csv",
            Table::CudaGraphEvents => "cuda_graph_events.csv",
            Table::MoeExpertRouting => "moe_expert_routing.csv",
            Table::StepTimeline => "step_timeline.csv",
        }
    }

    /// The contract's columns, in order.
    pub const fn columns(self) -> &'static [&'static str] {
        match self {
            Table::ForwardPass => &[
                "timestamp_sec",
                "phase",
                "batch_size",
                "num_tokens",
                "forward_time_ms",
                "throughput_tokens_per_sec",
                "step",
            ],
            Table::CpuOperations => &["timestamp_sec", "operation", "duration_ms", "context", "step"],
            Table::BatchUtilization => &[
                "timestamp_sec",
                "num_seqs",
                "max_num_seqs",
                "seq_utilization_pct",
                "num_tokens",
                "max_tokens",
                "token_utilization_pct",
                "phase",
                "running_queue_len",
                "waiting_queue_len",
                "step",
            ],
            Table::PreemptionEvents => {
                &["timestamp_sec", "request_id", "event", "reason", "running_time_sec", "extra_info", "step"]
            }
            Table::RequestLifecycle => &[
                "request_id",
                "started_sec",
                "preempted_sec",
                "resumed_sec",
                "finished_sec",
                "total_time_sec",
                "preemption_delay_sec",
                "num_preemptions",
                "outcome",
            ],
            Table::EncoderDecoder => &["timestamp_sec", "component", "duration_ms", "context", "step"],
            Table::KvCacheUsage => &[
                "timestamp_sec",
                "used_blocks",
                "total_blocks",
                "usage_pct",
                "prefix_cache_queries",
                "prefix_cache_hits",
                "step",
            ],
            Table::CudaGraphEvents => {
                &["timestamp_sec", "event", "batch_size", "padded_batch_size", "duration_ms", "step"]
            }
            Table::MoeExpertRouting => {
                &["timestamp_sec", "layer", "expert_id", "num_tokens", "window_first_step", "window_steps", "step"]
            }
            Table::StepTimeline => STEP_TIMELINE_COLUMNS,
        }
    }

    /// The profiler that fills this table.
    pub const fn profiler(self) -> crate::ProfilerKind {
        use crate::ProfilerKind as K;
        match self {
            Table::ForwardPass => K::ForwardPass,
            Table::CpuOperations => K::CpuTiming,
            Table::BatchUtilization => K::BatchUtilization,
            Table::PreemptionEvents | Table::RequestLifecycle => K::Preemption,
            Table::EncoderDecoder => K::EncoderDecoder,
            Table::KvCacheUsage => K::KvCache,
            Table::CudaGraphEvents => K::CudaGraph,
            Table::MoeExpertRouting => K::MoeExpert,
            Table::StepTimeline => K::ForwardPass,
        }
    }
}

/// Nanoseconds to seconds.
#[inline]
pub fn ns_to_sec(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// Nanoseconds to milliseconds.
#[inline]
pub fn ns_to_ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// A row of `forward_pass_timing.csv`.
#[derive(Debug, Clone, PartialEq)]
pub struct ForwardPassRow {
    /// When the pass started, nanoseconds since the session started.
    pub timestamp_ns: u64,
    /// Prefill, decode or mixed.
    pub phase: Phase,
    /// Sequences in the batch.
    pub batch_size: u32,
    /// Tokens processed.
    pub num_tokens: u32,
    /// Execution time as the timing backend measured it.
    pub forward_time_ns: u64,
    /// The engine step it belongs to; `None` outside any step (see [`Steps`](crate::Steps)).
    pub step: Option<u64>,
}

impl ForwardPassRow {
    /// `num_tokens / forward_time * 1000` per millisecond, `None` when the time is 0.
    ///
    /// ```
    /// use profilemate_core::{ForwardPassRow, Phase};
    /// let row = ForwardPassRow { timestamp_ns: 0, phase: Phase::Decode, batch_size: 8, num_tokens: 8, forward_time_ns: 2_000_000, step: Some(1) };
    /// assert_eq!(row.throughput_tokens_per_sec(), Some(4000.0));
    /// ```
    pub fn throughput_tokens_per_sec(&self) -> Option<f64> {
        (self.forward_time_ns > 0).then(|| f64::from(self.num_tokens) / ns_to_ms(self.forward_time_ns) * 1000.0)
    }
}

/// A row of `cpu_operations_timing.csv`.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuOperationRow {
    /// When the operation started, nanoseconds since the session started.
    pub timestamp_ns: u64,
    /// The operation's name.
    pub operation: Arc<str>,
    /// How long it took.
    pub duration_ns: u64,
    /// Empty, or `key=value` pairs separated by `;`.
    pub context: String,
    /// The engine step it belongs to; `None` outside any step (see [`Steps`](crate::Steps)).
    pub step: Option<u64>,
}

/// A row of `batch_utilization.csv`.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchUtilizationRow {
    /// When the batch was scheduled, nanoseconds since the session started.
    pub timestamp_ns: u64,
    /// Sequences scheduled.
    pub num_seqs: u32,
    /// The scheduler's sequence limit.
    pub max_num_seqs: u32,
    /// `num_seqs / max_num_seqs * 100`, clamped to 100; `None` when the limit is 0.
    pub seq_utilization_pct: Option<f64>,
    /// Tokens scheduled.
    pub num_tokens: u32,
    /// The scheduler's token limit (`max_num_batched_tokens`).
    pub max_tokens: u32,
    /// `num_tokens / max_tokens * 100`, clamped to 100; `None` when the limit is 0.
    pub token_utilization_pct: Option<f64>,
    /// Prefill, decode or mixed.
    pub phase: Phase,
    /// Requests running.
    pub running_queue_len: u32,
    /// Requests waiting.
    pub waiting_queue_len: u32,
    /// The engine step it belongs to; `None` outside any step (see [`Steps`](crate::Steps)).
    pub step: Option<u64>,
}

/// A row of `preemption_events.csv`.
#[derive(Debug, Clone, PartialEq)]
pub struct PreemptionEventRow {
    /// When it happened, nanoseconds since the session started.
    pub timestamp_ns: u64,
    /// The engine's request id.
    pub request_id: String,
    /// What happened.
    pub event: LifecycleEvent,
    /// Why (on `preempted` and `evicted` rows), else empty.
    pub reason: String,
    /// On `preempted` rows: how long the request had run since it started or last resumed.
    pub running_time_ns: Option<u64>,
    /// Empty, or `key=value` pairs separated by `;`.
    pub extra_info: String,
    /// The engine step it belongs to; `None` outside any step (see [`Steps`](crate::Steps)).
    pub step: Option<u64>,
}

/// How a request left the engine, as `request_lifecycle.csv`'s `outcome` column says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It finished.
    Finished,
    /// It was evicted or aborted.
    Evicted,
    /// It was still in flight when the session shut down.
    InFlight,
}

impl Outcome {
    /// The name used in files.
    pub const fn as_str(self) -> &'static str {
        match self {
            Outcome::Finished => "finished",
            Outcome::Evicted => "evicted",
            Outcome::InFlight => "in_flight",
        }
    }
}

/// A row of `request_lifecycle.csv`. Times are nanoseconds since the session started.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestLifecycleRow {
    /// The engine's request id.
    pub request_id: String,
    /// When it started (`None` if its start was not recorded).
    pub started_ns: Option<u64>,
    /// Its first preemption; `None` if never preempted.
    pub preempted_ns: Option<u64>,
    /// Its last resume; `None` if never preempted.
    pub resumed_ns: Option<u64>,
    /// When it finished or was evicted; `None` while in flight.
    pub finished_ns: Option<u64>,
    /// `finished - started`; `None` while in flight or when the start is unknown.
    pub total_time_ns: Option<u64>,
    /// Sum over its preemptions of the time until the matching resume; `None` if never
    /// preempted.
    pub preemption_delay_ns: Option<u64>,
    /// How many times it was preempted.
    pub num_preemptions: u32,
    /// How it left the engine.
    pub outcome: Outcome,
}

/// A row of `encoder_decoder_timing.csv`.
#[derive(Debug, Clone, PartialEq)]
pub struct ComponentRow {
    /// When the component started, nanoseconds since the session started.
    pub timestamp_ns: u64,
    /// Encoder, decoder or cross-attention.
    pub component: Component,
    /// How long it took.
    pub duration_ns: u64,
    /// The part, for example `vision_encoder`.
    pub context: String,
    /// The engine step it belongs to; `None` outside any step (see [`Steps`](crate::Steps)).
    pub step: Option<u64>,
}

/// A row of `kv_cache_usage.csv`.
#[derive(Debug, Clone, PartialEq)]
pub struct KvCacheRow {
    /// When it was sampled, nanoseconds since the session started.
    pub timestamp_ns: u64,
    /// Blocks in use.
    pub used_blocks: u32,
    /// Blocks in the cache.
    pub total_blocks: u32,
    /// Prefix-cache lookups since the previous sample (in blocks or tokens, as the engine counts).
    pub prefix_cache_queries: u64,
    /// Prefix-cache hits since the previous sample.
    pub prefix_cache_hits: u64,
    /// The engine step it belongs to; `None` outside any step (see [`Steps`](crate::Steps)).
    pub step: Option<u64>,
}

impl KvCacheRow {
    /// `used / total * 100`, clamped to 100; `None` when the cache has no block.
    pub fn usage_pct(&self) -> Option<f64> {
        (self.total_blocks > 0)
            .then(|| f64::from(self.used_blocks.min(self.total_blocks)) / f64::from(self.total_blocks) * 100.0)
    }
}

/// A row of `cuda_graph_events.csv`.
#[derive(Debug, Clone, PartialEq)]
pub struct CudaGraphRow {
    /// When it happened, nanoseconds since the session started.
    pub timestamp_ns: u64,
    /// Capture, replay or eager.
    pub event: GraphEvent,
    /// The batch size of the step (or the size captured).
    pub batch_size: u32,
    /// The captured size a replayed batch was padded to; `None` for eager steps.
    pub padded_batch_size: Option<u32>,
    /// How long it took, when timed (always for captures).
    pub duration_ns: Option<u64>,
    /// The engine step it belongs to; `None` outside any step (see [`Steps`](crate::Steps)).
    pub step: Option<u64>,
}

/// A row of `moe_expert_routing.csv`: tokens one layer routed to one expert over a window of
/// steps (by default), or in one step (per-step detail: `window_steps` 1). Experts that received
/// no token in the window have no row.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeRoutingRow {
    /// The time of the window's last routing call (of the step, for a one-step window),
    /// nanoseconds since the session started.
    pub timestamp_ns: u64,
    /// The MoE layer.
    pub layer: u32,
    /// The expert.
    pub expert_id: u32,
    /// Tokens routed to it in the window.
    pub num_tokens: u32,
    /// The layer's routing calls before the window, counted from 0: with one call per layer
    /// per step, the engine step the window starts at.
    pub window_first_step: u64,
    /// The layer's routing calls (steps) in the window.
    pub window_steps: u64,
    /// The engine step of a per-step detail row (see [`Steps`](crate::Steps)); `None` for a
    /// window's row (a window spans steps) and for a routing call made outside any step.
    pub step: Option<u64>,
}

/// The columns of `step_timeline.csv`, in order. Times in milliseconds unless named `_sec`; a
/// field is empty when nothing in the step recorded it.
pub const STEP_TIMELINE_COLUMNS: &[&str] = &[
    "step",
    "start_sec",
    "phase",
    "batch_size",
    "num_tokens",
    "forward_passes",
    "forward_time_ms",
    "scheduling_ms",
    "batch_preparation_ms",
    "sampling_ms",
    "other_cpu_ms",
    "step_wall_ms",
    "host_gap_before_ms",
    "unclaimed_ms",
    "seq_utilization_pct",
    "token_utilization_pct",
    "running_queue_len",
    "waiting_queue_len",
    "kv_cache_usage_pct",
    "cuda_graph",
    "padded_batch_size",
    "padding_pct",
    "preemptions",
    "resumes",
    "encoder_time_ms",
    "decoder_time_ms",
    "moe_max_over_mean",
];

/// One row of `step_timeline.csv`. Durations are nanoseconds; `None` is an empty field.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepTimelineRow {
    /// The step id.
    pub step: u64,
    /// When the step began (its guard opened, or its first event started), ns since the session
    /// started.
    pub start_ns: u64,
    /// The forward pass's phase, else the scheduled batch's.
    pub phase: Option<Phase>,
    /// Sequences in the step's forward pass (the largest, if it ran several).
    pub batch_size: Option<u32>,
    /// Tokens in the step's forward passes, summed.
    pub num_tokens: Option<u32>,
    /// Forward passes in the step.
    pub forward_passes: u32,
    /// Their summed time.
    pub forward_time_ns: Option<u64>,
    /// `scheduling` operations, summed.
    pub scheduling_ns: Option<u64>,
    /// `batch_preparation` operations, summed.
    pub batch_preparation_ns: Option<u64>,
    /// `sampling` operations, summed.
    pub sampling_ns: Option<u64>,
    /// Every other CPU operation except those enclosing the forward pass
    /// ([`ENCLOSING_OPERATIONS`](crate::ENCLOSING_OPERATIONS)), summed.
    pub other_cpu_ns: Option<u64>,
    /// From the step's beginning to the end of its guard or of its last event.
    pub wall_ns: u64,
    /// From the end of the previous step to this one's beginning (`None` for the first step).
    pub host_gap_before_ns: Option<u64>,
    /// Wall time that no profiler claims: wall minus forward and CPU time, at least 0.
    pub unclaimed_ns: u64,
    /// Of the step's (last) batch utilization row.
    pub seq_utilization_pct: Option<f64>,
    /// Of the step's (last) batch utilization row.
    pub token_utilization_pct: Option<f64>,
    /// Of the step's (last) batch utilization row.
    pub running_queue_len: Option<u32>,
    /// Of the step's (last) batch utilization row.
    pub waiting_queue_len: Option<u32>,
    /// Of the step's last KV-cache reading.
    pub kv_cache_usage_pct: Option<f64>,
    /// `replay` or `eager` (the step's last such CUDA graph event).
    pub cuda_graph: Option<GraphEvent>,
    /// The captured size a replay was padded to.
    pub padded_batch_size: Option<u32>,
    /// `(padded - batch) / padded * 100` of a replay.
    pub padding_pct: Option<f64>,
    /// Preemptions recorded in the step (`None` when the preemption profiler is off).
    pub preemptions: Option<u32>,
    /// Resumes recorded in the step (`None` when the preemption profiler is off).
    pub resumes: Option<u32>,
    /// Encoder time in the step; `None` when the step has no component row at all.
    pub encoder_time_ns: Option<u64>,
    /// Decoder time in the step; `None` when the step has no component row at all.
    pub decoder_time_ns: Option<u64>,
    /// The most imbalanced MoE layer's `max / mean` tokens per expert in the step.
    pub moe_max_over_mean: Option<f64>,
}

/// A batch of rows of every table, in the order they were recorded.
///
/// ```
/// use profilemate_core::{Rows, Table};
/// let rows = Rows::default();
/// assert!(rows.is_empty());
/// assert_eq!(rows.len(Table::ForwardPass), 0);
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rows {
    /// `forward_pass_timing.csv`
    pub forward_pass: Vec<ForwardPassRow>,
    /// `cpu_operations_timing.csv`
    pub cpu_operations: Vec<CpuOperationRow>,
    /// `batch_utilization.csv`
    pub batch_utilization: Vec<BatchUtilizationRow>,
    /// `preemption_events.csv`
    pub preemption_events: Vec<PreemptionEventRow>,
    /// `request_lifecycle.csv`
    pub request_lifecycle: Vec<RequestLifecycleRow>,
    /// `encoder_decoder_timing.csv`
    pub encoder_decoder: Vec<ComponentRow>,
    /// `kv_cache_usage.csv`
    pub kv_cache: Vec<KvCacheRow>,
    /// `cuda_graph_events.csv`
    pub cuda_graph: Vec<CudaGraphRow>,
    /// `moe_expert_routing.csv`
    pub moe_routing: Vec<MoeRoutingRow>,
    /// `step_timeline.csv`
    pub step_timeline: Vec<StepTimelineRow>,
}

impl Rows {
    /// Rows of `table` in this batch.
    pub fn len(&self, table: Table) -> usize {
        match table {
            Table::ForwardPass => self.forward_pass.len(),
            Table::CpuOperations => self.cpu_operations.len(),
            Table::BatchUtilization => self.batch_utilization.len(),
            Table::PreemptionEvents => self.preemption_events.len(),
            Table::RequestLifecycle => self.request_lifecycle.len(),
            Table::EncoderDecoder => self.encoder_decoder.len(),
            Table::KvCacheUsage => self.kv_cache.len(),
            Table::CudaGraphEvents => self.cuda_graph.len(),
            Table::MoeExpertRouting => self.moe_routing.len(),
            Table::StepTimeline => self.step_timeline.len(),
        }
    }

    /// Whether the batch holds no row at all.
    pub fn is_empty(&self) -> bool {
        Table::ALL.iter().all(|t| self.len(*t) == 0)
    }

    /// Empties every table, keeping the allocations.
    pub fn clear(&mut self) {
        self.forward_pass.clear();
        self.cpu_operations.clear();
        self.batch_utilization.clear();
        self.preemption_events.clear();
        self.request_lifecycle.clear();
        self.encoder_decoder.clear();
        self.kv_cache.clear();
        self.cuda_graph.clear();
        self.moe_routing.clear();
        self.step_timeline.clear();
    }

    /// Appends every row of `other` (used by in-memory sinks).
    pub fn extend_from(&mut self, other: &Rows) {
        self.forward_pass.extend_from_slice(&other.forward_pass);
        self.cpu_operations.extend_from_slice(&other.cpu_operations);
        self.batch_utilization.extend_from_slice(&other.batch_utilization);
        self.preemption_events.extend_from_slice(&other.preemption_events);
        self.request_lifecycle.extend_from_slice(&other.request_lifecycle);
        self.encoder_decoder.extend_from_slice(&other.encoder_decoder);
        self.kv_cache.extend_from_slice(&other.kv_cache);
        self.cuda_graph.extend_from_slice(&other.cuda_graph);
        self.moe_routing.extend_from_slice(&other.moe_routing);
        self.step_timeline.extend_from_slice(&other.step_timeline);
    }
}
