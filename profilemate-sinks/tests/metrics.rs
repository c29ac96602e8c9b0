//! `MetricsSink` against `metrics-util`'s debugging recorder: names, units, help, labels, values.
#![cfg(feature = "metrics")]

use metrics::Unit;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use metrics_util::MetricKind;
use profilemate_core::{
    BatchUtilizationRow, Component, ComponentRow, CpuOperationRow, CudaGraphRow, ForwardPassRow, GraphEvent,
    KvCacheRow, LifecycleEvent, MemorySink, MoeExpertSummary, Phase, PreemptionEventRow, Rows, Session, Sink,
    Summaries,
};
use profilemate_sinks::{MetricsSink, SeriesKind, MAX_LABEL_VALUES, METRICS_SERIES, OTHER_LABEL};
use std::collections::BTreeMap;

/// One recorded series: kind, name, labels (sorted), unit, help, value.
#[derive(Debug)]
struct Series {
    kind: MetricKind,
    name: String,
    labels: Vec<(String, String)>,
    unit: Option<Unit>,
    help: Option<String>,
    value: DebugValue,
}

fn snapshot(recorder: &DebuggingRecorder) -> Vec<Series> {
    recorder
        .snapshotter()
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(ck, unit, help, value)| {
            let mut labels: Vec<(String, String)> =
                ck.key().labels().map(|l| (l.key().to_string(), l.value().to_string())).collect();
            labels.sort();
            Series {
                kind: ck.kind(),
                name: ck.key().name().to_string(),
                labels,
                unit,
                help: help.map(|h| h.to_string()),
                value,
            }
        })
        .collect()
}

fn find<'a>(all: &'a [Series], name: &str, labels: &[(&str, &str)]) -> &'a Series {
    let mut want: Vec<(String, String)> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    want.sort();
    all.iter().find(|s| s.name == name && s.labels == want).unwrap_or_else(|| {
        panic!("no series {name}{labels:?} among {:?}", all.iter().map(|s| &s.name).collect::<Vec<_>>())
    })
}

fn counter(all: &[Series], name: &str, labels: &[(&str, &str)]) -> u64 {
    match find(all, name, labels).value {
        DebugValue::Counter(n) => n,
        ref other => panic!("{name} is not a counter: {other:?}"),
    }
}

fn gauge(all: &[Series], name: &str) -> f64 {
    match find(all, name, &[]).value {
        DebugValue::Gauge(v) => v.into_inner(),
        ref other => panic!("{name} is not a gauge: {other:?}"),
    }
}

fn histogram(all: &[Series], name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
    match &find(all, name, labels).value {
        DebugValue::Histogram(v) => v.iter().map(|x| x.into_inner()).collect(),
        other => panic!("{name} is not a histogram: {other:?}"),
    }
}

fn forward(phase: Phase, tokens: u32, ns: u64) -> ForwardPassRow {
    ForwardPassRow { timestamp_ns: 0, phase, batch_size: 4, num_tokens: tokens, forward_time_ns: ns, step: None }
}

fn cpu(op: &str, start: u64, ns: u64) -> CpuOperationRow {
    CpuOperationRow { timestamp_ns: start, operation: op.into(), duration_ns: ns, context: String::new(), step: None }
}

fn lifecycle(id: &str, event: LifecycleEvent, reason: &str) -> PreemptionEventRow {
    PreemptionEventRow {
        timestamp_ns: 0,
        request_id: id.into(),
        event,
        reason: reason.into(),
        running_time_ns: None,
        extra_info: String::new(),
        step: None,
    }
}

fn sample_rows() -> Rows {
    let forward_pass = vec![
        forward(Phase::Prefill, 512, 4_000_000),
        forward(Phase::Decode, 8, 1_000_000),
        forward(Phase::Decode, 8, 1_500_000),
        forward(Phase::Mixed, 100, 2_000_000),
    ];
    let cpu_operations = vec![
        cpu("scheduling", 1_000, 100),
        cpu("batch_preparation", 1_100, 200),
        cpu("model_execution", 1_300, 5_000),
        cpu("sampling", 6_300, 700),
        cpu("scheduling", 10_000, 100),
        cpu("detokenize", 10_100, 50),
    ];
    let encoder_decoder = vec![ComponentRow {
        timestamp_ns: 0,
        component: Component::Encoder,
        duration_ns: 3_000_000,
        context: "vision_encoder".into(),
        step: None,
    }];
    let preemption_events = vec![
        lifecycle("req-1", LifecycleEvent::Started, ""),
        lifecycle("req-1", LifecycleEvent::Preempted, "RECOMPUTE"),
        lifecycle("req-1", LifecycleEvent::Resumed, ""),
        lifecycle("req-2", LifecycleEvent::Started, ""),
        lifecycle("req-2", LifecycleEvent::Preempted, "RECOMPUTE"),
        lifecycle("req-2", LifecycleEvent::Preempted, ""),
        lifecycle("req-1", LifecycleEvent::Finished, ""),
        lifecycle("req-2", LifecycleEvent::Evicted, "kv_cache_full"),
    ];
    let batch = |num_seqs, num_tokens, running, waiting| BatchUtilizationRow {
        timestamp_ns: 0,
        num_seqs,
        max_num_seqs: 32,
        seq_utilization_pct: Some(f64::from(num_seqs) / 32.0 * 100.0),
        num_tokens,
        max_tokens: 512,
        token_utilization_pct: Some(f64::from(num_tokens) / 512.0 * 100.0),
        phase: Phase::Decode,
        running_queue_len: running,
        waiting_queue_len: waiting,
        step: None,
    };
    let batch_utilization = vec![batch(4, 400, 4, 9), batch(8, 128, 8, 3)];
    let kv_cache = vec![
        KvCacheRow {
            timestamp_ns: 0,
            used_blocks: 10,
            total_blocks: 100,
            prefix_cache_queries: 5,
            prefix_cache_hits: 2,
            step: None,
        },
        KvCacheRow {
            timestamp_ns: 0,
            used_blocks: 25,
            total_blocks: 100,
            prefix_cache_queries: 7,
            prefix_cache_hits: 7,
            step: None,
        },
    ];
    let cuda_graph = vec![
        CudaGraphRow {
            timestamp_ns: 0,
            event: GraphEvent::Capture,
            batch_size: 8,
            padded_batch_size: None,
            duration_ns: Some(9),
            step: None,
        },
        CudaGraphRow {
            timestamp_ns: 0,
            event: GraphEvent::Replay,
            batch_size: 6,
            padded_batch_size: Some(8),
            duration_ns: None,
            step: None,
        },
        CudaGraphRow {
            timestamp_ns: 0,
            event: GraphEvent::Replay,
            batch_size: 8,
            padded_batch_size: Some(8),
            duration_ns: None,
            step: None,
        },
        CudaGraphRow {
            timestamp_ns: 0,
            event: GraphEvent::Eager,
            batch_size: 40,
            padded_batch_size: None,
            duration_ns: None,
            step: None,
        },
    ];
    Rows {
        forward_pass,
        cpu_operations,
        encoder_decoder,
        preemption_events,
        batch_utilization,
        kv_cache,
        cuda_graph,
        ..Default::default()
    }
}

#[test]
fn rows_become_the_documented_series_with_their_values() {
    let recorder = DebuggingRecorder::new();
    metrics::with_local_recorder(&recorder, || {
        let mut sink = MetricsSink::new();
        sink.write_rows(&sample_rows()).unwrap();
        let summaries = Summaries {
            moe_expert: Some(MoeExpertSummary { max_over_mean: 2.5, records: 3, ..Default::default() }),
            ..Default::default()
        };
        sink.write_summaries(&summaries).unwrap();
    });
    let all = snapshot(&recorder);

    let fwd = "profilemate_forward_pass_duration_seconds";
    assert_eq!(histogram(&all, fwd, &[("phase", "prefill")]), [0.004]);
    assert_eq!(histogram(&all, fwd, &[("phase", "decode")]), [0.001, 0.0015]);
    assert_eq!(histogram(&all, fwd, &[("phase", "mixed")]), [0.002]);
    assert_eq!(counter(&all, "profilemate_steps_total", &[("phase", "decode")]), 2);
    assert_eq!(counter(&all, "profilemate_steps_total", &[("phase", "prefill")]), 1);
    assert_eq!(counter(&all, "profilemate_tokens_total", &[("phase", "prefill")]), 512);
    assert_eq!(counter(&all, "profilemate_tokens_total", &[("phase", "decode")]), 16);

    let op = "profilemate_cpu_operation_duration_seconds";
    assert_eq!(histogram(&all, op, &[("operation", "scheduling")]), [1e-7, 1e-7]);
    assert_eq!(histogram(&all, op, &[("operation", "model_execution")]), [5e-6]);
    assert_eq!(histogram(&all, op, &[("operation", "detokenize")]), [5e-8]);
    // The first step closed when the second scheduling began: 1000 ns .. 7000 ns. The second
    // is still open (it closes at the next scheduling or at shutdown).
    assert_eq!(histogram(&all, "profilemate_step_duration_seconds", &[]), [6e-6]);
    assert_eq!(histogram(&all, "profilemate_component_duration_seconds", &[("component", "encoder")]), [0.003]);

    let pre = "profilemate_preemptions_total";
    assert_eq!(counter(&all, pre, &[("reason", "RECOMPUTE")]), 2);
    assert_eq!(counter(&all, pre, &[("reason", "unspecified")]), 1);
    assert!(
        all.iter().all(|s| !(s.name == pre && s.labels.iter().any(|(_, v)| v == "kv_cache_full"))),
        "an eviction is not a preemption"
    );
    let ev = "profilemate_request_events_total";
    for (event, n) in [("started", 2), ("preempted", 3), ("resumed", 1), ("finished", 1), ("evicted", 1)] {
        assert_eq!(counter(&all, ev, &[("event", event)]), n, "{event}");
    }

    // Gauges hold the latest sample.
    assert_eq!(gauge(&all, "profilemate_batch_sequence_utilization_ratio"), 0.25);
    assert_eq!(gauge(&all, "profilemate_batch_token_utilization_ratio"), 0.25);
    assert_eq!(gauge(&all, "profilemate_running_requests"), 8.0);
    assert_eq!(gauge(&all, "profilemate_waiting_requests"), 3.0);
    assert_eq!(gauge(&all, "profilemate_kv_cache_usage_ratio"), 0.25);
    assert_eq!(gauge(&all, "profilemate_kv_cache_used_blocks"), 25.0);
    assert_eq!(gauge(&all, "profilemate_moe_load_imbalance_ratio"), 2.5);
    assert_eq!(counter(&all, "profilemate_prefix_cache_queries_total", &[]), 12);
    assert_eq!(counter(&all, "profilemate_prefix_cache_hits_total", &[]), 9);
    assert_eq!(counter(&all, "profilemate_cuda_graph_captures_total", &[]), 1);
    assert_eq!(counter(&all, "profilemate_cuda_graph_replays_total", &[]), 2);
    assert_eq!(counter(&all, "profilemate_eager_steps_total", &[]), 1);
}

#[test]
fn every_series_is_described_with_its_unit_and_help_and_only_its_labels() {
    let recorder = DebuggingRecorder::new();
    metrics::with_local_recorder(&recorder, || {
        let mut sink = MetricsSink::new();
        sink.write_rows(&sample_rows()).unwrap();
        let memory = MemorySink::new();
        let session = Session::builder().in_memory_only().sink(memory).build().unwrap();
        let mut manifest = session.shutdown().unwrap();
        manifest.dropped.entry("forward_pass".into()).or_default().insert("buffer_full".into(), 7);
        sink.write_manifest(&manifest).unwrap();
        sink.finish(&manifest).unwrap();
    });
    let all = snapshot(&recorder);
    for info in METRICS_SERIES {
        let kind = match info.kind {
            SeriesKind::Counter => MetricKind::Counter,
            SeriesKind::Gauge => MetricKind::Gauge,
            SeriesKind::Histogram => MetricKind::Histogram,
        };
        let recorded: Vec<&Series> = all.iter().filter(|s| s.name == info.name).collect();
        assert!(!recorded.is_empty(), "{} was not registered", info.name);
        for s in recorded {
            assert_eq!(s.kind, kind, "{}", info.name);
            assert_eq!(s.unit, info.unit, "{}", info.name);
            assert_eq!(s.help.as_deref(), Some(info.help), "{}", info.name);
            let mut names: Vec<&str> = s.labels.iter().map(|(k, _)| k.as_str()).collect();
            names.sort_unstable();
            let mut want = info.labels.to_vec();
            want.sort_unstable();
            assert_eq!(names, want, "{} labels", info.name);
        }
        // Prometheus conventions.
        assert!(info.name.starts_with("profilemate_"), "{}", info.name);
        assert_eq!(info.kind == SeriesKind::Counter, info.name.ends_with("_total"), "{}", info.name);
        if info.unit == Some(Unit::Seconds) {
            assert!(info.name.ends_with("_seconds"), "{}", info.name);
        }
        if info.name.ends_with("_ratio") {
            assert_eq!(info.unit, None, "{}", info.name);
        }
    }
    assert!(all.iter().all(|s| METRICS_SERIES.iter().any(|i| i.name == s.name)), "an undocumented series");
    assert!(all.iter().all(|s| s.labels.iter().all(|(_, v)| !v.starts_with("req-"))), "a request id became a label");
    // Drops come from the manifest, per profiler and reason; every reason is present (0 when none).
    let dropped = "profilemate_events_dropped_total";
    assert_eq!(counter(&all, dropped, &[("profiler", "forward_pass"), ("reason", "buffer_full")]), 7);
    assert!(all.iter().filter(|s| s.name == dropped).count() > 1);
    // Shutdown closes the open step: the second one, 10000 .. 10150 ns.
    assert_eq!(histogram(&all, "profilemate_step_duration_seconds", &[]), [6e-6, 1.5e-7]);
}

#[test]
fn free_text_labels_are_capped() {
    let recorder = DebuggingRecorder::new();
    let n = MAX_LABEL_VALUES + 10;
    metrics::with_local_recorder(&recorder, || {
        let mut sink = MetricsSink::new();
        let mut rows = Rows::default();
        for i in 0..n {
            rows.preemption_events.push(lifecycle("r", LifecycleEvent::Preempted, &format!("reason_{i}")));
        }
        sink.write_rows(&rows).unwrap();
    });
    let all = snapshot(&recorder);
    let reasons: BTreeMap<String, u64> = all
        .iter()
        .filter(|s| s.name == "profilemate_preemptions_total")
        .map(|s| match s.value {
            DebugValue::Counter(c) => (s.labels[0].1.clone(), c),
            _ => unreachable!("a counter"),
        })
        .collect();
    assert_eq!(reasons.len(), MAX_LABEL_VALUES + 1);
    assert_eq!(reasons[OTHER_LABEL], 10);
    assert_eq!(reasons.values().sum::<u64>(), n as u64, "nothing is lost past the cap");
}

#[test]
fn the_readme_table_documents_every_series_and_no_other() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).expect("the workspace README");
    let documented: Vec<&str> = readme
        .lines()
        .filter_map(|l| l.strip_prefix("| `profilemate_"))
        .filter_map(|rest| rest.split_once('`').map(|(name, _)| name))
        .collect();
    let mut want: Vec<String> =
        METRICS_SERIES.iter().map(|s| s.name.trim_start_matches("profilemate_").to_string()).collect();
    let mut got: Vec<String> = documented.iter().map(|s| s.to_string()).collect();
    want.sort();
    got.sort();
    assert_eq!(got, want);
    for s in METRICS_SERIES {
        let row = readme.lines().find(|l| l.starts_with(&format!("| `{}` |", s.name))).expect("a row");
        let kind = match s.kind {
            SeriesKind::Counter => "counter",
            SeriesKind::Gauge => "gauge",
            SeriesKind::Histogram => "histogram",
        };
        assert!(row.contains(&format!("| {kind} |")), "{row}");
        for label in s.labels {
            assert!(row.contains(&format!("`{label}`")), "{row} lacks the label {label}");
        }
    }
}
