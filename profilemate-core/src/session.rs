//! The session: configuration, handles, and the collector thread it owns.

use crate::backend::{monotonic_ns, HostClock, TimingBackend};
use crate::collector::{Collector, Control, RunInfo};
use crate::config::{BackendChoice, Config, SinkKind};
use crate::error::{Error, Result};
use crate::handles::{
    BatchUtilization, Components, CpuTiming, CudaGraphs, ForwardPass, KvCacheUsage, MoeRouting, Requests,
};
use crate::manifest::{RunManifest, MANIFEST_FILE};
use crate::recorder::{Shared, Timing};
use crate::sink::{write_atomic, Sink};
use crate::types::{CpuOp, ModelType, ProfilerKind};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Builds the standard sinks a configuration asks for (`csv`, `json`, ...) in an output
/// directory. The `profilemate` facade installs the one from `profilemate-sinks`.
pub type SinkFactory = fn(&Config, &Path) -> Result<Vec<Box<dyn Sink>>>;

/// Replays the thread buffers of a dead session in a directory into its files; the
/// `profilemate` facade installs `profilemate-sinks`' `recover_buffers` (see
/// [`SessionBuilder::recovery_hook`]).
pub type RecoveryHook = fn(&Path) -> Result<()>;

/// Supplies a device timing backend when the configuration allows one (`PROFILEMATE_BACKEND`
/// `auto` or `cuda`). `Ok(None)` means none is usable here: the session uses the host clock
/// (with `auto`) or fails with [`Error::BackendUnavailable`] (with `cuda`). The `profilemate`
/// facade installs the CUDA one when its `cuda` feature is on.
pub type BackendFactory = fn(&Config) -> Result<Option<Arc<dyn TimingBackend>>>;

/// Configures and starts a [`Session`].
///
/// ```
/// use profilemate_core::{MemorySink, ProfilerKind, Session};
/// let memory = MemorySink::new();
/// let session = Session::builder()
///     .in_memory_only()
///     .log_interval(50)
///     .disable(ProfilerKind::EncoderDecoder)
///     .sink(memory.clone())
///     .build()?;
/// assert!(!session.components().is_enabled());
/// # Ok::<(), profilemate_core::Error>(())
/// ```
#[must_use = "a builder does nothing until `build()` is called"]
pub struct SessionBuilder {
    config: Config,
    sinks: Vec<Box<dyn Sink>>,
    factory: Option<SinkFactory>,
    backend: Option<Arc<dyn TimingBackend>>,
    backend_factory: Option<BackendFactory>,
    recovery: Option<RecoveryHook>,
    files: bool,
}

impl Default for SessionBuilder {
    fn default() -> Self {
        SessionBuilder {
            config: Config::default(),
            sinks: Vec::new(),
            factory: None,
            backend: None,
            backend_factory: None,
            recovery: None,
            files: true,
        }
    }
}

impl SessionBuilder {
    /// A builder with the default configuration.
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces the whole configuration.
    pub fn config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// Replaces the configuration with the one from `PROFILEMATE_*` environment variables.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidSetting`] for a malformed variable.
    pub fn from_env(mut self) -> Result<Self> {
        self.config = Config::from_env()?;
        Ok(self)
    }

    /// The configuration as it stands.
    pub fn config_ref(&self) -> &Config {
        &self.config
    }

    /// Turns recording on or off.
    pub fn enabled(mut self, enabled: bool) -> Self {
        self.config.enabled = enabled;
        self
    }

    /// The output directory.
    pub fn dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.config.dir = dir.into();
        self
    }

    /// Summaries are rewritten every `steps` forward passes.
    pub fn log_interval(mut self, steps: u64) -> Self {
        self.config.log_interval = steps;
        self
    }

    /// Logs each summary to stderr.
    pub fn verbose(mut self, verbose: bool) -> Self {
        self.config.verbose = verbose;
        self
    }

    /// Turns one profiler off.
    pub fn disable(mut self, kind: ProfilerKind) -> Self {
        if !self.config.disabled.contains(&kind) {
            self.config.disabled.push(kind);
        }
        self
    }

    /// Events each recording thread can buffer.
    pub fn buffer_events(mut self, events: usize) -> Self {
        self.config.buffer_events = events;
        self
    }

    /// How often the collector drains the buffers.
    pub fn flush_interval(mut self, every: Duration) -> Self {
        self.config.flush_interval_ms = u64::try_from(every.as_millis()).unwrap_or(u64::MAX);
        self
    }

    /// Token utilization below `pct` counts as an underutilization event.
    pub fn underutilization_threshold(mut self, pct: f64) -> Self {
        self.config.underutilization_threshold_pct = pct;
        self
    }

    /// `moe_expert_routing.csv` rows summed over windows of at least `steps` steps; 0 for one
    /// row per step (see [`Config::moe_window_steps`]).
    pub fn moe_window_steps(mut self, steps: u64) -> Self {
        self.config.moe_window_steps = steps;
        self
    }

    /// The most bytes the CSV and Parquet tables may take on disk (at least
    /// [`MIN_OUTPUT_BYTES`](crate::MIN_OUTPUT_BYTES)); `None` for no limit (see
    /// [`Config::max_output_bytes`]).
    pub fn max_output_bytes(mut self, bytes: Option<u64>) -> Self {
        self.config.max_output_bytes = bytes;
        self
    }

    /// Output formats for the standard sinks.
    pub fn sinks(mut self, kinds: &[SinkKind]) -> Self {
        self.config.sinks = kinds.to_vec();
        self
    }

    /// Adds a sink of your own.
    pub fn sink(mut self, sink: impl Sink + 'static) -> Self {
        self.sinks.push(Box::new(sink));
        self
    }

    /// Installs the factory that builds the standard sinks of `config.sinks`.
    pub fn sink_factory(mut self, factory: SinkFactory) -> Self {
        self.factory = Some(factory);
        self
    }

    /// Writes no files at all (no directory, no standard sinks, no manifest file): only the
    /// sinks added with [`sink`](Self::sink) receive data.
    pub fn in_memory_only(mut self) -> Self {
        self.files = false;
        self
    }

    /// A device timing backend (CUDA events). Used when the configured backend is `cuda` or
    /// `auto`; ignored for `host`.
    pub fn timing_backend(mut self, backend: Arc<dyn TimingBackend>) -> Self {
        self.backend = Some(backend);
        self
    }

    /// Installs the factory asked for a device timing backend when none was given with
    /// [`timing_backend`](Self::timing_backend) and the configuration is not `host`.
    pub fn backend_factory(mut self, factory: BackendFactory) -> Self {
        self.backend_factory = Some(factory);
        self
    }

    /// Installs the hook that replays a dead session's buffers when this session starts in
    /// its directory.
    ///
    /// A session starting in a directory that holds the thread buffers of a session whose
    /// process died (killed before it could shut down) would truncate that run's files. It
    /// moves them first, buffers included, to `DIR/killed-run-<pid>/` and calls `hook` there,
    /// so the killed run's records become rows (`profilemate recover DIR/killed-run-<pid>` then
    /// rebuilds its summaries); without a hook the buffers wait there for `profilemate
    /// recover`. Either way it says so on stderr.
    pub fn recovery_hook(mut self, hook: RecoveryHook) -> Self {
        self.recovery = Some(hook);
        self
    }

    /// Validates the configuration, prepares the output directory, and starts the collector.
    ///
    /// A disabled configuration gives a [`Session::disabled`] session and touches nothing.
    ///
    /// # Errors
    ///
    /// - [`Error::InvalidSetting`] for out-of-range values;
    /// - [`Error::OutputDir`] when the directory cannot be created or written;
    /// - [`Error::BackendUnavailable`] when `cuda` is demanded but no backend is usable;
    /// - [`Error::SinkUnavailable`] / [`Error::SinkSetup`] for output formats that cannot be
    ///   written;
    /// - [`Error::Collector`] when the collector thread cannot start.
    pub fn build(self) -> Result<Session> {
        let SessionBuilder { config, mut sinks, factory, backend, backend_factory, recovery, files } = self;
        config.validate()?;
        if !config.enabled {
            return Ok(Session::disabled());
        }
        let backend = match (backend, backend_factory, config.backend) {
            (Some(b), _, _) => Some(b),
            (None, Some(f), BackendChoice::Auto | BackendChoice::Cuda) => f(&config)?,
            _ => None,
        };
        let (timing, timing_name) = match (config.backend, backend) {
            (BackendChoice::Host, _) | (BackendChoice::Auto, None) => (Timing::Host, "host".to_string()),
            (BackendChoice::Auto | BackendChoice::Cuda, Some(b)) => {
                let name = b.name().to_string();
                (Timing::Device(b), name)
            }
            (BackendChoice::Cuda, None) => {
                return Err(Error::BackendUnavailable {
                    backend: "cuda".into(),
                    reason: "no CUDA timing backend is available (build with the `cuda` feature of \
                             `profilemate` on a machine with a CUDA driver and device, or set \
                             PROFILEMATE_BACKEND=host)"
                        .into(),
                })
            }
        };
        let manifest_dir = if files {
            prepare_dir(&config.dir)?;
            set_aside_dead_run(&config.dir, recovery);
            let standard = match factory {
                Some(f) => f(&config, &config.dir)?,
                None => match config.sinks.first() {
                    Some(kind) => {
                        return Err(Error::SinkUnavailable {
                            sink: kind.as_str().into(),
                            available: "none in profilemate-core alone: use the `profilemate` crate, \
                                        or add sinks with SessionBuilder::sink"
                                .into(),
                        })
                    }
                    None => Vec::new(),
                },
            };
            sinks.splice(0..0, standard);
            Some(config.dir.clone())
        } else {
            None
        };

        let enabled = ProfilerKind::ALL.map(|k| config.is_enabled(k));
        let mut shared = Shared::new(HostClock::new(), timing, enabled, config.buffer_events);
        // The session's time origin on CLOCK_MONOTONIC, read next to the clock's own origin
        // (before the thread buffers are mapped, which writes every page of them): other
        // processes' sessions are put on one time base by it.
        let monotonic_start_ns = monotonic_ns();
        shared.moe_detail = config.moe_window_steps == 0;
        if let Some(dir) = &manifest_dir {
            let mask = crate::ring::enabled_mask(&enabled, shared.moe_detail);
            match crate::ring::BufferFile::create(
                dir,
                config.buffer_events,
                mask,
                shared.start_raw,
                &CpuOp::BUILTIN_NAMES,
            ) {
                Ok(file) => shared.buffer_file = Some(Arc::new(file)),
                Err(e) => eprintln!(
                    "profilemate: cannot map the thread buffers into {} ({e}): recording goes on into memory, \
                     which a kill of the process loses",
                    dir.display()
                ),
            }
        }
        let shared = Arc::new(shared);
        let info = RunInfo {
            manifest_dir: manifest_dir.clone(),
            started_at: rfc3339_now(),
            monotonic_start_ns,
            host: gethostname::gethostname().to_string_lossy().into_owned(),
            timing_backend: timing_name,
            config,
        };
        let verbose = info.config.verbose;
        let collector = Collector::new(shared.clone(), info, sinks);
        // The first manifest proves the directory is writable, before any engine work starts.
        if let Some(dir) = &manifest_dir {
            let bytes = serde_json::to_vec_pretty(&collector.manifest(false)).map_err(std::io::Error::other);
            bytes
                .and_then(|b| write_atomic(&dir.join(MANIFEST_FILE), &b))
                .map_err(|source| Error::OutputDir { path: dir.clone(), source })?;
            if verbose {
                eprintln!("profilemate: recording into {}", dir.display());
            }
        }
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("profilemate-collector".into())
            .spawn(move || collector.run(rx))
            .map_err(|e| Error::Collector(e.to_string()))?;
        Ok(Session { shared: Some(shared), tx: Some(tx), thread: Some(thread), dir: manifest_dir })
    }
}

/// Moves a killed run's files out of the way of this session's and replays its buffers there.
fn set_aside_dead_run(dir: &Path, hook: Option<RecoveryHook>) {
    match crate::ring::set_aside_dead_run(dir) {
        Ok(None) => {}
        Ok(Some((aside, pids))) => {
            let replayed = match hook.map(|h| h(&aside)) {
                Some(Ok(())) => "its buffered records replayed into them".to_string(),
                Some(Err(e)) => format!("its buffers kept there ({e})"),
                None => "its buffers kept there".to_string(),
            };
            eprintln!(
                "profilemate: {} held the files of a run killed before it finished (pid {pids:?}): moved to {}, \
                 {replayed}; run `profilemate recover {}` to complete them",
                dir.display(),
                aside.display(),
                aside.display()
            );
        }
        Err(e) => eprintln!(
            "profilemate: {} holds the buffers of a killed run that could not be set aside ({e}); this session's \
             files replace that run's",
            dir.display()
        ),
    }
}

fn prepare_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| Error::OutputDir { path: dir.to_path_buf(), source })?;
    let meta = std::fs::metadata(dir).map_err(|source| Error::OutputDir { path: dir.to_path_buf(), source })?;
    if !meta.is_dir() {
        return Err(Error::OutputDir {
            path: dir.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory"),
        });
    }
    Ok(())
}

fn rfc3339_now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

/// A profiling session: hands out recording handles and owns the collector thread that turns
/// what they record into files.
///
/// Build one with [`Session::builder`] (or, in the `profilemate` facade, from the environment),
/// take the handles the engine needs, and call [`shutdown`](Session::shutdown) at the end
/// (dropping the session does the same, reporting errors on stderr).
///
/// ```
/// use profilemate_core::{CpuOp, MemorySink, Phase, Session};
///
/// let memory = MemorySink::new();
/// let session = Session::builder().in_memory_only().sink(memory.clone()).build()?;
/// let (forward, cpu) = (session.forward_pass(), session.cpu_timing());
/// for _ in 0..3 {
///     cpu.time(CpuOp::SCHEDULING, || { /* pick the batch */ });
///     let pass = forward.start(Phase::Decode, 8, 8);
///     pass.stop();
/// }
/// let manifest = session.shutdown()?;
/// assert_eq!(manifest.steps, 3);
/// assert_eq!(memory.rows().cpu_operations.len(), 3);
/// # Ok::<(), profilemate_core::Error>(())
/// ```
pub struct Session {
    shared: Option<Arc<Shared>>,
    tx: Option<Sender<Control>>,
    thread: Option<JoinHandle<RunManifest>>,
    dir: Option<PathBuf>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("enabled", &self.is_enabled()).field("dir", &self.dir).finish()
    }
}

impl Session {
    /// A builder with the default configuration.
    pub fn builder() -> SessionBuilder {
        SessionBuilder::new()
    }

    /// A session that records nothing: its handles cost one branch per call.
    ///
    /// ```
    /// let session = profilemate_core::Session::disabled();
    /// assert!(!session.forward_pass().is_enabled());
    /// ```
    pub fn disabled() -> Session {
        Session { shared: None, tx: None, thread: None, dir: None }
    }

    /// Whether this session records.
    pub fn is_enabled(&self) -> bool {
        self.shared.is_some()
    }

    /// The output directory, when the session writes files.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// The forward pass handle.
    pub fn forward_pass(&self) -> ForwardPass {
        ForwardPass::new(&self.shared)
    }

    /// The step handle: opens engine steps whose id every row recorded in them carries
    /// (see [`Steps`](crate::Steps) for the rule).
    pub fn steps(&self) -> crate::Steps {
        crate::Steps::new(&self.shared)
    }

    /// The CPU operation handle.
    pub fn cpu_timing(&self) -> CpuTiming {
        CpuTiming::new(&self.shared)
    }

    /// The batch utilization handle.
    pub fn batch_utilization(&self) -> BatchUtilization {
        BatchUtilization::new(&self.shared)
    }

    /// The request lifecycle (preemption) handle.
    pub fn requests(&self) -> Requests {
        Requests::new(&self.shared)
    }

    /// The encoder/decoder component handle.
    pub fn components(&self) -> Components {
        Components::new(&self.shared)
    }

    /// The KV cache tracker's handle.
    pub fn kv_cache(&self) -> KvCacheUsage {
        KvCacheUsage::new(&self.shared)
    }

    /// The CUDA graph tracker's handle.
    pub fn cuda_graphs(&self) -> CudaGraphs {
        CudaGraphs::new(&self.shared)
    }

    /// The mixture-of-experts routing tracker's handle.
    pub fn moe_experts(&self) -> MoeRouting {
        MoeRouting::new(&self.shared)
    }

    /// Declares the model's architecture for `encoder_decoder_summary.json`.
    pub fn declare_model_type(&self, model_type: ModelType) {
        self.components().declare_model_type(model_type);
    }

    /// Registers a CPU operation of the engine's own (or returns the id of one already
    /// registered under that name). Do it once at set-up; recording then uses the id.
    ///
    /// ```
    /// let session = profilemate_core::Session::builder().in_memory_only().build()?;
    /// let op = session.register_cpu_operation("detokenize")?;
    /// assert_eq!(op, session.register_cpu_operation("detokenize")?);
    /// assert!(session.register_cpu_operation("").is_err());
    /// # Ok::<(), profilemate_core::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidSetting`] for an empty name, a name over 64 bytes or with control
    /// characters, or more than [`CpuOp::MAX`] operations.
    pub fn register_cpu_operation(&self, name: &str) -> Result<CpuOp> {
        let bad = |why: &str| Error::InvalidSetting {
            name: "cpu operation name".into(),
            value: name.into(),
            expected: why.into(),
        };
        if name.is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
            return Err(bad("1 to 64 bytes of printable text"));
        }
        let Some(shared) = &self.shared else {
            return Ok(CpuOp(
                CpuOp::BUILTIN_NAMES.iter().position(|n| *n == name).map_or(CpuOp::MAX as u16, |i| i as u16),
            ));
        };
        let mut ops = shared.operations.write().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = ops.iter().position(|n| &**n == name) {
            return Ok(CpuOp(i as u16));
        }
        if ops.len() >= CpuOp::MAX {
            return Err(bad("at most 1024 operations per session"));
        }
        ops.push(Arc::from(name));
        if let Some(file) = &shared.buffer_file {
            file.set_op(ops.len() - 1, name);
        }
        Ok(CpuOp((ops.len() - 1) as u16))
    }

    /// Waits until everything recorded so far is in the sinks, summaries included, and the
    /// files are flushed.
    ///
    /// # Errors
    ///
    /// [`Error::Collector`] if the collector thread is gone.
    pub fn flush(&self) -> Result<()> {
        let Some(tx) = &self.tx else { return Ok(()) };
        let (ack_tx, ack_rx) = mpsc::sync_channel(1);
        tx.send(Control::Flush(ack_tx)).map_err(|_| Error::Collector("collector thread has stopped".into()))?;
        ack_rx.recv().map_err(|_| Error::Collector("collector thread stopped during flush".into()))
    }

    /// Stops recording, writes every remaining row, the final summaries and the manifest, and
    /// returns the manifest (rows per file, drops, sink errors).
    ///
    /// Handles still held elsewhere keep working and record nothing; their events are counted
    /// as `session_closed` on their side. Stop recording before calling this: an event whose
    /// recording is under way on another thread at the very instant of shutdown may be lost
    /// without being counted.
    ///
    /// # Errors
    ///
    /// [`Error::Collector`] if the collector thread panicked.
    pub fn shutdown(mut self) -> Result<RunManifest> {
        self.stop().unwrap_or_else(|| Ok(RunManifest::disabled()))
    }

    fn stop(&mut self) -> Option<Result<RunManifest>> {
        let shared = self.shared.take()?;
        shared.closed.store(true, Ordering::SeqCst);
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Control::Shutdown);
        }
        let thread = self.thread.take()?;
        Some(thread.join().map_err(|_| Error::Collector("collector thread panicked".into())))
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(Err(e)) = self.stop() {
            eprintln!("profilemate: {e}");
        }
    }
}
