//! Faults: malformed configuration, unusable output directories, failing sinks, values that
//! make no sense, full buffers, many threads, use after shutdown, and disabled profiling.
//!
//! The rule under test (`CONTRACT.md`): a malformed setting is an error that names the variable,
//! the value and what is accepted; the profiled program keeps running whatever happens to the
//! profiler's output; and whatever cannot be recorded is dropped and counted in the manifest.

use profilemate::{
    env, BatchSample, Component, Config, CpuOp, Error, LifecycleEvent, MemorySink, Phase, ProfilerKind, Rows,
    RunManifest, Session, Sink, SinkError, Summaries, MANIFEST_FILE, MAX_TEXT_BYTES,
};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Barrier;
use std::time::Duration;

const PROFILERS: [&str; 5] = ["forward_pass", "cpu_timing", "batch_utilization", "preemption", "encoder_decoder"];
const DROP_REASONS: [&str; 6] =
    ["buffer_full", "invalid_value", "text_too_long", "session_closed", "timing", "sink_error"];

fn lookup(pairs: &[(&str, &str)]) -> Result<Config, Error> {
    Config::from_lookup(|name| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string()))
}

fn dropped(m: &RunManifest, profiler: &str, reason: &str) -> u64 {
    m.dropped.get(profiler).and_then(|r| r.get(reason)).copied().unwrap_or_else(|| panic!("no {profiler}/{reason}"))
}

/// Every drop count is 0 except the ones listed, which must be exactly as given.
fn assert_drops(m: &RunManifest, expected: &[(&str, &str, u64)]) {
    for profiler in PROFILERS {
        for reason in DROP_REASONS {
            let want = expected.iter().find(|(p, r, _)| *p == profiler && *r == reason).map_or(0, |e| e.2);
            assert_eq!(dropped(m, profiler, reason), want, "dropped {profiler}/{reason}");
        }
    }
}

fn read_manifest(dir: &Path) -> RunManifest {
    let bytes = std::fs::read(dir.join(MANIFEST_FILE)).expect("manifest on disk");
    serde_json::from_slice(&bytes).expect("manifest parses")
}

fn csv_rows(dir: &Path, file: &str) -> Vec<csv::StringRecord> {
    let mut reader = csv::Reader::from_path(dir.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
    reader.records().map(|r| r.expect("row parses")).collect()
}

// ---------------------------------------------------------------------------------------------
// Configuration

/// (variable, malformed values, words the `expected` text must contain)
fn malformed() -> Vec<(&'static str, Vec<&'static str>, Vec<&'static str>)> {
    vec![
        (env::ENABLED, vec!["maybe", "", "2", "enabled", "yes please"], vec!["0", "1"]),
        (env::DIR, vec!["", "   "], vec!["directory"]),
        (env::LOG_INTERVAL, vec!["0", "-5", "often", "1.5", "18446744073709551616", ""], vec!["whole number", "1"]),
        (env::VERBOSE, vec!["loud", "-1", ""], vec!["0", "1"]),
        (env::BACKEND, vec!["gpu", "", "cuda12", "host,cuda"], vec!["cuda", "host"]),
        (env::CUDA_EVENT_BATCH, vec!["0", "lots", "1048577", "-1"], vec!["whole number", "1"]),
        (
            env::DISABLE,
            vec!["forward_pass,bogus", "kv-cache", "all"],
            vec!["forward_pass", "encoder_decoder", "moe_expert"],
        ),
        (env::SINKS, vec!["csv,xml", "", " , ", "parquet;json"], vec!["csv", "json"]),
        (env::BUFFER_EVENTS, vec!["127", "0", "big", "67108865"], vec!["128"]),
        (env::FLUSH_MS, vec!["0", "60001", "fast", "100ms"], vec!["1", "60000"]),
    ]
}

#[test]
fn every_variable_rejects_malformed_values_naming_variable_value_and_what_is_accepted() {
    let cases = malformed();
    // Every variable of the env module is covered.
    let mut names: Vec<&str> = cases.iter().map(|c| c.0).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), 10);
    for (var, values, accepted) in cases {
        for bad in values {
            let err = lookup(&[(var, bad)]).expect_err(&format!("{var}={bad:?} must be rejected"));
            let message = err.to_string();
            let Error::InvalidSetting { name, value, expected } = err else {
                panic!("{var}={bad:?}: expected InvalidSetting, got {message}");
            };
            assert_eq!(name, var);
            assert_eq!(value, bad);
            for word in &accepted {
                assert!(expected.contains(word), "{var}={bad:?}: `{expected}` does not say `{word}` is accepted");
            }
            assert!(message.contains(var), "{message}");
            assert!(message.contains(&format!("{bad:?}")), "{message} does not quote the value {bad:?}");
            assert!(message.contains(&expected), "{message}");
        }
    }
    // A bad item of a list is named.
    let Err(Error::InvalidSetting { expected, .. }) = lookup(&[(env::DISABLE, "preemption, bogus")]) else {
        panic!("bogus profiler accepted");
    };
    assert!(expected.contains("`bogus`"), "{expected}");
}

#[test]
fn well_formed_values_are_read() {
    let config = lookup(&[
        (env::ENABLED, "true"),
        (env::DIR, "/tmp/profilemate-run"),
        (env::LOG_INTERVAL, " 10 "),
        (env::VERBOSE, "on"),
        (env::BACKEND, "HOST"),
        (env::CUDA_EVENT_BATCH, "1"),
        (env::DISABLE, "cpu_timing, preemption,"),
        (env::SINKS, "json"),
        (env::BUFFER_EVENTS, "128"),
        (env::FLUSH_MS, "60000"),
    ])
    .expect("valid configuration");
    assert!(config.enabled && config.verbose);
    assert_eq!(config.dir, Path::new("/tmp/profilemate-run"));
    assert_eq!(config.log_interval, 10);
    assert_eq!(config.backend, profilemate::BackendChoice::Host);
    assert_eq!(config.cuda_event_batch, 1);
    assert_eq!(config.disabled, vec![ProfilerKind::CpuTiming, ProfilerKind::Preemption]);
    assert_eq!(config.sinks, vec![profilemate::SinkKind::Json]);
    assert_eq!((config.buffer_events, config.flush_interval_ms), (128, 60_000));
    // Nothing set: the contract's defaults.
    let defaults = lookup(&[]).expect("defaults");
    assert_eq!(defaults, Config::default());
    assert_eq!(defaults.log_interval, 100);
    assert_eq!(defaults.cuda_event_batch, 100);
}

#[test]
fn out_of_range_builder_values_are_rejected_at_build() {
    let cases: Vec<(&str, profilemate::SessionBuilder)> = vec![
        ("log_interval", profilemate::builder().log_interval(0)),
        ("buffer_events", profilemate::builder().buffer_events(127)),
        ("flush_interval_ms", profilemate::builder().flush_interval(Duration::ZERO)),
        ("flush_interval_ms", profilemate::builder().flush_interval(Duration::from_secs(61))),
        ("underutilization_threshold_pct", profilemate::builder().underutilization_threshold(f64::NAN)),
        ("underutilization_threshold_pct", profilemate::builder().underutilization_threshold(100.5)),
        ("underutilization_threshold_pct", profilemate::builder().underutilization_threshold(-1.0)),
    ];
    let tmp = tempfile::tempdir().expect("tempdir");
    for (option, builder) in cases {
        let dir = tmp.path().join(option);
        match builder.dir(&dir).build() {
            Err(Error::InvalidSetting { name, expected, .. }) => {
                assert_eq!(name, option);
                assert!(!expected.is_empty());
            }
            other => panic!("{option}: expected InvalidSetting, got {other:?}"),
        }
        assert!(!dir.exists(), "{option}: a rejected configuration touches nothing");
    }
}

#[test]
fn demanding_cuda_without_a_backend_fails_at_build() {
    let config = lookup(&[(env::BACKEND, "cuda")]).expect("cuda is a valid choice");
    let err = Session::builder().config(config).in_memory_only().build().expect_err("no CUDA backend here");
    assert!(matches!(err, Error::BackendUnavailable { .. }), "{err}");
    assert!(err.to_string().contains("cuda"));
}

// ---------------------------------------------------------------------------------------------
// The output directory

#[test]
fn an_output_dir_that_cannot_be_created_fails_at_build() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = tmp.path().join("a-regular-file");
    std::fs::write(&file, b"not a directory").expect("write file");

    // Its parent is a regular file.
    let below = file.join("run");
    match profilemate::builder().dir(&below).build() {
        Err(Error::OutputDir { path, .. }) => assert_eq!(path, below),
        other => panic!("expected OutputDir, got {other:?}"),
    }
    // It is itself a regular file.
    let err = profilemate::builder().dir(&file).build().expect_err("a file is not a directory");
    assert!(matches!(&err, Error::OutputDir { path, .. } if path == &file), "{err}");
    assert!(err.to_string().contains(&file.display().to_string()), "{err}");
    assert_eq!(std::fs::read(&file).expect("file intact"), b"not a directory");
}

// Removing a directory whose files are open needs Unix semantics.
#[cfg(unix)]
#[test]
fn removing_the_output_dir_while_running_is_counted_not_fatal() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("run");
    let session = profilemate::builder().dir(&dir).log_interval(5).build().expect("session builds");
    let (forward, cpu, requests) = (session.forward_pass(), session.cpu_timing(), session.requests());
    for _ in 0..5 {
        forward.record(Phase::Decode, 4, 4, Duration::from_millis(2));
    }
    session.flush().expect("flush");
    assert!(dir.join("forward_pass_summary.json").exists());

    std::fs::remove_dir_all(&dir).expect("remove the output directory");
    for _ in 0..12 {
        forward.record(Phase::Decode, 4, 4, Duration::from_millis(2));
        cpu.record(CpuOp::SAMPLING, Duration::from_micros(30), "");
    }
    requests.started("req-1");
    requests.finished("req-1", "");
    session.flush().expect("the session keeps running");
    forward.record(Phase::Prefill, 1, 128, Duration::from_millis(9));

    let manifest = session.shutdown().expect("shutdown still succeeds");
    assert!(manifest.finished);
    assert_eq!(manifest.steps, 18, "every pass was taken");
    assert_eq!(manifest.rows["forward_pass_timing.csv"], 18);
    assert_eq!(manifest.rows["cpu_operations_timing.csv"], 12);
    // The summaries and the manifest could not be written: counted, per writer.
    assert!(manifest.sink_errors.get("json").copied().unwrap_or(0) >= 1, "{:?}", manifest.sink_errors);
    assert!(manifest.sink_errors.get("manifest").copied().unwrap_or(0) >= 1, "{:?}", manifest.sink_errors);
    assert!(!dir.join(MANIFEST_FILE).exists());
}

// ---------------------------------------------------------------------------------------------
// Failing sinks

/// A sink whose every method fails.
struct AlwaysFails;

impl Sink for AlwaysFails {
    fn name(&self) -> &str {
        "always-fails"
    }
    fn write_rows(&mut self, _rows: &Rows) -> Result<(), SinkError> {
        Err("the disk is on fire".into())
    }
    fn write_summaries(&mut self, _summaries: &Summaries) -> Result<(), SinkError> {
        Err("the disk is on fire".into())
    }
    fn flush(&mut self) -> Result<(), SinkError> {
        Err("the disk is on fire".into())
    }
    fn finish(&mut self, _manifest: &RunManifest) -> Result<(), SinkError> {
        Err("the disk is on fire".into())
    }
}

#[test]
fn a_failing_sink_is_counted_and_the_session_keeps_running() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let memory = MemorySink::new();
    let session = profilemate::builder()
        .dir(tmp.path())
        .log_interval(10)
        .sink(AlwaysFails)
        .sink(memory.clone())
        .build()
        .expect("session builds");
    let (forward, requests) = (session.forward_pass(), session.requests());
    for _ in 0..25 {
        forward.record(Phase::Decode, 8, 8, Duration::from_millis(1));
    }
    session.flush().expect("flush goes on despite the failing sink");
    // Recording goes on after the failures.
    for _ in 0..25 {
        forward.record(Phase::Decode, 8, 8, Duration::from_millis(1));
    }
    requests.started("a");
    requests.finished("a", "");
    requests.started("b");
    let manifest = session.shutdown().expect("clean shutdown");

    assert!(manifest.sink_errors.get("always-fails").copied().unwrap_or(0) >= 2, "{:?}", manifest.sink_errors);
    assert!(!manifest.sink_errors.contains_key("csv") && !manifest.sink_errors.contains_key("json"));
    // Every row the failing sink refused is counted: 50 passes, 3 event rows + 2 lifecycle rows.
    assert_drops(&manifest, &[("forward_pass", "sink_error", 50), ("preemption", "sink_error", 5)]);
    // The other sinks got everything.
    assert_eq!(memory.rows().forward_pass.len(), 50);
    assert_eq!(memory.rows().request_lifecycle.len(), 2);
    assert_eq!(csv_rows(tmp.path(), "forward_pass_timing.csv").len(), 50);
    let on_disk = read_manifest(tmp.path());
    assert_eq!(on_disk, manifest);
    assert_eq!(on_disk.rows["forward_pass_timing.csv"], 50);
}

// ---------------------------------------------------------------------------------------------
// Values that make no sense

#[test]
fn negative_nan_and_infinite_durations_are_dropped_as_invalid_values() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let session = profilemate::builder().dir(tmp.path()).build().expect("session builds");
    let (forward, cpu, components) = (session.forward_pass(), session.cpu_timing(), session.components());
    let bad = [-1.0, -1e-9, f64::NAN, -f64::NAN, f64::INFINITY, f64::NEG_INFINITY];
    let good = [0.0, -0.0, 1.5];
    for ms in bad.into_iter().chain(good) {
        forward.record_ms(Phase::Decode, 1, 1, ms);
        cpu.record_ms(CpuOp::SCHEDULING, ms, "");
        components.record_ms(Component::Decoder, "language_model", ms);
    }
    let manifest = session.shutdown().expect("clean shutdown");
    let n = bad.len() as u64;
    let expected = [
        ("forward_pass", "invalid_value", n),
        ("cpu_timing", "invalid_value", n),
        ("encoder_decoder", "invalid_value", n),
    ];
    assert_drops(&manifest, &expected);
    assert_drops(&read_manifest(tmp.path()), &expected);
    // The sensible ones are written, exactly.
    for (file, column) in
        [("forward_pass_timing.csv", 4), ("cpu_operations_timing.csv", 2), ("encoder_decoder_timing.csv", 2)]
    {
        let times: Vec<String> = csv_rows(tmp.path(), file).iter().map(|r| r[column].to_string()).collect();
        assert_eq!(times, ["0.000000", "0.000000", "1.500000"], "{file}");
    }
}

#[test]
fn an_empty_request_id_is_an_invalid_value() {
    let memory = MemorySink::new();
    let session = Session::builder().in_memory_only().sink(memory.clone()).build().expect("session builds");
    let requests = session.requests();
    requests.started("");
    requests.preempted("", "RECOMPUTE", "");
    requests.resumed("");
    requests.finished("", "");
    requests.evicted("", "aborted", "");
    requests.record("", LifecycleEvent::Started, "", "");
    requests.started("ok");
    requests.finished("ok", "");
    let manifest = session.shutdown().expect("clean shutdown");
    assert_drops(&manifest, &[("preemption", "invalid_value", 6)]);
    let rows = memory.rows();
    assert_eq!(rows.preemption_events.len(), 2);
    assert_eq!(rows.request_lifecycle.len(), 1);
    assert_eq!(memory.summaries().expect("summaries").preemption.expect("summary").total_requests, 1);
}

#[test]
fn text_longer_than_the_limit_is_dropped_and_text_at_the_limit_round_trips() {
    let memory = MemorySink::new();
    let session = Session::builder().in_memory_only().sink(memory.clone()).build().expect("session builds");
    let (cpu, requests, components) = (session.cpu_timing(), session.requests(), session.components());
    let over = "a".repeat(MAX_TEXT_BYTES + 1);
    // Exactly the limit, in two-byte characters.
    let limit = "é".repeat(MAX_TEXT_BYTES / 2);
    assert_eq!(limit.len(), MAX_TEXT_BYTES);

    requests.started(&over);
    // Each field alone fits; all of them together do not.
    let half = "r".repeat(MAX_TEXT_BYTES / 2);
    requests.preempted("id", &half, &half);
    requests.started(&limit);

    let op = session.register_cpu_operation("detokenize").expect("register");
    cpu.record(op, Duration::from_micros(5), &over);
    cpu.record_ms(op, 0.5, &over);
    cpu.time_with(op, &over, || ());
    drop(cpu.start_with(op, &over));
    cpu.record(op, Duration::from_micros(5), &limit);

    components.record(Component::Encoder, &over, Duration::from_micros(5));
    components.record_ms(Component::Encoder, &over, 0.5);
    components.start(Component::Encoder, &over).stop();
    components.record(Component::Encoder, &limit, Duration::from_micros(5));

    let manifest = session.shutdown().expect("clean shutdown");
    assert_drops(
        &manifest,
        &[
            ("preemption", "text_too_long", 2),
            ("cpu_timing", "text_too_long", 4),
            ("encoder_decoder", "text_too_long", 3),
        ],
    );
    let rows = memory.rows();
    assert_eq!(rows.preemption_events.len(), 1);
    assert_eq!(rows.preemption_events[0].request_id, limit);
    assert_eq!(rows.request_lifecycle[0].request_id, limit);
    assert_eq!(rows.cpu_operations.len(), 1);
    assert_eq!(rows.cpu_operations[0].context, limit);
    assert_eq!(rows.encoder_decoder.len(), 1);
    assert_eq!(rows.encoder_decoder[0].context, limit);
}

// ---------------------------------------------------------------------------------------------
// Full buffers and many threads

#[test]
fn a_full_thread_buffer_drops_and_counts_exactly() {
    const EVENTS: u64 = 1000;
    // Plain events, from a thread that exits before shutdown.
    let memory = MemorySink::new();
    let session = Session::builder()
        .in_memory_only()
        .buffer_events(128)
        .flush_interval(Duration::from_secs(60))
        .sink(memory.clone())
        .build()
        .expect("session builds");
    let forward = session.forward_pass();
    std::thread::scope(|s| {
        s.spawn(|| {
            for i in 0..EVENTS {
                forward.record(Phase::Decode, 1, i as u32, Duration::from_micros(10));
            }
        });
    });
    let manifest = session.shutdown().expect("clean shutdown");
    let written = memory.rows().forward_pass.len() as u64;
    let full = dropped(&manifest, "forward_pass", "buffer_full");
    assert_eq!(written + full, EVENTS, "written {written} + dropped {full}");
    assert!(full > 0 && written > 0);
    assert_eq!(manifest.rows["forward_pass_timing.csv"], written);
    assert_drops(&manifest, &[("forward_pass", "buffer_full", full)]);
    // What was kept is the first events, in order.
    let kept: Vec<u32> = memory.rows().forward_pass.iter().map(|r| r.num_tokens).collect();
    assert_eq!(kept, (0..written as u32).collect::<Vec<_>>());

    // Events that span several slots (long context), from the session's own thread.
    let memory = MemorySink::new();
    let session = Session::builder()
        .in_memory_only()
        .buffer_events(128)
        .flush_interval(Duration::from_secs(60))
        .sink(memory.clone())
        .build()
        .expect("session builds");
    let cpu = session.cpu_timing();
    let context = format!("note={}", "n".repeat(150));
    for _ in 0..EVENTS {
        cpu.record(CpuOp::SAMPLING, Duration::from_micros(10), &context);
    }
    let manifest = session.shutdown().expect("clean shutdown");
    let written = memory.rows().cpu_operations.len() as u64;
    let full = dropped(&manifest, "cpu_timing", "buffer_full");
    assert_eq!(written + full, EVENTS, "written {written} + dropped {full}");
    assert!(full > 0 && written > 0);
    assert!(memory.rows().cpu_operations.iter().all(|r| r.context == context));
}

#[test]
fn many_threads_recording_at_once_lose_nothing() {
    const THREADS: u32 = 8;
    const PER_THREAD: u32 = 300;
    let memory = MemorySink::new();
    let session = Session::builder()
        .in_memory_only()
        .flush_interval(Duration::from_millis(1))
        .sink(memory.clone())
        .build()
        .expect("session builds");
    let op = session.register_cpu_operation("detokenize").expect("register");
    let start = Barrier::new(THREADS as usize);
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (forward, cpu, batches) = (session.forward_pass(), session.cpu_timing(), session.batch_utilization());
            let (requests, components) = (session.requests(), session.components());
            let start = &start;
            s.spawn(move || {
                start.wait();
                for j in 0..PER_THREAD {
                    forward.record(Phase::Decode, t, j, Duration::from_micros(u64::from(j)));
                    cpu.record(op, Duration::from_micros(1), &format!("thread={t};j={j}"));
                    batches.record(&BatchSample {
                        num_seqs: t,
                        max_num_seqs: 64,
                        num_tokens: j,
                        max_tokens: 4096,
                        phase: Phase::Decode,
                        running_queue_len: t,
                        waiting_queue_len: 0,
                    });
                    let id = format!("t{t}-r{j}");
                    requests.started(&id);
                    requests.finished(&id, "");
                    let _decoder = components.start(Component::Decoder, "language_model");
                }
            });
        }
    });
    let manifest = session.shutdown().expect("clean shutdown");
    assert_eq!(manifest.total_dropped(), 0);
    let n = u64::from(THREADS * PER_THREAD);
    let want: BTreeMap<String, u64> = [
        ("forward_pass_timing.csv", n),
        ("cpu_operations_timing.csv", n),
        ("batch_utilization.csv", n),
        ("preemption_events.csv", 2 * n),
        ("request_lifecycle.csv", n),
        ("encoder_decoder_timing.csv", n),
        ("kv_cache_usage.csv", 0),
        ("cuda_graph_events.csv", 0),
        ("moe_expert_routing.csv", 0),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    // Forward passes started on several threads at once without a step guard may share a step
    // id (the forward pass opens a step with a plain load and store): at most one step each.
    let mut rows_written = manifest.rows.clone();
    let steps = rows_written.remove("step_timeline.csv").expect("a step timeline");
    assert!((1..=n).contains(&steps), "{steps} steps for {n} forward passes");
    assert_eq!(rows_written, want);
    let rows = memory.rows();
    assert_eq!(rows.forward_pass.len() as u64, n);
    assert_eq!(rows.request_lifecycle.len() as u64, n);
    assert!(rows.request_lifecycle.iter().all(|r| r.finished_ns.is_some()), "every request finished");
    for t in 0..THREADS {
        // Each thread's events arrive complete and in the order it recorded them.
        let seq: Vec<u32> = rows.forward_pass.iter().filter(|r| r.batch_size == t).map(|r| r.num_tokens).collect();
        assert_eq!(seq, (0..PER_THREAD).collect::<Vec<_>>(), "thread {t}");
        let contexts: Vec<String> = rows
            .cpu_operations
            .iter()
            .filter(|r| r.context.starts_with(&format!("thread={t};")))
            .map(|r| r.context.clone())
            .collect();
        assert_eq!(contexts, (0..PER_THREAD).map(|j| format!("thread={t};j={j}")).collect::<Vec<_>>());
        let batches: Vec<u32> =
            rows.batch_utilization.iter().filter(|r| r.num_seqs == t).map(|r| r.num_tokens).collect();
        assert_eq!(batches, (0..PER_THREAD).collect::<Vec<_>>(), "thread {t} batches");
    }
}

// ---------------------------------------------------------------------------------------------
// After shutdown, and without it

#[test]
fn recording_after_shutdown_does_not_panic_and_changes_nothing() {
    let memory = MemorySink::new();
    let session = Session::builder().in_memory_only().sink(memory.clone()).build().expect("session builds");
    let (forward, cpu, batches) = (session.forward_pass(), session.cpu_timing(), session.batch_utilization());
    let (requests, components) = (session.requests(), session.components());
    forward.record(Phase::Prefill, 1, 16, Duration::from_millis(1));
    requests.started("r");
    // Guards still open when the session shuts down.
    let pass = forward.start(Phase::Decode, 1, 1);
    let op = cpu.start(CpuOp::SCHEDULING);
    let encoder = components.start(Component::Encoder, "vision_encoder");

    let manifest = session.shutdown().expect("clean shutdown");
    assert_eq!(manifest.steps, 1);
    let before = memory.rows();
    assert_eq!(before.forward_pass.len(), 1);
    assert_eq!(before.request_lifecycle.len(), 1, "the open request is written as in flight");

    pass.stop();
    op.stop();
    encoder.stop();
    forward.record(Phase::Decode, 1, 1, Duration::from_millis(1));
    forward.record_ms(Phase::Decode, 1, 1, f64::NAN);
    forward.start(Phase::Decode, 1, 1).stop();
    cpu.time(CpuOp::SAMPLING, || ());
    cpu.record_ms(CpuOp::SAMPLING, 1.0, "x=1");
    batches.record(&BatchSample {
        num_seqs: 1,
        max_num_seqs: 1,
        num_tokens: 1,
        max_tokens: 1,
        phase: Phase::Decode,
        running_queue_len: 0,
        waiting_queue_len: 0,
    });
    requests.finished("r", "");
    requests.started("");
    components.record(Component::Decoder, "language_model", Duration::from_millis(1));
    components.declare_model_type(profilemate::ModelType::DecoderOnly);
    assert_eq!(memory.rows(), before);
}

#[test]
fn dropping_the_session_finishes_the_run() {
    let tmp = tempfile::tempdir().expect("tempdir");
    {
        let session = profilemate::builder().dir(tmp.path()).build().expect("session builds");
        session.forward_pass().record(Phase::Prefill, 2, 64, Duration::from_millis(4));
        session.requests().started("in-flight");
    }
    let manifest = read_manifest(tmp.path());
    assert!(manifest.finished);
    assert_eq!(manifest.rows["forward_pass_timing.csv"], 1);
    assert_eq!(csv_rows(tmp.path(), "forward_pass_timing.csv").len(), 1);
    let lifecycle = csv_rows(tmp.path(), "request_lifecycle.csv");
    assert_eq!(lifecycle.len(), 1);
    assert_eq!((&lifecycle[0][0], &lifecycle[0][4], &lifecycle[0][5]), ("in-flight", "", ""));
}

// ---------------------------------------------------------------------------------------------
// Profiling turned off

/// Calls every recording method of every handle of `session`.
fn record_everything(session: &Session) {
    let (forward, cpu, batches) = (session.forward_pass(), session.cpu_timing(), session.batch_utilization());
    let (requests, components) = (session.requests(), session.components());
    for handle_enabled in
        [forward.is_enabled(), cpu.is_enabled(), batches.is_enabled(), requests.is_enabled(), components.is_enabled()]
    {
        assert!(!handle_enabled);
    }
    session.declare_model_type(profilemate::ModelType::EncoderDecoder);
    let op = session.register_cpu_operation("detokenize").expect("registering works while disabled");
    assert!(session.register_cpu_operation("").is_err(), "names are still checked");
    for step in 0..100u32 {
        let mut pass = forward.start(Phase::Decode, 8, 8);
        pass.set_batch(Phase::Mixed, 8, 100);
        pass.stop();
        forward.start(Phase::Prefill, 1, 1).cancel();
        forward.record(Phase::Prefill, 1, 512, Duration::from_millis(3));
        forward.record_ms(Phase::Decode, 1, 1, -1.0);
        cpu.time(CpuOp::SCHEDULING, || ());
        assert_eq!(cpu.time_with(op, "k=v", || step), step, "timed closures still run");
        cpu.record(op, Duration::from_micros(4), "");
        cpu.record_ms(CpuOp::SAMPLING, f64::NAN, "");
        drop(cpu.start_with(CpuOp::MODEL_EXECUTION, "x=1"));
        cpu.start(CpuOp::SAMPLING).cancel();
        batches.record(&BatchSample {
            num_seqs: 8,
            max_num_seqs: 0,
            num_tokens: 8,
            max_tokens: 0,
            phase: Phase::Decode,
            running_queue_len: 8,
            waiting_queue_len: 0,
        });
        requests.started("r");
        requests.preempted("r", "RECOMPUTE", "");
        requests.resumed("r");
        requests.finished("r", "");
        requests.evicted("", "", "");
        requests.record("r", LifecycleEvent::Evicted, "aborted", "");
        components.start(Component::Encoder, "vision_encoder").stop();
        components.start(Component::CrossAttention, "x").cancel();
        components.record(Component::Decoder, "language_model", Duration::from_millis(1));
        components.record_ms(Component::Decoder, "language_model", f64::INFINITY);
    }
}

#[test]
fn a_disabled_session_records_nothing_and_its_handles_work() {
    let session = Session::disabled();
    assert!(!session.is_enabled());
    assert_eq!(session.dir(), None);
    record_everything(&session);
    session.flush().expect("flush of a disabled session");
    let manifest = session.shutdown().expect("shutdown of a disabled session");
    assert!(manifest.finished);
    assert!(!manifest.config.enabled);
    assert_eq!((manifest.steps, manifest.total_dropped()), (0, 0));
    assert!(manifest.rows.is_empty() && manifest.profilers.is_empty());

    // Handles made without a session do nothing too.
    profilemate::ForwardPass::disabled().record(Phase::Decode, 1, 1, Duration::from_millis(1));
    profilemate::Requests::default().started("r");
}

#[test]
fn profilemate_enabled_0_builds_a_disabled_session_that_writes_no_files() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("must-not-exist");
    let dir_text = dir.to_str().expect("utf-8 path");
    let config = lookup(&[(env::ENABLED, "0"), (env::DIR, dir_text), (env::LOG_INTERVAL, "1")]).expect("config");
    assert!(!config.enabled);
    let memory = MemorySink::new();
    let session = profilemate::builder().config(config).sink(memory.clone()).build().expect("build");
    assert!(!session.is_enabled());
    assert_eq!(session.dir(), None);
    record_everything(&session);
    session.flush().expect("flush");
    let manifest = session.shutdown().expect("shutdown");
    assert!(manifest.finished);
    assert!(!dir.exists(), "a disabled session creates no directory");
    assert!(std::fs::read_dir(tmp.path()).expect("read tempdir").next().is_none(), "and no file");
    assert!(memory.rows().is_empty());
    assert_eq!(memory.summary_writes(), 0);
    assert!(memory.manifest().is_none());

    // The same through the builder.
    let session = profilemate::builder().enabled(false).dir(&dir).build().expect("build");
    record_everything(&session);
    session.shutdown().expect("shutdown");
    assert!(!dir.exists());
}

#[test]
fn a_disabled_profiler_writes_no_files_and_records_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = lookup(&[(env::DISABLE, "preemption,encoder_decoder")]).expect("config");
    let session = profilemate::builder().config(config).dir(tmp.path()).build().expect("build");
    assert!(!session.requests().is_enabled() && !session.components().is_enabled());
    assert!(session.forward_pass().is_enabled());
    session.requests().started("r");
    session.components().record(Component::Encoder, "vision_encoder", Duration::from_millis(1));
    session.forward_pass().record(Phase::Decode, 1, 1, Duration::from_millis(1));
    let manifest = session.shutdown().expect("shutdown");
    assert_eq!(
        manifest.profilers,
        ["forward_pass", "cpu_timing", "batch_utilization", "kv_cache", "cuda_graph", "moe_expert"]
    );
    assert_eq!(
        manifest.rows.keys().map(String::as_str).collect::<Vec<_>>(),
        [
            "batch_utilization.csv",
            "cpu_operations_timing.csv",
            "cuda_graph_events.csv",
            "forward_pass_timing.csv",
            "kv_cache_usage.csv",
            "moe_expert_routing.csv",
            "step_timeline.csv"
        ]
    );
    for file in [
        "preemption_events.csv",
        "request_lifecycle.csv",
        "encoder_decoder_timing.csv",
        "preemption_summary.json",
        "encoder_decoder_summary.json",
    ] {
        assert!(!tmp.path().join(file).exists(), "{file} of a disabled profiler");
    }
    assert_eq!(csv_rows(tmp.path(), "forward_pass_timing.csv").len(), 1);
    assert_eq!(manifest.total_dropped(), 0);
}

/// Counts the CPU rows it receives.
#[derive(Clone, Default)]
struct CpuRowCounter(std::sync::Arc<std::sync::atomic::AtomicU64>);

impl Sink for CpuRowCounter {
    fn write_rows(&mut self, rows: &Rows) -> Result<(), SinkError> {
        self.0.fetch_add(rows.cpu_operations.len() as u64, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}

#[test]
fn text_spanning_several_slots_survives_buffer_wrap_around() {
    // A 128-slot buffer wraps around hundreds of times while events of one to six slots go
    // through it; every event must arrive whole, in order.
    const EVENTS: u64 = 1200;
    const BURST: u64 = 4; // at most 4 * (6 + 6) slots: fits in 128
    let memory = MemorySink::new();
    let counter = CpuRowCounter::default();
    let session = Session::builder()
        .in_memory_only()
        .buffer_events(128)
        .flush_interval(Duration::from_millis(1))
        .sink(memory.clone())
        .sink(counter.clone())
        .build()
        .expect("session builds");
    let context = |i: u64| format!("i={i};pad={}", "x".repeat((i * 7 % 300) as usize));
    let id = |i: u64| format!("req-{i}-{}", "é".repeat((i % 50) as usize));
    let reason = |i: u64| "R".repeat((i % 70) as usize + 1);
    let extra = |i: u64| format!("n={i};{}", "y".repeat((i * 3 % 150) as usize));
    let (cpu, requests) = (session.cpu_timing(), session.requests());
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    for i in 0..EVENTS {
        cpu.record(CpuOp::BATCH_PREPARATION, Duration::from_nanos(i), &context(i));
        requests.evicted(&id(i), &reason(i), &extra(i));
        if (i + 1) % BURST == 0 {
            // Let the collector empty the buffer before the next burst (a liveness bound only).
            while counter.0.load(std::sync::atomic::Ordering::SeqCst) < i + 1 {
                assert!(std::time::Instant::now() < deadline, "the collector stopped draining");
                std::thread::yield_now();
            }
        }
    }
    let manifest = session.shutdown().expect("clean shutdown");
    assert_eq!(manifest.total_dropped(), 0);
    let rows = memory.rows();
    assert_eq!(rows.cpu_operations.len() as u64, EVENTS);
    for (i, r) in (0..EVENTS).zip(&rows.cpu_operations) {
        assert_eq!((&r.context, r.duration_ns), (&context(i), i), "cpu event {i}");
    }
    assert_eq!(rows.preemption_events.len() as u64, EVENTS);
    for (i, r) in (0..EVENTS).zip(&rows.preemption_events) {
        assert_eq!((&r.request_id, &r.reason, &r.extra_info), (&id(i), &reason(i), &extra(i)), "event {i}");
    }
    assert_eq!(rows.request_lifecycle.len() as u64, EVENTS);
}

#[test]
fn a_cpu_operation_of_another_session_is_dropped_and_counted() {
    // Ids are per session: one registered elsewhere names nothing here. The event must not
    // vanish silently: it is dropped and counted.
    let other = Session::builder().in_memory_only().build().expect("session builds");
    other.register_cpu_operation("first").expect("register");
    let foreign = other.register_cpu_operation("second").expect("register");
    other.shutdown().expect("clean shutdown");
    // A disabled session hands out an id for any name, too.
    let from_disabled = Session::disabled().register_cpu_operation("detokenize").expect("register");

    let memory = MemorySink::new();
    let session = Session::builder().in_memory_only().sink(memory.clone()).build().expect("session builds");
    let cpu = session.cpu_timing();
    cpu.record(foreign, Duration::from_micros(5), "");
    cpu.record(from_disabled, Duration::from_micros(5), "k=v");
    cpu.time(foreign, || ());
    cpu.record(CpuOp::SAMPLING, Duration::from_micros(5), "");
    let manifest = session.shutdown().expect("clean shutdown");
    let rows = memory.rows();
    assert_eq!(rows.cpu_operations.len(), 1);
    assert_eq!(&*rows.cpu_operations[0].operation, "sampling");
    assert_drops(&manifest, &[("cpu_timing", "invalid_value", 3)]);
    let summary = memory.summaries().expect("summaries").cpu_timing.expect("cpu summary");
    assert_eq!(summary.keys().collect::<Vec<_>>(), ["sampling"]);
}

// ---------------------------------------------------------------------------------------------
// A device timing backend that is slow, fails, or runs out of marks

/// Marks are numbered 0, 1, 2, ... in the order regions start. Mark n: none at all when
/// n % 7 == 6 (an exhausted event pool); otherwise "not yet" at the first poll, then a driver
/// error when n % 5 == 4, else a duration of (n + 1) µs.
#[derive(Default)]
struct FakeDevice {
    next: std::sync::atomic::AtomicU64,
    polled: std::sync::Mutex<std::collections::HashSet<u64>>,
}

impl profilemate::TimingBackend for FakeDevice {
    fn name(&self) -> &str {
        "fake-device"
    }
    fn start(&self) -> Option<profilemate::Mark> {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        (n % 7 != 6).then_some(profilemate::Mark(n))
    }
    fn stop(&self, start: profilemate::Mark) -> Option<profilemate::Mark> {
        Some(profilemate::Mark(start.0 + 1_000_000))
    }
    fn poll(&self, start: profilemate::Mark, _end: profilemate::Mark) -> profilemate::Resolution {
        if self.polled.lock().expect("lock").insert(start.0) {
            return profilemate::Resolution::Pending;
        }
        if start.0 % 5 == 4 {
            profilemate::Resolution::Failed("device error".into())
        } else {
            profilemate::Resolution::Ready(Duration::from_micros(start.0 + 1))
        }
    }
}

#[test]
fn device_timing_failures_are_dropped_and_counted_and_device_times_are_used() {
    let memory = MemorySink::new();
    let session = Session::builder()
        .in_memory_only()
        .flush_interval(Duration::from_millis(1))
        .timing_backend(std::sync::Arc::new(FakeDevice::default()))
        .sink(memory.clone())
        .build()
        .expect("session builds");
    let (forward, components, cpu) = (session.forward_pass(), session.components(), session.cpu_timing());
    for n in 0..30u32 {
        forward.start(Phase::Decode, 1, n).stop();
        // Host-timed, in between: unaffected by the device.
        cpu.time(CpuOp::SAMPLING, || ());
    }
    for _ in 30..45 {
        components.start(Component::Decoder, "language_model").stop();
    }
    let manifest = session.shutdown().expect("clean shutdown");
    assert_eq!(manifest.timing_backend, "fake-device");
    let ok = |range: std::ops::Range<u64>| range.filter(|n| n % 7 != 6 && n % 5 != 4).collect::<Vec<u64>>();
    let rows = memory.rows();
    let forward_rows: Vec<(u32, u64)> = rows.forward_pass.iter().map(|r| (r.num_tokens, r.forward_time_ns)).collect();
    let want: Vec<(u32, u64)> = ok(0..30).into_iter().map(|n| (n as u32, (n + 1) * 1000)).collect();
    assert_eq!(forward_rows, want, "the device's times, in order");
    let component_times: Vec<u64> = rows.encoder_decoder.iter().map(|r| r.duration_ns).collect();
    assert_eq!(component_times, ok(30..45).into_iter().map(|n| (n + 1) * 1000).collect::<Vec<_>>());
    assert_eq!(rows.cpu_operations.len(), 30);
    // No mark: 6, 13, 20, 27 and 34, 41. Driver error: 4, 9, 14, 19, 24, 29 and 39, 44.
    assert_drops(&manifest, &[("forward_pass", "timing", 10), ("encoder_decoder", "timing", 4)]);
}
