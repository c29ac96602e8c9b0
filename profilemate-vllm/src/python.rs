//! The private extension module `profilemate_vllm._native`.
//!
//! The Python side observes vLLM and calls in with plain numbers (phase and operation codes,
//! counts, a list of per-expert token counts for a MoE layer); strings cross only for request
//! lifecycle events. The engine step's regions are timed here, through the recorder's
//! `StepPath` (`step_path` for what it records, `step_functions` for its C-API type): a call when
//! a region begins and one when it ends, the clock read natively. The rarer records (encoder
//! calls, CUDA graph captures, CUDA-event forward passes) come with durations in nanoseconds
//! measured on the Python side. Every recording method is a handle call of the core: it never
//! blocks; only malformed arguments raise.

use crate::config::binding_config;
use crate::merge::{merge as merge_run, runs as list_runs};
use crate::step_path::StepPath;
use profilemate::{
    BatchSample, BatchUtilization, Component, Components, CpuOp, CpuTiming, CudaGraphs, ForwardPass, GraphEvent,
    KvCacheSample, KvCacheUsage, Mark, ModelType, MoeRouting, Phase, ProfilerKind, Requests, Resolution, Session,
    Steps, TimingBackend,
};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const PHASES: [Phase; 3] = [Phase::Prefill, Phase::Decode, Phase::Mixed];
const PHASE_CONTEXT: [&str; 3] = ["phase=prefill", "phase=decode", "phase=mixed"];
const OPS: [CpuOp; 4] = [CpuOp::SCHEDULING, CpuOp::BATCH_PREPARATION, CpuOp::MODEL_EXECUTION, CpuOp::SAMPLING];
const COMPONENTS: [Component; 3] = [Component::Encoder, Component::Decoder, Component::CrossAttention];
/// The trackers a process turns on only when it has something for them (no empty files
/// otherwise), by the names `PROFILEMATE_DISABLE` uses.
const ON_DEMAND: [ProfilerKind; 2] = [ProfilerKind::CudaGraph, ProfilerKind::MoeExpert];

/// Nanoseconds from Python (any `int` that fits 64 bits) as the milliseconds the `record_ms`
/// calls take: a negative duration stays negative, so the core drops it and counts it as an
/// invalid value instead of Python raising `OverflowError` in the engine's thread.
fn ns_to_ms(duration_ns: i64) -> f64 {
    duration_ns as f64 / 1e6
}

fn env_lookup(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Names the device timing done on the Python side (CUDA events on PyTorch's current stream,
/// resolved there and recorded as measured durations), so that the manifest says which clock
/// timed the forward passes. The core never asks it for marks: the binding records durations.
struct ExternalCudaEvents;

impl TimingBackend for ExternalCudaEvents {
    fn name(&self) -> &str {
        "cuda_events"
    }
    fn start(&self) -> Option<Mark> {
        None
    }
    fn stop(&self, _start: Mark) -> Option<Mark> {
        None
    }
    fn poll(&self, _start: Mark, _end: Mark) -> Resolution {
        Resolution::Failed("durations are measured by the vLLM binding".into())
    }
}

/// The configuration in force for this process, as JSON: the core's [`profilemate::Config`]
/// fields, read from `PROFILEMATE_*` and the seed's `VLLM_PROFILING_*` names.
#[pyfunction]
fn resolve_config() -> PyResult<String> {
    let config = binding_config(env_lookup).map_err(|e| PyValueError::new_err(e.to_string()))?;
    serde_json::to_string(&config).map_err(|e| PyRuntimeError::new_err(e.to_string()))
}

/// Merges the parts of a run under `dir` into the contract files there; returns the report as
/// JSON.
#[pyfunction]
#[pyo3(signature = (dir, run=None))]
fn merge(py: Python<'_>, dir: PathBuf, run: Option<String>) -> PyResult<String> {
    let report = py.detach(|| merge_run(&dir, run.as_deref())).map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
    serde_json::to_string(&report).map_err(|e| PyRuntimeError::new_err(e.to_string()))
}

/// The runs recorded under `dir`, oldest first.
#[pyfunction]
fn runs(dir: PathBuf) -> Vec<String> {
    list_runs(&dir)
}

/// One process's recording session, writing into its own part directory.
#[pyclass(frozen, module = "profilemate_vllm._native")]
struct Recorder {
    session: Mutex<Option<Session>>,
    forward: ForwardPass,
    cpu: CpuTiming,
    batch: BatchUtilization,
    requests: Requests,
    components: Components,
    kv_cache: KvCacheUsage,
    cuda_graphs: CudaGraphs,
    moe: MoeRouting,
    steps: Steps,
    step: StepPath,
    trackers: Vec<&'static str>,
    dir: String,
    timing: String,
    pid: u32,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        // A forked child inherits the recorder but not its collector thread: shutting that
        // session down would wait for a thread that does not exist in this process.
        if std::process::id() != self.pid {
            if let Ok(mut guard) = self.session.lock() {
                std::mem::forget(guard.take());
            }
        }
    }
}

#[pymethods]
impl Recorder {
    /// Opens a session writing into `part_dir`, configured from the environment (every other
    /// setting), timed by `timing` (`host`, or `cuda` when the caller measures with CUDA events).
    /// `trackers` names the trackers this process has something for (`cuda_graph`,
    /// `moe_expert`); the others are off, so that no empty files appear. One that the
    /// environment disables stays off.
    #[new]
    #[pyo3(signature = (part_dir, timing="host", trackers=Vec::new()))]
    fn new(py: Python<'_>, part_dir: PathBuf, timing: &str, trackers: Vec<String>) -> PyResult<Self> {
        let mut config = binding_config(env_lookup).map_err(|e| PyValueError::new_err(e.to_string()))?;
        config.dir = part_dir.clone();
        for name in &trackers {
            if !ON_DEMAND.iter().any(|k| k.as_str() == name) {
                return Err(PyValueError::new_err(format!(
                    "unknown tracker `{name}`: expected `cuda_graph` or `moe_expert`"
                )));
            }
        }
        for kind in ON_DEMAND {
            if !trackers.iter().any(|t| t == kind.as_str()) && !config.disabled.contains(&kind) {
                config.disabled.push(kind);
            }
        }
        let enabled: Vec<&'static str> =
            ON_DEMAND.into_iter().filter(|k| config.is_enabled(*k)).map(ProfilerKind::as_str).collect();
        let mut builder = profilemate::builder();
        match timing {
            "host" => config.backend = profilemate::BackendChoice::Host,
            "cuda" => {
                config.backend = profilemate::BackendChoice::Cuda;
                builder = builder.timing_backend(Arc::new(ExternalCudaEvents));
            }
            other => return Err(PyValueError::new_err(format!("timing must be `host` or `cuda`, not `{other}`"))),
        }
        let session = py
            .detach(|| builder.config(config).build())
            .map_err(|e| PyRuntimeError::new_err(format!("profilemate cannot start: {e}")))?;
        Ok(Recorder {
            forward: session.forward_pass(),
            cpu: session.cpu_timing(),
            batch: session.batch_utilization(),
            requests: session.requests(),
            components: session.components(),
            kv_cache: session.kv_cache(),
            cuda_graphs: session.cuda_graphs(),
            moe: session.moe_experts(),
            steps: session.steps(),
            step: StepPath::new(&session),
            trackers: enabled,
            session: Mutex::new(Some(session)),
            dir: part_dir.to_string_lossy().into_owned(),
            timing: timing.to_string(),
            pid: std::process::id(),
        })
    }

    /// The part directory.
    #[getter]
    fn dir(&self) -> &str {
        &self.dir
    }

    /// `host` or `cuda`.
    #[getter]
    fn timing(&self) -> &str {
        &self.timing
    }

    /// The trackers this session records (`cuda_graph`, `moe_expert`).
    #[getter]
    fn trackers(&self) -> Vec<&'static str> {
        self.trackers.clone()
    }

    /// Opens engine step `step` (1 to 2^40 - 1): every row this process records until
    /// `end_step` carries it in its `step` column. The engine-core process numbers the steps;
    /// a worker opens the same id for its part of the step, so that rows of one step written by
    /// several processes join. Raises `ValueError` for an id out of range.
    fn begin_step(&self, step: u64) -> PyResult<()> {
        if self.steps.open(step) || !self.steps.is_enabled() {
            Ok(())
        } else {
            Err(PyValueError::new_err(format!("step id {step}: expected 1 to {}", profilemate::MAX_STEP)))
        }
    }

    /// Closes the step `begin_step` opened (nothing when none is open).
    fn end_step(&self) {
        self.steps.close();
    }

    /// Closes the step `begin_step` opened without recording it: the engine core opens the
    /// next id before scheduling (so that preemptions made while scheduling belong to the step)
    /// and cancels it when the scheduler returns nothing to run.
    fn cancel_step(&self) {
        self.steps.cancel();
    }

    /// The forward pass of step `step` (0: outside any step), measured late: the forward row
    /// and the language model's (decoder) time, recorded now in `step` whatever step is open
    /// (CUDA events resolve a step or two after their pass ran). A negative `forward_ns` is
    /// dropped and counted.
    fn forward_of_step(&self, step: u64, phase: usize, num_seqs: u32, num_tokens: u32, forward_ns: i64) {
        let Some(&p) = PHASES.get(phase) else { return };
        self.steps.within(step, || {
            self.forward.record_ms(p, num_seqs, num_tokens, ns_to_ms(forward_ns));
            self.components.record_ms(Component::Decoder, "language_model", ns_to_ms(forward_ns));
        });
    }

    /// One forward pass (engine step) that ended now: phase 0 prefill, 1 decode, 2 mixed. A
    /// negative `duration_ns` is dropped and counted (`invalid_value`), as the Rust API does.
    fn forward(&self, phase: usize, batch_size: u32, num_tokens: u32, duration_ns: i64) {
        if let Some(&p) = PHASES.get(phase) {
            self.forward.record_ms(p, batch_size, num_tokens, ns_to_ms(duration_ns));
        }
    }

    /// One CPU operation that ended now: 0 scheduling, 1 batch_preparation, 2 model_execution,
    /// 3 sampling; `phase` (0..=2) adds `phase=...` as context, -1 none.
    #[pyo3(signature = (op, duration_ns, phase=-1))]
    fn cpu(&self, op: usize, duration_ns: i64, phase: isize) {
        if let Some(&op) = OPS.get(op) {
            let context = usize::try_from(phase).ok().and_then(|p| PHASE_CONTEXT.get(p)).copied().unwrap_or("");
            self.cpu.record_ms(op, ns_to_ms(duration_ns), context);
        }
    }

    /// One scheduled batch against the scheduler's limits, now.
    #[allow(clippy::too_many_arguments)]
    fn batch(
        &self,
        phase: usize,
        num_seqs: u32,
        max_num_seqs: u32,
        num_tokens: u32,
        max_tokens: u32,
        running_queue_len: u32,
        waiting_queue_len: u32,
    ) {
        if let Some(&phase) = PHASES.get(phase) {
            self.batch.record(&BatchSample {
                num_seqs,
                max_num_seqs,
                num_tokens,
                max_tokens,
                phase,
                running_queue_len,
                waiting_queue_len,
            });
        }
    }

    // --- the step path (see `step_path`): each timed region is a call without arguments when
    // it begins and one when it ends; the clock is read here.

    /// The scheduler's limits, once per scheduler: `max_num_seqs`, `max_num_batched_tokens`,
    /// and the KV cache's blocks (negative: no KV cache reading per step).
    fn set_limits(&self, max_num_seqs: u32, max_tokens: u32, kv_total_blocks: i64) {
        self.step.set_limits(max_num_seqs, max_tokens, kv_total_blocks);
    }

    /// The step path of this recorder, a `StepPath` whose methods are: `schedule_begin(step)`,
    /// `scheduled(phase, num_seqs, num_tokens, running, waiting, kv_free_blocks,
    /// prefix_cache_queries, prefix_cache_hits)`, `execute_begin()`, `execute_begin_with(phase,
    /// num_seqs, num_tokens)`, `execute_end(forward)`, `forward_begin()`, `forward_end()`,
    /// `op_begin(op)`, `op_end(op)`, `sample_begin() -> bool`, `sample_end()`, `begin_step(step)`,
    /// `end_step()`. Each timed region of the engine step is a call when it begins and one when it ends; the
    /// clock is read natively (see `step_path` for what each records, and `step_functions` for
    /// why this type is written against the C API).
    fn step_path<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        crate::step_functions::step_path(slf.as_any(), &slf.get().step)
    }

    /// Whether a model runner's step is under way in this process.
    fn in_step(&self) -> bool {
        self.step.in_step()
    }

    /// Steps recorded so far through the step path (the idle flusher watches it).
    fn activity(&self) -> u64 {
        self.step.activity()
    }

    /// The request began running.
    fn started(&self, request_id: &str) {
        self.requests.started(request_id);
    }

    /// The request was preempted.
    fn preempted(&self, request_id: &str, reason: &str, extra_info: &str) {
        self.requests.preempted(request_id, reason, extra_info);
    }

    /// A preempted request runs again.
    fn resumed(&self, request_id: &str) {
        self.requests.resumed(request_id);
    }

    /// The request completed.
    fn finished(&self, request_id: &str, extra_info: &str) {
        self.requests.finished(request_id, extra_info);
    }

    /// The request was removed before completing.
    fn evicted(&self, request_id: &str, reason: &str, extra_info: &str) {
        self.requests.evicted(request_id, reason, extra_info);
    }

    /// One encoder (0), decoder (1) or cross-attention (2) call that ended now.
    fn component(&self, component: usize, duration_ns: i64, context: &str) {
        if let Some(&c) = COMPONENTS.get(component) {
            self.components.record_ms(c, context, ns_to_ms(duration_ns));
        }
    }

    /// One KV cache reading, now: blocks used and in the cache, prefix-cache lookups and hits
    /// since the previous reading.
    fn kv_cache(&self, used_blocks: u32, total_blocks: u32, prefix_cache_queries: u64, prefix_cache_hits: u64) {
        self.kv_cache.record(&KvCacheSample { used_blocks, total_blocks, prefix_cache_queries, prefix_cache_hits });
    }

    /// A CUDA graph event, now: 0 capture of a graph for `batch_size` tokens that took
    /// `duration_ns` (its row starts that long ago), 1 a step of `batch_size` tokens replayed the
    /// graph captured for `padded_batch_size`, 2 a step of `batch_size` tokens ran eagerly.
    /// Negative `padded_batch_size` / `duration_ns`: none.
    #[pyo3(signature = (event, batch_size, padded_batch_size=-1, duration_ns=-1))]
    fn graph(&self, event: usize, batch_size: u32, padded_batch_size: i64, duration_ns: i64) {
        if let Some(&e) = GraphEvent::ALL.get(event) {
            let padded = u32::try_from(padded_batch_size).ok();
            let duration = u64::try_from(duration_ns).ok().map(Duration::from_nanos);
            self.cuda_graphs.record(e, batch_size, padded, duration);
        }
    }

    /// Tokens one MoE layer routed to each of its experts in one step (a token routed to k
    /// experts counts k times), indexed by expert id.
    fn moe_layer(&self, layer: u32, tokens_per_expert: Vec<u32>) {
        self.moe.record_layer(layer, &tokens_per_expert);
    }

    /// Declares the model type: `encoder_decoder` or `decoder_only`.
    fn declare_model_type(&self, model_type: &str) -> PyResult<()> {
        let t = match model_type {
            "encoder_decoder" => ModelType::EncoderDecoder,
            "decoder_only" => ModelType::DecoderOnly,
            other => {
                return Err(PyValueError::new_err(format!(
                    "model type must be `encoder_decoder` or `decoder_only`, not `{other}`"
                )))
            }
        };
        self.components.declare_model_type(t);
        Ok(())
    }

    /// Waits until everything recorded so far is in the files.
    fn flush(&self, py: Python<'_>) -> PyResult<()> {
        let guard = self.session.lock().map_err(|_| PyRuntimeError::new_err("session lock poisoned"))?;
        match guard.as_ref() {
            Some(s) => py.detach(|| s.flush()).map_err(|e| PyRuntimeError::new_err(e.to_string())),
            None => Ok(()),
        }
    }

    /// Writes the last rows, the summaries and the manifest; returns the manifest as JSON (None
    /// when already shut down). Later records are dropped and counted.
    fn shutdown(&self, py: Python<'_>) -> PyResult<Option<String>> {
        let session = self.session.lock().map_err(|_| PyRuntimeError::new_err("session lock poisoned"))?.take();
        let Some(session) = session else { return Ok(None) };
        let manifest = py.detach(|| session.shutdown()).map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
        serde_json::to_string(&manifest).map(Some).map_err(|e| PyRuntimeError::new_err(e.to_string()))
    }
}

/// The extension module.
#[pymodule]
#[pyo3(name = "_native")]
fn native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<Recorder>()?;
    crate::step_functions::add_functions(m)?;
    m.add_class::<crate::live::PyPartsSeries>()?;
    m.add_function(wrap_pyfunction!(resolve_config, m)?)?;
    m.add_function(wrap_pyfunction!(merge, m)?)?;
    m.add_function(wrap_pyfunction!(runs, m)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the recorder's `forward`, `cpu` and `component` do with Python's nanoseconds: a
    /// negative duration is dropped and counted, a positive one recorded to the nanosecond.
    #[test]
    fn negative_durations_from_python_are_dropped_and_counted() {
        let memory = profilemate::MemorySink::new();
        let session = profilemate::Session::builder().in_memory_only().sink(memory.clone()).build().unwrap();
        session.forward_pass().record_ms(Phase::Decode, 4, 4, ns_to_ms(-5));
        session.forward_pass().record_ms(Phase::Decode, 4, 4, ns_to_ms(1_234_567));
        session.cpu_timing().record_ms(OPS[0], ns_to_ms(-1), "");
        session.components().record_ms(COMPONENTS[0], "vision_encoder", ns_to_ms(i64::MIN));
        let manifest = session.shutdown().unwrap();
        assert_eq!(manifest.dropped["forward_pass"]["invalid_value"], 1);
        assert_eq!(manifest.dropped["cpu_timing"]["invalid_value"], 1);
        assert_eq!(manifest.dropped["encoder_decoder"]["invalid_value"], 1);
        let rows = memory.rows();
        assert_eq!(rows.forward_pass.len(), 1);
        assert_eq!(rows.forward_pass[0].forward_time_ns, 1_234_567);
    }
}
