use super::Profiler;
use crate::event::Event;
use crate::rows::{CudaGraphRow, Rows};
use crate::stats::Mean;
use crate::summary::{CudaGraphSummary, Summaries};
use crate::types::{GraphEvent, ProfilerKind};
use std::collections::BTreeSet;

/// CUDA graph captures, replays, eager steps and padding.
#[derive(Debug, Default, Clone)]
pub struct CudaGraphProfiler {
    captures: u64,
    replays: u64,
    eager: u64,
    padding: Mean,
    capture_ns: u64,
    sizes: BTreeSet<u32>,
    max_eager: u32,
}

impl CudaGraphProfiler {
    /// An empty tracker.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Profiler for CudaGraphProfiler {
    fn kind(&self) -> ProfilerKind {
        ProfilerKind::CudaGraph
    }

    fn observe(&mut self, event: &Event<'_>, rows: &mut Rows) {
        let Event::CudaGraph { timestamp_ns, event, batch_size, padded_batch_size, duration_ns } = *event else {
            return;
        };
        match event {
            GraphEvent::Capture => {
                self.captures += 1;
                self.capture_ns += duration_ns.unwrap_or(0);
                self.sizes.insert(batch_size);
            }
            GraphEvent::Replay => {
                self.replays += 1;
                if let Some(p) = padded_batch_size.filter(|p| *p > 0) {
                    let pad = f64::from(p.saturating_sub(batch_size)) / f64::from(p) * 100.0;
                    self.padding.add(pad);
                }
            }
            GraphEvent::Eager => {
                self.eager += 1;
                self.max_eager = self.max_eager.max(batch_size);
            }
        }
        rows.cuda_graph.push(CudaGraphRow {
            timestamp_ns,
            event,
            batch_size,
            padded_batch_size,
            duration_ns,
            step: None,
        });
    }

    fn summarize(&self, out: &mut Summaries) {
        let steps = self.replays + self.eager;
        out.cuda_graph = Some(CudaGraphSummary {
            captures: self.captures,
            replays: self.replays,
            eager_steps: self.eager,
            replay_rate_pct: if steps == 0 { 0.0 } else { self.replays as f64 / steps as f64 * 100.0 },
            mean_padding_pct: self.padding.value(),
            capture_time_ms: self.capture_ns as f64 / 1e6,
            captured_sizes: self.sizes.iter().copied().collect(),
            max_eager_batch_size: self.max_eager,
        });
    }
}
