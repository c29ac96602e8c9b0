//! `step_timeline.csv` as this crate reads it: one [`StepRow`] per engine step.

use crate::input::{FieldError, Row};
use profilemate_core::{GraphEvent, Phase};
use serde::Serialize;

pub use crate::contract::{STEP_TIMELINE_CSV, STEP_TIMELINE_JSON};

/// A row of `step_timeline.csv` (see the README's column list). Times in milliseconds; `None`
/// is an empty field (nothing in the step recorded it).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[allow(missing_docs)]
pub struct StepRow {
    pub step: u64,
    pub start_sec: f64,
    pub phase: Option<Phase>,
    pub batch_size: Option<u64>,
    pub num_tokens: Option<u64>,
    pub forward_passes: u64,
    pub forward_time_ms: Option<f64>,
    pub scheduling_ms: Option<f64>,
    pub batch_preparation_ms: Option<f64>,
    pub sampling_ms: Option<f64>,
    pub other_cpu_ms: Option<f64>,
    pub step_wall_ms: f64,
    pub host_gap_before_ms: Option<f64>,
    pub unclaimed_ms: f64,
    pub seq_utilization_pct: Option<f64>,
    pub token_utilization_pct: Option<f64>,
    pub running_queue_len: Option<u64>,
    pub waiting_queue_len: Option<u64>,
    pub kv_cache_usage_pct: Option<f64>,
    pub cuda_graph: Option<GraphEvent>,
    pub padded_batch_size: Option<u64>,
    pub padding_pct: Option<f64>,
    pub preemptions: Option<u64>,
    pub resumes: Option<u64>,
    pub encoder_time_ms: Option<f64>,
    pub decoder_time_ms: Option<f64>,
    pub moe_max_over_mean: Option<f64>,
}

impl StepRow {
    /// The step's CPU operations outside the forward pass, summed (empty fields count 0).
    pub fn cpu_ms(&self) -> f64 {
        [self.scheduling_ms, self.batch_preparation_ms, self.sampling_ms, self.other_cpu_ms]
            .iter()
            .map(|v| v.unwrap_or(0.0))
            .sum()
    }
}

pub(crate) fn step_row(r: &Row<'_>) -> Result<StepRow, FieldError> {
    let phase = if r.text(2)?.is_empty() { None } else { Some(r.word::<Phase>(2)?) };
    let cuda_graph = if r.text(19)?.is_empty() { None } else { Some(r.word::<GraphEvent>(19)?) };
    Ok(StepRow {
        step: r.count(0)?,
        start_sec: r.non_negative(1)?,
        phase,
        batch_size: r.opt_count(3)?,
        num_tokens: r.opt_count(4)?,
        forward_passes: r.count(5)?,
        forward_time_ms: r.opt_non_negative(6)?,
        scheduling_ms: r.opt_non_negative(7)?,
        batch_preparation_ms: r.opt_non_negative(8)?,
        sampling_ms: r.opt_non_negative(9)?,
        other_cpu_ms: r.opt_non_negative(10)?,
        step_wall_ms: r.non_negative(11)?,
        host_gap_before_ms: r.opt_non_negative(12)?,
        unclaimed_ms: r.non_negative(13)?,
        seq_utilization_pct: r.opt_non_negative(14)?,
        token_utilization_pct: r.opt_non_negative(15)?,
        running_queue_len: r.opt_count(16)?,
        waiting_queue_len: r.opt_count(17)?,
        kv_cache_usage_pct: r.opt_non_negative(18)?,
        cuda_graph,
        padded_batch_size: r.opt_count(20)?,
        padding_pct: r.opt_non_negative(21)?,
        preemptions: r.opt_count(22)?,
        resumes: r.opt_count(23)?,
        encoder_time_ms: r.opt_non_negative(24)?,
        decoder_time_ms: r.opt_non_negative(25)?,
        moe_max_over_mean: r.opt_non_negative(26)?,
    })
}
