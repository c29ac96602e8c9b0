//! `profilemate report`: the combined breakdown, the insights, the figures and an HTML page, from
//! any directory that follows the profilemate output contract.
//!
//! The seed's "Analysis Examples", "Optimization Insights" and "Combined Analysis" were pandas
//! and matplotlib snippets to copy and adapt; this crate is those snippets as one tool. It reads
//! only the contract's files (`forward_pass_timing.csv`, `*_summary.json`, ...), never a
//! profilemate API, so it works on the output of any engine that writes the contract.
//!
//! # Quick start
//!
//! ```text
//! profilemate report /tmp/vllm_profiling                 # text report with insights
//! profilemate report /tmp/vllm_profiling --json          # the same, one JSON object
//! profilemate report DIR --plots figures/ --html run.html
//! ```
//!
//! From Rust, for example to print the report when an engine shuts down:
//!
//! ```
//! # let dir = tempfile::tempdir()?;
//! # std::fs::write(dir.path().join("batch_utilization_summary.json"), r#"{"total_samples": 10,
//! #   "mean_seq_utilization_pct": 30.0, "mean_token_utilization_pct": 42.0, "underutilization_events": 6,
//! #   "underutilization_threshold_pct": 50.0, "prefill_avg_utilization": 80.0, "decode_avg_utilization": 20.0,
//! #   "mixed_avg_utilization": 0.0, "max_num_seqs": 256, "max_tokens": 8192, "mean_running_queue_len": 12.0,
//! #   "mean_waiting_queue_len": 0.0, "max_waiting_queue_len": 0}"#)?;
//! let report = profilemate_cli::Report::from_dir(dir.path())?;
//! print!("{report}");
//! assert!(report.insights.iter().any(|i| i.rule == profilemate_cli::Rule::LowTokenUtilization));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Concepts
//!
//! - [`RunData`] is what a directory holds: the rows of each CSV file and each JSON summary
//!   that exists. A missing file is `None`; a torn last CSV line (a process killed mid-write) is
//!   skipped with a warning in [`RunData::notes`]; anything else malformed is an error that names
//!   the file, the line and the column.
//! - [`Report`] is the combined breakdown: forward passes per phase, CPU operations and their
//!   share of step time, model components, batch utilization and queues, preemptions, and the
//!   three trackers beyond the five profilers: the KV cache (usage, full samples, prefix-cache
//!   hits, and how many preemptions came while it was full), CUDA graphs (captures, replay rate,
//!   padding, eager steps) and MoE experts (per-layer load imbalance, hottest experts). Each
//!   section comes from its JSON summary, or is recomputed from its CSV file when the summary is
//!   missing (with the same statistics the core uses). `Display` is the text report; `Serialize`
//!   gives the JSON one.
//! - [`Insight`]s are the seed's optimization insights as explicit rules ([`Rule`]) over the
//!   report's numbers: each carries the figure that fired it and the threshold it crossed
//!   ([`Thresholds`]). The seed's reading of `RECOMPUTE` preemptions as a CUDA graph problem is
//!   corrected: they point at KV-cache pressure.
//! - [`Figure`]s are the seed's plots, plus KV-cache usage with the preemptions on the same
//!   time axis, CUDA graph replays and eager steps per batch size with their padding, and a heat
//!   map of the load of each MoE layer's experts; drawn with plotters into PNG and SVG with an
//!   embedded font ([`write_plots`]); [`html::render`] puts the tables, the insights and the
//!   figures into one self-contained page.
//!
//! # Limits
//!
//! - Rows are held in memory while a report is made: about 100 bytes a row, so a run of ten
//!   million forward passes needs about a gigabyte. `moe_expert_routing.csv` is the exception:
//!   it is summed as it is read ([`MoeRouting`]). Figures thin long series to [`MAX_POINTS`]
//!   points per line.
//! - `moe_expert_routing.csv` has no row for an expert that received no token, so a layer
//!   recomputed from it (without `moe_expert_summary.json`) cannot see experts above the highest
//!   id that was ever routed to.

mod analysis;
pub mod breakdown;
pub mod compare;
pub mod contract;
mod data;
mod error;
pub mod html;
mod input;
pub mod insights;
mod note;
mod plots;
mod recompute;
mod recover;
mod report;
mod rules;
pub mod slow_steps;
pub mod timeline;

pub use data::{
    BatchRow, Component, ComponentRow, CpuOperationRow, CudaGraphRow, ForwardPassRow, GraphEvent, KvCacheRow,
    LifecycleEvent, LifecycleRow, MoeRouting, MoeRoutingRow, Phase, PreemptionEventRow, RunData, MAX_EXPERT_ID,
};
pub use error::ReportError;
pub use insights::{Comparison, Insight, Rule, Severity, Thresholds};
pub use plots::{write_plots, Figure, PlotOutput, MAX_POINTS};
pub use recover::{recover, Recovery};
pub use report::{
    BatchSection, ComponentSection, CpuSection, CudaGraphSection, ForwardPassSection, KvCacheSection,
    KvPreemptionMatch, MoeLayerSection, MoeSection, Note, NoteKind, PaddedGraph, PhaseShares, PreemptionSection,
    Report,
};
