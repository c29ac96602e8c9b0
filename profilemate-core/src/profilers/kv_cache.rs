use super::Profiler;
use crate::event::Event;
use crate::rows::{KvCacheRow, Rows};
use crate::stats::Mean;
use crate::summary::{KvCacheSummary, Summaries};
use crate::types::ProfilerKind;

/// KV cache usage and prefix-cache hits.
#[derive(Debug, Default, Clone)]
pub struct KvCacheProfiler {
    samples: u64,
    usage: Mean,
    max_usage: f64,
    full: u64,
    queries: u64,
    hits: u64,
    total_blocks: u32,
}

impl KvCacheProfiler {
    /// An empty tracker.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Profiler for KvCacheProfiler {
    fn kind(&self) -> ProfilerKind {
        ProfilerKind::KvCache
    }

    fn observe(&mut self, event: &Event<'_>, rows: &mut Rows) {
        let Event::KvCache { timestamp_ns, sample } = *event else { return };
        let row = KvCacheRow {
            step: None,
            timestamp_ns,
            used_blocks: sample.used_blocks,
            total_blocks: sample.total_blocks,
            prefix_cache_queries: sample.prefix_cache_queries,
            prefix_cache_hits: sample.prefix_cache_hits,
        };
        self.samples += 1;
        if let Some(pct) = row.usage_pct() {
            self.usage.add(pct);
            self.max_usage = self.max_usage.max(pct);
            if pct >= 100.0 {
                self.full += 1;
            }
        }
        self.queries += sample.prefix_cache_queries;
        self.hits += sample.prefix_cache_hits;
        self.total_blocks = sample.total_blocks;
        rows.kv_cache.push(row);
    }

    fn summarize(&self, out: &mut Summaries) {
        out.kv_cache = Some(KvCacheSummary {
            mean_usage_pct: self.usage.value(),
            max_usage_pct: self.max_usage,
            samples: self.samples,
            prefix_cache_hit_rate_pct: if self.queries == 0 {
                0.0
            } else {
                self.hits as f64 / self.queries as f64 * 100.0
            },
            prefix_cache_queries: self.queries,
            prefix_cache_hits: self.hits,
            total_blocks: self.total_blocks,
            full_samples: self.full,
        });
    }
}
