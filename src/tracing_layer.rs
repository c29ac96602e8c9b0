//! `tracing` spans timed as CPU operations (the `tracing` feature).
//!
//! Engines that already mark their phases with [`tracing`] spans (mistral.rs, TGI's router, ...)
//! get `cpu_operations_timing.csv` without a line of profilemate code in their hot path: map the
//! span names to CPU operations once, install the layer, and every mapped span is timed.
//!
//! ```
//! use profilemate::tracing_layer::CpuSpanLayer;
//! use tracing_subscriber::layer::SubscriberExt;
//!
//! let memory = profilemate::MemorySink::new();
//! let session = profilemate::Session::builder().in_memory_only().sink(memory.clone()).build()?;
//! let layer = CpuSpanLayer::builder(&session)
//!     .map("schedule", "scheduling")?            // a built-in operation
//!     .map("prepare_inputs", "batch_preparation")?
//!     .map("detokenize", "detokenize")?          // an operation of the engine's own
//!     .build();
//! let subscriber = tracing_subscriber::registry().with(layer);
//!
//! tracing::subscriber::with_default(subscriber, || {
//!     let _schedule = tracing::info_span!("schedule", step = 1).entered(); // timed as `scheduling`
//!     let _other = tracing::info_span!("http_request").entered(); // not mapped: passes by
//! });
//! session.shutdown()?;
//! let rows = memory.rows().cpu_operations;
//! assert_eq!(rows.len(), 1);
//! assert_eq!((&*rows[0].operation, rows[0].context.as_str()), ("scheduling", "step=1"));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! ## What is timed
//!
//! A mapped span is timed from its creation to its close (when the last handle to it is dropped)
//! on the host clock, and recorded at close as one row of its operation. For a span entered in
//! the scope that creates it (`info_span!(..).entered()`, `span.in_scope(..)`, `#[instrument]`
//! on a function) that is exactly the scope. For a span that instruments a future it is the
//! future's whole life, waits included; a span kept alive after its work is done is timed until
//! it is dropped. With [`fields_as_context`](CpuSpanLayerBuilder::fields_as_context) (on by
//! default) the span's fields become the row's `context`, `key=value` pairs joined by `;`
//! (values recorded later with `Span::record` included), cut at
//! [`MAX_TEXT_BYTES`].
//!
//! ## What it costs
//!
//! The layer looks at each span when it is created: its name's length against those of the
//! mapped names, then, on a match, its text (a hash lookup beyond eight names). An unmapped span costs nothing more but an atomic
//! load when it closes, a few nanoseconds beside the hundreds `tracing` itself spends on a span.
//!
//! [`build_filtered`](CpuSpanLayerBuilder::build_filtered) instead decides once per callsite (each
//! `span!` in the program), when `tracing` registers it: its per-layer filter ([`CpuSpanFilter`])
//! gives unmapped spans and all events `Interest::never`. When no other layer wants a callsite,
//! `tracing` then never creates its spans, cheaper than `tracing` alone; beside layers that want
//! every span, `tracing-subscriber`'s per-layer filtering costs more than the plain layer does.
//! The `tracing_layer` benchmark measures both against `tracing` alone. A mapped span costs a
//! clock read at each end, an entry in the span's extensions, and one record into the session.

use crate::{CpuOp, CpuTiming, Result, Session, MAX_TEXT_BYTES};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::Interest;
use tracing::{Metadata, Subscriber};
use tracing_subscriber::filter::Filtered;
use tracing_subscriber::layer::{Context, Filter, Layer};
use tracing_subscriber::registry::LookupSpan;

/// Span names up to this many are looked up by a linear scan; more by a hash map.
const SCAN_LIMIT: usize = 8;

/// The span names and their operations, shared by the layer and its filter.
#[derive(Debug)]
struct SpanMap {
    names: Vec<(String, CpuOp)>,
    index: HashMap<String, CpuOp>,
    /// Bit `n` set when a mapped name is `n` bytes long (bit 63: 63 or more), so that most
    /// unmapped names are told apart without comparing text.
    lengths: u64,
}

impl SpanMap {
    fn new(names: Vec<(String, CpuOp)>) -> SpanMap {
        let index = names.iter().cloned().collect();
        let lengths = names.iter().fold(0u64, |bits, (n, _)| bits | 1 << n.len().min(63));
        SpanMap { names, index, lengths }
    }

    #[inline]
    fn get(&self, name: &str) -> Option<CpuOp> {
        if self.lengths & 1 << name.len().min(63) == 0 {
            return None;
        }
        if self.names.len() <= SCAN_LIMIT {
            self.names.iter().find(|(n, _)| n == name).map(|(_, op)| *op)
        } else {
            self.index.get(name).copied()
        }
    }

    #[inline]
    fn get_span(&self, metadata: &Metadata<'_>) -> Option<CpuOp> {
        if metadata.is_span() {
            self.get(metadata.name())
        } else {
            None
        }
    }
}

/// Sets up a [`CpuSpanLayer`]: which span names are which CPU operations.
///
/// ```
/// use profilemate::{tracing_layer::CpuSpanLayer, CpuOp, Session};
///
/// let session = Session::builder().in_memory_only().build()?;
/// let layer = CpuSpanLayer::builder(&session)
///     .map_op("schedule", CpuOp::SCHEDULING)
///     .map("sample", "sampling")?
///     .fields_as_context(false)
///     .build();
/// # drop(layer);
/// # Ok::<(), profilemate::Error>(())
/// ```
#[must_use = "a builder does nothing until `build()` is called and the layer installed"]
pub struct CpuSpanLayerBuilder<'a> {
    session: &'a Session,
    names: Vec<(String, CpuOp)>,
    fields_as_context: bool,
}

impl std::fmt::Debug for CpuSpanLayerBuilder<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuSpanLayerBuilder").field("names", &self.names).finish()
    }
}

impl<'a> CpuSpanLayerBuilder<'a> {
    /// Times spans named `span_name` as the CPU operation named `operation`: a built-in one
    /// (`scheduling`, `batch_preparation`, `model_execution`, `sampling`) or one of the
    /// engine's own, registered with the session here. Mapping a span name again replaces its
    /// operation.
    ///
    /// # Errors
    ///
    /// As [`Session::register_cpu_operation`]: an empty or over-long operation name, or too many
    /// operations.
    pub fn map(self, span_name: &str, operation: &str) -> Result<Self> {
        let op = self.session.register_cpu_operation(operation)?;
        Ok(self.map_op(span_name, op))
    }

    /// Times spans named `span_name` as `op` (a built-in [`CpuOp`] constant, or one returned by
    /// [`Session::register_cpu_operation`]).
    pub fn map_op(mut self, span_name: &str, op: CpuOp) -> Self {
        match self.names.iter_mut().find(|(n, _)| n == span_name) {
            Some(entry) => entry.1 = op,
            None => self.names.push((span_name.to_string(), op)),
        }
        self
    }

    /// Whether a span's fields become the row's `context` (`key=value;...`); on by default.
    pub fn fields_as_context(mut self, on: bool) -> Self {
        self.fields_as_context = on;
        self
    }

    /// The layer. Add it to a registry: `tracing_subscriber::registry().with(layer)`. Unmapped
    /// spans cost it a comparison against the mapped names when they are created and an atomic
    /// load when they close; see [`build_filtered`](Self::build_filtered) for the other choice.
    pub fn build(self) -> CpuSpanLayer {
        CpuSpanLayer {
            map: Arc::new(SpanMap::new(self.names)),
            cpu: self.session.cpu_timing(),
            fields_as_context: self.fields_as_context,
            open: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// The layer behind its per-layer filter ([`CpuSpanFilter`]), which decides once per
    /// callsite: unmapped spans and all events get `Interest::never`.
    ///
    /// Choose it when no other layer consumes spans: `tracing` then never creates an unmapped
    /// span at all, which is cheaper than `tracing` with a bare registry. Beside layers that do
    /// consume spans (a log formatter, OpenTelemetry), prefer [`build`](Self::build):
    /// `tracing-subscriber`'s per-layer filtering then looks each span up again at every enter,
    /// exit and close, which the `tracing_layer` benchmark measures.
    pub fn build_filtered<S>(self) -> Filtered<CpuSpanLayer, CpuSpanFilter, S>
    where
        S: Subscriber + for<'l> LookupSpan<'l>,
    {
        let layer = self.build();
        let filter = layer.filter();
        layer.with_filter(filter)
    }
}

/// A [`tracing_subscriber`] layer that times the spans whose names are mapped to CPU
/// operations, and records each as a row of `cpu_operations_timing.csv`. See the
/// [module documentation](self).
#[derive(Clone)]
pub struct CpuSpanLayer {
    map: Arc<SpanMap>,
    cpu: CpuTiming,
    fields_as_context: bool,
    /// Mapped spans not yet closed: while there are none, closing a span needs no lookup.
    open: Arc<AtomicUsize>,
}

/// The per-layer filter of a [`CpuSpanLayer`]: mapped spans only, decided once per callsite.
#[derive(Debug, Clone)]
pub struct CpuSpanFilter {
    map: Arc<SpanMap>,
}

impl std::fmt::Debug for CpuSpanLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuSpanLayer")
            .field("names", &self.map.names)
            .field("enabled", &self.cpu.is_enabled())
            .field("fields_as_context", &self.fields_as_context)
            .finish()
    }
}

impl CpuSpanLayer {
    /// Starts mapping span names to the CPU operations of `session`.
    pub fn builder(session: &Session) -> CpuSpanLayerBuilder<'_> {
        CpuSpanLayerBuilder { session, names: Vec::new(), fields_as_context: true }
    }

    /// A per-layer filter that lets through this layer's mapped spans only, to combine with
    /// filters of your own (`layer.with_filter(filter.and(...))` with
    /// `tracing_subscriber::filter::FilterExt`).
    ///
    /// ```
    /// use profilemate::{tracing_layer::CpuSpanLayer, Session};
    /// use tracing_subscriber::{filter::FilterExt, Layer};
    ///
    /// let session = Session::builder().in_memory_only().build()?;
    /// let layer = CpuSpanLayer::builder(&session).map("schedule", "scheduling")?.build();
    /// let filter = layer.filter().and(tracing_subscriber::filter::LevelFilter::DEBUG);
    /// let filtered = layer.with_filter(filter);
    /// # let _: &dyn Layer<tracing_subscriber::Registry> = &filtered;
    /// # Ok::<(), profilemate::Error>(())
    /// ```
    pub fn filter(&self) -> CpuSpanFilter {
        CpuSpanFilter { map: self.map.clone() }
    }
}

impl<S> Filter<S> for CpuSpanFilter {
    fn enabled(&self, metadata: &Metadata<'_>, _: &Context<'_, S>) -> bool {
        self.map.get_span(metadata).is_some()
    }

    fn callsite_enabled(&self, metadata: &'static Metadata<'static>) -> Interest {
        if self.map.get_span(metadata).is_some() {
            Interest::always()
        } else {
            Interest::never()
        }
    }
}

/// What a mapped span carries in its extensions until it closes.
struct Timing {
    op: CpuOp,
    fields: Vec<(&'static str, String)>,
    start: Instant,
}

struct FieldVisitor<'a>(&'a mut Vec<(&'static str, String)>);

impl FieldVisitor<'_> {
    fn set(&mut self, field: &Field, value: String) {
        match self.0.iter_mut().find(|(k, _)| *k == field.name()) {
            Some(entry) => entry.1 = value,
            None => self.0.push((field.name(), value)),
        }
    }
}

impl Visit for FieldVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.set(field, value.to_string());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.set(field, format!("{value:?}"));
    }
}

/// `key=value` pairs joined by `;`, cut at a character boundary to fit an event.
fn context(fields: &[(&'static str, String)]) -> String {
    let mut out = String::new();
    for (k, v) in fields {
        let sep = if out.is_empty() { "" } else { ";" };
        let _ = write!(out, "{sep}{k}={v}");
    }
    if out.len() > MAX_TEXT_BYTES {
        let mut cut = MAX_TEXT_BYTES;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
    }
    out
}

impl<S> Layer<S> for CpuSpanLayer
where
    S: Subscriber + for<'l> LookupSpan<'l>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(op) = self.map.get_span(attrs.metadata()) else { return };
        let Some(span) = ctx.span(id) else { return };
        let mut fields = Vec::new();
        if self.fields_as_context {
            attrs.record(&mut FieldVisitor(&mut fields));
        }
        self.open.fetch_add(1, Ordering::Relaxed);
        span.extensions_mut().insert(Timing { op, fields, start: Instant::now() });
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if !self.fields_as_context || self.open.load(Ordering::Relaxed) == 0 {
            return;
        }
        let Some(span) = ctx.span(id) else { return };
        let mut extensions = span.extensions_mut();
        if let Some(timing) = extensions.get_mut::<Timing>() {
            values.record(&mut FieldVisitor(&mut timing.fields));
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        // A span is created before it is closed, on this thread or handed over to it, so a
        // mapped span's increment is seen here.
        if self.open.load(Ordering::Relaxed) == 0 {
            return;
        }
        let end = Instant::now();
        let Some(span) = ctx.span(&id) else { return };
        let Some(timing) = span.extensions_mut().remove::<Timing>() else { return };
        self.open.fetch_sub(1, Ordering::Relaxed);
        let duration = end.saturating_duration_since(timing.start);
        self.cpu.record(timing.op, duration, &context(&timing.fields));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemorySink;
    use std::time::Duration;
    use tracing_subscriber::layer::SubscriberExt;

    fn session() -> (Session, MemorySink) {
        let memory = MemorySink::new();
        let session = Session::builder().in_memory_only().sink(memory.clone()).build().expect("session");
        (session, memory)
    }

    /// Work that takes a while without sleeping.
    fn work(rounds: u64) -> u64 {
        (0..rounds).fold(0u64, |a, i| std::hint::black_box(a.wrapping_mul(31).wrapping_add(i)))
    }

    #[test]
    fn mapped_spans_are_cpu_operations_with_their_durations() {
        let (session, memory) = session();
        let layer = CpuSpanLayer::builder(&session)
            .map("schedule", "scheduling")
            .unwrap()
            .map("prepare_inputs", "batch_preparation")
            .unwrap()
            .map("detokenize", "detokenize")
            .unwrap()
            .build();
        let mut bounds = Vec::new();
        tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), || {
            for (name, rounds) in [("schedule", 20_000), ("prepare_inputs", 200_000), ("detokenize", 2_000)] {
                let outer = Instant::now();
                let inner;
                {
                    let span = match name {
                        "schedule" => tracing::info_span!("schedule"),
                        "prepare_inputs" => tracing::info_span!("prepare_inputs"),
                        _ => tracing::info_span!("detokenize"),
                    };
                    let _entered = span.enter();
                    let started = Instant::now();
                    work(rounds);
                    inner = started.elapsed();
                }
                bounds.push((inner, outer.elapsed()));
            }
            // Work on both sides of the inner span, so that the outer one starts well before it
            // and ends well after it: a row's end is the clock read when it is recorded, a little
            // after the span closed (more when the thread is descheduled in between).
            let _nested = tracing::info_span!("schedule").in_scope(|| {
                work(500_000);
                tracing::info_span!("detokenize").in_scope(|| work(10));
                work(500_000)
            });
        });
        session.shutdown().unwrap();
        let rows = memory.rows().cpu_operations;
        let ops: Vec<&str> = rows.iter().map(|r| &*r.operation).collect();
        assert_eq!(ops, ["scheduling", "batch_preparation", "detokenize", "detokenize", "scheduling"]);
        for (row, (inner, outer)) in rows.iter().zip(&bounds) {
            let recorded = Duration::from_nanos(row.duration_ns);
            assert!(
                *inner <= recorded && recorded <= *outer,
                "{}: {inner:?} <= {recorded:?} <= {outer:?}",
                row.operation
            );
        }
        // The nested spans: the inner one closes first and lies within the outer one.
        let (inner, outer) = (&rows[3], &rows[4]);
        assert!(outer.timestamp_ns < inner.timestamp_ns, "{outer:?} starts before {inner:?}");
        assert!(
            inner.timestamp_ns + inner.duration_ns < outer.timestamp_ns + outer.duration_ns,
            "{inner:?} ends before {outer:?}"
        );
    }

    #[test]
    fn unmapped_spans_and_events_record_nothing() {
        // Whether `tracing` skips an unmapped callsite altogether depends on every dispatcher
        // alive in the process, and the other tests run theirs at the same time: the
        // `tracing_layer` benchmark shows it (`alone/with_filtered_cpu_span_layer`).
        let (session, memory) = session();
        let layer = CpuSpanLayer::builder(&session).map_op("schedule", CpuOp::SCHEDULING).build_filtered();
        tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), || {
            for _ in 0..3 {
                let span = tracing::info_span!("not_mapped", step = 1);
                span.in_scope(|| tracing::info!("an event"));
                let _entered = tracing::info_span!("schedule_later").entered();
            }
        });
        session.shutdown().unwrap();
        assert!(memory.rows().cpu_operations.is_empty());
    }

    /// Another layer that wants every span, so that unmapped callsites are `sometimes` enabled
    /// and the filter is asked span by span.
    struct CountSpans(Arc<std::sync::atomic::AtomicUsize>);

    impl<S: Subscriber> Layer<S> for CountSpans {
        fn on_new_span(&self, _: &Attributes<'_>, _: &Id, _: Context<'_, S>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Four `step` spans (fields `phase`, `batch_size`, and `tokens` recorded later) and four
    /// unmapped ones, beside a layer that counts spans; returns the rows and the count.
    fn beside_another_layer<L>(layer: impl FnOnce(&Session) -> L) -> (Vec<crate::CpuOperationRow>, usize)
    where
        L: Layer<tracing_subscriber::layer::Layered<CountSpans, tracing_subscriber::Registry>> + Send + Sync + 'static,
    {
        let (session, memory) = session();
        let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let subscriber = tracing_subscriber::registry().with(CountSpans(seen.clone())).with(layer(&session));
        tracing::subscriber::with_default(subscriber, || {
            for i in 0..4u32 {
                let _other = tracing::info_span!("other", i).entered();
                let span =
                    tracing::info_span!("step", phase = "decode", batch_size = i, tokens = tracing::field::Empty);
                span.record("tokens", 8 * i);
                span.in_scope(|| work(100));
                drop(tracing::info_span!("other_closed_inside").entered());
            }
        });
        session.shutdown().unwrap();
        (memory.rows().cpu_operations, seen.load(std::sync::atomic::Ordering::Relaxed))
    }

    #[test]
    fn beside_another_layer_only_mapped_spans_are_timed_and_fields_become_the_context() {
        fn build(session: &Session) -> CpuSpanLayerBuilder<'_> {
            CpuSpanLayer::builder(session).map("step", "model_execution").unwrap()
        }
        let plain = beside_another_layer(|s| build(s).build());
        let filtered = beside_another_layer(|s| build(s).build_filtered());
        for (rows, seen) in [plain, filtered] {
            assert_eq!(seen, 12, "the other layer saw every span");
            assert_eq!(rows.len(), 4);
            assert!(rows.iter().all(|r| &*r.operation == "model_execution"));
            assert_eq!(rows[2].context, "phase=decode;batch_size=2;tokens=16");
        }
    }

    #[test]
    fn the_plain_layer_alone_times_mapped_spans_only() {
        let (session, memory) = session();
        let layer =
            CpuSpanLayer::builder(&session).map("schedule", "scheduling").unwrap().fields_as_context(false).build();
        tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), || {
            for _ in 0..3 {
                let _outer = tracing::info_span!("request").entered();
                let _schedule = tracing::info_span!("schedule", step = 1).entered();
                drop(tracing::info_span!("inner").entered());
            }
        });
        session.shutdown().unwrap();
        let rows = memory.rows().cpu_operations;
        assert_eq!(rows.len(), 3);
        assert!(rows.iter().all(|r| &*r.operation == "scheduling" && r.context.is_empty()));
    }

    #[test]
    fn names_are_found_by_length_then_text_with_few_or_many_mappings() {
        let few = SpanMap::new(vec![("schedule".into(), CpuOp::SCHEDULING), ("x".repeat(70), CpuOp::SAMPLING)]);
        assert_eq!(few.get("schedule"), Some(CpuOp::SCHEDULING));
        assert_eq!(few.get(&"x".repeat(70)), Some(CpuOp::SAMPLING));
        assert_eq!(few.get("schedulx"), None);
        assert_eq!(few.get(&"x".repeat(64)), None);
        assert_eq!(few.get(""), None);
        let many = SpanMap::new((0..20).map(|i| (format!("op{i}"), CpuOp::MODEL_EXECUTION)).collect());
        assert_eq!(many.get("op17"), Some(CpuOp::MODEL_EXECUTION));
        assert_eq!(many.get("op20"), None);
    }

    #[test]
    fn a_long_context_is_cut_to_fit_an_event() {
        let long = "é".repeat(MAX_TEXT_BYTES);
        let cut = context(&[("k", long)]);
        assert!(cut.len() <= MAX_TEXT_BYTES && cut.starts_with("k=é"));
        assert_eq!(context(&[("a", "1".into()), ("b", "x y".into())]), "a=1;b=x y");
    }

    #[test]
    fn a_disabled_session_gives_a_layer_that_records_nothing() {
        let session = Session::disabled();
        let layer = CpuSpanLayer::builder(&session).map("schedule", "scheduling").unwrap().build();
        tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), || {
            let _s = tracing::info_span!("schedule").entered();
        });
        assert!(session.shutdown().is_ok());
    }
}
