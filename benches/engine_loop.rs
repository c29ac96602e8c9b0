//! An engine loop with profiling on against off, in the same binary, interleaved.
//!
//! ```text
//! cargo bench --bench engine_loop
//! ```
//!
//! Each step does fixed real work (calibrated to about 1 ms, then about 100 us) split into
//! scheduling, batch preparation, the forward pass and sampling, and uses the five profilers as
//! an engine would: three CPU spans, a batch sample, a forward pass, a decoder component, and a
//! request's start and finish every 16 steps. "On" writes CSV and JSON into a temporary
//! directory; "off" uses a disabled session, so both run the same code. Rounds alternate which
//! goes first; the overhead of each round is `on / off - 1`, and the median over the rounds,
//! with its 95 % confidence interval (distribution-free, from order statistics), and the spread
//! are printed; then the same comparison over single steps (each step timed on its own), at
//! the 10th, 25th and 50th percentiles, which other work on a shared machine disturbs least.
//!
//! `cargo bench --bench engine_loop -- --metrics-sink` compares, the same way, CSV + JSON + the
//! `metrics` sink (into a Prometheus recorder, rendered once a second as a scrape would) against
//! CSV + JSON alone: the cost of turning the metrics sink on.

use profilemate::{BatchSample, Component, CpuOp, Phase, Session};
use std::hint::black_box;
use std::time::{Duration, Instant};

/// Arithmetic that the compiler cannot remove, `n` rounds.
#[inline(never)]
fn work(n: u64) -> u64 {
    let mut x = black_box(0x9e3779b97f4a7c15u64);
    for i in 0..n {
        x = x.rotate_left(7) ^ i.wrapping_mul(0x2545f4914f6cdd1d);
    }
    black_box(x)
}

struct Engine {
    forward: profilemate::ForwardPass,
    cpu: profilemate::CpuTiming,
    batches: profilemate::BatchUtilization,
    requests: profilemate::Requests,
    components: profilemate::Components,
    ids: Vec<String>,
}

impl Engine {
    fn new(session: &Session) -> Engine {
        Engine {
            forward: session.forward_pass(),
            cpu: session.cpu_timing(),
            batches: session.batch_utilization(),
            requests: session.requests(),
            components: session.components(),
            ids: (0..256).map(|i| format!("cmpl-{i:08x}-0")).collect(),
        }
    }

    fn step(&self, step: u64, n: u64) {
        let scheduling = self.cpu.start(CpuOp::SCHEDULING);
        work(n / 50);
        self.batches.record(&BatchSample {
            num_seqs: 32,
            max_num_seqs: 256,
            num_tokens: 32,
            max_tokens: 8192,
            phase: Phase::Decode,
            running_queue_len: 32,
            waiting_queue_len: 0,
        });
        scheduling.stop();
        self.cpu.time(CpuOp::BATCH_PREPARATION, || work(n / 20));
        let pass = self.forward.start(Phase::Decode, 32, 32);
        let decoder = self.components.start(Component::Decoder, "language_model");
        work(n - n / 50 - n / 20 - n / 20);
        decoder.stop();
        pass.stop();
        self.cpu.time(CpuOp::SAMPLING, || work(n / 20));
        if step % 16 == 0 {
            let id = &self.ids[(step / 16) as usize % self.ids.len()];
            self.requests.started(id);
            self.requests.finished(id, "status=FINISHED_STOPPED");
        }
    }

    fn run(&self, steps: u64, n: u64) -> Duration {
        let t = Instant::now();
        for s in 0..steps {
            self.step(s, n);
        }
        t.elapsed()
    }

    /// Like [`Engine::run`], also appending each step's own time (ns) to `step_ns`.
    fn run_timed(&self, steps: u64, n: u64, step_ns: &mut Vec<u64>) -> Duration {
        let t = Instant::now();
        let mut last = t;
        for s in 0..steps {
            self.step(s, n);
            let now = Instant::now();
            step_ns.push((now - last).as_nanos() as u64);
            last = now;
        }
        t.elapsed()
    }
}

/// Rounds of `work` that take about `target`.
fn calibrate(target: Duration) -> u64 {
    let mut n = 1000u64;
    loop {
        let t = Instant::now();
        work(n);
        let d = t.elapsed();
        if d >= Duration::from_millis(20) {
            return (n as f64 * target.as_secs_f64() / d.as_secs_f64()).max(1.0) as u64;
        }
        n *= 2;
    }
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i]
}

/// A distribution-free 95 % confidence interval of the median of `sorted`: the order statistics
/// `n/2 -+ 0.98 sqrt(n)` (the binomial(n, 1/2) rank of the median, normal approximation).
fn median_ci(sorted: &[f64]) -> (f64, f64) {
    let n = sorted.len() as f64;
    let half = 0.98 * n.sqrt();
    let lo = ((n / 2.0 - half).floor().max(1.0) as usize) - 1;
    let hi = ((n / 2.0 + 1.0 + half).ceil().min(n) as usize) - 1;
    (sorted[lo], sorted[hi])
}

/// `engine_loop --instructions on|off STEPS WORK`: runs one configuration only, for counting
/// instructions under callgrind (see `scripts/overhead-instructions.sh`).
fn instructions_mode(args: &[String]) -> bool {
    let Some(i) = args.iter().position(|a| a == "--instructions") else { return false };
    let mode = args.get(i + 1).map(String::as_str).unwrap_or("on");
    let steps: u64 = args.get(i + 2).and_then(|v| v.parse().ok()).unwrap_or(200);
    let n: u64 = args.get(i + 3).and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let dir = tempfile::tempdir().expect("tempdir");
    let session = if mode == "on" {
        profilemate::builder().dir(dir.path()).build().expect("session")
    } else {
        Session::disabled()
    };
    Engine::new(&session).run(steps, n);
    let manifest = session.shutdown().expect("shutdown");
    println!("{mode}: {steps} steps of {n} work rounds, {} profiled steps", manifest.steps);
    true
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if instructions_mode(&args) {
        return;
    }
    let bench_mode = args.iter().any(|a| a == "--bench");
    let dir = tempfile::tempdir().expect("tempdir");
    let (on_session, off_session, what) = if args.iter().any(|a| a == "--metrics-sink") {
        metrics_sessions(dir.path())
    } else {
        let on = profilemate::builder().dir(dir.path()).build().expect("session");
        (on, Session::disabled(), "profiling on (CSV + JSON) against off")
    };
    let (on, off) = (Engine::new(&on_session), Engine::new(&off_session));

    let (rounds, round_time) =
        if bench_mode { (100, Duration::from_millis(250)) } else { (2, Duration::from_millis(5)) };
    println!("engine loop: {what}, {rounds} interleaved rounds per step size");
    for target in [Duration::from_millis(1), Duration::from_micros(100)] {
        let n = calibrate(target);
        let steps = (round_time.as_secs_f64() / target.as_secs_f64()).max(1.0) as u64;
        // Warm both paths (thread buffers, caches, files).
        on.run(steps.min(100), n);
        off.run(steps.min(100), n);
        let mut overheads = Vec::with_capacity(rounds);
        let mut step_ns = Vec::with_capacity(rounds);
        let capacity = if bench_mode { rounds * steps as usize } else { 0 };
        let (mut on_steps, mut off_steps) = (Vec::with_capacity(capacity), Vec::with_capacity(capacity));
        for r in 0..rounds {
            let (t_on, t_off) = if r % 2 == 0 {
                let off_t = off.run_timed(steps, n, &mut off_steps);
                (on.run_timed(steps, n, &mut on_steps), off_t)
            } else {
                let on_t = on.run_timed(steps, n, &mut on_steps);
                (on_t, off.run_timed(steps, n, &mut off_steps))
            };
            overheads.push((t_on.as_secs_f64() / t_off.as_secs_f64() - 1.0) * 100.0);
            step_ns.push(t_off.as_secs_f64() * 1e9 / steps as f64);
        }
        overheads.sort_by(f64::total_cmp);
        step_ns.sort_by(f64::total_cmp);
        let (ci_lo, ci_hi) = median_ci(&overheads);
        println!(
            "  step ~{:>6.1} us ({steps} steps/round): overhead median {:+.3} % (95 % CI {:+.3} .. {:+.3} %), p25 {:+.3} %, p75 {:+.3} %, min {:+.3} %, max {:+.3} %",
            quantile(&step_ns, 0.5) / 1e3,
            quantile(&overheads, 0.5),
            ci_lo,
            ci_hi,
            quantile(&overheads, 0.25),
            quantile(&overheads, 0.75),
            overheads[0],
            overheads[overheads.len() - 1],
        );
        // Single steps: other work on the machine only ever adds time, so the low quantiles of
        // the step times show the cost on the engine thread with the least disturbance.
        on_steps.sort_unstable();
        off_steps.sort_unstable();
        let q = |v: &[u64], p: f64| v[((v.len() - 1) as f64 * p).round() as usize] as f64;
        let line: Vec<String> = [0.1, 0.25, 0.5]
            .iter()
            .map(|&p| {
                let (a, b) = (q(&off_steps, p), q(&on_steps, p));
                format!("p{:.0} {:.1} -> {:.1} us ({:+.3} %)", p * 100.0, a / 1e3, b / 1e3, (b / a - 1.0) * 100.0)
            })
            .collect();
        println!("    single steps, off -> on: {}", line.join(", "));
    }
    let manifest = on_session.shutdown().expect("shutdown");
    println!("  profiled: {} steps, {} events dropped", manifest.steps, manifest.total_dropped());
    let off_manifest = off_session.shutdown().expect("shutdown");
    if off_manifest.steps > 0 {
        println!("  off session: {} steps, {} events dropped", off_manifest.steps, off_manifest.total_dropped());
    }
}

/// `--metrics-sink`: "on" is CSV + JSON + the metrics sink, recording into a Prometheus recorder
/// that a thread renders once a second (a scrape); "off" is CSV + JSON.
fn metrics_sessions(dir: &std::path::Path) -> (Session, Session, &'static str) {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    use profilemate::SinkKind;
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), profilemate_sinks::DURATION_BUCKETS_SECONDS)
        .expect("buckets")
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).expect("the only recorder");
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_secs(1));
        handle.run_upkeep();
        black_box(handle.render().len());
    });
    let (on_dir, off_dir) = (dir.join("on"), dir.join("off"));
    let on = profilemate::builder()
        .dir(on_dir)
        .sinks(&[SinkKind::Csv, SinkKind::Json, SinkKind::Metrics])
        .build()
        .expect("session");
    let off = profilemate::builder().dir(off_dir).sinks(&[SinkKind::Csv, SinkKind::Json]).build().expect("session");
    (on, off, "CSV + JSON + metrics sink (on) against CSV + JSON (off)")
}
