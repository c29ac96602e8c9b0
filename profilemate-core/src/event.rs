//! Resolved events, as the collector hands them to profilers.

use crate::handles::BatchSample;
use crate::types::{Component, LifecycleEvent, Phase};

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
}

impl Event<'_> {
    /// When the event started or happened, nanoseconds since the session started.
    pub fn timestamp_ns(&self) -> u64 {
        match self {
            Event::ForwardPass { timestamp_ns, .. }
            | Event::CpuOperation { timestamp_ns, .. }
            | Event::Batch { timestamp_ns, .. }
            | Event::Lifecycle { timestamp_ns, .. }
            | Event::Component { timestamp_ns, .. } => *timestamp_ns,
        }
    }
}
