//! The contract's files as this crate reads them: file names, required CSV columns and the JSON
//! summaries.
//!
//! The summary types mirror `../shared/CONTRACT.md` key for key. Every key the contract lists is
//! required; keys it does not list (a writer may add them) are ignored, so a report works on any
//! engine's output, not only on files written by `profilemate-core`.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The summary types whose keys are exactly the contract's are the core's own.
pub use profilemate_core::{ComponentStats, ForwardPassSummary, OperationStats, PhaseStats};

/// `forward_pass_timing.csv`
pub const FORWARD_PASS_CSV: &str = "forward_pass_timing.csv";
/// `forward_pass_summary.json`
pub const FORWARD_PASS_JSON: &str = "forward_pass_summary.json";
/// `cpu_operations_timing.csv`
pub const CPU_CSV: &str = "cpu_operations_timing.csv";
/// `cpu_timing_summary.json`
pub const CPU_JSON: &str = "cpu_timing_summary.json";
/// `batch_utilization.csv`
pub const BATCH_CSV: &str = "batch_utilization.csv";
/// `batch_utilization_summary.json`
pub const BATCH_JSON: &str = "batch_utilization_summary.json";
/// `preemption_events.csv`
pub const PREEMPTION_EVENTS_CSV: &str = "preemption_events.csv";
/// `request_lifecycle.csv`
pub const LIFECYCLE_CSV: &str = "request_lifecycle.csv";
/// `preemption_summary.json`
pub const PREEMPTION_JSON: &str = "preemption_summary.json";
/// `encoder_decoder_timing.csv`
pub const ENCODER_DECODER_CSV: &str = "encoder_decoder_timing.csv";
/// `encoder_decoder_summary.json`
pub const ENCODER_DECODER_JSON: &str = "encoder_decoder_summary.json";
/// `kv_cache_usage.csv`
pub const KV_CACHE_CSV: &str = "kv_cache_usage.csv";
/// `kv_cache_summary.json`
pub const KV_CACHE_JSON: &str = "kv_cache_summary.json";
/// `cuda_graph_events.csv`
pub const CUDA_GRAPH_CSV: &str = "cuda_graph_events.csv";
/// `cuda_graph_summary.json`
pub const CUDA_GRAPH_JSON: &str = "cuda_graph_summary.json";
/// `moe_expert_routing.csv`
pub const MOE_CSV: &str = "moe_expert_routing.csv";
/// `moe_expert_summary.json`
pub const MOE_JSON: &str = "moe_expert_summary.json";
/// `step_timeline.csv`
pub const STEP_TIMELINE_CSV: &str = "step_timeline.csv";
/// `step_timeline_summary.json`
pub const STEP_TIMELINE_JSON: &str = "step_timeline_summary.json";
/// `profilemate_run.json`, the run manifest.
pub const MANIFEST_JSON: &str = "profilemate_run.json";

/// Every file name this crate reads.
pub const ALL_FILES: [&str; 20] = [
    FORWARD_PASS_CSV,
    FORWARD_PASS_JSON,
    CPU_CSV,
    CPU_JSON,
    BATCH_CSV,
    BATCH_JSON,
    PREEMPTION_EVENTS_CSV,
    LIFECYCLE_CSV,
    PREEMPTION_JSON,
    ENCODER_DECODER_CSV,
    ENCODER_DECODER_JSON,
    KV_CACHE_CSV,
    KV_CACHE_JSON,
    CUDA_GRAPH_CSV,
    CUDA_GRAPH_JSON,
    MOE_CSV,
    MOE_JSON,
    MANIFEST_JSON,
    STEP_TIMELINE_CSV,
    STEP_TIMELINE_JSON,
];

/// Columns added to a contract CSV file since the contract was written, read when present.
///
/// ```
/// use profilemate_cli::contract::{optional_columns, MOE_CSV};
/// assert_eq!(optional_columns(MOE_CSV), ["window_steps"]);
/// ```
pub fn optional_columns(file: &str) -> &'static [&'static str] {
    match file {
        // Windowed MoE rows: how many steps a row sums (absent in files of older versions,
        // whose rows are one step each).
        MOE_CSV => &["window_steps"],
        _ => &[],
    }
}

/// The columns the contract requires in each CSV file, in the contract's order. A file may have
/// more columns after these; they are ignored.
///
/// ```
/// use profilemate_cli::contract::{required_columns, FORWARD_PASS_CSV};
/// assert_eq!(required_columns(FORWARD_PASS_CSV).unwrap()[4], "forward_time_ms");
/// assert!(required_columns("unknown.csv").is_none());
/// ```
pub fn required_columns(file: &str) -> Option<&'static [&'static str]> {
    Some(match file {
        FORWARD_PASS_CSV => {
            &["timestamp_sec", "phase", "batch_size", "num_tokens", "forward_time_ms", "throughput_tokens_per_sec"]
        }
        CPU_CSV => &["timestamp_sec", "operation", "duration_ms", "context"],
        BATCH_CSV => &[
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
        ],
        PREEMPTION_EVENTS_CSV => &["timestamp_sec", "request_id", "event", "reason", "running_time_sec", "extra_info"],
        LIFECYCLE_CSV => &[
            "request_id",
            "started_sec",
            "preempted_sec",
            "resumed_sec",
            "finished_sec",
            "total_time_sec",
            "preemption_delay_sec",
            "num_preemptions",
        ],
        ENCODER_DECODER_CSV => &["timestamp_sec", "component", "duration_ms", "context"],
        KV_CACHE_CSV => {
            &["timestamp_sec", "used_blocks", "total_blocks", "usage_pct", "prefix_cache_queries", "prefix_cache_hits"]
        }
        CUDA_GRAPH_CSV => &["timestamp_sec", "event", "batch_size", "padded_batch_size", "duration_ms"],
        MOE_CSV => &["timestamp_sec", "layer", "expert_id", "num_tokens"],
        STEP_TIMELINE_CSV => profilemate_core::STEP_TIMELINE_COLUMNS,
        _ => return None,
    })
}

/// `cpu_timing_summary.json`: one key per operation, nothing else.
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
    pub max_num_seqs: u64,
    pub max_tokens: u64,
    pub mean_running_queue_len: f64,
    pub mean_waiting_queue_len: f64,
    pub max_waiting_queue_len: u64,
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
}

/// `encoder_decoder_summary.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
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
}

/// `kv_cache_summary.json`.
///
/// The contract names the first four keys; the others are what profilemate-core adds, read
/// when present (another engine may not write them).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KvCacheSummary {
    /// Mean of the samples' usage (percent; samples of a cache with no block are left out).
    pub mean_usage_pct: f64,
    /// Highest usage seen (percent).
    pub max_usage_pct: f64,
    /// Samples recorded.
    pub samples: u64,
    /// `hits / queries * 100` over the run (0 without queries).
    pub prefix_cache_hit_rate_pct: f64,
    /// Prefix-cache lookups over the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_cache_queries: Option<u64>,
    /// Prefix-cache hits over the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_cache_hits: Option<u64>,
    /// Blocks in the cache at the last sample.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_blocks: Option<u64>,
    /// Samples at 100 % usage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_samples: Option<u64>,
}

/// `cuda_graph_summary.json`.
///
/// The contract names the first six keys; the last two are profilemate-core's, read when
/// present.
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
    /// Mean over replays of `(padded - batch) / padded * 100`.
    pub mean_padding_pct: f64,
    /// Time spent capturing, in all (milliseconds).
    pub capture_time_ms: f64,
    /// The batch sizes captured, ascending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub captured_sizes: Option<Vec<u64>>,
    /// The largest batch size that ran eagerly (0 if none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_eager_batch_size: Option<u64>,
}

/// Load of one MoE layer over the run, in `moe_expert_summary.json`.
///
/// The contract names tokens per expert, `max_over_mean` and the coefficient of variation;
/// the rest is profilemate-core's, read when present.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MoeLayerStats {
    /// Tokens routed to each expert, indexed by expert id.
    pub tokens_per_expert: Vec<u64>,
    /// The busiest expert's tokens over the mean per expert: 1 is perfectly even.
    pub max_over_mean: f64,
    /// Population standard deviation over mean of the tokens per expert: 0 is perfectly even.
    pub coefficient_of_variation: f64,
    /// Tokens routed in all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_tokens: Option<u64>,
    /// The busiest expert.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hottest_expert: Option<u64>,
    /// The least used expert.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coldest_expert: Option<u64>,
}

/// `moe_expert_summary.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MoeExpertSummary {
    /// Per layer, keyed by the layer index (`"0"`, `"1"`, ...).
    pub layers: BTreeMap<String, MoeLayerStats>,
    /// Layers by `max_over_mean`, most imbalanced first.
    pub most_imbalanced_layers: Vec<u64>,
    /// The highest `max_over_mean` of any layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_over_mean: Option<f64>,
    /// Mean of the layers' `max_over_mean`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_max_over_mean: Option<f64>,
    /// Routing records (one per layer per step).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub records: Option<u64>,
}

/// What the run manifest (`profilemate_run.json`) says about the run, where it says it.
///
/// The manifest's shape beyond these keys is the writer's business, so every field is optional.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[non_exhaustive]
pub struct RunInfo {
    /// Version of profilemate that wrote the run.
    pub profilemate_version: Option<String>,
    /// Wall-clock start (RFC 3339) of `timestamp_sec = 0`.
    pub started_at: Option<String>,
    /// Host name.
    pub host: Option<String>,
    /// Process id.
    pub pid: Option<u64>,
    /// Timing backend of forward passes (`cuda` or `host`).
    pub timing_backend: Option<String>,
    /// Forward passes seen.
    pub steps: Option<u64>,
    /// Whether the session shut down cleanly (`false`: killed or still running).
    pub finished: Option<bool>,
    /// Events dropped, all profilers and reasons together.
    pub events_dropped: Option<u64>,
    /// The underutilization threshold in force (percent).
    pub underutilization_threshold_pct: Option<f64>,
}

impl RunInfo {
    /// Picks the known keys out of a manifest; anything else is ignored.
    pub(crate) fn from_value(v: &serde_json::Value) -> RunInfo {
        let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
        let dropped = v.get("dropped").and_then(|d| d.as_object()).map(|per_profiler| {
            per_profiler
                .values()
                .filter_map(|reasons| reasons.as_object())
                .flat_map(|reasons| reasons.values())
                .filter_map(|n| n.as_u64())
                .sum()
        });
        RunInfo {
            profilemate_version: s("profilemate_version"),
            started_at: s("started_at"),
            host: s("host"),
            pid: v.get("pid").and_then(|x| x.as_u64()),
            timing_backend: s("timing_backend"),
            steps: v.get("steps").and_then(|x| x.as_u64()),
            finished: v.get("finished").and_then(|x| x.as_bool()),
            events_dropped: dropped,
            underutilization_threshold_pct: v
                .get("config")
                .and_then(|c| c.get("underutilization_threshold_pct"))
                .and_then(|x| x.as_f64()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use profilemate_core::{SummaryFile, Table};

    /// The contract's columns are a prefix of what profilemate-core writes, so a file from the
    /// core always satisfies this reader.
    #[test]
    fn required_columns_are_a_prefix_of_core_tables() {
        let mut checked = 0;
        for table in Table::ALL {
            let required = required_columns(table.file_name()).expect("every core table is read here");
            assert_eq!(&table.columns()[..required.len()], required, "{}", table.file_name());
            checked += 1;
        }
        assert_eq!(checked, 10, "the five profilers' six tables, the three trackers' and the step timeline");
    }

    #[test]
    fn summary_file_names_match_core() {
        let ours = [
            FORWARD_PASS_JSON,
            CPU_JSON,
            BATCH_JSON,
            PREEMPTION_JSON,
            ENCODER_DECODER_JSON,
            KV_CACHE_JSON,
            CUDA_GRAPH_JSON,
            MOE_JSON,
            STEP_TIMELINE_JSON,
        ];
        assert_eq!(SummaryFile::ALL.len(), ours.len());
        for (file, name) in SummaryFile::ALL.iter().zip(ours) {
            assert_eq!(file.file_name(), name);
        }
        assert_eq!(profilemate_core::MANIFEST_FILE, MANIFEST_JSON);
    }

    /// A summary written by profilemate-core (with its extra keys) reads back here.
    #[test]
    fn core_summaries_deserialize() {
        let core = profilemate_core::BatchUtilizationSummary { total_samples: 3, max_tokens: 8, ..Default::default() };
        let json = serde_json::to_string(&core).expect("serializes");
        let ours: BatchUtilizationSummary = serde_json::from_str(&json).expect("reads");
        assert_eq!(ours.total_samples, 3);
        assert_eq!(ours.max_tokens, 8);
        let core = profilemate_core::ForwardPassSummary::default();
        let ours: ForwardPassSummary =
            serde_json::from_str(&serde_json::to_string(&core).expect("serializes")).expect("reads");
        assert_eq!(ours, ForwardPassSummary::default());

        let core =
            profilemate_core::KvCacheSummary { samples: 5, full_samples: 2, total_blocks: 64, ..Default::default() };
        let ours: KvCacheSummary =
            serde_json::from_str(&serde_json::to_string(&core).expect("serializes")).expect("reads");
        assert_eq!((ours.samples, ours.full_samples, ours.total_blocks), (5, Some(2), Some(64)));
        let core = profilemate_core::CudaGraphSummary {
            captures: 2,
            captured_sizes: vec![1, 8],
            max_eager_batch_size: 9,
            ..Default::default()
        };
        let ours: CudaGraphSummary =
            serde_json::from_str(&serde_json::to_string(&core).expect("serializes")).expect("reads");
        assert_eq!((ours.captured_sizes, ours.max_eager_batch_size), (Some(vec![1, 8]), Some(9)));
        let mut core = profilemate_core::MoeExpertSummary { most_imbalanced_layers: vec![3], ..Default::default() };
        core.layers.insert(
            "3".into(),
            profilemate_core::MoeLayerStats { tokens_per_expert: vec![1, 3], hottest_expert: 1, ..Default::default() },
        );
        let ours: MoeExpertSummary =
            serde_json::from_str(&serde_json::to_string(&core).expect("serializes")).expect("reads");
        assert_eq!(ours.layers["3"].tokens_per_expert, vec![1, 3]);
        assert_eq!(ours.layers["3"].hottest_expert, Some(1));
        assert_eq!(ours.most_imbalanced_layers, vec![3]);
    }

    /// Another engine may write only the keys the contract names.
    #[test]
    fn tracker_summaries_need_only_the_contract_keys() {
        let kv: KvCacheSummary = serde_json::from_str(
            r#"{"mean_usage_pct": 50.0, "max_usage_pct": 90.0, "samples": 3, "prefix_cache_hit_rate_pct": 0.0}"#,
        )
        .expect("reads");
        assert_eq!(kv.full_samples, None);
        let g: CudaGraphSummary = serde_json::from_str(
            r#"{"captures": 1, "replays": 2, "eager_steps": 0, "replay_rate_pct": 100.0, "mean_padding_pct": 0.0,
                "capture_time_ms": 1.5}"#,
        )
        .expect("reads");
        assert_eq!(g.captured_sizes, None);
        let m: MoeExpertSummary = serde_json::from_str(
            r#"{"layers": {"0": {"tokens_per_expert": [1, 1], "max_over_mean": 1.0, "coefficient_of_variation": 0.0}},
                "most_imbalanced_layers": [0]}"#,
        )
        .expect("reads");
        assert_eq!(m.layers["0"].total_tokens, None);
    }

    #[test]
    fn run_info_sums_dropped_events() {
        let v = serde_json::json!({
            "profilemate_version": "0.1.0",
            "finished": false,
            "dropped": {"forward_pass": {"buffer_full": 2, "timing": 1}, "cpu_timing": {"buffer_full": 4}},
            "config": {"underutilization_threshold_pct": 40.0}
        });
        let info = RunInfo::from_value(&v);
        assert_eq!(info.events_dropped, Some(7));
        assert_eq!(info.finished, Some(false));
        assert_eq!(info.underutilization_threshold_pct, Some(40.0));
        assert_eq!(info.host, None);
    }
}
