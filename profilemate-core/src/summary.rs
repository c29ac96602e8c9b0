//! The JSON summaries of the contract, as typed structs.
//!
//! Each struct serializes to exactly the keys of `../shared/CONTRACT.md`; no field is ever NaN or
//! infinite (empty groups are all zeros).

use crate::stats::DurationStats;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One summary file.
///
/// ```
/// use profilemate_core::SummaryFile;
/// assert_eq!(SummaryFile::CpuTiming.file_name(), "cpu_timing_summary.json");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SummaryFile {
    /// `forward_pass_summary.json`
    ForwardPass,
    /// `cpu_timing_summary.json`
    CpuTiming,
    /// `batch_utilization_summary.json`
    BatchUtilization,
    /// `preemption_summary.json`
    Preemption,
    /// `encoder_decoder_summary.json`
    EncoderDecoder,
    /// `kv_cache_summary.json`
    KvCache,
    /// `cuda_graph_summary.json`
    CudaGraph,
    /// `moe_expert_summary.json`
    MoeExpert,
    /// `step_timeline_summary.json`
    StepTimeline,
}

impl SummaryFile {
    /// All summary files.
    pub const ALL: [SummaryFile; 9] = [
        SummaryFile::ForwardPass,
        SummaryFile::CpuTiming,
        SummaryFile::BatchUtilization,
        SummaryFile::Preemption,
        SummaryFile::EncoderDecoder,
        SummaryFile::KvCache,
        SummaryFile::CudaGraph,
        SummaryFile::MoeExpert,
        SummaryFile::StepTimeline,
    ];

    /// The file's name.
    pub const fn file_name(self) -> &'static str {
        match self {
            SummaryFile::ForwardPass => "forward_pass_summary.json",
            SummaryFile::CpuTiming => "cpu_timing_summary.json",
            SummaryFile::BatchUtilization => "batch_utilization_summary.json",
            SummaryFile::Preemption => "preemption_summary.json",
            SummaryFile::EncoderDecoder => "encoder_decoder_summary.json",
            SummaryFile::KvCache => "kv_cache_summary.json",
            SummaryFile::CudaGraph => "cuda_graph_summary.json",
            SummaryFile::MoeExpert => "moe_expert_summary.json",
            SummaryFile::StepTimeline => "step_timeline_summary.json",
        }
    }
}

/// Forward pass statistics of one phase (`forward_pass_summary.json`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct PhaseStats {
    pub count: u64,
    pub mean_ms: f64,
    pub std_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub total_ms: f64,
    pub total_tokens: u64,
    /// Mean of the rows' `throughput_tokens_per_sec` (rows with a zero time have none), as
    /// `df.throughput_tokens_per_sec.mean()` computes it.
    pub mean_throughput_tokens_per_sec: f64,
}

impl PhaseStats {
    /// A phase's statistics from its forward-pass times, tokens and mean row throughput.
    ///
    /// ```
    /// use profilemate_core::{DurationStats, PhaseStats};
    /// let mut times = DurationStats::default();
    /// times.record(2_000_000);
    /// let p = PhaseStats::from_stats(&times, 64, 32_000.0);
    /// assert_eq!((p.count, p.total_ms, p.total_tokens), (1, 2.0, 64));
    /// ```
    pub fn from_stats(s: &DurationStats, total_tokens: u64, mean_throughput_tokens_per_sec: f64) -> Self {
        PhaseStats {
            count: s.count(),
            mean_ms: s.mean_ms(),
            std_ms: s.std_ms(),
            min_ms: s.min_ms(),
            max_ms: s.max_ms(),
            p50_ms: s.percentile_ms(50.0),
            p95_ms: s.percentile_ms(95.0),
            p99_ms: s.percentile_ms(99.0),
            total_ms: s.total_ms(),
            total_tokens,
            mean_throughput_tokens_per_sec,
        }
    }
}

/// The encoder, decoder and cross-attention shares of their summed time, in percent
/// (`encoder_decoder_summary.json`): they add up to 100 (the decoder takes the remainder), and
/// are all 0 when nothing was recorded.
///
/// ```
/// assert_eq!(profilemate_core::component_shares(1, 3, 0), (25.0, 75.0, 0.0));
/// assert_eq!(profilemate_core::component_shares(0, 0, 0), (0.0, 0.0, 0.0));
/// ```
pub fn component_shares(encoder_ns: u128, decoder_ns: u128, cross_attention_ns: u128) -> (f64, f64, f64) {
    let total = encoder_ns + decoder_ns + cross_attention_ns;
    if total == 0 {
        return (0.0, 0.0, 0.0);
    }
    let e = encoder_ns as f64 / total as f64 * 100.0;
    let c = cross_attention_ns as f64 / total as f64 * 100.0;
    (e, (100.0 - e - c).max(0.0), c)
}

/// `forward_pass_summary.json`: all three phases are always present.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct ForwardPassSummary {
    pub prefill: PhaseStats,
    pub decode: PhaseStats,
    pub mixed: PhaseStats,
}

/// Statistics of one CPU operation (`cpu_timing_summary.json`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct OperationStats {
    pub count: u64,
    pub mean_ms: f64,
    pub std_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub total_ms: f64,
}

impl From<&DurationStats> for OperationStats {
    fn from(s: &DurationStats) -> Self {
        OperationStats {
            count: s.count(),
            mean_ms: s.mean_ms(),
            std_ms: s.std_ms(),
            min_ms: s.min_ms(),
            max_ms: s.max_ms(),
            p50_ms: s.percentile_ms(50.0),
            p95_ms: s.percentile_ms(95.0),
            p99_ms: s.percentile_ms(99.0),
            total_ms: s.total_ms(),
        }
    }
}

/// `cpu_timing_summary.json`: a closed object, one key per operation seen.
pub type CpuTimingSummary = BTreeMap<String, OperationStats>;

/// `batch_utilization_summary.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct BatchUtilizationSummary {
    pub total_samples: u64,
    pub mean_seq_utilization_pct: f64,
    pub mean_token_utilization_pct: f64,
    pub underutilization_events: u64,
    pub underutilization_threshold_pct: f64,
    pub prefill_avg_utilization: f64,
    pub decode_avg_utilization: f64,
    pub mixed_avg_utilization: f64,
    pub max_num_seqs: u32,
    pub max_tokens: u32,
    pub mean_running_queue_len: f64,
    pub mean_waiting_queue_len: f64,
    pub max_waiting_queue_len: u32,
    /// Samples whose batch exceeded a non-zero limit (their percentage was clamped to 100).
    pub over_limit_samples: u64,
    /// Samples with a zero limit (their percentage is empty).
    pub zero_limit_samples: u64,
}

/// `preemption_summary.json` (times in seconds).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct PreemptionSummary {
    pub total_preemptions: u64,
    pub total_requests: u64,
    pub requests_preempted: u64,
    pub preemption_rate_pct: f64,
    pub preemption_reasons: BTreeMap<String, u64>,
    pub mean_running_time_before_preempt: f64,
    pub mean_resume_delay: f64,
    pub max_resume_delay: f64,
    /// Requests finished, evicted, and still in flight at the last summary.
    pub requests_finished: u64,
    #[allow(missing_docs)]
    pub requests_evicted: u64,
    #[allow(missing_docs)]
    pub requests_in_flight: u64,
}

/// Statistics of one component (`encoder_decoder_summary.json`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct ComponentStats {
    pub count: u64,
    pub total_ms: f64,
    pub mean_ms: f64,
    pub std_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
}

impl From<&DurationStats> for ComponentStats {
    fn from(s: &DurationStats) -> Self {
        ComponentStats {
            count: s.count(),
            total_ms: s.total_ms(),
            mean_ms: s.mean_ms(),
            std_ms: s.std_ms(),
            min_ms: s.min_ms(),
            max_ms: s.max_ms(),
            p50_ms: s.percentile_ms(50.0),
            p95_ms: s.percentile_ms(95.0),
        }
    }
}

/// `encoder_decoder_summary.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct EncoderDecoderSummary {
    /// `encoder_decoder` or `decoder_only`.
    pub model_type: String,
    pub encoder: ComponentStats,
    pub decoder: ComponentStats,
    pub cross_attention: ComponentStats,
    pub encoder_pct: f64,
    pub decoder_pct: f64,
    pub cross_attention_pct: f64,
    /// Whether `model_type` was declared by the engine (`true`) or inferred.
    pub model_type_declared: bool,
}

impl Default for EncoderDecoderSummary {
    fn default() -> Self {
        EncoderDecoderSummary {
            model_type: crate::ModelType::DecoderOnly.as_str().to_string(),
            encoder: ComponentStats::default(),
            decoder: ComponentStats::default(),
            cross_attention: ComponentStats::default(),
            encoder_pct: 0.0,
            decoder_pct: 0.0,
            cross_attention_pct: 0.0,
            model_type_declared: false,
        }
    }
}

/// `kv_cache_summary.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KvCacheSummary {
    /// Mean of the samples' usage (samples of a cache with no block are left out).
    pub mean_usage_pct: f64,
    /// Highest usage seen.
    pub max_usage_pct: f64,
    /// Samples recorded.
    pub samples: u64,
    /// `hits / queries * 100` over the run (0 without queries).
    pub prefix_cache_hit_rate_pct: f64,
    /// Prefix-cache lookups over the run.
    pub prefix_cache_queries: u64,
    /// Prefix-cache hits over the run.
    pub prefix_cache_hits: u64,
    /// Blocks in the cache at the last sample.
    pub total_blocks: u32,
    /// Samples at 100 % usage.
    pub full_samples: u64,
}

/// `cuda_graph_summary.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CudaGraphSummary {
    /// Graphs captured.
    pub captures: u64,
    /// Steps that replayed a graph.
    pub replays: u64,
    /// Steps that ran eagerly.
    pub eager_steps: u64,
    /// `replays / (replays + eager_steps) * 100` (0 when there was no step).
    pub replay_rate_pct: f64,
    /// Mean over replays of `(padded - batch) / padded * 100`: the share of a replayed batch
    /// that was padding.
    pub mean_padding_pct: f64,
    /// Time spent capturing, in all.
    pub capture_time_ms: f64,
    /// The batch sizes captured, ascending.
    pub captured_sizes: Vec<u32>,
    /// The largest batch size that ran eagerly (0 if none).
    pub max_eager_batch_size: u32,
}

/// Load of one MoE layer over the run (`moe_expert_summary.json`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MoeLayerStats {
    /// Tokens routed to each expert, indexed by expert id.
    pub tokens_per_expert: Vec<u64>,
    /// Tokens routed in all (a token routed to k experts counts k times).
    pub total_tokens: u64,
    /// The busiest expert's tokens over the mean per expert: 1 is perfectly even.
    pub max_over_mean: f64,
    /// Standard deviation over mean of the tokens per expert (population): 0 is perfectly even.
    pub coefficient_of_variation: f64,
    /// The busiest expert.
    pub hottest_expert: u32,
    /// The least used expert.
    pub coldest_expert: u32,
}

/// `moe_expert_summary.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MoeExpertSummary {
    /// Per layer, keyed by the layer index.
    pub layers: BTreeMap<String, MoeLayerStats>,
    /// Layers by `max_over_mean`, most imbalanced first (at most 10).
    pub most_imbalanced_layers: Vec<u32>,
    /// The highest `max_over_mean` of any layer (0 without routing).
    pub max_over_mean: f64,
    /// Mean of the layers' `max_over_mean`.
    pub mean_max_over_mean: f64,
    /// Routing records received (one per layer per step).
    pub records: u64,
}

/// The summaries of every profiler that runs (`None` for one that is disabled).
///
/// ```
/// use profilemate_core::Summaries;
/// let s = Summaries::default();
/// assert!(s.forward_pass.is_none());
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
#[allow(missing_docs)]
pub struct Summaries {
    pub forward_pass: Option<ForwardPassSummary>,
    pub cpu_timing: Option<CpuTimingSummary>,
    pub batch_utilization: Option<BatchUtilizationSummary>,
    pub preemption: Option<PreemptionSummary>,
    pub encoder_decoder: Option<EncoderDecoderSummary>,
    pub kv_cache: Option<KvCacheSummary>,
    pub cuda_graph: Option<CudaGraphSummary>,
    pub moe_expert: Option<MoeExpertSummary>,
    pub step_timeline: Option<crate::step_timeline::StepTimelineSummary>,
}

impl Summaries {
    /// Each present summary as its file name and JSON value.
    ///
    /// # Errors
    ///
    /// Only if serialization fails, which the types here rule out.
    pub fn to_json_files(&self) -> serde_json::Result<Vec<(SummaryFile, serde_json::Value)>> {
        let mut out = Vec::new();
        if let Some(s) = &self.forward_pass {
            out.push((SummaryFile::ForwardPass, serde_json::to_value(s)?));
        }
        if let Some(s) = &self.cpu_timing {
            out.push((SummaryFile::CpuTiming, serde_json::to_value(s)?));
        }
        if let Some(s) = &self.batch_utilization {
            out.push((SummaryFile::BatchUtilization, serde_json::to_value(s)?));
        }
        if let Some(s) = &self.preemption {
            out.push((SummaryFile::Preemption, serde_json::to_value(s)?));
        }
        if let Some(s) = &self.encoder_decoder {
            out.push((SummaryFile::EncoderDecoder, serde_json::to_value(s)?));
        }
        if let Some(s) = &self.kv_cache {
            out.push((SummaryFile::KvCache, serde_json::to_value(s)?));
        }
        if let Some(s) = &self.cuda_graph {
            out.push((SummaryFile::CudaGraph, serde_json::to_value(s)?));
        }
        if let Some(s) = &self.moe_expert {
            out.push((SummaryFile::MoeExpert, serde_json::to_value(s)?));
        }
        if let Some(s) = &self.step_timeline {
            out.push((SummaryFile::StepTimeline, serde_json::to_value(s)?));
        }
        Ok(out)
    }
}
