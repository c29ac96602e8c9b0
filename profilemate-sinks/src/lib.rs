//! # profilemate-sinks
//!
//! Output formats for profilemate: the contract CSV tables ([`CsvSink`]) and JSON summaries
//! ([`JsonSummarySink`]). [`standard_sinks`] builds the ones a configuration asks for; the
//! `profilemate` facade installs it, so `PROFILEMATE_SINKS=csv,json` just works.
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

mod csv_sink;
mod json_sink;

pub use csv_sink::CsvSink;
pub use json_sink::JsonSummarySink;

use profilemate_core::{Config, Error, Sink, SinkKind};
use std::path::Path;

/// The output formats this build can write.
pub const AVAILABLE: &[SinkKind] = &[SinkKind::Csv, SinkKind::Json];

/// Builds the sinks `config.sinks` names, writing into `dir`. Matches
/// [`profilemate_core::SinkFactory`].
///
/// # Errors
///
/// [`Error::SinkUnavailable`] for a format this build cannot write; [`Error::SinkSetup`] when a
/// file cannot be created.
pub fn standard_sinks(config: &Config, dir: &Path) -> Result<Vec<Box<dyn Sink>>, Error> {
    let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
    for kind in &config.sinks {
        match kind {
            SinkKind::Csv => {
                let sink = CsvSink::create(dir, config)
                    .map_err(|e| Error::SinkSetup { sink: "csv".into(), message: e.to_string() })?;
                sinks.push(Box::new(sink));
            }
            SinkKind::Json => sinks.push(Box::new(JsonSummarySink::new(dir))),
            other => {
                return Err(Error::SinkUnavailable {
                    sink: other.as_str().into(),
                    available: AVAILABLE.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", "),
                })
            }
        }
    }
    Ok(sinks)
}
