//! `profilemate recover DIR`: completes the files of a run whose process was killed.
//!
//! A killed process leaves CSV files whose last line may be torn, a Perfetto trace without its
//! closing `]`, summaries up to one summary period old, a manifest that says `finished: false`,
//! and its thread buffers (a file mapping the kernel kept, see `profilemate-core`'s `ring`
//! module). Recovery first replays the buffers of every dead session in the directory into the
//! CSV tables ([`profilemate_sinks::recover_buffers`]: exactly once, torn last lines dropped
//! first), then drops the torn last lines of the other files, closes the traces, rewrites every
//! summary from the rows on disk (through the core's own profilers, so they equal a
//! recomputation), and records in the manifest what it did (`finished_cleanly: false`,
//! `events_recovered`, `events_lost_in_flight`, `recovery`). It is idempotent: a second run
//! changes no row. A run that finished cleanly is left as it is.
//!
//! The step timeline: `step_timeline.csv` keeps the rows on disk (a torn last line dropped, as in
//! every table) and `step_timeline_summary.json` is rebuilt from them. Steps the collector still
//! held open at the kill (it writes a step once two later steps began, so the last two or so)
//! have their rows, with their `step`, in the other tables but no timeline row: recovery does
//! not join them, since the step guard's bounds that set a step's wall time lived only in the
//! process.
//!
//! Parquet tables left as `<table>.parquet.partial` (no footer) are written again, complete,
//! from their CSV tables ([`profilemate_sinks::ParquetSink::complete_partial`]), every table of
//! the Parquet sink; one that cannot be (no CSV table to rebuild it from) stays `.partial` and
//! is named, with the reason, in the manifest's `recovery.parquet_not_completed`. The killed
//! process's Perfetto trace gets the events of the rows it lacks (replayed from the buffers, or
//! of the pass the process died in) before it is closed
//! ([`profilemate_sinks::PerfettoSink::complete_trace`]), so it shows what the tables hold.

use crate::contract::*;
use crate::data::RunData;
use crate::error::ReportError;
use profilemate_core::{
    BatchSample, BatchUtilizationProfiler, CpuTimingProfiler, CudaGraphProfiler, EncoderDecoderProfiler, Event,
    ForwardPassProfiler, KvCacheProfiler, KvCacheSample, MoeExpertProfiler, PreemptionProfiler, Profiler, Rows,
    StepTimelineRow, StepTimelineSummary, Summaries,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What [`recover`] did.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Recovery {
    /// `false` when the run had finished cleanly and nothing was touched.
    pub needed: bool,
    /// Bytes of torn last lines dropped, per CSV file.
    pub torn_bytes_dropped: BTreeMap<String, u64>,
    /// Trace files whose closing `]` was added.
    pub traces_closed: Vec<String>,
    /// Events appended to the killed process's trace before it was closed: the rows of the
    /// tables it did not show (replayed from the buffers, or of the pass the process died in).
    pub trace_events_added: u64,
    /// Summary files rewritten from the rows.
    pub summaries_rebuilt: Vec<String>,
    /// Parquet files left incomplete (`.partial`, no footer) by the killed process that recovery
    /// could not complete, each with the reason (no CSV table to rebuild it from, CSV lines that
    /// do not parse). Empty when every table was completed.
    pub parquet_not_completed: BTreeMap<String, String>,
    /// Parquet tables completed: written again from their CSV table, whose rows they hold.
    pub parquet_completed: Vec<String>,
    /// Records still in the dead process's thread buffers, turned into rows by this run.
    pub events_recovered: u64,
    /// Records lost because they were being written at the instant of the kill (or waited
    /// for their device time in the collector), found by this run.
    pub events_lost_in_flight: u64,
    /// The dead sessions whose buffers this run replayed.
    pub buffers_replayed: Vec<profilemate_core::ReplayedSession>,
}

fn io(path: &Path, e: std::io::Error) -> ReportError {
    ReportError::io(path, e)
}

/// Completes the files of the run in `dir` after its process was killed (see the module docs):
/// the dead session's thread buffers replayed, torn lines dropped, traces closed, summaries
/// and manifest rebuilt. This is the call for any tool that completes a killed run's directory
/// (the vLLM binding's merge, for each part).
///
/// ```
/// let dir = tempfile::tempdir()?;
/// std::fs::write(dir.path().join("forward_pass_timing.csv"),
///     "timestamp_sec,phase,batch_size,num_tokens,forward_time_ms,throughput_tokens_per_sec\n\
///      0.100000,decode,4,4,2.000000,2000.000\n0.2000")?;
/// std::fs::write(dir.path().join("profilemate_run.json"), r#"{"finished": false, "steps": 1}"#)?;
/// let r = profilemate_cli::recover(dir.path())?;
/// assert_eq!(r.torn_bytes_dropped["forward_pass_timing.csv"], 6);
/// assert!(r.summaries_rebuilt.contains(&"forward_pass_summary.json".to_string()));
/// assert_eq!(profilemate_cli::recover(dir.path())?.torn_bytes_dropped.len(), 0, "idempotent");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
///
/// [`ReportError::Io`] naming the file when one cannot be read or written (a read-only
/// directory, a full disk): the files are left as they were, for a later try;
/// [`ReportError::MalformedJson`] for a manifest that is not JSON.
pub fn recover(dir: impl AsRef<Path>) -> Result<Recovery, ReportError> {
    let dir = dir.as_ref();
    // 0. The dead sessions' thread buffers become rows first (torn lines dropped before).
    let core_error = |e: profilemate_core::Error| match e {
        profilemate_core::Error::Recovery { dir, source } => io(&dir, source),
        other => io(dir, std::io::Error::other(other.to_string())),
    };
    let replay = profilemate_sinks::replay_buffers(dir).map_err(core_error)?;
    let manifest_path = dir.join(MANIFEST_JSON);
    let mut manifest: serde_json::Value = match std::fs::read(&manifest_path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| ReportError::MalformedJson {
            file: MANIFEST_JSON.to_string(),
            line: e.line(),
            column: e.column(),
            message: e.to_string(),
        })?,
        Err(e) => return Err(io(&manifest_path, e)),
    };
    // A buffer file an interrupted recovery replayed and already counted in the manifest is
    // not counted again.
    let counted: Vec<String> = manifest
        .pointer("/recovery/buffers_replayed")
        .and_then(|v| v.as_array())
        .map(|a| a.iter().filter_map(|s| s.get("file").and_then(|f| f.as_str()).map(String::from)).collect())
        .unwrap_or_default();
    let sessions: Vec<_> =
        replay.replay.sessions.into_iter().filter(|s| !(s.already_replayed && counted.contains(&s.file))).collect();
    let mut report = Recovery {
        events_recovered: sessions.iter().map(|s| s.events_recovered).sum(),
        events_lost_in_flight: sessions.iter().map(|s| s.events_lost_in_flight).sum(),
        buffers_replayed: sessions,
        torn_bytes_dropped: replay.torn_bytes_dropped,
        ..Recovery::default()
    };
    if manifest.get("finished").and_then(|v| v.as_bool()) == Some(true) && report.buffers_replayed.is_empty() {
        profilemate_core::remove_replayed_buffers(dir).map_err(core_error)?;
        return Ok(report);
    }
    report.needed = true;

    // 1. Torn last lines: each table file (and its rolled-over files) ends at its last complete row.
    for table in TABLE_FILES {
        let mut files = crate::input::rolled_files(dir, table).map_err(|e| io(dir, e))?;
        files.push(table.to_string());
        for name in files {
            let path = dir.join(&name);
            if let Some(dropped) = profilemate_sinks::drop_torn_line(&path).map_err(|e| io(&path, e))? {
                report.torn_bytes_dropped.insert(name, dropped);
            }
        }
    }
    // 2. Parquet tables left `.partial` (no footer) are written again from their CSV tables,
    //    complete now. The killed process's rank is not recorded elsewhere: the rank column is
    //    the one this process's environment gives (PROFILEMATE_RANK, RANK, ...).
    let host = manifest.get("host").and_then(|h| h.as_str()).unwrap_or_default().to_string();
    let rank = profilemate_sinks::rank_from_env().map_err(|e| io(dir, std::io::Error::other(e.to_string())))?;
    let parquet = profilemate_sinks::ParquetSink::complete_partial(dir, &host, rank)
        .map_err(|e| io(dir, std::io::Error::other(e.to_string())))?;
    report.parquet_completed = parquet.completed;
    report.parquet_not_completed = parquet.not_completed;
    // Traces: whole events only (the sink writes them so). The rows the trace lacks (those
    // replayed from the buffers, and those of the pass the process died in) are appended as
    // whole events first, so the trace and the tables agree; then the array is closed.
    let trace_rows = profilemate_sinks::TableFollower::with_tables(
        dir,
        &[
            profilemate_core::Table::ForwardPass,
            profilemate_core::Table::CpuOperations,
            profilemate_core::Table::EncoderDecoder,
            profilemate_core::Table::CudaGraphEvents,
            profilemate_core::Table::PreemptionEvents,
            profilemate_core::Table::BatchUtilization,
            profilemate_core::Table::KvCacheUsage,
        ],
    )
    .poll();
    let trace = profilemate_sinks::PerfettoSink::complete_trace(dir, &trace_rows)
        .map_err(|e| io(dir, std::io::Error::other(e.to_string())))?;
    report.trace_events_added = trace.events_added;
    for entry in std::fs::read_dir(dir).map_err(|e| io(dir, e))? {
        let entry = entry.map_err(|e| io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("profilemate_trace") && name.ends_with(".json") && close_trace(&entry.path())? {
            report.traces_closed.push(name);
        } else if name.ends_with(".parquet.partial") && !report.parquet_not_completed.contains_key(&name) {
            // Not a contract table's (no CSV table can rebuild it).
            report.parquet_not_completed.insert(name, "not a table of the Parquet sink".into());
        }
    }
    report.traces_closed.sort();
    // 3. Summaries from the rows now on disk.
    let data = RunData::load(dir)?;
    let threshold =
        manifest.pointer("/config/underutilization_threshold_pct").and_then(serde_json::Value::as_f64).unwrap_or(50.0);
    // Rows alone cannot tell which arrived after their step was written: the count last written.
    let late_rows = std::fs::read(dir.join(STEP_TIMELINE_JSON))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v.get("late_rows").and_then(serde_json::Value::as_u64))
        .unwrap_or(0);
    let summaries = summaries_from_rows(&data, threshold, late_rows);
    let files = summaries.to_json_files().map_err(|e| io(dir, std::io::Error::other(e)))?;
    for (file, value) in files {
        let path = dir.join(file.file_name());
        let bytes = serde_json::to_vec_pretty(&value).map_err(|e| io(&path, std::io::Error::other(e)))?;
        profilemate_core::write_atomic(&path, &bytes).map_err(|e| io(&path, e))?;
        report.summaries_rebuilt.push(file.file_name().to_string());
    }
    // 4. The manifest says what happened; rows are counted again from the files.
    if let Some(obj) = manifest.as_object_mut() {
        obj.insert("finished_cleanly".into(), false.into());
        let mut rows = serde_json::Map::new();
        let counts = [
            (FORWARD_PASS_CSV, data.forward_pass.as_ref().map(Vec::len)),
            (CPU_CSV, data.cpu_operations.as_ref().map(Vec::len)),
            (BATCH_CSV, data.batch.as_ref().map(Vec::len)),
            (PREEMPTION_EVENTS_CSV, data.preemption_events.as_ref().map(Vec::len)),
            (LIFECYCLE_CSV, data.request_lifecycle.as_ref().map(Vec::len)),
            (ENCODER_DECODER_CSV, data.components.as_ref().map(Vec::len)),
            (KV_CACHE_CSV, data.kv_cache.as_ref().map(Vec::len)),
            (CUDA_GRAPH_CSV, data.cuda_graph.as_ref().map(Vec::len)),
            (MOE_CSV, data.moe_routing.as_ref().map(|m| m.rows as usize)),
            (STEP_TIMELINE_CSV, data.step_timeline.as_ref().map(Vec::len)),
        ];
        for (file, n) in counts {
            if let Some(n) = n {
                rows.insert(file.to_string(), n.into());
            }
        }
        obj.insert("rows_on_disk".into(), rows.into());
        if let Some(n) = &data.forward_pass {
            obj.insert("steps".into(), n.len().into());
        }
        let earlier = obj.get("recovery").cloned();
        let mut torn: BTreeMap<String, u64> = earlier
            .as_ref()
            .and_then(|r| r.get("torn_bytes_dropped"))
            .and_then(|t| serde_json::from_value(t.clone()).ok())
            .unwrap_or_default();
        torn.extend(report.torn_bytes_dropped.clone());
        // Counted once, by the run that replayed the buffers: a second run adds 0.
        let earlier_count =
            |key: &str| earlier.as_ref().and_then(|r| r.get(key)).and_then(serde_json::Value::as_u64).unwrap_or(0);
        let events_recovered = earlier_count("events_recovered") + report.events_recovered;
        let events_lost_in_flight = earlier_count("events_lost_in_flight") + report.events_lost_in_flight;
        let mut sessions: Vec<serde_json::Value> = earlier
            .as_ref()
            .and_then(|r| r.get("buffers_replayed"))
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default();
        for s in &report.buffers_replayed {
            sessions.push(serde_json::to_value(s).map_err(|e| io(&manifest_path, std::io::Error::other(e)))?);
        }
        let recovery = serde_json::json!({
            "torn_bytes_dropped": torn,
            "traces_closed": report.traces_closed,
            "trace_events_added": report.trace_events_added,
            "summaries_rebuilt": report.summaries_rebuilt,
            "parquet_not_completed": report.parquet_not_completed,
            "parquet_completed": report.parquet_completed,
            "events_recovered": events_recovered,
            "events_lost_in_flight": events_lost_in_flight,
            "buffers_replayed": sessions,
        });
        obj.insert("events_recovered".into(), events_recovered.into());
        obj.insert("events_lost_in_flight".into(), events_lost_in_flight.into());
        let mut recovery = recovery;
        if let Some(lost) = moe_window_lost(dir, &data, &manifest_config_window(obj))? {
            recovery["moe_window_lost"] = lost;
        }
        if data.step_timeline.is_some() {
            recovery["step_timeline"] = "summary rebuilt from step_timeline.csv; steps the collector still held \
                                         open at the kill (the last two or so) have no timeline row, their rows \
                                         keep their step in the other tables"
                .into();
        }
        obj.insert("recovery".into(), recovery);
    }
    let bytes = serde_json::to_vec_pretty(&manifest).map_err(|e| io(&manifest_path, std::io::Error::other(e)))?;
    profilemate_core::write_atomic(&manifest_path, &bytes).map_err(|e| io(&manifest_path, e))?;
    // The figures are recorded: the replayed buffers can go.
    profilemate_core::remove_replayed_buffers(dir).map_err(core_error)?;
    Ok(report)
}

/// The manifest's `config.moe_window_steps` (0: per-step detail rows).
fn manifest_config_window(manifest: &serde_json::Map<String, serde_json::Value>) -> Option<u64> {
    manifest.get("config").and_then(|c| c.get("moe_window_steps")).and_then(serde_json::Value::as_u64)
}

/// The MoE routing of the window in progress at the kill: its totals are added in place on the
/// recording thread, in the heap, and died with the process (per-step detail rows go through
/// the thread buffers and are replayed). Rows alone cannot say how many routing calls that
/// window held, so it is stated from the steps: with one routing call per layer per step (the
/// windows' `window_first_step` counts them so), a layer whose rows cover `c` calls lost the
/// calls of steps `c + 1` to the last forward row's step. `None` when nothing is lost or MoE
/// was not recorded.
fn moe_window_lost(
    dir: &Path,
    data: &RunData,
    window_steps: &Option<u64>,
) -> Result<Option<serde_json::Value>, ReportError> {
    if *window_steps == Some(0) || data.moe_routing.is_none() {
        return Ok(None);
    }
    let Some(last_step) = data.forward_pass.as_ref().and_then(|f| f.iter().filter_map(|r| r.step).max()) else {
        return Ok(None);
    };
    let path = dir.join(MOE_CSV);
    let mut reader = csv::Reader::from_path(&path).map_err(|e| io(&path, std::io::Error::other(e)))?;
    let header = reader.headers().map_err(|e| io(&path, std::io::Error::other(e)))?.clone();
    let column = |name: &str| header.iter().position(|h| h == name);
    let (Some(layer_at), Some(first_at), Some(steps_at)) =
        (column("layer"), column("window_first_step"), column("window_steps"))
    else {
        return Ok(None);
    };
    let mut covered: BTreeMap<u64, u64> = BTreeMap::new();
    let mut record = csv::StringRecord::new();
    while reader.read_record(&mut record).map_err(|e| io(&path, std::io::Error::other(e)))? {
        let num = |i: usize| record.get(i).and_then(|v| v.parse::<u64>().ok());
        if let (Some(layer), Some(first), Some(steps)) = (num(layer_at), num(first_at), num(steps_at)) {
            let c = covered.entry(layer).or_insert(0);
            *c = (*c).max(first + steps);
        }
    }
    let layers: serde_json::Map<String, serde_json::Value> = covered
        .iter()
        .filter(|(_, c)| **c < last_step)
        .map(|(layer, c)| (layer.to_string(), serde_json::json!({"calls_in_rows": c, "steps_lost": last_step - c})))
        .collect();
    let least = covered.values().copied().min().unwrap_or(0);
    if least >= last_step {
        return Ok(None);
    }
    Ok(Some(serde_json::json!({
        "last_step": last_step,
        "steps_lost_max": last_step - least,
        "layers": layers,
        "note": "MoE routing totals of the window in progress were held in the killed process's heap: lost. \
                 Steps counted with one routing call per layer per step; layers with no row at all are not listed",
    })))
}

const TABLE_FILES: [&str; 10] = [
    FORWARD_PASS_CSV,
    CPU_CSV,
    BATCH_CSV,
    PREEMPTION_EVENTS_CSV,
    LIFECYCLE_CSV,
    ENCODER_DECODER_CSV,
    KV_CACHE_CSV,
    CUDA_GRAPH_CSV,
    MOE_CSV,
    STEP_TIMELINE_CSV,
];

/// Adds the closing `]` to a trace that lacks it; `true` when it did.
fn close_trace(path: &PathBuf) -> Result<bool, ReportError> {
    let text = std::fs::read(path).map_err(|e| io(path, e))?;
    let trimmed = text.trim_ascii_end();
    if trimmed.ends_with(b"]") {
        return Ok(false);
    }
    if trimmed.is_empty() {
        // Created, killed before anything reached it.
        profilemate_core::write_atomic(path, b"[]\n").map_err(|e| io(path, e))?;
        return Ok(true);
    }
    let body = trimmed.strip_suffix(b",").unwrap_or(trimmed);
    let mut closed = body.to_vec();
    closed.extend_from_slice(b"\n]\n");
    if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&closed) {
        return Err(io(path, std::io::Error::other(format!("the trace does not end with a whole event: {e}"))));
    }
    profilemate_core::write_atomic(path, &closed).map_err(|e| io(path, e))?;
    Ok(true)
}

fn ns(sec: f64) -> u64 {
    (sec * 1e9).round().max(0.0) as u64
}

fn ms_ns(ms: f64) -> u64 {
    (ms * 1e6).round().max(0.0) as u64
}

fn count(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

/// Every summary the rows of `data` support, computed by the core's profilers as a session
/// would have.
fn summaries_from_rows(data: &RunData, threshold: f64, late_rows: u64) -> Summaries {
    let mut s = Summaries::default();
    let mut rows = Rows::default();
    if let Some(r) = &data.forward_pass {
        let mut p = ForwardPassProfiler::new();
        for r in r {
            let ev = Event::ForwardPass {
                timestamp_ns: ns(r.timestamp_sec),
                phase: r.phase,
                batch_size: count(r.batch_size),
                num_tokens: count(r.num_tokens),
                duration_ns: ms_ns(r.forward_time_ms),
            };
            p.observe(&ev, &mut rows);
        }
        p.summarize(&mut s);
    }
    if let Some(r) = &data.cpu_operations {
        let mut p = CpuTimingProfiler::new();
        let mut ids: BTreeMap<&str, (u16, std::sync::Arc<str>)> = BTreeMap::new();
        for r in r {
            let next = ids.len() as u16;
            let (id, name) = ids.entry(r.operation.as_str()).or_insert_with(|| (next, r.operation.as_str().into()));
            let ev = Event::CpuOperation {
                timestamp_ns: ns(r.timestamp_sec),
                operation: *id,
                name,
                duration_ns: ms_ns(r.duration_ms),
                context: "",
            };
            p.observe(&ev, &mut rows);
        }
        p.summarize(&mut s);
    }
    if let Some(r) = &data.batch {
        let mut p = BatchUtilizationProfiler::new(threshold);
        for r in r {
            let sample = BatchSample {
                num_seqs: count(r.num_seqs),
                max_num_seqs: count(r.max_num_seqs),
                num_tokens: count(r.num_tokens),
                max_tokens: count(r.max_tokens),
                phase: r.phase,
                running_queue_len: count(r.running_queue_len),
                waiting_queue_len: count(r.waiting_queue_len),
            };
            p.observe(&Event::Batch { timestamp_ns: ns(r.timestamp_sec), sample }, &mut rows);
        }
        p.summarize(&mut s);
    }
    if let Some(r) = &data.preemption_events {
        let mut p = PreemptionProfiler::new();
        for r in r {
            let ev = Event::Lifecycle {
                timestamp_ns: ns(r.timestamp_sec),
                request_id: &r.request_id,
                event: r.event,
                reason: &r.reason,
                extra_info: "",
            };
            p.observe(&ev, &mut rows);
        }
        p.summarize(&mut s);
    }
    if let Some(r) = &data.components {
        let mut p = EncoderDecoderProfiler::new();
        for r in r {
            let ev = Event::Component {
                timestamp_ns: ns(r.timestamp_sec),
                component: r.component,
                duration_ns: ms_ns(r.duration_ms),
                context: &r.context,
            };
            p.observe(&ev, &mut rows);
        }
        p.summarize(&mut s);
    }
    if let Some(r) = &data.kv_cache {
        let mut p = KvCacheProfiler::new();
        for r in r {
            let sample = KvCacheSample {
                used_blocks: count(r.used_blocks),
                total_blocks: count(r.total_blocks),
                prefix_cache_queries: r.prefix_cache_queries,
                prefix_cache_hits: r.prefix_cache_hits,
            };
            p.observe(&Event::KvCache { timestamp_ns: ns(r.timestamp_sec), sample }, &mut rows);
        }
        p.summarize(&mut s);
    }
    if let Some(r) = &data.cuda_graph {
        let mut p = CudaGraphProfiler::new();
        for r in r {
            let ev = Event::CudaGraph {
                timestamp_ns: ns(r.timestamp_sec),
                event: r.event,
                batch_size: count(r.batch_size),
                padded_batch_size: r.padded_batch_size.map(count),
                duration_ns: r.duration_ms.map(ms_ns),
            };
            p.observe(&ev, &mut rows);
        }
        p.summarize(&mut s);
    }
    if let Some(m) = &data.moe_routing {
        let mut p = MoeExpertProfiler::new();
        let mut records = m.records;
        for (layer, tokens) in &m.tokens {
            p.add_totals(u32::try_from(*layer).unwrap_or(u32::MAX), tokens, std::mem::take(&mut records));
        }
        p.summarize(&mut s);
    }
    if let Some(steps) = &data.step_timeline {
        let rows: Vec<StepTimelineRow> = steps
            .iter()
            .map(|r| {
                let opt = |ms: Option<f64>| ms.map(ms_ns);
                StepTimelineRow {
                    step: r.step,
                    start_ns: ns(r.start_sec),
                    phase: r.phase,
                    forward_time_ns: opt(r.forward_time_ms),
                    scheduling_ns: opt(r.scheduling_ms),
                    batch_preparation_ns: opt(r.batch_preparation_ms),
                    sampling_ns: opt(r.sampling_ms),
                    other_cpu_ns: opt(r.other_cpu_ms),
                    wall_ns: ms_ns(r.step_wall_ms),
                    host_gap_before_ns: opt(r.host_gap_before_ms),
                    unclaimed_ns: ms_ns(r.unclaimed_ms),
                    preemptions: r.preemptions.map(count),
                    encoder_time_ns: opt(r.encoder_time_ms),
                    ..StepTimelineRow::default()
                }
            })
            .collect();
        s.step_timeline = Some(StepTimelineSummary::from_rows(&rows, late_rows));
    }
    s
}
