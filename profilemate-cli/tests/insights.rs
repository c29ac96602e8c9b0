//! Each insight rule fires on a figure beyond its threshold, and not at or within it.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use profilemate_cli::{Comparison, Insight, Report, Rule, Thresholds};
use serde_json::{json, Value};

fn report_with(files: &[(&str, Value)]) -> Report {
    let run = Run::new();
    for (name, value) in files {
        run.json(name, value);
    }
    Report::from_dir(run.path()).unwrap()
}

fn fired(report: &Report, rule: Rule) -> Option<&Insight> {
    report.insights.iter().find(|i| i.rule == rule)
}

fn batch(key: &str, value: Value) -> Report {
    let mut b = batch_json();
    b[key] = value;
    report_with(&[("batch_utilization_summary.json", b)])
}

fn preemption(edit: impl FnOnce(&mut Value)) -> Report {
    let mut p = preemption_json();
    edit(&mut p);
    report_with(&[("preemption_summary.json", p)])
}

#[test]
fn low_token_utilization_fires_below_60() {
    let r = batch("mean_token_utilization_pct", json!(59.9));
    let i = fired(&r, Rule::LowTokenUtilization).unwrap();
    assert_eq!((i.value, i.threshold, i.comparison), (59.9, 60.0, Comparison::Below));
    assert!(i.to_string().contains("mean token utilization 59.9% < 60.0%"), "{i}");
    assert!(i.advice[0].contains("max_num_batched_tokens"));
    assert!(fired(&batch("mean_token_utilization_pct", json!(60.0)), Rule::LowTokenUtilization).is_none());
    assert!(fired(&batch("mean_token_utilization_pct", json!(60.1)), Rule::LowTokenUtilization).is_none());
}

#[test]
fn low_token_utilization_advice_depends_on_sequence_utilization_and_waiting() {
    let mut b = batch_json();
    b["mean_token_utilization_pct"] = json!(30.0);
    b["mean_seq_utilization_pct"] = json!(20.0);
    let r = report_with(&[("batch_utilization_summary.json", b.clone())]);
    let advice = fired(&r, Rule::LowTokenUtilization).unwrap().advice.join("\n");
    assert!(advice.contains("reduce max_num_seqs"), "{advice}");
    assert!(advice.contains("Requests were waiting"), "mean waiting 0.4 > 0: {advice}");

    b["mean_seq_utilization_pct"] = json!(90.0);
    b["mean_waiting_queue_len"] = json!(0.0);
    let r = report_with(&[("batch_utilization_summary.json", b)]);
    let advice = fired(&r, Rule::LowTokenUtilization).unwrap().advice.join("\n");
    assert!(advice.contains("keep max_num_seqs"), "{advice}");
    assert!(!advice.contains("Requests were waiting"), "{advice}");
    // 256 / 8192 = 3.1 %: decode can never fill the token budget.
    assert!(advice.contains("max_num_seqs / max_tokens = 3.1%"), "{advice}");
}

#[test]
fn high_token_utilization_fires_above_95() {
    let i = fired(&batch("mean_token_utilization_pct", json!(95.1)), Rule::HighTokenUtilization).cloned().unwrap();
    assert_eq!((i.value, i.threshold, i.comparison), (95.1, 95.0, Comparison::Above));
    assert!(i.advice.join(" ").contains("Increase max_num_batched_tokens"));
    assert!(fired(&batch("mean_token_utilization_pct", json!(95.0)), Rule::HighTokenUtilization).is_none());
    assert!(fired(&batch("mean_token_utilization_pct", json!(94.0)), Rule::HighTokenUtilization).is_none());
}

#[test]
fn no_samples_no_utilization_rules() {
    let mut b = batch_json();
    b["total_samples"] = json!(0);
    b["mean_token_utilization_pct"] = json!(0.0);
    let r = report_with(&[("batch_utilization_summary.json", b)]);
    assert!(r.insights.is_empty(), "{:?}", r.insights);
}

#[test]
fn waiting_queue_backlog_from_the_summary_fires_above_mean_1() {
    let i = fired(&batch("mean_waiting_queue_len", json!(1.5)), Rule::WaitingQueueBacklog).cloned().unwrap();
    assert_eq!((i.value, i.threshold), (1.5, 1.0));
    assert_eq!(i.figure, "mean waiting queue length");
    assert!(i.advice[0].contains("overloaded"));
    assert!(fired(&batch("mean_waiting_queue_len", json!(1.0)), Rule::WaitingQueueBacklog).is_none());
    assert!(fired(&batch("mean_waiting_queue_len", json!(0.2)), Rule::WaitingQueueBacklog).is_none());
}

/// With the CSV, "consistently > 0" is the share of batches scheduled while requests waited.
#[test]
fn waiting_queue_backlog_from_the_csv_fires_above_half_the_batches() {
    let make = |waiting_batches: usize, total: usize| {
        let run = Run::new();
        let mut csv = String::from(BATCH_HEADER);
        for i in 0..total {
            let waiting = if i < waiting_batches { 1 } else { 0 };
            csv.push_str(&format!("{i}.0,10,16,62.5,900,1024,87.8906,decode,10,{waiting}\n"));
        }
        run.write("batch_utilization.csv", &csv);
        Report::from_dir(run.path()).unwrap()
    };
    let r = make(11, 20);
    let i = fired(&r, Rule::WaitingQueueBacklog).unwrap();
    assert!((i.value - 55.0).abs() < 1e-9 && i.threshold == 50.0, "{i}");
    assert_eq!(i.figure, "batches scheduled while requests were waiting");
    assert!(fired(&make(10, 20), Rule::WaitingQueueBacklog).is_none(), "exactly half");
    // A mean queue of 5 that is all in one batch is a burst, not a backlog.
    let run = Run::new();
    let mut csv = String::from(BATCH_HEADER);
    for i in 0..10 {
        csv.push_str(&format!("{i}.0,10,16,62.5,900,1024,87.8906,decode,10,{}\n", if i == 0 { 50 } else { 0 }));
    }
    run.write("batch_utilization.csv", &csv);
    let r = Report::from_dir(run.path()).unwrap();
    assert_eq!(r.batch.as_ref().unwrap().summary.mean_waiting_queue_len, 5.0);
    assert!(fired(&r, Rule::WaitingQueueBacklog).is_none());
}

#[test]
fn missing_batch_limits_fire_on_a_zero_limit() {
    let i = fired(&batch("max_tokens", json!(0)), Rule::MissingBatchLimits).cloned().unwrap();
    assert!(i.advice[0].starts_with("max_tokens is 0"), "{:?}", i.advice);
    assert!(fired(&batch("max_tokens", json!(1)), Rule::MissingBatchLimits).is_none());
    assert!(fired(&Report::from_dir(Run::normal().path()).unwrap(), Rule::MissingBatchLimits).is_none());
}

#[test]
fn high_preemption_rate_fires_above_10_percent() {
    let r = preemption(|p| p["preemption_rate_pct"] = json!(10.5));
    let i = fired(&r, Rule::HighPreemptionRate).unwrap();
    assert_eq!((i.value, i.threshold), (10.5, 10.0));
    assert!(i.advice[0].contains("gpu_memory_utilization"));
    assert!(fired(&preemption(|p| p["preemption_rate_pct"] = json!(10.0)), Rule::HighPreemptionRate).is_none());
    assert!(fired(&preemption(|p| p["preemption_rate_pct"] = json!(3.6)), Rule::HighPreemptionRate).is_none());
}

#[test]
fn long_resume_delay_fires_above_1_second() {
    let r = preemption(|p| p["mean_resume_delay"] = json!(1.2));
    let i = fired(&r, Rule::LongResumeDelay).unwrap();
    assert_eq!((i.value, i.threshold, i.unit), (1.2, 1.0, "s"));
    assert!(i.to_string().contains("mean resume delay 1.200 s > 1.000 s"), "{i}");
    assert!(fired(&preemption(|p| p["mean_resume_delay"] = json!(1.0)), Rule::LongResumeDelay).is_none());
    assert!(fired(&preemption(|p| p["mean_resume_delay"] = json!(0.9)), Rule::LongResumeDelay).is_none());
}

#[test]
fn recompute_dominating_points_at_kv_cache_pressure_not_cuda_graphs() {
    let r = preemption(|p| p["preemption_reasons"] = json!({"RECOMPUTE": 30, "SWAP": 10, "kv_cache_full": 5}));
    let i = fired(&r, Rule::RecomputeDominates).unwrap();
    assert!((i.value - 30.0 / 45.0 * 100.0).abs() < 1e-9);
    assert_eq!(i.threshold, 50.0);
    let advice = i.advice.join("\n");
    assert!(advice.contains("KV cache"), "{advice}");
    assert!(advice.contains("gpu_memory_utilization") && advice.contains("max_num_seqs"), "{advice}");
    assert!(advice.contains("not a CUDA graph issue"), "{advice}");
    assert!(!advice.to_lowercase().contains("graph mode"), "the seed's wrong advice: {advice}");
    assert!(i.title.contains("KV-cache pressure"));

    // Exactly half does not dominate; fewer does not either.
    let half = preemption(|p| p["preemption_reasons"] = json!({"RECOMPUTE": 20, "SWAP": 20, "kv_cache_full": 5}));
    assert!(fired(&half, Rule::RecomputeDominates).is_none());
    let r = preemption(|p| {
        p["total_preemptions"] = json!(4);
        p["preemption_reasons"] = json!({"RECOMPUTE": 2, "SWAP": 2});
    });
    assert!(fired(&r, Rule::RecomputeDominates).is_none());
    // No preemptions at all: nothing to dominate, and no resume rule either.
    let r = preemption(|p| {
        p["total_preemptions"] = json!(0);
        p["preemption_reasons"] = json!({});
        p["mean_resume_delay"] = json!(0.0);
    });
    assert!(r.insights.is_empty(), "{:?}", r.insights);
}

fn cpu_with_host_ms(host_ms_per_op: f64) -> Report {
    // Forward time 39320 ms (the normal run); host work = 4100 * host_ms_per_op.
    report_with(&[
        ("forward_pass_summary.json", forward_json()),
        (
            "cpu_timing_summary.json",
            json!({"scheduling": op(4100, host_ms_per_op, 1.0), "model_execution": op(4100, 10.0, 12.0)}),
        ),
    ])
}

#[test]
fn high_cpu_overhead_fires_above_10_percent_of_step_time() {
    // 10 % exactly: host / (host + 39320) = 0.1 <=> host = 4368.9 ms.
    let at = 39_320.0 / 9.0 / 4100.0;
    let r = cpu_with_host_ms(at * 1.01);
    let i = fired(&r, Rule::HighCpuOverhead).unwrap();
    assert!(i.value > 10.0 && i.value < 10.2, "{}", i.value);
    assert!(i.advice[0].contains("`scheduling`"), "{:?}", i.advice);
    assert!(fired(&cpu_with_host_ms(at * 0.99), Rule::HighCpuOverhead).is_none());
    // model_execution wraps the forward pass and is not host overhead, however large.
    let r = report_with(&[
        ("forward_pass_summary.json", forward_json()),
        ("cpu_timing_summary.json", json!({"model_execution": op(4100, 50.0, 60.0)})),
    ]);
    assert!(r.cpu.as_ref().unwrap().cpu_share_pct.unwrap() > 80.0, "the seed's figure counts it");
    assert!(fired(&r, Rule::HighCpuOverhead).is_none());
    // Without forward pass data the share is unknown and the rule is silent.
    let r = report_with(&[("cpu_timing_summary.json", json!({"scheduling": op(10, 100.0, 100.0)}))]);
    assert!(fired(&r, Rule::HighCpuOverhead).is_none());
}

fn decode(count: u64, p50: f64, p99: f64) -> Report {
    let mut fp = forward_json();
    fp["decode"] = phase(count, p50, p50, p50, p99, count * 32, 1000.0);
    report_with(&[("forward_pass_summary.json", fp)])
}

#[test]
fn decode_tail_fires_above_p99_twice_p50() {
    let i = fired(&decode(1000, 8.0, 16.8), Rule::DecodeTailLatency).cloned().unwrap();
    assert!((i.value - 2.1).abs() < 1e-12);
    assert_eq!((i.threshold, i.unit), (2.0, "x"));
    assert!(i.advice[0].contains("p99 16.800 ms"), "{:?}", i.advice);
    assert!(fired(&decode(1000, 8.0, 16.0), Rule::DecodeTailLatency).is_none());
    assert!(fired(&decode(1000, 8.0, 12.0), Rule::DecodeTailLatency).is_none());
    // Too few passes for a p99 to mean anything.
    assert!(fired(&decode(99, 8.0, 40.0), Rule::DecodeTailLatency).is_none());
}

fn encoder_share(model_type: &str, encoder_pct: f64) -> Report {
    let mut ed = encoder_decoder_json();
    ed["model_type"] = json!(model_type);
    ed["encoder_pct"] = json!(encoder_pct);
    ed["decoder_pct"] = json!(100.0 - encoder_pct);
    report_with(&[("encoder_decoder_summary.json", ed)])
}

#[test]
fn encoder_bottleneck_fires_above_half_for_encoder_decoder_models() {
    let i = fired(&encoder_share("encoder_decoder", 62.0), Rule::EncoderBottleneck).cloned().unwrap();
    assert_eq!((i.value, i.threshold), (62.0, 50.0));
    assert_eq!(i.severity, profilemate_cli::Severity::Info);
    assert!(fired(&encoder_share("encoder_decoder", 50.0), Rule::EncoderBottleneck).is_none());
    assert!(fired(&encoder_share("encoder_decoder", 15.1), Rule::EncoderBottleneck).is_none());
    assert!(fired(&encoder_share("decoder_only", 62.0), Rule::EncoderBottleneck).is_none());
}

#[test]
fn dropped_events_fire_above_zero() {
    let mut m = manifest_json();
    m["dropped"]["forward_pass"]["buffer_full"] = json!(3);
    let r = report_with(&[("profilemate_run.json", m)]);
    let i = fired(&r, Rule::EventsDropped).unwrap();
    assert_eq!(i.value, 3.0);
    assert!(fired(&report_with(&[("profilemate_run.json", manifest_json())]), Rule::EventsDropped).is_none());
}

#[test]
fn thresholds_can_be_changed() {
    let run = Run::normal();
    let data = profilemate_cli::RunData::load(run.path()).unwrap();
    let strict = Thresholds { preemption_rate_pct: 3.0, high_token_utilization_pct: 80.0, ..Thresholds::default() };
    let r = Report::from_data(&data, &strict);
    let rules: Vec<Rule> = r.insights.iter().map(|i| i.rule).collect();
    assert_eq!(rules, vec![Rule::HighTokenUtilization, Rule::HighPreemptionRate]);
    assert_eq!(r.thresholds, strict);
}

#[test]
fn insights_serialize_with_figure_and_threshold() {
    let r = batch("mean_token_utilization_pct", json!(42.0));
    let v = serde_json::to_value(&r).unwrap();
    let i = &v["insights"][0];
    assert_eq!(i["rule"], "low_token_utilization");
    assert_eq!(i["value"], 42.0);
    assert_eq!(i["threshold"], 60.0);
    assert_eq!(i["comparison"], "<");
    assert_eq!(i["unit"], "%");
    assert!(i["advice"].as_array().unwrap().len() >= 2);
    assert!(r.to_string().contains("[warning] Low token utilization: mean token utilization 42.0% < 60.0%"));
}
