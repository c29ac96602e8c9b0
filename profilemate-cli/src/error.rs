//! The one error type of this crate.

use std::path::PathBuf;

/// Why a report, a plot or the HTML page could not be made.
///
/// Each variant names the file at fault; the ones about content also name the line and the
/// column, so the fix is a look at one place.
///
/// ```
/// use profilemate_cli::{Report, ReportError};
/// let dir = tempfile::tempdir()?;
/// std::fs::write(dir.path().join("forward_pass_timing.csv"), "timestamp_sec,phase\n")?;
/// let err = Report::from_dir(dir.path()).unwrap_err();
/// assert!(matches!(err, ReportError::MissingColumn { .. }));
/// assert!(err.to_string().contains("forward_pass_timing.csv"));
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReportError {
    /// The directory holds none of the contract's files. Check the path: profilemate writes
    /// into `PROFILEMATE_DIR` (default `./profilemate_out`), the vLLM binding into
    /// `VLLM_PROFILING_DIR` (default `/tmp/vllm_profiling`).
    #[error("{}: no profilemate output here (none of forward_pass_timing.csv, forward_pass_summary.json, ... found)", dir.display())]
    NoContractFiles {
        /// The directory that was read.
        dir: PathBuf,
    },

    /// A file could not be opened, read or written. The message is the operating system's.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },

    /// A CSV file's header lacks a column of the contract. The file was written by something
    /// that does not follow the contract, or its header row was edited.
    #[error("{file}: line 1: missing column `{column}` (header is `{header}`)")]
    MissingColumn {
        /// The file's name, for example `forward_pass_timing.csv`.
        file: String,
        /// The contract column that is missing.
        column: String,
        /// The header row as read.
        header: String,
    },

    /// A complete CSV row holds a value that the contract does not allow there (not a number,
    /// a negative duration, an unknown phase, too few fields). Fix or delete that row; a torn
    /// last row (no line end) is not an error, it is skipped with a warning.
    #[error("{file}: line {line}, column {column_index} (`{column}`): {message}")]
    MalformedCsv {
        /// The file's name.
        file: String,
        /// The 1-based line on which the row starts (the header is line 1).
        line: u64,
        /// The 1-based position of the column in the row.
        column_index: usize,
        /// The column's name.
        column: String,
        /// What is wrong with the value.
        message: String,
    },

    /// A JSON file is not valid JSON or lacks a key of the contract, or holds a value of the
    /// wrong type (`null`, `NaN`, a string for a number). Summaries are rewritten atomically,
    /// so this points at a writer that does not follow the contract.
    #[error("{file}: line {line}, column {column}: {message}")]
    MalformedJson {
        /// The file's name.
        file: String,
        /// The 1-based line of the fault.
        line: usize,
        /// The 1-based column of the fault.
        column: usize,
        /// What the JSON parser said.
        message: String,
    },

    /// Drawing a figure failed (the backend could not write or encode it).
    #[error("plot {}: {message}", file.display())]
    Plot {
        /// The figure's file (or its name, when drawn into memory).
        file: PathBuf,
        /// What the drawing backend said.
        message: String,
    },
}

impl ReportError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ReportError::Io { path: path.into(), source }
    }
}
