//! A GPU step loop timed with profilemate's CUDA backend: the check that
//! `scripts/gpu-check.sh` runs on a machine with an NVIDIA GPU.
//!
//! Each step copies a device buffer to another a few times on the engine's own stream (real GPU
//! work through cudarc, needing nothing but the driver), timed as a forward pass. It prints:
//!
//! 1. agreement: the CUDA-event time of each step against the host time of the same step
//!    measured with a stream synchronisation around it;
//! 2. the host cost per timed step of the backend (`start` + `stop` on the engine thread, ns);
//! 3. synchronisations on the engine thread (must be 0);
//! 4. the step rate with profiling on against off, in interleaved blocks.
//!
//! ```text
//! cargo run --release -p profilemate-cuda --example gpu_step_loop -- [--mib 64] [--copies 8] [--steps 4000]
//! ```
//!
//! Without a GPU it says what it needs and exits with status 2.

use profilemate_core::{ForwardPass, MemorySink, Phase, ProfilerKind, Session};
use profilemate_cuda::cudarc::driver::{sys, CudaContext, CudaSlice, CudaStream};
use profilemate_cuda::{CudaDriver, CudaOptions, CudaTimingBackend, EventApi, EventError, EventHandle};
use std::cell::Cell;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

type Failure = Box<dyn std::error::Error>;

struct Args {
    mib: usize,
    copies: usize,
    steps: usize,
    agreement_steps: usize,
    block: usize,
}

impl Args {
    fn parse() -> Result<Args, String> {
        let mut a = Args { mib: 64, copies: 8, steps: 4000, agreement_steps: 200, block: 200 };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            if flag == "--help" || flag == "-h" {
                return Err(
                    "usage: gpu_step_loop [--mib N] [--copies N] [--steps N] [--agreement-steps N] [--block N]\n\
                            each step copies an N MiB device buffer --copies times"
                        .into(),
                );
            }
            let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
            let n: usize = value.parse().map_err(|_| format!("{flag} {value}: not a number"))?;
            let slot = match flag.as_str() {
                "--mib" => &mut a.mib,
                "--copies" => &mut a.copies,
                "--steps" => &mut a.steps,
                "--agreement-steps" => &mut a.agreement_steps,
                "--block" => &mut a.block,
                _ => return Err(format!("unknown flag {flag} (see --help)")),
            };
            *slot = n.max(1);
        }
        Ok(a)
    }
}

thread_local! {
    static ENGINE_THREAD: Cell<bool> = const { Cell::new(false) };
}

/// The real driver, with every call the backend makes counted by the thread it is made on.
/// `EventApi` has no call that waits for the device; on the engine thread only `record` may
/// appear, and anything else is counted as a synchronisation.
struct CountingDriver {
    inner: CudaDriver,
    engine_records: AtomicU64,
    engine_other: AtomicU64,
    collector_queries: AtomicU64,
}

impl CountingDriver {
    fn on_engine(&self) -> bool {
        ENGINE_THREAD.with(Cell::get)
    }
    fn other(&self) {
        if self.on_engine() {
            self.engine_other.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl EventApi for CountingDriver {
    type Event = EventHandle;
    fn create(&self) -> Result<EventHandle, EventError> {
        self.inner.create()
    }
    fn record(&self, event: EventHandle) -> Result<(), EventError> {
        if self.on_engine() {
            self.engine_records.fetch_add(1, Ordering::Relaxed);
        }
        self.inner.record(event)
    }
    fn query(&self, event: EventHandle) -> Result<bool, EventError> {
        self.other();
        self.collector_queries.fetch_add(1, Ordering::Relaxed);
        self.inner.query(event)
    }
    fn elapsed_ms(&self, start: EventHandle, end: EventHandle) -> Result<Option<f32>, EventError> {
        self.other();
        self.inner.elapsed_ms(start, end)
    }
    fn destroy(&self, event: EventHandle) {
        self.inner.destroy(event)
    }
}

/// One forward pass: `copies` device-to-device copies on `stream`.
fn step(stream: &Arc<CudaStream>, a: &mut CudaSlice<u8>, b: &mut CudaSlice<u8>, copies: usize) -> Result<(), Failure> {
    for i in 0..copies {
        if i % 2 == 0 {
            stream.memcpy_dtod(a, b)?;
        } else {
            stream.memcpy_dtod(b, a)?;
        }
    }
    Ok(())
}

/// Whether the stream still has work queued (`cuStreamQuery` answers NOT_READY).
fn stream_busy(stream: &CudaStream) -> bool {
    // SAFETY: the stream is alive; the query does not wait.
    let status = unsafe { sys::cuStreamQuery(stream.cu_stream()) };
    status == sys::CUresult::CUDA_ERROR_NOT_READY
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// The cost of reading `Instant::now()` twice, to subtract from measured intervals.
fn clock_pair_ns() -> f64 {
    let n = 100_000;
    let mut total = Duration::ZERO;
    for _ in 0..n {
        let t = Instant::now();
        total += t.elapsed();
    }
    total.as_nanos() as f64 / f64::from(n)
}

fn main() -> ExitCode {
    let args = match Args::parse() {
        Ok(a) => a,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(2);
        }
    };
    if let Err(why) = profilemate_cuda::probe() {
        eprintln!(
            "gpu_step_loop: needs an NVIDIA GPU and its driver (libcuda.so.1) visible to this process: {why}. \
             Nothing was measured."
        );
        return ExitCode::from(2);
    }
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("gpu_step_loop: FAILED (see above)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("gpu_step_loop: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<bool, Failure> {
    ENGINE_THREAD.with(|e| e.set(true));
    let ctx = CudaContext::new(0)?;
    let stream = ctx.new_stream()?;
    // One stream only: cudarc's cross-stream event tracking would add event records of its own
    // to every copy.
    // SAFETY: every buffer is used on `stream` alone.
    unsafe { ctx.disable_event_tracking() };
    let bytes = args.mib << 20;
    let mut a = stream.alloc_zeros::<u8>(bytes)?;
    let mut b = stream.alloc_zeros::<u8>(bytes)?;
    println!(
        "device 0: {} | step = {} x {} MiB device-to-device copy on the engine's stream",
        ctx.name().unwrap_or_else(|_| "?".into()),
        args.copies,
        args.mib
    );

    let driver = CountingDriver {
        inner: CudaDriver::for_stream(&stream)?,
        engine_records: AtomicU64::new(0),
        engine_other: AtomicU64::new(0),
        collector_queries: AtomicU64::new(0),
    };
    // Resolve up to 1024 regions per collector pass, every 10 ms, with room for 8192 in flight:
    // short steps come faster than the session's defaults (100 per 100 ms pass) resolve them.
    let options = CudaOptions::default().pool_size(16_384).batch_size(1024);
    let backend = Arc::new(CudaTimingBackend::with_api(driver, options)?);
    let memory = MemorySink::new();
    let session = Session::builder()
        .in_memory_only()
        .sink(memory.clone())
        .flush_interval(Duration::from_millis(10))
        .timing_backend(backend.clone())
        .build()?;
    let forward = session.forward_pass();
    let off = ForwardPass::disabled();

    // Warm up: allocations, clocks, the driver's queues.
    for _ in 0..50 {
        let pass = forward.start(Phase::Decode, 1, u32::MAX);
        step(&stream, &mut a, &mut b, args.copies)?;
        pass.stop();
    }
    stream.synchronize()?;

    // 1. Agreement: each step alone on an idle stream, host-timed with a synchronisation.
    let mut host_ms = Vec::with_capacity(args.agreement_steps);
    for i in 0..args.agreement_steps {
        stream.synchronize()?;
        let t = Instant::now();
        let pass = forward.start(Phase::Prefill, 1, i as u32);
        step(&stream, &mut a, &mut b, args.copies)?;
        pass.stop();
        stream.synchronize()?;
        host_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    session.flush()?;
    let rows = memory.rows().forward_pass;
    let mut pairs = Vec::new();
    for r in rows.iter().filter(|r| r.phase == Phase::Prefill) {
        if let Some(h) = host_ms.get(r.num_tokens as usize) {
            pairs.push((r.forward_time_ns as f64 / 1e6, *h));
        }
    }
    let cuda: Vec<f64> = pairs.iter().map(|p| p.0).collect();
    let host: Vec<f64> = pairs.iter().map(|p| p.1).collect();
    let ratio = sorted(pairs.iter().map(|(c, h)| c / h).collect());
    let gap_us = sorted(pairs.iter().map(|(c, h)| (h - c) * 1e3).collect());
    println!("\n[1] agreement, {} steps each alone on an idle stream", pairs.len());
    println!("    CUDA events: mean {:.4} ms   host + stream sync: mean {:.4} ms", mean(&cuda), mean(&host));
    println!(
        "    CUDA / host: median {:.3} (p5 {:.3}, p95 {:.3}); host - CUDA: median {:.1} us (launch + sync latency)",
        percentile(&ratio, 0.5),
        percentile(&ratio, 0.05),
        percentile(&ratio, 0.95),
        percentile(&gap_us, 0.5)
    );
    let mut ok = true;
    if pairs.len() != args.agreement_steps {
        println!("    FAIL: {} of {} steps came back timed", pairs.len(), args.agreement_steps);
        ok = false;
    }
    let median_ratio = percentile(&ratio, 0.5);
    if mean(&host) >= 0.2 {
        let agree = (0.8..=1.02).contains(&median_ratio);
        println!("    {}: median CUDA/host within [0.80, 1.02]", if agree { "OK" } else { "FAIL" });
        ok &= agree;
    } else {
        println!("    (steps under 0.2 ms: launch and sync latency dominate the host time; no verdict)");
    }

    // 2-4. The step loop, profiling on and off in interleaved blocks.
    let pair_overhead = clock_pair_ns();
    let records_before = backend.api().engine_records.load(Ordering::Relaxed);
    let mut cost_on = Vec::new();
    let mut cost_off = Vec::new();
    let (mut time_on, mut time_off) = (Duration::ZERO, Duration::ZERO);
    let (mut steps_on, mut steps_off) = (0usize, 0usize);
    let mut busy_after_stop = 0usize;
    let blocks = args.steps.div_ceil(args.block);
    for blk in 0..blocks {
        let order = if blk % 2 == 0 { [true, false] } else { [false, true] };
        for profiled in order {
            let handle = if profiled { &forward } else { &off };
            stream.synchronize()?;
            let t_block = Instant::now();
            for _ in 0..args.block {
                let t0 = Instant::now();
                let pass = handle.start(Phase::Decode, 8, 8);
                let t1 = Instant::now();
                step(&stream, &mut a, &mut b, args.copies)?;
                let t2 = Instant::now();
                pass.stop();
                let t3 = Instant::now();
                let ns = ((t1 - t0) + (t3 - t2)).as_nanos() as f64 - 2.0 * pair_overhead;
                // Queried in both modes, so that the step rates compare like with like.
                let busy = stream_busy(&stream);
                if profiled {
                    cost_on.push(ns.max(0.0));
                    busy_after_stop += usize::from(busy);
                } else {
                    cost_off.push(ns.max(0.0));
                }
            }
            stream.synchronize()?;
            if profiled {
                time_on += t_block.elapsed();
                steps_on += args.block;
            } else {
                time_off += t_block.elapsed();
                steps_off += args.block;
            }
        }
    }
    let engine_records = backend.api().engine_records.load(Ordering::Relaxed) - records_before;
    let cost_on = sorted(cost_on);
    let cost_off = sorted(cost_off);
    println!("\n[2] host cost per timed step on the engine thread (start + stop), {steps_on} steps");
    println!(
        "    profiling on: mean {:.0} ns, p50 {:.0} ns, p99 {:.0} ns, max {:.0} ns (2 x cuEventRecord + buffer write)",
        mean(&cost_on),
        percentile(&cost_on, 0.5),
        percentile(&cost_on, 0.99),
        cost_on.last().copied().unwrap_or(0.0)
    );
    println!(
        "    profiling off (disabled handle): mean {:.0} ns, p50 {:.0} ns",
        mean(&cost_off),
        percentile(&cost_off, 0.5)
    );

    let engine_syncs = backend.api().engine_other.load(Ordering::Relaxed);
    println!("\n[3] synchronisations on the engine thread: {engine_syncs}");
    println!(
        "    backend driver calls on the engine thread: {engine_records} cuEventRecord, {engine_syncs} other \
         (event queries and elapsed times: {} calls, all on the collector thread)",
        backend.api().collector_queries.load(Ordering::Relaxed)
    );
    println!(
        "    the stream still had work queued when stop() returned in {busy_after_stop} of {steps_on} profiled steps \
         (stop() did not wait for the GPU)"
    );
    if engine_syncs != 0 {
        println!("    FAIL: the backend made calls other than cuEventRecord on the engine thread");
        ok = false;
    }

    let rate_on = steps_on as f64 / time_on.as_secs_f64();
    let rate_off = steps_off as f64 / time_off.as_secs_f64();
    println!("\n[4] step rate, {blocks} interleaved blocks of {} steps per mode", args.block);
    println!(
        "    profiling on: {rate_on:.1} steps/s   off: {rate_off:.1} steps/s   on/off: {:.4} ({:+.2}%)",
        rate_on / rate_off,
        (rate_on / rate_off - 1.0) * 100.0
    );

    let manifest = session.shutdown()?;
    let stats = backend.stats();
    let dropped: u64 = manifest.dropped[ProfilerKind::ForwardPass.as_str()].values().sum();
    println!(
        "\nsession: {} forward passes written, {} dropped ({} timing); backend: {} resolved, {} failed, {} pool \
         exhausted, {} record failures, {} events in use after shutdown",
        memory.rows().forward_pass.len(),
        dropped,
        manifest.dropped[ProfilerKind::ForwardPass.as_str()]["timing"],
        stats.resolved,
        stats.failed,
        stats.exhausted,
        stats.record_failures,
        stats.in_use
    );
    if let Some(e) = backend.last_error() {
        println!("last driver error: {e}");
    }
    if stats.failed > 0 || stats.in_use > 0 {
        println!("FAIL: regions failed or events were left in use");
        ok = false;
    }
    println!("\n{}", if ok { "gpu_step_loop: OK" } else { "gpu_step_loop: FAILED" });
    Ok(ok)
}
