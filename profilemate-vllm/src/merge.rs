//! Builds the top-level contract files of a multi-process vLLM run from what each process wrote.
//!
//! Every process of a run (the front end, the engine core, each worker) records into its own
//! part directory, `DIR/parts/<run>/<role>-<pid>/`, with the core's usual files and manifest.
//! The manifests carry `monotonic_start_ns`, the `CLOCK_MONOTONIC` reading at each part's
//! `timestamp_sec = 0`, and every process on a host reads the same clock, so the parts share
//! one time base. [`merge`] rebases every row onto the earliest part's start, replays the rows
//! through the core's own profilers (so summaries, request lifecycles and percentiles are
//! computed exactly as a single session computes them) and writes the contract files into
//! `DIR`. Forward rows get one more column at the end, `rank`, the worker rank that ran them.
//!
//! The CUDA graph and MoE routing trackers run only in the processes that have something for
//! them (a worker whose model runner uses CUDA graphs, a model with MoE layers); the merged
//! files have them when any part has. A MoE record (one layer in one step) is the run of rows
//! with the same time and layer; it is replayed with as many experts as the part's summary
//! gave that layer, so experts that never received a token keep their place in the summary.
//!
//! Parts of processes that were killed are merged as far as their files go: complete lines
//! parse, a torn last line is skipped and counted.

use profilemate::{
    write_atomic, BatchSample, BatchUtilizationProfiler, Component, Config, CpuTimingProfiler, CsvSink,
    CudaGraphProfiler, EncoderDecoderProfiler, Event, ForwardPassProfiler, GraphEvent, JsonSummarySink,
    KvCacheProfiler, KvCacheSample, LifecycleEvent, ModelType, MoeExpertProfiler, Phase, PreemptionProfiler, Profiler,
    ProfilerKind, Rows, RunManifest, Sink, StepTimelineBuilder, Summaries, Table, MANIFEST_FILE,
};
use profilemate::{ParquetSink, PerfettoSink, SinkKind};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The folder under the output directory that holds the runs' parts.
pub const PARTS_DIR: &str = "parts";

/// The file in each part directory that says which process wrote it.
pub const PART_FILE: &str = "part.json";

/// What went wrong in a merge.
#[derive(Debug)]
#[non_exhaustive]
pub enum MergeError {
    /// `DIR/parts` holds no run (profiling was not active, or nothing was recorded yet).
    ///
    /// Fix: point the merge at the directory given in `VLLM_PROFILING_DIR`/`PROFILEMATE_DIR`.
    NoParts(PathBuf),
    /// A file could not be read or written.
    Io(PathBuf, std::io::Error),
    /// A manifest could not be parsed.
    Manifest(PathBuf, String),
    /// Writing the merged files failed.
    Write(String),
}

impl std::fmt::Display for MergeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MergeError::NoParts(p) => write!(f, "no profilemate parts under {}", p.display()),
            MergeError::Io(p, e) => write!(f, "{}: {e}", p.display()),
            MergeError::Manifest(p, e) => write!(f, "{}: not a profilemate manifest: {e}", p.display()),
            MergeError::Write(e) => write!(f, "cannot write the merged files: {e}"),
        }
    }
}

impl std::error::Error for MergeError {}

/// The tables read from the parts: the per-event tables, the ones the live follower reads too
/// (the lifecycle table is rebuilt from the events, the step timeline from the others).
const MERGED: [Table; 8] = profilemate::FOLLOWED_TABLES;

/// The trackers a part turns on only when its process has something for them.
const ON_DEMAND: [ProfilerKind; 2] = [ProfilerKind::CudaGraph, ProfilerKind::MoeExpert];

/// One part, as the merge found it.
#[derive(Debug, Clone, Serialize)]
pub struct PartReport {
    /// The part directory, relative to the output directory.
    pub dir: String,
    /// `main`, `engine`, `worker`, ... as the plugin named the process.
    pub role: String,
    /// The worker rank, for parts that ran the model.
    pub rank: Option<u32>,
    /// The process id.
    pub pid: u32,
    /// Whether the process shut its session down cleanly (a killed one did not).
    pub finished: bool,
    /// Nanoseconds from the run's start to this part's start.
    pub offset_ns: u64,
    /// Rows read per CSV file.
    pub rows: BTreeMap<String, u64>,
    /// Torn or malformed lines skipped.
    pub skipped_lines: u64,
    /// Records a killed process had recorded but not yet written, replayed from its thread
    /// buffers (the mapped `.profilemate_buffers.*` files it left) into its CSV tables before
    /// they were read: see `profilemate::recover_buffers`.
    pub events_recovered: u64,
    /// Records the process was writing at the instant of the kill: counted, not replayable.
    pub events_lost_in_flight: u64,
    /// Why a killed process's buffers could not be replayed (a read-only or full directory; they
    /// are kept for a later merge), if so.
    pub recovery_error: Option<String>,
}

/// What [`merge`] did.
#[derive(Debug, Clone, Serialize)]
pub struct MergeReport {
    /// The output directory written.
    pub dir: PathBuf,
    /// The run that was merged (its folder under `parts/`).
    pub run: String,
    /// The parts merged, earliest first.
    pub parts: Vec<PartReport>,
    /// Rows written per CSV file.
    pub rows: BTreeMap<String, u64>,
    /// Whether every part was shut down cleanly.
    pub complete: bool,
}

/// The runs recorded under `dir`, oldest first (run folder names start with a UTC timestamp).
///
/// ```
/// let dir = tempfile::tempdir()?;
/// assert!(profilemate_vllm::runs(dir.path()).is_empty());
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn runs(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(dir.join(PARTS_DIR))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    out.sort();
    out
}

struct Part {
    report: PartReport,
    manifest: RunManifest,
    model_type: Option<String>,
    path: PathBuf,
}

/// Merges the parts of one run (`run`, or the latest) under `dir` into the contract files in
/// `dir`, replacing what a previous merge wrote there.
///
/// # Errors
///
/// [`MergeError::NoParts`] when there is nothing to merge; I/O and manifest errors otherwise.
pub fn merge(dir: &Path, run: Option<&str>) -> Result<MergeReport, MergeError> {
    let run = match run {
        Some(r) => r.to_string(),
        None => runs(dir).pop().ok_or_else(|| MergeError::NoParts(dir.join(PARTS_DIR)))?,
    };
    let run_dir = dir.join(PARTS_DIR).join(&run);
    let mut parts = read_parts(dir, &run_dir)?;
    if parts.is_empty() {
        return Err(MergeError::NoParts(run_dir));
    }
    // A process that did not shut down may have been killed with records still in its thread
    // buffers: those of a dead session become rows of its CSV tables first (a live session's are
    // left alone, so merging while a process still runs changes nothing of its part).
    for p in parts.iter_mut().filter(|p| !p.report.finished) {
        match profilemate::recover_buffers(&p.path) {
            Ok(done) => {
                p.report.events_recovered = done.replay.events_recovered();
                p.report.events_lost_in_flight = done.replay.events_lost_in_flight();
            }
            Err(e) => p.report.recovery_error = Some(e.to_string()),
        }
    }
    let base = parts.iter().map(|p| p.manifest.monotonic_start_ns).min().unwrap_or(0);
    for p in &mut parts {
        p.report.offset_ns = p.manifest.monotonic_start_ns.saturating_sub(base);
    }
    parts.sort_by_key(|p| (p.report.offset_ns, p.report.pid));

    // Every row of every part, on the run's time base.
    let mut timeline = Timeline::default();
    for (i, p) in parts.iter_mut().enumerate() {
        timeline.read_part(i, &p.path, p.report.offset_ns, &mut p.report)?;
    }
    let end_ns = parts
        .iter()
        .map(|p| p.report.offset_ns + (p.manifest.elapsed_sec.max(0.0) * 1e9) as u64)
        .max()
        .unwrap_or(0)
        .max(timeline.last_ns);

    let first = &parts[0].manifest;
    let mut config: Config = first.config.clone();
    config.dir = dir.to_path_buf();
    // On when any process had something for it (the earliest part is often the scheduler's).
    for kind in ON_DEMAND {
        config.disabled.retain(|k| *k != kind);
        if !parts.iter().any(|p| p.manifest.config.is_enabled(kind)) {
            config.disabled.push(kind);
        }
    }
    let declared = parts
        .iter()
        .filter_map(|p| p.model_type.as_deref())
        .any(|m| m == ModelType::EncoderDecoder.as_str())
        .then_some(ModelType::EncoderDecoder);

    let (rows, ranks, summaries) = timeline.replay(&parts, &config, declared, end_ns);
    write_outputs(dir, &config, &rows, &ranks, &summaries)?;
    write_trace_and_tables(dir, &parts, &config, declared, end_ns, &rows, &ranks)?;

    let mut counts = BTreeMap::new();
    for t in MERGED.into_iter().chain([Table::RequestLifecycle, Table::StepTimeline]) {
        if config.is_enabled(t.profiler()) {
            counts.insert(t.file_name().to_string(), rows.len(t) as u64);
        }
    }
    let complete = parts.iter().all(|p| p.report.finished);
    let report = MergeReport {
        dir: dir.to_path_buf(),
        run,
        parts: parts.iter().map(|p| p.report.clone()).collect(),
        rows: counts.clone(),
        complete,
    };
    write_manifest(dir, &parts, &config, counts, &rows, end_ns, &report)?;
    Ok(report)
}

fn read_parts(dir: &Path, run_dir: &Path) -> Result<Vec<Part>, MergeError> {
    let entries = std::fs::read_dir(run_dir).map_err(|e| MergeError::Io(run_dir.to_path_buf(), e))?;
    let mut parts = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let manifest_path = path.join(MANIFEST_FILE);
        if !manifest_path.is_file() {
            continue;
        }
        let text = std::fs::read(&manifest_path).map_err(|e| MergeError::Io(manifest_path.clone(), e))?;
        let manifest: RunManifest =
            serde_json::from_slice(&text).map_err(|e| MergeError::Manifest(manifest_path.clone(), e.to_string()))?;
        let info: serde_json::Value = std::fs::read(path.join(PART_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(serde_json::Value::Null);
        let model_type = std::fs::read(path.join("encoder_decoder_summary.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v.get("model_type").and_then(|m| m.as_str().map(str::to_string)));
        let rel = path.strip_prefix(dir).unwrap_or(&path).to_string_lossy().into_owned();
        parts.push(Part {
            report: PartReport {
                dir: rel,
                role: info.get("role").and_then(|r| r.as_str()).unwrap_or("process").to_string(),
                rank: info.get("rank").and_then(serde_json::Value::as_u64).and_then(|r| u32::try_from(r).ok()),
                pid: manifest.pid,
                finished: manifest.finished,
                offset_ns: 0,
                rows: BTreeMap::new(),
                skipped_lines: 0,
                events_recovered: 0,
                events_lost_in_flight: 0,
                recovery_error: None,
            },
            manifest,
            model_type,
            path,
        });
    }
    Ok(parts)
}

/// One row, with its place in the run: time, then part, then order within the part.
struct Keyed<T> {
    t: u64,
    part: usize,
    seq: usize,
    /// The row's `step` column (the engine step it belongs to), when the part has one.
    step: Option<u64>,
    row: T,
}

struct CpuRow {
    name: String,
    duration_ns: u64,
    context: String,
}

struct LifecycleRow {
    request_id: String,
    event: LifecycleEvent,
    reason: String,
    extra_info: String,
}

struct GraphRow {
    event: GraphEvent,
    batch_size: u32,
    padded_batch_size: Option<u32>,
    duration_ns: Option<u64>,
}

struct MoeRecord {
    layer: u32,
    tokens_per_expert: Vec<u32>,
}

#[derive(Default)]
struct Timeline {
    forward: Vec<Keyed<(Phase, u32, u32, u64)>>,
    cpu: Vec<Keyed<CpuRow>>,
    batch: Vec<Keyed<BatchSample>>,
    lifecycle: Vec<Keyed<LifecycleRow>>,
    components: Vec<Keyed<(Component, u64, String)>>,
    kv_cache: Vec<Keyed<KvCacheSample>>,
    cuda_graph: Vec<Keyed<GraphRow>>,
    moe: Vec<Keyed<MoeRecord>>,
    /// Each part's bounds of its steps, from its own `step_timeline.csv`: step, start, end.
    step_bounds: Vec<(u64, u64, u64)>,
    last_ns: u64,
}

impl Timeline {
    fn read_part(&mut self, part: usize, path: &Path, offset: u64, report: &mut PartReport) -> Result<(), MergeError> {
        for table in Table::ALL {
            if !MERGED.contains(&table) {
                // The lifecycle table is rebuilt from the events, which hold everything it says.
                continue;
            }
            let file = path.join(table.file_name());
            let Some((records, skipped)) = read_csv(&file)? else { continue };
            report.skipped_lines += skipped;
            report.rows.insert(table.file_name().to_string(), records.len() as u64);
            if table == Table::MoeExpertRouting {
                report.skipped_lines += self.push_moe(part, offset, &records, &moe_widths(path));
                continue;
            }
            for (seq, r) in records.into_iter().enumerate() {
                if let Some(t) = self.push(table, part, seq, offset, &r) {
                    self.last_ns = self.last_ns.max(t);
                } else {
                    report.skipped_lines += 1;
                }
            }
        }
        // The part's own step timeline: where each step began and ended in this process (the
        // engine core's step guard spans scheduling to the output's bookkeeping, a worker's its
        // forward pass and sampling). Its other figures are recomputed from the merged rows.
        let file = path.join(Table::StepTimeline.file_name());
        if let Some((records, skipped)) = read_csv(&file)? {
            report.skipped_lines += skipped;
            report.rows.insert(Table::StepTimeline.file_name().to_string(), records.len() as u64);
            for r in &records {
                let bounds = (|| {
                    let step: u64 = r.get("step")?.parse().ok()?;
                    let start = offset + parse_fixed_ns(r.get("start_sec")?, 1_000_000_000)?;
                    let wall = parse_fixed_ns(r.get("step_wall_ms")?, 1_000_000)?;
                    Some((step, start, start + wall))
                })();
                match bounds {
                    Some(b) => self.step_bounds.push(b),
                    None => report.skipped_lines += 1,
                }
            }
        }
        Ok(())
    }

    /// Adds one CSV record; `None` when a field does not parse.
    fn push(&mut self, table: Table, part: usize, seq: usize, offset: u64, r: &Record) -> Option<u64> {
        let t = offset + parse_fixed_ns(r.get("timestamp_sec")?, 1_000_000_000)?;
        let step = r.get("step").and_then(|v| v.parse::<u64>().ok());
        match table {
            Table::ForwardPass => {
                let phase = parse_phase(r.get("phase")?)?;
                let ns = parse_fixed_ns(r.get("forward_time_ms")?, 1_000_000)?;
                let row = (phase, r.get("batch_size")?.parse().ok()?, r.get("num_tokens")?.parse().ok()?, ns);
                self.forward.push(Keyed { t, part, seq, step, row });
                Some(t + ns)
            }
            Table::CpuOperations => {
                let ns = parse_fixed_ns(r.get("duration_ms")?, 1_000_000)?;
                let row = CpuRow {
                    name: r.get("operation")?.to_string(),
                    duration_ns: ns,
                    context: r.get("context")?.into(),
                };
                self.cpu.push(Keyed { t, part, seq, step, row });
                Some(t + ns)
            }
            Table::BatchUtilization => {
                let n = |k: &str| r.get(k).and_then(|v| v.parse::<u32>().ok());
                let row = BatchSample {
                    num_seqs: n("num_seqs")?,
                    max_num_seqs: n("max_num_seqs")?,
                    num_tokens: n("num_tokens")?,
                    max_tokens: n("max_tokens")?,
                    phase: parse_phase(r.get("phase")?)?,
                    running_queue_len: n("running_queue_len")?,
                    waiting_queue_len: n("waiting_queue_len")?,
                };
                self.batch.push(Keyed { t, part, seq, step, row });
                Some(t)
            }
            Table::PreemptionEvents => {
                let event = match r.get("event")? {
                    "started" => LifecycleEvent::Started,
                    "preempted" => LifecycleEvent::Preempted,
                    "resumed" => LifecycleEvent::Resumed,
                    "finished" => LifecycleEvent::Finished,
                    "evicted" => LifecycleEvent::Evicted,
                    _ => return None,
                };
                let row = LifecycleRow {
                    request_id: r.get("request_id")?.to_string(),
                    event,
                    reason: r.get("reason")?.to_string(),
                    extra_info: r.get("extra_info")?.to_string(),
                };
                self.lifecycle.push(Keyed { t, part, seq, step, row });
                Some(t)
            }
            Table::EncoderDecoder => {
                let component = match r.get("component")? {
                    "encoder" => Component::Encoder,
                    "decoder" => Component::Decoder,
                    "cross_attention" => Component::CrossAttention,
                    _ => return None,
                };
                let ns = parse_fixed_ns(r.get("duration_ms")?, 1_000_000)?;
                self.components.push(Keyed { t, part, seq, step, row: (component, ns, r.get("context")?.to_string()) });
                Some(t + ns)
            }
            Table::KvCacheUsage => {
                let n = |k: &str| r.get(k).and_then(|v| v.parse::<u64>().ok());
                let row = KvCacheSample {
                    used_blocks: u32::try_from(n("used_blocks")?).ok()?,
                    total_blocks: u32::try_from(n("total_blocks")?).ok()?,
                    prefix_cache_queries: n("prefix_cache_queries")?,
                    prefix_cache_hits: n("prefix_cache_hits")?,
                };
                self.kv_cache.push(Keyed { t, part, seq, step, row });
                Some(t)
            }
            Table::CudaGraphEvents => {
                let event = GraphEvent::ALL.into_iter().find(|e| e.as_str() == r.get("event").unwrap_or(""))?;
                let padded = match r.get("padded_batch_size")? {
                    "" => None,
                    v => Some(v.parse().ok()?),
                };
                let duration_ns = match r.get("duration_ms")? {
                    "" => None,
                    v => Some(parse_fixed_ns(v, 1_000_000)?),
                };
                let row = GraphRow {
                    event,
                    batch_size: r.get("batch_size")?.parse().ok()?,
                    padded_batch_size: padded,
                    duration_ns,
                };
                self.cuda_graph.push(Keyed { t, part, seq, step, row });
                Some(t + duration_ns.unwrap_or(0))
            }
            _ => None,
        }
    }

    /// Adds a part's MoE rows, one record per run of rows with the same time and layer, each
    /// with `widths[layer]` experts (or as many as its highest expert id needs). Returns the
    /// rows that did not parse.
    fn push_moe(&mut self, part: usize, offset: u64, records: &[Record], widths: &HashMap<u32, usize>) -> u64 {
        let mut skipped = 0;
        let mut current: Option<(String, Keyed<MoeRecord>)> = None;
        for (seq, r) in records.iter().enumerate() {
            let parsed = (|| {
                let stamp = r.get("timestamp_sec")?;
                let t = offset + parse_fixed_ns(stamp, 1_000_000_000)?;
                let layer: u32 = r.get("layer")?.parse().ok()?;
                let expert: usize = r.get("expert_id")?.parse().ok()?;
                let tokens: u32 = r.get("num_tokens")?.parse().ok()?;
                let step = r.get("step").and_then(|v| v.parse::<u64>().ok());
                (expert < profilemate::MAX_EXPERTS).then_some((stamp, t, layer, expert, tokens, step))
            })();
            let Some((stamp, t, layer, expert, tokens, step)) = parsed else {
                skipped += 1;
                continue;
            };
            let same = current.as_ref().is_some_and(|(s, k)| s == stamp && k.row.layer == layer);
            if !same {
                if let Some((_, k)) = current.take() {
                    self.moe.push(k);
                }
                let width = widths.get(&layer).copied().unwrap_or(0).min(profilemate::MAX_EXPERTS);
                let row = MoeRecord { layer, tokens_per_expert: vec![0; width] };
                current = Some((stamp.to_string(), Keyed { t, part, seq, step, row }));
                self.last_ns = self.last_ns.max(t);
            }
            if let Some((_, k)) = current.as_mut() {
                let v = &mut k.row.tokens_per_expert;
                if v.len() <= expert {
                    v.resize(expert + 1, 0);
                }
                v[expert] = v[expert].saturating_add(tokens);
            }
        }
        if let Some((_, k)) = current {
            self.moe.push(k);
        }
        skipped
    }

    /// Feeds every row, in time order, through fresh profilers.
    fn replay(
        mut self,
        parts: &[Part],
        config: &Config,
        declared: Option<ModelType>,
        end_ns: u64,
    ) -> (Rows, Vec<Option<u32>>, Summaries) {
        fn order<T>(v: &mut [Keyed<T>]) {
            v.sort_by_key(|k| (k.t, k.part, k.seq));
        }
        order(&mut self.forward);
        order(&mut self.cpu);
        order(&mut self.batch);
        order(&mut self.lifecycle);
        order(&mut self.components);
        order(&mut self.kv_cache);
        order(&mut self.cuda_graph);
        order(&mut self.moe);

        let mut rows = Rows::default();
        let mut summaries = Summaries::default();
        // The rows the step timeline joins: every part's but those of workers other than the
        // lowest rank (tensor-parallel ranks run the same step: their passes would count it
        // once per rank; their rows stay in their tables).
        let first_rank = parts.iter().filter_map(|p| p.report.rank).min();
        let feeds: Vec<bool> = parts.iter().map(|p| p.report.rank.is_none() || p.report.rank == first_rank).collect();
        let mut joined = Rows::default();

        let mut forward = ForwardPassProfiler::new();
        let mut ranks = Vec::with_capacity(self.forward.len());
        for k in &self.forward {
            let (phase, batch_size, num_tokens, duration_ns) = k.row;
            let ev = Event::ForwardPass { timestamp_ns: k.t, phase, batch_size, num_tokens, duration_ns };
            let before = rows.forward_pass.len();
            forward.observe(&ev, &mut rows);
            rows.forward_pass[before..].iter_mut().for_each(|r| r.step = k.step);
            if feeds[k.part] {
                joined.forward_pass.extend_from_slice(&rows.forward_pass[before..]);
            }
            ranks.push(parts[k.part].report.rank);
        }

        let mut cpu = CpuTimingProfiler::new();
        let mut ops: HashMap<String, (u16, Arc<str>)> = HashMap::new();
        for k in &self.cpu {
            let next = u16::try_from(ops.len()).unwrap_or(u16::MAX);
            let (id, name) = ops.entry(k.row.name.clone()).or_insert_with(|| (next, Arc::from(k.row.name.as_str())));
            let ev = Event::CpuOperation {
                timestamp_ns: k.t,
                operation: *id,
                name,
                duration_ns: k.row.duration_ns,
                context: &k.row.context,
            };
            let before = rows.cpu_operations.len();
            cpu.observe(&ev, &mut rows);
            rows.cpu_operations[before..].iter_mut().for_each(|r| r.step = k.step);
            if feeds[k.part] {
                joined.cpu_operations.extend_from_slice(&rows.cpu_operations[before..]);
            }
        }

        let mut batch = BatchUtilizationProfiler::new(config.underutilization_threshold_pct);
        for k in &self.batch {
            let before = rows.batch_utilization.len();
            batch.observe(&Event::Batch { timestamp_ns: k.t, sample: k.row }, &mut rows);
            rows.batch_utilization[before..].iter_mut().for_each(|r| r.step = k.step);
            if feeds[k.part] {
                joined.batch_utilization.extend_from_slice(&rows.batch_utilization[before..]);
            }
        }

        let mut preemption = PreemptionProfiler::new();
        for k in &self.lifecycle {
            let ev = Event::Lifecycle {
                timestamp_ns: k.t,
                request_id: &k.row.request_id,
                event: k.row.event,
                reason: &k.row.reason,
                extra_info: &k.row.extra_info,
            };
            let before = rows.preemption_events.len();
            preemption.observe(&ev, &mut rows);
            rows.preemption_events[before..].iter_mut().for_each(|r| r.step = k.step);
            if feeds[k.part] {
                joined.preemption_events.extend_from_slice(&rows.preemption_events[before..]);
            }
        }
        preemption.finish(end_ns, &mut rows);

        let mut components = EncoderDecoderProfiler::new();
        components.set_declared_model_type(declared);
        for k in &self.components {
            let (component, duration_ns, ref context) = k.row;
            let ev = Event::Component { timestamp_ns: k.t, component, duration_ns, context };
            let before = rows.encoder_decoder.len();
            components.observe(&ev, &mut rows);
            rows.encoder_decoder[before..].iter_mut().for_each(|r| r.step = k.step);
            if feeds[k.part] {
                joined.encoder_decoder.extend_from_slice(&rows.encoder_decoder[before..]);
            }
        }

        let mut kv_cache = KvCacheProfiler::new();
        for k in &self.kv_cache {
            let before = rows.kv_cache.len();
            kv_cache.observe(&Event::KvCache { timestamp_ns: k.t, sample: k.row }, &mut rows);
            rows.kv_cache[before..].iter_mut().for_each(|r| r.step = k.step);
            if feeds[k.part] {
                joined.kv_cache.extend_from_slice(&rows.kv_cache[before..]);
            }
        }

        let mut cuda_graph = CudaGraphProfiler::new();
        for k in &self.cuda_graph {
            let r = &k.row;
            let ev = Event::CudaGraph {
                timestamp_ns: k.t,
                event: r.event,
                batch_size: r.batch_size,
                padded_batch_size: r.padded_batch_size,
                duration_ns: r.duration_ns,
            };
            let before = rows.cuda_graph.len();
            cuda_graph.observe(&ev, &mut rows);
            rows.cuda_graph[before..].iter_mut().for_each(|r| r.step = k.step);
            if feeds[k.part] {
                joined.cuda_graph.extend_from_slice(&rows.cuda_graph[before..]);
            }
        }

        let mut moe = MoeExpertProfiler::new();
        for k in &self.moe {
            let ev = Event::MoeRouting {
                timestamp_ns: k.t,
                layer: k.row.layer,
                tokens_per_expert: &k.row.tokens_per_expert,
            };
            let before = rows.moe_routing.len();
            moe.observe(&ev, &mut rows);
            rows.moe_routing[before..].iter_mut().for_each(|r| r.step = k.step);
        }

        let profilers: [&dyn Profiler; 8] =
            [&forward, &cpu, &batch, &preemption, &components, &kv_cache, &cuda_graph, &moe];
        for p in profilers {
            if config.is_enabled(p.kind()) {
                p.summarize(&mut summaries);
            }
        }

        // The step timeline, joined across the parts by the rows' `step` (the engine core numbers
        // the steps and the workers record the same ids), by the core's own join. It is the
        // forward pass profiler's table, as in a session.
        if config.is_enabled(ProfilerKind::ForwardPass) {
            let mut timeline = StepTimelineBuilder::new(config.is_enabled(ProfilerKind::Preemption));
            timeline.add_rows(&joined);
            for k in &self.moe {
                if let (Some(step), true) = (k.step, feeds[k.part]) {
                    timeline.add_moe(step, k.t, &k.row.tokens_per_expert);
                }
            }
            for &(step, start, end) in &self.step_bounds {
                timeline.add_bounds(step, start, end);
            }
            let (steps, summary) = timeline.finish();
            rows.step_timeline = steps;
            summaries.step_timeline = Some(summary);
        }
        (rows, ranks, summaries)
    }
}

/// Experts per MoE layer, from a part's `moe_expert_summary.json` (empty without one).
fn moe_widths(part: &Path) -> HashMap<u32, usize> {
    let summary: Option<serde_json::Value> =
        std::fs::read(part.join("moe_expert_summary.json")).ok().and_then(|b| serde_json::from_slice(&b).ok());
    let mut out = HashMap::new();
    if let Some(layers) = summary.as_ref().and_then(|s| s.get("layers")).and_then(serde_json::Value::as_object) {
        for (layer, stats) in layers {
            let n = stats.get("tokens_per_expert").and_then(serde_json::Value::as_array).map_or(0, Vec::len);
            if let Ok(layer) = layer.parse() {
                out.insert(layer, n);
            }
        }
    }
    out
}

/// A CSV record by column name.
struct Record {
    fields: csv::StringRecord,
    columns: Arc<HashMap<String, usize>>,
}

impl Record {
    fn get(&self, column: &str) -> Option<&str> {
        self.columns.get(column).and_then(|&i| self.fields.get(i))
    }
}

/// The complete records of a CSV file and how many lines were skipped (a torn last line, or a
/// record that does not parse); `None` when the file does not exist.
fn read_csv(path: &Path) -> Result<Option<(Vec<Record>, u64)>, MergeError> {
    let mut bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(MergeError::Io(path.to_path_buf(), e)),
    };
    let mut skipped = 0;
    if !bytes.is_empty() && bytes.last() != Some(&b'\n') {
        // A process killed while writing leaves a torn last line.
        let keep = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        bytes.truncate(keep);
        skipped += 1;
    }
    let mut reader = csv::ReaderBuilder::new().has_headers(true).flexible(true).from_reader(bytes.as_slice());
    let columns: HashMap<String, usize> = match reader.headers() {
        Ok(h) => h.iter().enumerate().map(|(i, c)| (c.to_string(), i)).collect(),
        Err(_) => return Ok(Some((Vec::new(), skipped))),
    };
    let columns = Arc::new(columns);
    let mut out = Vec::new();
    for rec in reader.records() {
        match rec {
            Ok(fields) => out.push(Record { fields, columns: columns.clone() }),
            Err(_) => skipped += 1,
        }
    }
    Ok(Some((out, skipped)))
}

fn parse_phase(s: &str) -> Option<Phase> {
    Phase::ALL.into_iter().find(|p| p.as_str() == s)
}

/// Parses a fixed-point decimal (`12.345678`) exactly into units of `1 / scale` of its value's
/// unit: seconds with `scale = 10^9` give nanoseconds, milliseconds with `10^6` too.
fn parse_fixed_ns(s: &str, scale: u64) -> Option<u64> {
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    let int: u64 = if int.is_empty() { 0 } else { int.parse().ok()? };
    let digits = scale.ilog10() as usize;
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut frac_units = 0u64;
    for (i, b) in frac.bytes().enumerate().take(digits) {
        frac_units += u64::from(b - b'0') * 10u64.pow((digits - 1 - i) as u32);
    }
    int.checked_mul(scale)?.checked_add(frac_units)
}

fn write_outputs(
    dir: &Path,
    config: &Config,
    rows: &Rows,
    ranks: &[Option<u32>],
    summaries: &Summaries,
) -> Result<(), MergeError> {
    let w = |e: &dyn std::fmt::Display| MergeError::Write(e.to_string());
    let mut csv = CsvSink::create(dir, config).map_err(|e| w(&e))?;
    csv.write_rows(rows).map_err(|e| w(&e))?;
    csv.flush().map_err(|e| w(&e))?;
    drop(csv);
    if config.is_enabled(Table::ForwardPass.profiler()) {
        add_rank_column(&dir.join(Table::ForwardPass.file_name()), ranks)?;
    }
    let mut json = JsonSummarySink::new(dir);
    json.write_summaries(summaries).map_err(|e| w(&e))?;
    Ok(())
}

/// Appends `rank` to every forward row, as the contract allows columns at the end.
fn add_rank_column(path: &Path, ranks: &[Option<u32>]) -> Result<(), MergeError> {
    let io = |e: std::io::Error| MergeError::Io(path.to_path_buf(), e);
    let data = std::fs::read(path).map_err(io)?;
    let mut reader = csv::ReaderBuilder::new().has_headers(false).from_reader(data.as_slice());
    let mut writer = csv::WriterBuilder::new().terminator(csv::Terminator::Any(b'\n')).from_writer(Vec::new());
    for (i, rec) in reader.byte_records().enumerate() {
        let mut rec = rec.map_err(|e| MergeError::Write(e.to_string()))?;
        if i == 0 {
            rec.push_field(b"rank");
        } else {
            match ranks.get(i - 1).copied().flatten() {
                Some(r) => rec.push_field(r.to_string().as_bytes()),
                None => rec.push_field(b""),
            }
        }
        writer.write_byte_record(&rec).map_err(|e| MergeError::Write(e.to_string()))?;
    }
    let out = writer.into_inner().map_err(|e| MergeError::Write(e.to_string()))?;
    write_atomic(path, &out).map_err(io)
}

fn write_manifest(
    dir: &Path,
    parts: &[Part],
    config: &Config,
    rows: BTreeMap<String, u64>,
    all_rows: &Rows,
    end_ns: u64,
    report: &MergeReport,
) -> Result<(), MergeError> {
    let first = &parts[0].manifest;
    let mut dropped: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    let mut sink_errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut profilers: Vec<String> = Vec::new();
    for p in parts {
        for (profiler, reasons) in &p.manifest.dropped {
            let entry = dropped.entry(profiler.clone()).or_default();
            for (reason, n) in reasons {
                *entry.entry(reason.clone()).or_insert(0) += n;
            }
        }
        for (sink, n) in &p.manifest.sink_errors {
            *sink_errors.entry(sink.clone()).or_insert(0) += n;
        }
        for name in &p.manifest.profilers {
            if !profilers.contains(name) {
                profilers.push(name.clone());
            }
        }
    }
    let timing = parts
        .iter()
        .find(|p| p.report.rank.is_some())
        .map_or_else(|| first.timing_backend.clone(), |p| p.manifest.timing_backend.clone());
    let manifest = RunManifest {
        format_version: first.format_version,
        profilemate_version: first.profilemate_version.clone(),
        started_at: first.started_at.clone(),
        monotonic_start_ns: first.monotonic_start_ns,
        pid: first.pid,
        host: first.host.clone(),
        config: config.clone(),
        timing_backend: timing,
        profilers,
        sinks: config.sinks.iter().map(|s| s.as_str().to_string()).collect(),
        rows,
        dropped,
        sink_errors,
        steps: all_rows.forward_pass.len() as u64,
        elapsed_sec: end_ns as f64 / 1e9,
        finished: report.complete,
        bytes_written: Default::default(),
        bytes_per_step: Default::default(),
        output_budget: None,
    };
    let mut value = serde_json::to_value(&manifest).map_err(|e| MergeError::Write(e.to_string()))?;
    if let Some(obj) = value.as_object_mut() {
        obj.insert("run".into(), serde_json::Value::String(report.run.clone()));
        let parts = serde_json::to_value(&report.parts).map_err(|e| MergeError::Write(e.to_string()))?;
        obj.insert("merged_from".into(), parts);
        obj.insert("recovered".into(), recovered(&report.parts));
    }
    let bytes = serde_json::to_vec_pretty(&value).map_err(|e| MergeError::Write(e.to_string()))?;
    let path = dir.join(MANIFEST_FILE);
    write_atomic(&path, &bytes).map_err(|e| MergeError::Io(path, e))
}

// -- The merged Perfetto trace and Parquet tables (when the run's sinks include them) ----------

/// Writes `profilemate_trace.json` (sink `perfetto`) and the `<table>.parquet` files (sink
/// `parquet`) of the merged run into `dir`, through the same sinks a single session writes
/// them with.
///
/// - **Trace**: all processes on one timeline (the run's time base), one track group per part
///   named after its process (`vLLM worker pid 4321 rank 0`), whose pid is the process's.
///   Each part's rows are replayed on their own (its CSV files are read a second time), so a
///   part's events are exactly its rows in the merged tables. Rows come from whole CSV lines
///   only, so a part cut by a kill still gives a trace of whole events.
/// - **Parquet**: the merged tables, row for row the merged CSV files; the `rank` column is the
///   worker rank for forward rows (as the CSV's `rank` column) and null in the other tables,
///   `host` is the host the run's first part recorded.
fn write_trace_and_tables(
    dir: &Path,
    parts: &[Part],
    config: &Config,
    declared: Option<ModelType>,
    end_ns: u64,
    rows: &Rows,
    ranks: &[Option<u32>],
) -> Result<(), MergeError> {
    let w = |e: &dyn std::fmt::Display| MergeError::Write(e.to_string());
    // The sinks read nothing from the manifest they are finished with.
    let finish_with = &parts[0].manifest;
    if config.sinks.contains(&SinkKind::Perfetto) {
        let mut trace = None;
        for (i, p) in parts.iter().enumerate() {
            let mut timeline = Timeline::default();
            let mut report = p.report.clone();
            timeline.read_part(i, &p.path, p.report.offset_ns, &mut report)?;
            let (part_rows, _, _) = timeline.replay(parts, config, declared, end_ns);
            let name = process_name(&p.report);
            let sink = match trace.as_mut() {
                None => trace.insert(PerfettoSink::create_for_process(dir, p.report.pid, &name).map_err(|e| w(&e))?),
                Some(sink) => {
                    sink.begin_process(p.report.pid, &name).map_err(|e| w(&e))?;
                    sink
                }
            };
            sink.write_rows(&part_rows).map_err(|e| w(&e))?;
        }
        if let Some(mut sink) = trace {
            sink.finish(finish_with).map_err(|e| w(&e))?;
        }
    }
    if config.sinks.contains(&SinkKind::Parquet) {
        let host = parts[0].manifest.host.as_str();
        let mut sink = ParquetSink::create(dir, config).map_err(|e| w(&e))?.with_host(host).with_rank(None);
        let mut rest = rows.clone();
        rest.forward_pass.clear();
        sink.write_rows(&rest).map_err(|e| w(&e))?;
        // Forward rows in runs of one rank, each written with that rank.
        let mut at = 0;
        while at < rows.forward_pass.len() {
            let rank = ranks.get(at).copied().flatten();
            let len = ranks[at..].iter().take_while(|r| **r == rank).count().max(1);
            let end = (at + len).min(rows.forward_pass.len());
            let run = Rows { forward_pass: rows.forward_pass[at..end].to_vec(), ..Rows::default() };
            sink = sink.with_rank(rank.map(i64::from));
            sink.write_rows(&run).map_err(|e| w(&e))?;
            at = end;
        }
        sink.finish(finish_with).map_err(|e| w(&e))?;
    }
    Ok(())
}

/// The manifest's `recovered`: what the merge took from the parts of processes that were not shut
/// down cleanly (killed: vLLM's force kill, the OOM killer), from the files they had flushed:
/// `{"parts": [dir, ...], "rows": {file: rows, ...}, "skipped_lines": n, "events_recovered": n,
/// "events_lost_in_flight": n, "recovery_errors": {dir: error}}` (torn or malformed lines left
/// out; records replayed from the killed processes' thread buffers; records being written at the
/// kill). Each part's own figures are in `merged_from`.
fn recovered(parts: &[PartReport]) -> serde_json::Value {
    let killed: Vec<&PartReport> = parts.iter().filter(|p| !p.finished).collect();
    let mut rows: BTreeMap<&str, u64> = BTreeMap::new();
    for p in &killed {
        for (file, n) in &p.rows {
            *rows.entry(file.as_str()).or_insert(0) += n;
        }
    }
    serde_json::json!({
        "parts": killed.iter().map(|p| p.dir.as_str()).collect::<Vec<_>>(),
        "rows": rows,
        "skipped_lines": killed.iter().map(|p| p.skipped_lines).sum::<u64>(),
        "events_recovered": killed.iter().map(|p| p.events_recovered).sum::<u64>(),
        "events_lost_in_flight": killed.iter().map(|p| p.events_lost_in_flight).sum::<u64>(),
        "recovery_errors": killed
            .iter()
            .filter_map(|p| p.recovery_error.as_ref().map(|e| (p.dir.clone(), e.clone())))
            .collect::<BTreeMap<_, _>>(),
    })
}

/// The name of a part's process in the merged trace: `vLLM <role> pid <pid>[ rank <rank>]`.
fn process_name(part: &PartReport) -> String {
    match part.rank {
        Some(rank) => format!("vLLM {} pid {} rank {rank}", part.role, part.pid),
        None => format!("vLLM {} pid {}", part.role, part.pid),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use profilemate::{CpuOp, Phase};

    #[test]
    fn fixed_point_parses_exactly() {
        assert_eq!(parse_fixed_ns("1.234567", 1_000_000_000), Some(1_234_567_000));
        assert_eq!(parse_fixed_ns("0.000001", 1_000_000_000), Some(1_000));
        assert_eq!(parse_fixed_ns("12.345678", 1_000_000), Some(12_345_678));
        assert_eq!(parse_fixed_ns("3", 1_000_000), Some(3_000_000));
        assert_eq!(parse_fixed_ns("1.5e3", 1_000_000), None);
        assert_eq!(parse_fixed_ns("", 1_000_000), Some(0));
    }

    fn write_part(run: &Path, name: &str, rank: Option<u32>, f: impl FnOnce(&profilemate::Session)) -> RunManifest {
        write_part_with(run, name, rank, &[], f)
    }

    /// A part whose session has the `off` profilers disabled (as the binding opens a process
    /// that has nothing for a tracker).
    fn write_part_with(
        run: &Path,
        name: &str,
        rank: Option<u32>,
        off: &[ProfilerKind],
        f: impl FnOnce(&profilemate::Session),
    ) -> RunManifest {
        let dir = run.join(name);
        // Per-step MoE rows, as the binding's parts have them.
        let mut builder = profilemate::builder().dir(&dir).moe_window_steps(0);
        for kind in off {
            builder = builder.disable(*kind);
        }
        let session = builder.build().unwrap();
        f(&session);
        let manifest = session.shutdown().unwrap();
        let info = serde_json::json!({"role": name, "rank": rank, "pid": 1});
        std::fs::write(dir.join(PART_FILE), info.to_string()).unwrap();
        manifest
    }

    #[test]
    fn parts_merge_onto_one_time_base_with_ranks() {
        let out = tempfile::tempdir().unwrap();
        let run = out.path().join(PARTS_DIR).join("20250101T000000Z-1");
        write_part(&run, "engine-1", None, |s| {
            let r = s.requests();
            r.started("a,\"1\"");
            s.batch_utilization().record(&BatchSample {
                num_seqs: 1,
                max_num_seqs: 4,
                num_tokens: 5,
                max_tokens: 64,
                phase: Phase::Prefill,
                running_queue_len: 1,
                waiting_queue_len: 0,
            });
            r.preempted("a,\"1\"", "RECOMPUTE", "num_computed_tokens=5");
            r.resumed("a,\"1\"");
            r.finished("a,\"1\"", "status=FINISHED_STOPPED");
            r.started("b");
            s.cpu_timing().record_ms(CpuOp::SCHEDULING, 0.25, "");
        });
        write_part(&run, "worker-2", Some(0), |s| {
            s.forward_pass().record_ms(Phase::Prefill, 1, 5, 2.5);
            s.forward_pass().record_ms(Phase::Decode, 1, 1, 1.0);
            s.components().record_ms(Component::Decoder, "language_model", 1.0);
        });
        // A torn line, as a killed process leaves.
        let fwd = run.join("worker-2").join("forward_pass_timing.csv");
        let mut text = std::fs::read_to_string(&fwd).unwrap();
        text.push_str("9.0,dec");
        std::fs::write(&fwd, text).unwrap();

        let report = merge(out.path(), None).unwrap();
        assert_eq!(report.parts.len(), 2);
        assert!(report.complete);
        assert_eq!(report.rows["forward_pass_timing.csv"], 2);
        assert_eq!(report.rows["request_lifecycle.csv"], 2);
        assert_eq!(report.parts.iter().map(|p| p.skipped_lines).sum::<u64>(), 1);

        let mut r = csv::Reader::from_path(out.path().join("forward_pass_timing.csv")).unwrap();
        let header: Vec<String> = r.headers().unwrap().iter().map(String::from).collect();
        assert_eq!(header.last().map(String::as_str), Some("rank"));
        let rows: Vec<csv::StringRecord> = r.records().map(Result::unwrap).collect();
        assert_eq!(rows.len(), 2);
        assert!(rows.iter().all(|row| &row[row.len() - 1] == "0"));

        let mut r = csv::Reader::from_path(out.path().join("request_lifecycle.csv")).unwrap();
        let rows: Vec<csv::StringRecord> = r.records().map(Result::unwrap).collect();
        let a = rows.iter().find(|row| &row[0] == "a,\"1\"").unwrap();
        assert_eq!(&a[7], "1");
        let b = rows.iter().find(|row| &row[0] == "b").unwrap();
        assert_eq!(&b[4], "", "b never finished");

        let summary: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.path().join("preemption_summary.json")).unwrap()).unwrap();
        assert_eq!(summary["total_preemptions"], 1);
        assert_eq!(summary["total_requests"], 2);
        let fwd: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.path().join("forward_pass_summary.json")).unwrap()).unwrap();
        assert_eq!(fwd["prefill"]["count"], 1);
        assert_eq!(fwd["decode"]["total_ms"], 1.0);
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.path().join(MANIFEST_FILE)).unwrap()).unwrap();
        assert_eq!(manifest["steps"], 2);
        assert_eq!(manifest["merged_from"].as_array().unwrap().len(), 2);
        assert_eq!(
            manifest["recovered"],
            serde_json::json!({
                "parts": [],
                "rows": {},
                "skipped_lines": 0,
                "events_recovered": 0,
                "events_lost_in_flight": 0,
                "recovery_errors": {}
            })
        );
    }

    fn json(path: &Path) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }

    fn rows(path: &Path) -> Vec<csv::StringRecord> {
        csv::Reader::from_path(path).unwrap().records().map(Result::unwrap).collect()
    }

    fn sec(s: &str) -> u64 {
        parse_fixed_ns(s, 1_000_000_000).unwrap()
    }

    #[test]
    fn cuda_graph_and_moe_tables_merge_with_the_summaries_recomputed() {
        use std::time::Duration;
        let out = tempfile::tempdir().unwrap();
        let run = out.path().join(PARTS_DIR).join("20250101T000000Z-1");
        // The scheduler's process has nothing for either tracker: they are off in its part.
        write_part_with(&run, "engine-1", None, &ON_DEMAND, |s| {
            s.cpu_timing().record_ms(CpuOp::SCHEDULING, 0.25, "");
        });
        std::thread::sleep(Duration::from_millis(5));
        let worker = write_part(&run, "worker-2", Some(0), |s| {
            let g = s.cuda_graphs();
            g.capture(8, Duration::from_millis(30));
            g.capture(4, Duration::from_millis(20));
            g.replay(3, 4);
            g.replay(7, 8);
            g.eager(100);
            let m = s.moe_experts();
            // Expert 3 of layer 0 and experts 2..4 of layer 1 never receive a token.
            m.record_layer(0, &[5, 0, 3, 0]);
            m.record_layer(1, &[0, 8, 0, 0]);
            std::thread::sleep(Duration::from_millis(2));
            m.record_layer(0, &[1, 1, 0, 0]);
            m.record_layer(1, &[2, 0, 0, 0]);
        });
        assert!(!run.join("engine-1").join("cuda_graph_events.csv").exists());

        let report = merge(out.path(), None).unwrap();
        assert_eq!(report.rows["cuda_graph_events.csv"], 5);
        assert_eq!(report.rows["moe_expert_routing.csv"], 6);
        let offset = report.parts.iter().find(|p| p.role == "worker-2").unwrap().offset_ns;
        assert!(offset >= 5_000_000, "the worker started after the engine: {offset}");

        // Rows: the part's rows, rebased onto the run's start.
        for table in ["cuda_graph_events.csv", "moe_expert_routing.csv"] {
            let part = rows(&run.join("worker-2").join(table));
            let merged = rows(&out.path().join(table));
            assert_eq!(part.len(), merged.len(), "{table}");
            for (p, m) in part.iter().zip(&merged) {
                let dt = sec(&m[0]) - sec(&p[0]);
                assert!(dt.abs_diff(offset) < 1_000, "{table}: {dt} vs {offset}");
                assert_eq!(p.iter().skip(1).collect::<Vec<_>>(), m.iter().skip(1).collect::<Vec<_>>(), "{table}");
            }
        }
        // Summaries: recomputed by the core's profilers, equal to the single session's.
        for summary in ["cuda_graph_summary.json", "moe_expert_summary.json"] {
            assert_eq!(json(&out.path().join(summary)), json(&run.join("worker-2").join(summary)), "{summary}");
        }
        let moe = json(&out.path().join("moe_expert_summary.json"));
        assert_eq!(moe["layers"]["0"]["tokens_per_expert"], serde_json::json!([6, 1, 3, 0]));
        assert_eq!(moe["layers"]["1"]["tokens_per_expert"], serde_json::json!([2, 8, 0, 0]));
        assert_eq!(moe["records"], 4);
        let graphs = json(&out.path().join("cuda_graph_summary.json"));
        assert_eq!((graphs["captures"].as_u64(), graphs["replays"].as_u64()), (Some(2), Some(2)));
        assert_eq!(graphs["capture_time_ms"], 50.0);
        let manifest = json(&out.path().join(MANIFEST_FILE));
        assert!(manifest["profilers"].as_array().unwrap().iter().any(|p| p == "moe_expert"));
        assert_eq!(manifest["rows"]["moe_expert_routing.csv"], 6);
        assert!(worker.finished);
    }

    #[test]
    fn moe_records_of_two_workers_interleave_in_time() {
        let out = tempfile::tempdir().unwrap();
        let run = out.path().join(PARTS_DIR).join("20250101T000000Z-1");
        let (a, b) = (run.join("worker-1"), run.join("worker-2"));
        let sa = profilemate::builder().dir(&a).moe_window_steps(0).build().unwrap();
        let sb = profilemate::builder().dir(&b).moe_window_steps(0).build().unwrap();
        for step in 0..3u32 {
            sa.moe_experts().record_layer(0, &[step + 1, 0, 0, 1]);
            std::thread::sleep(std::time::Duration::from_millis(2));
            sb.moe_experts().record_layer(0, &[0, step + 1, 0, 0]);
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        sa.shutdown().unwrap();
        sb.shutdown().unwrap();
        // A killed worker leaves no summary: the width comes from the highest expert id seen.
        std::fs::remove_file(b.join("moe_expert_summary.json")).unwrap();

        let report = merge(out.path(), None).unwrap();
        assert_eq!(report.rows["moe_expert_routing.csv"], 9);
        let merged = rows(&out.path().join("moe_expert_routing.csv"));
        let times: Vec<u64> = merged.iter().map(|r| sec(&r[0])).collect();
        assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
        let experts: Vec<&str> = merged.iter().map(|r| &r[2]).collect();
        assert_eq!(experts, ["0", "3", "1", "0", "3", "1", "0", "3", "1"]);
        let moe = json(&out.path().join("moe_expert_summary.json"));
        assert_eq!(moe["layers"]["0"]["tokens_per_expert"], serde_json::json!([6, 6, 0, 3]));
        assert_eq!(moe["records"], 6);
    }

    #[test]
    fn trackers_off_in_every_part_stay_off() {
        let out = tempfile::tempdir().unwrap();
        let run = out.path().join(PARTS_DIR).join("20250101T000000Z-1");
        write_part_with(&run, "main-1", None, &ON_DEMAND, |s| {
            s.forward_pass().record_ms(Phase::Decode, 1, 1, 1.0);
        });
        let report = merge(out.path(), None).unwrap();
        assert!(!report.rows.contains_key("cuda_graph_events.csv"));
        assert!(!report.rows.contains_key("moe_expert_routing.csv"));
        for name in
            ["cuda_graph_events.csv", "cuda_graph_summary.json", "moe_expert_routing.csv", "moe_expert_summary.json"]
        {
            assert!(!out.path().join(name).exists(), "{name}");
        }
    }

    /// Gives a part's manifest another process id (the parts of one test share the test's).
    fn set_pid(part: &Path, pid: u32) {
        let path = part.join(MANIFEST_FILE);
        let mut manifest = json(&path);
        manifest["pid"] = pid.into();
        std::fs::write(&path, serde_json::to_vec(&manifest).unwrap()).unwrap();
    }

    fn parquet_rows(path: &Path) -> Vec<parquet::record::Row> {
        use parquet::file::reader::{FileReader, SerializedFileReader};
        let reader = SerializedFileReader::new(std::fs::File::open(path).unwrap()).unwrap();
        reader.get_row_iter(None).unwrap().map(Result::unwrap).collect()
    }

    #[test]
    fn the_merge_writes_one_trace_of_all_processes_and_the_parquet_tables() {
        let out = tempfile::tempdir().unwrap();
        let run = out.path().join(PARTS_DIR).join("20250101T000000Z-1");
        let sinks = [SinkKind::Csv, SinkKind::Json, SinkKind::Parquet, SinkKind::Perfetto];
        let part = |name: &str, rank: Option<u32>, pid: u32, f: &dyn Fn(&profilemate::Session)| {
            let dir = run.join(name);
            let session = profilemate::builder().dir(&dir).sinks(&sinks).build().unwrap();
            f(&session);
            session.shutdown().unwrap();
            let info = serde_json::json!({"role": name.split('-').next(), "rank": rank, "pid": pid});
            std::fs::write(dir.join(PART_FILE), info.to_string()).unwrap();
            set_pid(&dir, pid);
        };
        part("engine-101", None, 101, &|s| {
            let r = s.requests();
            r.started("a");
            r.preempted("a", "RECOMPUTE", "");
            r.resumed("a");
            r.finished("a", "");
            s.cpu_timing().record_ms(CpuOp::SCHEDULING, 0.25, "");
        });
        for (pid, rank) in [(102, 0), (103, 1)] {
            part(&format!("worker-{pid}"), Some(rank), pid, &|s| {
                s.forward_pass().record_ms(Phase::Prefill, 1, 5, 2.5);
                s.forward_pass().record_ms(Phase::Decode, 1, 1, 1.0);
                s.forward_pass().record_ms(Phase::Decode, 1, 1, 1.0);
            });
        }
        // Worker 103 was killed in the middle of a line: its part ends with a torn row, and its
        // manifest is the one of a session that never shut down.
        let fwd = run.join("worker-103").join("forward_pass_timing.csv");
        let mut text = std::fs::read_to_string(&fwd).unwrap();
        text.push_str("9.0,dec");
        std::fs::write(&fwd, text).unwrap();
        let manifest_path = run.join("worker-103").join(MANIFEST_FILE);
        let mut m = json(&manifest_path);
        m["finished"] = false.into();
        std::fs::write(&manifest_path, serde_json::to_vec(&m).unwrap()).unwrap();

        let report = merge(out.path(), None).unwrap();
        assert_eq!(report.rows["forward_pass_timing.csv"], 6);
        assert!(!report.complete);
        let recovered = &json(&out.path().join(MANIFEST_FILE))["recovered"];
        assert_eq!(recovered["parts"], serde_json::json!([format!("parts/20250101T000000Z-1/worker-103")]));
        assert_eq!(recovered["rows"]["forward_pass_timing.csv"], 3);
        assert_eq!(recovered["skipped_lines"], 1);

        // The trace: valid JSON, one named track group per process, one slice per forward row.
        let trace = json(&out.path().join("profilemate_trace.json"));
        let events = trace.as_array().unwrap();
        let names: BTreeMap<u64, &str> = events
            .iter()
            .filter(|e| e["name"] == "process_name")
            .map(|e| (e["pid"].as_u64().unwrap(), e["args"]["name"].as_str().unwrap()))
            .collect();
        assert_eq!(
            names.into_iter().collect::<Vec<_>>(),
            [(101, "vLLM engine pid 101"), (102, "vLLM worker pid 102 rank 0"), (103, "vLLM worker pid 103 rank 1")]
        );
        let slices = |pid: u64, cat: &str| {
            events.iter().filter(|e| e["ph"] == "X" && e["pid"] == pid && e["cat"] == cat).count()
        };
        assert_eq!((slices(102, "forward_pass"), slices(103, "forward_pass")), (3, 3));
        assert_eq!(slices(101, "forward_pass"), 0);
        assert_eq!(slices(101, "cpu_operation"), 1);
        let instants: Vec<_> =
            events.iter().filter(|e| e["ph"] == "i").map(|e| (e["pid"].clone(), e["name"].clone())).collect();
        assert_eq!(instants, [(101.into(), "preempted".into()), (101.into(), "resumed".into())]);
        // Every forward slice sits at its merged row's time.
        let merged = rows(&out.path().join("forward_pass_timing.csv"));
        let mut starts: Vec<u64> = events
            .iter()
            .filter(|e| e["ph"] == "X" && e["cat"] == "forward_pass")
            .map(|e| (e["ts"].as_f64().unwrap() * 1000.0).round() as u64)
            .collect();
        starts.sort_unstable();
        let mut expected: Vec<u64> = merged.iter().map(|r| sec(&r[0])).collect();
        expected.sort_unstable();
        assert_eq!(starts.len(), expected.len());
        // The CSV's seconds have 6 decimals, the trace's microseconds 3.
        assert!(starts.iter().zip(&expected).all(|(a, b)| a.abs_diff(*b) <= 1_000), "{starts:?} vs {expected:?}");

        // The Parquet tables: row for row the merged CSV files, forward rows with their rank.
        for table in Table::ALL {
            let csv = out.path().join(table.file_name());
            let parquet = out.path().join(table.file_name().replace(".csv", ".parquet"));
            if !csv.exists() {
                assert!(!parquet.exists(), "{}", parquet.display());
                continue;
            }
            assert_eq!(parquet_rows(&parquet).len(), rows(&csv).len(), "{table:?}");
        }
        use parquet::record::RowAccessor;
        let fwd = parquet_rows(&out.path().join("forward_pass_timing.parquet"));
        let rank_col = fwd[0].len() - 1;
        let parquet_ranks: Vec<i64> = fwd.iter().map(|r| r.get_long(rank_col).unwrap()).collect();
        let csv_ranks: Vec<i64> = merged.iter().map(|r| r[r.len() - 1].parse().unwrap()).collect();
        assert_eq!(parquet_ranks, csv_ranks);
        assert!(!std::fs::read_dir(out.path())
            .unwrap()
            .flatten()
            .any(|e| e.path().to_string_lossy().ends_with(".partial")));
    }

    /// The engine core numbers the steps and the worker opens the same ids: the merged step
    /// timeline joins both processes' rows by step, with the engine core's step bounds.
    #[test]
    fn step_timeline_joins_the_engine_core_and_worker_rows_by_step() {
        use std::time::Duration;
        let out = tempfile::tempdir().unwrap();
        let run = out.path().join(PARTS_DIR).join("20250101T000000Z-1");
        let (e_dir, w_dir, w1_dir) = (run.join("engine-1"), run.join("worker-2"), run.join("worker-3"));
        let engine = profilemate::builder().dir(&e_dir).moe_window_steps(0).build().unwrap();
        let worker = profilemate::builder().dir(&w_dir).moe_window_steps(0).build().unwrap();
        // A second tensor-parallel rank runs the same steps: its rows stay in their tables but
        // do not count each step twice in the timeline.
        let worker1 = profilemate::builder().dir(&w1_dir).moe_window_steps(0).build().unwrap();
        let pause = || std::thread::sleep(Duration::from_millis(2));
        let sample = |phase| BatchSample {
            num_seqs: 2,
            max_num_seqs: 4,
            num_tokens: 2,
            max_tokens: 64,
            phase,
            running_queue_len: 2,
            waiting_queue_len: 1,
        };
        // A request added between steps: its row has no step.
        engine.requests().started("r0");
        for (step, phase) in [(1, Phase::Prefill), (2, Phase::Decode), (3, Phase::Decode)] {
            pause();
            let (es, ws) = (engine.steps(), worker.steps());
            assert!(es.open(step));
            if step == 2 {
                engine.requests().preempted("r0", "RECOMPUTE", "");
            }
            engine.cpu_timing().record_ms(CpuOp::SCHEDULING, 0.25, "");
            engine.batch_utilization().record(&sample(phase));
            pause(); // the worker receives the scheduler's output
            assert!(ws.open(step));
            worker.forward_pass().record_ms(phase, 2, 2, 1.5 * step as f64);
            worker.cpu_timing().record_ms(CpuOp::SAMPLING, 0.125, "");
            ws.close();
            let ws1 = worker1.steps();
            assert!(ws1.open(step));
            worker1.forward_pass().record_ms(phase, 2, 2, 1.0);
            worker1.cpu_timing().record_ms(CpuOp::SAMPLING, 0.5, "");
            ws1.close();
            pause();
            es.close();
        }
        engine.shutdown().unwrap();
        worker.shutdown().unwrap();
        worker1.shutdown().unwrap();
        for (dir, role, rank) in [(&e_dir, "engine", None), (&w_dir, "worker", Some(0)), (&w1_dir, "worker", Some(1))] {
            let info = serde_json::json!({"role": role, "rank": rank, "pid": 1});
            std::fs::write(dir.join(PART_FILE), info.to_string()).unwrap();
        }

        let report = merge(out.path(), None).unwrap();
        assert_eq!(report.rows["step_timeline.csv"], 3);
        assert_eq!(report.rows["forward_pass_timing.csv"], 6, "both ranks' rows are in the table");
        let mut reader = csv::Reader::from_path(out.path().join("step_timeline.csv")).unwrap();
        let header: Vec<String> = reader.headers().unwrap().iter().map(String::from).collect();
        assert_eq!(header, profilemate::STEP_TIMELINE_COLUMNS);
        let col = |name: &str| header.iter().position(|c| c == name).unwrap();
        let steps: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
        assert_eq!(steps.iter().map(|r| r[col("step")].to_string()).collect::<Vec<_>>(), ["1", "2", "3"]);
        // The merged engine-core part's own timeline: its bounds, rebased onto the run's start.
        let engine_steps = rows(&e_dir.join("step_timeline.csv"));
        let offset = report.parts.iter().find(|p| p.role == "engine").unwrap().offset_ns;
        for (i, r) in steps.iter().enumerate() {
            // Rank 0's pass and sampling only.
            let step = i as f64 + 1.0;
            assert_eq!(&r[col("phase")], if i == 0 { "prefill" } else { "decode" });
            assert_eq!(r[col("forward_time_ms")].parse::<f64>().unwrap(), 1.5 * step);
            assert_eq!(&r[col("forward_passes")], "1");
            assert_eq!(r[col("scheduling_ms")].parse::<f64>().unwrap(), 0.25);
            assert_eq!(r[col("sampling_ms")].parse::<f64>().unwrap(), 0.125);
            assert_eq!(r[col("running_queue_len")].parse::<u32>().unwrap(), 2);
            assert_eq!(&r[col("preemptions")], if i == 1 { "1" } else { "0" });
            // The engine core's step encloses the worker's: its start, and a wall time at least
            // its own (the part's rows end no later than its close).
            let e = &engine_steps[i];
            // (Each part's time base is its manifest's `monotonic_start_ns`, read within
            // microseconds of its session's own clock origin.)
            assert!(sec(&r[col("start_sec")]).abs_diff(sec(&e[1]) + offset) <= 5_000);
            let wall = parse_fixed_ns(&r[col("step_wall_ms")], 1_000_000).unwrap();
            let e_wall = parse_fixed_ns(&e[engine_header_wall(&e_dir)], 1_000_000).unwrap();
            assert!(wall >= e_wall && wall >= 2_000_000, "{wall} vs {e_wall}");
            if i > 0 {
                assert!(r[col("host_gap_before_ms")].parse::<f64>().unwrap() > 0.0);
            }
        }
        // The row outside any step stays out; the step column of the merged tables is kept.
        let lifecycle = rows(&out.path().join("preemption_events.csv"));
        assert_eq!(lifecycle.iter().map(|r| r[r.len() - 1].to_string()).collect::<Vec<_>>(), ["", "2"]);
        let summary = json(&out.path().join("step_timeline_summary.json"));
        assert_eq!((summary["steps"].as_u64(), summary["decode"]["count"].as_u64()), (Some(3), Some(2)));
        assert_eq!(summary["decode"]["total_forward_ms"], 7.5);
        assert_eq!(summary["decode"]["preemptions"], 1);
        assert_eq!(json(&out.path().join(MANIFEST_FILE))["rows"]["step_timeline.csv"], 3);
    }

    fn engine_header_wall(part: &Path) -> usize {
        let mut r = csv::Reader::from_path(part.join("step_timeline.csv")).unwrap();
        r.headers().unwrap().iter().position(|c| c == "step_wall_ms").unwrap()
    }

    #[test]
    fn nothing_to_merge_is_an_error() {
        let out = tempfile::tempdir().unwrap();
        assert!(matches!(merge(out.path(), None), Err(MergeError::NoParts(_))));
    }
}
