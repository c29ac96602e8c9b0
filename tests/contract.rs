//! The output contract (`CONTRACT.md`), checked end to end.
//!
//! A scripted workload drives all five profilers from several threads through the public facade
//! (`profilemate::builder()`), into a temporary directory. After `shutdown()` every file is read
//! back with the `csv` crate and `serde_json`, as pandas users would read it, and checked against
//! the contract: headers, column types, empty fields, text round-trips, row counts, summary keys
//! and values (recomputed from the CSV rows), and the run manifest.

use profilemate::{
    BatchSample, Component, CpuOp, LifecycleEvent, ModelType, Phase, ProfilerKind, Rows, RunManifest, Sink, SinkError,
    Summaries,
};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// The contract, written out here rather than taken from the library, so that the library cannot
// drift from it unnoticed.

const FORWARD_CSV: &str = "forward_pass_timing.csv";
const CPU_CSV: &str = "cpu_operations_timing.csv";
const BATCH_CSV: &str = "batch_utilization.csv";
const EVENTS_CSV: &str = "preemption_events.csv";
const LIFECYCLE_CSV: &str = "request_lifecycle.csv";
const COMPONENTS_CSV: &str = "encoder_decoder_timing.csv";

/// Each CSV file: its contract columns, then the columns this version adds at the end (the
/// contract allows additions only there).
const CSV_FILES: [(&str, &[&str], &[&str]); 6] = [
    (
        FORWARD_CSV,
        &["timestamp_sec", "phase", "batch_size", "num_tokens", "forward_time_ms", "throughput_tokens_per_sec"],
        &["step"],
    ),
    (CPU_CSV, &["timestamp_sec", "operation", "duration_ms", "context"], &["step"]),
    (
        BATCH_CSV,
        &[
            "timestamp_sec",
            "num_seqs",
            "max_num_seqs",
            "seq_utilization_pct",
            "num_tokens",
            "max_tokens",
            "token_utilization_pct",
            "phase",
            "running_queue_len",
            "waiting_queue_len",
        ],
        &["step"],
    ),
    (EVENTS_CSV, &["timestamp_sec", "request_id", "event", "reason", "running_time_sec", "extra_info"], &["step"]),
    (
        LIFECYCLE_CSV,
        &[
            "request_id",
            "started_sec",
            "preempted_sec",
            "resumed_sec",
            "finished_sec",
            "total_time_sec",
            "preemption_delay_sec",
            "num_preemptions",
        ],
        &["outcome"],
    ),
    (COMPONENTS_CSV, &["timestamp_sec", "component", "duration_ms", "context"], &["step"]),
];

const SUMMARY_FILES: [&str; 5] = [
    "forward_pass_summary.json",
    "cpu_timing_summary.json",
    "batch_utilization_summary.json",
    "preemption_summary.json",
    "encoder_decoder_summary.json",
];
const MANIFEST: &str = "profilemate_run.json";

const PHASES: [&str; 3] = ["prefill", "decode", "mixed"];
const EVENTS: [&str; 5] = ["started", "preempted", "resumed", "finished", "evicted"];
const COMPONENTS: [&str; 3] = ["encoder", "decoder", "cross_attention"];
const PROFILERS: [&str; 5] = ["forward_pass", "cpu_timing", "batch_utilization", "preemption", "encoder_decoder"];
const DROP_REASONS: [&str; 6] =
    ["buffer_full", "invalid_value", "text_too_long", "session_closed", "timing", "sink_error"];

const PHASE_KEYS: [&str; 11] = [
    "count",
    "mean_ms",
    "std_ms",
    "min_ms",
    "max_ms",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "total_ms",
    "total_tokens",
    "mean_throughput_tokens_per_sec",
];
const OPERATION_KEYS: [&str; 9] =
    ["count", "mean_ms", "std_ms", "min_ms", "max_ms", "p50_ms", "p95_ms", "p99_ms", "total_ms"];
const BATCH_KEYS: [&str; 13] = [
    "total_samples",
    "mean_seq_utilization_pct",
    "mean_token_utilization_pct",
    "underutilization_events",
    "underutilization_threshold_pct",
    "prefill_avg_utilization",
    "decode_avg_utilization",
    "mixed_avg_utilization",
    "max_num_seqs",
    "max_tokens",
    "mean_running_queue_len",
    "mean_waiting_queue_len",
    "max_waiting_queue_len",
];
const PREEMPTION_KEYS: [&str; 8] = [
    "total_preemptions",
    "total_requests",
    "requests_preempted",
    "preemption_rate_pct",
    "preemption_reasons",
    "mean_running_time_before_preempt",
    "mean_resume_delay",
    "max_resume_delay",
];
const ENCODER_DECODER_KEYS: [&str; 7] =
    ["model_type", "encoder", "decoder", "cross_attention", "encoder_pct", "decoder_pct", "cross_attention_pct"];
const COMPONENT_KEYS: [&str; 8] = ["count", "total_ms", "mean_ms", "std_ms", "min_ms", "max_ms", "p50_ms", "p95_ms"];
/// Keys whose values are counts: JSON integers.
const INTEGER_KEYS: [&str; 10] = [
    "count",
    "total_tokens",
    "total_samples",
    "underutilization_events",
    "max_num_seqs",
    "max_tokens",
    "max_waiting_queue_len",
    "total_preemptions",
    "total_requests",
    "requests_preempted",
];
const MANIFEST_KEYS: [&str; 10] = [
    "format_version",
    "profilemate_version",
    "started_at",
    "pid",
    "host",
    "config",
    "profilers",
    "rows",
    "dropped",
    "finished",
];

// ---------------------------------------------------------------------------------------------
// The scripted workload

/// One step of a request's life.
#[derive(Debug, Clone, Copy)]
enum Step {
    Start,
    /// `record(Started)` with a reason, which the contract leaves empty on `started` rows.
    StartWithReason(&'static str),
    Preempt(&'static str, &'static str),
    Resume,
    /// `record(Resumed)` with a reason, which must not reach the file.
    ResumeWithReason(&'static str),
    Finish(&'static str),
    Evict(&'static str, &'static str),
}

impl Step {
    /// The `(event, reason, extra_info)` this step must leave in `preemption_events.csv`.
    fn expected_row(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Step::Start => ("started", "", ""),
            Step::StartWithReason(_) => ("started", "", "source=api"),
            Step::Preempt(reason, extra) => ("preempted", reason, extra),
            Step::Resume | Step::ResumeWithReason(_) => ("resumed", "", ""),
            Step::Finish(extra) => ("finished", "", extra),
            Step::Evict(reason, extra) => ("evicted", reason, extra),
        }
    }
}

#[derive(Debug, Clone)]
struct Script {
    id: String,
    steps: Vec<Step>,
}

impl Script {
    fn new(id: impl Into<String>, steps: &[Step]) -> Script {
        Script { id: id.into(), steps: steps.to_vec() }
    }

    fn outcome(&self) -> &'static str {
        match self.steps.last() {
            Some(Step::Finish(_)) => "finished",
            Some(Step::Evict(..)) => "evicted",
            _ => "in_flight",
        }
    }

    fn preemptions(&self) -> u64 {
        self.steps.iter().filter(|s| matches!(s, Step::Preempt(..))).count() as u64
    }

    fn run(&self, requests: &profilemate::Requests) {
        for step in &self.steps {
            match *step {
                Step::Start => requests.started(&self.id),
                Step::StartWithReason(r) => requests.record(&self.id, LifecycleEvent::Started, r, "source=api"),
                Step::Preempt(reason, extra) => {
                    requests.preempted(&self.id, reason, extra);
                    // A preemption lasts a while before the request runs again.
                    std::thread::sleep(Duration::from_millis(1));
                }
                Step::Resume => requests.resumed(&self.id),
                Step::ResumeWithReason(r) => requests.record(&self.id, LifecycleEvent::Resumed, r, ""),
                Step::Finish(extra) => requests.finished(&self.id, extra),
                Step::Evict(reason, extra) => requests.evicted(&self.id, reason, extra),
            }
        }
    }
}

/// A request id that does not fit in one record slot (continuation slots carry the rest).
fn long_id() -> String {
    format!("long-{}-é🚀-{}", "x".repeat(200), "y".repeat(60))
}

/// Two groups of requests, each run by its own thread (a request's events come from one thread,
/// as an engine's scheduler records them).
fn request_scripts() -> [Vec<Script>; 2] {
    use Step::*;
    let mut first = vec![
        Script::new("req-plain-0001", &[Start, Finish("status=FINISHED_STOPPED")]),
        Script::new("req, with \"quotes\", commas\nand a newline", &[Start, Finish("")]),
        Script::new(
            "请求-ünïcødé-🚀-Ω",
            &[
                Start,
                Preempt("RECOMPUTE", "num_blocks=128;num_computed_tokens=812"),
                Resume,
                Finish("status=FINISHED_LENGTH_CAPPED"),
            ],
        ),
        Script::new(
            "req-twice",
            &[
                Start,
                Preempt("SWAP", "num_blocks=64"),
                Resume,
                Preempt("kv_cache_full", "note=\"full\", again;nl=a\nb"),
                ResumeWithReason("MUST_NOT_APPEAR"),
                Finish(""),
            ],
        ),
        Script::new(long_id(), &[Start, Preempt("RECOMPUTE", ""), Resume, Finish("")]),
    ];
    first.extend((0..20).map(|i| Script::new(format!("bulk-{i:03}"), &[Start, Finish("status=FINISHED_STOPPED")])));
    let second = vec![
        Script::new("req-evicted", &[Start, Evict("aborted", "by=client")]),
        Script::new("req-preempted-then-evicted", &[Start, Preempt("RECOMPUTE", ""), Evict("kv_cache_full", "")]),
        Script::new("req-in-flight", &[Start]),
        Script::new("req-in-flight-preempted\r\ncrlf", &[Start, Preempt("SWAP", ""), Resume]),
        Script::new("req-in-flight-still-preempted", &[Start, Preempt("RECOMPUTE", "")]),
        Script::new("  leading and trailing spaces  ", &[StartWithReason("MUST_NOT_APPEAR"), Finish("")]),
        Script::new(
            "tab\there;semi=colon,\"",
            &[Start, Preempt("engine_specific_word", "k=v"), Resume, Finish("status=FINISHED_ABORTED")],
        ),
        Script::new("\"", &[Start, Preempt("SWAP", ""), Resume, Preempt("SWAP", ""), Resume, Finish("")]),
    ];
    [first, second]
}

/// CPU contexts of the engine's own `detokenize` operation: free text must round-trip.
fn detokenize_contexts() -> Vec<String> {
    vec![
        "request_count=3".into(),
        String::new(),
        "note=a,b;quote=\"q\";nl=line1\nline2".into(),
        "lang=日本語;emoji=🚀;ü=ö".into(),
        format!("long={}", "z".repeat(300)),
    ]
}

/// Component calls: (component, context).
fn component_script() -> Vec<(Component, &'static str)> {
    let mut v = Vec::new();
    for _ in 0..6 {
        v.push((Component::Encoder, "vision_encoder"));
    }
    for _ in 0..3 {
        v.push((Component::Encoder, "audio_encoder"));
    }
    for layer in 0..12 {
        v.push((Component::Decoder, "language_model"));
        v.push((
            Component::CrossAttention,
            if layer % 2 == 0 { "cross_attn;layer=even" } else { "cross_attn;layer=odd" },
        ));
    }
    v.push((Component::Decoder, "decoder \"block\", 7\nü"));
    v
}

/// What the workload recorded, for comparison with the files.
#[derive(Debug, Default)]
struct Recorded {
    forward_by_phase: BTreeMap<&'static str, u64>,
    cpu_by_op: BTreeMap<String, u64>,
    /// Contexts of `detokenize` rows (sorted).
    detokenize_contexts: Vec<String>,
    batches: u64,
    last_limits: (u32, u32),
    /// Components: (component, context), sorted.
    components: Vec<(&'static str, String)>,
}

fn phase_name(p: Phase) -> &'static str {
    p.as_str()
}

/// Runs the workload on five threads and returns what it recorded.
fn run_workload(session: &profilemate::Session) -> Recorded {
    let detokenize = session.register_cpu_operation("detokenize").expect("register detokenize");
    // Registered but never recorded: it must not appear in cpu_timing_summary.json.
    session.register_cpu_operation("never_recorded").expect("register never_recorded");
    session.declare_model_type(ModelType::EncoderDecoder);

    let [scripts_a, scripts_b] = request_scripts();
    let recorded = Mutex::new(Recorded::default());
    std::thread::scope(|scope| {
        // The engine loop: forward passes, the four built-in CPU phases, one batch per step.
        let (forward, cpu, batches) = (session.forward_pass(), session.cpu_timing(), session.batch_utilization());
        let recorded_ref = &recorded;
        scope.spawn(move || {
            let mut r = Recorded::default();
            let plan = [(Phase::Prefill, 12u32), (Phase::Decode, 30), (Phase::Mixed, 10)];
            let mut step = 0u32;
            for (phase, steps) in plan {
                for _ in 0..steps {
                    step += 1;
                    let scheduling = cpu.start(CpuOp::SCHEDULING);
                    let (num_seqs, num_tokens) = match phase {
                        Phase::Prefill => (4, 2048 + step),
                        Phase::Decode => (32, 32),
                        Phase::Mixed => (24, 6000),
                    };
                    let sample = BatchSample {
                        num_seqs,
                        max_num_seqs: 256,
                        num_tokens,
                        max_tokens: 8192,
                        phase,
                        running_queue_len: num_seqs,
                        waiting_queue_len: step % 7,
                    };
                    batches.record(&sample);
                    r.batches += 1;
                    r.last_limits = (256, 8192);
                    scheduling.stop();
                    let context = format!("phase={phase};batch_size={num_seqs}");
                    cpu.time_with(CpuOp::BATCH_PREPARATION, &context, || std::hint::black_box(step));
                    // Mixed steps are corrected late, as engines that learn the mix late do.
                    let start_phase = if phase == Phase::Mixed { Phase::Decode } else { phase };
                    let mut pass = forward.start(start_phase, num_seqs, num_tokens);
                    {
                        let _execution = cpu.start_with(CpuOp::MODEL_EXECUTION, "graph=cuda;pad=0");
                        std::hint::black_box((0..200u64).sum::<u64>());
                    }
                    pass.set_batch(phase, num_seqs, num_tokens);
                    pass.stop();
                    cpu.time(CpuOp::SAMPLING, || std::hint::black_box(step));
                    *r.forward_by_phase.entry(phase_name(phase)).or_default() += 1;
                    for op in ["scheduling", "batch_preparation", "model_execution", "sampling"] {
                        *r.cpu_by_op.entry(op.into()).or_default() += 1;
                    }
                }
            }
            // Passes timed elsewhere, with known times; two of them took no time at all.
            forward.record(Phase::Prefill, 101, 512, Duration::from_micros(4500));
            forward.record(Phase::Decode, 102, 8, Duration::ZERO);
            forward.record_ms(Phase::Mixed, 103, 64, 0.0);
            forward.record_ms(Phase::Mixed, 104, 640, 2.25);
            for p in [Phase::Prefill, Phase::Decode, Phase::Mixed, Phase::Mixed] {
                *r.forward_by_phase.entry(phase_name(p)).or_default() += 1;
            }
            // A cancelled pass leaves nothing.
            forward.start(Phase::Prefill, 1, 1).cancel();
            // Limits of zero (percentages empty), and batches over their limits (clamped to 100).
            for (num_seqs, max_num_seqs, num_tokens, max_tokens) in
                [(3, 0, 100, 0), (3, 16, 100, 0), (300, 256, 9000, 8192), (16, 256, 5000, 8192)]
            {
                batches.record(&BatchSample {
                    num_seqs,
                    max_num_seqs,
                    num_tokens,
                    max_tokens,
                    phase: Phase::Mixed,
                    running_queue_len: 16,
                    waiting_queue_len: 40,
                });
                r.batches += 1;
                r.last_limits = (max_num_seqs, max_tokens);
            }
            let mut all = recorded_ref.lock().expect("lock");
            all.batches += r.batches;
            all.last_limits = r.last_limits;
            for (k, v) in r.forward_by_phase {
                *all.forward_by_phase.entry(k).or_default() += v;
            }
            for (k, v) in r.cpu_by_op {
                *all.cpu_by_op.entry(k).or_default() += v;
            }
        });

        // A second engine thread (say, a draft model) with passes of known length.
        let forward = session.forward_pass();
        scope.spawn(move || {
            for i in 0..8u64 {
                forward.record(Phase::Decode, 7, 7, Duration::from_micros(1500 + 10 * i));
            }
            *recorded_ref.lock().expect("lock").forward_by_phase.entry("decode").or_default() += 8;
        });

        // The engine's own CPU operation, with contexts.
        let cpu = session.cpu_timing();
        scope.spawn(move || {
            let mut contexts = Vec::new();
            for context in detokenize_contexts() {
                cpu.record(detokenize, Duration::from_micros(40), &context);
                cpu.record_ms(detokenize, 0.125, &context);
                cpu.time_with(detokenize, &context, || std::hint::black_box(1));
                contexts.extend(std::iter::repeat_n(context, 3));
            }
            let mut all = recorded_ref.lock().expect("lock");
            *all.cpu_by_op.entry("detokenize".into()).or_default() += contexts.len() as u64;
            all.detokenize_contexts.extend(contexts);
        });

        // Two scheduler threads, each with its own requests.
        for scripts in [scripts_a.clone(), scripts_b.clone()] {
            let requests = session.requests();
            scope.spawn(move || {
                for script in &scripts {
                    script.run(&requests);
                }
            });
        }

        // An encoder-decoder model.
        let components = session.components();
        scope.spawn(move || {
            let mut seen = Vec::new();
            for (i, (component, context)) in component_script().into_iter().enumerate() {
                if i % 3 == 0 {
                    components.record(component, context, Duration::from_micros(700 + i as u64));
                } else if i % 3 == 1 {
                    components.record_ms(component, context, 0.5 + i as f64 / 8.0);
                } else {
                    let guard = components.start(component, context);
                    std::hint::black_box((0..100u64).sum::<u64>());
                    guard.stop();
                }
                seen.push((component.as_str(), context.to_string()));
            }
            recorded_ref.lock().expect("lock").components.extend(seen);
        });
    });
    let mut recorded = recorded.into_inner().expect("lock");
    recorded.detokenize_contexts.sort();
    recorded.components.sort();
    recorded
}

// ---------------------------------------------------------------------------------------------
// Reading the files back

/// A CSV file as a reader sees it: its header and its rows as column -> field.
struct CsvFile {
    header: Vec<String>,
    rows: Vec<BTreeMap<String, String>>,
}

fn read_csv(dir: &Path, file: &str) -> CsvFile {
    let raw = std::fs::read(dir.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
    // `\n` line ends, and a complete last line.
    assert!(raw.ends_with(b"\n"), "{file}: the last line is not complete");
    let first_line = raw.split(|b| *b == b'\n').next().expect("a header line");
    assert!(!first_line.ends_with(b"\r"), "{file}: lines must end with \\n, not \\r\\n");
    let mut reader = csv::ReaderBuilder::new().has_headers(true).from_reader(raw.as_slice());
    let header: Vec<String> =
        reader.headers().unwrap_or_else(|e| panic!("{file}: header: {e}")).iter().map(str::to_string).collect();
    let mut rows = Vec::new();
    for (i, record) in reader.records().enumerate() {
        let record = record.unwrap_or_else(|e| panic!("{file}: row {i}: {e}"));
        assert_eq!(record.len(), header.len(), "{file}: row {i} has {} fields", record.len());
        rows.push(header.iter().cloned().zip(record.iter().map(str::to_string)).collect());
    }
    CsvFile { header, rows }
}

/// A plain decimal number (no `NaN`, `inf`, exponent or sign tricks), finite.
fn float(s: &str, what: &str) -> f64 {
    assert!(
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit() || b == b'.' || b == b'-'),
        "{what}: `{s}` is not a plain decimal number"
    );
    let v: f64 = s.parse().unwrap_or_else(|e| panic!("{what}: `{s}`: {e}"));
    assert!(v.is_finite(), "{what}: `{s}` is not finite");
    v
}

/// A float with at least `decimals` digits after the point (the contract's resolution).
fn float_res(s: &str, decimals: usize, what: &str) -> f64 {
    let v = float(s, what);
    let after = s.split_once('.').map_or(0, |(_, frac)| frac.len());
    assert!(after >= decimals, "{what}: `{s}` has {after} decimals, the contract asks for at least {decimals}");
    v
}

/// Seconds: at least microsecond resolution, never negative.
fn sec(s: &str, what: &str) -> f64 {
    let v = float_res(s, 6, what);
    assert!(v >= 0.0, "{what}: negative time {s}");
    v
}

/// Milliseconds: at least microsecond resolution (3 decimals), never negative.
fn ms(s: &str, what: &str) -> f64 {
    let v = float_res(s, 3, what);
    assert!(v >= 0.0, "{what}: negative duration {s}");
    v
}

fn int(s: &str, what: &str) -> u64 {
    assert!(!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()), "{what}: `{s}` is not a whole number");
    s.parse().unwrap_or_else(|e| panic!("{what}: `{s}`: {e}"))
}

fn read_json(dir: &Path, file: &str) -> Value {
    let text = std::fs::read_to_string(dir.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
    for bad in ["NaN", "Infinity"] {
        assert!(!text.contains(bad), "{file} contains {bad}");
    }
    let value: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{file} is not valid JSON: {e}"));
    assert_no_null(&value, file);
    value
}

fn assert_no_null(v: &Value, at: &str) {
    match v {
        Value::Null => panic!("{at} is null"),
        Value::Number(n) => assert!(n.as_f64().is_some_and(f64::is_finite), "{at} = {n} is not finite"),
        Value::Array(a) => a.iter().enumerate().for_each(|(i, v)| assert_no_null(v, &format!("{at}[{i}]"))),
        Value::Object(o) => o.iter().for_each(|(k, v)| assert_no_null(v, &format!("{at}.{k}"))),
        Value::Bool(_) | Value::String(_) => {}
    }
}

/// `v[path[0]][path[1]]...`, as the seed's Python does; panics naming the missing key.
fn at<'a>(v: &'a Value, path: &[&str]) -> &'a Value {
    let mut cur = v;
    for (i, key) in path.iter().enumerate() {
        cur = cur.get(key).unwrap_or_else(|| panic!("missing key {:?}", &path[..=i]));
    }
    cur
}

fn num(v: &Value, path: &[&str]) -> f64 {
    at(v, path).as_f64().unwrap_or_else(|| panic!("{path:?} is not a number"))
}

fn count(v: &Value, path: &[&str]) -> u64 {
    at(v, path).as_u64().unwrap_or_else(|| panic!("{path:?} is not a whole number"))
}

/// Checks that `obj` holds every key of `keys`, each a number (counts as integers).
fn assert_numeric_keys(obj: &Value, keys: &[&str], what: &str) {
    let map = obj.as_object().unwrap_or_else(|| panic!("{what} is not an object"));
    for key in keys {
        let v = map.get(*key).unwrap_or_else(|| panic!("{what} lacks `{key}`"));
        if INTEGER_KEYS.contains(key) {
            assert!(v.as_u64().is_some(), "{what}.{key} = {v} is not a whole number");
        } else {
            assert!(v.as_f64().is_some(), "{what}.{key} = {v} is not a number");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Exact statistics of a column, as pandas computes them

struct Column {
    values: Vec<f64>,
}

impl Column {
    fn count(&self) -> u64 {
        self.values.len() as u64
    }
    fn sum(&self) -> f64 {
        self.values.iter().sum()
    }
    fn mean(&self) -> f64 {
        if self.values.is_empty() {
            0.0
        } else {
            self.sum() / self.values.len() as f64
        }
    }
    fn std(&self) -> f64 {
        if self.values.is_empty() {
            return 0.0;
        }
        let m = self.mean();
        (self.values.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / self.values.len() as f64).sqrt()
    }
    fn min(&self) -> f64 {
        self.values.iter().copied().fold(f64::INFINITY, f64::min)
    }
    fn max(&self) -> f64 {
        self.values.iter().copied().fold(f64::NEG_INFINITY, f64::max)
    }
    /// Nearest-rank percentile `sorted[ceil(p/100 * n) - 1]`.
    fn percentile(&self, p: u64) -> f64 {
        let mut sorted = self.values.clone();
        sorted.sort_by(f64::total_cmp);
        let rank = (p * sorted.len() as u64).div_ceil(100).max(1);
        sorted[(rank - 1) as usize]
    }
}

fn column<'a>(rows: impl IntoIterator<Item = &'a BTreeMap<String, String>>, name: &str) -> Column {
    Column { values: rows.into_iter().map(|r| float(&r[name], name)).collect() }
}

fn close(got: f64, want: f64, tol: f64, what: &str) {
    assert!((got - want).abs() <= tol * want.abs().max(1.0), "{what}: {got} != {want} (tolerance {tol})");
}

/// Checks the duration statistics of a summary group against the CSV column they summarize.
fn check_group(group: &Value, col: &Column, percentiles: &[u64], what: &str) {
    assert_eq!(count(group, &["count"]), col.count(), "{what}.count");
    if col.count() == 0 {
        for key in ["mean_ms", "std_ms", "min_ms", "max_ms", "total_ms"] {
            assert_eq!(num(group, &[key]), 0.0, "{what}.{key} of an empty group");
        }
        return;
    }
    // The CSV holds whole nanoseconds (6 decimals of ms), so these agree to float precision.
    close(num(group, &["total_ms"]), col.sum(), 1e-9, &format!("{what}.total_ms"));
    close(num(group, &["mean_ms"]), col.mean(), 1e-9, &format!("{what}.mean_ms"));
    close(num(group, &["std_ms"]), col.std(), 1e-9, &format!("{what}.std_ms"));
    close(num(group, &["min_ms"]), col.min(), 1e-12, &format!("{what}.min_ms"));
    close(num(group, &["max_ms"]), col.max(), 1e-12, &format!("{what}.max_ms"));
    for &p in percentiles {
        let got = num(group, &[format!("p{p}_ms").as_str()]);
        let want = col.percentile(p);
        assert!(
            (got - want).abs() <= 1e-3 * want + 1e-9,
            "{what}.p{p}_ms = {got}, exact nearest-rank {want}: more than 0.1 % apart"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The test

#[test]
fn every_file_follows_the_contract() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("run");
    let wall_before = time::OffsetDateTime::now_utc();
    // The five profilers' contract; the trackers' files are checked in tests/trackers.rs.
    let session = profilemate::builder()
        .dir(&dir)
        .log_interval(10)
        .disable(ProfilerKind::KvCache)
        .disable(ProfilerKind::CudaGraph)
        .disable(ProfilerKind::MoeExpert)
        .build()
        .expect("session builds");
    let wall_after = time::OffsetDateTime::now_utc();
    assert_eq!(session.dir(), Some(dir.as_path()));
    let recorded = run_workload(&session);
    let returned = session.shutdown().expect("clean shutdown");

    // The directory holds the contract files and nothing else (no temporary files left over).
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut expected: Vec<String> =
        CSV_FILES.iter().map(|f| f.0).chain(SUMMARY_FILES).chain([MANIFEST]).map(String::from).collect();
    expected.extend(["step_timeline.csv".to_string(), "step_timeline_summary.json".to_string()]);
    expected.sort();
    assert_eq!(names, expected);

    // Headers: exact, in order.
    let csv: BTreeMap<&str, CsvFile> = CSV_FILES
        .iter()
        .map(|(file, columns, added)| {
            let table = read_csv(&dir, file);
            let want: Vec<&str> = columns.iter().chain(added.iter()).copied().collect();
            assert_eq!(table.header, want, "{file}: header");
            (*file, table)
        })
        .collect();

    let [scripts_a, scripts_b] = request_scripts();
    let scripts: Vec<Script> = scripts_a.into_iter().chain(scripts_b).collect();

    check_forward_pass(&dir, &csv[FORWARD_CSV], &recorded);
    check_cpu(&dir, &csv[CPU_CSV], &recorded);
    check_batches(&dir, &csv[BATCH_CSV], &recorded);
    check_requests(&dir, &csv[EVENTS_CSV], &csv[LIFECYCLE_CSV], &scripts);
    check_components(&dir, &csv[COMPONENTS_CSV], &recorded);

    // Exact row counts: what was recorded, what the files hold, and what the manifest says.
    let expected_rows: BTreeMap<&str, u64> = [
        (FORWARD_CSV, recorded.forward_by_phase.values().sum::<u64>()),
        (CPU_CSV, recorded.cpu_by_op.values().sum()),
        (BATCH_CSV, recorded.batches),
        (EVENTS_CSV, scripts.iter().map(|s| s.steps.len() as u64).sum()),
        (LIFECYCLE_CSV, scripts.len() as u64),
        (COMPONENTS_CSV, recorded.components.len() as u64),
    ]
    .into();
    for (file, table) in &csv {
        assert_eq!(table.rows.len() as u64, expected_rows[file], "{file}: rows");
    }

    let manifest = read_json(&dir, MANIFEST);
    check_manifest(&manifest, &dir, &expected_rows, (wall_before, wall_after));
    // What shutdown() returned is what the file says.
    let from_disk: RunManifest = serde_json::from_value(manifest).expect("manifest deserializes");
    assert_eq!(from_disk, returned);
}

fn check_forward_pass(dir: &Path, table: &CsvFile, recorded: &Recorded) {
    let mut by_phase: BTreeMap<&str, Vec<&BTreeMap<String, String>>> = BTreeMap::new();
    for row in &table.rows {
        sec(&row["timestamp_sec"], "forward timestamp_sec");
        let phase = row["phase"].as_str();
        let phase: &'static str = PHASES.iter().find(|p| **p == phase).unwrap_or_else(|| panic!("phase `{phase}`"));
        int(&row["batch_size"], "batch_size");
        let tokens = int(&row["num_tokens"], "num_tokens") as f64;
        let time = ms(&row["forward_time_ms"], "forward_time_ms");
        let throughput = &row["throughput_tokens_per_sec"];
        if time == 0.0 {
            assert_eq!(throughput, "", "throughput must be empty when the time is 0");
        } else {
            let got = float(throughput, "throughput_tokens_per_sec");
            let want = tokens / time * 1000.0;
            assert!((got - want).abs() <= 1e-3 + 1e-9 * want, "throughput {got} != {want}");
        }
        by_phase.entry(phase).or_default().push(row);
    }
    for phase in PHASES {
        assert_eq!(
            by_phase.get(phase).map_or(0, Vec::len) as u64,
            recorded.forward_by_phase.get(phase).copied().unwrap_or(0),
            "forward rows of phase {phase}"
        );
    }
    // Passes of known length are written exactly, whole nanoseconds in 6 decimals of ms.
    let known = |batch: &str| -> (String, String, String) {
        let row = table.rows.iter().find(|r| r["batch_size"] == batch).unwrap_or_else(|| panic!("batch {batch}"));
        (row["phase"].clone(), row["forward_time_ms"].clone(), row["throughput_tokens_per_sec"].clone())
    };
    assert_eq!(known("101"), ("prefill".into(), "4.500000".into(), "113777.778".into()));
    assert_eq!(known("102"), ("decode".into(), "0.000000".into(), String::new()));
    assert_eq!(known("103"), ("mixed".into(), "0.000000".into(), String::new()));
    assert_eq!(known("104"), ("mixed".into(), "2.250000".into(), "284444.444".into()));
    let mut draft: Vec<&str> =
        table.rows.iter().filter(|r| r["batch_size"] == "7").map(|r| r["forward_time_ms"].as_str()).collect();
    draft.sort_unstable();
    let want: Vec<String> = (0..8).map(|i| format!("{:.6}", 1.5 + 0.01 * f64::from(i))).collect();
    assert_eq!(draft, want);

    // forward_pass_summary.json: all three phases, every key, equal to the rows.
    let summary = read_json(dir, "forward_pass_summary.json");
    for phase in PHASES {
        let group = at(&summary, &[phase]);
        assert_numeric_keys(group, &PHASE_KEYS, phase);
        let rows = by_phase.get(phase).cloned().unwrap_or_default();
        check_group(group, &column(rows.iter().copied(), "forward_time_ms"), &[50, 95, 99], phase);
        let tokens: u64 = rows.iter().map(|r| int(&r["num_tokens"], "num_tokens")).sum();
        assert_eq!(count(group, &["total_tokens"]), tokens, "{phase}.total_tokens");
        let throughput = Column {
            values: rows
                .iter()
                .filter(|r| !r["throughput_tokens_per_sec"].is_empty())
                .map(|r| float(&r["throughput_tokens_per_sec"], "throughput"))
                .collect(),
        };
        // pandas' `.mean()` skips the empty (NaN) ones; the CSV rounds to 3 decimals.
        let got = num(group, &["mean_throughput_tokens_per_sec"]);
        assert!((got - throughput.mean()).abs() <= 1e-3 + 1e-9 * got, "{phase} mean throughput {got}");
    }
    // The seed's analysis: fp_summary['prefill']['p95_ms'], and count * mean_ms sums.
    assert!(num(&summary, &["prefill", "p95_ms"]) > 0.0);
    assert!(num(&summary, &["decode", "p95_ms"]) >= num(&summary, &["decode", "p50_ms"]));
    let total_gpu = num(&summary, &["prefill", "count"]) * num(&summary, &["prefill", "mean_ms"])
        + num(&summary, &["decode", "count"]) * num(&summary, &["decode", "mean_ms"]);
    let want =
        column(table.rows.iter().filter(|r| r["phase"] == "prefill" || r["phase"] == "decode"), "forward_time_ms")
            .sum();
    close(total_gpu, want, 1e-9, "prefill+decode count * mean_ms");
}

fn check_cpu(dir: &Path, table: &CsvFile, recorded: &Recorded) {
    let mut by_op: BTreeMap<String, Vec<&BTreeMap<String, String>>> = BTreeMap::new();
    for row in &table.rows {
        sec(&row["timestamp_sec"], "cpu timestamp_sec");
        ms(&row["duration_ms"], "cpu duration_ms");
        by_op.entry(row["operation"].clone()).or_default().push(row);
    }
    let counts: BTreeMap<String, u64> = by_op.iter().map(|(k, v)| (k.clone(), v.len() as u64)).collect();
    assert_eq!(counts, recorded.cpu_by_op, "cpu rows per operation");
    // Contexts round-trip byte for byte.
    let mut contexts: Vec<String> = by_op["detokenize"].iter().map(|r| r["context"].clone()).collect();
    contexts.sort();
    assert_eq!(contexts, recorded.detokenize_contexts);
    let mut known: Vec<&str> = by_op["detokenize"].iter().map(|r| r["duration_ms"].as_str()).collect();
    known.retain(|d| *d == "0.040000" || *d == "0.125000");
    assert_eq!(known.len(), 2 * detokenize_contexts().len(), "detokenize rows of known length");
    assert!(by_op["scheduling"].iter().all(|r| r["context"].is_empty()));
    assert!(by_op["model_execution"].iter().all(|r| r["context"] == "graph=cuda;pad=0"));
    assert!(by_op["batch_preparation"].iter().all(|r| r["context"].starts_with("phase=")));

    // cpu_timing_summary.json is closed: exactly the operations seen.
    let summary = read_json(dir, "cpu_timing_summary.json");
    let keys: BTreeSet<&str> = summary.as_object().expect("object").keys().map(String::as_str).collect();
    let seen: BTreeSet<&str> = by_op.keys().map(String::as_str).collect();
    assert_eq!(keys, seen, "cpu_timing_summary.json top level");
    assert!(!keys.contains("never_recorded"));
    for (op, rows) in &by_op {
        let group = at(&summary, &[op]);
        assert_numeric_keys(group, &OPERATION_KEYS, op);
        check_group(group, &column(rows.iter().copied(), "duration_ms"), &[50, 95, 99], op);
    }
    // The seed: total_cpu = sum(op['count'] * op['mean_ms'] for op in cpu_summary.values()).
    let total_cpu: f64 =
        summary.as_object().expect("object").values().map(|op| num(op, &["count"]) * num(op, &["mean_ms"])).sum();
    close(total_cpu, column(&table.rows, "duration_ms").sum(), 1e-9, "sum of count * mean_ms");
}

fn check_batches(dir: &Path, table: &CsvFile, recorded: &Recorded) {
    assert_eq!(table.rows.len() as u64, recorded.batches);
    let mut token_pcts: Vec<(String, f64)> = Vec::new();
    let (mut seq_pcts, mut under_exact) = (Vec::new(), 0u64);
    let mut zero_limit_rows = 0;
    let mut over_limit_rows = 0;
    for row in &table.rows {
        sec(&row["timestamp_sec"], "batch timestamp_sec");
        let phase = row["phase"].clone();
        assert!(PHASES.contains(&phase.as_str()), "phase `{phase}`");
        int(&row["running_queue_len"], "running_queue_len");
        int(&row["waiting_queue_len"], "waiting_queue_len");
        for (num_col, max_col, pct_col) in
            [("num_seqs", "max_num_seqs", "seq_utilization_pct"), ("num_tokens", "max_tokens", "token_utilization_pct")]
        {
            let n = int(&row[num_col], num_col);
            let max = int(&row[max_col], max_col);
            let pct = &row[pct_col];
            if max == 0 {
                assert_eq!(pct, "", "{pct_col} must be empty when {max_col} is 0");
                zero_limit_rows += 1;
                continue;
            }
            let v = float(pct, pct_col);
            assert!((0.0..=100.0).contains(&v), "{pct_col} = {v} is not 0 to 100");
            let want = (n as f64 / max as f64 * 100.0).min(100.0);
            assert!((v - want).abs() <= 1e-4, "{pct_col} {v} != {want}");
            if n > max {
                assert_eq!(v, 100.0, "a batch over its limit is at 100 %");
                over_limit_rows += 1;
            }
            if pct_col == "token_utilization_pct" {
                token_pcts.push((phase.clone(), v));
                if (n as f64) * 100.0 < 50.0 * max as f64 {
                    under_exact += 1;
                }
            } else {
                seq_pcts.push(v);
            }
        }
    }
    assert_eq!((zero_limit_rows, over_limit_rows), (3, 2), "the workload's zero-limit and over-limit batches");
    let last = table.rows.last().expect("a batch row");
    let last_limits =
        (int(&last["max_num_seqs"], "max_num_seqs") as u32, int(&last["max_tokens"], "max_tokens") as u32);
    assert_eq!(last_limits, recorded.last_limits);

    let summary = read_json(dir, "batch_utilization_summary.json");
    assert_numeric_keys(&summary, &BATCH_KEYS, "batch_utilization_summary.json");
    assert_eq!(count(&summary, &["total_samples"]), recorded.batches);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    // The CSV rounds percentages to 4 decimals.
    close(num(&summary, &["mean_seq_utilization_pct"]), mean(&seq_pcts), 1e-4, "mean_seq_utilization_pct");
    let tokens: Vec<f64> = token_pcts.iter().map(|(_, v)| *v).collect();
    close(num(&summary, &["mean_token_utilization_pct"]), mean(&tokens), 1e-4, "mean_token_utilization_pct");
    for phase in PHASES {
        let v: Vec<f64> = token_pcts.iter().filter(|(p, _)| p == phase).map(|(_, v)| *v).collect();
        let key = format!("{phase}_avg_utilization");
        close(num(&summary, &[key.as_str()]), mean(&v), 1e-4, &key);
    }
    // The seed: df[df['token_utilization_pct'] < 50], counted from the CSV both ways.
    let under_csv = tokens.iter().filter(|v| **v < 50.0).count() as u64;
    assert_eq!(under_csv, under_exact);
    assert!(under_csv > 0, "the workload has underutilized batches");
    assert_eq!(count(&summary, &["underutilization_events"]), under_csv);
    assert_eq!(num(&summary, &["underutilization_threshold_pct"]), 50.0);
    assert_eq!(
        (count(&summary, &["max_num_seqs"]), count(&summary, &["max_tokens"])),
        (u64::from(last_limits.0), u64::from(last_limits.1))
    );
    let running = column(&table.rows, "running_queue_len");
    let waiting = column(&table.rows, "waiting_queue_len");
    close(num(&summary, &["mean_running_queue_len"]), running.mean(), 1e-9, "mean_running_queue_len");
    close(num(&summary, &["mean_waiting_queue_len"]), waiting.mean(), 1e-9, "mean_waiting_queue_len");
    assert_eq!(num(&summary, &["max_waiting_queue_len"]), waiting.max());
}

fn check_requests(dir: &Path, events: &CsvFile, lifecycle: &CsvFile, scripts: &[Script]) {
    // preemption_events.csv: per request, exactly its script, in order, text byte for byte.
    let mut by_id: BTreeMap<&str, Vec<&BTreeMap<String, String>>> = BTreeMap::new();
    for row in &events.rows {
        sec(&row["timestamp_sec"], "event timestamp_sec");
        let event = row["event"].as_str();
        assert!(EVENTS.contains(&event), "event `{event}`");
        let reason = &row["reason"];
        let running = &row["running_time_sec"];
        match event {
            "preempted" => {
                assert!(!reason.is_empty(), "a preempted row has a reason");
                sec(running, "running_time_sec");
            }
            "evicted" => {
                assert!(!reason.is_empty(), "an evicted row has a reason");
                assert_eq!(running, "", "running_time_sec is empty on evicted rows");
            }
            _ => {
                assert_eq!(reason, "", "reason is empty on {event} rows");
                assert_eq!(running, "", "running_time_sec is empty on {event} rows");
            }
        }
        by_id.entry(row["request_id"].as_str()).or_default().push(row);
    }
    let ids: BTreeSet<&str> = scripts.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(by_id.keys().copied().collect::<BTreeSet<_>>(), ids, "request ids round-trip");
    for script in scripts {
        let got: Vec<(&str, &str, &str)> = by_id[script.id.as_str()]
            .iter()
            .map(|r| (r["event"].as_str(), r["reason"].as_str(), r["extra_info"].as_str()))
            .collect();
        let want: Vec<_> = script.steps.iter().map(|s| s.expected_row()).collect();
        assert_eq!(got, want, "events of {:?}", script.id);
    }

    // request_lifecycle.csv: one row per request, consistent with its events.
    assert_eq!(lifecycle.rows.len(), scripts.len());
    for row in &lifecycle.rows {
        let id = row["request_id"].as_str();
        let script = scripts.iter().find(|s| s.id == id).unwrap_or_else(|| panic!("unknown request id {id:?}"));
        let evs = &by_id[id];
        let ts_of = |event: &str| -> Vec<&str> {
            evs.iter().filter(|r| r["event"] == event).map(|r| r["timestamp_sec"].as_str()).collect()
        };
        let started = sec(&row["started_sec"], "started_sec");
        assert_eq!(row["started_sec"], ts_of("started")[0], "{id:?}: started_sec");
        let n = int(&row["num_preemptions"], "num_preemptions");
        assert_eq!(n, script.preemptions(), "{id:?}: num_preemptions");
        assert_eq!(row["outcome"], script.outcome(), "{id:?}: outcome");
        let (preempted, resumed, delay) = (&row["preempted_sec"], &row["resumed_sec"], &row["preemption_delay_sec"]);
        if n == 0 {
            // Never preempted: EMPTY, not 0 (the seed selects preempted requests with notna()).
            assert_eq!((preempted.as_str(), resumed.as_str(), delay.as_str()), ("", "", ""), "{id:?}");
        } else {
            assert_eq!(preempted, ts_of("preempted")[0], "{id:?}: preempted_sec is the first preemption");
            let resumes = ts_of("resumed");
            match resumes.last() {
                Some(last) => assert_eq!(resumed, last, "{id:?}: resumed_sec is the last resume"),
                None => assert_eq!(resumed, "", "{id:?}: never resumed"),
            }
            let mut want = 0.0;
            let mut pending = None;
            for r in evs {
                match r["event"].as_str() {
                    "preempted" => pending = Some(sec(&r["timestamp_sec"], "ts")),
                    "resumed" => {
                        if let Some(p) = pending.take() {
                            want += sec(&r["timestamp_sec"], "ts") - p;
                        }
                    }
                    _ => {}
                }
            }
            let got = sec(delay, "preemption_delay_sec");
            assert!((got - want).abs() <= 2e-6 * (n as f64 + 1.0), "{id:?}: preemption_delay_sec {got} != {want}");
            if !resumes.is_empty() {
                assert!(got > 0.0, "{id:?}: the workload waits between preemption and resume");
            }
        }
        match script.outcome() {
            "in_flight" => {
                assert_eq!(
                    (row["finished_sec"].as_str(), row["total_time_sec"].as_str()),
                    ("", ""),
                    "{id:?} in flight"
                );
            }
            outcome => {
                let end_event = if outcome == "finished" { "finished" } else { "evicted" };
                assert_eq!(row["finished_sec"], ts_of(end_event)[0], "{id:?}: finished_sec");
                let finished = sec(&row["finished_sec"], "finished_sec");
                let total = sec(&row["total_time_sec"], "total_time_sec");
                assert!((total - (finished - started)).abs() <= 2e-6, "{id:?}: total_time_sec");
            }
        }
    }

    // preemption_summary.json, recomputed from the CSV rows.
    let summary = read_json(dir, "preemption_summary.json");
    assert_numeric_keys(
        &summary,
        &PREEMPTION_KEYS.iter().copied().filter(|k| *k != "preemption_reasons").collect::<Vec<_>>(),
        "preemption_summary.json",
    );
    let preempted: Vec<&BTreeMap<String, String>> = events.rows.iter().filter(|r| r["event"] == "preempted").collect();
    let total_preemptions = preempted.len() as u64;
    let total_requests = lifecycle.rows.len() as u64;
    let requests_preempted = lifecycle.rows.iter().filter(|r| !r["preemption_delay_sec"].is_empty()).count() as u64;
    assert_eq!(
        requests_preempted,
        lifecycle.rows.iter().filter(|r| r["num_preemptions"] != "0").count() as u64,
        "notna(preemption_delay_sec) selects the preempted requests"
    );
    assert_eq!(count(&summary, &["total_preemptions"]), total_preemptions);
    assert_eq!(count(&summary, &["total_requests"]), total_requests);
    assert_eq!(count(&summary, &["requests_preempted"]), requests_preempted);
    let mut reasons: BTreeMap<String, u64> = BTreeMap::new();
    for r in &preempted {
        *reasons.entry(r["reason"].clone()).or_default() += 1;
    }
    let got: BTreeMap<String, u64> = serde_json::from_value(at(&summary, &["preemption_reasons"]).clone())
        .expect("preemption_reasons is {REASON: count}");
    assert_eq!(got, reasons, "preemption_reasons = value_counts() of the preempted rows' reason");
    let rate = total_preemptions as f64 / total_requests as f64 * 100.0;
    close(num(&summary, &["preemption_rate_pct"]), rate, 1e-12, "preemption_rate_pct");
    // The seed: preempt_summary['total_preemptions']/preempt_summary['total_requests']*100.
    close(
        num(&summary, &["total_preemptions"]) / num(&summary, &["total_requests"]) * 100.0,
        rate,
        1e-12,
        "seed's rate",
    );
    let running = column(preempted.iter().copied(), "running_time_sec");
    close(
        num(&summary, &["mean_running_time_before_preempt"]),
        running.mean(),
        2e-6,
        "mean_running_time_before_preempt",
    );
    let mut delays = Vec::new();
    for rows in by_id.values() {
        let mut pending = None;
        for r in rows {
            let t = sec(&r["timestamp_sec"], "ts");
            match r["event"].as_str() {
                "preempted" => pending = Some(t),
                "resumed" => delays.extend(pending.take().map(|p| t - p)),
                _ => {}
            }
        }
    }
    let delays = Column { values: delays };
    close(num(&summary, &["mean_resume_delay"]), delays.mean(), 2e-6, "mean_resume_delay");
    close(num(&summary, &["max_resume_delay"]), delays.max(), 2e-6, "max_resume_delay");
}

fn check_components(dir: &Path, table: &CsvFile, recorded: &Recorded) {
    let mut seen: Vec<(&'static str, String)> = Vec::new();
    for row in &table.rows {
        sec(&row["timestamp_sec"], "component timestamp_sec");
        ms(&row["duration_ms"], "component duration_ms");
        let component = row["component"].as_str();
        let component: &'static str =
            COMPONENTS.iter().find(|c| **c == component).unwrap_or_else(|| panic!("component `{component}`"));
        seen.push((component, row["context"].clone()));
    }
    seen.sort();
    assert_eq!(seen, recorded.components, "components and contexts round-trip");

    let summary = read_json(dir, "encoder_decoder_summary.json");
    let keys = summary.as_object().expect("object");
    for key in ENCODER_DECODER_KEYS {
        assert!(keys.contains_key(key), "encoder_decoder_summary.json lacks `{key}`");
    }
    assert_eq!(at(&summary, &["model_type"]), "encoder_decoder");
    let mut totals = Vec::new();
    for component in COMPONENTS {
        let group = at(&summary, &[component]);
        assert_numeric_keys(group, &COMPONENT_KEYS, component);
        let col = column(table.rows.iter().filter(|r| r["component"] == component), "duration_ms");
        assert!(col.count() > 0);
        check_group(group, &col, &[50, 95], component);
        totals.push(col.sum());
    }
    let pcts: Vec<f64> = COMPONENTS.iter().map(|c| num(&summary, &[format!("{c}_pct").as_str()])).collect();
    assert!((pcts.iter().sum::<f64>() - 100.0).abs() <= 1e-9, "percentages add up to 100: {pcts:?}");
    let all: f64 = totals.iter().sum();
    for ((c, pct), total) in COMPONENTS.iter().zip(&pcts).zip(&totals) {
        close(*pct, total / all * 100.0, 1e-6, &format!("{c}_pct"));
    }
    // The seed: ed_summary['encoder']['mean_ms'].
    assert!(num(&summary, &["encoder", "mean_ms"]) > 0.0);
}

fn check_manifest(
    manifest: &Value,
    dir: &Path,
    rows: &BTreeMap<&str, u64>,
    (wall_before, wall_after): (time::OffsetDateTime, time::OffsetDateTime),
) {
    for key in MANIFEST_KEYS {
        assert!(manifest.get(key).is_some(), "{MANIFEST} lacks `{key}`");
    }
    assert_eq!(count(manifest, &["format_version"]), u64::from(profilemate::FORMAT_VERSION));
    assert_eq!(at(manifest, &["profilemate_version"]), env!("CARGO_PKG_VERSION"));
    let started = at(manifest, &["started_at"]).as_str().expect("started_at is text");
    let started = time::OffsetDateTime::parse(started, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("started_at {started:?} is not RFC 3339: {e}"));
    // timestamp_sec = 0 is when the session was built (a second of slack for clock granularity).
    assert!(started >= wall_before - time::Duration::seconds(1) && started <= wall_after + time::Duration::seconds(1));
    assert_eq!(count(manifest, &["pid"]), u64::from(std::process::id()));
    assert!(!at(manifest, &["host"]).as_str().expect("host is text").is_empty());
    let config = at(manifest, &["config"]);
    assert_eq!(at(config, &["dir"]).as_str(), dir.to_str());
    assert_eq!(count(config, &["log_interval"]), 10);
    let profilers: BTreeSet<&str> = at(manifest, &["profilers"])
        .as_array()
        .expect("profilers is a list")
        .iter()
        .map(|p| p.as_str().expect("profiler name"))
        .collect();
    assert_eq!(profilers, PROFILERS.into_iter().collect());
    let got_rows: BTreeMap<String, u64> = serde_json::from_value(at(manifest, &["rows"]).clone()).expect("rows");
    let mut want_rows: BTreeMap<String, u64> = rows.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    // The step timeline: one row per step, as many as its file holds.
    let steps = csv::Reader::from_path(dir.join("step_timeline.csv")).expect("step_timeline.csv").records().count();
    want_rows.insert("step_timeline.csv".into(), steps as u64);
    assert_eq!(got_rows, want_rows, "manifest rows");
    let dropped = at(manifest, &["dropped"]).as_object().expect("dropped is an object");
    for profiler in PROFILERS {
        for reason in DROP_REASONS {
            assert_eq!(count(manifest, &["dropped", profiler, reason]), 0, "dropped {profiler} {reason}");
        }
    }
    assert_eq!(dropped.len(), PROFILERS.len());
    if let Some(errors) = manifest.get("sink_errors") {
        let errors: BTreeMap<String, u64> = serde_json::from_value(errors.clone()).expect("sink_errors");
        assert!(errors.values().all(|n| *n == 0), "sink errors: {errors:?}");
    }
    assert_eq!(at(manifest, &["finished"]), true);
}

// ---------------------------------------------------------------------------------------------
// Summaries are rewritten every LOG_INTERVAL steps

/// Remembers, at every summary write, how many forward passes the summary counted.
#[derive(Clone, Default)]
struct SummaryLog(Arc<Mutex<(u64, Vec<u64>)>>);

impl SummaryLog {
    fn rows(&self) -> u64 {
        self.0.lock().expect("lock").0
    }
    fn writes(&self) -> Vec<u64> {
        self.0.lock().expect("lock").1.clone()
    }
}

impl Sink for SummaryLog {
    fn name(&self) -> &str {
        "summary-log"
    }
    fn write_rows(&mut self, rows: &Rows) -> Result<(), SinkError> {
        self.0.lock().expect("lock").0 += rows.forward_pass.len() as u64;
        Ok(())
    }
    fn write_summaries(&mut self, summaries: &Summaries) -> Result<(), SinkError> {
        let f = summaries.forward_pass.as_ref().ok_or("no forward summary")?;
        self.0.lock().expect("lock").1.push(f.prefill.count + f.decode.count + f.mixed.count);
        Ok(())
    }
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    // A bound on liveness only: the collector runs every 5 ms here.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn summaries_are_rewritten_every_log_interval_steps() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let log = SummaryLog::default();
    let session = profilemate::builder()
        .dir(tmp.path())
        .log_interval(10)
        .flush_interval(Duration::from_millis(5))
        .sink(log.clone())
        .build()
        .expect("session builds");
    let forward = session.forward_pass();
    for step in 1..=25u64 {
        forward.record(Phase::Decode, 1, 1, Duration::from_millis(1));
        // One pass per collector pass, so that every step count is seen.
        wait_until("the collector to take the pass", || log.rows() == step);
        if step == 21 {
            // The collector pass that took step 20 rewrote the summary (and the manifest)
            // before it took step 21.
            let summary = read_json(tmp.path(), "forward_pass_summary.json");
            let decode = count(&summary, &["decode", "count"]);
            assert!(decode == 20 || decode == 21, "summary on disk counts {decode} passes");
            let manifest = read_json(tmp.path(), MANIFEST);
            assert_eq!(at(&manifest, &["finished"]), false);
            assert!(count(&manifest, &["steps"]) >= 20);
        }
    }
    let manifest = session.shutdown().expect("clean shutdown");
    assert_eq!(manifest.steps, 25);
    let writes = log.writes();
    // Written at 10 and 20 steps, and at shutdown. (A summary is also rewritten when 10 s pass
    // without one; on a slow machine that may add writes, never remove these.)
    assert!(writes.contains(&10), "summary writes at step counts {writes:?}");
    assert!(writes.contains(&20), "summary writes at step counts {writes:?}");
    assert_eq!(writes.last(), Some(&25), "the last summary is written at shutdown");
    assert_eq!(count(&read_json(tmp.path(), "forward_pass_summary.json"), &["decode", "count"]), 25);
}

#[test]
fn flush_writes_summaries_and_rows_before_shutdown() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let session = profilemate::builder().dir(tmp.path()).log_interval(1000).build().expect("session builds");
    let forward = session.forward_pass();
    for _ in 0..3 {
        forward.record(Phase::Prefill, 2, 256, Duration::from_millis(3));
    }
    session.flush().expect("flush");
    // Far below the log interval, yet flush() wrote the rows and the summaries.
    assert_eq!(read_csv(tmp.path(), FORWARD_CSV).rows.len(), 3);
    let summary = read_json(tmp.path(), "forward_pass_summary.json");
    assert_eq!(count(&summary, &["prefill", "count"]), 3);
    assert_eq!(count(&summary, &["mixed", "count"]), 0);
    assert_eq!(num(&summary, &["mixed", "mean_ms"]), 0.0);
    assert_eq!(at(&read_json(tmp.path(), MANIFEST), &["finished"]), false);
    session.shutdown().expect("clean shutdown");
    assert_eq!(at(&read_json(tmp.path(), MANIFEST), &["finished"]), true);
}

#[test]
fn an_idle_session_writes_empty_files_and_zero_summaries() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let session = profilemate::builder().dir(tmp.path()).build().expect("session builds");
    session.shutdown().expect("clean shutdown");
    for (file, columns, added) in CSV_FILES {
        let table = read_csv(tmp.path(), file);
        assert_eq!(table.header.len(), columns.len() + added.len(), "{file}");
        assert!(table.rows.is_empty(), "{file}");
    }
    // Empty groups: count 0 and every other number 0.0, so count * mean_ms keeps working.
    let fp = read_json(tmp.path(), "forward_pass_summary.json");
    for phase in PHASES {
        assert_numeric_keys(at(&fp, &[phase]), &PHASE_KEYS, phase);
        for key in PHASE_KEYS {
            assert_eq!(num(&fp, &[phase, key]), 0.0, "{phase}.{key}");
        }
    }
    assert!(read_json(tmp.path(), "cpu_timing_summary.json").as_object().expect("object").is_empty());
    let ed = read_json(tmp.path(), "encoder_decoder_summary.json");
    assert_eq!(at(&ed, &["model_type"]), "decoder_only");
    for c in COMPONENTS {
        assert_eq!(num(&ed, &[format!("{c}_pct").as_str()]), 0.0);
    }
    let pre = read_json(tmp.path(), "preemption_summary.json");
    assert_eq!(num(&pre, &["preemption_rate_pct"]), 0.0, "0 when there are no requests");
    let batch = read_json(tmp.path(), "batch_utilization_summary.json");
    assert_numeric_keys(&batch, &BATCH_KEYS, "batch");
    let manifest = read_json(tmp.path(), MANIFEST);
    for (file, ..) in CSV_FILES {
        assert_eq!(count(&manifest, &["rows", file]), 0);
    }
}

#[test]
fn files_grow_as_the_run_goes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let session = profilemate::builder()
        .dir(tmp.path())
        .flush_interval(Duration::from_millis(5))
        .build()
        .expect("session builds");
    // The first manifest is written at build, before any engine work.
    let manifest = read_json(tmp.path(), MANIFEST);
    assert_eq!(at(&manifest, &["finished"]), false);
    // Every CSV file exists with its header from the start.
    for (file, columns, added) in CSV_FILES {
        assert_eq!(read_csv(tmp.path(), file).header.len(), columns.len() + added.len(), "{file}");
    }
    let forward = session.forward_pass();
    for i in 0..10 {
        forward.record(Phase::Decode, 1, i, Duration::from_millis(1));
    }
    // Without flush() or shutdown(), the rows reach the file (about once a second), and the
    // file read mid-run holds only complete, parsable lines.
    wait_until("the rows to reach the file", || read_csv(tmp.path(), FORWARD_CSV).rows.len() == 10);
    session.shutdown().expect("clean shutdown");
    assert_eq!(read_csv(tmp.path(), FORWARD_CSV).rows.len(), 10);
}

// ---------------------------------------------------------------------------------------------
// Free text round-trips through the CSV files, whatever it holds

fn free_text() -> impl proptest::strategy::Strategy<Value = String> {
    use proptest::prelude::*;
    prop_oneof![
        "[a-z0-9,;= \"'\\n\\r\\t\\x00é🚀日#]{0,60}",
        any::<String>(),
        Just(String::new()),
        Just("\"".to_string()),
        Just("\r\n".to_string()),
        Just(" ".to_string()),
    ]
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 48, ..Default::default() })]

    #[test]
    fn free_text_round_trips_through_the_csv_files(texts in proptest::collection::vec(free_text(), 1..6)) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let session = profilemate::builder().dir(tmp.path()).build().expect("session builds");
        let (cpu, requests, components) = (session.cpu_timing(), session.requests(), session.components());
        let ids: Vec<String> = texts.iter().enumerate().map(|(k, t)| format!("{k}:{t}")).collect();
        for (id, t) in ids.iter().zip(&texts) {
            requests.started(id);
            requests.preempted(id, t, t);
            requests.finished(id, t);
            cpu.record(CpuOp::SAMPLING, Duration::from_micros(3), t);
            components.record(Component::Encoder, t, Duration::from_micros(3));
        }
        let manifest = session.shutdown().expect("clean shutdown");
        proptest::prop_assert_eq!(manifest.total_dropped(), 0);

        let events = read_csv(tmp.path(), EVENTS_CSV);
        let got: Vec<(&str, &str, &str, &str)> = events
            .rows
            .iter()
            .map(|r| (r["request_id"].as_str(), r["event"].as_str(), r["reason"].as_str(), r["extra_info"].as_str()))
            .collect();
        let want: Vec<(&str, &str, &str, &str)> = ids
            .iter()
            .zip(&texts)
            .flat_map(|(id, t)| {
                [(id.as_str(), "started", "", ""), (id.as_str(), "preempted", t.as_str(), t.as_str()), (id.as_str(), "finished", "", t.as_str())]
            })
            .collect();
        proptest::prop_assert_eq!(got, want);
        let lifecycle: Vec<String> =
            read_csv(tmp.path(), LIFECYCLE_CSV).rows.iter().map(|r| r["request_id"].clone()).collect();
        proptest::prop_assert_eq!(&lifecycle, &ids);
        let cpu: Vec<String> = read_csv(tmp.path(), CPU_CSV).rows.iter().map(|r| r["context"].clone()).collect();
        proptest::prop_assert_eq!(&cpu, &texts);
        let components: Vec<String> =
            read_csv(tmp.path(), COMPONENTS_CSV).rows.iter().map(|r| r["context"].clone()).collect();
        proptest::prop_assert_eq!(&components, &texts);
    }
}
