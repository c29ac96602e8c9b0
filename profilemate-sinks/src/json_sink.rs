//! The contract JSON summaries.

use profilemate_core::{write_atomic, Sink, SinkError, Summaries};
use std::path::{Path, PathBuf};

/// Writes the contract summaries (`forward_pass_summary.json`, ...) into a directory,
/// each replaced atomically (a temporary file renamed over the old one), so a reader never sees
/// half a summary.
///
/// ```
/// use profilemate_sinks::JsonSummarySink;
/// use profilemate_core::{ForwardPassSummary, Sink, Summaries};
///
/// let dir = tempfile::tempdir()?;
/// let mut sink = JsonSummarySink::new(dir.path());
/// let summaries = Summaries { forward_pass: Some(ForwardPassSummary::default()), ..Summaries::default() };
/// sink.write_summaries(&summaries)?;
/// let json: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.path().join("forward_pass_summary.json"))?)?;
/// assert_eq!(json["mixed"]["count"], 0);
/// # Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
/// ```
#[derive(Debug, Clone)]
pub struct JsonSummarySink {
    dir: PathBuf,
}

impl JsonSummarySink {
    /// A sink writing into `dir`.
    pub fn new(dir: &Path) -> Self {
        JsonSummarySink { dir: dir.to_path_buf() }
    }
}

/// Replaces any non-finite number (serialized by serde_json as `null`) by 0, so that a summary
/// is always valid for arithmetic downstream.
fn finite(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Null => *v = serde_json::Value::from(0.0),
        serde_json::Value::Array(a) => a.iter_mut().for_each(finite),
        serde_json::Value::Object(o) => o.values_mut().for_each(finite),
        _ => {}
    }
}

impl Sink for JsonSummarySink {
    fn name(&self) -> &str {
        "json"
    }

    fn write_rows(&mut self, _rows: &profilemate_core::Rows) -> Result<(), SinkError> {
        Ok(())
    }

    fn write_summaries(&mut self, summaries: &Summaries) -> Result<(), SinkError> {
        for (file, mut value) in summaries.to_json_files()? {
            finite(&mut value);
            let mut bytes = serde_json::to_vec_pretty(&value)?;
            bytes.push(b'\n');
            let path = self.dir.join(file.file_name());
            write_atomic(&path, &bytes).map_err(|e| format!("{}: {e}", path.display()))?;
        }
        Ok(())
    }
}
