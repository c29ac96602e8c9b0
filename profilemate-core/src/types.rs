//! The vocabulary of the field: phases, operations, components, lifecycle events.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The kind of a forward pass (engine step).
///
/// ```
/// use profilemate_core::Phase;
/// assert_eq!(Phase::from_token_mix(512, 0), Phase::Prefill);
/// assert_eq!(Phase::from_token_mix(0, 32), Phase::Decode);
/// assert_eq!(Phase::from_token_mix(256, 31), Phase::Mixed);
/// assert_eq!(Phase::Mixed.as_str(), "mixed");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Every sequence in the batch processes prompt tokens.
    Prefill,
    /// Every sequence in the batch generates one token.
    Decode,
    /// The batch holds both prompt chunks and decode tokens, as chunked prefill makes.
    Mixed,
}

impl Phase {
    /// All phases, in the order the contract lists them.
    pub const ALL: [Phase; 3] = [Phase::Prefill, Phase::Decode, Phase::Mixed];

    /// The phase of a batch from how many of its sequences are prefilling and how many decoding.
    ///
    /// A batch with neither is reported as `Decode`.
    #[inline]
    pub fn from_token_mix(prefill_seqs: u32, decode_seqs: u32) -> Phase {
        match (prefill_seqs > 0, decode_seqs > 0) {
            (true, true) => Phase::Mixed,
            (true, false) => Phase::Prefill,
            _ => Phase::Decode,
        }
    }

    /// The name used in files (`prefill`, `decode`, `mixed`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Phase::Prefill => "prefill",
            Phase::Decode => "decode",
            Phase::Mixed => "mixed",
        }
    }

    pub(crate) const fn index(self) -> usize {
        self as usize
    }

    pub(crate) fn from_index(i: u8) -> Phase {
        match i {
            0 => Phase::Prefill,
            1 => Phase::Decode,
            _ => Phase::Mixed,
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A CPU operation: one of the four built in, or one an engine registered by name with
/// [`Session::register_cpu_operation`](crate::Session::register_cpu_operation).
///
/// ```
/// use profilemate_core::CpuOp;
/// assert_eq!(CpuOp::SCHEDULING.id(), 0);
/// assert_eq!(CpuOp::BUILTIN_NAMES[CpuOp::SAMPLING.id() as usize], "sampling");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CpuOp(pub(crate) u16);

impl CpuOp {
    /// `scheduling`: choosing the next batch.
    pub const SCHEDULING: CpuOp = CpuOp(0);
    /// `batch_preparation`: building the input tensors of a batch.
    pub const BATCH_PREPARATION: CpuOp = CpuOp(1);
    /// `model_execution`: the host side of running the model.
    pub const MODEL_EXECUTION: CpuOp = CpuOp(2);
    /// `sampling`: choosing the next tokens.
    pub const SAMPLING: CpuOp = CpuOp(3);
    /// The file names of the built-in operations, indexed by id.
    pub const BUILTIN_NAMES: [&'static str; 4] = ["scheduling", "batch_preparation", "model_execution", "sampling"];
    /// The most operations a session can hold, built-in ones included.
    pub const MAX: usize = 1024;

    /// The operation's numeric id (stable within a session).
    pub const fn id(self) -> u16 {
        self.0
    }
}

/// A part of the model timed by the encoder/decoder profiler.
///
/// ```
/// use profilemate_core::Component;
/// assert_eq!(Component::CrossAttention.as_str(), "cross_attention");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Component {
    /// The encoder (audio encoder, vision encoder, text encoder).
    Encoder,
    /// The decoder (the language model).
    Decoder,
    /// Cross-attention, where it can be timed apart from the decoder.
    CrossAttention,
}

impl Component {
    /// All components, in contract order.
    pub const ALL: [Component; 3] = [Component::Encoder, Component::Decoder, Component::CrossAttention];

    /// The name used in files.
    pub const fn as_str(self) -> &'static str {
        match self {
            Component::Encoder => "encoder",
            Component::Decoder => "decoder",
            Component::CrossAttention => "cross_attention",
        }
    }

    pub(crate) fn from_index(i: u8) -> Component {
        match i {
            0 => Component::Encoder,
            1 => Component::Decoder,
            _ => Component::CrossAttention,
        }
    }
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The architecture of the served model, as far as component timing cares.
///
/// ```
/// use profilemate_core::ModelType;
/// assert_eq!(ModelType::EncoderDecoder.as_str(), "encoder_decoder");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelType {
    /// An encoder feeds a decoder: Whisper, T5, BART, and vision-language models (the vision
    /// tower is the encoder).
    EncoderDecoder,
    /// A decoder alone: GPT, LLaMA, Mistral.
    DecoderOnly,
}

impl ModelType {
    /// The name used in files.
    pub const fn as_str(self) -> &'static str {
        match self {
            ModelType::EncoderDecoder => "encoder_decoder",
            ModelType::DecoderOnly => "decoder_only",
        }
    }
}

/// A step in a request's life, as the preemption profiler records it.
///
/// ```
/// use profilemate_core::LifecycleEvent;
/// assert_eq!(LifecycleEvent::Preempted.as_str(), "preempted");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LifecycleEvent {
    /// The request began processing.
    Started,
    /// The request was taken off the running batch.
    Preempted,
    /// A preempted request runs again.
    Resumed,
    /// The request completed.
    Finished,
    /// The request was removed before completing (aborted, evicted).
    Evicted,
}

impl LifecycleEvent {
    /// Every event, in contract order.
    pub const ALL: [LifecycleEvent; 5] = [
        LifecycleEvent::Started,
        LifecycleEvent::Preempted,
        LifecycleEvent::Resumed,
        LifecycleEvent::Finished,
        LifecycleEvent::Evicted,
    ];

    /// The name used in files.
    pub const fn as_str(self) -> &'static str {
        match self {
            LifecycleEvent::Started => "started",
            LifecycleEvent::Preempted => "preempted",
            LifecycleEvent::Resumed => "resumed",
            LifecycleEvent::Finished => "finished",
            LifecycleEvent::Evicted => "evicted",
        }
    }

    pub(crate) fn from_index(i: u8) -> LifecycleEvent {
        match i {
            0 => LifecycleEvent::Started,
            1 => LifecycleEvent::Preempted,
            2 => LifecycleEvent::Resumed,
            3 => LifecycleEvent::Finished,
            _ => LifecycleEvent::Evicted,
        }
    }
}

impl fmt::Display for LifecycleEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a step did with CUDA graphs, for `cuda_graph_events.csv`.
///
/// ```
/// use profilemate_core::GraphEvent;
/// assert_eq!(GraphEvent::Replay.as_str(), "replay");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GraphEvent {
    /// A graph was captured for a batch size.
    Capture,
    /// A step replayed a captured graph (its batch padded to the captured size).
    Replay,
    /// A step ran eagerly, without a graph.
    Eager,
}

impl GraphEvent {
    /// Every event, in contract order.
    pub const ALL: [GraphEvent; 3] = [GraphEvent::Capture, GraphEvent::Replay, GraphEvent::Eager];

    /// The name used in files.
    pub const fn as_str(self) -> &'static str {
        match self {
            GraphEvent::Capture => "capture",
            GraphEvent::Replay => "replay",
            GraphEvent::Eager => "eager",
        }
    }

    pub(crate) fn from_index(i: u8) -> GraphEvent {
        match i {
            0 => GraphEvent::Capture,
            1 => GraphEvent::Replay,
            _ => GraphEvent::Eager,
        }
    }
}

/// The profilers and trackers a session can run, by the names `PROFILEMATE_DISABLE` accepts.
///
/// ```
/// use profilemate_core::ProfilerKind;
/// assert_eq!("cpu_timing".parse::<ProfilerKind>(), Ok(ProfilerKind::CpuTiming));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProfilerKind {
    /// Forward pass timing.
    ForwardPass,
    /// CPU operation timing.
    CpuTiming,
    /// Batch utilization.
    BatchUtilization,
    /// Preemptions and request lifecycle.
    Preemption,
    /// Encoder/decoder component timing.
    EncoderDecoder,
    /// KV cache usage tracker.
    KvCache,
    /// CUDA graph tracker.
    CudaGraph,
    /// Mixture-of-experts routing tracker.
    MoeExpert,
}

impl ProfilerKind {
    /// Every kind, in the order the contract lists them.
    pub const ALL: [ProfilerKind; 8] = [
        ProfilerKind::ForwardPass,
        ProfilerKind::CpuTiming,
        ProfilerKind::BatchUtilization,
        ProfilerKind::Preemption,
        ProfilerKind::EncoderDecoder,
        ProfilerKind::KvCache,
        ProfilerKind::CudaGraph,
        ProfilerKind::MoeExpert,
    ];
    /// The three trackers beyond the five profilers.
    pub const TRACKERS: [ProfilerKind; 3] = [ProfilerKind::KvCache, ProfilerKind::CudaGraph, ProfilerKind::MoeExpert];
    /// The five profilers.
    pub const FIVE: [ProfilerKind; 5] = [
        ProfilerKind::ForwardPass,
        ProfilerKind::CpuTiming,
        ProfilerKind::BatchUtilization,
        ProfilerKind::Preemption,
        ProfilerKind::EncoderDecoder,
    ];

    /// The configuration name.
    pub const fn as_str(self) -> &'static str {
        match self {
            ProfilerKind::ForwardPass => "forward_pass",
            ProfilerKind::CpuTiming => "cpu_timing",
            ProfilerKind::BatchUtilization => "batch_utilization",
            ProfilerKind::Preemption => "preemption",
            ProfilerKind::EncoderDecoder => "encoder_decoder",
            ProfilerKind::KvCache => "kv_cache",
            ProfilerKind::CudaGraph => "cuda_graph",
            ProfilerKind::MoeExpert => "moe_expert",
        }
    }

    pub(crate) const fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for ProfilerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ProfilerKind {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        ProfilerKind::ALL.into_iter().find(|k| k.as_str() == s).ok_or(())
    }
}

/// Why a recorded event did not reach the files. Every drop is counted per profiler and reason
/// and written to the run manifest.
///
/// ```
/// use profilemate_core::DropReason;
/// assert_eq!(DropReason::BufferFull.as_str(), "buffer_full");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    /// The recording thread's buffer was full: the collector could not keep up.
    BufferFull,
    /// A value made no sense: a negative or non-finite duration, or an empty request id.
    InvalidValue,
    /// A text field (request id, context, extra info) was longer than
    /// [`MAX_TEXT_BYTES`](crate::MAX_TEXT_BYTES).
    TextTooLong,
    /// The event was recorded after the session had shut down.
    SessionClosed,
    /// The timing backend could not time the event (no free GPU event, a driver error, or an
    /// event that never completed).
    Timing,
    /// A sink failed to write the row.
    SinkError,
}

impl DropReason {
    /// Every reason.
    pub const ALL: [DropReason; 6] = [
        DropReason::BufferFull,
        DropReason::InvalidValue,
        DropReason::TextTooLong,
        DropReason::SessionClosed,
        DropReason::Timing,
        DropReason::SinkError,
    ];

    /// The name used in the manifest.
    pub const fn as_str(self) -> &'static str {
        match self {
            DropReason::BufferFull => "buffer_full",
            DropReason::InvalidValue => "invalid_value",
            DropReason::TextTooLong => "text_too_long",
            DropReason::SessionClosed => "session_closed",
            DropReason::Timing => "timing",
            DropReason::SinkError => "sink_error",
        }
    }

    pub(crate) const fn index(self) -> usize {
        self as usize
    }
}
