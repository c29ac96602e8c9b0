//! The collector's side: rows per second through the CSV sink and through a sink that
//! discards, and the memory a run of 10^7 events holds.
//!
//! ```text
//! cargo bench --bench collector
//! ```
//!
//! Rows/s: events are recorded untimed, then `Session::flush` is timed: it drains the buffers,
//! resolves times, feeds the profilers, formats and writes the CSV rows, and flushes the files.
//! Memory: 10^7 events of a realistic mix (forward passes, CPU operations, batch samples,
//! request lifecycles) go through a session writing CSV and JSON; the resident set is sampled
//! every 10^6 events and printed.

mod common;
use common::Discard;

use criterion::{BenchmarkId, Criterion, Throughput};
use profilemate::{BatchSample, Config, CpuOp, CsvSink, Phase};
use std::time::{Duration, Instant};

const EVENTS_PER_FLUSH: u64 = 50_000;

fn throughput(c: &mut Criterion) {
    let mut g = c.benchmark_group("collector");
    g.warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3)).sample_size(20);
    g.throughput(Throughput::Elements(1));
    let dir = tempfile::tempdir().expect("tempdir");
    for sink in ["discard", "csv"] {
        let builder = profilemate::builder()
            .in_memory_only()
            .buffer_events(2 * EVENTS_PER_FLUSH as usize)
            .flush_interval(Duration::from_secs(60));
        let builder = match sink {
            "csv" => builder.sink(CsvSink::create(dir.path(), &Config::default()).expect("csv sink")),
            _ => builder.sink(Discard),
        };
        let session = builder.build().expect("session");
        let forward = session.forward_pass();
        // One iteration is one forward-pass row through the collector.
        g.bench_function(BenchmarkId::new("forward_pass_rows", sink), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut left = iters;
                while left > 0 {
                    let n = left.min(EVENTS_PER_FLUSH);
                    for i in 0..n {
                        forward.record(Phase::Decode, 32, 32, Duration::from_nanos(1_000_000 + i));
                    }
                    let t = Instant::now();
                    session.flush().expect("flush");
                    total += t.elapsed();
                    left -= n;
                }
                total
            })
        });
        let manifest = session.shutdown().expect("shutdown");
        assert_eq!(manifest.total_dropped(), 0, "{:?}", manifest.dropped);
    }
    g.finish();
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).map(str::to_owned))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// 10^7 events through a session writing CSV and JSON; prints the resident set as it goes.
fn memory(total_events: u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let session = profilemate::builder().dir(dir.path()).build().expect("session");
    let (forward, cpu, batches, requests) =
        (session.forward_pass(), session.cpu_timing(), session.batch_utilization(), session.requests());
    let ids: Vec<String> = (0..64).map(|i| format!("cmpl-{i:08x}-0")).collect();
    let sample = BatchSample {
        num_seqs: 24,
        max_num_seqs: 256,
        num_tokens: 1850,
        max_tokens: 8192,
        phase: Phase::Decode,
        running_queue_len: 24,
        waiting_queue_len: 3,
    };
    let start_rss = rss_kib();
    let mut peak = start_rss;
    let mut events = 0u64;
    let mut next_report = 1_000_000u64;
    let started = Instant::now();
    println!(
        "memory: resident set while recording {total_events} events (KiB above the start, {start_rss} KiB at start)"
    );
    let mut step = 0u64;
    while events < total_events {
        // One engine step: 7 events, plus a request's start and finish every 8 steps.
        cpu.record(CpuOp::SCHEDULING, Duration::from_micros(200), "");
        batches.record(&sample);
        cpu.record(CpuOp::BATCH_PREPARATION, Duration::from_micros(80), "");
        forward.record(Phase::Decode, 24, 24, Duration::from_micros(1500 + step % 300));
        cpu.record(CpuOp::MODEL_EXECUTION, Duration::from_micros(1600), "");
        cpu.record(CpuOp::SAMPLING, Duration::from_micros(90), "");
        events += 6;
        if step % 8 == 0 {
            let id = &ids[(step / 8) as usize % ids.len()];
            requests.started(id);
            requests.finished(id, "status=FINISHED_STOPPED");
            events += 2;
        }
        step += 1;
        // Keep the producer within what the collector drains (the buffer would drop otherwise;
        // a real engine's steps take milliseconds, not nanoseconds).
        if step % 1024 == 0 {
            session.flush().expect("flush");
        }
        if events >= next_report {
            let rss = rss_kib();
            peak = peak.max(rss);
            println!("  {events:>9} events: +{:>6} KiB", rss.saturating_sub(start_rss));
            next_report += 1_000_000;
        }
    }
    let manifest = session.shutdown().expect("shutdown");
    let end = rss_kib();
    peak = peak.max(end);
    println!(
        "memory: peak +{} KiB ({:.1} MiB) above the start for {events} events in {:.1} s; {} dropped; {} CSV rows",
        peak - start_rss,
        (peak - start_rss) as f64 / 1024.0,
        started.elapsed().as_secs_f64(),
        manifest.total_dropped(),
        manifest.rows.values().sum::<u64>()
    );
}

fn main() {
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let mut c = Criterion::default().configure_from_args();
    throughput(&mut c);
    c.final_summary();
    // Under `cargo test` the benchmarks run once each; the memory run is for `cargo bench`.
    memory(if bench_mode { 10_000_000 } else { 20_000 });
}
