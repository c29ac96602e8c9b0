//! What the `tracing` layer costs: unmapped spans against `tracing` alone, and mapped spans
//! against timing the same operation with profilemate's own handle, in one run.
//!
//! ```text
//! cargo bench --bench tracing_layer --features tracing
//! ```
//!
//! One iteration creates a span, enters it, exits and closes it. Each case runs under its own
//! dispatcher, with span callsites of its own, so that no case's interest leaks into another's:
//!
//! - `baseline/no_subscriber`: no dispatcher at all.
//! - `alone/...`: an unmapped span with a bare registry (which creates every span), then with a
//!   layer that does nothing (`Identity`: what `tracing` charges for one more layer), with the
//!   CPU span layer (`build()`), and with the filtered one (`build_filtered()`), whose filter
//!   gives the callsite `Interest::never`, so that `tracing` skips the span altogether.
//! - `beside_a_layer/...`: the same, when another layer (one that keeps span durations,
//!   standing in for a log formatter) wants every span. The difference with `tracing_only` (or
//!   `with_noop_layer`) is what an unmapped span costs the engine.
//! - `mapped/cpu_span_layer` vs `mapped/cpu_timing_handle`: a mapped span, against
//!   `CpuTiming::start(..).stop()` for the same operation.

mod common;
use common::{Discard, DurationLayer};

use criterion::{criterion_group, criterion_main, Criterion};
use profilemate::tracing_layer::CpuSpanLayer;
use profilemate::{CpuOp, Session};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing_subscriber::layer::SubscriberExt;

const BATCH: u64 = 4096;

fn session() -> Session {
    profilemate::builder()
        .in_memory_only()
        .sink(Discard)
        .buffer_events(4 * BATCH as usize)
        .flush_interval(Duration::from_secs(60))
        .build()
        .expect("session")
}

/// Times `iters` calls of `f` in batches of [`BATCH`], draining the session (untimed) after
/// every batch so that records never meet a full buffer.
fn batched(iters: u64, session: &Session, mut f: impl FnMut()) -> Duration {
    let mut total = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let n = left.min(BATCH);
        let t = Instant::now();
        for _ in 0..n {
            f();
        }
        total += t.elapsed();
        session.flush().expect("flush");
        left -= n;
    }
    total
}

/// The CPU span layer of `session` with the mappings an engine would have.
fn cpu_span_layer(session: &Session) -> CpuSpanLayer {
    CpuSpanLayer::builder(session)
        .map("schedule", "scheduling")
        .and_then(|b| b.map("prepare_inputs", "batch_preparation"))
        .and_then(|b| b.map("sample", "sampling"))
        .and_then(|b| b.map("detokenize", "detokenize"))
        .expect("mappings")
        .build()
}

/// The same layer with its per-layer filter (`build_filtered`).
fn filtered_cpu_span_layer<S>(session: &Session) -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    CpuSpanLayer::builder(session)
        .map("schedule", "scheduling")
        .and_then(|b| b.map("prepare_inputs", "batch_preparation"))
        .and_then(|b| b.map("sample", "sampling"))
        .and_then(|b| b.map("detokenize", "detokenize"))
        .expect("mappings")
        .build_filtered()
}

/// Benchmarks one span (created, entered, exited, closed) under `dispatch`. `span` must be a
/// callsite of this case alone.
fn span_case(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    dispatch: tracing::Dispatch,
    span: fn() -> tracing::Span,
) {
    tracing::dispatcher::with_default(&dispatch, || {
        g.bench_function(name, |b| {
            b.iter(|| {
                let span = span();
                let _entered = black_box(span.enter());
            })
        });
    });
}

fn tracing_layer(c: &mut Criterion) {
    let mut g = c.benchmark_group("tracing_layer");
    g.warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    let on = session();
    let total_ns = Arc::new(AtomicU64::new(0));
    let other_layer = || DurationLayer { total_ns: total_ns.clone() };
    use tracing::{info_span, Dispatch};
    use tracing_subscriber::layer::Identity;
    use tracing_subscriber::registry;

    g.bench_function("baseline/no_subscriber", |b| {
        b.iter(|| {
            let span = info_span!("http_request_a");
            let _entered = black_box(span.enter());
        })
    });

    // ---- unmapped spans, no other layer
    span_case(&mut g, "alone/with_noop_layer", Dispatch::new(registry().with(Identity::new())), || {
        info_span!("http_request_h")
    });
    span_case(&mut g, "alone/registry_only", Dispatch::new(registry()), || info_span!("http_request_b"));
    span_case(&mut g, "alone/with_cpu_span_layer", Dispatch::new(registry().with(cpu_span_layer(&on))), || {
        info_span!("http_request_c")
    });
    span_case(
        &mut g,
        "alone/with_filtered_cpu_span_layer",
        Dispatch::new(registry().with(filtered_cpu_span_layer(&on))),
        || info_span!("http_request_d"),
    );

    // ---- unmapped spans, beside a layer that wants every span
    span_case(&mut g, "beside_a_layer/tracing_only", Dispatch::new(registry().with(other_layer())), || {
        info_span!("http_request_e")
    });
    span_case(
        &mut g,
        "beside_a_layer/with_noop_layer",
        Dispatch::new(registry().with(other_layer()).with(Identity::new())),
        || info_span!("http_request_i"),
    );
    span_case(
        &mut g,
        "beside_a_layer/with_cpu_span_layer",
        Dispatch::new(registry().with(other_layer()).with(cpu_span_layer(&on))),
        || info_span!("http_request_f"),
    );
    span_case(
        &mut g,
        "beside_a_layer/with_filtered_cpu_span_layer",
        Dispatch::new(registry().with(other_layer()).with(filtered_cpu_span_layer(&on))),
        || info_span!("http_request_g"),
    );

    // ---- mapped spans, against profilemate's own handle
    let dispatch = Dispatch::new(registry().with(cpu_span_layer(&on)));
    tracing::dispatcher::with_default(&dispatch, || {
        g.bench_function("mapped/cpu_span_layer", |b| {
            b.iter_custom(|iters| {
                batched(iters, &on, || {
                    let span = info_span!("schedule");
                    let _entered = black_box(span.enter());
                })
            })
        });
    });
    drop(dispatch);
    let cpu = on.cpu_timing();
    g.bench_function("mapped/cpu_timing_handle", |b| {
        b.iter_custom(|iters| batched(iters, &on, || cpu.start(black_box(CpuOp::SCHEDULING)).stop()))
    });
    g.finish();
    black_box(total_ns.load(Ordering::Relaxed));
    drop(on.shutdown());
}

criterion_group!(benches, tracing_layer);
criterion_main!(benches);
