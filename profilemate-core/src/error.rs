//! The one error type of `profilemate-core`.

use std::path::PathBuf;

/// Everything that can go wrong when a [`Session`](crate::Session) is configured, built or shut
/// down.
///
/// Recording never returns an error: the hot path drops and counts instead (see
/// [`DropReason`](crate::DropReason)). Errors only come from set-up and shutdown, where the caller
/// can act on them.
///
/// ```
/// use profilemate_core::{Config, Error};
///
/// let err = Config::from_lookup(|name| (name == "PROFILEMATE_LOG_INTERVAL").then(|| "often".into()))
///     .unwrap_err();
/// assert!(matches!(err, Error::InvalidSetting { .. }));
/// assert!(err.to_string().contains("PROFILEMATE_LOG_INTERVAL"));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value (an environment variable or a builder argument) is malformed.
    ///
    /// Fix: give one of the values named in `expected`.
    #[error("{name}={value:?} is not valid: expected {expected}")]
    InvalidSetting {
        /// The variable or builder option.
        name: String,
        /// The value that was given.
        value: String,
        /// What is accepted.
        expected: String,
    },

    /// The output directory cannot be created or written.
    ///
    /// Fix: point `PROFILEMATE_DIR` (or [`SessionBuilder::dir`](crate::SessionBuilder::dir)) at
    /// a directory this process may write.
    #[error("output directory {path} cannot be used: {source}")]
    OutputDir {
        /// The directory.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },

    /// The timing backend the configuration demands cannot be used here.
    ///
    /// Fix: install what the backend needs (a CUDA driver and device), or ask for `host`, or
    /// leave the backend unset so that profilemate picks one that works.
    #[error("timing backend `{backend}` is not available: {reason}")]
    BackendUnavailable {
        /// The backend that was demanded.
        backend: String,
        /// Why it cannot be used.
        reason: String,
    },

    /// An output format was selected that this build does not provide.
    ///
    /// Fix: choose one of the formats named in `available`, or enable the cargo feature that
    /// provides it.
    #[error("output format `{sink}` is not available in this build (available: {available})")]
    SinkUnavailable {
        /// The format asked for.
        sink: String,
        /// The formats this build can write.
        available: String,
    },

    /// A sink could not be created (for example its file could not be opened).
    #[error("sink `{sink}` could not be created: {message}")]
    SinkSetup {
        /// The sink's name.
        sink: String,
        /// What went wrong.
        message: String,
    },

    /// The thread buffers a dead session left in a directory could not be replayed into its
    /// files (a read-only directory, a full disk, a damaged buffer file).
    ///
    /// Fix: make the directory writable or free space, and run the recovery again: the
    /// buffers are kept until their records are in the files.
    #[error("cannot recover the thread buffers in {dir}: {source} (the buffers are kept for a later try)")]
    Recovery {
        /// The output directory.
        dir: PathBuf,
        /// What went wrong, naming the file.
        #[source]
        source: std::io::Error,
    },
    /// The collector thread could not be started, or it stopped abnormally.
    #[error("collector thread failed: {0}")]
    Collector(String),
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
