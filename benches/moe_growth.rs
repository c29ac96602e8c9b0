//! How the cost of a step grows with the MoE model's size: bytes written per step and collector
//! time per step from 8 layers x 8 experts up to DeepSeek-V3's 58 x 256 (top-8), and the step
//! rate a session sustains at the largest shape without dropping anything.
//!
//! ```text
//! cargo bench --bench moe_growth
//! ```
//!
//! Each step records what an engine step records (a forward pass, three CPU operations, a batch
//! sample, a KV-cache sample) plus one routing call per MoE layer: 128 tokens, each routed to 8
//! experts (top-2 below 16 experts), skewed so that some experts stay cold. Steps are paced at a
//! fixed rate against a default session (100 ms collector period, CSV and JSON). Collector time:
//! the CPU time of the collector thread (from `/proc`) divided by the steps. Bytes: what the CSV
//! files received, from the manifest, with the default windows of 100 steps and with per-step rows
//! (`PROFILEMATE_MOE_WINDOW=step`). Sustained: the largest shape at rising rates, with the
//! manifest's drops counted.

use profilemate::{BatchSample, CpuOp, KvCacheSample, Phase, Session};
use std::time::{Duration, Instant};

const SHAPES: [(u32, u32); 5] = [(8, 8), (16, 64), (32, 128), (58, 128), (58, 256)];
const TOKENS: u32 = 128;

/// Per layer, the tokens each expert receives in a step (rotating among 4 patterns).
fn routing(layers: u32, experts: u32) -> Vec<Vec<Vec<u32>>> {
    let top_k = if experts >= 16 { 8 } else { 2 };
    (0..4u32)
        .map(|pattern| {
            (0..layers)
                .map(|layer| {
                    let mut counts = vec![0u32; experts as usize];
                    for token in 0..TOKENS {
                        for k in 0..top_k {
                            // Skewed: low expert ids are hot; distinct experts per token.
                            let hot = (token * 7 + layer * 13 + pattern * 3) % (experts / 2).max(1);
                            let e = (hot + k * (experts / top_k).max(1)) % experts;
                            counts[e as usize] += 1;
                        }
                    }
                    counts
                })
                .collect()
        })
        .collect()
}

fn step(session: &Session, routes: &[Vec<Vec<u32>>], i: u64) {
    let (forward, cpu, batches, kv, moe) = (
        session.forward_pass(),
        session.cpu_timing(),
        session.batch_utilization(),
        session.kv_cache(),
        session.moe_experts(),
    );
    cpu.record(CpuOp::SCHEDULING, Duration::from_micros(80), "");
    batches.record(&BatchSample {
        num_seqs: 32,
        max_num_seqs: 256,
        num_tokens: TOKENS,
        max_tokens: 8192,
        phase: Phase::Decode,
        running_queue_len: 32,
        waiting_queue_len: 4,
    });
    cpu.record(CpuOp::BATCH_PREPARATION, Duration::from_micros(40), "");
    for (layer, counts) in routes[(i % 4) as usize].iter().enumerate() {
        moe.record_layer(layer as u32, counts);
    }
    forward.record(Phase::Decode, 32, TOKENS, Duration::from_micros(900 + i % 50));
    cpu.record(CpuOp::SAMPLING, Duration::from_micros(30), "");
    kv.record(&KvCacheSample { used_blocks: 400, total_blocks: 1000, prefix_cache_queries: 0, prefix_cache_hits: 0 });
}

/// CPU time (user + system) of this process's collector threads so far, in nanoseconds.
fn collector_cpu_ns() -> u64 {
    let tick_ns = 1_000_000_000 / 100; // USER_HZ is 100 on Linux.
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task").into_iter().flatten().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !comm.starts_with("profilemate-col") {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // Fields after the command name (which ends with ')'): utime and stime are 14th and 15th.
        let rest = stat.rsplit_once(')').map_or("", |r| r.1);
        // Field 3 (the state) is the first after ')'; utime and stime are fields 14 and 15.
        let f: Vec<&str> = rest.split_whitespace().collect();
        let field = |n: usize| f.get(n - 3).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        total += (field(14) + field(15)) * tick_ns;
    }
    total
}

/// Steps recorded at `rate` per second for `secs`, against a default session (100 ms collector,
/// CSV and JSON) with MoE windows of `window` steps (0: per-step rows). Returns (steps, collector
/// CPU ns per step, CSV bytes per step, core events dropped, MoE rows dropped).
fn paced(layers: u32, experts: u32, window: u64, rate: f64, secs: f64) -> (u64, f64, f64, u64, u64) {
    let routes = routing(layers, experts);
    let dir = tempfile::tempdir().expect("tempdir");
    let session = profilemate::builder().dir(dir.path()).moe_window_steps(window).build().expect("session");
    let cpu_before = collector_cpu_ns();
    let started = Instant::now();
    let mut steps = 0u64;
    while started.elapsed().as_secs_f64() < secs {
        // Busy-wait pacing: the step is due at steps / rate.
        while started.elapsed().as_secs_f64() < steps as f64 / rate {
            std::hint::spin_loop();
        }
        step(&session, &routes, steps);
        steps += 1;
    }
    // Let the collector take the last steps, then read its CPU time before shutdown ends it.
    std::thread::sleep(Duration::from_millis(250));
    let cpu = collector_cpu_ns() - cpu_before;
    let m = session.shutdown().expect("shutdown");
    let csv: u64 = m.bytes_written.iter().filter(|(f, _)| f.ends_with(".csv")).map(|(_, b)| b).sum();
    let moe_drops: u64 = m.dropped.get("moe_expert").map_or(0, |r| r.values().sum());
    assert_eq!(m.rows["forward_pass_timing.csv"] + m.dropped["forward_pass"]["buffer_full"], steps);
    (steps, cpu as f64 / steps as f64, csv as f64 / steps as f64, m.total_dropped() - moe_drops, moe_drops)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    // `cargo test --benches` runs bench binaries with no arguments besides `--bench`; a quick
    // pass keeps that fast.
    let quick = !std::env::args().any(|a| a == "--bench");
    let shapes: &[(u32, u32)] = if quick { &SHAPES[..1] } else { &SHAPES };
    let secs = if quick { 0.2 } else { 2.0 };
    println!("{} steps/s for {secs} s per row; collector CPU time from /proc (10 ms ticks)", 1000);
    println!(
        "| layers x experts | collector CPU per step | bytes/step (windows of 100) | bytes/step (per-step rows) | core drops | MoE detail rows dropped |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    for &(layers, experts) in shapes {
        let (_, ns, bytes, core, _) = paced(layers, experts, 100, 1000.0, secs);
        let (_, _, detail_bytes, core_detail, moe_detail) = paced(layers, experts, 0, 1000.0, secs);
        println!(
            "| {layers} x {experts} | {:.1} us | {bytes:.0} | {detail_bytes:.0} | {} | {moe_detail} |",
            ns / 1000.0,
            core + core_detail
        );
    }
    // The highest rate without a drop at the largest shape, windowed (the default).
    let (layers, experts) = SHAPES[SHAPES.len() - 1];
    let rates: &[f64] = if quick { &[1000.0] } else { &[5000.0, 10_000.0, 20_000.0, 30_000.0, 40_000.0, 60_000.0] };
    for &rate in rates {
        let (steps, ns, _, core, moe) = paced(layers, experts, 100, rate, secs);
        println!(
            "{layers} x {experts} at {rate:.0} steps/s: {steps} steps, collector CPU {:.1} us per step, {core} core events \
             and {moe} MoE records dropped",
            ns / 1000.0
        );
    }
}
