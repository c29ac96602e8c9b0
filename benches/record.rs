//! Cost of one record on the engine thread, side by side with baselines, in one run.
//!
//! ```text
//! cargo bench --bench record
//! ```
//!
//! Baselines: an empty loop, two `std::time::Instant` reads, two TSC reads, a fastrace local
//! span (with a reporter installed), a `tracing` span with a minimal layer that keeps
//! durations, and a metrics-style histogram record (`metrics` with an atomic-bucket recorder).
//!
//! Each measured batch stays below the thread buffer's capacity and the collector drains
//! between batches (outside the timed region), so this measures the recording path itself,
//! not the drop path of a full buffer.

mod common;
use common::{Discard, DurationLayer};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use profilemate::{BatchSample, Component, CpuOp, Phase, Session};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

const BATCH: u64 = 4096;

/// A session that writes files (no standard sinks: the rows go to [`Discard`]), so its thread
/// buffers are the ones a file-writing engine gets (mapped into the output directory where the
/// buffers outlive the process).
fn session(dir: &std::path::Path) -> Session {
    profilemate::builder()
        .dir(dir)
        .sinks(&[])
        .sink(Discard)
        .buffer_events(4 * BATCH as usize)
        .flush_interval(Duration::from_secs(60))
        .build()
        .expect("session")
}

/// Times `iters` calls of `f` in batches of [`BATCH`], running `between` (untimed) after
/// every batch.
fn batched(iters: u64, mut between: impl FnMut(), mut f: impl FnMut()) -> Duration {
    let mut total = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let n = left.min(BATCH);
        let t = Instant::now();
        for _ in 0..n {
            f();
        }
        total += t.elapsed();
        between();
        left -= n;
    }
    total
}

/// A fastrace reporter that discards spans.
struct NullReporter;
impl fastrace::collector::Reporter for NullReporter {
    fn report(&mut self, spans: Vec<fastrace::prelude::SpanRecord>) {
        black_box(spans);
    }
}

/// A metrics recorder whose histograms are lock-free atomic buckets, as metrics exporters use.
struct BucketRecorder;
struct Bucket(metrics_util::storage::AtomicBucket<f64>);
impl metrics::HistogramFn for Bucket {
    fn record(&self, value: f64) {
        self.0.push(value);
    }
}
impl metrics::Recorder for BucketRecorder {
    fn describe_counter(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
    fn describe_gauge(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
    fn describe_histogram(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
    fn register_counter(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        metrics::Counter::noop()
    }
    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }
    fn register_histogram(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Histogram {
        metrics::Histogram::from_arc(Arc::new(Bucket(metrics_util::storage::AtomicBucket::new())))
    }
}

fn record(c: &mut Criterion) {
    let mut g = c.benchmark_group("record");
    g.warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));

    // ---- baselines
    g.bench_function("baseline/empty_loop", |b| b.iter(|| black_box(0u64)));
    g.bench_function("baseline/two_instant_reads", |b| {
        b.iter(|| {
            let a = Instant::now();
            black_box(Instant::now().duration_since(a))
        })
    });
    let clock = quanta::Clock::new();
    g.bench_function("baseline/two_tsc_reads", |b| {
        b.iter(|| {
            let a = clock.raw();
            black_box(clock.raw().wrapping_sub(a))
        })
    });

    fastrace::set_reporter(NullReporter, fastrace::collector::Config::default());
    g.bench_function("baseline/fastrace_local_span", |b| {
        b.iter_custom(|iters| {
            let mut root = Some(fastrace::Span::root("bench", fastrace::prelude::SpanContext::random()));
            let mut guard = root.as_ref().map(|r| r.set_local_parent());
            let d = batched(
                iters,
                || {
                    // A fresh root per batch hands the spans to the reporter, untimed.
                    drop(guard.take());
                    drop(root.take());
                    root = Some(fastrace::Span::root("bench", fastrace::prelude::SpanContext::random()));
                    guard = root.as_ref().map(|r| r.set_local_parent());
                },
                || drop(black_box(fastrace::local::LocalSpan::enter_with_local_parent("step"))),
            );
            drop(guard);
            drop(root);
            fastrace::flush();
            d
        })
    });

    let total_ns = Arc::new(AtomicU64::new(0));
    {
        use tracing_subscriber::layer::SubscriberExt;
        let subscriber = tracing_subscriber::registry().with(DurationLayer { total_ns: total_ns.clone() });
        let dispatch = tracing::Dispatch::new(subscriber);
        tracing::dispatcher::with_default(&dispatch, || {
            g.bench_function("baseline/tracing_span_duration_layer", |b| {
                b.iter(|| {
                    let span = tracing::info_span!("step");
                    let _entered = span.enter();
                })
            });
        });
    }
    black_box(total_ns.load(Ordering::Relaxed));

    let histogram = metrics::with_local_recorder(&BucketRecorder, || metrics::histogram!("step_seconds"));
    g.bench_function("baseline/metrics_histogram_timed", |b| {
        b.iter(|| {
            let t = Instant::now();
            histogram.record(black_box(t.elapsed().as_secs_f64()));
        })
    });

    // ---- profilemate, enabled (host clock)
    let out = tempfile::tempdir().expect("temporary directory");
    let on = session(out.path());
    let drain = || on.flush().expect("flush");
    let (forward, cpu, batches, requests, components) =
        (on.forward_pass(), on.cpu_timing(), on.batch_utilization(), on.requests(), on.components());
    g.bench_function("enabled/forward_pass", |b| {
        b.iter_custom(|iters| batched(iters, drain, || forward.start(black_box(Phase::Decode), 32, 32).stop()))
    });
    // Inside a step guard the forward pass opens no step: it only reads the open one.
    let steps = on.steps();
    g.bench_function("enabled/forward_pass_in_step", |b| {
        let step = steps.begin();
        b.iter_custom(|iters| batched(iters, drain, || forward.start(black_box(Phase::Decode), 32, 32).stop()));
        step.stop();
    });
    // A step guard: one atomic increment, two clock reads and one record, once per step.
    g.bench_function("enabled/step_guard", |b| b.iter_custom(|iters| batched(iters, drain, || steps.begin().stop())));
    g.bench_function("enabled/cpu_operation", |b| {
        b.iter_custom(|iters| batched(iters, drain, || cpu.start(black_box(CpuOp::SCHEDULING)).stop()))
    });
    g.bench_function("enabled/cpu_operation_with_context", |b| {
        b.iter_custom(|iters| {
            batched(iters, drain, || cpu.start_with(CpuOp::SAMPLING, black_box("phase=decode;batch_size=32")).stop())
        })
    });
    let sample = BatchSample {
        num_seqs: 24,
        max_num_seqs: 256,
        num_tokens: 1850,
        max_tokens: 8192,
        phase: Phase::Mixed,
        running_queue_len: 24,
        waiting_queue_len: 12,
    };
    g.bench_function("enabled/batch_sample", |b| {
        b.iter_custom(|iters| batched(iters, drain, || batches.record(black_box(&sample))))
    });
    g.bench_function("enabled/lifecycle_event", |b| {
        b.iter_custom(|iters| {
            batched(iters, drain, || requests.preempted(black_box("cmpl-3f2a9c41-0"), "RECOMPUTE", "num_blocks=12"))
        })
    });
    g.bench_function("enabled/component", |b| {
        b.iter_custom(|iters| batched(iters, drain, || components.start(Component::Encoder, "vision_encoder").stop()))
    });

    // ---- profilemate, disabled
    let off = Session::disabled();
    let (forward_off, cpu_off, batches_off, requests_off) =
        (off.forward_pass(), off.cpu_timing(), off.batch_utilization(), off.requests());
    g.bench_function("disabled/forward_pass", |b| {
        b.iter(|| forward_off.start(black_box(Phase::Decode), 32, 32).stop())
    });
    g.bench_function("disabled/cpu_operation", |b| b.iter(|| cpu_off.start(black_box(CpuOp::SCHEDULING)).stop()));
    g.bench_function("disabled/batch_sample", |b| b.iter(|| batches_off.record(black_box(&sample))));
    g.bench_function("disabled/lifecycle_event", |b| {
        b.iter(|| requests_off.preempted(black_box("cmpl-3f2a9c41-0"), "RECOMPUTE", ""))
    });
    g.finish();

    // ---- several threads recording at once. One iteration is one record on every thread at
    // the same time; the time is the slowest thread's, so it reads as ns per record per thread.
    let mut g = c.benchmark_group("threads");
    g.warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    for threads in [1usize, 2, 4, 16] {
        g.bench_with_input(BenchmarkId::new("forward_pass", threads), &threads, |b, &threads| {
            b.iter_custom(|iters| {
                let barrier = Barrier::new(threads);
                std::thread::scope(|s| {
                    let handles: Vec<_> = (0..threads)
                        .map(|index| {
                            let forward = on.forward_pass();
                            let (barrier, on) = (&barrier, &on);
                            s.spawn(move || {
                                // The first record registers the thread's buffer: keep it untimed.
                                forward.start(Phase::Decode, 1, 1).stop();
                                barrier.wait();
                                let between = || {
                                    barrier.wait();
                                    if index == 0 {
                                        on.flush().expect("flush");
                                    }
                                    barrier.wait();
                                };
                                batched(iters, between, || forward.start(Phase::Decode, 32, 32).stop())
                            })
                        })
                        .collect();
                    handles.into_iter().map(|h| h.join().expect("thread")).max().unwrap_or_default()
                })
            })
        });
    }
    g.finish();
    drop(on.shutdown());
}

criterion_group!(benches, record);
criterion_main!(benches);
