//! The report on fixture directories: sections, sources, notes and errors.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use profilemate_cli::{NoteKind, Report, ReportError, RunData, Thresholds};
use serde_json::{json, Value};

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * b.abs().max(1.0)
}

#[test]
fn normal_run_prints_every_section_from_the_summaries() {
    let run = Run::normal();
    let report = Report::from_dir(run.path()).unwrap();

    let fp = report.forward_pass.as_ref().unwrap();
    assert_eq!(fp.source, "forward_pass_summary.json");
    assert_eq!(fp.total_passes, 4100);
    assert_eq!(fp.total_tokens, 153_600);
    assert!(close(fp.total_forward_ms, 39_320.0));
    assert!(close(fp.overall_throughput_tokens_per_sec, 153_600.0 / 39_320.0 * 1000.0));
    assert!(close(fp.time_share_pct.prefill, 4520.0 / 39_320.0 * 100.0));

    // The seed's CPU overhead: sum(count * mean) over operations against prefill + decode time.
    let cpu = report.cpu.as_ref().unwrap();
    let total_cpu = 4100.0 * (0.5 + 0.25 + 10.0);
    assert!(close(cpu.total_cpu_ms, total_cpu));
    assert!(close(cpu.cpu_share_pct.unwrap(), total_cpu / (total_cpu + 39_320.0) * 100.0));
    assert!(close(cpu.host_overhead_share_pct.unwrap(), 3075.0 / (3075.0 + 39_320.0) * 100.0));

    let batch = report.batch.as_ref().unwrap();
    assert!(close(batch.underutilization_share_pct, 234.0 / 4100.0 * 100.0));
    assert_eq!(batch.waiting_batches_pct, None, "no CSV, so unknown");
    let pre = report.preemption.as_ref().unwrap();
    assert!(close(pre.requests_preempted_pct, 40.0 / 1234.0 * 100.0));
    assert_eq!(report.components.as_ref().unwrap().summary.model_type, "encoder_decoder");
    assert_eq!(report.run.as_ref().unwrap().host.as_deref(), Some("gpu-node-7"));
    assert!(report.insights.is_empty(), "a healthy run fires nothing: {:?}", report.insights);
    // Summaries alone hold no step: the step sections are the only ones skipped.
    let notes: Vec<String> = report.notes.iter().map(|n| n.to_string()).collect();
    assert_eq!(notes, ["skipped: no step_timeline.csv (or no step in it): no step breakdown and no slow-step section"]);

    let text = report.to_string();
    for needle in [
        "1. Forward Pass Timing",
        "2. CPU Operations",
        "3. Model Components",
        "4. Batch Utilization",
        "5. Preemptions",
        "Insights",
        "host gpu-node-7",
        // prefill: count, mean, p50, p95, p99
        "prefill       100     45.200     43.500     62.300     71.200",
        "decode       4000      8.700      8.500     10.800     12.400",
        "Encoder: ",
        "Mean token utilization: 82.1%",
        "Underutilization events (token utilization < 50%): 234 (5.7% of samples)",
        "Token utilization per phase: prefill 89.2%, decode 78.5%, mixed 0.0%",
        "Queues: running mean 24.0 (max -), waiting mean 0.4 (max 12)",
        "Total preemptions: 45 over 1234 requests",
        "Preemption rate: 3.6%",
        "Requests preempted: 40 (3.2%)",
        "RECOMPUTE: 20 (44.4%)",
        "Resume delay: mean 0.800 s, max 3.456 s",
        "none fired",
    ] {
        if needle == "Encoder: " {
            let line = text.lines().find(|l| l.trim_start().starts_with("encoder ")).unwrap();
            assert!(line.contains("15.1%") && line.contains("1234 calls"), "{line}");
            continue;
        }
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
    // scheduling's line: count, mean, p95, total
    assert!(text.contains("scheduling                   4100      0.500      0.700     2050.000"), "{text}");
}

#[test]
fn json_report_is_one_object_with_the_same_numbers() {
    let run = Run::normal();
    let report = Report::from_dir(run.path()).unwrap();
    let v: Value = serde_json::from_str(&serde_json::to_string(&report).unwrap()).unwrap();
    assert!(v.is_object());
    assert_eq!(v["forward_pass"]["phases"]["decode"]["p99_ms"], 12.4);
    assert_eq!(v["forward_pass"]["phases"]["mixed"]["count"], 0);
    assert_eq!(v["preemption"]["summary"]["preemption_reasons"]["SWAP"], 20);
    assert_eq!(v["batch"]["summary"]["max_tokens"], 8192);
    assert_eq!(v["thresholds"]["preemption_rate_pct"], 10.0);
    assert_eq!(v["insights"], json!([]));
    assert_eq!(v["cpu"]["operations"]["sampling"]["count"], 4100);
}

#[test]
fn empty_groups_print_dashes_and_serialize_zeros() {
    let run = Run::new();
    let zero = phase(0, 0.0, 0.0, 0.0, 0.0, 0, 0.0);
    run.json("forward_pass_summary.json", &json!({"prefill": zero, "decode": zero, "mixed": zero}));
    run.json("cpu_timing_summary.json", &json!({}));
    let mut batch = batch_json();
    for k in ["total_samples", "underutilization_events", "max_num_seqs", "max_tokens", "max_waiting_queue_len"] {
        batch[k] = json!(0);
    }
    for k in
        ["mean_seq_utilization_pct", "mean_token_utilization_pct", "mean_running_queue_len", "mean_waiting_queue_len"]
    {
        batch[k] = json!(0.0);
    }
    run.json("batch_utilization_summary.json", &batch);
    run.json(
        "preemption_summary.json",
        &json!({"total_preemptions": 0, "total_requests": 0, "requests_preempted": 0, "preemption_rate_pct": 0.0,
                "preemption_reasons": {}, "mean_running_time_before_preempt": 0.0, "mean_resume_delay": 0.0,
                "max_resume_delay": 0.0}),
    );
    let report = Report::from_dir(run.path()).unwrap();
    let fp = report.forward_pass.as_ref().unwrap();
    assert_eq!(fp.total_passes, 0);
    assert_eq!(fp.overall_throughput_tokens_per_sec, 0.0);
    assert_eq!(fp.time_share_pct.decode, 0.0);
    let cpu = report.cpu.as_ref().unwrap();
    assert_eq!(cpu.total_cpu_ms, 0.0);
    assert_eq!(cpu.cpu_share_pct, None, "0 / 0 is no share, not NaN");
    assert_eq!(report.batch.as_ref().unwrap().underutilization_share_pct, 0.0);
    assert_eq!(report.preemption.as_ref().unwrap().requests_preempted_pct, 0.0);
    // Zero samples: no utilization rule fires on the zeros.
    assert!(report.insights.is_empty(), "{:?}", report.insights);

    let text = report.to_string();
    assert!(
        text.contains(
            "mixed           0          -          -          -          -            -          0            -"
        ),
        "{text}"
    );
    assert!(text.contains("Preemption reasons: none"), "{text}");
    assert!(!text.contains("NaN") && !text.contains("inf"), "{text}");
    let json = serde_json::to_string(&report).unwrap();
    assert!(!json.contains("NaN"));
    assert!(serde_json::from_str::<Value>(&json).unwrap()["forward_pass"]["phases"]["mixed"]["mean_ms"] == 0.0);
}

#[test]
fn decoder_only_model_prints_decoder_only() {
    let run = Run::new();
    run.json(
        "encoder_decoder_summary.json",
        &json!({"model_type": "decoder_only", "encoder": component(0, 0.0), "decoder": component(200, 400.0),
                "cross_attention": component(0, 0.0), "encoder_pct": 0.0, "decoder_pct": 100.0,
                "cross_attention_pct": 0.0}),
    );
    let report = Report::from_dir(run.path()).unwrap();
    let text = report.to_string();
    assert!(text.contains("model type: decoder_only"), "{text}");
    assert!(text.contains("Decoder-only: 100.0% decoder"), "{text}");
    assert!(text.contains("200 calls, mean 2.000 ms"), "{text}");
    assert!(!text.contains("encoder   "), "no encoder line for a decoder-only model:\n{text}");
}

#[test]
fn decoder_only_recomputed_from_csv_is_inferred() {
    let run = Run::new();
    run.write(
        "encoder_decoder_timing.csv",
        &format!("{COMPONENT_HEADER}0.1,decoder,2.000,language_model\n0.2,decoder,4.000,language_model\n"),
    );
    let report = Report::from_dir(run.path()).unwrap();
    let c = report.components.as_ref().unwrap();
    assert_eq!(c.source, "recomputed from encoder_decoder_timing.csv");
    assert_eq!(c.summary.model_type, "decoder_only");
    assert_eq!(c.summary.decoder.count, 2);
    assert_eq!(c.summary.decoder.mean_ms, 3.0);
    assert_eq!(c.summary.decoder_pct, 100.0);
}

#[test]
fn missing_optional_files_are_reported_as_skipped() {
    let run = Run::new();
    run.json("forward_pass_summary.json", &forward_json());
    let report = Report::from_dir(run.path()).unwrap();
    assert!(report.forward_pass.is_some());
    assert!(
        report.cpu.is_none() && report.batch.is_none() && report.preemption.is_none() && report.components.is_none()
    );
    assert!(report.kv_cache.is_none() && report.cuda_graph.is_none() && report.moe_expert.is_none());
    let skipped: Vec<String> =
        report.notes.iter().filter(|n| n.kind == NoteKind::Skipped).map(|n| n.to_string()).collect();
    assert_eq!(skipped.len(), 8, "{skipped:?}");
    for tracker in [
        "skipped: no step_timeline.csv (or no step in it): no step breakdown and no slow-step section",
        "skipped: no kv_cache_summary.json or kv_cache_usage.csv",
        "skipped: no cuda_graph_summary.json or cuda_graph_events.csv",
        "skipped: no moe_expert_summary.json or moe_expert_routing.csv",
    ] {
        assert!(skipped.contains(&tracker.to_string()), "{skipped:?}");
    }
    assert!(
        skipped.contains(&"skipped: no preemption_summary.json or preemption_events.csv".to_string()),
        "{skipped:?}"
    );
    assert!(skipped.contains(&"skipped: no cpu_timing_summary.json or cpu_operations_timing.csv".to_string()));
    let text = report.to_string();
    assert!(text.contains("5. Preemptions\n   (no data)"), "{text}");
    for section in ["6. KV Cache", "7. CUDA Graphs", "8. MoE Experts"] {
        assert!(text.contains(&format!("{section}\n   (no data)")), "{text}");
    }
    assert!(text.contains("skipped: no batch_utilization_summary.json or batch_utilization.csv"), "{text}");
}

#[test]
fn lifecycle_alone_is_not_enough_for_the_preemption_section() {
    let run = Run::new();
    run.write("request_lifecycle.csv", &format!("{LIFECYCLE_HEADER}a,0.1,,,0.5,0.4,,0\n"));
    let report = Report::from_dir(run.path()).unwrap();
    assert!(report.preemption.is_none());
    assert!(report.notes.iter().any(|n| n.message.contains("request_lifecycle.csv alone")), "{:?}", report.notes);
}

#[test]
fn csv_only_run_is_recomputed() {
    let run = Run::new();
    write_csv_run(&run, 100);
    let report = Report::from_dir(run.path()).unwrap();
    let fp = report.forward_pass.as_ref().unwrap();
    assert_eq!(fp.source, "recomputed from forward_pass_timing.csv");
    assert_eq!((fp.phases.prefill.count, fp.phases.decode.count, fp.phases.mixed.count), (10, 80, 10));
    assert_eq!(fp.phases.prefill.total_tokens, 20_480);
    let cpu = report.cpu.as_ref().unwrap();
    assert_eq!(cpu.operations["sampling"].count, 100);
    assert!(close(cpu.operations["sampling"].mean_ms, 0.3));
    let batch = report.batch.as_ref().unwrap();
    assert_eq!(batch.summary.total_samples, 100);
    assert_eq!(batch.summary.max_tokens, 4096);
    assert_eq!(batch.summary.max_waiting_queue_len, 3);
    assert_eq!(batch.max_running_queue_len, Some(32));
    assert!(close(batch.waiting_batches_pct.unwrap(), 75.0), "i % 4 > 0 in 3 of 4 batches");
    let pre = report.preemption.as_ref().unwrap();
    assert_eq!(pre.source, "recomputed from preemption_events.csv");
    assert_eq!((pre.summary.total_requests, pre.summary.total_preemptions), (20, 4));
    assert!(close(pre.summary.preemption_rate_pct, 20.0));
    assert!(close(pre.summary.mean_resume_delay, 0.3));
    assert_eq!(pre.summary.preemption_reasons.get("RECOMPUTE"), Some(&4));
    let ed = report.components.as_ref().unwrap();
    assert_eq!(ed.summary.model_type, "encoder_decoder");
    assert_eq!(ed.summary.encoder.count, 10);
    assert!(close(ed.summary.encoder_pct + ed.summary.decoder_pct, 100.0));
}

/// A run written by profilemate itself: the report from its JSON summaries and the report
/// recomputed from its CSV files alone agree.
#[test]
fn core_written_run_reads_back_and_recomputes_to_the_same_numbers() {
    use profilemate_core::{BatchSample, Component, CpuOp, Phase, Session};
    let run = Run::new();
    let session = Session::builder().sink_factory(profilemate_sinks::standard_sinks).dir(run.path()).build().unwrap();
    let (fwd, cpu, batch, req, comp) = (
        session.forward_pass(),
        session.cpu_timing(),
        session.batch_utilization(),
        session.requests(),
        session.components(),
    );
    for i in 0..300u32 {
        let phase = match i % 10 {
            0 => Phase::Prefill,
            5 => Phase::Mixed,
            _ => Phase::Decode,
        };
        fwd.record_ms(phase, 16, 16 + i, 5.0 + f64::from(i % 13) * 0.37);
        cpu.record_ms(CpuOp::SCHEDULING, 0.2 + f64::from(i % 7) * 0.05, "");
        cpu.record_ms(CpuOp::SAMPLING, 0.4, "phase=decode;batch_size=16");
        batch.record(&BatchSample {
            num_seqs: 16,
            max_num_seqs: 32,
            num_tokens: 16 + i,
            max_tokens: 512,
            phase,
            running_queue_len: 16,
            waiting_queue_len: i % 3,
        });
        comp.record_ms(Component::Decoder, "language_model", 4.0 + f64::from(i % 5));
        if i % 30 == 0 {
            comp.record_ms(Component::Encoder, "vision_encoder", 9.0);
        }
    }
    for r in 0..10 {
        let id = format!("req-{r}");
        req.started(&id);
        if r % 3 == 0 {
            req.preempted(&id, "RECOMPUTE", "num_blocks=64");
            req.resumed(&id);
        }
        req.finished(&id, "");
    }
    session.shutdown().unwrap();

    let from_json = Report::from_dir(run.path()).unwrap();
    assert_eq!(from_json.forward_pass.as_ref().unwrap().source, "forward_pass_summary.json");
    assert!(from_json.notes.is_empty(), "summaries and CSV files agree: {:?}", from_json.notes);
    for f in [
        "forward_pass_summary.json",
        "cpu_timing_summary.json",
        "batch_utilization_summary.json",
        "preemption_summary.json",
        "encoder_decoder_summary.json",
    ] {
        run.remove(f);
    }
    let from_csv = Report::from_dir(run.path()).unwrap();
    assert_eq!(from_csv.forward_pass.as_ref().unwrap().source, "recomputed from forward_pass_timing.csv");

    let (a, b) = (from_json.forward_pass.unwrap(), from_csv.forward_pass.unwrap());
    for (pa, pb) in [
        (&a.phases.prefill, &b.phases.prefill),
        (&a.phases.decode, &b.phases.decode),
        (&a.phases.mixed, &b.phases.mixed),
    ] {
        assert_eq!(pa.count, pb.count);
        assert_eq!(pa.total_tokens, pb.total_tokens);
        // The CSV holds milliseconds to 3 decimals.
        for (x, y) in [(pa.mean_ms, pb.mean_ms), (pa.p50_ms, pb.p50_ms), (pa.p95_ms, pb.p95_ms), (pa.p99_ms, pb.p99_ms)]
        {
            assert!((x - y).abs() < 0.002 + x * 0.001, "{x} vs {y}");
        }
        assert!((pa.mean_throughput_tokens_per_sec - pb.mean_throughput_tokens_per_sec).abs() < 1.0);
    }
    assert_eq!(a.phases.decode.count, 240);

    let (a, b) = (from_json.batch.unwrap().summary, from_csv.batch.unwrap().summary);
    assert_eq!(a.total_samples, b.total_samples);
    assert_eq!(a.underutilization_events, b.underutilization_events);
    assert!((a.mean_token_utilization_pct - b.mean_token_utilization_pct).abs() < 1e-3);
    assert!((a.mean_waiting_queue_len - b.mean_waiting_queue_len).abs() < 1e-9);

    let (a, b) = (from_json.preemption.unwrap().summary, from_csv.preemption.unwrap().summary);
    assert_eq!((a.total_requests, a.total_preemptions, a.requests_preempted), (10, 4, 4));
    assert_eq!((b.total_requests, b.total_preemptions, b.requests_preempted), (10, 4, 4));
    assert_eq!(a.preemption_reasons, b.preemption_reasons);
    assert!((a.mean_resume_delay - b.mean_resume_delay).abs() < 1e-5);

    let (a, b) = (from_json.cpu.unwrap(), from_csv.cpu.unwrap());
    assert_eq!(a.operations.keys().collect::<Vec<_>>(), b.operations.keys().collect::<Vec<_>>());
    assert!((a.total_cpu_ms - b.total_cpu_ms).abs() < 0.01);

    let (a, b) = (from_json.components.unwrap().summary, from_csv.components.unwrap().summary);
    assert_eq!(a.model_type, b.model_type);
    assert_eq!(a.encoder.count, 10);
    assert!((a.encoder_pct - b.encoder_pct).abs() < 1e-3);
}

#[test]
fn stale_summary_is_noted() {
    let run = Run::new();
    run.json("forward_pass_summary.json", &forward_json());
    run.write("forward_pass_timing.csv", &format!("{FORWARD_HEADER}0.1,decode,1,1,1.000,1000.000\n"));
    let report = Report::from_dir(run.path()).unwrap();
    assert_eq!(report.forward_pass.as_ref().unwrap().total_passes, 4100, "figures from the summary");
    let warning = report.notes.iter().find(|n| n.kind == NoteKind::Warning).unwrap();
    assert!(warning.message.contains("counts 4100 rows but forward_pass_timing.csv has 1"), "{warning}");
}

#[test]
fn unfinished_run_is_noted() {
    let run = Run::normal();
    let mut manifest = manifest_json();
    manifest["finished"] = json!(false);
    run.json("profilemate_run.json", &manifest);
    let report = Report::from_dir(run.path()).unwrap();
    assert!(report.notes.iter().any(|n| n.message.contains("did not shut down cleanly")), "{:?}", report.notes);
    assert!(report.to_string().contains("NOT finished"));
}

// --- torn and malformed files -----------------------------------------------------------------

#[test]
fn torn_last_line_is_skipped_with_a_warning() {
    let run = Run::new();
    run.write(
        "forward_pass_timing.csv",
        &format!("{FORWARD_HEADER}0.1,decode,1,4,2.000,2000.000\n0.2,decode,1,4,4.000,2000.000\n0.3,dec"),
    );
    let data = RunData::load(run.path()).unwrap();
    assert_eq!(data.forward_pass.as_ref().unwrap().len(), 2);
    assert_eq!(data.notes.len(), 1);
    assert!(data.notes[0].message.contains("forward_pass_timing.csv: torn last line 4 skipped"), "{:?}", data.notes);
    let report = Report::from_data(&data, &Thresholds::default());
    assert_eq!(report.forward_pass.unwrap().phases.decode.mean_ms, 3.0);
}

/// A write cut inside the last field leaves a row that parses; only the missing line end tells.
#[test]
fn torn_last_line_with_every_field_is_still_skipped() {
    let run = Run::new();
    run.write(
        "forward_pass_timing.csv",
        &format!("{FORWARD_HEADER}0.1,decode,1,4,2.000,2000.000\n0.2,decode,1,4,4.000,10"),
    );
    let data = RunData::load(run.path()).unwrap();
    assert_eq!(data.forward_pass.as_ref().unwrap().len(), 1);
    assert!(data.notes[0].message.contains("torn last line 3"), "{:?}", data.notes);
}

#[test]
fn torn_last_line_inside_a_quoted_field_is_skipped() {
    let run = Run::new();
    // Killed while writing a context that holds a newline: the file ends with one, inside quotes.
    run.write(
        "cpu_operations_timing.csv",
        &format!("{CPU_HEADER}0.1,scheduling,0.500,\"a=1;\nb=2\"\n0.2,sampling,0.4"),
    );
    let data = RunData::load(run.path()).unwrap();
    assert_eq!(data.cpu_operations.as_ref().unwrap().len(), 1);
    assert_eq!(data.notes.len(), 1, "{:?}", data.notes);
    run.write("cpu_operations_timing.csv", &format!("{CPU_HEADER}0.1,scheduling,0.500,\"a=1\n0.2,sampling,0.4,x\n"));
    let data = RunData::load(run.path()).unwrap();
    assert_eq!(data.cpu_operations.as_ref().unwrap().len(), 0, "the open quote swallowed the rest: torn");
    assert_eq!(data.notes.len(), 1, "{:?}", data.notes);
}

#[test]
fn quoted_fields_with_commas_and_newlines_round_trip() {
    let run = Run::new();
    run.write(
        "preemption_events.csv",
        &format!("{EVENTS_HEADER}0.1,\"req,1\",started,,,\n0.2,\"req,1\",preempted,RECOMPUTE,0.100000,\"a=1,\nb=\"\"2\"\"\"\n0.3,\"req,1\",resumed,,,\n"),
    );
    let data = RunData::load(run.path()).unwrap();
    let rows = data.preemption_events.as_ref().unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[1].request_id, "req,1");
    assert!(data.notes.is_empty());
    let report = Report::from_data(&data, &Thresholds::default());
    assert_eq!(report.preemption.unwrap().summary.total_requests, 1);
}

#[test]
fn header_only_and_empty_files_read_as_no_rows() {
    let run = Run::new();
    run.write("forward_pass_timing.csv", FORWARD_HEADER);
    run.write("batch_utilization.csv", "");
    let data = RunData::load(run.path()).unwrap();
    assert_eq!(data.forward_pass.as_ref().map(Vec::len), Some(0));
    assert_eq!(data.batch.as_ref().map(Vec::len), Some(0));
    assert_eq!(data.notes.len(), 1, "the empty file is noted: {:?}", data.notes);
    let report = Report::from_data(&data, &Thresholds::default());
    assert_eq!(report.forward_pass.unwrap().total_passes, 0);
}

fn malformed(file: &str, content: &str) -> ReportError {
    let run = Run::new();
    run.write(file, content);
    Report::from_dir(run.path()).unwrap_err()
}

#[test]
fn malformed_csv_names_file_line_and_column() {
    let err = malformed("forward_pass_timing.csv", &format!("{FORWARD_HEADER}0.1,decode,1,4,2.000,2000.000\n0.2,decode,1,4,abc,2000.000\n0.3,decode,1,4,2.000,2000.000\n"));
    match &err {
        ReportError::MalformedCsv { file, line, column_index, column, message } => {
            assert_eq!(file, "forward_pass_timing.csv");
            assert_eq!(*line, 3);
            assert_eq!(*column_index, 5);
            assert_eq!(column, "forward_time_ms");
            assert!(message.contains("`abc` is not a number"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(err.to_string(), "forward_pass_timing.csv: line 3, column 5 (`forward_time_ms`): `abc` is not a number");
}

#[test]
fn malformed_csv_cases() {
    let cases: [(&str, String, &str); 7] = [
        (
            "batch_utilization.csv",
            format!("{BATCH_HEADER}0.1,1,4,25.0,1,8,12.5,sideways,1,0\n"),
            "line 2, column 8 (`phase`): `sideways` is not one of prefill, decode, mixed",
        ),
        (
            "cpu_operations_timing.csv",
            format!("{CPU_HEADER}0.1,scheduling,NaN,\n"),
            "line 2, column 3 (`duration_ms`): `NaN` is not a finite number",
        ),
        (
            "cpu_operations_timing.csv",
            format!("{CPU_HEADER}0.1,scheduling,-1.0,\n"),
            "line 2, column 3 (`duration_ms`): -1 is negative",
        ),
        ("preemption_events.csv", format!("{EVENTS_HEADER}0.1,a,exploded,,,\n"), "line 2, column 3 (`event`)"),
        (
            "request_lifecycle.csv",
            format!("{LIFECYCLE_HEADER}a,0.1,,,0.5,0.4,,1.5\n"),
            "line 2, column 8 (`num_preemptions`): `1.5` is not a non-negative integer",
        ),
        // Too few fields in the middle of the file is not a torn line.
        (
            "encoder_decoder_timing.csv",
            format!("{COMPONENT_HEADER}0.1,encoder\n0.2,decoder,1.0,x\n"),
            "line 2, column 3 (`duration_ms`): the row has 2 fields",
        ),
        (
            "forward_pass_timing.csv",
            format!("{FORWARD_HEADER}0.1,decode,1,4,,\n"),
            "line 2, column 5 (`forward_time_ms`): empty",
        ),
    ];
    for (file, content, expected) in cases {
        let err = malformed(file, &content);
        assert!(matches!(err, ReportError::MalformedCsv { .. }), "{file}: {err:?}");
        let text = err.to_string();
        assert!(text.starts_with(file), "{text}");
        assert!(text.contains(expected), "{file}: {text}");
    }
}

#[test]
fn missing_column_is_named() {
    let err = malformed("batch_utilization.csv", "timestamp_sec,num_seqs\n0.1,1\n");
    match err {
        ReportError::MissingColumn { file, column, .. } => {
            assert_eq!(file, "batch_utilization.csv");
            assert_eq!(column, "max_num_seqs");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn extra_columns_and_reordered_columns_are_accepted() {
    let run = Run::new();
    run.write(
        "request_lifecycle.csv",
        &format!("{}outcome\na,0.1,0.2,0.3,0.5,0.4,0.1,1,finished\n", LIFECYCLE_HEADER.trim_end().to_string() + ","),
    );
    run.write("cpu_operations_timing.csv", "operation,timestamp_sec,context,duration_ms\nsampling,0.1,,0.250\n");
    let data = RunData::load(run.path()).unwrap();
    assert_eq!(data.request_lifecycle.as_ref().unwrap()[0].num_preemptions, 1);
    assert_eq!(data.cpu_operations.as_ref().unwrap()[0].duration_ms, 0.25);
}

#[test]
fn malformed_json_names_file_line_and_column() {
    let err = malformed("preemption_summary.json", "{\n  \"total_preemptions\": 3,\n  \"total_requests\": ,\n}");
    match &err {
        ReportError::MalformedJson { file, line, column, .. } => {
            assert_eq!(file, "preemption_summary.json");
            assert_eq!(*line, 3);
            assert!(*column >= 20, "{column}");
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().starts_with("preemption_summary.json: line 3, column "), "{err}");

    // A value of the wrong type, and a key of the contract missing.
    let mut batch = batch_json();
    batch["mean_token_utilization_pct"] = json!("high");
    let err = malformed("batch_utilization_summary.json", &serde_json::to_string_pretty(&batch).unwrap());
    assert!(matches!(err, ReportError::MalformedJson { line, .. } if line > 1), "{err:?}");
    assert!(err.to_string().contains("invalid type: string \"high\""), "{err}");

    let mut fp = forward_json();
    fp.as_object_mut().unwrap().remove("mixed");
    let err = malformed("forward_pass_summary.json", &serde_json::to_string(&fp).unwrap());
    assert!(err.to_string().contains("missing field `mixed`"), "{err}");

    let err = malformed("cpu_timing_summary.json", "{\"scheduling\": null}");
    assert!(err.to_string().starts_with("cpu_timing_summary.json: line 1, column "), "{err}");
}

#[test]
fn directory_without_contract_files_is_an_error() {
    let run = Run::new();
    run.write("notes.txt", "hello");
    let err = Report::from_dir(run.path()).unwrap_err();
    assert!(matches!(err, ReportError::NoContractFiles { .. }), "{err:?}");
    assert!(err.to_string().contains("no profilemate output here"));
    let err = Report::from_dir(run.path().join("nope")).unwrap_err();
    assert!(matches!(err, ReportError::Io { .. }), "{err:?}");
}

// --- the trackers beyond the five profilers ----------------------------------------------------

#[test]
fn tracker_sections_from_the_summaries() {
    let run = Run::normal();
    let report = Report::from_dir(run.path()).unwrap();

    let kv = report.kv_cache.as_ref().unwrap();
    assert_eq!(kv.source, "kv_cache_summary.json");
    assert_eq!((kv.summary.samples, kv.full_samples, kv.full_samples_pct), (4100, Some(0), Some(0.0)));
    assert_eq!((kv.prefix_cache_queries, kv.prefix_cache_hits), (Some(1000), Some(450)));
    assert_eq!(kv.preemptions, None, "no kv_cache_usage.csv or preemption_events.csv to match");

    let g = report.cuda_graph.as_ref().unwrap();
    assert_eq!(g.source, "cuda_graph_summary.json");
    assert_eq!((g.steps, g.largest_captured_size, g.max_eager_batch_size), (4100, Some(256), Some(200)));
    assert_eq!(g.captured_sizes.as_ref().unwrap().len(), 35);
    assert_eq!((g.eager_beyond_largest_graph, g.eager_within_graphs), (None, None), "needs the CSV");

    let m = report.moe_expert.as_ref().unwrap();
    assert_eq!(m.source, "moe_expert_summary.json");
    assert_eq!(m.layers.len(), 2);
    assert!(close(m.layers[0].max_over_mean, 1.1), "{}", m.layers[0].max_over_mean);
    assert_eq!((m.layers[0].hottest_expert, m.layers[0].experts, m.layers[0].total_tokens), (0, 8, 800));
    assert!(close(m.layers[0].hottest_share_pct, 110.0 / 800.0 * 100.0));
    assert_eq!(m.layers[1].coefficient_of_variation, 0.0);
    assert_eq!(m.most_imbalanced_layers, vec![0, 1]);

    let text = report.to_string();
    for needle in [
        "6. KV Cache\n   source: kv_cache_summary.json\n   4100 samples of a 1024-block cache",
        "Usage: mean 61.5%, max 92.0%",
        "Samples at 100%: 0 (0.0%)",
        "Prefix cache: 450 hits of 1000 queries = hit rate 45.0%",
        "Preemptions against usage: unknown (needs kv_cache_usage.csv and preemption_events.csv)",
        "7. CUDA Graphs\n   source: cuda_graph_summary.json",
        "Captures: 35 (sizes 1, 2, 4, 8, 16, 24, 32, 40,",
        "in 1234.500 ms",
        "Steps: 4100: 3900 replayed, 200 eager = replay rate 95.1%",
        "Mean padding of a replayed batch: 8.0%",
        "Eager steps: 200, largest batch 200\n",
        "8. MoE Experts\n   source: moe_expert_summary.json",
        "2 layers, up to 8 experts; max_over_mean: highest 1.10x, mean over layers 1.05x",
        "   0               8          800      1.10x    0.056              0 (13.8%)",
        "Most imbalanced layers: 0, 1",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["kv_cache"]["summary"]["prefix_cache_hit_rate_pct"], 45.0);
    assert_eq!(json["cuda_graph"]["largest_captured_size"], 256);
    assert_eq!(json["moe_expert"]["layers"][0]["hottest_expert"], 0);
    assert_eq!(json["thresholds"]["moe_max_over_mean"], 1.5);
}

#[test]
fn tracker_sections_recomputed_from_the_csv_files() {
    let run = Run::new();
    write_csv_run(&run, 100);
    let report = Report::from_dir(run.path()).unwrap();

    let kv = report.kv_cache.as_ref().unwrap();
    assert_eq!(kv.source, "recomputed from kv_cache_usage.csv");
    assert_eq!(kv.summary.samples, 100);
    assert_eq!(kv.summary.total_blocks, Some(1024));
    // used = min(200 + (i % 50) * 17, 1024): full from i % 50 = 49 only (1033 > 1024).
    assert_eq!(kv.full_samples, Some(2));
    assert_eq!(kv.summary.max_usage_pct, 100.0);
    // queries i % 3, hits on i % 6 == 0
    assert_eq!((kv.prefix_cache_queries, kv.prefix_cache_hits), (Some(99), Some(17)));
    assert!(close(kv.summary.prefix_cache_hit_rate_pct, 17.0 / 99.0 * 100.0));
    assert_eq!(kv.preemptions.as_ref().unwrap().preemptions, 4, "preemption_events.csv has 4");

    let g = report.cuda_graph.as_ref().unwrap();
    assert_eq!(g.source, "recomputed from cuda_graph_events.csv");
    assert_eq!((g.summary.captures, g.summary.replays, g.summary.eager_steps), (6, 80, 20));
    assert!(close(g.summary.capture_time_ms, 6.0 + 6.3));
    assert_eq!(g.captured_sizes, Some(vec![1, 2, 4, 8, 16, 32]));
    assert_eq!(g.eager_beyond_largest_graph, Some(0));
    assert_eq!(g.eager_within_graphs, Some(20));
    assert_eq!(g.max_eager_batch_size, Some(3 + 80 % 27), "eager steps are i % 5 == 0, batch 3 + i % 27");
    let p = g.most_padded_graph.as_ref().unwrap();
    assert_eq!(p.graph_size, 32, "batches 17..29 pad to 32: {p:?}");

    let m = report.moe_expert.as_ref().unwrap();
    assert_eq!(m.source, "recomputed from moe_expert_routing.csv");
    assert_eq!(m.layers.iter().map(|l| l.layer.as_str()).collect::<Vec<_>>(), ["0", "1"]);
    // layer 1: expert 5 gets 60 of 95 tokens a step
    assert_eq!(m.layers[1].hottest_expert, 5);
    assert!(close(m.layers[1].max_over_mean, 60.0 / (95.0 / 8.0)));
    assert_eq!(m.most_imbalanced_layers, vec![1, 0]);
}

#[test]
fn preemptions_are_matched_to_the_kv_sample_before_them() {
    let run = Run::new();
    // Usage by second: 10, 96, 100, 50, 97 (a cache of 100 blocks).
    let mut kv = String::from(KV_HEADER);
    for (t, used) in [(1, 10), (2, 96), (3, 100), (4, 50), (5, 97)] {
        kv.push_str(&format!("{t}.000000,{used},100,{used}.0000,0,0\n"));
    }
    run.write("kv_cache_usage.csv", &kv);
    run.write(
        "preemption_events.csv",
        &format!(
            "{EVENTS_HEADER}0.500000,a,preempted,RECOMPUTE,0.1,\n\
             2.500000,b,preempted,RECOMPUTE,0.1,\n\
             3.500000,c,preempted,RECOMPUTE,0.1,\n\
             4.000000,d,preempted,RECOMPUTE,0.1,\n\
             4.000000,d,resumed,,,\n\
             9.000000,e,preempted,kv_cache_full,0.1,\n"
        ),
    );
    let report = Report::from_dir(run.path()).unwrap();
    let m = report.kv_cache.as_ref().unwrap().preemptions.clone().unwrap();
    // a: before the first sample, takes it (10); b: 96; c: 100; d: at 4.0 exactly, the sample
    // taken then is after it, so the one at 3.0 (100); e: the last one (97).
    assert_eq!((m.preemptions, m.at_near_full, m.at_full), (5, 4, 2));
    assert!(close(m.at_near_full_pct, 80.0));
    assert!(close(m.mean_usage_pct, (10.0 + 96.0 + 100.0 + 100.0 + 97.0) / 5.0));
    assert_eq!(m.near_full_pct, 95.0);

    // The threshold is the report's.
    let data = RunData::load(run.path()).unwrap();
    let strict = Thresholds { kv_near_full_pct: 99.0, ..Thresholds::default() };
    let m = Report::from_data(&data, &strict).kv_cache.unwrap().preemptions.unwrap();
    assert_eq!(m.at_near_full, 2);
    assert!(report.to_string().contains(
        "Preemptions at KV usage >= 95% (nearest sample before each): 4 of 5 (80.0%), 2 at 100%; mean usage at a preemption 80.6%"
    ));
}

#[test]
fn eager_steps_beyond_the_largest_graph_are_counted() {
    let run = Run::new();
    run.write(
        "cuda_graph_events.csv",
        &format!(
            "{GRAPH_HEADER}0.0,capture,8,,2.0\n0.1,capture,16,,3.0\n0.2,replay,5,8,\n0.3,replay,16,16,\n\
             0.4,eager,40,,\n0.5,eager,12,,0.9\n0.6,eager,17,,\n"
        ),
    );
    let report = Report::from_dir(run.path()).unwrap();
    let g = report.cuda_graph.as_ref().unwrap();
    assert_eq!((g.eager_beyond_largest_graph, g.eager_within_graphs), (Some(2), Some(1)));
    assert_eq!(g.max_eager_batch_size, Some(40));
    assert!(close(g.summary.mean_padding_pct, 37.5 / 2.0));
    assert!(close(g.summary.replay_rate_pct, 40.0));
    let text = report.to_string();
    assert!(
        text.contains(
            "Eager steps: 3, largest batch 40; 2 beyond the largest captured graph (16), 1 within the captured sizes"
        ),
        "{text}"
    );
    // No graph captured at all: every eager step is beyond.
    run.write("cuda_graph_events.csv", &format!("{GRAPH_HEADER}0.4,eager,4,,\n"));
    let g = Report::from_dir(run.path()).unwrap().cuda_graph.unwrap();
    assert_eq!(
        (g.eager_beyond_largest_graph, g.largest_captured_size, g.summary.replay_rate_pct),
        (Some(1), None, 0.0)
    );
}

#[test]
fn tracker_summaries_with_only_the_contract_keys_are_read() {
    let run = Run::new();
    run.json(
        "kv_cache_summary.json",
        &json!({"mean_usage_pct": 70.0, "max_usage_pct": 99.0, "samples": 10, "prefix_cache_hit_rate_pct": 12.5}),
    );
    run.json(
        "cuda_graph_summary.json",
        &json!({"captures": 3, "replays": 7, "eager_steps": 3, "replay_rate_pct": 70.0, "mean_padding_pct": 5.0,
                "capture_time_ms": 12.0}),
    );
    run.json(
        "moe_expert_summary.json",
        &json!({"layers": {"10": {"tokens_per_expert": [1, 3], "max_over_mean": 1.5, "coefficient_of_variation": 0.5},
                           "2": {"tokens_per_expert": [2, 2], "max_over_mean": 1.0, "coefficient_of_variation": 0.0}},
                "most_imbalanced_layers": [10, 2]}),
    );
    let report = Report::from_dir(run.path()).unwrap();
    let kv = report.kv_cache.as_ref().unwrap();
    assert_eq!((kv.full_samples, kv.prefix_cache_queries), (None, None));
    let g = report.cuda_graph.as_ref().unwrap();
    assert_eq!((g.captured_sizes.clone(), g.max_eager_batch_size), (None, None));
    let m = report.moe_expert.as_ref().unwrap();
    assert_eq!(m.layers.iter().map(|l| l.layer.as_str()).collect::<Vec<_>>(), ["2", "10"], "numeric order");
    assert_eq!((m.max_over_mean, m.mean_max_over_mean), (1.5, 1.25), "computed from the layers");
    assert_eq!(m.layers[1].hottest_expert, 1);
    let text = report.to_string();
    assert!(text.contains("Samples at 100%: unknown"), "{text}");
    assert!(text.contains("Prefix cache: hit rate 12.5%"), "{text}");
    assert!(text.contains("Captures: 3 in 12.000 ms"), "{text}");
    assert!(text.contains("Eager steps: 3, largest batch ?\n"), "{text}");
    // The rule on the hit rate needs to know there were queries.
    assert!(report.insights.iter().all(|i| i.rule != profilemate_cli::Rule::LowPrefixCacheHitRate));
}

#[test]
fn stale_tracker_summaries_are_noted() {
    let run = Run::new();
    run.json("kv_cache_summary.json", &kv_json());
    run.write("kv_cache_usage.csv", &format!("{KV_HEADER}0.1,1,10,10.0000,0,0\n"));
    run.json("cuda_graph_summary.json", &graph_json());
    run.write("cuda_graph_events.csv", &format!("{GRAPH_HEADER}0.1,eager,1,,\n"));
    let report = Report::from_dir(run.path()).unwrap();
    let warnings: Vec<&str> =
        report.notes.iter().filter(|n| n.kind == NoteKind::Warning).map(|n| n.message.as_str()).collect();
    assert!(warnings.iter().any(|w| w.contains("kv_cache_summary.json counts 4100 rows but kv_cache_usage.csv has 1")));
    assert!(warnings
        .iter()
        .any(|w| w.contains("cuda_graph_summary.json counts 4135 rows but cuda_graph_events.csv has 1")));
    // Figures from the summaries; what only the CSV knows, from the CSV.
    let g = report.cuda_graph.as_ref().unwrap();
    assert_eq!((g.steps, g.eager_within_graphs), (4100, Some(1)));
}

#[test]
fn tracker_files_torn_or_malformed() {
    let run = Run::new();
    run.write("kv_cache_usage.csv", &format!("{KV_HEADER}0.1,10,100,10.0000,0,0\n0.2,20,10"));
    run.write("moe_expert_routing.csv", &format!("{MOE_HEADER}0.1,0,0,5\n0.1,0,1,\"3"));
    let data = RunData::load(run.path()).unwrap();
    assert_eq!(data.kv_cache.as_ref().unwrap().len(), 1);
    assert_eq!(data.moe_routing.as_ref().unwrap().rows, 1);
    assert_eq!(data.notes.len(), 2, "{:?}", data.notes);
    assert!(data.notes[0].message.contains("kv_cache_usage.csv: torn last line 3 skipped"), "{:?}", data.notes);
    // Empty prefix-cache counts read as 0; an empty usage is recomputed from the blocks.
    run.write("kv_cache_usage.csv", &format!("{KV_HEADER}0.1,25,100,,,\n"));
    let data = RunData::load(run.path()).unwrap();
    assert_eq!(data.kv_cache.as_ref().unwrap()[0].usage(), Some(25.0));

    let cases: [(&str, String, &str); 7] = [
        (
            "cuda_graph_events.csv",
            format!("{GRAPH_HEADER}0.1,warmup,8,,\n"),
            "line 2, column 2 (`event`): `warmup` is not one of capture, replay, eager",
        ),
        (
            "cuda_graph_events.csv",
            format!("{GRAPH_HEADER}0.1,replay,8,-16,\n"),
            "line 2, column 4 (`padded_batch_size`): `-16` is not a non-negative integer",
        ),
        (
            "kv_cache_usage.csv",
            format!("{KV_HEADER}0.1,10,100,NaN,0,0\n"),
            "line 2, column 4 (`usage_pct`): `NaN` is not a finite number",
        ),
        (
            "moe_expert_routing.csv",
            format!("{MOE_HEADER}0.1,0,1.5,3\n0.2,0,1,3\n"),
            "line 2, column 3 (`expert_id`): `1.5` is not a non-negative integer",
        ),
        ("moe_expert_routing.csv", "timestamp_sec,layer,num_tokens\n0.1,0,3\n".into(), "missing column `expert_id`"),
        (
            "moe_expert_routing.csv",
            format!("{MOE_HEADER}0.1,0,4294967295,3\n"),
            "line 2, column 3 (`expert_id`): expert id 4294967295 is beyond 65535",
        ),
        (
            "kv_cache_summary.json",
            "{\"mean_usage_pct\": 1.0, \"max_usage_pct\": 1.0, \"samples\": 1}".into(),
            "missing field `prefix_cache_hit_rate_pct`",
        ),
    ];
    for (file, content, expected) in cases {
        let err = malformed(file, &content);
        let text = err.to_string();
        assert!(text.starts_with(file), "{text}");
        assert!(text.contains(expected), "{file}: {text}");
    }
}

/// A run written by profilemate itself with all three trackers: its summaries and the ones
/// recomputed from its CSV files agree.
#[test]
fn core_written_trackers_read_back_and_recompute_to_the_same_numbers() {
    use profilemate_core::{KvCacheSample, Session};
    use std::time::Duration;
    let run = Run::new();
    let session = Session::builder().sink_factory(profilemate_sinks::standard_sinks).dir(run.path()).build().unwrap();
    let (kv, graphs, moe) = (session.kv_cache(), session.cuda_graphs(), session.moe_experts());
    for size in [1u32, 2, 4, 8, 16] {
        graphs.capture(size, Duration::from_micros(500 + u64::from(size)));
    }
    for i in 0..200u32 {
        kv.record(&KvCacheSample {
            used_blocks: (i * 7) % 130,
            total_blocks: 128,
            prefix_cache_queries: u64::from(i % 4),
            prefix_cache_hits: u64::from(i % 8 == 0),
        });
        let batch = 1 + i % 20;
        match [1u32, 2, 4, 8, 16].into_iter().find(|s| *s >= batch) {
            Some(padded) if i % 7 != 0 => graphs.replay(batch, padded),
            _ => graphs.eager(batch),
        }
        moe.record_layer(i % 3, &[i % 5, 3, 0, 1 + i % 2]);
    }
    session.shutdown().unwrap();

    let from_json = Report::from_dir(run.path()).unwrap();
    assert!(from_json.notes.iter().all(|n| !n.message.contains("counts")), "{:?}", from_json.notes);
    for f in ["kv_cache_summary.json", "cuda_graph_summary.json", "moe_expert_summary.json"] {
        run.remove(f);
    }
    let from_csv = Report::from_dir(run.path()).unwrap();

    let (a, b) = (from_json.kv_cache.unwrap(), from_csv.kv_cache.unwrap());
    assert_eq!(a.source, "kv_cache_summary.json");
    assert_eq!(b.source, "recomputed from kv_cache_usage.csv");
    assert_eq!(
        (a.summary.samples, a.full_samples, a.prefix_cache_queries),
        (200, b.full_samples, b.prefix_cache_queries)
    );
    assert_eq!(a.summary.total_blocks, b.summary.total_blocks);
    assert!((a.summary.mean_usage_pct - b.summary.mean_usage_pct).abs() < 1e-3);
    assert!((a.summary.prefix_cache_hit_rate_pct - b.summary.prefix_cache_hit_rate_pct).abs() < 1e-9);

    let (a, b) = (from_json.cuda_graph.unwrap(), from_csv.cuda_graph.unwrap());
    assert_eq!((a.summary.captures, a.summary.replays + a.summary.eager_steps), (5, 200));
    assert_eq!(
        (a.summary.captures, a.summary.replays, a.summary.eager_steps),
        (b.summary.captures, b.summary.replays, b.summary.eager_steps)
    );
    assert_eq!(a.captured_sizes, b.captured_sizes);
    assert_eq!(a.max_eager_batch_size, b.max_eager_batch_size);
    assert!((a.summary.mean_padding_pct - b.summary.mean_padding_pct).abs() < 1e-9);
    assert!((a.summary.capture_time_ms - b.summary.capture_time_ms).abs() < 1e-3);

    let (a, b) = (from_json.moe_expert.unwrap(), from_csv.moe_expert.unwrap());
    assert_eq!(a.layers.len(), 3);
    for (x, y) in a.layers.iter().zip(&b.layers) {
        assert_eq!(
            (&x.layer, x.experts, x.total_tokens, x.hottest_expert),
            (&y.layer, y.experts, y.total_tokens, y.hottest_expert)
        );
        // serde_json's float parsing may be one ulp off the value written.
        assert!(
            close(x.max_over_mean, y.max_over_mean) && close(x.coefficient_of_variation, y.coefficient_of_variation)
        );
    }
    assert_eq!(a.most_imbalanced_layers, b.most_imbalanced_layers);
    assert!(close(a.max_over_mean, b.max_over_mean));
}

/// A table an output budget rolled over is read file after file, oldest first; windowed MoE rows
/// count their steps as routing records.
#[test]
fn rolled_over_tables_and_windowed_moe_rows_are_read() {
    let run = Run::new();
    let fwd = "timestamp_sec,phase,batch_size,num_tokens,forward_time_ms,throughput_tokens_per_sec\n";
    run.write("forward_pass_timing.3.csv", &format!("{fwd}0.100000,decode,4,4,2.000000,2000.000\n"));
    run.write("forward_pass_timing.12.csv", &format!("{fwd}0.200000,decode,4,8,2.000000,4000.000\n"));
    run.write("forward_pass_timing.csv", &format!("{fwd}0.300000,prefill,1,64,4.000000,16000.000\n"));
    let windowed = "timestamp_sec,layer,expert_id,num_tokens,window_first_step,window_steps\n";
    run.write("moe_expert_routing.1.csv", &format!("{windowed}0.5,0,0,40,0,100\n0.5,0,2,10,0,100\n"));
    run.write("moe_expert_routing.csv", &format!("{windowed}0.9,0,1,7,100,5\n"));
    let data = RunData::load(run.path()).unwrap();
    let tokens: Vec<u64> = data.forward_pass.as_ref().unwrap().iter().map(|r| r.num_tokens).collect();
    assert_eq!(tokens, [4, 8, 64], "numbered files oldest (lowest number) first, then the live file");
    let moe = data.moe_routing.as_ref().unwrap();
    assert_eq!(moe.tokens[&0], vec![40, 7, 10]);
    assert_eq!((moe.rows, moe.records), (3, 105), "two windows of 100 and 5 steps");
    assert!(
        data.notes.iter().any(|n| n.message.contains("forward_pass_timing.csv: read 2 rolled-over files")),
        "{:?}",
        data.notes
    );
}

/// Rolled-over files and the `step` column together: each file's header is read on its own, so
/// a rolled file of an older version (no `step`) and a newer one (with it) join in one table;
/// the step timeline rolls over like any table; MoE rows carry the window columns, then `step`.
#[test]
fn rolled_over_tables_keep_their_step_column() {
    let run = Run::new();
    let fwd = "timestamp_sec,phase,batch_size,num_tokens,forward_time_ms,throughput_tokens_per_sec";
    run.write("forward_pass_timing.1.csv", &format!("{fwd}\n0.100000,decode,4,4,2.000000,2000.000\n"));
    run.write("forward_pass_timing.2.csv", &format!("{fwd},step\n0.200000,decode,4,8,2.000000,4000.000,7\n"));
    run.write("forward_pass_timing.csv", &format!("{fwd},step\n0.300000,prefill,1,64,4.000000,16000.000,\n"));
    let moe = "timestamp_sec,layer,expert_id,num_tokens,window_first_step,window_steps,step";
    run.write("moe_expert_routing.1.csv", &format!("{moe}\n0.5,0,0,40,0,1,1\n0.5,0,2,10,0,1,1\n"));
    run.write("moe_expert_routing.csv", &format!("{moe}\n0.9,0,1,7,1,1,2\n"));
    let header = profilemate_core::STEP_TIMELINE_COLUMNS.join(",");
    let row = |step: u64| {
        let mut f = vec![String::new(); profilemate_core::STEP_TIMELINE_COLUMNS.len()];
        f[0] = step.to_string();
        f[1] = "0.1".into();
        f[2] = "decode".into();
        f[5] = "1".into();
        f[6] = "2.0".into();
        f[11] = "2.5".into();
        f[13] = "0.5".into();
        f.join(",")
    };
    run.write("step_timeline.1.csv", &format!("{header}\n{}\n{}\n", row(1), row(2)));
    run.write("step_timeline.csv", &format!("{header}\n{}\n", row(3)));
    let data = RunData::load(run.path()).unwrap();
    let steps: Vec<Option<u64>> = data.forward_pass.as_ref().unwrap().iter().map(|r| r.step).collect();
    assert_eq!(steps, [None, Some(7), None]);
    let timeline: Vec<u64> = data.step_timeline.as_ref().unwrap().iter().map(|r| r.step).collect();
    assert_eq!(timeline, [1, 2, 3], "the rolled timeline file first, then the live one");
    let moe = data.moe_routing.as_ref().unwrap();
    assert_eq!(moe.tokens[&0], vec![40, 7, 10]);
    assert_eq!((moe.rows, moe.records), (3, 2), "per-step rows: one routing record per step and layer");
}
