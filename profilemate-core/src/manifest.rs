//! `profilemate_run.json`: what ran, where, and what was written or dropped.

use crate::config::Config;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The file name of the run manifest.
pub const MANIFEST_FILE: &str = "profilemate_run.json";

/// The version of the file format this library writes.
pub const FORMAT_VERSION: u32 = 1;

/// The run manifest, rewritten with every summary and at shutdown.
///
/// ```
/// use profilemate_core::{MemorySink, Session};
/// let memory = MemorySink::new();
/// let session = Session::builder().in_memory_only().sink(memory.clone()).build()?;
/// session.shutdown()?;
/// let manifest = memory.manifest().unwrap();
/// assert!(manifest.finished);
/// assert_eq!(manifest.dropped["forward_pass"]["buffer_full"], 0);
/// # Ok::<(), profilemate_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunManifest {
    /// [`FORMAT_VERSION`].
    pub format_version: u32,
    /// The version of profilemate that wrote the run.
    pub profilemate_version: String,
    /// Wall-clock time (RFC 3339, UTC) of `timestamp_sec = 0`.
    pub started_at: String,
    /// `CLOCK_MONOTONIC` nanoseconds at `timestamp_sec = 0`, so that files of processes on one
    /// host can be put on one time base.
    pub monotonic_start_ns: u64,
    /// The recording process.
    pub pid: u32,
    /// The host name.
    pub host: String,
    /// The configuration in force.
    pub config: Config,
    /// The timing backend used for forward passes and components.
    pub timing_backend: String,
    /// The profilers that ran.
    pub profilers: Vec<String>,
    /// The sinks that received rows.
    pub sinks: Vec<String>,
    /// Rows produced per CSV file name.
    pub rows: BTreeMap<String, u64>,
    /// Events dropped, per profiler, per reason (every reason listed, 0 when none).
    pub dropped: BTreeMap<String, BTreeMap<String, u64>>,
    /// Errors per sink (writes, flushes, summaries that failed).
    pub sink_errors: BTreeMap<String, u64>,
    /// Forward passes seen.
    pub steps: u64,
    /// Seconds since `timestamp_sec = 0` when this manifest was written.
    pub elapsed_sec: f64,
    /// `true` once the session shut down cleanly; a killed process leaves `false`.
    pub finished: bool,
    /// Bytes written per table file (`forward_pass_timing.csv`, `forward_pass_timing.parquet`,
    /// ...) over the whole run, including files an output budget removed since.
    #[serde(default)]
    pub bytes_written: BTreeMap<String, u64>,
    /// `bytes_written` divided by `steps` (0 when no step ran).
    #[serde(default)]
    pub bytes_per_step: BTreeMap<String, f64>,
    /// The output budget in force and what it did; absent without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_budget: Option<OutputBudgetReport>,
}

/// What the output budget (`PROFILEMATE_MAX_OUTPUT_MB`) did, in the run manifest.
///
/// ```
/// let report = profilemate_core::OutputBudgetReport { max_bytes: 1 << 20, ..Default::default() };
/// assert!(report.removed_files.is_empty());
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputBudgetReport {
    /// The most bytes the CSV and Parquet tables may take on disk together.
    pub max_bytes: u64,
    /// Table files rolled over (closed and numbered), oldest first.
    pub rolled_files: Vec<String>,
    /// Rolled files removed to stay within the budget, oldest first.
    pub removed_files: Vec<String>,
}

impl RunManifest {
    /// The manifest of a session that recorded nothing.
    pub(crate) fn disabled() -> RunManifest {
        RunManifest {
            format_version: FORMAT_VERSION,
            profilemate_version: env!("CARGO_PKG_VERSION").to_string(),
            started_at: String::new(),
            monotonic_start_ns: 0,
            pid: std::process::id(),
            host: String::new(),
            config: Config { enabled: false, ..Config::default() },
            timing_backend: String::new(),
            profilers: Vec::new(),
            sinks: Vec::new(),
            rows: BTreeMap::new(),
            dropped: BTreeMap::new(),
            sink_errors: BTreeMap::new(),
            steps: 0,
            elapsed_sec: 0.0,
            finished: true,
            bytes_written: BTreeMap::new(),
            bytes_per_step: BTreeMap::new(),
            output_budget: None,
        }
    }

    /// Events dropped in all, every profiler and reason together.
    ///
    /// ```
    /// let memory = profilemate_core::MemorySink::new();
    /// let session = profilemate_core::Session::builder().in_memory_only().sink(memory).build()?;
    /// assert_eq!(session.shutdown()?.total_dropped(), 0);
    /// # Ok::<(), profilemate_core::Error>(())
    /// ```
    pub fn total_dropped(&self) -> u64 {
        self.dropped.values().flat_map(|r| r.values()).sum()
    }
}
