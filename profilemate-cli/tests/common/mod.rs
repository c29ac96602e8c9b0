//! Fixture run directories written file by file, as an engine would.
#![allow(dead_code, clippy::unwrap_used)]

use serde_json::{json, Value};
use std::path::Path;
use tempfile::TempDir;

pub const FORWARD_HEADER: &str =
    "timestamp_sec,phase,batch_size,num_tokens,forward_time_ms,throughput_tokens_per_sec\n";
pub const CPU_HEADER: &str = "timestamp_sec,operation,duration_ms,context\n";
pub const BATCH_HEADER: &str = "timestamp_sec,num_seqs,max_num_seqs,seq_utilization_pct,num_tokens,max_tokens,token_utilization_pct,phase,running_queue_len,waiting_queue_len\n";
pub const EVENTS_HEADER: &str = "timestamp_sec,request_id,event,reason,running_time_sec,extra_info\n";
pub const LIFECYCLE_HEADER: &str = "request_id,started_sec,preempted_sec,resumed_sec,finished_sec,total_time_sec,preemption_delay_sec,num_preemptions\n";
pub const COMPONENT_HEADER: &str = "timestamp_sec,component,duration_ms,context\n";
pub const KV_HEADER: &str = "timestamp_sec,used_blocks,total_blocks,usage_pct,prefix_cache_queries,prefix_cache_hits\n";
pub const GRAPH_HEADER: &str = "timestamp_sec,event,batch_size,padded_batch_size,duration_ms\n";
pub const MOE_HEADER: &str = "timestamp_sec,layer,expert_id,num_tokens\n";

pub struct Run {
    pub dir: TempDir,
}

impl Run {
    pub fn new() -> Run {
        Run { dir: tempfile::tempdir().unwrap() }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn write(&self, name: &str, content: &str) -> &Run {
        std::fs::write(self.path().join(name), content).unwrap();
        self
    }

    pub fn json(&self, name: &str, value: &Value) -> &Run {
        self.write(name, &serde_json::to_string_pretty(value).unwrap())
    }

    pub fn remove(&self, name: &str) -> &Run {
        std::fs::remove_file(self.path().join(name)).unwrap();
        self
    }

    /// Every summary of a normal run (the seed's example numbers), and the manifest.
    pub fn normal() -> Run {
        let run = Run::new();
        run.json("forward_pass_summary.json", &forward_json());
        run.json("cpu_timing_summary.json", &cpu_json());
        run.json("batch_utilization_summary.json", &batch_json());
        run.json("preemption_summary.json", &preemption_json());
        run.json("encoder_decoder_summary.json", &encoder_decoder_json());
        run.json("kv_cache_summary.json", &kv_json());
        run.json("cuda_graph_summary.json", &graph_json());
        run.json("moe_expert_summary.json", &moe_json(&[vec![110, 100, 95, 100, 105, 90, 100, 100], vec![100; 8]]));
        run.json("profilemate_run.json", &manifest_json());
        run
    }
}

pub fn phase(count: u64, mean: f64, p50: f64, p95: f64, p99: f64, tokens: u64, tput: f64) -> Value {
    json!({
        "count": count, "mean_ms": mean, "std_ms": if count > 0 { 1.0 } else { 0.0 },
        "min_ms": if count > 0 { p50 * 0.8 } else { 0.0 }, "max_ms": p99 * 1.2,
        "p50_ms": p50, "p95_ms": p95, "p99_ms": p99, "total_ms": count as f64 * mean,
        "total_tokens": tokens, "mean_throughput_tokens_per_sec": tput
    })
}

pub fn forward_json() -> Value {
    json!({
        "prefill": phase(100, 45.2, 43.5, 62.3, 71.2, 25_600, 5658.3),
        "decode": phase(4000, 8.7, 8.5, 10.8, 12.4, 128_000, 3651.2),
        "mixed": phase(0, 0.0, 0.0, 0.0, 0.0, 0, 0.0),
    })
}

pub fn op(count: u64, mean: f64, p95: f64) -> Value {
    json!({
        "count": count, "mean_ms": mean, "std_ms": 0.1, "min_ms": mean * 0.5, "max_ms": mean * 3.0,
        "p50_ms": mean, "p95_ms": p95, "p99_ms": p95 * 1.1, "total_ms": count as f64 * mean
    })
}

/// Host operations 4100 * 0.75 ms = 3075 ms against 39320 ms forward: 7.25 %.
pub fn cpu_json() -> Value {
    json!({
        "scheduling": op(4100, 0.5, 0.7),
        "sampling": op(4100, 0.25, 0.4),
        "model_execution": op(4100, 10.0, 12.0),
    })
}

pub fn batch_json() -> Value {
    json!({
        "total_samples": 4100, "mean_seq_utilization_pct": 67.3, "mean_token_utilization_pct": 82.1,
        "underutilization_events": 234, "underutilization_threshold_pct": 50.0,
        "prefill_avg_utilization": 89.2, "decode_avg_utilization": 78.5, "mixed_avg_utilization": 0.0,
        "max_num_seqs": 256, "max_tokens": 8192, "mean_running_queue_len": 24.0,
        "mean_waiting_queue_len": 0.4, "max_waiting_queue_len": 12
    })
}

pub fn preemption_json() -> Value {
    json!({
        "total_preemptions": 45, "total_requests": 1234, "requests_preempted": 40,
        "preemption_rate_pct": 45.0 / 1234.0 * 100.0,
        "preemption_reasons": {"RECOMPUTE": 20, "SWAP": 20, "kv_cache_full": 5},
        "mean_running_time_before_preempt": 0.523, "mean_resume_delay": 0.8, "max_resume_delay": 3.456
    })
}

pub fn component(count: u64, total: f64) -> Value {
    let mean = if count > 0 { total / count as f64 } else { 0.0 };
    json!({
        "count": count, "total_ms": total, "mean_ms": mean, "std_ms": 0.0, "min_ms": mean,
        "max_ms": mean, "p50_ms": mean, "p95_ms": mean
    })
}

pub fn encoder_decoder_json() -> Value {
    json!({
        "model_type": "encoder_decoder",
        "encoder": component(1234, 22456.7), "decoder": component(1234, 126234.5),
        "cross_attention": component(0, 0.0),
        "encoder_pct": 15.1, "decoder_pct": 84.9, "cross_attention_pct": 0.0
    })
}

/// A KV cache with room to spare and a useful prefix cache.
pub fn kv_json() -> Value {
    json!({
        "mean_usage_pct": 61.5, "max_usage_pct": 92.0, "samples": 4100, "prefix_cache_hit_rate_pct": 45.0,
        "prefix_cache_queries": 1000, "prefix_cache_hits": 450, "total_blocks": 1024, "full_samples": 0
    })
}

/// Graphs for every decode batch: 95.1 % of steps replay, with little padding.
pub fn graph_json() -> Value {
    json!({
        "captures": 35, "replays": 3900, "eager_steps": 200, "replay_rate_pct": 3900.0 / 4100.0 * 100.0,
        "mean_padding_pct": 8.0, "capture_time_ms": 1234.5,
        "captured_sizes": [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96, 104, 112, 120, 128, 136, 144,
                           152, 160, 168, 176, 184, 192, 200, 208, 216, 224, 232, 240, 248, 256],
        "max_eager_batch_size": 200
    })
}

/// `moe_expert_summary.json` for layers 0, 1, ... with these tokens per expert, computed as the
/// core does.
pub fn moe_json(layers: &[Vec<u64>]) -> Value {
    let mut out = serde_json::Map::new();
    let mut order = Vec::new();
    for (l, tokens) in layers.iter().enumerate() {
        let total: u64 = tokens.iter().sum();
        let mean = total as f64 / tokens.len() as f64;
        let max = *tokens.iter().max().unwrap();
        let hottest = tokens.iter().position(|t| *t == max).unwrap();
        let var = tokens.iter().map(|t| (*t as f64 - mean).powi(2)).sum::<f64>() / tokens.len() as f64;
        let max_over_mean = if mean > 0.0 { max as f64 / mean } else { 0.0 };
        order.push((l, max_over_mean));
        out.insert(
            l.to_string(),
            json!({
                "tokens_per_expert": tokens, "total_tokens": total, "max_over_mean": max_over_mean,
                "coefficient_of_variation": if mean > 0.0 { var.sqrt() / mean } else { 0.0 },
                "hottest_expert": hottest, "coldest_expert": 0
            }),
        );
    }
    order.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let max = order.first().map_or(0.0, |o| o.1);
    let mean = if order.is_empty() { 0.0 } else { order.iter().map(|o| o.1).sum::<f64>() / order.len() as f64 };
    json!({
        "layers": out, "most_imbalanced_layers": order.iter().map(|o| o.0).collect::<Vec<_>>(),
        "max_over_mean": max, "mean_max_over_mean": mean, "records": 100 * layers.len()
    })
}

pub fn manifest_json() -> Value {
    json!({
        "format_version": 1, "profilemate_version": "0.1.0", "started_at": "2026-01-01T00:00:00Z",
        "pid": 42, "host": "gpu-node-7", "timing_backend": "cuda", "steps": 4100, "finished": true,
        "config": {"underutilization_threshold_pct": 50.0},
        "dropped": {"forward_pass": {"buffer_full": 0}, "cpu_timing": {"buffer_full": 0}}
    })
}

/// CSV rows of a small run with every table filled, for figures and recomputation.
fn util_of(tokens: u64) -> f64 {
    tokens as f64 / 4096.0 * 100.0
}

pub fn write_csv_run(run: &Run, steps: usize) {
    let mut fp = String::from(FORWARD_HEADER);
    let mut cpu = String::from(CPU_HEADER);
    let mut batch = String::from(BATCH_HEADER);
    let mut comp = String::from(COMPONENT_HEADER);
    let mut timeline = format!("{}\n", profilemate_core::STEP_TIMELINE_COLUMNS.join(","));
    let mut t = 0.0f64;
    for i in 0..steps {
        let (phase, tokens, ms) = match i % 10 {
            0 => ("prefill", 2048u64, 40.0 + (i % 7) as f64),
            5 => ("mixed", 600, 15.0 + (i % 3) as f64),
            _ => ("decode", 32, 8.0 + (i % 5) as f64 * 0.25),
        };
        fp.push_str(&format!("{t:.6},{phase},32,{tokens},{ms:.3},{:.3}\n", tokens as f64 / ms * 1000.0));
        cpu.push_str(&format!("{t:.6},scheduling,{:.3},\n", 0.5 + (i % 3) as f64 * 0.1));
        cpu.push_str(&format!("{t:.6},sampling,0.300,\"phase={phase};batch_size=32\"\n"));
        let util = util_of(tokens);
        batch.push_str(&format!("{t:.6},32,64,50.0000,{tokens},4096,{:.4},{phase},32,{}\n", util.min(100.0), i % 4));
        if i % 10 == 0 {
            comp.push_str(&format!("{t:.6},encoder,{:.3},vision_encoder\n", 12.0 + (i % 3) as f64));
        }
        comp.push_str(&format!("{t:.6},decoder,{ms:.3},language_model\n"));
        // One step: its forward pass, scheduling and sampling, 0.1 ms no profiler claims, a
        // 1 ms gap before it (a 20 ms one before every 25th step), a preemption every 7th.
        let scheduling = 0.5 + (i % 3) as f64 * 0.1;
        let gap = if i == 0 {
            String::new()
        } else if i % 25 == 0 {
            "20.000".into()
        } else {
            "1.000".into()
        };
        let encoder = if i % 10 == 0 { format!("{:.3}", 12.0 + (i % 3) as f64) } else { "0.000".into() };
        timeline.push_str(&format!(
            "{},{t:.6},{phase},32,{tokens},1,{ms:.3},{scheduling:.3},,0.300,,{:.3},{gap},0.100,50.0000,{:.4},32,{},{},{},,,{},0,{encoder},{ms:.3},{:.4}\n",
            i + 1,
            ms + scheduling + 0.4,
            util_of(tokens).min(100.0),
            i % 4,
            200.0 / 1024.0 * 100.0,
            if i % 10 == 0 { "eager" } else { "replay" },
            u64::from(i % 7 == 3),
            1.5 + (i % 4) as f64 * 0.1,
        ));
        t += ms / 1000.0 + 0.001;
    }
    let mut events = String::from(EVENTS_HEADER);
    let mut lifecycle = String::from(LIFECYCLE_HEADER);
    for r in 0..20 {
        let s = r as f64 * 0.1;
        events.push_str(&format!("{s:.6},req-{r},started,,,\n"));
        if r % 5 == 0 {
            events.push_str(&format!("{:.6},req-{r},preempted,RECOMPUTE,0.200000,\"num_blocks=128,x\"\n", s + 0.2));
            events.push_str(&format!("{:.6},req-{r},resumed,,,\n", s + 0.5));
            events.push_str(&format!("{:.6},req-{r},finished,,,\n", s + 1.0));
            lifecycle.push_str(&format!(
                "req-{r},{s:.6},{:.6},{:.6},{:.6},1.000000,0.300000,1\n",
                s + 0.2,
                s + 0.5,
                s + 1.0
            ));
        } else {
            events.push_str(&format!("{:.6},req-{r},finished,,,\n", s + 1.0));
            lifecycle.push_str(&format!("req-{r},{s:.6},,,{:.6},1.000000,,0\n", s + 1.0));
        }
    }
    // Trackers: the KV cache fills up and drains, decode steps replay graphs of sizes 1, 2, 4,
    // 8, 16, 32 and prompt steps run eagerly; two MoE layers of eight experts, one skewed.
    let mut kv = String::from(KV_HEADER);
    let mut graphs = String::from(GRAPH_HEADER);
    for (i, size) in [1u64, 2, 4, 8, 16, 32].iter().enumerate() {
        graphs.push_str(&format!("{:.6},capture,{size},,{:.3}\n", i as f64 * 0.0001, 1.0 + *size as f64 * 0.1));
    }
    let mut moe = String::from(MOE_HEADER);
    let mut t = 0.0f64;
    for i in 0..steps {
        let used = 200 + (i % 50) as u64 * 17;
        let total = 1024u64;
        let used = used.min(total);
        kv.push_str(&format!(
            "{t:.6},{used},{total},{:.4},{},{}\n",
            used as f64 / total as f64 * 100.0,
            i % 3,
            u64::from(i % 6 == 0)
        ));
        let batch = 3 + (i % 27) as u64;
        if i % 5 == 0 {
            graphs.push_str(&format!("{t:.6},eager,{batch},,\n"));
        } else {
            let padded = [1u64, 2, 4, 8, 16, 32].into_iter().find(|s| *s >= batch).unwrap_or(32);
            graphs.push_str(&format!("{t:.6},replay,{batch},{padded},\n"));
        }
        for expert in 0..8u64 {
            moe.push_str(&format!("{t:.6},0,{expert},{}\n", 10 + expert));
            moe.push_str(&format!("{t:.6},1,{expert},{}\n", if expert == 5 { 60 } else { 5 }));
        }
        t += 0.01;
    }
    run.write("kv_cache_usage.csv", &kv).write("cuda_graph_events.csv", &graphs).write("moe_expert_routing.csv", &moe);

    run.write("forward_pass_timing.csv", &fp)
        .write("cpu_operations_timing.csv", &cpu)
        .write("batch_utilization.csv", &batch)
        .write("encoder_decoder_timing.csv", &comp)
        .write("preemption_events.csv", &events)
        .write("request_lifecycle.csv", &lifecycle)
        .write("step_timeline.csv", &timeline);
}
