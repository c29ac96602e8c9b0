//! # profilemate
//!
//! Step-by-step profiling for LLM inference servers. profilemate tells an engine where each
//! step's time goes (forward passes by phase, scheduling, batch preparation, sampling, batch
//! utilization against the scheduler's limits, preemptions and request lifecycles, encoder
//! versus decoder time) at a cost the engine does not notice, and writes the files that the
//! original vLLM profiling scripts' users already analyse with pandas.
//!
//! ## Quick start
//!
//! ```
//! use profilemate::{CpuOp, Phase};
//! # let dir = tempfile::tempdir()?; std::env::set_var("PROFILEMATE_DIR", dir.path());
//!
//! let session = profilemate::from_env()?; // PROFILEMATE_DIR, PROFILEMATE_LOG_INTERVAL, ...
//! let (forward, cpu) = (session.forward_pass(), session.cpu_timing());
//! for step in 0..100 {
//!     let scheduling = cpu.start(CpuOp::SCHEDULING); /* pick the batch */ scheduling.stop();
//!     let phase = if step == 0 { Phase::Prefill } else { Phase::Decode };
//!     let pass = forward.start(phase, 8, if step == 0 { 1024 } else { 8 }); /* run the model */ pass.stop();
//! }
//! let manifest = session.shutdown()?; // writes the last rows, the summaries and profilemate_run.json
//! # assert_eq!(manifest.steps, 100);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! The output directory then holds `forward_pass_timing.csv`, `cpu_operations_timing.csv`,
//! `batch_utilization.csv`, `preemption_events.csv`, `request_lifecycle.csv`,
//! `encoder_decoder_timing.csv`, the five `*_summary.json` files and `profilemate_run.json`.
//!
//! ## Where to go next
//!
//! - [`Session`] and its handles: [`ForwardPass`], [`CpuTiming`], [`BatchUtilization`],
//!   [`Requests`], [`Components`].
//! - [`Config`] for every setting and its `PROFILEMATE_*` variable.
//! - [`Sink`] to send rows and summaries somewhere else; [`TimingBackend`] for device clocks.
//!
//! Build sessions with [`builder`] or [`from_env`] from this crate: they install the standard
//! CSV and JSON writers. `Session::builder()` alone (from `profilemate-core`) has no file writers.

pub use profilemate_core::*;
pub use profilemate_sinks::{standard_sinks, CsvSink, JsonSummarySink};

/// A session builder with the standard writers (`csv`, `json`) installed.
///
/// ```
/// let dir = tempfile::tempdir()?;
/// let session = profilemate::builder().dir(dir.path()).log_interval(10).build()?;
/// session.forward_pass().start(profilemate::Phase::Prefill, 1, 32).stop();
/// session.shutdown()?;
/// assert!(dir.path().join("forward_pass_timing.csv").exists());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn builder() -> SessionBuilder {
    Session::builder().sink_factory(standard_sinks)
}

/// A session configured from `PROFILEMATE_*` environment variables, with the standard writers.
///
/// `PROFILEMATE_ENABLED=0` gives a disabled session whose handles record nothing.
///
/// ```
/// # let dir = tempfile::tempdir()?; std::env::set_var("PROFILEMATE_DIR", dir.path());
/// let session = profilemate::from_env()?;
/// println!("profiling into {}", session.dir().unwrap().display());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
///
/// As [`SessionBuilder::build`], and [`Error::InvalidSetting`] for a malformed variable.
pub fn from_env() -> Result<Session> {
    builder().from_env()?.build()
}
