use super::Profiler;
use crate::event::Event;
use crate::rows::{ForwardPassRow, Rows};
use crate::stats::{DurationStats, Mean};
use crate::summary::{ForwardPassSummary, PhaseStats, Summaries};
use crate::types::{Phase, ProfilerKind};

/// Forward pass timing per phase.
#[derive(Debug, Default, Clone)]
pub struct ForwardPassProfiler {
    phases: [PhaseAgg; 3],
}

#[derive(Debug, Default, Clone)]
struct PhaseAgg {
    stats: DurationStats,
    tokens: u64,
    throughput: Mean,
}

impl ForwardPassProfiler {
    /// An empty profiler.
    pub fn new() -> Self {
        Self::default()
    }

    /// Forward passes seen.
    pub fn steps(&self) -> u64 {
        self.phases.iter().map(|p| p.stats.count()).sum()
    }

    fn phase_stats(&self, phase: Phase) -> PhaseStats {
        let p = &self.phases[phase.index()];
        PhaseStats::from_stats(&p.stats, p.tokens, p.throughput.value())
    }
}

impl Profiler for ForwardPassProfiler {
    fn kind(&self) -> ProfilerKind {
        ProfilerKind::ForwardPass
    }

    fn observe(&mut self, event: &Event<'_>, rows: &mut Rows) {
        let Event::ForwardPass { timestamp_ns, phase, batch_size, num_tokens, duration_ns } = *event else {
            return;
        };
        let row =
            ForwardPassRow { timestamp_ns, phase, batch_size, num_tokens, forward_time_ns: duration_ns, step: None };
        let agg = &mut self.phases[phase.index()];
        agg.stats.record(duration_ns);
        agg.tokens += u64::from(num_tokens);
        if let Some(t) = row.throughput_tokens_per_sec() {
            agg.throughput.add(t);
        }
        rows.forward_pass.push(row);
    }

    fn summarize(&self, out: &mut Summaries) {
        out.forward_pass = Some(ForwardPassSummary {
            prefill: self.phase_stats(Phase::Prefill),
            decode: self.phase_stats(Phase::Decode),
            mixed: self.phase_stats(Phase::Mixed),
        });
    }
}
