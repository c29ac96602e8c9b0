//! # profilemate-sinks
//!
//! Output formats for profilemate: the contract CSV tables ([`CsvSink`]), the JSON summaries
//! ([`JsonSummarySink`]), a Chrome trace / Perfetto timeline ([`PerfettoSink`]) and, with the
//! `parquet` feature, Parquet tables (`ParquetSink`). [`standard_sinks`] builds the ones a
//! configuration asks for; the `profilemate` facade installs it, so
//! `PROFILEMATE_SINKS=csv,json,parquet,perfetto` just works.
//!
//! | `PROFILEMATE_SINKS` name | sink | files | cargo feature |
//! | --- | --- | --- | --- |
//! | `csv` | [`CsvSink`] | `forward_pass_timing.csv`, ... | always |
//! | `json` | [`JsonSummarySink`] | `forward_pass_summary.json`, ... | always |
//! | `perfetto` | [`PerfettoSink`] | `profilemate_trace.json` (then `profilemate_trace.1.json`, ...) | always |
//! | `parquet` | `ParquetSink` | `forward_pass_timing.parquet`, ... | `parquet` |
//! | `metrics` | `MetricsSink` | none: live series through the `metrics` facade | `metrics` |
//!
//! ```
//! use profilemate_core::{Phase, Session};
//!
//! let dir = tempfile::tempdir()?;
//! let session = Session::builder()
//!     .dir(dir.path())
//!     .sink_factory(profilemate_sinks::standard_sinks)
//!     .build()?;
//! session.forward_pass().start(Phase::Prefill, 1, 64).stop();
//! session.shutdown()?;
//! let csv = std::fs::read_to_string(dir.path().join("forward_pass_timing.csv"))?;
//! assert_eq!(csv.lines().count(), 2);
//! assert!(dir.path().join("forward_pass_summary.json").exists());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod budget;
mod csv_sink;
mod follow;
mod json_sink;
#[cfg(feature = "metrics")]
mod metrics_sink;
mod numbers;
#[cfg(feature = "parquet")]
mod parquet_sink;
mod perfetto_sink;
mod recover;

pub use budget::OutputBudget;
pub use csv_sink::CsvSink;
pub use follow::{TableFollower, FOLLOWED_TABLES};
pub use json_sink::JsonSummarySink;
#[cfg(feature = "metrics")]
pub use metrics_sink::{
    MetricsSink, SeriesInfo, SeriesKind, DURATION_BUCKETS_SECONDS, MAX_LABEL_VALUES, METRICS_SERIES, OTHER_LABEL,
};
#[cfg(feature = "parquet")]
pub use parquet_sink::{
    parquet_file_name, ParquetCompletion, ParquetSink, DEFAULT_ROW_GROUP_BYTES, DEFAULT_ROW_GROUP_ROWS, PARTIAL_SUFFIX,
};
pub use perfetto_sink::{
    trace_file_name, PerfettoSink, TraceCompletion, DEFAULT_MAX_EVENTS_PER_FILE, MAX_TRACKS_PER_KIND, TRACE_FILE,
};
pub use recover::{drop_torn_line, recover_buffers, replay_buffers, BufferRecovery};

use profilemate_core::{Config, Error, Sink, SinkError, SinkKind, Table};
use std::path::Path;
use std::sync::Arc;

/// The output formats this build can write.
pub const AVAILABLE: &[SinkKind] = &[
    SinkKind::Csv,
    SinkKind::Json,
    #[cfg(feature = "parquet")]
    SinkKind::Parquet,
    SinkKind::Perfetto,
    #[cfg(feature = "metrics")]
    SinkKind::Metrics,
];

/// The variables [`rank_from_env`] reads, first set first: profilemate's own, then those of
/// `torchrun` (and most launchers), Slurm, Open MPI, MPICH/PMI, and the node-local rank last.
pub const RANK_VARIABLES: [&str; 6] =
    ["PROFILEMATE_RANK", "RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "LOCAL_RANK"];

/// This process's rank in a distributed job, for the Parquet `rank` column and the trace's
/// process name: the first of [`RANK_VARIABLES`] that holds a whole number; `None` when none
/// does.
///
/// ```
/// assert_eq!(profilemate_sinks::rank_from_lookup(|name| (name == "RANK").then(|| "3".into())).unwrap(), Some(3));
/// assert_eq!(profilemate_sinks::rank_from_lookup(|_| None).unwrap(), None);
/// assert!(profilemate_sinks::rank_from_lookup(|name| (name == "PROFILEMATE_RANK").then(|| "first".into())).is_err());
/// ```
///
/// # Errors
///
/// [`Error::InvalidSetting`] when `PROFILEMATE_RANK` is set but not a whole number from 0; the
/// launchers' variables are skipped when malformed (they are not profilemate's to judge).
pub fn rank_from_lookup(mut lookup: impl FnMut(&str) -> Option<String>) -> Result<Option<i64>, Error> {
    for name in RANK_VARIABLES {
        let Some(value) = lookup(name) else { continue };
        match value.trim().parse::<i64>() {
            Ok(rank) if rank >= 0 => return Ok(Some(rank)),
            _ if name == "PROFILEMATE_RANK" => {
                return Err(Error::InvalidSetting {
                    name: name.into(),
                    value,
                    expected: "a whole number from 0 (this process's rank in a distributed job)".into(),
                })
            }
            _ => {}
        }
    }
    Ok(None)
}

/// [`rank_from_lookup`] on the process environment.
///
/// ```
/// let rank = profilemate_sinks::rank_from_env()?;
/// println!("rank {rank:?}");
/// # Ok::<(), profilemate_core::Error>(())
/// ```
///
/// # Errors
///
/// As [`rank_from_lookup`].
pub fn rank_from_env() -> Result<Option<i64>, Error> {
    rank_from_lookup(|name| std::env::var(name).ok())
}

fn setup_error(sink: &str, e: SinkError) -> Error {
    match e.downcast::<Error>() {
        Ok(e) => *e,
        Err(e) => Error::SinkSetup { sink: sink.into(), message: e.to_string() },
    }
}

/// Builds the sinks `config.sinks` names, writing into `dir`. Matches
/// [`profilemate_core::SinkFactory`].
///
/// ```
/// use profilemate_core::{Config, SinkKind};
///
/// let dir = tempfile::tempdir()?;
/// let mut config = Config::default();
/// config.sinks = vec![SinkKind::Csv, SinkKind::Perfetto];
/// let sinks = profilemate_sinks::standard_sinks(&config, dir.path())?;
/// assert_eq!(sinks.iter().map(|s| s.name()).collect::<Vec<_>>(), ["csv", "perfetto"]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
///
/// [`Error::SinkUnavailable`] for a format this build cannot write (`parquet` without the
/// `parquet` feature); [`Error::SinkSetup`] when a file cannot be created;
/// [`Error::InvalidSetting`] for a malformed `PROFILEMATE_RANK`.
pub fn standard_sinks(config: &Config, dir: &Path) -> Result<Vec<Box<dyn Sink>>, Error> {
    let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
    // One budget for the CSV and Parquet tables together.
    let budget = config.max_output_bytes.map(|max| {
        let tables = Table::ALL.iter().filter(|t| config.is_enabled(t.profiler())).count();
        let formats = config.sinks.iter().filter(|k| matches!(k, SinkKind::Csv | SinkKind::Parquet)).count();
        Arc::new(OutputBudget::new(max, tables * formats.max(1)))
    });
    for kind in &config.sinks {
        match kind {
            SinkKind::Csv => {
                let setup = |e: std::io::Error| Error::SinkSetup { sink: "csv".into(), message: e.to_string() };
                let mut sink = CsvSink::create(dir, config).map_err(setup)?;
                if let Some(budget) = &budget {
                    sink = sink.with_budget(budget.clone()).map_err(setup)?;
                }
                sinks.push(Box::new(sink));
            }
            SinkKind::Json => sinks.push(Box::new(JsonSummarySink::new(dir))),
            SinkKind::Perfetto => {
                let sink = PerfettoSink::create(dir).map_err(|e| setup_error("perfetto", e))?;
                sinks.push(Box::new(sink));
            }
            #[cfg(feature = "parquet")]
            SinkKind::Parquet => {
                let mut sink = ParquetSink::create(dir, config).map_err(|e| setup_error("parquet", e))?;
                if let Some(budget) = &budget {
                    sink = sink.with_budget(budget.clone()).map_err(|e| setup_error("parquet", e))?;
                }
                sinks.push(Box::new(sink));
            }
            #[cfg(not(feature = "parquet"))]
            SinkKind::Parquet => {
                let available: Vec<&str> = AVAILABLE.iter().map(|k| k.as_str()).collect();
                return Err(Error::SinkUnavailable {
                    sink: "parquet".into(),
                    available: format!(
                        "{}; build with the `parquet` cargo feature of `profilemate` (or `profilemate-sinks`) \
                         to write Parquet",
                        available.join(", ")
                    ),
                });
            }
            #[cfg(feature = "metrics")]
            SinkKind::Metrics => sinks.push(Box::new(MetricsSink::new())),
            #[cfg(not(feature = "metrics"))]
            SinkKind::Metrics => {
                let available: Vec<&str> = AVAILABLE.iter().map(|k| k.as_str()).collect();
                return Err(Error::SinkUnavailable {
                    sink: "metrics".into(),
                    available: format!(
                        "{}; build with the `metrics` cargo feature of `profilemate` (or `profilemate-sinks`) \
                         to record live series through the `metrics` facade",
                        available.join(", ")
                    ),
                });
            }
        }
    }
    Ok(sinks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(not(feature = "parquet"))]
    fn parquet_without_the_feature_says_which_feature_to_enable() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.sinks = vec![SinkKind::Csv, SinkKind::Parquet];
        let err = standard_sinks(&config, dir.path()).err().expect("parquet is not built in");
        assert!(matches!(err, Error::SinkUnavailable { .. }), "{err}");
        assert!(err.to_string().contains("`parquet` cargo feature"), "{err}");
    }

    #[test]
    #[cfg(not(feature = "metrics"))]
    fn metrics_without_the_feature_says_which_feature_to_enable() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.sinks = vec![SinkKind::Csv, SinkKind::Metrics];
        let err = standard_sinks(&config, dir.path()).err().expect("metrics is not built in");
        assert!(matches!(err, Error::SinkUnavailable { .. }), "{err}");
        assert!(err.to_string().contains("`metrics` cargo feature"), "{err}");
    }

    #[test]
    fn rank_comes_from_the_first_variable_set() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
        };
        assert_eq!(rank_from_lookup(env(&[("LOCAL_RANK", "1"), ("RANK", "9")])).unwrap(), Some(9));
        assert_eq!(rank_from_lookup(env(&[("PROFILEMATE_RANK", " 4 "), ("RANK", "9")])).unwrap(), Some(4));
        assert_eq!(rank_from_lookup(env(&[("RANK", "x"), ("LOCAL_RANK", "2")])).unwrap(), Some(2));
        let err = rank_from_lookup(env(&[("PROFILEMATE_RANK", "-1")])).unwrap_err();
        assert!(err.to_string().contains("PROFILEMATE_RANK"), "{err}");
    }
}
