//! The rows and summaries of one run directory, as read from its contract files.

use crate::contract::*;
use crate::input::{read_csv, read_json, FieldError, Row};
use crate::note::Note;
use crate::ReportError;
use std::path::{Path, PathBuf};

pub use profilemate_core::{Component, GraphEvent, LifecycleEvent, Phase};

use crate::input::Word;

macro_rules! word {
    ($($t:ty),*) => {$(
        impl Word for $t {
            const ALL: &'static [Self] = &<$t>::ALL;
            fn word(self) -> &'static str {
                self.as_str()
            }
        }
    )*};
}
word!(Phase, Component, LifecycleEvent, GraphEvent);

/// A row of `forward_pass_timing.csv`.
#[derive(Debug, Clone, PartialEq)]
#[allow(missing_docs)]
pub struct ForwardPassRow {
    pub timestamp_sec: f64,
    pub phase: Phase,
    pub batch_size: u64,
    pub num_tokens: u64,
    pub forward_time_ms: f64,
    /// Empty in the file when the time is 0.
    pub throughput_tokens_per_sec: Option<f64>,
    /// The engine step (the optional `step` column; `None` when empty or absent).
    pub step: Option<u64>,
}

/// A row of `cpu_operations_timing.csv` (the context is not kept).
#[derive(Debug, Clone, PartialEq)]
#[allow(missing_docs)]
pub struct CpuOperationRow {
    pub timestamp_sec: f64,
    pub operation: String,
    pub duration_ms: f64,
    /// The engine step (the optional `step` column; `None` when empty or absent).
    pub step: Option<u64>,
}

/// A row of `batch_utilization.csv`.
#[derive(Debug, Clone, PartialEq)]
#[allow(missing_docs)]
pub struct BatchRow {
    pub timestamp_sec: f64,
    pub num_seqs: u64,
    pub max_num_seqs: u64,
    /// Empty in the file when the limit is 0.
    pub seq_utilization_pct: Option<f64>,
    pub num_tokens: u64,
    pub max_tokens: u64,
    /// Empty in the file when the limit is 0.
    pub token_utilization_pct: Option<f64>,
    pub phase: Phase,
    pub running_queue_len: u64,
    pub waiting_queue_len: u64,
    /// The engine step (the optional `step` column; `None` when empty or absent).
    pub step: Option<u64>,
}

/// A row of `preemption_events.csv` (the extra info is not kept).
#[derive(Debug, Clone, PartialEq)]
#[allow(missing_docs)]
pub struct PreemptionEventRow {
    pub timestamp_sec: f64,
    pub request_id: String,
    pub event: LifecycleEvent,
    pub reason: String,
    pub running_time_sec: Option<f64>,
    /// The engine step (the optional `step` column; `None` when empty or absent).
    pub step: Option<u64>,
}

/// A row of `request_lifecycle.csv`.
#[derive(Debug, Clone, PartialEq)]
#[allow(missing_docs)]
pub struct LifecycleRow {
    pub request_id: String,
    pub started_sec: Option<f64>,
    pub preempted_sec: Option<f64>,
    pub resumed_sec: Option<f64>,
    pub finished_sec: Option<f64>,
    pub total_time_sec: Option<f64>,
    pub preemption_delay_sec: Option<f64>,
    pub num_preemptions: u64,
}

/// A row of `encoder_decoder_timing.csv`.
#[derive(Debug, Clone, PartialEq)]
#[allow(missing_docs)]
pub struct ComponentRow {
    pub timestamp_sec: f64,
    pub component: Component,
    pub duration_ms: f64,
    pub context: String,
    /// The engine step (the optional `step` column; `None` when empty or absent).
    pub step: Option<u64>,
}

/// A row of `kv_cache_usage.csv`.
#[derive(Debug, Clone, PartialEq)]
#[allow(missing_docs)]
pub struct KvCacheRow {
    pub timestamp_sec: f64,
    pub used_blocks: u64,
    pub total_blocks: u64,
    /// Empty in the file when the cache has no block.
    pub usage_pct: Option<f64>,
    /// Lookups since the previous sample (an empty field reads as 0).
    pub prefix_cache_queries: u64,
    /// Hits since the previous sample (an empty field reads as 0).
    pub prefix_cache_hits: u64,
    /// The engine step (the optional `step` column; `None` when empty or absent).
    pub step: Option<u64>,
}

impl KvCacheRow {
    /// The file's usage, or `used / total * 100` (clamped to 100) when the field is empty;
    /// `None` for a cache with no block.
    pub fn usage(&self) -> Option<f64> {
        self.usage_pct.or_else(|| {
            (self.total_blocks > 0)
                .then(|| self.used_blocks.min(self.total_blocks) as f64 / self.total_blocks as f64 * 100.0)
        })
    }
}

/// A row of `cuda_graph_events.csv`.
#[derive(Debug, Clone, PartialEq)]
#[allow(missing_docs)]
pub struct CudaGraphRow {
    pub timestamp_sec: f64,
    pub event: GraphEvent,
    /// The step's batch size (or the size captured).
    pub batch_size: u64,
    /// The graph size a replayed batch was padded to; empty for captures and eager steps.
    pub padded_batch_size: Option<u64>,
    /// Empty when the event was not timed.
    pub duration_ms: Option<f64>,
    /// The engine step (the optional `step` column; `None` when empty or absent).
    pub step: Option<u64>,
}

/// A row of `moe_expert_routing.csv`: tokens one layer routed to one expert in a window of
/// `window_steps` steps (1 for per-step rows, and in files written before windows existed).
#[derive(Debug, Clone, PartialEq)]
#[allow(missing_docs)]
pub struct MoeRoutingRow {
    pub timestamp_sec: f64,
    pub layer: u64,
    pub expert_id: u64,
    pub num_tokens: u64,
    pub window_steps: u64,
}

/// The most experts a layer may have in `moe_expert_routing.csv`; a larger expert id is taken
/// for a corrupt value rather than a reason to allocate gigabytes.
pub const MAX_EXPERT_ID: u64 = 65_535;

/// `moe_expert_routing.csv`, summed as it is read.
///
/// The file has a row per layer and expert per window of steps (or per step, with per-step
/// detail on: a long run of a large MoE model then writes hundreds of millions), so its rows are
/// not kept: only the tokens per expert per layer.
///
/// ```
/// use profilemate_cli::{MoeRouting, MoeRoutingRow};
/// let mut routing = MoeRouting::default();
/// for (expert_id, num_tokens) in [(0, 5), (3, 2)] {
///     routing.add(&MoeRoutingRow { timestamp_sec: 0.5, layer: 7, expert_id, num_tokens, window_steps: 1 });
/// }
/// assert_eq!(routing.tokens[&7], vec![5, 0, 0, 2]);
/// assert_eq!((routing.rows, routing.records), (2, 1));
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct MoeRouting {
    /// Tokens per expert (indexed by expert id) per layer, over the run. A layer's list ends
    /// at the highest expert id routed to in it.
    pub tokens: std::collections::BTreeMap<u64, Vec<u64>>,
    /// Rows read.
    pub rows: u64,
    /// Routing records (one per layer and step): over runs of consecutive rows of one layer and
    /// one timestamp (a writer writes a layer's experts of one window together), the sum of
    /// their `window_steps`.
    pub records: u64,
    last: Option<(u64, u64)>,
}

impl MoeRouting {
    /// Adds one row. `row.expert_id` must not exceed [`MAX_EXPERT_ID`] (the reader checks).
    pub fn add(&mut self, row: &MoeRoutingRow) {
        let tokens = self.tokens.entry(row.layer).or_default();
        let i = row.expert_id.min(MAX_EXPERT_ID) as usize;
        if tokens.len() <= i {
            tokens.resize(i + 1, 0);
        }
        tokens[i] += row.num_tokens;
        self.rows += 1;
        let key = (row.layer, row.timestamp_sec.to_bits());
        if self.last != Some(key) {
            self.records += row.window_steps;
            self.last = Some(key);
        }
    }
}

/// Everything read from one run directory: the rows of each CSV file and each JSON summary that
/// exists (`None` for a file that does not), plus the warnings met while reading.
///
/// ```
/// use profilemate_cli::RunData;
/// let dir = tempfile::tempdir()?;
/// std::fs::write(
///     dir.path().join("forward_pass_timing.csv"),
///     "timestamp_sec,phase,batch_size,num_tokens,forward_time_ms,throughput_tokens_per_sec\n\
///      0.100000,decode,4,4,2.000,2000.000\n",
/// )?;
/// let data = RunData::load(dir.path())?;
/// assert_eq!(data.forward_pass.as_ref().map(Vec::len), Some(1));
/// assert!(data.forward_pass_summary.is_none());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct RunData {
    /// The directory read.
    pub dir: PathBuf,
    /// `profilemate_run.json`
    pub run: Option<RunInfo>,
    /// `forward_pass_timing.csv`
    pub forward_pass: Option<Vec<ForwardPassRow>>,
    /// `forward_pass_summary.json`
    pub forward_pass_summary: Option<ForwardPassSummary>,
    /// `cpu_operations_timing.csv`
    pub cpu_operations: Option<Vec<CpuOperationRow>>,
    /// `cpu_timing_summary.json`
    pub cpu_summary: Option<CpuTimingSummary>,
    /// `batch_utilization.csv`
    pub batch: Option<Vec<BatchRow>>,
    /// `batch_utilization_summary.json`
    pub batch_summary: Option<BatchUtilizationSummary>,
    /// `preemption_events.csv`
    pub preemption_events: Option<Vec<PreemptionEventRow>>,
    /// `request_lifecycle.csv`
    pub request_lifecycle: Option<Vec<LifecycleRow>>,
    /// `preemption_summary.json`
    pub preemption_summary: Option<PreemptionSummary>,
    /// `encoder_decoder_timing.csv`
    pub components: Option<Vec<ComponentRow>>,
    /// `encoder_decoder_summary.json`
    pub encoder_decoder_summary: Option<EncoderDecoderSummary>,
    /// `kv_cache_usage.csv`
    pub kv_cache: Option<Vec<KvCacheRow>>,
    /// `kv_cache_summary.json`
    pub kv_cache_summary: Option<KvCacheSummary>,
    /// `cuda_graph_events.csv`
    pub cuda_graph: Option<Vec<CudaGraphRow>>,
    /// `cuda_graph_summary.json`
    pub cuda_graph_summary: Option<CudaGraphSummary>,
    /// `moe_expert_routing.csv`, summed as it is read (its rows are too many to keep).
    pub moe_routing: Option<MoeRouting>,
    /// `moe_expert_summary.json`
    pub moe_expert_summary: Option<MoeExpertSummary>,
    /// `step_timeline.csv`
    pub step_timeline: Option<Vec<crate::timeline::StepRow>>,
    /// Warnings met while reading (torn last lines, empty files).
    pub notes: Vec<Note>,
}

fn forward_row(r: &Row<'_>) -> Result<ForwardPassRow, FieldError> {
    Ok(ForwardPassRow {
        timestamp_sec: r.non_negative(0)?,
        phase: r.word::<Phase>(1)?,
        batch_size: r.count(2)?,
        num_tokens: r.count(3)?,
        forward_time_ms: r.non_negative(4)?,
        throughput_tokens_per_sec: r.opt_non_negative(5)?,
        step: r.step()?,
    })
}

fn cpu_row(r: &Row<'_>) -> Result<CpuOperationRow, FieldError> {
    let operation = r.text(1)?;
    if operation.is_empty() {
        return Err(FieldError { column: 1, message: "empty, an operation name is required".into() });
    }
    Ok(CpuOperationRow {
        timestamp_sec: r.non_negative(0)?,
        operation,
        duration_ms: r.non_negative(2)?,
        step: r.step()?,
    })
}

fn batch_row(r: &Row<'_>) -> Result<BatchRow, FieldError> {
    Ok(BatchRow {
        timestamp_sec: r.non_negative(0)?,
        num_seqs: r.count(1)?,
        max_num_seqs: r.count(2)?,
        seq_utilization_pct: r.opt_non_negative(3)?,
        num_tokens: r.count(4)?,
        max_tokens: r.count(5)?,
        token_utilization_pct: r.opt_non_negative(6)?,
        phase: r.word::<Phase>(7)?,
        running_queue_len: r.count(8)?,
        waiting_queue_len: r.count(9)?,
        step: r.step()?,
    })
}

fn preemption_row(r: &Row<'_>) -> Result<PreemptionEventRow, FieldError> {
    Ok(PreemptionEventRow {
        timestamp_sec: r.non_negative(0)?,
        request_id: r.text(1)?,
        event: r.word::<LifecycleEvent>(2)?,
        reason: r.text(3)?,
        running_time_sec: r.opt_non_negative(4)?,
        step: r.step()?,
    })
}

fn lifecycle_row(r: &Row<'_>) -> Result<LifecycleRow, FieldError> {
    Ok(LifecycleRow {
        request_id: r.text(0)?,
        started_sec: r.opt_non_negative(1)?,
        preempted_sec: r.opt_non_negative(2)?,
        resumed_sec: r.opt_non_negative(3)?,
        finished_sec: r.opt_non_negative(4)?,
        total_time_sec: r.opt_non_negative(5)?,
        preemption_delay_sec: r.opt_non_negative(6)?,
        num_preemptions: r.count(7)?,
    })
}

fn component_row(r: &Row<'_>) -> Result<ComponentRow, FieldError> {
    Ok(ComponentRow {
        timestamp_sec: r.non_negative(0)?,
        component: r.word::<Component>(1)?,
        duration_ms: r.non_negative(2)?,
        context: r.text(3)?,
        step: r.step()?,
    })
}

fn kv_cache_row(r: &Row<'_>) -> Result<KvCacheRow, FieldError> {
    Ok(KvCacheRow {
        timestamp_sec: r.non_negative(0)?,
        used_blocks: r.count(1)?,
        total_blocks: r.count(2)?,
        usage_pct: r.opt_non_negative(3)?,
        prefix_cache_queries: r.opt_count(4)?.unwrap_or(0),
        prefix_cache_hits: r.opt_count(5)?.unwrap_or(0),
        step: r.step()?,
    })
}

fn cuda_graph_row(r: &Row<'_>) -> Result<CudaGraphRow, FieldError> {
    Ok(CudaGraphRow {
        timestamp_sec: r.non_negative(0)?,
        event: r.word::<GraphEvent>(1)?,
        batch_size: r.count(2)?,
        padded_batch_size: r.opt_count(3)?,
        duration_ms: r.opt_non_negative(4)?,
        step: r.step()?,
    })
}

fn moe_row(r: &Row<'_>) -> Result<MoeRoutingRow, FieldError> {
    let expert_id = r.count(2)?;
    if expert_id > MAX_EXPERT_ID {
        return Err(FieldError {
            column: 2,
            message: format!("expert id {expert_id} is beyond {MAX_EXPERT_ID}, more experts than any layer has"),
        });
    }
    Ok(MoeRoutingRow {
        timestamp_sec: r.non_negative(0)?,
        layer: r.count(1)?,
        expert_id,
        num_tokens: r.count(3)?,
        window_steps: r.opt_count(4)?.unwrap_or(1),
    })
}

impl RunData {
    /// Reads every contract file of `dir` that exists.
    ///
    /// # Errors
    ///
    /// [`ReportError::NoContractFiles`] when `dir` holds none of them,
    /// [`ReportError::Io`] when one cannot be read, and [`ReportError::MissingColumn`],
    /// [`ReportError::MalformedCsv`] or [`ReportError::MalformedJson`] when one is malformed.
    pub fn load(dir: impl AsRef<Path>) -> Result<RunData, ReportError> {
        let dir = dir.as_ref();
        let meta = std::fs::metadata(dir).map_err(|e| ReportError::io(dir, e))?;
        if !meta.is_dir() {
            return Err(ReportError::io(dir, std::io::Error::other("not a directory")));
        }
        if !ALL_FILES.iter().any(|f| dir.join(f).exists()) {
            return Err(ReportError::NoContractFiles { dir: dir.to_path_buf() });
        }
        let mut notes = Vec::new();
        let run = read_json::<serde_json::Value>(dir, MANIFEST_JSON)?.map(|v| RunInfo::from_value(&v));
        let data = RunData {
            dir: dir.to_path_buf(),
            run,
            forward_pass: read_csv(dir, FORWARD_PASS_CSV, &mut notes, forward_row)?,
            forward_pass_summary: read_json(dir, FORWARD_PASS_JSON)?,
            cpu_operations: read_csv(dir, CPU_CSV, &mut notes, cpu_row)?,
            cpu_summary: read_json(dir, CPU_JSON)?,
            batch: read_csv(dir, BATCH_CSV, &mut notes, batch_row)?,
            batch_summary: read_json(dir, BATCH_JSON)?,
            preemption_events: read_csv(dir, PREEMPTION_EVENTS_CSV, &mut notes, preemption_row)?,
            request_lifecycle: read_csv(dir, LIFECYCLE_CSV, &mut notes, lifecycle_row)?,
            preemption_summary: read_json(dir, PREEMPTION_JSON)?,
            components: read_csv(dir, ENCODER_DECODER_CSV, &mut notes, component_row)?,
            encoder_decoder_summary: read_json(dir, ENCODER_DECODER_JSON)?,
            kv_cache: read_csv(dir, KV_CACHE_CSV, &mut notes, kv_cache_row)?,
            kv_cache_summary: read_json(dir, KV_CACHE_JSON)?,
            cuda_graph: read_csv(dir, CUDA_GRAPH_CSV, &mut notes, cuda_graph_row)?,
            cuda_graph_summary: read_json(dir, CUDA_GRAPH_JSON)?,
            moe_routing: {
                let mut routing = MoeRouting::default();
                // Rows are summed as they are read; `()` per row keeps no memory.
                read_csv(dir, MOE_CSV, &mut notes, |r| moe_row(r).map(|row| routing.add(&row)))?.map(|_| routing)
            },
            moe_expert_summary: read_json(dir, MOE_JSON)?,
            step_timeline: read_csv(dir, crate::timeline::STEP_TIMELINE_CSV, &mut notes, crate::timeline::step_row)?,
            notes,
        };
        Ok(data)
    }
}
