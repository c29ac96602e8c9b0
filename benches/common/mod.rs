//! Pieces the benchmarks share. Each benchmark uses some of them.
#![allow(dead_code)]

use profilemate::{Rows, Sink, SinkError};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Takes rows and throws them away: measures the library, not a file system.
pub struct Discard;

impl Sink for Discard {
    fn name(&self) -> &str {
        "discard"
    }
    fn write_rows(&mut self, rows: &Rows) -> Result<(), SinkError> {
        black_box(rows);
        Ok(())
    }
}

/// A `tracing` layer that keeps each span's duration: the minimum a span-based profiler (or a
/// log formatter) does.
pub struct DurationLayer {
    /// Sum of the durations seen.
    pub total_ns: Arc<AtomicU64>,
}

struct Started(Instant);

impl<S> tracing_subscriber::Layer<S> for DurationLayer
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        _attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(Started(Instant::now()));
        }
    }

    fn on_close(&self, id: tracing::span::Id, ctx: tracing_subscriber::layer::Context<'_, S>) {
        if let Some(span) = ctx.span(&id) {
            if let Some(Started(t)) = span.extensions().get::<Started>() {
                self.total_ns.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
            }
        }
    }
}
