//! # profilemate-core
//!
//! The core of profilemate: it tells an LLM inference server where each step's time goes, at
//! a cost the server does not notice. Most users depend on the `profilemate` facade, which adds
//! the CSV and JSON writers; this crate holds the recording API, the collector, the five
//! profilers, statistics and the extension traits.
//!
//! ## Quick start
//!
//! ```
//! use profilemate_core::{CpuOp, MemorySink, Phase, Session};
//!
//! let memory = MemorySink::new();
//! let session = Session::builder().in_memory_only().sink(memory.clone()).build()?;
//! let forward = session.forward_pass();
//! let cpu = session.cpu_timing();
//!
//! for step in 0..10 {
//!     let scheduling = cpu.start(CpuOp::SCHEDULING);
//!     let (phase, batch, tokens) = if step == 0 { (Phase::Prefill, 1, 512) } else { (Phase::Decode, 1, 1) };
//!     scheduling.stop();
//!     let pass = forward.start(phase, batch, tokens);
//!     // model.forward(...)
//!     pass.stop();
//! }
//! let manifest = session.shutdown()?;
//! assert_eq!(manifest.steps, 10);
//! let summary = memory.summaries().unwrap().forward_pass.unwrap();
//! assert_eq!((summary.prefill.count, summary.decode.count), (1, 9));
//! # Ok::<(), profilemate_core::Error>(())
//! ```
//!
//! ## Concepts
//!
//! - A [`Session`] is built from a [`Config`] (code or `PROFILEMATE_*` environment). It owns a
//!   collector thread and hands out handles: [`ForwardPass`], [`CpuTiming`],
//!   [`BatchUtilization`], [`Requests`] (lifecycle and preemptions) and [`Components`]
//!   (encoder/decoder), plus the trackers [`KvCacheUsage`], [`CudaGraphs`] and [`MoeRouting`].
//! - Handles write fixed-size records into a bounded buffer owned by the calling thread. The
//!   collector drains every buffer about every 100 ms, resolves times through the
//!   [`TimingBackend`], feeds the five [`Profiler`]s, and hands [`Rows`] and [`Summaries`] to
//!   every [`Sink`].
//! - A session that writes files keeps those buffers in a file mapping in its output directory
//!   (`.profilemate_buffers.<pid>.<n>`), which the kernel keeps when the process is killed:
//!   [`replay_dead_buffers`] (through `profilemate-sinks`' `recover_buffers`, or `profilemate
//!   recover DIR`) turns a dead session's records into rows, exactly once. A normal shutdown
//!   removes the file.
//! - [`Steps`] opens engine steps (a guard per step, or the forward pass alone): every row
//!   recorded in a step carries its id in a `step` column, and the collector joins them into
//!   `step_timeline.csv`, one row per step ([`StepTimelineRow`]).
//! - Files and their columns are fixed by the output contract (see the repository's
//!   `CONTRACT.md`): [`Table`] and [`SummaryFile`] name them.
//!
//! ## Performance
//!
//! Recording takes a clock reading (a TSC read, about 7 ns here) and a write into the thread's
//! buffer. It never allocates, locks, performs I/O, waits for a device, or returns a `Result`.
//! The first record of a thread into a session allocates (or maps) that thread's buffer once. A
//! full buffer drops the event and counts it; the counts reach the run manifest
//! (`profilemate_run.json`). A disabled session's handles test one pointer and return.
//!
//! ## Limits
//!
//! - Text per event (request id, reason, extra info, or context) is at most
//!   [`MAX_TEXT_BYTES`]; longer events are dropped and counted.
//! - Events are ordered by start time within each collector pass; events of different threads
//!   recorded more than a pass apart keep the order in which they were drained.

mod backend;
mod collector;
mod config;
mod error;
mod event;
mod handles;
mod manifest;
mod moe_counts;
mod profilers;
mod record;
mod recorder;
mod replay;
mod ring;
mod rows;
mod session;
mod sink;
mod stats;
mod step_timeline;
mod steps;
mod summary;
mod types;

pub use backend::{HostClock, Mark, Resolution, TimingBackend};
pub use config::{env, BackendChoice, Config, SinkKind, DEFAULT_MOE_WINDOW_STEPS, MIN_BUFFER_EVENTS, MIN_OUTPUT_BYTES};
pub use error::{Error, Result};
pub use event::Event;
pub use handles::{
    BatchSample, BatchUtilization, ComponentGuard, Components, CpuGuard, CpuTiming, CudaGraphs, ForwardGuard,
    ForwardPass, KvCacheSample, KvCacheUsage, MoeRouting, Requests, MAX_EXPERTS,
};
pub use manifest::{OutputBudgetReport, RunManifest, FORMAT_VERSION, MANIFEST_FILE};
pub use moe_counts::MAX_MOE_LAYERS;
pub use profilers::{
    BatchUtilizationProfiler, CpuTimingProfiler, CudaGraphProfiler, EncoderDecoderProfiler, ForwardPassProfiler,
    KvCacheProfiler, MoeExpertProfiler, PreemptionProfiler, Profiler,
};
pub use record::MAX_TEXT_BYTES;
pub use replay::{
    remove_replayed_buffers, replay_dead_buffers, BufferReplay, ReplaySinkFactory, ReplayTarget, ReplayedSession,
};
pub use rows::{
    ns_to_ms, ns_to_sec, BatchUtilizationRow, ComponentRow, CpuOperationRow, CudaGraphRow, ForwardPassRow, KvCacheRow,
    MoeRoutingRow, Outcome, PreemptionEventRow, RequestLifecycleRow, Rows, StepTimelineRow, Table,
    STEP_TIMELINE_COLUMNS,
};
pub use session::{BackendFactory, RecoveryHook, Session, SessionBuilder, SinkFactory};
pub use sink::{write_atomic, MemorySink, OutputFiles, Sink, SinkError};
pub use stats::{DurationStats, Mean};
pub use step_timeline::{StepPhaseStats, StepTimelineBuilder, StepTimelineSummary, ENCLOSING_OPERATIONS};
pub use steps::{StepGuard, Steps, MAX_STEP};
pub use summary::{
    component_shares, BatchUtilizationSummary, ComponentStats, CpuTimingSummary, CudaGraphSummary,
    EncoderDecoderSummary, ForwardPassSummary, KvCacheSummary, MoeExpertSummary, MoeLayerStats, OperationStats,
    PhaseStats, PreemptionSummary, Summaries, SummaryFile,
};
pub use types::{Component, CpuOp, DropReason, GraphEvent, LifecycleEvent, ModelType, Phase, ProfilerKind};
