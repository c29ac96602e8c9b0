//! The trace files: valid JSON in the Chrome Trace Event Format with the fields each event kind
//! needs, one named track per thread, complete events that nest on their track, rolling files.
#![allow(clippy::unwrap_used)]

mod common;

use profilemate_core::{CpuOp, LifecycleEvent, Phase, Rows, Session, Sink, SinkKind};
use profilemate_sinks::{trace_file_name, PerfettoSink};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

fn read(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    let value: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    value.as_array().expect("a JSON array").clone()
}

/// Nanoseconds from a `ts` or `dur` in microseconds with 3 decimals.
fn ns(v: &Value) -> u64 {
    (v.as_f64().expect("a number") * 1000.0).round() as u64
}

/// Checks one trace file and returns its events by phase.
fn check_file(events: &[Value]) -> BTreeMap<String, Vec<Value>> {
    let mut by_phase: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for e in events {
        let ph = e["ph"].as_str().unwrap_or_else(|| panic!("no ph: {e}"));
        assert!(e["pid"].is_u64(), "pid: {e}");
        match ph {
            "X" => {
                assert!(e["name"].is_string() && e["cat"].is_string() && e["tid"].is_u64(), "{e}");
                assert!(e["ts"].is_number() && e["dur"].is_number() && e["args"].is_object(), "{e}");
            }
            "i" => {
                assert!(e["name"].is_string() && e["tid"].is_u64() && e["ts"].is_number(), "{e}");
                assert_eq!(e["s"], "t", "{e}");
                assert!(e["args"]["request_id"].is_string(), "{e}");
            }
            "C" => {
                assert!(e["name"].is_string() && e["ts"].is_number(), "{e}");
                let args = e["args"].as_object().unwrap();
                assert!(!args.is_empty() && args.values().all(Value::is_number), "{e}");
            }
            "M" => {
                assert!(e["tid"].is_u64(), "{e}");
                match e["name"].as_str().unwrap() {
                    "process_name" | "thread_name" => assert!(e["args"]["name"].is_string(), "{e}"),
                    "thread_sort_index" => assert!(e["args"]["sort_index"].is_u64(), "{e}"),
                    other => panic!("unexpected metadata {other}"),
                }
            }
            other => panic!("unexpected phase {other}: {e}"),
        }
        by_phase.entry(ph.to_string()).or_default().push(e.clone());
    }
    // One process name; one name per thread track, distinct names; every track used is named.
    let meta = by_phase.get("M").cloned().unwrap_or_default();
    assert_eq!(meta.iter().filter(|m| m["name"] == "process_name").count(), 1);
    let mut names = BTreeMap::new();
    for m in meta.iter().filter(|m| m["name"] == "thread_name") {
        let previous = names.insert(m["tid"].as_u64().unwrap(), m["args"]["name"].as_str().unwrap().to_string());
        assert!(previous.is_none(), "tid {} named twice", m["tid"]);
    }
    assert_eq!(names.values().collect::<BTreeSet<_>>().len(), names.len(), "track names are distinct: {names:?}");
    for e in by_phase.get("X").into_iter().chain(by_phase.get("i")).flatten() {
        assert!(names.contains_key(&e["tid"].as_u64().unwrap()), "unnamed track: {e}");
    }
    // On each track, complete events nest or follow each other.
    let mut tracks: BTreeMap<u64, Vec<(u64, u64)>> = BTreeMap::new();
    for e in by_phase.get("X").into_iter().flatten() {
        let (ts, dur) = (ns(&e["ts"]), ns(&e["dur"]));
        tracks.entry(e["tid"].as_u64().unwrap()).or_default().push((ts, ts + dur));
    }
    for (tid, mut spans) in tracks {
        spans.sort_by_key(|&(s, e)| (s, std::cmp::Reverse(e)));
        let mut open: Vec<u64> = Vec::new();
        for (s, e) in spans {
            while open.last().is_some_and(|&end| end <= s) {
                open.pop();
            }
            if let Some(&end) = open.last() {
                assert!(e <= end, "track {} ({tid}): [{s}, {e}) overlaps an event ending at {end}", names[&tid]);
            }
            open.push(e);
        }
    }
    by_phase
}

fn names_of(events: &BTreeMap<String, Vec<Value>>, ph: &str, cat: &str) -> Vec<String> {
    events
        .get(ph)
        .into_iter()
        .flatten()
        .filter(|e| e["cat"] == cat)
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn every_kind_of_event_is_in_the_trace_with_its_fields() {
    let dir = tempfile::tempdir().unwrap();
    let mut sink = PerfettoSink::create(dir.path()).unwrap();
    let batches: Vec<Rows> = (0..3).map(common::rows).collect();
    for rows in &batches {
        sink.write_rows(rows).unwrap();
        sink.flush().unwrap();
    }
    sink.finish(&common::manifest()).unwrap();
    assert_eq!(sink.files(), [dir.path().join("profilemate_trace.json")]);
    let events = check_file(&read(&dir.path().join("profilemate_trace.json")));

    let count = |f: fn(&Rows) -> usize| batches.iter().map(f).sum::<usize>();
    assert_eq!(names_of(&events, "X", "forward_pass").len(), count(|r| r.forward_pass.len()));
    assert_eq!(names_of(&events, "X", "cpu_operation").len(), count(|r| r.cpu_operations.len()));
    assert_eq!(names_of(&events, "X", "encoder_decoder").len(), count(|r| r.encoder_decoder.len()));
    assert_eq!(names_of(&events, "X", "cuda_graph"), ["capture"; 3]);
    let instants = names_of(&events, "i", "request");
    let expected = count(|r| {
        r.preemption_events
            .iter()
            .filter(|e| {
                matches!(e.event, LifecycleEvent::Preempted | LifecycleEvent::Resumed | LifecycleEvent::Evicted)
            })
            .count()
    });
    assert_eq!(instants.len(), expected);

    let x = &events["X"];
    let prefill = x.iter().find(|e| e["name"] == "prefill").unwrap();
    assert_eq!(prefill["ts"].as_f64(), Some(0.499));
    assert_eq!(prefill["dur"].as_f64(), Some(12000.345));
    assert_eq!(prefill["args"]["batch_size"], 1);
    assert_eq!(prefill["args"]["num_tokens"], 512);
    let decode = x.iter().find(|e| e["name"] == "decode").unwrap();
    assert!(decode["args"].get("throughput_tokens_per_sec").is_none(), "no throughput for a zero duration");
    let prep = x.iter().find(|e| e["name"] == "batch_preparation").unwrap();
    assert_eq!(prep["args"]["context"], "text, with \"quotes\"\nand a newline;ünïcode");

    let preempted = events["i"].iter().find(|e| e["name"] == "preempted").unwrap();
    assert_eq!(preempted["args"]["request_id"], "req-0,\"x\"");
    assert_eq!(preempted["args"]["reason"], "RECOMPUTE");
    assert_eq!(preempted["args"]["running_time_sec"].as_f64(), Some(0.009001));

    let counters: BTreeSet<String> = events["C"]
        .iter()
        .flat_map(|e| {
            e["args"].as_object().unwrap().keys().map(move |k| format!("{} {k}", e["name"].as_str().unwrap()))
        })
        .collect();
    let expected: BTreeSet<String> = [
        "queue running",
        "queue waiting",
        "batch token_utilization_pct",
        "batch seq_utilization_pct",
        "kv_cache usage_pct",
        "kv_cache used_blocks",
    ]
    .map(String::from)
    .into();
    assert_eq!(counters, expected);
    let batch = events["C"].iter().find(|e| e["name"] == "batch").unwrap();
    assert_eq!(batch["args"]["token_utilization_pct"].as_f64(), Some(33.3333));

    // `detokenize` overlaps `model_execution` without nesting: it is on a second CPU track.
    let tracks: BTreeMap<u64, String> = events["M"]
        .iter()
        .filter(|m| m["name"] == "thread_name")
        .map(|m| (m["tid"].as_u64().unwrap(), m["args"]["name"].as_str().unwrap().to_string()))
        .collect();
    let track_of = |name: &str| tracks[&x.iter().find(|e| e["name"] == name).unwrap()["tid"].as_u64().unwrap()].clone();
    assert_eq!(track_of("model_execution"), "cpu_operations");
    assert_eq!(track_of("batch_preparation"), "cpu_operations");
    assert_eq!(track_of("detokenize"), "cpu_operations 2");
    assert_eq!(track_of("prefill"), "forward_pass");
    assert_eq!(track_of("encoder"), "encoder_decoder");
    assert_eq!(
        tracks.values().cloned().collect::<BTreeSet<_>>(),
        ["forward_pass", "cpu_operations", "cpu_operations 2", "encoder_decoder", "cuda_graph", "requests"]
            .map(String::from)
            .into()
    );
}

#[test]
fn long_runs_roll_over_to_numbered_files_that_each_open_on_their_own() {
    let dir = tempfile::tempdir().unwrap();
    // Files of an earlier, longer run are removed.
    for i in 0..6 {
        std::fs::write(dir.path().join(trace_file_name(i)), b"stale").unwrap();
    }
    let mut sink = PerfettoSink::create(dir.path()).unwrap().with_max_events_per_file(7);
    let mut total = 0;
    for b in 0..3 {
        let rows = common::rows(b);
        sink.write_rows(&rows).unwrap();
    }
    sink.finish(&common::manifest()).unwrap();
    let files = sink.files();
    assert!(files.len() > 5, "{files:?}");
    for (i, file) in files.iter().enumerate() {
        assert_eq!(file, &dir.path().join(trace_file_name(i)));
        let events = check_file(&read(file));
        let n: usize = events.iter().filter(|(ph, _)| *ph != "M").map(|(_, v)| v.len()).sum();
        assert!((1..=7).contains(&n), "{}: {n} events", file.display());
        total += n;
    }
    assert!(!dir.path().join(trace_file_name(files.len())).exists(), "stale files are gone");
    // Every event is in exactly one file.
    let one_file = tempfile::tempdir().unwrap();
    let mut sink = PerfettoSink::create(one_file.path()).unwrap();
    for b in 0..3 {
        sink.write_rows(&common::rows(b)).unwrap();
    }
    sink.finish(&common::manifest()).unwrap();
    let events = check_file(&read(&one_file.path().join("profilemate_trace.json")));
    assert_eq!(total, events.iter().filter(|(ph, _)| *ph != "M").map(|(_, v)| v.len()).sum::<usize>());
}

#[test]
fn a_trace_cut_short_before_its_closing_bracket_still_reads() {
    let dir = tempfile::tempdir().unwrap();
    let mut sink = PerfettoSink::create(dir.path()).unwrap();
    sink.write_rows(&common::rows(0)).unwrap();
    sink.flush().unwrap();
    // As a killed process leaves it: no closing bracket. Perfetto accepts that (the JSON Array
    // Format allows it); a strict JSON parser needs the bracket added.
    let text = std::fs::read_to_string(dir.path().join("profilemate_trace.json")).unwrap();
    assert!(text.starts_with("[\n") && !text.trim_end().ends_with(']'));
    let events: Vec<Value> = serde_json::from_str(&format!("{text}\n]")).unwrap();
    check_file(&events);
    drop(sink);
}

#[test]
fn a_session_traces_what_its_tables_hold() {
    let dir = tempfile::tempdir().unwrap();
    let session = Session::builder()
        .dir(dir.path())
        .sinks(&[SinkKind::Csv, SinkKind::Perfetto])
        .sink_factory(profilemate_sinks::standard_sinks)
        .build()
        .unwrap();
    let (forward, cpu, components) = (session.forward_pass(), session.cpu_timing(), session.components());
    let threads: Vec<_> = (0..3)
        .map(|t| {
            let (forward, cpu, components) = (forward.clone(), cpu.clone(), components.clone());
            std::thread::spawn(move || {
                for step in 0..300u32 {
                    let _outer = cpu.start(CpuOp::MODEL_EXECUTION);
                    cpu.time(CpuOp::SCHEDULING, || std::hint::black_box(step));
                    let pass = forward.start(if step == 0 { Phase::Prefill } else { Phase::Decode }, t + 1, step + 1);
                    components.start(profilemate_core::Component::Decoder, "language_model").stop();
                    pass.stop();
                }
            })
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().unwrap());
    let manifest = session.shutdown().unwrap();
    let events = check_file(&read(&dir.path().join("profilemate_trace.json")));
    let rows = |file: &str| manifest.rows.get(file).copied().unwrap_or(0) as usize;
    assert_eq!(names_of(&events, "X", "forward_pass").len(), rows("forward_pass_timing.csv"));
    assert_eq!(names_of(&events, "X", "cpu_operation").len(), rows("cpu_operations_timing.csv"));
    assert_eq!(names_of(&events, "X", "encoder_decoder").len(), rows("encoder_decoder_timing.csv"));
    assert_eq!(rows("cpu_operations_timing.csv"), 1800);
}

/// A process killed at any instant (the sink never dropped, flushed or finished) leaves a trace
/// of whole events only: with `]` appended it is valid JSON, and every event in it is complete.
#[test]
fn a_killed_process_leaves_whole_events_only() {
    let dir = tempfile::tempdir().unwrap();
    let mut sink = PerfettoSink::create(dir.path()).unwrap();
    let path = dir.path().join(trace_file_name(0));
    let mut checked = 0;
    for b in 0..400u64 {
        // Context text of varying length so that events straddle every buffer boundary.
        let mut rows = common::rows(b);
        for r in &mut rows.cpu_operations {
            r.context = format!("step={b};note=\"{}\"", "x".repeat((b % 97) as usize));
        }
        sink.write_rows(&rows).unwrap();
        if b % 8 != 7 {
            continue;
        }
        // The file as a kill at this instant would leave it.
        let text = std::fs::read_to_string(&path).unwrap();
        if text.len() > 2 {
            let closed = format!("{}\n]", text.trim_end_matches(['\n', ',']));
            let value: Value = serde_json::from_str(&closed).unwrap_or_else(|e| {
                panic!("after batch {b}, {} bytes: {e}: ...{}", text.len(), &text[text.len().saturating_sub(200)..])
            });
            check_file(value.as_array().unwrap());
            checked += 1;
        }
    }
    assert!(checked > 5, "the trace reached the file during the run ({checked} looks)");
    std::mem::forget(sink);
}
