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
//! experts (top-2 below 16 experts), skewed so that some experts stay cold. Collector time: the
//! steps are recorded untimed, 100 at a time, then `Session::flush` is timed (it drains, reads the
//! routing totals, writes the rows and the files). Bytes: what the CSV files received, from the
//! manifest, with the default windows of 100 steps and with per-step rows
//! (`PROFILEMATE_MOE_WINDOW=step`). Sustained: the engine thread records steps flat out for 3 s
//! against a session with the default 100 ms collector period, and the manifest's drops are
//! counted.

use profilemate::{BatchSample, CpuOp, KvCacheSample, Phase, Session};
use std::time::{Duration, Instant};

const SHAPES: [(u32, u32); 5] = [(8, 8), (16, 64), (32, 128), (58, 128), (58, 256)];
const STEPS: u64 = 2000;
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

/// (collector ns per step, CSV bytes per step, rows of moe_expert_routing.csv, drops).
fn measure(layers: u32, experts: u32, window: u64) -> (f64, f64, u64, u64) {
    let routes = routing(layers, experts);
    let dir = tempfile::tempdir().expect("tempdir");
    let session = profilemate::builder()
        .dir(dir.path())
        .moe_window_steps(window)
        .buffer_events(1 << 20)
        .flush_interval(Duration::from_secs(60))
        .build()
        .expect("session");
    let mut collector = Duration::ZERO;
    let chunk = 100;
    let mut i = 0;
    while i < STEPS {
        for _ in 0..chunk {
            step(&session, &routes, i);
            i += 1;
        }
        let t = Instant::now();
        session.flush().expect("flush");
        collector += t.elapsed();
    }
    let m = session.shutdown().expect("shutdown");
    let csv: u64 = m.bytes_written.iter().filter(|(f, _)| f.ends_with(".csv")).map(|(_, b)| b).sum();
    (
        collector.as_nanos() as f64 / STEPS as f64,
        csv as f64 / STEPS as f64,
        m.rows["moe_expert_routing.csv"],
        m.total_dropped(),
    )
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    // `cargo test --benches` runs bench binaries with no arguments besides `--bench`; a quick
    // pass keeps that fast.
    let quick = !std::env::args().any(|a| a == "--bench");
    let shapes: &[(u32, u32)] = if quick { &SHAPES[..1] } else { &SHAPES };
    println!(
        "| layers x experts | collector per step | bytes/step (windows of 100) | bytes/step (per-step rows) | drops |"
    );
    println!("| --- | --- | --- | --- | --- |");
    for &(layers, experts) in shapes {
        let (ns, bytes, _, drops) = measure(layers, experts, 100);
        let (_, detail_bytes, _, detail_drops) = measure(layers, experts, 0);
        println!(
            "| {layers} x {experts} | {:.1} us | {bytes:.0} | {detail_bytes:.0} | {} |",
            ns / 1000.0,
            drops + detail_drops
        );
    }
    // Sustained: flat out at the largest shape, the default session.
    let (layers, experts) = SHAPES[SHAPES.len() - 1];
    let routes = routing(layers, experts);
    let dir = tempfile::tempdir().expect("tempdir");
    let session = profilemate::builder().dir(dir.path()).build().expect("session");
    let run_for = if quick { Duration::from_millis(300) } else { Duration::from_secs(3) };
    let started = Instant::now();
    let mut steps = 0;
    while started.elapsed() < run_for {
        step(&session, &routes, steps);
        steps += 1;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let m = session.shutdown().expect("shutdown");
    println!(
        "sustained at {layers} x {experts}: {steps} steps in {elapsed:.2} s = {:.0} steps/s recorded flat out, {} events \
         dropped, {} forward rows, {} routing records",
        steps as f64 / elapsed,
        m.total_dropped(),
        m.rows["forward_pass_timing.csv"],
        steps * u64::from(layers)
    );
    assert_eq!(m.total_dropped(), 0, "{:?}", m.dropped);
    assert_eq!(m.rows["forward_pass_timing.csv"], steps);
}
