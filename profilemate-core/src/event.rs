//! Resolved events, as the collector hands them to profilers.

use crate::handles::{BatchSample, KvCacheSample};
use crate::types::{Component, GraphEvent, LifecycleEvent, Phase};

/// One recorded event after the collector resolved its times. Timestamps and durations are
/// nanoseconds; timestamps count from the session's start.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event<'a> {
    /// A forward pass.
    ForwardPass {
        /// When it started.
        timestamp_ns: u64,
        /// Prefill, decode or mixed.
        phase: Phase,
        /// Sequences in the batch.
        batch_size: u32,
        /// Tokens processed.
        num_tokens: u32,
        /// How long it took, by the timing backend.
        duration_ns: u64,
    },
    /// A CPU operation.
    CpuOperation {
        /// When it started.
        timestamp_ns: u64,
        /// The operation's id.
        operation: u16,
        /// The operation's name.
        name: &'a std::sync::Arc<str>,
        /// How long it took.
        duration_ns: u64,
        /// Its context.
        context: &'a str,
    },
    /// A scheduled batch.
    Batch {
        /// When it was scheduled.
        timestamp_ns: u64,
        /// The batch against its limits.
        sample: BatchSample,
    },
    /// A request lifecycle event.
    Lifecycle {
        /// When it happened.
        timestamp_ns: u64,
        /// The engine's request id.
        request_id: &'a str,
        /// What happened.
        event: LifecycleEvent,
        /// Why (preempted, evicted).
        reason: &'a str,
        /// Extra `key=value` pairs.
        extra_info: &'a str,
    },
    /// An encoder, decoder or cross-attention call.
    Component {
        /// When it started.
        timestamp_ns: u64,
        /// Which component.
        component: Component,
        /// How long it took, by the timing backend.
        duration_ns: u64,
        /// The part (`vision_encoder`, `language_model`).
        context: &'a str,
    },
    /// A KV cache reading.
    KvCache {
        /// When it was read.
        timestamp_ns: u64,
        /// The reading.
        sample: KvCacheSample,
    },
    /// A CUDA graph capture, replay or eager step.
    CudaGraph {
        /// When it happened (a capture: when it started).
        timestamp_ns: u64,
        /// What happened.
        event: GraphEvent,
        /// The batch size.
        batch_size: u32,
        /// The captured size a replay was padded to.
        padded_batch_size: Option<u32>,
        /// How long it took, when timed.
        duration_ns: Option<u64>,
    },
    /// One layer's routing of one step's tokens.
    MoeRouting {
        /// The step's time.
        timestamp_ns: u64,
        /// The layer.
        layer: u32,
        /// Tokens routed to each expert, by expert id.
        tokens_per_expert: &'a [u32],
    },
}

impl Event<'_> {
    /// When the event started or happened, nanoseconds since the session started.
    pub fn timestamp_ns(&self) -> u64 {
        match self {
            Event::ForwardPass { timestamp_ns, .. }
            | Event::CpuOperation { timestamp_ns, .. }
            | Event::Batch { timestamp_ns, .. }
            | Event::Lifecycle { timestamp_ns, .. }
            | Event::Component { timestamp_ns, .. }
            | Event::KvCache { timestamp_ns, .. }
            | Event::CudaGraph { timestamp_ns, .. }
            | Event::MoeRouting { timestamp_ns, .. } => *timestamp_ns,
        }
    }
}
