//! Where rows and summaries go: the object-safe [`Sink`] trait and an in-memory sink.

use crate::manifest::RunManifest;
use crate::rows::Rows;
use crate::summary::Summaries;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// An error a sink reports; the collector counts it, says why once on stderr, and carries on.
pub type SinkError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Receives the rows and summaries the collector produces.
///
/// Only [`write_rows`](Sink::write_rows) is required. Every method runs on the collector thread,
/// never on a recording thread, so a sink may allocate, lock and do I/O. The trait is object
/// safe: sessions hold `Box<dyn Sink>`, and `Box`, `Arc<Mutex<_>>` and `Vec` of sinks are sinks
/// too.
///
/// ```
/// use profilemate_core::{Rows, Sink, SinkError};
///
/// /// Counts forward passes, for a metrics system.
/// #[derive(Default)]
/// struct StepCounter(u64);
///
/// impl Sink for StepCounter {
///     fn name(&self) -> &str { "step-counter" }
///     fn write_rows(&mut self, rows: &Rows) -> Result<(), SinkError> {
///         self.0 += rows.forward_pass.len() as u64;
///         Ok(())
///     }
/// }
///
/// let sink: Box<dyn Sink> = Box::new(StepCounter::default());
/// assert_eq!(sink.name(), "step-counter");
/// ```
pub trait Sink: Send {
    /// A short name used in messages and in the manifest.
    fn name(&self) -> &str {
        "sink"
    }

    /// Writes a batch of rows. Called about every collector period with whatever arrived.
    ///
    /// # Errors
    ///
    /// Any failure; the rows of a failed batch are counted as dropped (`sink_error`).
    fn write_rows(&mut self, rows: &Rows) -> Result<(), SinkError>;

    /// Replaces the summaries: every `LOG_INTERVAL` steps and at shutdown.
    ///
    /// # Errors
    ///
    /// Any failure; it is counted and reported.
    fn write_summaries(&mut self, summaries: &Summaries) -> Result<(), SinkError> {
        let _ = summaries;
        Ok(())
    }

    /// Receives the run manifest (rows written, events dropped per profiler and reason) each
    /// time the summaries are written, so that a live sink can publish those counts during the
    /// run; [`finish`](Sink::finish) gets the final one.
    ///
    /// # Errors
    ///
    /// Any failure; it is counted and reported.
    fn write_manifest(&mut self, manifest: &RunManifest) -> Result<(), SinkError> {
        let _ = manifest;
        Ok(())
    }

    /// Pushes buffered output to its destination (after every collector pass).
    ///
    /// # Errors
    ///
    /// Any failure; it is counted and reported.
    fn flush(&mut self) -> Result<(), SinkError> {
        Ok(())
    }

    /// Called once at shutdown, after the last rows and summaries, with the final manifest.
    ///
    /// # Errors
    ///
    /// Any failure; it is counted and reported.
    fn finish(&mut self, manifest: &RunManifest) -> Result<(), SinkError> {
        let _ = manifest;
        self.flush()
    }

    /// What this sink has written to files so far, for the manifest's `bytes_written`,
    /// `bytes_per_step` and `output_budget`; `None` for a sink that writes no table files.
    fn output_files(&self) -> Option<OutputFiles> {
        None
    }
}

/// Bytes a sink wrote per table file, and the files an output budget rolled over or removed.
///
/// ```
/// let files = profilemate_core::OutputFiles::default();
/// assert!(files.bytes_written.is_empty() && files.rolled.is_empty() && files.removed.is_empty());
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutputFiles {
    /// Bytes written per table, by its file name (`forward_pass_timing.csv`), over the whole
    /// run, whether or not the budget removed them since.
    pub bytes_written: BTreeMap<String, u64>,
    /// Files rolled over (closed and numbered: `forward_pass_timing.1.csv`), oldest first.
    pub rolled: Vec<String>,
    /// Rolled files removed to stay within the budget, oldest first.
    pub removed: Vec<String>,
}

impl<S: Sink + ?Sized> Sink for Box<S> {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn write_rows(&mut self, rows: &Rows) -> Result<(), SinkError> {
        (**self).write_rows(rows)
    }
    fn write_summaries(&mut self, summaries: &Summaries) -> Result<(), SinkError> {
        (**self).write_summaries(summaries)
    }
    fn write_manifest(&mut self, manifest: &RunManifest) -> Result<(), SinkError> {
        (**self).write_manifest(manifest)
    }
    fn flush(&mut self) -> Result<(), SinkError> {
        (**self).flush()
    }
    fn finish(&mut self, manifest: &RunManifest) -> Result<(), SinkError> {
        (**self).finish(manifest)
    }
    fn output_files(&self) -> Option<OutputFiles> {
        (**self).output_files()
    }
}

/// A sink shared with other code: the session writes through the lock on its collector thread.
impl<S: Sink + ?Sized> Sink for Arc<Mutex<S>> {
    fn name(&self) -> &str {
        "shared"
    }
    fn write_rows(&mut self, rows: &Rows) -> Result<(), SinkError> {
        lock(self).write_rows(rows)
    }
    fn write_summaries(&mut self, summaries: &Summaries) -> Result<(), SinkError> {
        lock(self).write_summaries(summaries)
    }
    fn write_manifest(&mut self, manifest: &RunManifest) -> Result<(), SinkError> {
        lock(self).write_manifest(manifest)
    }
    fn flush(&mut self) -> Result<(), SinkError> {
        lock(self).flush()
    }
    fn finish(&mut self, manifest: &RunManifest) -> Result<(), SinkError> {
        lock(self).finish(manifest)
    }
    fn output_files(&self) -> Option<OutputFiles> {
        lock(self).output_files()
    }
}

fn lock<S: ?Sized>(m: &Mutex<S>) -> std::sync::MutexGuard<'_, S> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Keeps everything in memory: for tests, and for engines that want the numbers without files.
///
/// Clone it before handing it to the session; every clone sees the same data.
///
/// ```
/// use profilemate_core::{MemorySink, Phase, Session};
///
/// let memory = MemorySink::new();
/// let session = Session::builder().in_memory_only().sink(memory.clone()).build()?;
/// let forward = session.forward_pass();
/// forward.start(Phase::Prefill, 1, 128).stop();
/// session.shutdown()?;
/// assert_eq!(memory.rows().forward_pass.len(), 1);
/// assert_eq!(memory.summaries().unwrap().forward_pass.unwrap().prefill.count, 1);
/// # Ok::<(), profilemate_core::Error>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct MemorySink {
    inner: Arc<Mutex<MemoryData>>,
}

#[derive(Debug, Default)]
struct MemoryData {
    rows: Rows,
    summaries: Option<Summaries>,
    summary_writes: u64,
    manifest: Option<RunManifest>,
}

impl MemorySink {
    /// An empty sink.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every row received so far.
    pub fn rows(&self) -> Rows {
        lock(&self.inner).rows.clone()
    }

    /// The latest summaries, if any were written.
    pub fn summaries(&self) -> Option<Summaries> {
        lock(&self.inner).summaries.clone()
    }

    /// How many times summaries were written.
    pub fn summary_writes(&self) -> u64 {
        lock(&self.inner).summary_writes
    }

    /// The manifest handed over at shutdown.
    pub fn manifest(&self) -> Option<RunManifest> {
        lock(&self.inner).manifest.clone()
    }
}

impl Sink for MemorySink {
    fn name(&self) -> &str {
        "memory"
    }
    fn write_rows(&mut self, rows: &Rows) -> Result<(), SinkError> {
        lock(&self.inner).rows.extend_from(rows);
        Ok(())
    }
    fn write_summaries(&mut self, summaries: &Summaries) -> Result<(), SinkError> {
        let mut d = lock(&self.inner);
        d.summaries = Some(summaries.clone());
        d.summary_writes += 1;
        Ok(())
    }
    fn finish(&mut self, manifest: &RunManifest) -> Result<(), SinkError> {
        lock(&self.inner).manifest = Some(manifest.clone());
        Ok(())
    }
}

/// Writes `bytes` to `path` so that a reader sees the old file or the new one, never half of
/// one: a temporary file in the same directory, renamed over `path`. This holds when the
/// process is killed at any instant; it does not force the data to the disk (no `fsync`), so a
/// power loss may lose the latest rewrite.
///
/// ```
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("summary.json");
/// profilemate_core::write_atomic(&path, b"{}")?;
/// assert_eq!(std::fs::read(&path)?, b"{}");
/// # Ok::<(), std::io::Error>(())
/// ```
///
/// # Errors
///
/// Any I/O error from creating, writing or renaming the file.
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        drop(f);
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
