//! `profilemate recover`: the files of a killed run completed, idempotently.
#![allow(clippy::unwrap_used)]

use profilemate_core::{CpuOp, Phase, Session, SinkKind};
use std::path::Path;
use std::time::Duration;

fn copy_dir(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).unwrap().flatten() {
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

fn csv_rows(path: &Path) -> usize {
    let mut reader = csv::Reader::from_path(path).unwrap();
    let mut n = 0;
    for r in reader.records() {
        r.expect("every line parses");
        n += 1;
    }
    n
}

/// The directory as a process killed mid-run leaves it (copied while the session runs, a torn
/// last line added), recovered: whole rows only, a trace that parses, summaries equal to the
/// rows, the manifest saying what happened; a second recovery changes nothing.
#[test]
fn a_killed_run_is_completed_and_recovery_is_idempotent() {
    let live = tempfile::tempdir().unwrap();
    let session = Session::builder()
        .dir(live.path())
        .sinks(&[SinkKind::Csv, SinkKind::Json, SinkKind::Perfetto])
        .sink_factory(profilemate_sinks::standard_sinks)
        .build()
        .unwrap();
    let (forward, cpu, requests) = (session.forward_pass(), session.cpu_timing(), session.requests());
    for step in 0..300u32 {
        cpu.record(CpuOp::SCHEDULING, Duration::from_micros(50 + u64::from(step % 7)), "");
        forward.record(Phase::Decode, 4, 4 + step % 3, Duration::from_micros(900 + u64::from(step)));
        if step % 50 == 0 {
            requests.started(&format!("req-{step}"));
        }
    }
    session.flush().unwrap();
    let killed = tempfile::tempdir().unwrap();
    copy_dir(live.path(), killed.path());
    drop(session);
    let dir = killed.path();
    let fwd = dir.join("forward_pass_timing.csv");
    let whole = csv_rows(&fwd);
    assert_eq!(whole, 300);
    // A write cut short by the kill.
    let mut text = std::fs::read(&fwd).unwrap();
    text.extend_from_slice(b"0.912345,dec");
    std::fs::write(&fwd, &text).unwrap();
    let trace = std::fs::read_to_string(dir.join("profilemate_trace.json")).unwrap();
    assert!(!trace.trim_end().ends_with(']'), "an unfinished trace is not closed");
    // The step timeline: whole rows (each forward pass opened a step; the collector writes a
    // step once two later ones began) and a summary older than the rows.
    let timeline = dir.join("step_timeline.csv");
    let timeline_rows = csv_rows(&timeline);
    assert!((290..300).contains(&timeline_rows), "{timeline_rows} timeline rows");
    let mut text = std::fs::read(&timeline).unwrap();
    text.extend_from_slice(b"299,0.31");
    std::fs::write(&timeline, &text).unwrap();
    std::fs::write(dir.join("step_timeline_summary.json"), r#"{"steps": 5, "late_rows": 0}"#).unwrap();

    let r = profilemate_cli::recover(dir).unwrap();
    assert!(r.needed);
    assert_eq!(r.torn_bytes_dropped.get("forward_pass_timing.csv"), Some(&12));
    assert_eq!(r.traces_closed, ["profilemate_trace.json"]);
    assert_eq!(csv_rows(&fwd), whole);
    let trace: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("profilemate_trace.json")).unwrap()).unwrap();
    assert!(trace.as_array().unwrap().iter().filter(|e| e["ph"] == "X").count() >= 600);
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("forward_pass_summary.json")).unwrap()).unwrap();
    assert_eq!(summary["decode"]["count"], 300);
    let tokens: u64 = (0..300u64).map(|s| 4 + s % 3).sum();
    assert_eq!(summary["decode"]["total_tokens"], tokens);
    let total_ms: f64 = (0..300u64).map(|s| (900 + s) as f64 / 1000.0).sum();
    assert!((summary["decode"]["total_ms"].as_f64().unwrap() - total_ms).abs() < 1e-6);
    let cpu: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("cpu_timing_summary.json")).unwrap()).unwrap();
    assert_eq!(cpu["scheduling"]["count"], 300);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("profilemate_run.json")).unwrap()).unwrap();
    assert_eq!(manifest["finished"], false);
    assert_eq!(manifest["finished_cleanly"], false);
    assert_eq!(manifest["rows_on_disk"]["forward_pass_timing.csv"], 300);
    assert_eq!(manifest["recovery"]["torn_bytes_dropped"]["forward_pass_timing.csv"], 12);
    // The step timeline's summary is rebuilt from its rows on disk; the steps still open in the
    // collector have none, and the manifest says so.
    assert_eq!(r.torn_bytes_dropped.get("step_timeline.csv"), Some(&8));
    assert_eq!(csv_rows(&timeline), timeline_rows);
    assert_eq!(manifest["rows_on_disk"]["step_timeline.csv"], timeline_rows);
    assert!(manifest["recovery"]["step_timeline"].as_str().unwrap().contains("no timeline row"));
    let tl: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("step_timeline_summary.json")).unwrap()).unwrap();
    assert_eq!(
        (tl["steps"].as_u64(), tl["decode"]["count"].as_u64()),
        (Some(timeline_rows as u64), Some(timeline_rows as u64))
    );
    let mut reader = csv::Reader::from_path(&timeline).unwrap();
    let (mut forward_ms, mut wall_ms) = (0.0, 0.0);
    for r in reader.deserialize::<std::collections::HashMap<String, String>>() {
        let r = r.unwrap();
        forward_ms += r["forward_time_ms"].parse::<f64>().unwrap();
        wall_ms += r["step_wall_ms"].parse::<f64>().unwrap();
    }
    assert!((tl["decode"]["total_forward_ms"].as_f64().unwrap() - forward_ms).abs() < 1e-6);
    assert!((tl["decode"]["total_wall_ms"].as_f64().unwrap() - wall_ms).abs() < 1e-3 * wall_ms.max(1.0));

    // Again: nothing left to do, the same files.
    let before: Vec<Vec<u8>> = ["forward_pass_timing.csv", "forward_pass_summary.json", "profilemate_trace.json"]
        .iter()
        .map(|f| std::fs::read(dir.join(f)).unwrap())
        .collect();
    let again = profilemate_cli::recover(dir).unwrap();
    assert!(again.torn_bytes_dropped.is_empty() && again.traces_closed.is_empty());
    let after: Vec<Vec<u8>> = ["forward_pass_timing.csv", "forward_pass_summary.json", "profilemate_trace.json"]
        .iter()
        .map(|f| std::fs::read(dir.join(f)).unwrap())
        .collect();
    assert_eq!(before, after);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("profilemate_run.json")).unwrap()).unwrap();
    assert_eq!(manifest["recovery"]["torn_bytes_dropped"]["forward_pass_timing.csv"], 12, "kept from the first run");

    // A run that finished cleanly is left alone.
    let clean = profilemate_cli::recover(live.path()).unwrap();
    assert!(!clean.needed);
}

/// A write that fails during recovery (here the summary's temporary file cannot be created, as
/// on a full disk or a read-only directory) is an error naming the file; the manifest is left as
/// it was, and a later try completes the recovery.
#[test]
fn a_failed_write_is_a_clear_error_and_a_later_try_completes() {
    let dir = tempfile::tempdir().unwrap();
    let fwd = "timestamp_sec,phase,batch_size,num_tokens,forward_time_ms,throughput_tokens_per_sec\n";
    std::fs::write(
        dir.path().join("forward_pass_timing.csv"),
        format!("{fwd}0.100000,decode,4,4,2.000000,2000.000\n0.2"),
    )
    .unwrap();
    let manifest = r#"{"finished": false, "steps": 0}"#;
    std::fs::write(dir.path().join("profilemate_run.json"), manifest).unwrap();
    let blocker = dir.path().join(format!(".forward_pass_summary.json.{}.tmp", std::process::id()));
    std::fs::create_dir(&blocker).unwrap();
    let err = profilemate_cli::recover(dir.path()).unwrap_err();
    assert!(err.to_string().contains("forward_pass_summary.json"), "{err}");
    assert_eq!(std::fs::read_to_string(dir.path().join("profilemate_run.json")).unwrap(), manifest);
    std::fs::remove_dir(&blocker).unwrap();
    let r = profilemate_cli::recover(dir.path()).unwrap();
    assert!(r.summaries_rebuilt.contains(&"forward_pass_summary.json".to_string()));
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("profilemate_run.json")).unwrap()).unwrap();
    assert_eq!((m["finished_cleanly"].as_bool(), m["steps"].as_u64()), (Some(false), Some(1)));
}

/// A process killed with records still in its thread buffers (the directory copied, buffers
/// included, while the session runs: the copy's lock is free, as a dead process's is): after
/// `recover`, the trace shows one forward-pass slice per forward row (the replayed passes
/// appended to it), every Parquet table is complete with its CSV table's rows, and the MoE
/// window in progress, held in the heap, is stated as lost in the manifest.
#[test]
fn a_killed_runs_trace_gets_the_replayed_events_and_every_parquet_table_is_completed() {
    let live = tempfile::tempdir().unwrap();
    let session = Session::builder()
        .dir(live.path())
        .sinks(&[SinkKind::Csv, SinkKind::Json, SinkKind::Perfetto, SinkKind::Parquet])
        .sink_factory(profilemate_sinks::standard_sinks)
        .flush_interval(Duration::from_secs(60))
        .moe_window_steps(100)
        .build()
        .unwrap();
    let (forward, cpu, requests, moe) =
        (session.forward_pass(), session.cpu_timing(), session.requests(), session.moe_experts());
    // Timed for real, one after the other: no two slices overlap (the trace's tracks hold them all).
    let step = |n: u32| {
        for _ in 0..n {
            cpu.start(CpuOp::SCHEDULING).stop();
            forward.start(Phase::Decode, 4, 4).stop();
            for layer in 0..2 {
                moe.record_layer(layer, &[3, 1, 0, 4]);
            }
        }
    };
    requests.started("req-1");
    step(250);
    requests.preempted("req-1", "RECOMPUTE", "");
    requests.resumed("req-1");
    requests.finished("req-1", "");
    session.flush().unwrap();
    // Recorded after the last collector pass: in the thread buffers only.
    step(120);
    requests.started("req-2");
    requests.preempted("req-2", "RECOMPUTE", "num_blocks=4");
    let killed = tempfile::tempdir().unwrap();
    copy_dir(live.path(), killed.path());
    drop(session);
    let dir = killed.path();
    assert_eq!(csv_rows(&dir.join("forward_pass_timing.csv")), 250);

    let r = profilemate_cli::recover(dir).unwrap();
    assert!(r.events_recovered >= 120 * 2 + 2, "{}", r.events_recovered);
    assert_eq!(csv_rows(&dir.join("forward_pass_timing.csv")), 370);
    // The trace: every forward row and CPU row has its slice, every preemption its instant.
    let trace: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("profilemate_trace.json")).unwrap()).unwrap();
    let count = |cat: &str| trace.as_array().unwrap().iter().filter(|e| e["cat"] == cat).count();
    assert_eq!(count("forward_pass"), 370);
    assert_eq!(count("cpu_operation"), 370);
    assert_eq!(trace.as_array().unwrap().iter().filter(|e| e["name"] == "preempted").count(), 2);
    // 120 forward passes, 120 CPU operations, one preemption.
    assert_eq!(r.trace_events_added, 120 * 2 + 1);
    // Every Parquet table, the request lifecycle and step timeline included, complete.
    assert!(r.parquet_not_completed.is_empty(), "{:?}", r.parquet_not_completed);
    for table in ["request_lifecycle", "step_timeline", "forward_pass_timing", "moe_expert_routing"] {
        assert!(r.parquet_completed.contains(&format!("{table}.parquet")), "{table}: {:?}", r.parquet_completed);
        assert!(dir.join(format!("{table}.parquet")).exists());
        assert!(!dir.join(format!("{table}.parquet.partial")).exists());
    }
    // MoE: the flush wrote each layer's routing up to call 250 (windows of 100, then the 50 the
    // flush closed); the totals of steps 251 to 370 lived in the heap.
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("profilemate_run.json")).unwrap()).unwrap();
    let lost = &manifest["recovery"]["moe_window_lost"];
    assert_eq!(lost["last_step"], 370, "{lost}");
    assert_eq!(lost["steps_lost_max"], 120, "{lost}");
    assert_eq!(lost["layers"]["1"]["calls_in_rows"], 250, "{lost}");
    assert_eq!(lost["layers"]["1"]["steps_lost"], 120, "{lost}");
    assert_eq!(manifest["recovery"]["parquet_not_completed"], serde_json::json!({}));

    // Again: the trace gets nothing twice.
    let again = profilemate_cli::recover(dir).unwrap();
    assert_eq!(again.trace_events_added, 0);
    let trace: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("profilemate_trace.json")).unwrap()).unwrap();
    assert_eq!(trace.as_array().unwrap().iter().filter(|e| e["cat"] == "forward_pass").count(), 370);
}
