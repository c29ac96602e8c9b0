//! The collector-side halves of the five profilers and the three trackers.
//!
//! Each owns its aggregates, turns [`Event`]s into rows, and summarizes itself. They run on the
//! collector thread only; they can also be fed by hand to recompute summaries from rows.

mod batch;
mod cpu;
mod cuda_graph;
mod encoder_decoder;
mod forward;
mod kv_cache;
mod moe;
mod preemption;

pub use batch::BatchUtilizationProfiler;
pub use cpu::CpuTimingProfiler;
pub use cuda_graph::CudaGraphProfiler;
pub use encoder_decoder::EncoderDecoderProfiler;
pub use forward::ForwardPassProfiler;
pub use kv_cache::KvCacheProfiler;
pub use moe::MoeExpertProfiler;
pub use preemption::PreemptionProfiler;

use crate::event::Event;
use crate::rows::Rows;
use crate::summary::Summaries;
use crate::types::ProfilerKind;

/// The collector-side half of a profiler.
///
/// ```
/// use profilemate_core::{Event, ForwardPassProfiler, Phase, Profiler, Rows, Summaries};
///
/// let mut profiler = ForwardPassProfiler::new();
/// let mut rows = Rows::default();
/// profiler.observe(&Event::ForwardPass {
///     timestamp_ns: 0, phase: Phase::Decode, batch_size: 4, num_tokens: 4, duration_ns: 2_000_000,
/// }, &mut rows);
/// let mut summaries = Summaries::default();
/// profiler.summarize(&mut summaries);
/// assert_eq!(summaries.forward_pass.unwrap().decode.mean_ms, 2.0);
/// assert_eq!(rows.forward_pass.len(), 1);
/// ```
pub trait Profiler: Send {
    /// Which profiler this is.
    fn kind(&self) -> ProfilerKind;

    /// Takes one event (events of other profilers are ignored) and appends its rows.
    fn observe(&mut self, event: &Event<'_>, rows: &mut Rows);

    /// At shutdown: appends rows still owed (requests in flight), `now_ns` being the end.
    fn finish(&mut self, now_ns: u64, rows: &mut Rows) {
        let _ = (now_ns, rows);
    }

    /// Writes this profiler's summary into `out`.
    fn summarize(&self, out: &mut Summaries);
}
