//! Configuration: from code, or from `PROFILEMATE_*` environment variables.

use crate::error::{Error, Result};
use crate::types::ProfilerKind;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Which clock times forward passes and components.
///
/// ```
/// use profilemate_core::BackendChoice;
/// assert_eq!("host".parse::<BackendChoice>(), Ok(BackendChoice::Host));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendChoice {
    /// CUDA events where a GPU backend was supplied and works, the host clock otherwise.
    Auto,
    /// The host clock (a TSC read where the CPU has a reliable one).
    Host,
    /// CUDA events; building the session fails if they cannot be used.
    Cuda,
}

impl std::str::FromStr for BackendChoice {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(BackendChoice::Auto),
            "host" => Ok(BackendChoice::Host),
            "cuda" => Ok(BackendChoice::Cuda),
            _ => Err(()),
        }
    }
}

/// An output format, by the names `PROFILEMATE_SINKS` accepts.
///
/// ```
/// use profilemate_core::SinkKind;
/// assert_eq!("json".parse::<SinkKind>(), Ok(SinkKind::Json));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SinkKind {
    /// The contract CSV tables.
    Csv,
    /// The contract JSON summaries.
    Json,
    /// Parquet tables.
    Parquet,
    /// A Chrome trace / Perfetto timeline.
    Perfetto,
    /// Live series through the `metrics` facade (Prometheus and the like); writes no file.
    Metrics,
}

impl SinkKind {
    /// Every format name.
    pub const ALL: [SinkKind; 5] =
        [SinkKind::Csv, SinkKind::Json, SinkKind::Parquet, SinkKind::Perfetto, SinkKind::Metrics];

    /// The configuration name.
    pub const fn as_str(self) -> &'static str {
        match self {
            SinkKind::Csv => "csv",
            SinkKind::Json => "json",
            SinkKind::Parquet => "parquet",
            SinkKind::Perfetto => "perfetto",
            SinkKind::Metrics => "metrics",
        }
    }
}

impl std::str::FromStr for SinkKind {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        SinkKind::ALL.into_iter().find(|k| k.as_str() == s).ok_or(())
    }
}

/// The smallest per-thread buffer: an event carrying [`MAX_TEXT_BYTES`](crate::MAX_TEXT_BYTES)
/// of text takes 65 slots, and such an event must fit in an empty buffer.
pub const MIN_BUFFER_EVENTS: usize = 128;

/// Everything a session needs to know, with the contract's defaults.
///
/// Build it in code, or read it from the environment with [`Config::from_env`]:
///
/// | field | variable | default |
/// | --- | --- | --- |
/// | `enabled` | `PROFILEMATE_ENABLED` (0/1) | 1 |
/// | `dir` | `PROFILEMATE_DIR` | `./profilemate_out` |
/// | `log_interval` | `PROFILEMATE_LOG_INTERVAL` (steps, > 0) | 100 |
/// | `verbose` | `PROFILEMATE_VERBOSE` (0/1) | 0 |
/// | `backend` | `PROFILEMATE_BACKEND` (`auto`, `host`, `cuda`) | `auto` |
/// | `cuda_event_batch` | `PROFILEMATE_CUDA_EVENT_BATCH` (> 0) | 100 |
/// | `disabled` | `PROFILEMATE_DISABLE` (comma list of profiler names) | none |
/// | `sinks` | `PROFILEMATE_SINKS` (comma list: `csv`, `json`, `parquet`, `perfetto`, `metrics`) | `csv,json` |
/// | `buffer_events` | `PROFILEMATE_BUFFER_EVENTS` (per recording thread, >= 128) | 16384 |
/// | `flush_interval_ms` | `PROFILEMATE_FLUSH_MS` (collector period, 1..=60000) | 100 |
/// | `moe_window_steps` | `PROFILEMATE_MOE_WINDOW` (steps per `moe_expert_routing.csv` window, or `step`) | 100 |
/// | `max_output_bytes` | `PROFILEMATE_MAX_OUTPUT_MB` (CSV and Parquet tables together, >= 1) | none |
///
/// A malformed value is an error naming the variable, the value and what is accepted; it never
/// silently becomes the default.
///
/// ```
/// use profilemate_core::{Config, ProfilerKind};
///
/// let env = [("PROFILEMATE_DIR", "/tmp/run1"), ("PROFILEMATE_DISABLE", "preemption, encoder_decoder")];
/// let config = Config::from_lookup(|name| {
///     env.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
/// })?;
/// assert_eq!(config.dir, std::path::PathBuf::from("/tmp/run1"));
/// assert!(!config.is_enabled(ProfilerKind::Preemption));
/// assert!(config.is_enabled(ProfilerKind::ForwardPass));
/// # Ok::<(), profilemate_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Config {
    /// Whether anything is recorded at all. A disabled session hands out handles that do nothing.
    pub enabled: bool,
    /// The output directory; created if missing.
    pub dir: PathBuf,
    /// Summaries are rewritten every this many forward passes (and at shutdown).
    pub log_interval: u64,
    /// Log each profiler's activity to stderr.
    pub verbose: bool,
    /// Which clock times forward passes and components.
    pub backend: BackendChoice,
    /// CUDA events are resolved in batches of this many.
    pub cuda_event_batch: usize,
    /// Profilers turned off.
    pub disabled: Vec<ProfilerKind>,
    /// Output formats.
    pub sinks: Vec<SinkKind>,
    /// Events each recording thread can buffer before the collector drains them; more are
    /// dropped and counted.
    pub buffer_events: usize,
    /// How often the collector drains the buffers, in milliseconds. Files are flushed after
    /// every pass.
    pub flush_interval_ms: u64,
    /// Token utilization below this percentage counts as an underutilization event.
    pub underutilization_threshold_pct: f64,
    /// `moe_expert_routing.csv` holds each layer's tokens per expert summed over windows of at
    /// least this many steps (a window closes at the first collector pass after it has that
    /// many); 0 writes one row per layer, expert and step instead (per-step detail, through a
    /// buffer of its own). The totals in `moe_expert_summary.json` are exact either way.
    #[serde(default = "default_moe_window_steps")]
    pub moe_window_steps: u64,
    /// The most bytes the CSV and Parquet tables may take on disk together; beyond it they roll
    /// over into numbered files and the oldest are removed (the JSON summaries stay exact for
    /// the whole run). `None`: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_output_bytes: Option<u64>,
}

fn default_moe_window_steps() -> u64 {
    DEFAULT_MOE_WINDOW_STEPS
}

/// The default window of `moe_expert_routing.csv`, in steps.
pub const DEFAULT_MOE_WINDOW_STEPS: u64 = 100;

/// The smallest output budget `PROFILEMATE_MAX_OUTPUT_MB` accepts, in bytes (1 MB).
pub const MIN_OUTPUT_BYTES: u64 = 1 << 20;

impl Default for Config {
    fn default() -> Self {
        Config {
            enabled: true,
            dir: PathBuf::from("profilemate_out"),
            log_interval: 100,
            verbose: false,
            backend: BackendChoice::Auto,
            cuda_event_batch: 100,
            disabled: Vec::new(),
            sinks: vec![SinkKind::Csv, SinkKind::Json],
            buffer_events: 16 * 1024,
            flush_interval_ms: 100,
            underutilization_threshold_pct: 50.0,
            moe_window_steps: DEFAULT_MOE_WINDOW_STEPS,
            max_output_bytes: None,
        }
    }
}

/// The names of the environment variables [`Config::from_env`] reads.
pub mod env {
    /// `0` turns the whole session off.
    pub const ENABLED: &str = "PROFILEMATE_ENABLED";
    /// Output directory.
    pub const DIR: &str = "PROFILEMATE_DIR";
    /// Summary period in steps.
    pub const LOG_INTERVAL: &str = "PROFILEMATE_LOG_INTERVAL";
    /// Verbose logging.
    pub const VERBOSE: &str = "PROFILEMATE_VERBOSE";
    /// Timing backend.
    pub const BACKEND: &str = "PROFILEMATE_BACKEND";
    /// CUDA event batch.
    pub const CUDA_EVENT_BATCH: &str = "PROFILEMATE_CUDA_EVENT_BATCH";
    /// Profilers turned off.
    pub const DISABLE: &str = "PROFILEMATE_DISABLE";
    /// Output formats.
    pub const SINKS: &str = "PROFILEMATE_SINKS";
    /// Per-thread buffer size in events.
    pub const BUFFER_EVENTS: &str = "PROFILEMATE_BUFFER_EVENTS";
    /// Collector period in milliseconds.
    pub const FLUSH_MS: &str = "PROFILEMATE_FLUSH_MS";
    /// MoE routing rows: steps per window, or `step` for one row per step.
    pub const MOE_WINDOW: &str = "PROFILEMATE_MOE_WINDOW";
    /// Output budget of the CSV and Parquet tables, in megabytes (2^20 bytes).
    pub const MAX_OUTPUT_MB: &str = "PROFILEMATE_MAX_OUTPUT_MB";
}

fn invalid(name: &str, value: &str, expected: impl Into<String>) -> Error {
    Error::InvalidSetting { name: name.to_string(), value: value.to_string(), expected: expected.into() }
}

pub(crate) fn parse_bool(name: &str, value: &str) -> Result<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(invalid(name, value, "0 or 1 (also true/false, yes/no, on/off)")),
    }
}

fn parse_int<T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy>(
    name: &str,
    value: &str,
    min: T,
    max: T,
) -> Result<T> {
    match value.trim().parse::<T>() {
        Ok(v) if v >= min && v <= max => Ok(v),
        _ => Err(invalid(name, value, format!("a whole number from {min} to {max}"))),
    }
}

fn parse_list<T: std::str::FromStr>(name: &str, value: &str, accepted: &[&str]) -> Result<Vec<T>> {
    let mut out = Vec::new();
    for item in value.split(',').map(str::trim) {
        if item.is_empty() {
            continue;
        }
        match item.to_ascii_lowercase().parse::<T>() {
            Ok(v) => out.push(v),
            Err(_) => {
                return Err(invalid(
                    name,
                    value,
                    format!("a comma-separated list of: {} (`{item}` is not one of them)", accepted.join(", ")),
                ))
            }
        }
    }
    Ok(out)
}

impl Config {
    /// Reads the configuration from the process environment (`PROFILEMATE_*`), starting from
    /// the defaults.
    ///
    /// ```
    /// let config = profilemate_core::Config::from_env()?;
    /// println!("profilemate will write to {}", config.dir.display());
    /// # Ok::<(), profilemate_core::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidSetting`] for a malformed or non-UTF-8 value.
    pub fn from_env() -> Result<Config> {
        let mut bad_unicode = None;
        let config = Config::from_lookup(|name| match std::env::var(name) {
            Ok(v) => Some(v),
            Err(std::env::VarError::NotPresent) => None,
            Err(std::env::VarError::NotUnicode(v)) => {
                bad_unicode.get_or_insert((name.to_string(), v.to_string_lossy().into_owned()));
                None
            }
        });
        if let Some((name, value)) = bad_unicode {
            return Err(invalid(&name, &value, "valid UTF-8 text"));
        }
        config
    }

    /// Reads the configuration through `lookup`, which returns the value of a variable by name
    /// (or `None` when unset). Tests and language bindings use it to supply their own
    /// environment.
    ///
    /// ```
    /// use profilemate_core::Config;
    /// let config = Config::from_lookup(|name| (name == "PROFILEMATE_LOG_INTERVAL").then(|| "10".to_string()))?;
    /// assert_eq!(config.log_interval, 10);
    /// # Ok::<(), profilemate_core::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidSetting`] naming the first malformed variable.
    pub fn from_lookup(mut lookup: impl FnMut(&str) -> Option<String>) -> Result<Config> {
        let mut c = Config::default();
        if let Some(v) = lookup(env::ENABLED) {
            c.enabled = parse_bool(env::ENABLED, &v)?;
        }
        if let Some(v) = lookup(env::DIR) {
            if v.trim().is_empty() {
                return Err(invalid(env::DIR, &v, "a directory path"));
            }
            c.dir = PathBuf::from(v);
        }
        if let Some(v) = lookup(env::LOG_INTERVAL) {
            c.log_interval = parse_int(env::LOG_INTERVAL, &v, 1u64, u64::MAX)?;
        }
        if let Some(v) = lookup(env::VERBOSE) {
            c.verbose = parse_bool(env::VERBOSE, &v)?;
        }
        if let Some(v) = lookup(env::BACKEND) {
            c.backend = v.parse().map_err(|_| invalid(env::BACKEND, &v, "`cuda`, `host` or `auto`"))?;
        }
        if let Some(v) = lookup(env::CUDA_EVENT_BATCH) {
            c.cuda_event_batch = parse_int(env::CUDA_EVENT_BATCH, &v, 1usize, 1 << 20)?;
        }
        if let Some(v) = lookup(env::DISABLE) {
            let names: Vec<&str> = ProfilerKind::ALL.iter().map(|k| k.as_str()).collect();
            c.disabled = parse_list(env::DISABLE, &v, &names)?;
        }
        if let Some(v) = lookup(env::SINKS) {
            let names: Vec<&str> = SinkKind::ALL.iter().map(|k| k.as_str()).collect();
            c.sinks = parse_list(env::SINKS, &v, &names)?;
            if c.sinks.is_empty() {
                return Err(invalid(env::SINKS, &v, format!("at least one of: {}", names.join(", "))));
            }
        }
        if let Some(v) = lookup(env::BUFFER_EVENTS) {
            c.buffer_events = parse_int(env::BUFFER_EVENTS, &v, MIN_BUFFER_EVENTS, 1 << 26)?;
        }
        if let Some(v) = lookup(env::FLUSH_MS) {
            c.flush_interval_ms = parse_int(env::FLUSH_MS, &v, 1u64, 60_000)?;
        }
        if let Some(v) = lookup(env::MOE_WINDOW) {
            c.moe_window_steps = if v.trim().eq_ignore_ascii_case("step") {
                0
            } else {
                parse_int(env::MOE_WINDOW, &v, 1u64, 1_000_000_000).map_err(|_| {
                    invalid(env::MOE_WINDOW, &v, "a number of steps from 1 to 1000000000, or `step` for per-step rows")
                })?
            };
        }
        if let Some(v) = lookup(env::MAX_OUTPUT_MB) {
            let mb = parse_int(env::MAX_OUTPUT_MB, &v, 1u64, 1 << 40)?;
            c.max_output_bytes = Some(mb << 20);
        }
        Ok(c)
    }

    /// Whether profiler `kind` records in a session built from this configuration.
    pub fn is_enabled(&self, kind: ProfilerKind) -> bool {
        self.enabled && !self.disabled.contains(&kind)
    }

    /// Checks values that code (rather than the environment) may have set out of range.
    pub(crate) fn validate(&self) -> Result<()> {
        if self.log_interval == 0 {
            return Err(invalid("log_interval", "0", "a number of steps greater than 0"));
        }
        if self.cuda_event_batch == 0 {
            return Err(invalid("cuda_event_batch", "0", "a batch size greater than 0"));
        }
        if self.buffer_events < MIN_BUFFER_EVENTS {
            return Err(invalid(
                "buffer_events",
                &self.buffer_events.to_string(),
                "at least 128 events (an event with the longest text takes 65)",
            ));
        }
        if !(1..=60_000).contains(&self.flush_interval_ms) {
            return Err(invalid("flush_interval_ms", &self.flush_interval_ms.to_string(), "1 to 60000 milliseconds"));
        }
        if let Some(bytes) = self.max_output_bytes {
            if bytes < MIN_OUTPUT_BYTES {
                return Err(invalid("max_output_bytes", &bytes.to_string(), "at least 1048576 bytes (1 MB)"));
            }
        }
        let t = self.underutilization_threshold_pct;
        if !(0.0..=100.0).contains(&t) {
            return Err(invalid("underutilization_threshold_pct", &t.to_string(), "a percentage from 0 to 100"));
        }
        Ok(())
    }
}
