use super::Profiler;
use crate::event::Event;
use crate::rows::{CpuOperationRow, Rows};
use crate::stats::DurationStats;
use crate::summary::{OperationStats, Summaries};
use crate::types::ProfilerKind;
use std::sync::Arc;

/// CPU operation timing per operation.
#[derive(Debug, Default, Clone)]
pub struct CpuTimingProfiler {
    /// Indexed by operation id.
    ops: Vec<Option<(Arc<str>, DurationStats)>>,
}

impl CpuTimingProfiler {
    /// An empty profiler.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Profiler for CpuTimingProfiler {
    fn kind(&self) -> ProfilerKind {
        ProfilerKind::CpuTiming
    }

    fn observe(&mut self, event: &Event<'_>, rows: &mut Rows) {
        let Event::CpuOperation { timestamp_ns, operation, name, duration_ns, context } = *event else {
            return;
        };
        let i = usize::from(operation);
        if self.ops.len() <= i {
            self.ops.resize_with(i + 1, || None);
        }
        let entry = self.ops[i].get_or_insert_with(|| (name.clone(), DurationStats::new()));
        entry.1.record(duration_ns);
        rows.cpu_operations.push(CpuOperationRow {
            step: None,
            timestamp_ns,
            operation: name.clone(),
            duration_ns,
            context: context.to_string(),
        });
    }

    fn summarize(&self, out: &mut Summaries) {
        out.cpu_timing = Some(
            self.ops.iter().flatten().map(|(name, stats)| (name.to_string(), OperationStats::from(stats))).collect(),
        );
    }
}
