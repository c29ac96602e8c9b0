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
//!
//! ## Other formats and integrations
//!
//! - `PROFILEMATE_SINKS=csv,json,perfetto` adds a timeline, `profilemate_trace.json`, that
//!   <https://ui.perfetto.dev> opens ([`PerfettoSink`]).
//! - `PROFILEMATE_SINKS=csv,json,parquet` (cargo feature `parquet`) adds the tables as Parquet
//!   files with `host` and `rank` columns, for DuckDB, Polars or Spark across ranks
//!   (`ParquetSink`).
//! - `PROFILEMATE_SINKS=csv,json,metrics` (cargo feature `metrics`) records live series
//!   (`profilemate_forward_pass_duration_seconds`, `profilemate_steps_total`, ...) through the
//!   `metrics` facade into the recorder the application installed, for example
//!   `metrics-exporter-prometheus`'s `/metrics` endpoint (`MetricsSink`; install the recorder
//!   before building the session).
//! - The cargo feature `tracing` adds `tracing_layer`: `tracing` spans mapped by name to CPU
//!   operations are timed without profilemate calls in the engine's code.

pub use profilemate_core::*;
pub use profilemate_sinks::{
    recover_buffers, standard_sinks, BufferRecovery, CsvSink, JsonSummarySink, PerfettoSink, TableFollower,
    FOLLOWED_TABLES,
};
#[cfg(feature = "metrics")]
pub use profilemate_sinks::{MetricsSink, DURATION_BUCKETS_SECONDS, METRICS_SERIES};
#[cfg(feature = "parquet")]
pub use profilemate_sinks::{ParquetCompletion, ParquetSink};

#[cfg(feature = "tracing")]
pub mod tracing_layer;

/// CUDA-event timing (the `cuda` feature): the `profilemate-cuda` crate. [`builder`] and
/// [`from_env`] install its [`backend_factory`](cuda::backend_factory); an engine timing its own
/// stream gives [`SessionBuilder::timing_backend`] a [`cuda::CudaTimingBackend`].
#[cfg(feature = "cuda")]
pub use profilemate_cuda as cuda;

/// A session builder with the standard writers installed: those `PROFILEMATE_SINKS` names
/// (`csv`, `json`, `perfetto`, and `parquet` with the `parquet` feature).
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
    let builder = Session::builder()
        .sink_factory(standard_sinks)
        .recovery_hook(|dir| profilemate_sinks::recover_buffers(dir).map(|_| ()));
    // With the `cuda` feature, `auto` and `cuda` time on the GPU where one is usable.
    #[cfg(feature = "cuda")]
    let builder = builder.backend_factory(profilemate_cuda::backend_factory);
    builder
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

#[cfg(all(test, feature = "cuda"))]
mod cuda_tests {
    use super::*;

    /// `PROFILEMATE_DIR` only, as if from the environment: `PROFILEMATE_BACKEND` unset.
    fn config(dir: &std::path::Path, backend: Option<&str>) -> Config {
        Config::from_lookup(|name| match name {
            env::DIR => Some(dir.display().to_string()),
            env::BACKEND => backend.map(str::to_string),
            _ => None,
        })
        .expect("a valid configuration")
    }

    #[test]
    fn without_a_gpu_the_facade_times_with_the_host_clock() {
        let dir = tempfile::tempdir().unwrap();
        let session = builder().config(config(dir.path(), None)).build().unwrap();
        session.forward_pass().start(Phase::Decode, 4, 4).stop();
        let manifest = session.shutdown().unwrap();
        let expected = if cuda::probe().is_ok() { "cuda" } else { "host" };
        assert_eq!(manifest.timing_backend, expected);
        let written: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join(MANIFEST_FILE)).unwrap()).unwrap();
        assert_eq!(written["timing_backend"], expected);
    }

    #[test]
    fn demanding_cuda_without_a_gpu_is_an_error_that_says_why() {
        let Err(why) = cuda::probe() else { return };
        let dir = tempfile::tempdir().unwrap();
        let err = builder().config(config(dir.path(), Some("cuda"))).build().unwrap_err();
        assert!(matches!(err, Error::BackendUnavailable { .. }), "{err}");
        assert!(err.to_string().contains(&why.to_string()), "{err}");
    }
}
