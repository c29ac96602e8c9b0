use super::Profiler;
use crate::event::Event;
use crate::rows::{MoeRoutingRow, Rows};
use crate::summary::{MoeExpertSummary, MoeLayerStats, Summaries};
use crate::types::ProfilerKind;
use std::collections::BTreeMap;

/// Tokens per expert per MoE layer, and how unevenly each layer spreads them.
#[derive(Debug, Default, Clone)]
pub struct MoeExpertProfiler {
    layers: BTreeMap<u32, Vec<u64>>,
    records: u64,
}

impl MoeExpertProfiler {
    /// An empty tracker.
    pub fn new() -> Self {
        Self::default()
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
            if num_tokens > 0 {
                rows.moe_routing.push(MoeRoutingRow {
                    timestamp_ns,
                    layer,
                    expert_id: expert_id as u32,
                    num_tokens,
                    step: None,
                });
            }
        }
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
