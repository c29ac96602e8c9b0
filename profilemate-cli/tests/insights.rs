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

// --- the trackers beyond the five profilers ----------------------------------------------------

/// A cache sampled once a second, at 96 % for the first `full` seconds and 50 % after, and one
/// preemption half a second after each sample.
fn kv_preemptions(full: usize, total: usize) -> Report {
    let run = Run::new();
    let mut kv = String::from(KV_HEADER);
    let mut events = String::from(EVENTS_HEADER);
    for i in 0..total {
        let used = if i < full { 96 } else { 50 };
        kv.push_str(&format!("{i}.000000,{used},100,{used}.0000,0,0\n"));
        events.push_str(&format!("{i}.500000,req-{i},preempted,RECOMPUTE,0.100000,\n"));
    }
    run.write("kv_cache_usage.csv", &kv).write("preemption_events.csv", &events);
    Report::from_dir(run.path()).unwrap()
}

#[test]
fn preemptions_at_full_kv_cache_fire_above_half_of_the_preemptions() {
    let r = kv_preemptions(3, 5);
    let i = fired(&r, Rule::PreemptionsAtFullKvCache).unwrap();
    assert_eq!((i.value, i.threshold, i.unit, i.comparison), (60.0, 50.0, "%", Comparison::Above));
    assert!(i.title.contains("KV-cache pressure confirmed"), "{}", i.title);
    assert!(i.figure.contains(">= 95%"), "{}", i.figure);
    let advice = i.advice.join("\n");
    assert!(advice.contains("3 of 5 preemptions came when the cache was at least 95% full"), "{advice}");
    assert!(advice.contains("gpu_memory_utilization"), "{advice}");
    assert!(fired(&kv_preemptions(2, 4), Rule::PreemptionsAtFullKvCache).is_none(), "exactly half");
    assert!(fired(&kv_preemptions(1, 5), Rule::PreemptionsAtFullKvCache).is_none());
    assert!(fired(&kv_preemptions(0, 0), Rule::PreemptionsAtFullKvCache).is_none(), "no preemption");
    // Only KV samples, no preemption events: nothing to match.
    let run = Run::new();
    run.write("kv_cache_usage.csv", &format!("{KV_HEADER}0.1,100,100,100.0000,0,0\n"));
    assert!(fired(&Report::from_dir(run.path()).unwrap(), Rule::PreemptionsAtFullKvCache).is_none());
}

fn kv(edit: impl FnOnce(&mut Value)) -> Report {
    let mut k = kv_json();
    edit(&mut k);
    report_with(&[("kv_cache_summary.json", k)])
}

#[test]
fn low_prefix_cache_hit_rate_fires_below_20_percent_when_queried() {
    let r = kv(|k| {
        k["prefix_cache_hit_rate_pct"] = json!(19.9);
        k["prefix_cache_hits"] = json!(199);
    });
    let i = fired(&r, Rule::LowPrefixCacheHitRate).unwrap();
    assert_eq!((i.value, i.threshold, i.comparison), (19.9, 20.0, Comparison::Below));
    assert_eq!(i.severity, profilemate_cli::Severity::Info);
    assert!(i.advice[0].contains("199 of 1000 prefix-cache queries hit"), "{:?}", i.advice);
    assert!(fired(&kv(|k| k["prefix_cache_hit_rate_pct"] = json!(20.0)), Rule::LowPrefixCacheHitRate).is_none());
    assert!(fired(&kv(|_| {}), Rule::LowPrefixCacheHitRate).is_none(), "45 %");
    // No queries: prefix caching is off, a 0 % hit rate means nothing.
    let r = kv(|k| {
        k["prefix_cache_hit_rate_pct"] = json!(0.0);
        k["prefix_cache_queries"] = json!(0);
        k["prefix_cache_hits"] = json!(0);
    });
    assert!(fired(&r, Rule::LowPrefixCacheHitRate).is_none());
}

fn graphs(edit: impl FnOnce(&mut Value)) -> Report {
    let mut g = graph_json();
    edit(&mut g);
    report_with(&[("cuda_graph_summary.json", g)])
}

#[test]
fn low_graph_replay_rate_fires_below_80_percent() {
    let r = graphs(|g| g["replay_rate_pct"] = json!(79.9));
    let i = fired(&r, Rule::LowGraphReplayRate).unwrap();
    assert_eq!((i.value, i.threshold, i.comparison), (79.9, 80.0, Comparison::Below));
    assert!(i.advice[0].contains("200 of 4100 steps ran eagerly"), "{:?}", i.advice);
    assert!(fired(&graphs(|g| g["replay_rate_pct"] = json!(80.0)), Rule::LowGraphReplayRate).is_none());
    assert!(fired(&graphs(|_| {}), Rule::LowGraphReplayRate).is_none(), "95.1 %");
    // No step at all: no rate.
    let r = graphs(|g| {
        g["replays"] = json!(0);
        g["eager_steps"] = json!(0);
        g["replay_rate_pct"] = json!(0.0);
    });
    assert!(fired(&r, Rule::LowGraphReplayRate).is_none());
    // From the summary alone: the largest eager batch beyond the largest graph is named.
    let r = graphs(|g| {
        g["replay_rate_pct"] = json!(50.0);
        g["max_eager_batch_size"] = json!(300);
    });
    let advice = fired(&r, Rule::LowGraphReplayRate).unwrap().advice.join("\n");
    assert!(advice.contains("The largest eager batch (300) is beyond the largest captured graph (256)"), "{advice}");
}

/// The advice tells eager steps beyond the largest graph from prompt steps a graph would cover.
#[test]
fn low_graph_replay_rate_advice_names_why_steps_ran_eagerly() {
    let run = Run::new();
    let mut csv = format!("{GRAPH_HEADER}0.0,capture,8,,1.0\n0.0,capture,16,,1.0\n");
    for i in 0..10 {
        let t = f64::from(i) * 0.1 + 0.1;
        match i {
            0..=3 => csv.push_str(&format!("{t:.6},replay,8,8,\n")),
            4..=6 => csv.push_str(&format!("{t:.6},eager,{},,\n", 20 + i)),
            _ => csv.push_str(&format!("{t:.6},eager,4,,\n")),
        }
    }
    run.write("cuda_graph_events.csv", &csv);
    // Three prefill and mixed passes, as many as the eager steps within the graphs.
    let mut fp = forward_json();
    fp["prefill"] = phase(1, 40.0, 40.0, 40.0, 40.0, 512, 1000.0);
    fp["mixed"] = phase(2, 20.0, 20.0, 20.0, 20.0, 512, 1000.0);
    run.json("forward_pass_summary.json", &fp);
    let r = Report::from_dir(run.path()).unwrap();
    let i = fired(&r, Rule::LowGraphReplayRate).unwrap();
    assert!((i.value - 40.0).abs() < 1e-9, "{}", i.value);
    let advice = i.advice.join("\n");
    assert!(
        advice.contains("3 eager steps had batch sizes beyond the largest captured graph (16; largest eager batch 26)"),
        "{advice}"
    );
    assert!(advice.contains("3 eager steps had batch sizes a captured graph covers"), "{advice}");
    assert!(advice.contains("3 prefill and mixed passes against 6 eager steps."), "{advice}");
}

#[test]
fn graph_padding_waste_fires_above_20_percent() {
    let r = graphs(|g| g["mean_padding_pct"] = json!(20.5));
    let i = fired(&r, Rule::GraphPaddingWaste).unwrap();
    assert_eq!((i.value, i.threshold, i.comparison), (20.5, 20.0, Comparison::Above));
    assert!(i.advice.join(" ").contains("cudagraph_capture_sizes"), "{:?}", i.advice);
    assert!(fired(&graphs(|g| g["mean_padding_pct"] = json!(20.0)), Rule::GraphPaddingWaste).is_none());
    assert!(fired(&graphs(|_| {}), Rule::GraphPaddingWaste).is_none(), "8 %");
    // With the CSV, the graph that wastes most is named: batches of 9 padded to 16.
    let run = Run::new();
    run.write(
        "cuda_graph_events.csv",
        &format!("{GRAPH_HEADER}0.0,capture,8,,1.0\n0.0,capture,16,,1.0\n0.1,replay,9,16,\n0.2,replay,9,16,\n0.3,replay,7,8,\n"),
    );
    let r = Report::from_dir(run.path()).unwrap();
    let i = fired(&r, Rule::GraphPaddingWaste).unwrap();
    assert!((i.value - (43.75 * 2.0 + 12.5) / 3.0).abs() < 1e-9, "{}", i.value);
    assert!(
        i.advice[1].contains("graph size 16: 14 padded slots over 2 replays (43.8% of its slots)"),
        "{:?}",
        i.advice
    );
}

fn moe(layers: &[Vec<u64>]) -> Report {
    report_with(&[("moe_expert_summary.json", moe_json(layers))])
}

#[test]
fn moe_expert_imbalance_fires_above_1_5_and_names_the_layers() {
    // max / mean: layer 0 even (1.0), layer 1 1.6, layer 2 2.0.
    let r = moe(&[vec![100; 4], vec![160, 80, 80, 80], vec![200, 100, 50, 50]]);
    let i = fired(&r, Rule::MoeExpertImbalance).unwrap();
    assert_eq!((i.value, i.threshold, i.unit), (2.0, 1.5, "x"));
    let advice = i.advice.join("\n");
    assert!(
        advice.contains("2 of 3 layers are above 1.50x: layer 2 (2.00x, expert 0 takes 50.0%), layer 1 (1.60x, expert 0 takes 40.0%)."),
        "{advice}"
    );
    assert!(!advice.contains("layer 0 ("), "{advice}");
    assert!(i.to_string().contains("2.00x > 1.50x"), "{i}");
    assert!(fired(&moe(&[vec![150, 50, 100, 100]]), Rule::MoeExpertImbalance).is_none(), "exactly 1.5");
    assert!(fired(&moe(&[vec![100; 8], vec![110, 90, 100, 100]]), Rule::MoeExpertImbalance).is_none());
    assert!(fired(&moe(&[]), Rule::MoeExpertImbalance).is_none(), "no layer");
}

#[test]
fn tracker_rules_on_a_csv_run() {
    let run = Run::new();
    write_csv_run(&run, 200);
    let r = Report::from_dir(run.path()).unwrap();
    // 160 replays of 200 steps: exactly at the threshold, silent.
    assert_eq!(r.cuda_graph.as_ref().unwrap().summary.replay_rate_pct, 80.0);
    assert!(fired(&r, Rule::LowGraphReplayRate).is_none());
    // Layer 1 sends 60 of 95 tokens to expert 5.
    let i = fired(&r, Rule::MoeExpertImbalance).unwrap();
    assert!(
        i.advice[0].starts_with("1 of 2 layers are above 1.50x: layer 1 (5.05x, expert 5 takes 63.2%)"),
        "{:?}",
        i.advice
    );
}
