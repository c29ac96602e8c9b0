//! The rows and summaries of one run directory, as read from its contract files.

use crate::contract::*;
use crate::input::{read_csv, read_json, FieldError, Row};
use crate::report::Note;
use crate::ReportError;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// The phase of a forward pass or a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Prompt processing.
    Prefill,
    /// Token generation.
    Decode,
    /// A batch holding both prompt chunks and decode tokens (chunked prefill).
    Mixed,
}

impl Phase {
    /// All phases, in the contract's order.
    pub const ALL: [Phase; 3] = [Phase::Prefill, Phase::Decode, Phase::Mixed];

    /// The word used in files.
    pub const fn as_str(self) -> &'static str {
        match self {
            Phase::Prefill => "prefill",
            Phase::Decode => "decode",
            Phase::Mixed => "mixed",
        }
    }

    const WORDS: [(&'static str, Phase); 3] =
        [("prefill", Phase::Prefill), ("decode", Phase::Decode), ("mixed", Phase::Mixed)];
}

/// A model component of `encoder_decoder_timing.csv`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Component {
    /// Encoder (or vision/audio encoder).
    Encoder,
    /// Decoder (or language model).
    Decoder,
    /// Cross-attention.
    CrossAttention,
}

impl Component {
    /// All components.
    pub const ALL: [Component; 3] = [Component::Encoder, Component::Decoder, Component::CrossAttention];

    /// The word used in files.
    pub const fn as_str(self) -> &'static str {
        match self {
            Component::Encoder => "encoder",
            Component::Decoder => "decoder",
            Component::CrossAttention => "cross_attention",
        }
    }

    const WORDS: [(&'static str, Component); 3] = [
        ("encoder", Component::Encoder),
        ("decoder", Component::Decoder),
        ("cross_attention", Component::CrossAttention),
    ];
}

/// An event of `preemption_events.csv`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LifecycleEvent {
    /// The request began processing.
    Started,
    /// The request was preempted.
    Preempted,
    /// The request resumed after a preemption.
    Resumed,
    /// The request completed.
    Finished,
    /// The request was evicted or aborted.
    Evicted,
}

impl LifecycleEvent {
    const WORDS: [(&'static str, LifecycleEvent); 5] = [
        ("started", LifecycleEvent::Started),
        ("preempted", LifecycleEvent::Preempted),
        ("resumed", LifecycleEvent::Resumed),
        ("finished", LifecycleEvent::Finished),
        ("evicted", LifecycleEvent::Evicted),
    ];
}

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
}

/// A row of `cpu_operations_timing.csv` (the context is not kept).
#[derive(Debug, Clone, PartialEq)]
#[allow(missing_docs)]
pub struct CpuOperationRow {
    pub timestamp_sec: f64,
    pub operation: String,
    pub duration_ms: f64,
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
    /// Warnings met while reading (torn last lines, empty files).
    pub notes: Vec<Note>,
}

fn forward_row(r: &Row<'_>) -> Result<ForwardPassRow, FieldError> {
    Ok(ForwardPassRow {
        timestamp_sec: r.non_negative(0)?,
        phase: r.word(1, &Phase::WORDS)?,
        batch_size: r.count(2)?,
        num_tokens: r.count(3)?,
        forward_time_ms: r.non_negative(4)?,
        throughput_tokens_per_sec: r.opt_non_negative(5)?,
    })
}

fn cpu_row(r: &Row<'_>) -> Result<CpuOperationRow, FieldError> {
    let operation = r.text(1)?;
    if operation.is_empty() {
        return Err(FieldError { column: 1, message: "empty, an operation name is required".into() });
    }
    Ok(CpuOperationRow { timestamp_sec: r.non_negative(0)?, operation, duration_ms: r.non_negative(2)? })
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
        phase: r.word(7, &Phase::WORDS)?,
        running_queue_len: r.count(8)?,
        waiting_queue_len: r.count(9)?,
    })
}

fn preemption_row(r: &Row<'_>) -> Result<PreemptionEventRow, FieldError> {
    Ok(PreemptionEventRow {
        timestamp_sec: r.non_negative(0)?,
        request_id: r.text(1)?,
        event: r.word(2, &LifecycleEvent::WORDS)?,
        reason: r.text(3)?,
        running_time_sec: r.opt_non_negative(4)?,
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
        component: r.word(1, &Component::WORDS)?,
        duration_ms: r.non_negative(2)?,
        context: r.text(3)?,
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
            notes,
        };
        Ok(data)
    }
}
