//! The combined breakdown of one run: the seed's five sections, the three trackers beyond them
//! (KV cache, CUDA graphs, MoE experts), the insights and the notes.

use crate::contract::*;
use crate::data::{CudaGraphRow, GraphEvent, KvCacheRow, LifecycleEvent, PreemptionEventRow, RunData};
pub use crate::note::{Note, NoteKind};
use crate::recompute;
use crate::rules::{Insight, Thresholds};
use serde::Serialize;
use std::fmt;

/// Share of forward time per phase, in percent.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[allow(missing_docs)]
pub struct PhaseShares {
    pub prefill: f64,
    pub decode: f64,
    pub mixed: f64,
}

/// Section 1: forward passes.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct ForwardPassSection {
    /// Where the numbers come from (a JSON file, or "recomputed from" a CSV file).
    pub source: String,
    /// Per-phase statistics, as in `forward_pass_summary.json`.
    pub phases: ForwardPassSummary,
    /// Forward passes of all phases.
    pub total_passes: u64,
    /// Tokens of all phases.
    pub total_tokens: u64,
    /// Forward time of all phases, `sum(count * mean_ms)` (milliseconds).
    pub total_forward_ms: f64,
    /// `total_tokens / total_forward_ms * 1000`: throughput while the GPU runs forward passes
    /// (0 when no time was recorded).
    pub overall_throughput_tokens_per_sec: f64,
    /// Share of forward time per phase (all 0 when no time was recorded).
    pub time_share_pct: PhaseShares,
}

/// Section 2: CPU operations.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct CpuSection {
    /// Where the numbers come from.
    pub source: String,
    /// Per-operation statistics, as in `cpu_timing_summary.json`.
    pub operations: CpuTimingSummary,
    /// The seed's `total_cpu = sum(count * mean_ms)` over every operation (milliseconds).
    pub total_cpu_ms: f64,
    /// The seed's `total_gpu`: forward time `sum(count * mean_ms)` over the phases, mixed
    /// included (the seed predates it); `None` without forward pass data.
    pub forward_ms: Option<f64>,
    /// The seed's "CPU overhead": `total_cpu / (total_cpu + total_gpu) * 100`.
    ///
    /// `model_execution` wraps the forward pass (with CUDA events it includes the sync), so this
    /// counts forward time on both sides; see [`CpuSection::host_overhead_share_pct`].
    pub cpu_share_pct: Option<f64>,
    /// CPU time of every operation except `model_execution` (milliseconds).
    pub host_overhead_ms: f64,
    /// `host_overhead_ms / (host_overhead_ms + forward_ms) * 100`: the share of step time the
    /// GPU waits on host work.
    pub host_overhead_share_pct: Option<f64>,
}

/// Section 3: model components.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct ComponentSection {
    /// Where the numbers come from.
    pub source: String,
    /// As in `encoder_decoder_summary.json`.
    pub summary: EncoderDecoderSummary,
}

/// Section 4: batch utilization.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct BatchSection {
    /// Where the numbers come from.
    pub source: String,
    /// As in `batch_utilization_summary.json`.
    pub summary: BatchUtilizationSummary,
    /// `underutilization_events / total_samples * 100` (0 without samples).
    pub underutilization_share_pct: f64,
    /// Longest running queue (needs `batch_utilization.csv`).
    pub max_running_queue_len: Option<u64>,
    /// Share of batches scheduled while requests were waiting (needs `batch_utilization.csv`).
    pub waiting_batches_pct: Option<f64>,
}

/// Section 5: preemptions.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct PreemptionSection {
    /// Where the numbers come from.
    pub source: String,
    /// As in `preemption_summary.json`.
    pub summary: PreemptionSummary,
    /// `requests_preempted / total_requests * 100` (0 without requests).
    pub requests_preempted_pct: f64,
}

/// How preemptions line up with KV-cache usage: each preemption of `preemption_events.csv` is
/// matched to a sample of `kv_cache_usage.csv`.
///
/// The sample matched is the nearest one taken before the preemption: the cache as the
/// scheduler found it in the step that ran out of blocks. A preemption before the first sample
/// takes the first one. The nearest sample after a preemption (or at the same timestamp) is not
/// used: an engine samples the cache once scheduling is done, when the victim's blocks are
/// already freed and handed to others, so it reads lower than the cache was when it ran out.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct KvPreemptionMatch {
    /// Usage (percent) at or above which the cache counts as "at or near full".
    pub near_full_pct: f64,
    /// Preemptions matched to a sample (every preemption, when the cache was sampled).
    pub preemptions: u64,
    /// Preemptions whose sample was at or above `near_full_pct`.
    pub at_near_full: u64,
    /// `at_near_full / preemptions * 100` (0 without preemptions).
    pub at_near_full_pct: f64,
    /// Preemptions whose sample was at 100 %.
    pub at_full: u64,
    /// Mean usage of the matched samples (percent; 0 without preemptions).
    pub mean_usage_pct: f64,
}

/// Section 6: the KV cache.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct KvCacheSection {
    /// Where the numbers come from.
    pub source: String,
    /// As in `kv_cache_summary.json`.
    pub summary: KvCacheSummary,
    /// Samples at 100 % usage: the summary's `full_samples`, else counted in
    /// `kv_cache_usage.csv`; `None` when neither says.
    pub full_samples: Option<u64>,
    /// `full_samples / samples * 100`.
    pub full_samples_pct: Option<f64>,
    /// Prefix-cache lookups over the run, where known.
    pub prefix_cache_queries: Option<u64>,
    /// Prefix-cache hits over the run, where known.
    pub prefix_cache_hits: Option<u64>,
    /// Preemptions against KV usage (needs `kv_cache_usage.csv` and `preemption_events.csv`).
    pub preemptions: Option<KvPreemptionMatch>,
}

/// The graph size whose replays padded the most batch slots.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct PaddedGraph {
    /// The captured size the batches were padded to.
    pub graph_size: u64,
    /// Replays of that graph.
    pub replays: u64,
    /// Padded (wasted) slots in all: `sum(graph_size - batch_size)`.
    pub padded_slots: u64,
    /// `padded_slots / (replays * graph_size) * 100`.
    pub padding_pct: f64,
}

/// Section 7: CUDA graphs.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct CudaGraphSection {
    /// Where the numbers come from.
    pub source: String,
    /// As in `cuda_graph_summary.json`.
    pub summary: CudaGraphSummary,
    /// Steps: replays and eager steps.
    pub steps: u64,
    /// Batch sizes captured, ascending (from the summary, else from the captures in the CSV).
    pub captured_sizes: Option<Vec<u64>>,
    /// The largest of them.
    pub largest_captured_size: Option<u64>,
    /// The largest batch that ran eagerly.
    pub max_eager_batch_size: Option<u64>,
    /// Eager steps whose batch is larger than every captured graph (needs the CSV).
    pub eager_beyond_largest_graph: Option<u64>,
    /// Eager steps whose batch a captured graph would cover (needs the CSV).
    pub eager_within_graphs: Option<u64>,
    /// The graph whose replays padded the most slots (needs the CSV).
    pub most_padded_graph: Option<PaddedGraph>,
}

/// One MoE layer in section 8.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct MoeLayerSection {
    /// The layer, as the summary keys it (its index).
    pub layer: String,
    /// Experts in the layer.
    pub experts: usize,
    /// Tokens routed in all (a token routed to k experts counts k times).
    pub total_tokens: u64,
    /// The busiest expert's tokens over the mean per expert: 1 is perfectly even.
    pub max_over_mean: f64,
    /// Population standard deviation over mean of tokens per expert: 0 is perfectly even.
    pub coefficient_of_variation: f64,
    /// The busiest expert (the lowest id on a tie).
    pub hottest_expert: u64,
    /// Its share of the layer's tokens (percent).
    pub hottest_share_pct: f64,
    /// The least used expert.
    pub coldest_expert: u64,
    /// Its share of the layer's tokens (percent).
    pub coldest_share_pct: f64,
}

/// Section 8: MoE experts.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct MoeSection {
    /// Where the numbers come from.
    pub source: String,
    /// Every layer, in layer order.
    pub layers: Vec<MoeLayerSection>,
    /// Layers by `max_over_mean`, most imbalanced first (as the summary lists them).
    pub most_imbalanced_layers: Vec<u64>,
    /// The highest `max_over_mean` of any layer (0 without routing).
    pub max_over_mean: f64,
    /// Mean of the layers' `max_over_mean`.
    pub mean_max_over_mean: f64,
}

impl MoeSection {
    /// The layers whose `max_over_mean` is above `threshold`, most imbalanced first.
    pub fn layers_above(&self, threshold: f64) -> Vec<&MoeLayerSection> {
        let mut out: Vec<&MoeLayerSection> = self.layers.iter().filter(|l| l.max_over_mean > threshold).collect();
        out.sort_by(|a, b| b.max_over_mean.total_cmp(&a.max_over_mean).then(layer_order(&a.layer, &b.layer)));
        out
    }
}

/// Layer keys in numeric order where they are numbers.
fn layer_order(a: &str, b: &str) -> std::cmp::Ordering {
    match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(x), Ok(y)) => x.cmp(&y),
        (Ok(_), Err(_)) => std::cmp::Ordering::Less,
        (Err(_), Ok(_)) => std::cmp::Ordering::Greater,
        _ => a.cmp(b),
    }
}

/// The combined breakdown of one run directory: what the seed's "Combined Analysis" prints,
/// with every phase and percentile, then the insights.
///
/// Summaries come from the JSON files; a section whose JSON file is missing is recomputed from
/// its CSV file; a section with neither is `None` and a [`Note`] says it was skipped.
/// `Display` prints the text report, `Serialize` the same report for machines.
///
/// ```
/// use profilemate_cli::Report;
/// let dir = tempfile::tempdir()?;
/// std::fs::write(
///     dir.path().join("forward_pass_timing.csv"),
///     "timestamp_sec,phase,batch_size,num_tokens,forward_time_ms,throughput_tokens_per_sec\n\
///      0.000000,prefill,1,256,40.000,6400.000\n\
///      0.050000,decode,32,32,8.000,4000.000\n",
/// )?;
/// let report = Report::from_dir(dir.path())?;
/// let fp = report.forward_pass.as_ref().unwrap();
/// assert_eq!(fp.total_tokens, 288);
/// assert_eq!(fp.source, "recomputed from forward_pass_timing.csv");
/// assert!(report.to_string().contains("1. Forward Pass Timing"));
/// let json = serde_json::to_value(&report)?;
/// assert_eq!(json["forward_pass"]["phases"]["decode"]["count"], 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct Report {
    /// The directory the report is about.
    pub dir: String,
    /// What the run manifest says, when there is one.
    pub run: Option<RunInfo>,
    /// Section 1.
    pub forward_pass: Option<ForwardPassSection>,
    /// Section 2.
    pub cpu: Option<CpuSection>,
    /// Section 3.
    pub components: Option<ComponentSection>,
    /// Section 4.
    pub batch: Option<BatchSection>,
    /// Section 5.
    pub preemption: Option<PreemptionSection>,
    /// Section 6.
    pub kv_cache: Option<KvCacheSection>,
    /// Section 7.
    pub cuda_graph: Option<CudaGraphSection>,
    /// Section 8.
    pub moe_expert: Option<MoeSection>,
    /// The opening tree: each phase's step time split by where it went (`step_timeline.csv`).
    pub step_breakdown: Option<crate::breakdown::Breakdown>,
    /// Section 9: the tail of each phase and the conditions it shares (`step_timeline.csv`).
    pub slow_steps: Option<crate::slow_steps::SlowSteps>,
    /// The rules that fired.
    pub insights: Vec<Insight>,
    /// The thresholds the rules used.
    pub thresholds: Thresholds,
    /// What was skipped, and what was read with a caveat.
    pub notes: Vec<Note>,
}

fn pct(part: f64, whole: f64) -> f64 {
    if whole > 0.0 {
        part / whole * 100.0
    } else {
        0.0
    }
}

fn json_source(file: &str) -> String {
    file.to_string()
}

fn csv_source(file: &str) -> String {
    format!("recomputed from {file}")
}

impl Report {
    /// The report's sections from `data`, with no insight yet (the `analysis` module adds them).
    pub(crate) fn sections(data: &RunData, thresholds: &Thresholds) -> Report {
        let mut notes = data.notes.clone();
        if data.run.as_ref().and_then(|r| r.finished) == Some(false) {
            notes.push(Note::warning(
                "the run did not shut down cleanly (profilemate_run.json says finished: false): \
                 the last second of rows may be missing and summaries may lag the CSV files",
            ));
        }

        let forward_pass = {
            let summary = match (&data.forward_pass_summary, &data.forward_pass) {
                (Some(s), rows) => {
                    if let Some(rows) = rows {
                        let n = s.prefill.count + s.decode.count + s.mixed.count;
                        stale_note(&mut notes, FORWARD_PASS_JSON, n, FORWARD_PASS_CSV, rows.len());
                    }
                    Some((s.clone(), json_source(FORWARD_PASS_JSON)))
                }
                (None, Some(rows)) => Some((recompute::forward_pass(rows), csv_source(FORWARD_PASS_CSV))),
                (None, None) => {
                    notes.push(Note::skipped(format!("no {FORWARD_PASS_JSON} or {FORWARD_PASS_CSV}")));
                    None
                }
            };
            summary.map(|(phases, source)| forward_section(phases, source))
        };

        let cpu = {
            let summary = match (&data.cpu_summary, &data.cpu_operations) {
                (Some(s), _) => Some((s.clone(), json_source(CPU_JSON))),
                (None, Some(rows)) => Some((recompute::cpu_timing(rows), csv_source(CPU_CSV))),
                (None, None) => {
                    notes.push(Note::skipped(format!("no {CPU_JSON} or {CPU_CSV}")));
                    None
                }
            };
            summary.map(|(operations, source)| {
                let total_cpu_ms: f64 = operations.values().map(|o| o.count as f64 * o.mean_ms).sum();
                let host_overhead_ms: f64 = operations
                    .iter()
                    .filter(|(op, _)| op.as_str() != "model_execution")
                    .map(|(_, o)| o.count as f64 * o.mean_ms)
                    .sum();
                let forward_ms = forward_pass.as_ref().map(|f| f.total_forward_ms);
                let share = |cpu: f64| forward_ms.filter(|&f| cpu + f > 0.0).map(|f| pct(cpu, cpu + f));
                CpuSection {
                    source,
                    cpu_share_pct: share(total_cpu_ms),
                    host_overhead_share_pct: share(host_overhead_ms),
                    operations,
                    total_cpu_ms,
                    forward_ms,
                    host_overhead_ms,
                }
            })
        };

        let components = match (&data.encoder_decoder_summary, &data.components) {
            (Some(s), _) => Some(ComponentSection { source: json_source(ENCODER_DECODER_JSON), summary: s.clone() }),
            (None, Some(rows)) => Some(ComponentSection {
                source: csv_source(ENCODER_DECODER_CSV),
                summary: recompute::encoder_decoder(rows),
            }),
            (None, None) => {
                notes.push(Note::skipped(format!("no {ENCODER_DECODER_JSON} or {ENCODER_DECODER_CSV}")));
                None
            }
        };

        let batch = {
            let summary = match (&data.batch_summary, &data.batch) {
                (Some(s), rows) => {
                    if let Some(rows) = rows {
                        stale_note(&mut notes, BATCH_JSON, s.total_samples, BATCH_CSV, rows.len());
                    }
                    Some((s.clone(), json_source(BATCH_JSON)))
                }
                (None, Some(rows)) => {
                    let threshold = data.run.as_ref().and_then(|r| r.underutilization_threshold_pct).unwrap_or(50.0);
                    Some((recompute::batch_utilization(rows, threshold), csv_source(BATCH_CSV)))
                }
                (None, None) => {
                    notes.push(Note::skipped(format!("no {BATCH_JSON} or {BATCH_CSV}")));
                    None
                }
            };
            summary.map(|(summary, source)| {
                let rows = data.batch.as_deref();
                BatchSection {
                    source,
                    underutilization_share_pct: pct(
                        summary.underutilization_events as f64,
                        summary.total_samples as f64,
                    ),
                    max_running_queue_len: rows.map(|r| r.iter().map(|b| b.running_queue_len).max().unwrap_or(0)),
                    waiting_batches_pct: rows
                        .filter(|r| !r.is_empty())
                        .map(|r| pct(r.iter().filter(|b| b.waiting_queue_len > 0).count() as f64, r.len() as f64)),
                    summary,
                }
            })
        };

        let preemption = {
            let summary = match (&data.preemption_summary, &data.preemption_events) {
                (Some(s), _) => Some((s.clone(), json_source(PREEMPTION_JSON))),
                (None, Some(rows)) => Some((recompute::preemption(rows), csv_source(PREEMPTION_EVENTS_CSV))),
                (None, None) => {
                    let hint = if data.request_lifecycle.is_some() {
                        format!(" ({LIFECYCLE_CSV} alone holds no reasons or per-preemption delays)")
                    } else {
                        String::new()
                    };
                    notes.push(Note::skipped(format!("no {PREEMPTION_JSON} or {PREEMPTION_EVENTS_CSV}{hint}")));
                    None
                }
            };
            summary.map(|(summary, source)| PreemptionSection {
                source,
                requests_preempted_pct: pct(summary.requests_preempted as f64, summary.total_requests as f64),
                summary,
            })
        };

        let kv_cache = kv_cache_section(data, thresholds, &mut notes);
        let cuda_graph = cuda_graph_section(data, &mut notes);
        let moe_expert = moe_section(data, &mut notes);
        let timeline = data.step_timeline.as_ref().filter(|rows| !rows.is_empty());
        if timeline.is_none() {
            notes.push(Note::skipped(format!(
                "no {} (or no step in it): no step breakdown and no slow-step section",
                crate::timeline::STEP_TIMELINE_CSV
            )));
        }
        let step_breakdown = timeline.map(|rows| crate::breakdown::Breakdown::of(rows));
        let slow_steps = timeline.map(|rows| crate::slow_steps::SlowSteps::of(rows));

        let report = Report {
            dir: data.dir.display().to_string(),
            run: data.run.clone(),
            forward_pass,
            cpu,
            components,
            batch,
            preemption,
            kv_cache,
            cuda_graph,
            moe_expert,
            step_breakdown,
            slow_steps,
            insights: Vec::new(),
            thresholds: thresholds.clone(),
            notes,
        };
        report
    }
}

fn kv_cache_section(data: &RunData, thresholds: &Thresholds, notes: &mut Vec<Note>) -> Option<KvCacheSection> {
    let (summary, source) = match (&data.kv_cache_summary, &data.kv_cache) {
        (Some(s), rows) => {
            if let Some(rows) = rows {
                stale_note(notes, KV_CACHE_JSON, s.samples, KV_CACHE_CSV, rows.len());
            }
            (s.clone(), json_source(KV_CACHE_JSON))
        }
        (None, Some(rows)) => (recompute::kv_cache(rows), csv_source(KV_CACHE_CSV)),
        (None, None) => {
            notes.push(Note::skipped(format!("no {KV_CACHE_JSON} or {KV_CACHE_CSV}")));
            return None;
        }
    };
    let from_csv = data.kv_cache.as_deref().map(recompute::kv_cache);
    // The summary's own counts where it has them (it is the newer file at a clean shutdown),
    // else the CSV's.
    let full_samples = summary.full_samples.or(from_csv.as_ref().and_then(|c| c.full_samples));
    let prefix_cache_queries = summary.prefix_cache_queries.or(from_csv.as_ref().and_then(|c| c.prefix_cache_queries));
    let prefix_cache_hits = summary.prefix_cache_hits.or(from_csv.as_ref().and_then(|c| c.prefix_cache_hits));
    let preemptions = match (&data.kv_cache, &data.preemption_events) {
        (Some(kv), Some(events)) => match_preemptions(kv, events, thresholds.kv_near_full_pct),
        _ => None,
    };
    Some(KvCacheSection {
        source,
        full_samples_pct: full_samples.map(|f| pct(f as f64, summary.samples as f64)),
        full_samples,
        prefix_cache_queries,
        prefix_cache_hits,
        preemptions,
        summary,
    })
}

/// Matches each preemption to the KV sample at or before it; `None` when the cache has no
/// usable sample.
fn match_preemptions(
    kv: &[KvCacheRow],
    events: &[PreemptionEventRow],
    near_full_pct: f64,
) -> Option<KvPreemptionMatch> {
    let samples = kv_usage_samples(kv);
    if samples.is_empty() {
        return None;
    }
    let (mut preemptions, mut near, mut full, mut usage_sum) = (0u64, 0u64, 0u64, 0.0f64);
    for e in events.iter().filter(|e| e.event == LifecycleEvent::Preempted) {
        let usage = usage_before(&samples, e.timestamp_sec);
        preemptions += 1;
        usage_sum += usage;
        if usage >= near_full_pct {
            near += 1;
        }
        if usage >= 100.0 {
            full += 1;
        }
    }
    Some(KvPreemptionMatch {
        near_full_pct,
        preemptions,
        at_near_full: near,
        at_near_full_pct: pct(near as f64, preemptions as f64),
        at_full: full,
        mean_usage_pct: if preemptions == 0 { 0.0 } else { usage_sum / preemptions as f64 },
    })
}

/// `(timestamp_sec, usage_pct)` of every KV sample with a usage, in time order.
pub(crate) fn kv_usage_samples(kv: &[KvCacheRow]) -> Vec<(f64, f64)> {
    let mut samples: Vec<(f64, f64)> = kv.iter().filter_map(|r| r.usage().map(|u| (r.timestamp_sec, u))).collect();
    // Files are written in time order, but a merged or hand-made file need not be.
    samples.sort_by(|a, b| a.0.total_cmp(&b.0));
    samples
}

/// The usage of the last sample taken before `t` (the first sample when none is); `samples`
/// is not empty and in time order.
pub(crate) fn usage_before(samples: &[(f64, f64)], t: f64) -> f64 {
    // A sample with the preemption's own timestamp was taken after it: an engine preempts while
    // it schedules and samples the cache once scheduling is done.
    let at_or_after = samples.partition_point(|s| s.0 < t);
    samples[at_or_after.saturating_sub(1)].1
}

fn cuda_graph_section(data: &RunData, notes: &mut Vec<Note>) -> Option<CudaGraphSection> {
    let (summary, source) = match (&data.cuda_graph_summary, &data.cuda_graph) {
        (Some(s), rows) => {
            if let Some(rows) = rows {
                stale_note(notes, CUDA_GRAPH_JSON, s.captures + s.replays + s.eager_steps, CUDA_GRAPH_CSV, rows.len());
            }
            (s.clone(), json_source(CUDA_GRAPH_JSON))
        }
        (None, Some(rows)) => (recompute::cuda_graph(rows), csv_source(CUDA_GRAPH_CSV)),
        (None, None) => {
            notes.push(Note::skipped(format!("no {CUDA_GRAPH_JSON} or {CUDA_GRAPH_CSV}")));
            return None;
        }
    };
    let rows = data.cuda_graph.as_deref();
    let from_csv = rows.map(recompute::cuda_graph);
    let captured_sizes = summary
        .captured_sizes
        .clone()
        .or_else(|| from_csv.as_ref().and_then(|c| c.captured_sizes.clone()))
        .filter(|s| !s.is_empty() || summary.captures == 0);
    let largest = captured_sizes.as_ref().and_then(|s| s.iter().copied().max());
    let max_eager = summary.max_eager_batch_size.or(from_csv.as_ref().and_then(|c| c.max_eager_batch_size));
    let eager_rows = || rows.into_iter().flatten().filter(|r| r.event == GraphEvent::Eager);
    let (beyond, within) = match (rows, largest) {
        (Some(_), Some(largest)) => {
            let beyond = eager_rows().filter(|r| r.batch_size > largest).count() as u64;
            (Some(beyond), Some(eager_rows().count() as u64 - beyond))
        }
        // No graph at all: no batch fits one.
        (Some(_), None) if summary.captures == 0 => (Some(eager_rows().count() as u64), Some(0)),
        _ => (None, None),
    };
    Some(CudaGraphSection {
        source,
        steps: summary.replays + summary.eager_steps,
        captured_sizes,
        largest_captured_size: largest,
        max_eager_batch_size: max_eager,
        eager_beyond_largest_graph: beyond,
        eager_within_graphs: within,
        most_padded_graph: rows.and_then(most_padded_graph),
        summary,
    })
}

fn most_padded_graph(rows: &[CudaGraphRow]) -> Option<PaddedGraph> {
    let mut per_size: std::collections::BTreeMap<u64, (u64, u64)> = std::collections::BTreeMap::new();
    for r in rows.iter().filter(|r| r.event == GraphEvent::Replay) {
        if let Some(p) = r.padded_batch_size.filter(|p| *p > 0) {
            let e = per_size.entry(p).or_default();
            e.0 += 1;
            e.1 += p.saturating_sub(r.batch_size);
        }
    }
    per_size
        .into_iter()
        .filter(|(_, (_, padded))| *padded > 0)
        .max_by(|a, b| a.1 .1.cmp(&b.1 .1).then(b.0.cmp(&a.0)))
        .map(|(size, (replays, padded))| PaddedGraph {
            graph_size: size,
            replays,
            padded_slots: padded,
            padding_pct: pct(padded as f64, (replays * size) as f64),
        })
}

fn moe_section(data: &RunData, notes: &mut Vec<Note>) -> Option<MoeSection> {
    let (summary, source) = match (&data.moe_expert_summary, &data.moe_routing) {
        (Some(s), _) => (s.clone(), json_source(MOE_JSON)),
        (None, Some(rows)) => (recompute::moe_expert(rows), csv_source(MOE_CSV)),
        (None, None) => {
            notes.push(Note::skipped(format!("no {MOE_JSON} or {MOE_CSV}")));
            return None;
        }
    };
    let mut layers: Vec<MoeLayerSection> = summary
        .layers
        .iter()
        .map(|(layer, s)| {
            let tokens = &s.tokens_per_expert;
            let total: u64 = tokens.iter().sum();
            let hottest = tokens.iter().enumerate().max_by_key(|(i, t)| (**t, std::cmp::Reverse(*i)));
            let coldest = tokens.iter().enumerate().min_by_key(|(i, t)| (**t, *i));
            let share = |t: Option<(usize, &u64)>| t.map_or(0.0, |(_, t)| pct(*t as f64, total as f64));
            MoeLayerSection {
                layer: layer.clone(),
                experts: tokens.len(),
                total_tokens: total,
                max_over_mean: s.max_over_mean,
                coefficient_of_variation: s.coefficient_of_variation,
                hottest_expert: hottest.map_or(0, |(i, _)| i as u64),
                hottest_share_pct: share(hottest),
                coldest_expert: coldest.map_or(0, |(i, _)| i as u64),
                coldest_share_pct: share(coldest),
            }
        })
        .collect();
    layers.sort_by(|a, b| layer_order(&a.layer, &b.layer));
    let max_over_mean =
        summary.max_over_mean.unwrap_or_else(|| layers.iter().map(|l| l.max_over_mean).fold(0.0, f64::max));
    let mean_max_over_mean = summary.mean_max_over_mean.unwrap_or_else(|| {
        if layers.is_empty() {
            0.0
        } else {
            layers.iter().map(|l| l.max_over_mean).sum::<f64>() / layers.len() as f64
        }
    });
    Some(MoeSection {
        source,
        layers,
        most_imbalanced_layers: summary.most_imbalanced_layers,
        max_over_mean,
        mean_max_over_mean,
    })
}

fn stale_note(notes: &mut Vec<Note>, json: &str, json_count: u64, csv: &str, csv_rows: usize) {
    if json_count != csv_rows as u64 {
        notes.push(Note::warning(format!(
            "{json} counts {json_count} rows but {csv} has {csv_rows}: summaries are rewritten every log \
             interval, so the file written last is ahead; figures here are from {json}"
        )));
    }
}

fn forward_section(phases: ForwardPassSummary, source: String) -> ForwardPassSection {
    let all = [&phases.prefill, &phases.decode, &phases.mixed];
    let time = |p: &PhaseStats| p.count as f64 * p.mean_ms;
    let total_forward_ms: f64 = all.iter().map(|p| time(p)).sum();
    let total_tokens = all.iter().map(|p| p.total_tokens).sum();
    ForwardPassSection {
        total_passes: all.iter().map(|p| p.count).sum(),
        total_tokens,
        overall_throughput_tokens_per_sec: if total_forward_ms > 0.0 {
            total_tokens as f64 / total_forward_ms * 1000.0
        } else {
            0.0
        },
        time_share_pct: PhaseShares {
            prefill: pct(time(&phases.prefill), total_forward_ms),
            decode: pct(time(&phases.decode), total_forward_ms),
            mixed: pct(time(&phases.mixed), total_forward_ms),
        },
        total_forward_ms,
        source,
        phases,
    }
}

/// `-` for the numbers of an empty group, so a count of 0 does not read as a time of 0.
fn ms(count: u64, v: f64) -> String {
    if count == 0 {
        "-".into()
    } else {
        format!("{v:.3}")
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "=== COMPLETE PERFORMANCE BREAKDOWN: {} ===", self.dir)?;
        if let Some(run) = &self.run {
            let mut parts = Vec::new();
            if let Some(v) = &run.profilemate_version {
                parts.push(format!("profilemate {v}"));
            }
            if let Some(v) = &run.started_at {
                parts.push(format!("started {v}"));
            }
            if let Some(v) = &run.host {
                parts.push(format!("host {v}"));
            }
            if let Some(v) = run.pid {
                parts.push(format!("pid {v}"));
            }
            if let Some(v) = &run.timing_backend {
                parts.push(format!("{v} timing"));
            }
            if let Some(v) = run.steps {
                parts.push(format!("{v} steps"));
            }
            match run.finished {
                Some(true) => parts.push("finished cleanly".into()),
                Some(false) => parts.push("NOT finished".into()),
                None => {}
            }
            if let Some(v) = run.events_dropped {
                parts.push(format!("{v} events dropped"));
            }
            writeln!(f, "run: {}", parts.join(", "))?;
        }

        if let Some(b) = &self.step_breakdown {
            writeln!(f, "\nStep breakdown (step_timeline.csv; shares of the summed step time)")?;
            write!(f, "{b}")?;
        }

        writeln!(f, "\n1. Forward Pass Timing")?;
        match &self.forward_pass {
            None => writeln!(f, "   (no data)")?,
            Some(fp) => {
                writeln!(f, "   source: {}", fp.source)?;
                writeln!(
                    f,
                    "   {:<8} {:>8} {:>10} {:>10} {:>10} {:>10} {:>12} {:>10} {:>12}",
                    "phase", "count", "mean ms", "p50 ms", "p95 ms", "p99 ms", "total ms", "tokens", "mean tok/s"
                )?;
                for (name, p) in
                    [("prefill", &fp.phases.prefill), ("decode", &fp.phases.decode), ("mixed", &fp.phases.mixed)]
                {
                    writeln!(
                        f,
                        "   {:<8} {:>8} {:>10} {:>10} {:>10} {:>10} {:>12} {:>10} {:>12}",
                        name,
                        p.count,
                        ms(p.count, p.mean_ms),
                        ms(p.count, p.p50_ms),
                        ms(p.count, p.p95_ms),
                        ms(p.count, p.p99_ms),
                        ms(p.count, p.total_ms),
                        p.total_tokens,
                        if p.count == 0 { "-".into() } else { format!("{:.1}", p.mean_throughput_tokens_per_sec) },
                    )?;
                }
                writeln!(
                    f,
                    "   all: {} passes, {} tokens in {:.3} ms of forward time = {:.1} tokens/s",
                    fp.total_passes, fp.total_tokens, fp.total_forward_ms, fp.overall_throughput_tokens_per_sec
                )?;
                let s = &fp.time_share_pct;
                writeln!(
                    f,
                    "   time share: prefill {:.1}%, decode {:.1}%, mixed {:.1}%",
                    s.prefill, s.decode, s.mixed
                )?;
            }
        }

        writeln!(f, "\n2. CPU Operations")?;
        match &self.cpu {
            None => writeln!(f, "   (no data)")?,
            Some(c) => {
                writeln!(f, "   source: {}", c.source)?;
                writeln!(
                    f,
                    "   {:<24} {:>8} {:>10} {:>10} {:>12}",
                    "operation", "count", "mean ms", "p95 ms", "total ms"
                )?;
                let mut ops: Vec<_> = c.operations.iter().collect();
                ops.sort_by(|a, b| b.1.total_ms.total_cmp(&a.1.total_ms).then(a.0.cmp(b.0)));
                for (op, s) in ops {
                    writeln!(
                        f,
                        "   {:<24} {:>8} {:>10} {:>10} {:>12}",
                        op,
                        s.count,
                        ms(s.count, s.mean_ms),
                        ms(s.count, s.p95_ms),
                        ms(s.count, s.total_ms)
                    )?;
                }
                match (c.forward_ms, c.cpu_share_pct) {
                    (Some(fwd), Some(share)) => {
                        writeln!(
                            f,
                            "   CPU overhead (seed: cpu / (cpu + forward)): {:.3} ms CPU vs {:.3} ms forward = {:.1}%",
                            c.total_cpu_ms, fwd, share
                        )?;
                        if let Some(h) = c.host_overhead_share_pct {
                            writeln!(
                                f,
                                "   without model_execution (it wraps the forward pass): {:.3} ms = {:.1}%",
                                c.host_overhead_ms, h
                            )?;
                        }
                    }
                    _ => writeln!(
                        f,
                        "   CPU total {:.3} ms (no forward pass data: share of step time unknown)",
                        c.total_cpu_ms
                    )?,
                }
            }
        }

        writeln!(f, "\n3. Model Components")?;
        match &self.components {
            None => writeln!(f, "   (no data)")?,
            Some(c) => {
                let s = &c.summary;
                writeln!(f, "   source: {}", c.source)?;
                writeln!(f, "   model type: {}", s.model_type)?;
                let line = |f: &mut fmt::Formatter<'_>, name: &str, pct: f64, g: &ComponentStats| {
                    writeln!(
                        f,
                        "   {:<16} {:>6.1}%  {:>8} calls, mean {} ms, p95 {} ms, total {} ms",
                        name,
                        pct,
                        g.count,
                        ms(g.count, g.mean_ms),
                        ms(g.count, g.p95_ms),
                        ms(g.count, g.total_ms)
                    )
                };
                if s.model_type == "encoder_decoder" {
                    line(f, "encoder", s.encoder_pct, &s.encoder)?;
                    line(f, "decoder", s.decoder_pct, &s.decoder)?;
                    if s.cross_attention.count > 0 {
                        line(f, "cross_attention", s.cross_attention_pct, &s.cross_attention)?;
                    }
                } else if s.decoder.count == 0 && s.encoder.count == 0 && s.cross_attention.count == 0 {
                    writeln!(f, "   Decoder-only: no component time recorded")?;
                } else {
                    writeln!(f, "   Decoder-only: {:.1}% decoder", s.decoder_pct)?;
                    line(f, "decoder", s.decoder_pct, &s.decoder)?;
                }
            }
        }

        writeln!(f, "\n4. Batch Utilization")?;
        match &self.batch {
            None => writeln!(f, "   (no data)")?,
            Some(b) => {
                let s = &b.summary;
                writeln!(f, "   source: {}", b.source)?;
                writeln!(
                    f,
                    "   {} samples; limits at the last sample: max_num_seqs {}, max_tokens {}",
                    s.total_samples, s.max_num_seqs, s.max_tokens
                )?;
                writeln!(f, "   Mean sequence utilization: {:.1}%", s.mean_seq_utilization_pct)?;
                writeln!(f, "   Mean token utilization: {:.1}%", s.mean_token_utilization_pct)?;
                writeln!(
                    f,
                    "   Underutilization events (token utilization < {:.0}%): {} ({:.1}% of samples)",
                    s.underutilization_threshold_pct, s.underutilization_events, b.underutilization_share_pct
                )?;
                writeln!(
                    f,
                    "   Token utilization per phase: prefill {:.1}%, decode {:.1}%, mixed {:.1}%",
                    s.prefill_avg_utilization, s.decode_avg_utilization, s.mixed_avg_utilization
                )?;
                let max_running = b.max_running_queue_len.map_or_else(|| "-".into(), |m| m.to_string());
                writeln!(
                    f,
                    "   Queues: running mean {:.1} (max {}), waiting mean {:.1} (max {})",
                    s.mean_running_queue_len, max_running, s.mean_waiting_queue_len, s.max_waiting_queue_len
                )?;
                if let Some(w) = b.waiting_batches_pct {
                    writeln!(f, "   Batches scheduled while requests waited: {w:.1}%")?;
                }
            }
        }

        writeln!(f, "\n5. Preemptions")?;
        match &self.preemption {
            None => writeln!(f, "   (no data)")?,
            Some(p) => {
                let s = &p.summary;
                writeln!(f, "   source: {}", p.source)?;
                writeln!(f, "   Total preemptions: {} over {} requests", s.total_preemptions, s.total_requests)?;
                writeln!(f, "   Preemption rate: {:.1}%", s.preemption_rate_pct)?;
                writeln!(f, "   Requests preempted: {} ({:.1}%)", s.requests_preempted, p.requests_preempted_pct)?;
                if s.preemption_reasons.is_empty() {
                    writeln!(f, "   Preemption reasons: none")?;
                } else {
                    writeln!(f, "   Preemption reasons:")?;
                    let mut reasons: Vec<_> = s.preemption_reasons.iter().collect();
                    reasons.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
                    let total: u64 = reasons.iter().map(|r| *r.1).sum();
                    for (reason, n) in reasons {
                        writeln!(f, "     {reason}: {n} ({:.1}%)", pct(*n as f64, total as f64))?;
                    }
                }
                if s.total_preemptions > 0 {
                    writeln!(f, "   Mean running time before preemption: {:.3} s", s.mean_running_time_before_preempt)?;
                    writeln!(f, "   Resume delay: mean {:.3} s, max {:.3} s", s.mean_resume_delay, s.max_resume_delay)?;
                }
            }
        }

        writeln!(f, "\n6. KV Cache")?;
        match &self.kv_cache {
            None => writeln!(f, "   (no data)")?,
            Some(k) => {
                let s = &k.summary;
                writeln!(f, "   source: {}", k.source)?;
                let blocks = s.total_blocks.map_or_else(String::new, |b| format!(" of a {b}-block cache"));
                writeln!(f, "   {} samples{blocks}", s.samples)?;
                writeln!(f, "   Usage: mean {:.1}%, max {:.1}%", s.mean_usage_pct, s.max_usage_pct)?;
                match (k.full_samples, k.full_samples_pct) {
                    (Some(n), Some(p)) => writeln!(f, "   Samples at 100%: {n} ({p:.1}%)")?,
                    _ => writeln!(f, "   Samples at 100%: unknown (no kv_cache_usage.csv or full_samples)")?,
                }
                match k.prefix_cache_queries {
                    Some(0) => writeln!(f, "   Prefix cache: no queries (off, or no engine report)")?,
                    Some(q) => writeln!(
                        f,
                        "   Prefix cache: {} hits of {q} queries = hit rate {:.1}%",
                        k.prefix_cache_hits.map_or_else(|| "?".into(), |h| h.to_string()),
                        s.prefix_cache_hit_rate_pct
                    )?,
                    None => writeln!(f, "   Prefix cache: hit rate {:.1}%", s.prefix_cache_hit_rate_pct)?,
                }
                match &k.preemptions {
                    Some(m) => writeln!(
                        f,
                        "   Preemptions at KV usage >= {:.0}% (nearest sample before each): {} of {} ({:.1}%), {} at 100%; \
                         mean usage at a preemption {:.1}%",
                        m.near_full_pct, m.at_near_full, m.preemptions, m.at_near_full_pct, m.at_full, m.mean_usage_pct
                    )?,
                    None => writeln!(
                        f,
                        "   Preemptions against usage: unknown (needs kv_cache_usage.csv and preemption_events.csv)"
                    )?,
                }
            }
        }

        writeln!(f, "\n7. CUDA Graphs")?;
        match &self.cuda_graph {
            None => writeln!(f, "   (no data)")?,
            Some(g) => {
                let s = &g.summary;
                writeln!(f, "   source: {}", g.source)?;
                let sizes = g.captured_sizes.as_ref().map_or_else(String::new, |v| {
                    format!(" (sizes {})", v.iter().map(u64::to_string).collect::<Vec<_>>().join(", "))
                });
                writeln!(f, "   Captures: {}{sizes} in {:.3} ms", s.captures, s.capture_time_ms)?;
                writeln!(
                    f,
                    "   Steps: {}: {} replayed, {} eager = replay rate {:.1}%",
                    g.steps, s.replays, s.eager_steps, s.replay_rate_pct
                )?;
                match &g.most_padded_graph {
                    Some(p) => writeln!(
                        f,
                        "   Mean padding of a replayed batch: {:.1}% (most padded slots: graph {}, {} slots over {} replays)",
                        s.mean_padding_pct, p.graph_size, p.padded_slots, p.replays
                    )?,
                    None => writeln!(f, "   Mean padding of a replayed batch: {:.1}%", s.mean_padding_pct)?,
                }
                let largest_eager = g.max_eager_batch_size.map_or_else(|| "?".into(), |m| m.to_string());
                write!(f, "   Eager steps: {}, largest batch {largest_eager}", s.eager_steps)?;
                match (g.eager_beyond_largest_graph, g.eager_within_graphs, g.largest_captured_size) {
                    (Some(b), Some(w), Some(l)) => {
                        writeln!(f, "; {b} beyond the largest captured graph ({l}), {w} within the captured sizes")?
                    }
                    (Some(b), _, None) => writeln!(f, "; {b} with no graph captured at all")?,
                    _ => writeln!(f)?,
                }
            }
        }

        writeln!(f, "\n8. MoE Experts")?;
        match &self.moe_expert {
            None => writeln!(f, "   (no data)")?,
            Some(m) => {
                writeln!(f, "   source: {}", m.source)?;
                let experts = m.layers.iter().map(|l| l.experts).max().unwrap_or(0);
                writeln!(
                    f,
                    "   {} layers, up to {experts} experts; max_over_mean: highest {:.2}x, mean over layers {:.2}x",
                    m.layers.len(),
                    m.max_over_mean,
                    m.mean_max_over_mean
                )?;
                if !m.layers.is_empty() {
                    writeln!(
                        f,
                        "   {:<8} {:>8} {:>12} {:>10} {:>8} {:>22}",
                        "layer", "experts", "tokens", "max/mean", "CV", "hottest expert (share)"
                    )?;
                }
                for l in &m.layers {
                    writeln!(
                        f,
                        "   {:<8} {:>8} {:>12} {:>10} {:>8.3} {:>22}",
                        l.layer,
                        l.experts,
                        l.total_tokens,
                        format!("{:.2}x", l.max_over_mean),
                        l.coefficient_of_variation,
                        format!("{} ({:.1}%)", l.hottest_expert, l.hottest_share_pct)
                    )?;
                }
                if !m.most_imbalanced_layers.is_empty() {
                    let layers: Vec<String> = m.most_imbalanced_layers.iter().map(u64::to_string).collect();
                    writeln!(f, "   Most imbalanced layers: {}", layers.join(", "))?;
                }
            }
        }

        if let Some(s) = &self.slow_steps {
            writeln!(
                f,
                "\n9. Slow Steps (tail: above p99 or over twice the median of host gap + step wall time, per phase)"
            )?;
            write!(f, "{s}")?;
        }

        writeln!(f, "\nInsights")?;
        if self.insights.is_empty() {
            writeln!(f, "   none fired (every figure is within its threshold)")?;
        }
        for i in &self.insights {
            writeln!(f, "   {i}")?;
        }

        if !self.notes.is_empty() {
            writeln!(f, "\nNotes")?;
            for n in &self.notes {
                writeln!(f, "   {n}")?;
            }
        }
        Ok(())
    }
}
