//! The seed's opening tree, measured: per phase, the steps' wall time split into scheduling,
//! batch preparation, the forward pass (encoder / decoder), sampling, other CPU operations and
//! "other", the wall time no profiler claims, with batch utilization and preemptions beside it.
//!
//! Every figure is a sum over `step_timeline.csv`: the shares are of the summed step wall time,
//! and "other" is each step's `unclaimed_ms` summed. The host gap between steps (time between
//! one step's end and the next one's beginning) is outside every step and shown on its own line.

use crate::timeline::StepRow;
use profilemate_core::Phase;
use serde::Serialize;
use std::fmt;

/// One line of the tree.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Part {
    /// What it is (`scheduling`, `forward_pass`, ...).
    pub name: &'static str,
    /// Summed milliseconds.
    pub total_ms: f64,
    /// Share of the summed step wall time, percent (of the forward pass for encoder/decoder).
    pub pct: f64,
}

/// The tree for one phase (or for all steps).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PhaseBreakdown {
    /// `prefill`, `decode`, `mixed`, or `all`.
    pub phase: &'static str,
    /// Steps.
    pub steps: u64,
    /// Summed step wall time, ms.
    pub wall_ms: f64,
    /// Scheduling, batch preparation, forward pass, sampling, other CPU operations, other.
    pub parts: Vec<Part>,
    /// Encoder and decoder time, as shares of the forward pass.
    pub forward_parts: Vec<Part>,
    /// Summed host gap before these steps, ms (outside the wall time).
    pub host_gap_ms: f64,
    /// Mean token utilization of the steps that have one, percent.
    pub mean_token_utilization_pct: Option<f64>,
    /// Preemptions in these steps.
    pub preemptions: u64,
    /// Steps with at least one preemption.
    pub steps_with_preemptions: u64,
}

/// The breakdown of every phase present, then of all steps together.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Breakdown {
    /// Per phase, then `all`.
    pub phases: Vec<PhaseBreakdown>,
}

fn sum(rows: &[&StepRow], f: impl Fn(&StepRow) -> Option<f64>) -> f64 {
    rows.iter().filter_map(|r| f(r)).sum::<f64>() + 0.0
}

impl PhaseBreakdown {
    /// The tree of `rows`.
    pub fn of(phase: &'static str, rows: &[&StepRow]) -> PhaseBreakdown {
        let wall = sum(rows, |r| Some(r.step_wall_ms));
        let pct = |v: f64, of: f64| if of > 0.0 { v / of * 100.0 } else { 0.0 };
        let forward = sum(rows, |r| r.forward_time_ms);
        let parts = [
            ("scheduling", sum(rows, |r| r.scheduling_ms)),
            ("batch_preparation", sum(rows, |r| r.batch_preparation_ms)),
            ("forward_pass", forward),
            ("sampling", sum(rows, |r| r.sampling_ms)),
            ("other_cpu_operations", sum(rows, |r| r.other_cpu_ms)),
            ("other", sum(rows, |r| Some(r.unclaimed_ms))),
        ]
        .into_iter()
        .map(|(name, total_ms)| Part { name, total_ms, pct: pct(total_ms, wall) })
        .collect();
        let has_components = rows.iter().any(|r| r.encoder_time_ms.is_some() || r.decoder_time_ms.is_some());
        let forward_parts = if has_components {
            [("encoder", sum(rows, |r| r.encoder_time_ms)), ("decoder", sum(rows, |r| r.decoder_time_ms))]
                .into_iter()
                .map(|(name, total_ms)| Part { name, total_ms, pct: pct(total_ms, forward) })
                .collect()
        } else {
            Vec::new()
        };
        let util: Vec<f64> = rows.iter().filter_map(|r| r.token_utilization_pct).collect();
        PhaseBreakdown {
            phase,
            steps: rows.len() as u64,
            wall_ms: wall,
            parts,
            forward_parts,
            host_gap_ms: sum(rows, |r| r.host_gap_before_ms),
            mean_token_utilization_pct: (!util.is_empty()).then(|| util.iter().sum::<f64>() / util.len() as f64),
            preemptions: rows.iter().filter_map(|r| r.preemptions).sum(),
            steps_with_preemptions: rows.iter().filter(|r| r.preemptions.unwrap_or(0) > 0).count() as u64,
        }
    }
}

impl Breakdown {
    /// The breakdown of a step timeline.
    pub fn of(rows: &[StepRow]) -> Breakdown {
        let mut phases = Vec::new();
        for phase in Phase::ALL {
            let of_phase: Vec<&StepRow> = rows.iter().filter(|r| r.phase == Some(phase)).collect();
            if !of_phase.is_empty() {
                phases.push(PhaseBreakdown::of(phase.as_str(), &of_phase));
            }
        }
        let all: Vec<&StepRow> = rows.iter().collect();
        phases.push(PhaseBreakdown::of("all", &all));
        Breakdown { phases }
    }
}

const LABELS: [(&str, &str); 8] = [
    ("scheduling", "Scheduling (CPU)"),
    ("batch_preparation", "Batch Prep (CPU)"),
    ("forward_pass", "Forward Pass"),
    ("sampling", "Sampling (CPU)"),
    ("other_cpu_operations", "Other CPU operations"),
    ("other", "Other (no profiler claims it)"),
    ("encoder", "Encoder"),
    ("decoder", "Decoder"),
];

/// The label a part is printed with.
pub fn label(name: &str) -> &str {
    LABELS.iter().find(|(n, _)| *n == name).map_or(name, |(_, l)| l)
}

impl fmt::Display for PhaseBreakdown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mean = if self.steps > 0 { self.wall_ms / self.steps as f64 } else { 0.0 };
        writeln!(
            f,
            "   {}: {} steps, step time {:.1} ms ({:.3} ms per step)",
            self.phase, self.steps, self.wall_ms, mean
        )?;
        let last = self.parts.len().saturating_sub(1);
        for (i, p) in self.parts.iter().enumerate() {
            let branch = if i == last { "└──" } else { "├──" };
            writeln!(f, "   {branch} {:<30} {:>11.1} ms {:>6.1}%", label(p.name), p.total_ms, p.pct)?;
            if p.name == "forward_pass" {
                let n = self.forward_parts.len();
                for (j, c) in self.forward_parts.iter().enumerate() {
                    let sub = if j + 1 == n { "└──" } else { "├──" };
                    writeln!(
                        f,
                        "   │   {sub} {:<26} {:>11.1} ms {:>6.1}% of the forward pass",
                        label(c.name),
                        c.total_ms,
                        c.pct
                    )?;
                }
            }
        }
        write!(f, "   host gap before these steps (outside them): {:.1} ms", self.host_gap_ms)?;
        match self.mean_token_utilization_pct {
            Some(u) => write!(f, "; batch utilization (tokens): {u:.1}%")?,
            None => write!(f, "; batch utilization: not recorded")?,
        }
        writeln!(f, "; preemptions: {} events in {} steps", self.preemptions, self.steps_with_preemptions)
    }
}

impl fmt::Display for Breakdown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in &self.phases {
            write!(f, "{p}")?;
        }
        Ok(())
    }
}
