//! The insights' vocabulary: the rules, their thresholds, and what a fired rule says. A leaf
//! module: the report holds these types and `insights` evaluates the rules over the report.

use serde::Serialize;
use std::fmt;

/// The limits the rules compare against. `Thresholds::default()` holds the documented values.
///
/// ```
/// use profilemate_cli::Thresholds;
/// let t = Thresholds::default();
/// assert_eq!(t.low_token_utilization_pct, 60.0);
/// assert_eq!(t.preemption_rate_pct, 10.0);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Thresholds {
    /// Mean token utilization below this (percent) fires [`Rule::LowTokenUtilization`]. Seed: 60.
    pub low_token_utilization_pct: f64,
    /// Mean sequence utilization below this (percent) adds "reduce `max_num_seqs`" to the low
    /// token utilization advice. Seed: "if sequence utilization is also low"; here 60.
    pub low_seq_utilization_pct: f64,
    /// Mean token utilization above this (percent) fires [`Rule::HighTokenUtilization`]. Seed: 95.
    pub high_token_utilization_pct: f64,
    /// The seed's "waiting queue consistently > 0": the share of batches (percent) scheduled
    /// while requests were waiting, above which [`Rule::WaitingQueueBacklog`] fires. 50.
    pub waiting_batches_pct: f64,
    /// Without `batch_utilization.csv` the share is unknown; the mean waiting queue length
    /// above this fires [`Rule::WaitingQueueBacklog`] instead. 1.
    pub mean_waiting_queue_len: f64,
    /// Preemption rate (percent of requests) above this fires [`Rule::HighPreemptionRate`].
    /// Seed: 10.
    pub preemption_rate_pct: f64,
    /// Mean resume delay (seconds) above this fires [`Rule::LongResumeDelay`]. Seed: 1.
    pub mean_resume_delay_sec: f64,
    /// Share of preemptions (percent) with reason `RECOMPUTE` above which it "dominates" and
    /// [`Rule::RecomputeDominates`] fires. 50.
    pub recompute_share_pct: f64,
    /// Host CPU share of step time (percent, CPU operations other than `model_execution` against
    /// forward time) above which [`Rule::HighCpuOverhead`] fires. 10.
    pub cpu_overhead_pct: f64,
    /// Decode p99 / p50 above this fires [`Rule::DecodeTailLatency`]. 2.
    pub decode_p99_over_p50: f64,
    /// Fewer decode passes than this and [`Rule::DecodeTailLatency`] stays silent: a p99 of a
    /// handful of passes is noise. 100.
    pub min_decode_passes: u64,
    /// Encoder share of component time (percent) above which [`Rule::EncoderBottleneck`] fires.
    /// 50.
    pub encoder_share_pct: f64,
    /// KV-cache usage (percent) at or above which the cache counts as "at or near full" when a
    /// preemption is matched to a KV sample. 95.
    pub kv_near_full_pct: f64,
    /// Share of preemptions (percent) that came while the KV cache was at or near full, above
    /// which [`Rule::PreemptionsAtFullKvCache`] fires. 50.
    pub kv_full_preemptions_pct: f64,
    /// CUDA graph replay rate (percent of steps) below which [`Rule::LowGraphReplayRate`]
    /// fires. 80.
    pub graph_replay_rate_pct: f64,
    /// Mean padding of a replayed batch (percent of the graph's size) above which
    /// [`Rule::GraphPaddingWaste`] fires. 20.
    pub graph_padding_pct: f64,
    /// A MoE layer's `max_over_mean` (busiest expert's tokens over the mean) above which
    /// [`Rule::MoeExpertImbalance`] fires. 1.5.
    pub moe_max_over_mean: f64,
    /// Prefix-cache hit rate (percent) below which [`Rule::LowPrefixCacheHitRate`] fires, when
    /// there were queries. 20.
    pub prefix_cache_hit_rate_pct: f64,
    /// Share of a phase's tail excess (percent) attributable to one condition above which
    /// [`Rule::SlowStepCause`] fires (see the slow-step section). 20.
    pub slow_step_attributable_pct: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            low_token_utilization_pct: 60.0,
            low_seq_utilization_pct: 60.0,
            high_token_utilization_pct: 95.0,
            waiting_batches_pct: 50.0,
            mean_waiting_queue_len: 1.0,
            preemption_rate_pct: 10.0,
            mean_resume_delay_sec: 1.0,
            recompute_share_pct: 50.0,
            cpu_overhead_pct: 10.0,
            decode_p99_over_p50: 2.0,
            min_decode_passes: 100,
            encoder_share_pct: 50.0,
            kv_near_full_pct: 95.0,
            kv_full_preemptions_pct: 50.0,
            graph_replay_rate_pct: 80.0,
            graph_padding_pct: 20.0,
            moe_max_over_mean: 1.5,
            prefix_cache_hit_rate_pct: 20.0,
            slow_step_attributable_pct: 20.0,
        }
    }
}

/// Which rule fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Rule {
    /// Batches use little of the token budget.
    LowTokenUtilization,
    /// Batches fill the token budget.
    HighTokenUtilization,
    /// Requests wait in most steps: the server is overloaded.
    WaitingQueueBacklog,
    /// Many requests are preempted.
    HighPreemptionRate,
    /// Preempted requests wait long before they resume.
    LongResumeDelay,
    /// Most preemptions free the KV cache for recomputation: KV-cache pressure.
    RecomputeDominates,
    /// Host CPU work is a large share of step time.
    HighCpuOverhead,
    /// Decode latency has a long tail.
    DecodeTailLatency,
    /// The encoder takes most of the component time.
    EncoderBottleneck,
    /// Batches were recorded with a zero limit, so utilization is unknown.
    MissingBatchLimits,
    /// The profiler dropped events, so every figure undercounts.
    EventsDropped,
    /// Preemptions came while the KV cache was full: KV-cache pressure confirmed.
    PreemptionsAtFullKvCache,
    /// Many steps ran without a CUDA graph.
    LowGraphReplayRate,
    /// Replayed batches were padded a lot to reach a captured graph size.
    GraphPaddingWaste,
    /// MoE layers route far more tokens to some experts than to others.
    MoeExpertImbalance,
    /// The prefix cache is queried but rarely hits.
    LowPrefixCacheHitRate,
    /// One condition explains much of a phase's slow steps.
    SlowStepCause,
}

impl Rule {
    /// The rule's name, as in JSON.
    pub const fn as_str(self) -> &'static str {
        match self {
            Rule::LowTokenUtilization => "low_token_utilization",
            Rule::HighTokenUtilization => "high_token_utilization",
            Rule::WaitingQueueBacklog => "waiting_queue_backlog",
            Rule::HighPreemptionRate => "high_preemption_rate",
            Rule::LongResumeDelay => "long_resume_delay",
            Rule::RecomputeDominates => "recompute_dominates",
            Rule::HighCpuOverhead => "high_cpu_overhead",
            Rule::DecodeTailLatency => "decode_tail_latency",
            Rule::EncoderBottleneck => "encoder_bottleneck",
            Rule::MissingBatchLimits => "missing_batch_limits",
            Rule::EventsDropped => "events_dropped",
            Rule::PreemptionsAtFullKvCache => "preemptions_at_full_kv_cache",
            Rule::LowGraphReplayRate => "low_graph_replay_rate",
            Rule::GraphPaddingWaste => "graph_padding_waste",
            Rule::MoeExpertImbalance => "moe_expert_imbalance",
            Rule::LowPrefixCacheHitRate => "low_prefix_cache_hit_rate",
            Rule::SlowStepCause => "slow_step_cause",
        }
    }
}

/// How much an insight matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Worth acting on.
    Warning,
    /// Worth knowing.
    Info,
}

/// How the figure compares with the threshold when the rule fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Comparison {
    /// The figure is above the threshold.
    #[serde(rename = ">")]
    Above,
    /// The figure is below the threshold.
    #[serde(rename = "<")]
    Below,
}

/// One fired rule: the figure that fired it, the threshold, and what to do.
///
/// ```
/// use profilemate_cli::{Report, Rule};
/// let dir = tempfile::tempdir()?;
/// std::fs::write(
///     dir.path().join("preemption_summary.json"),
///     r#"{"total_preemptions": 30, "total_requests": 100, "requests_preempted": 20,
///         "preemption_rate_pct": 30.0, "preemption_reasons": {"RECOMPUTE": 30},
///         "mean_running_time_before_preempt": 0.5, "mean_resume_delay": 0.2, "max_resume_delay": 0.9}"#,
/// )?;
/// let report = Report::from_dir(dir.path())?;
/// let rate = report.insights.iter().find(|i| i.rule == Rule::HighPreemptionRate).unwrap();
/// assert_eq!((rate.value, rate.threshold), (30.0, 10.0));
/// assert!(rate.to_string().contains("30.0% > 10.0%"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct Insight {
    /// Which rule fired.
    pub rule: Rule,
    /// How much it matters.
    pub severity: Severity,
    /// A short headline.
    pub title: String,
    /// What the figure is, in words.
    pub figure: String,
    /// The figure's value.
    pub value: f64,
    /// The figure's unit (`%`, `s`, `x`, or empty for a count).
    pub unit: &'static str,
    /// How the value compares with the threshold.
    pub comparison: Comparison,
    /// The threshold it crossed.
    pub threshold: f64,
    /// What to do about it, most useful first.
    pub advice: Vec<String>,
}

fn fmt_value(v: f64, unit: &str) -> String {
    match unit {
        "%" => format!("{v:.1}%"),
        "s" => format!("{v:.3} s"),
        "x" => format!("{v:.2}x"),
        _ => format!("{v}"),
    }
}

impl fmt::Display for Insight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Warning => "warning",
            Severity::Info => "info",
        };
        let cmp = match self.comparison {
            Comparison::Above => ">",
            Comparison::Below => "<",
        };
        write!(
            f,
            "[{sev}] {}: {} {} {cmp} {} ({})",
            self.title,
            self.figure,
            fmt_value(self.value, self.unit),
            fmt_value(self.threshold, self.unit),
            self.rule.as_str()
        )?;
        for a in &self.advice {
            write!(f, "\n      - {a}")?;
        }
        Ok(())
    }
}
