use super::Profiler;
use crate::event::Event;
use crate::rows::{MoeRoutingRow, Rows};
use crate::summary::{MoeExpertSummary, MoeLayerStats, Summaries};
use crate::types::ProfilerKind;
use std::collections::BTreeMap;

/// Tokens per expert per MoE layer, and how unevenly each layer spreads them.
///
/// Fed events ([`Event::MoeRouting`], one per layer and step), it sums them and writes one row
/// per expert per event. In a session, the collector feeds it the recording threads' running
/// totals instead and it writes one row per expert per window of steps.
#[derive(Debug, Default, Clone)]
pub struct MoeExpertProfiler {
    layers: BTreeMap<u32, Vec<u64>>,
    records: u64,
    /// Per layer: routing calls seen, and the calls and totals at the start of the open window.
    windows: BTreeMap<u32, Window>,
}

#[derive(Debug, Default, Clone)]
struct Window {
    calls: u64,
    start_calls: u64,
    start_tokens: Vec<u64>,
}

impl MoeExpertProfiler {
    /// An empty tracker.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes a layer's running totals over the whole run (every recording thread's together):
    /// `calls` routing calls, the latest at `timestamp_ns`, and `tokens` per expert. The summary
    /// then holds exactly these totals. With `window` set, once the layer has at least `window`
    /// calls since its open window started (or at `close`, any), appends the window's rows: the
    /// tokens each expert received in it.
    #[allow(clippy::too_many_arguments)] // the collector's one call site names each figure
    pub(crate) fn observe_totals(
        &mut self,
        layer: u32,
        calls: u64,
        timestamp_ns: u64,
        tokens: &[u64],
        window: Option<u64>,
        close: bool,
        rows: &mut Rows,
    ) {
        let totals = self.layers.entry(layer).or_default();
        let w = self.windows.entry(layer).or_default();
        self.records += calls - w.calls.min(calls);
        w.calls = calls;
        totals.clear();
        totals.extend_from_slice(tokens);
        let Some(window) = window else { return };
        let steps = calls.saturating_sub(w.start_calls);
        if steps == 0 || (steps < window && !close) {
            return;
        }
        w.start_tokens.resize(tokens.len(), 0);
        for (expert_id, (&now, start)) in tokens.iter().zip(&mut w.start_tokens).enumerate() {
            let n = now - (*start).min(now);
            if n > 0 {
                rows.moe_routing.push(MoeRoutingRow {
                    timestamp_ns,
                    layer,
                    expert_id: expert_id as u32,
                    // A window's count per expert stays far below 2^32 tokens in practice.
                    num_tokens: u32::try_from(n).unwrap_or(u32::MAX),
                    window_first_step: w.start_calls,
                    window_steps: steps,
                    // A window spans steps: its rows belong to none of them.
                    step: None,
                });
            }
            *start = now;
        }
        w.start_calls = calls;
    }

    /// Adds tokens per expert of `layer` summed over `records` routing calls (one per step), as
    /// read back from windowed `moe_expert_routing.csv` rows; no rows are written.
    ///
    /// ```
    /// use profilemate_core::{MoeExpertProfiler, Profiler, Summaries};
    /// let mut moe = MoeExpertProfiler::new();
    /// moe.add_totals(3, &[40, 0, 10], 100);
    /// let mut s = Summaries::default();
    /// moe.summarize(&mut s);
    /// let s = s.moe_expert.unwrap();
    /// assert_eq!((s.records, s.layers["3"].total_tokens), (100, 50));
    /// ```
    pub fn add_totals(&mut self, layer: u32, tokens_per_expert: &[u64], records: u64) {
        let totals = self.layers.entry(layer).or_default();
        if totals.len() < tokens_per_expert.len() {
            totals.resize(tokens_per_expert.len(), 0);
        }
        for (total, n) in totals.iter_mut().zip(tokens_per_expert) {
            *total += n;
        }
        self.records += records;
    }

    /// One step's rows of `layer` (per-step detail): the layer's call `call` (counted from 0,
    /// the rows' `window_first_step`), made in engine step `step` (`None` outside any step); the
    /// totals come from [`observe_totals`](Self::observe_totals).
    pub(crate) fn detail(
        &mut self,
        timestamp_ns: u64,
        layer: u32,
        call: u64,
        step: Option<u64>,
        tokens_per_expert: &[u32],
        rows: &mut Rows,
    ) {
        for (expert_id, &num_tokens) in tokens_per_expert.iter().enumerate() {
            if num_tokens > 0 {
                rows.moe_routing.push(MoeRoutingRow {
                    timestamp_ns,
                    layer,
                    expert_id: expert_id as u32,
                    num_tokens,
                    window_first_step: call,
                    window_steps: 1,
                    step,
                });
            }
        }
    }

    fn layer_stats(tokens: &[u64]) -> MoeLayerStats {
        let total: u64 = tokens.iter().sum();
        let n = tokens.len().max(1) as f64;
        let mean = total as f64 / n;
        let (hottest, max) = tokens
            .iter()
            .enumerate()
            .max_by_key(|(i, t)| (**t, std::cmp::Reverse(*i)))
            .map_or((0, 0), |(i, t)| (i, *t));
        let coldest = tokens.iter().enumerate().min_by_key(|(i, t)| (**t, *i)).map_or(0, |(i, _)| i);
        let var = tokens.iter().map(|t| (*t as f64 - mean).powi(2)).sum::<f64>() / n;
        MoeLayerStats {
            tokens_per_expert: tokens.to_vec(),
            total_tokens: total,
            max_over_mean: if mean > 0.0 { max as f64 / mean } else { 0.0 },
            coefficient_of_variation: if mean > 0.0 { var.sqrt() / mean } else { 0.0 },
            hottest_expert: hottest as u32,
            coldest_expert: coldest as u32,
        }
    }
}

impl Profiler for MoeExpertProfiler {
    fn kind(&self) -> ProfilerKind {
        ProfilerKind::MoeExpert
    }

    fn observe(&mut self, event: &Event<'_>, rows: &mut Rows) {
        let Event::MoeRouting { timestamp_ns, layer, tokens_per_expert } = *event else { return };
        self.records += 1;
        let totals = self.layers.entry(layer).or_default();
        if totals.len() < tokens_per_expert.len() {
            totals.resize(tokens_per_expert.len(), 0);
        }
        for (expert_id, &num_tokens) in tokens_per_expert.iter().enumerate() {
            totals[expert_id] += u64::from(num_tokens);
        }
        let w = self.windows.entry(layer).or_default();
        let step = w.calls;
        w.calls += 1;
        w.start_calls = w.calls;
        self.detail(timestamp_ns, layer, step, None, tokens_per_expert, rows);
    }

    fn summarize(&self, out: &mut Summaries) {
        let layers: BTreeMap<u32, MoeLayerStats> =
            self.layers.iter().map(|(l, t)| (*l, Self::layer_stats(t))).collect();
        let mut order: Vec<(u32, f64)> = layers.iter().map(|(l, s)| (*l, s.max_over_mean)).collect();
        order.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let max = order.first().map_or(0.0, |o| o.1);
        let mean = if order.is_empty() { 0.0 } else { order.iter().map(|o| o.1).sum::<f64>() / order.len() as f64 };
        out.moe_expert = Some(MoeExpertSummary {
            layers: layers.into_iter().map(|(l, s)| (l.to_string(), s)).collect(),
            most_imbalanced_layers: order.iter().take(10).map(|o| o.0).collect(),
            max_over_mean: max,
            mean_max_over_mean: mean,
            records: self.records,
        });
    }
}
