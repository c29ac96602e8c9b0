//! # profilemate-vllm
//!
//! The native half of the vLLM binding of profilemate. The Python package `profilemate_vllm`
//! is a vLLM plugin (`vllm.general_plugins`) that observes vLLM's scheduler and model runner in
//! every process and calls into this crate's extension module, `profilemate_vllm._native`,
//! which records through the profilemate core. All aggregation and file writing happens here.
//!
//! ## For Rust users
//!
//! Two pieces are useful without Python:
//!
//! - [`binding_config`]: the core's configuration read from `PROFILEMATE_*` and the seed's
//!   `VLLM_PROFILING_*` variable names;
//! - [`merge`]: the top-level contract files of a multi-process run, built from the part each
//!   process wrote (`DIR/parts/<run>/<role>-<pid>/`), on one `CLOCK_MONOTONIC` time base;
//! - [`PartsSeries`]: the live Prometheus series of every part of a run, rendered in one process
//!   from the rows the parts completed so far (what vLLM's API server adds to its `/metrics`).
//!
//! ```
//! let dir = tempfile::tempdir()?;
//! let run = dir.path().join("parts/20250101T000000Z-1/main-1");
//! let session = profilemate::builder().dir(&run).build()?;
//! session.forward_pass().record_ms(profilemate::Phase::Decode, 4, 4, 1.5);
//! session.shutdown()?;
//! let report = profilemate_vllm::merge(dir.path(), None)?;
//! assert_eq!(report.rows["forward_pass_timing.csv"], 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! ## Building the Python package
//!
//! `pip install ./profilemate-vllm` (maturin builds the `extension-module` feature). `cargo
//! build`/`cargo test` leave that feature off, so Rust tests link libpython normally.

mod config;
mod live;
mod merge;
mod python;
mod step_functions;
mod step_path;

pub use config::{
    binding_config, is_activated, DEFAULT_DIR, DEFAULT_FLUSH_MS, VLLM_ALIASES, VLLM_PROFILING_DIR,
    VLLM_PROFILING_USE_CUDA_EVENTS,
};
pub use live::PartsSeries;
pub use merge::{merge, runs, MergeError, MergeReport, PartReport, PARTS_DIR, PART_FILE};
