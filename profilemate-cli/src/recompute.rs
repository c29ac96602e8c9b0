//! Summaries recomputed from the CSV rows, for a directory whose JSON summary is missing.
//!
//! The arithmetic is the contract's (and profilemate-core's): exact count, mean, population
//! standard deviation, min, max and total; percentiles from a 3-significant-digit HDR histogram,
//! through the same [`DurationStats`] the core uses, so a recomputed summary matches the one the
//! core would have written up to the file's microsecond rounding.

use crate::contract::*;
use crate::data::*;
use profilemate_core::{DurationStats, Mean};
use std::collections::{BTreeMap, HashMap};

fn ms_to_ns(ms: f64) -> u64 {
    (ms * 1e6).round().max(0.0) as u64
}

fn phase_index(p: Phase) -> usize {
    match p {
        Phase::Prefill => 0,
        Phase::Decode => 1,
        Phase::Mixed => 2,
    }
}

/// `forward_pass_summary.json` from `forward_pass_timing.csv`.
pub fn forward_pass(rows: &[ForwardPassRow]) -> ForwardPassSummary {
    let mut stats: [DurationStats; 3] = Default::default();
    let mut tokens = [0u64; 3];
    let mut throughput = [Mean::default(); 3];
    for r in rows {
        let i = phase_index(r.phase);
        stats[i].record(ms_to_ns(r.forward_time_ms));
        tokens[i] += r.num_tokens;
        // The file's value when present, else recomputed, so a file with the column empty for a
        // non-zero time still counts (the contract leaves it empty only for a zero time).
        let t = r
            .throughput_tokens_per_sec
            .or_else(|| (r.forward_time_ms > 0.0).then(|| r.num_tokens as f64 / r.forward_time_ms * 1000.0));
        if let Some(t) = t {
            throughput[i].add(t);
        }
    }
    let phase = |i: usize| PhaseStats::from_stats(&stats[i], tokens[i], throughput[i].value());
    ForwardPassSummary { prefill: phase(0), decode: phase(1), mixed: phase(2) }
}

/// `cpu_timing_summary.json` from `cpu_operations_timing.csv`.
pub fn cpu_timing(rows: &[CpuOperationRow]) -> CpuTimingSummary {
    let mut ops: BTreeMap<&str, DurationStats> = BTreeMap::new();
    for r in rows {
        ops.entry(r.operation.as_str()).or_default().record(ms_to_ns(r.duration_ms));
    }
    ops.into_iter()
        .map(|(op, s)| {
            let stats = OperationStats::from(&s);
            (op.to_string(), stats)
        })
        .collect()
}

/// `batch_utilization_summary.json` from `batch_utilization.csv`; `threshold_pct` is the
/// underutilization threshold in force (the manifest says which; the default is 50).
pub fn batch_utilization(rows: &[BatchRow], threshold_pct: f64) -> BatchUtilizationSummary {
    let (mut seq, mut tok, mut running, mut waiting) =
        (Mean::default(), Mean::default(), Mean::default(), Mean::default());
    let mut per_phase = [Mean::default(); 3];
    let mut under = 0;
    let mut max_waiting = 0;
    for r in rows {
        if let Some(v) = r.seq_utilization_pct {
            seq.add(v);
        }
        if let Some(v) = r.token_utilization_pct {
            tok.add(v);
            per_phase[phase_index(r.phase)].add(v);
            if v < threshold_pct {
                under += 1;
            }
        }
        running.add(r.running_queue_len as f64);
        waiting.add(r.waiting_queue_len as f64);
        max_waiting = max_waiting.max(r.waiting_queue_len);
    }
    let last = rows.last();
    BatchUtilizationSummary {
        total_samples: rows.len() as u64,
        mean_seq_utilization_pct: seq.value(),
        mean_token_utilization_pct: tok.value(),
        underutilization_events: under,
        underutilization_threshold_pct: threshold_pct,
        prefill_avg_utilization: per_phase[0].value(),
        decode_avg_utilization: per_phase[1].value(),
        mixed_avg_utilization: per_phase[2].value(),
        max_num_seqs: last.map_or(0, |r| r.max_num_seqs),
        max_tokens: last.map_or(0, |r| r.max_tokens),
        mean_running_queue_len: running.value(),
        mean_waiting_queue_len: waiting.value(),
        max_waiting_queue_len: max_waiting,
    }
}

/// `preemption_summary.json` by replaying `preemption_events.csv`.
///
/// Follows the core's rules: a request id seen again after it finished or was evicted is a new
/// request; a `resumed` without a pending preemption changes nothing; a preemption without a
/// reason counts as `unspecified`; the resume delay is measured per preemption.
pub fn preemption(events: &[PreemptionEventRow]) -> PreemptionSummary {
    #[derive(Default)]
    struct Live {
        preempted_at: Option<f64>,
        preemptions: u64,
    }
    let mut live: HashMap<&str, Live> = HashMap::new();
    let (mut total_requests, mut requests_preempted, mut total_preemptions) = (0u64, 0u64, 0u64);
    let mut reasons: BTreeMap<String, u64> = BTreeMap::new();
    let (mut running, mut delay) = (Mean::default(), Mean::default());
    let mut max_delay = 0.0f64;
    for e in events {
        let st = live.entry(e.request_id.as_str()).or_insert_with(|| {
            total_requests += 1;
            Live::default()
        });
        match e.event {
            LifecycleEvent::Started => {}
            LifecycleEvent::Preempted => {
                if st.preemptions == 0 {
                    requests_preempted += 1;
                }
                st.preemptions += 1;
                // A second preemption before a resume: the delay runs from the first.
                st.preempted_at.get_or_insert(e.timestamp_sec);
                total_preemptions += 1;
                let key = if e.reason.is_empty() { "unspecified" } else { e.reason.as_str() };
                *reasons.entry(key.to_string()).or_insert(0) += 1;
                if let Some(r) = e.running_time_sec {
                    running.add(r);
                }
            }
            LifecycleEvent::Resumed => {
                if let Some(p) = st.preempted_at.take() {
                    let d = (e.timestamp_sec - p).max(0.0);
                    delay.add(d);
                    max_delay = max_delay.max(d);
                }
            }
            LifecycleEvent::Finished | LifecycleEvent::Evicted => {
                live.remove(e.request_id.as_str());
            }
        }
    }
    PreemptionSummary {
        total_preemptions,
        total_requests,
        requests_preempted,
        preemption_rate_pct: if total_requests == 0 {
            0.0
        } else {
            total_preemptions as f64 / total_requests as f64 * 100.0
        },
        preemption_reasons: reasons,
        mean_running_time_before_preempt: running.value(),
        mean_resume_delay: delay.value(),
        max_resume_delay: max_delay,
    }
}

/// `encoder_decoder_summary.json` from `encoder_decoder_timing.csv`. The model type is inferred
/// (the CSV does not say what the engine declared): any encoder time means `encoder_decoder`.
pub fn encoder_decoder(rows: &[ComponentRow]) -> EncoderDecoderSummary {
    let mut stats: [DurationStats; 3] = Default::default();
    for r in rows {
        let i = match r.component {
            Component::Encoder => 0,
            Component::Decoder => 1,
            Component::CrossAttention => 2,
        };
        stats[i].record(ms_to_ns(r.duration_ms));
    }
    let [enc, dec, cross] = &stats;
    let (encoder_pct, decoder_pct, cross_attention_pct) =
        profilemate_core::component_shares(enc.total_ns(), dec.total_ns(), cross.total_ns());
    EncoderDecoderSummary {
        model_type: if enc.count() > 0 { "encoder_decoder" } else { "decoder_only" }.to_string(),
        encoder: ComponentStats::from(enc),
        decoder: ComponentStats::from(dec),
        cross_attention: ComponentStats::from(cross),
        encoder_pct,
        decoder_pct,
        cross_attention_pct,
    }
}

/// `kv_cache_summary.json` from `kv_cache_usage.csv`.
pub fn kv_cache(rows: &[KvCacheRow]) -> KvCacheSummary {
    let mut usage = Mean::default();
    let (mut max_usage, mut full, mut queries, mut hits) = (0.0f64, 0u64, 0u64, 0u64);
    for r in rows {
        if let Some(u) = r.usage() {
            usage.add(u);
            max_usage = max_usage.max(u);
            if u >= 100.0 {
                full += 1;
            }
        }
        queries += r.prefix_cache_queries;
        hits += r.prefix_cache_hits;
    }
    KvCacheSummary {
        mean_usage_pct: usage.value(),
        max_usage_pct: max_usage,
        samples: rows.len() as u64,
        prefix_cache_hit_rate_pct: if queries == 0 { 0.0 } else { hits as f64 / queries as f64 * 100.0 },
        prefix_cache_queries: Some(queries),
        prefix_cache_hits: Some(hits),
        total_blocks: rows.last().map(|r| r.total_blocks),
        full_samples: Some(full),
    }
}

/// `cuda_graph_summary.json` from `cuda_graph_events.csv`.
pub fn cuda_graph(rows: &[CudaGraphRow]) -> CudaGraphSummary {
    let (mut captures, mut replays, mut eager, mut capture_ms, mut max_eager) = (0u64, 0u64, 0u64, 0.0f64, 0u64);
    let mut padding = Mean::default();
    let mut sizes = std::collections::BTreeSet::new();
    for r in rows {
        match r.event {
            GraphEvent::Capture => {
                captures += 1;
                capture_ms += r.duration_ms.unwrap_or(0.0);
                sizes.insert(r.batch_size);
            }
            GraphEvent::Replay => {
                replays += 1;
                if let Some(p) = r.padded_batch_size.filter(|p| *p > 0) {
                    padding.add(p.saturating_sub(r.batch_size) as f64 / p as f64 * 100.0);
                }
            }
            GraphEvent::Eager => {
                eager += 1;
                max_eager = max_eager.max(r.batch_size);
            }
        }
    }
    let steps = replays + eager;
    CudaGraphSummary {
        captures,
        replays,
        eager_steps: eager,
        replay_rate_pct: if steps == 0 { 0.0 } else { replays as f64 / steps as f64 * 100.0 },
        mean_padding_pct: padding.value(),
        capture_time_ms: capture_ms,
        captured_sizes: Some(sizes.into_iter().collect()),
        max_eager_batch_size: Some(max_eager),
    }
}

/// Statistics of one layer's tokens per expert, as profilemate-core computes them.
pub fn moe_layer(tokens: &[u64]) -> MoeLayerStats {
    let total: u64 = tokens.iter().sum();
    let n = tokens.len().max(1) as f64;
    let mean = total as f64 / n;
    let (hottest, max) =
        tokens.iter().enumerate().max_by_key(|(i, t)| (**t, std::cmp::Reverse(*i))).map_or((0, 0), |(i, t)| (i, *t));
    let coldest = tokens.iter().enumerate().min_by_key(|(i, t)| (**t, *i)).map_or(0, |(i, _)| i);
    let var = tokens.iter().map(|t| (*t as f64 - mean).powi(2)).sum::<f64>() / n;
    MoeLayerStats {
        tokens_per_expert: tokens.to_vec(),
        max_over_mean: if mean > 0.0 { max as f64 / mean } else { 0.0 },
        coefficient_of_variation: if mean > 0.0 { var.sqrt() / mean } else { 0.0 },
        total_tokens: Some(total),
        hottest_expert: Some(hottest as u64),
        coldest_expert: Some(coldest as u64),
    }
}

/// `moe_expert_summary.json` from `moe_expert_routing.csv`.
///
/// The file has no row for an expert that received no token in a step, so an expert that
/// received none in the whole run is invisible when its id is above every routed one: each
/// layer has as many experts as the highest expert id seen in any layer, plus one.
pub fn moe_expert(routing: &MoeRouting) -> MoeExpertSummary {
    let experts = routing.tokens.values().map(Vec::len).max().unwrap_or(0);
    let stats: BTreeMap<u64, MoeLayerStats> = routing
        .tokens
        .iter()
        .map(|(l, t)| {
            let mut t = t.clone();
            t.resize(experts, 0);
            (*l, moe_layer(&t))
        })
        .collect();
    let mut order: Vec<(u64, f64)> = stats.iter().map(|(l, s)| (*l, s.max_over_mean)).collect();
    order.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let max = order.first().map_or(0.0, |o| o.1);
    let mean = if order.is_empty() { 0.0 } else { order.iter().map(|o| o.1).sum::<f64>() / order.len() as f64 };
    MoeExpertSummary {
        layers: stats.into_iter().map(|(l, s)| (l.to_string(), s)).collect(),
        most_imbalanced_layers: order.iter().take(10).map(|o| o.0).collect(),
        max_over_mean: Some(max),
        mean_max_over_mean: Some(mean),
        records: Some(routing.records),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(phase: Phase, ms: f64, tokens: u64) -> ForwardPassRow {
        ForwardPassRow {
            timestamp_sec: 0.0,
            phase,
            batch_size: 1,
            num_tokens: tokens,
            forward_time_ms: ms,
            throughput_tokens_per_sec: (ms > 0.0).then(|| tokens as f64 / ms * 1000.0),
            step: None,
        }
    }

    #[test]
    fn forward_pass_matches_hand_computation() {
        let rows = [fp(Phase::Decode, 1.0, 8), fp(Phase::Decode, 3.0, 8), fp(Phase::Prefill, 10.0, 100)];
        let s = forward_pass(&rows);
        assert_eq!(s.decode.count, 2);
        assert_eq!(s.decode.mean_ms, 2.0);
        assert_eq!(s.decode.std_ms, 1.0);
        assert_eq!(s.decode.total_ms, 4.0);
        assert_eq!(s.decode.total_tokens, 16);
        // (8000 + 2666.67) / 2
        assert!((s.decode.mean_throughput_tokens_per_sec - 5333.333).abs() < 1e-2);
        assert_eq!(s.prefill.p99_ms, 10.0);
        assert_eq!(s.mixed, PhaseStats::default());
    }

    /// The recomputed summary equals what profilemate-core's profiler writes for the same rows.
    #[test]
    fn percentiles_agree_with_core_stats() {
        let rows: Vec<ForwardPassRow> = (1..=1000).map(|i| fp(Phase::Decode, i as f64 * 0.013, 4)).collect();
        let ours = forward_pass(&rows);
        let mut core = DurationStats::new();
        for r in &rows {
            core.record(ms_to_ns(r.forward_time_ms));
        }
        assert_eq!(ours.decode.p95_ms, core.percentile_ms(95.0));
        assert_eq!(ours.decode.p50_ms, core.percentile_ms(50.0));
        assert!((ours.decode.p99_ms - 0.99 * 13.0).abs() / 12.87 < 0.002);
    }

    #[test]
    fn preemption_replay_pairs_resumes_and_counts_reasons() {
        let ev = |t: f64, id: &str, event, reason: &str, run: Option<f64>| PreemptionEventRow {
            timestamp_sec: t,
            request_id: id.into(),
            event,
            reason: reason.into(),
            running_time_sec: run,
            step: None,
        };
        use LifecycleEvent::*;
        let events = [
            ev(0.0, "a", Started, "", None),
            ev(0.0, "b", Started, "", None),
            ev(1.0, "a", Preempted, "RECOMPUTE", Some(1.0)),
            ev(3.0, "a", Resumed, "", None),
            ev(4.0, "a", Preempted, "", Some(1.0)),
            ev(4.5, "a", Resumed, "", None),
            ev(5.0, "b", Resumed, "", None), // no pending preemption: changes nothing
            ev(6.0, "a", Finished, "", None),
            ev(7.0, "a", Started, "", None), // a new request under an old id
        ];
        let s = preemption(&events);
        assert_eq!(s.total_requests, 3);
        assert_eq!(s.total_preemptions, 2);
        assert_eq!(s.requests_preempted, 1);
        assert!((s.preemption_rate_pct - 66.666).abs() < 0.01);
        assert_eq!(s.preemption_reasons.get("RECOMPUTE"), Some(&1));
        assert_eq!(s.preemption_reasons.get("unspecified"), Some(&1));
        assert_eq!(s.mean_resume_delay, 1.25);
        assert_eq!(s.max_resume_delay, 2.0);
        assert_eq!(s.mean_running_time_before_preempt, 1.0);
    }

    #[test]
    fn batch_and_components_recompute() {
        let b = |tok: Option<f64>, phase, waiting| BatchRow {
            step: None,
            timestamp_sec: 0.0,
            num_seqs: 1,
            max_num_seqs: 4,
            seq_utilization_pct: Some(25.0),
            num_tokens: 1,
            max_tokens: 10,
            token_utilization_pct: tok,
            phase,
            running_queue_len: 1,
            waiting_queue_len: waiting,
        };
        let s = batch_utilization(
            &[b(Some(40.0), Phase::Decode, 0), b(Some(80.0), Phase::Prefill, 3), b(None, Phase::Mixed, 1)],
            50.0,
        );
        assert_eq!(s.total_samples, 3);
        assert_eq!(s.mean_token_utilization_pct, 60.0);
        assert_eq!(s.underutilization_events, 1);
        assert_eq!(s.decode_avg_utilization, 40.0);
        assert_eq!(s.mixed_avg_utilization, 0.0);
        assert_eq!(s.max_waiting_queue_len, 3);

        let c = |component, ms| ComponentRow {
            timestamp_sec: 0.0,
            component,
            duration_ms: ms,
            context: String::new(),
            step: None,
        };
        let s = encoder_decoder(&[c(Component::Encoder, 1.0), c(Component::Decoder, 3.0)]);
        assert_eq!(s.model_type, "encoder_decoder");
        assert_eq!(s.encoder_pct, 25.0);
        assert_eq!(s.decoder_pct, 75.0);
        let s = encoder_decoder(&[c(Component::Decoder, 3.0)]);
        assert_eq!(s.model_type, "decoder_only");
        assert_eq!(s.decoder_pct, 100.0);
        assert_eq!(encoder_decoder(&[]).decoder_pct, 0.0);
    }

    #[test]
    fn trackers_recompute() {
        let kv = |used, total, usage_pct, q, h| KvCacheRow {
            timestamp_sec: 0.0,
            used_blocks: used,
            total_blocks: total,
            usage_pct,
            prefix_cache_queries: q,
            prefix_cache_hits: h,
            step: None,
        };
        let s = kv_cache(&[kv(50, 100, Some(50.0), 10, 1), kv(100, 100, None, 10, 3), kv(0, 0, None, 0, 0)]);
        assert_eq!((s.samples, s.mean_usage_pct, s.max_usage_pct, s.full_samples), (3, 75.0, 100.0, Some(1)));
        assert_eq!((s.prefix_cache_queries, s.prefix_cache_hit_rate_pct), (Some(20), 20.0));
        assert_eq!(s.total_blocks, Some(0), "the last sample's");

        let g = |event, batch, padded, ms| CudaGraphRow {
            timestamp_sec: 0.0,
            event,
            batch_size: batch,
            padded_batch_size: padded,
            duration_ms: ms,
            step: None,
        };
        use GraphEvent::*;
        let s = cuda_graph(&[
            g(Capture, 8, None, Some(1.5)),
            g(Capture, 4, None, Some(0.5)),
            g(Replay, 6, Some(8), None),
            g(Replay, 4, Some(4), None),
            g(Eager, 12, None, None),
            g(Eager, 3, None, None),
        ]);
        assert_eq!((s.captures, s.replays, s.eager_steps, s.replay_rate_pct), (2, 2, 2, 50.0));
        assert_eq!((s.mean_padding_pct, s.capture_time_ms), (12.5, 2.0));
        assert_eq!((s.captured_sizes, s.max_eager_batch_size), (Some(vec![4, 8]), Some(12)));
        assert_eq!(cuda_graph(&[]).replay_rate_pct, 0.0);

        let mut routing = MoeRouting::default();
        for (t, layer, expert_id, num_tokens) in
            [(0.0, 0, 0, 30), (0.0, 0, 1, 10), (0.0, 1, 0, 20), (0.1, 1, 1, 20), (0.1, 0, 3, 0)]
        {
            routing.add(&MoeRoutingRow { timestamp_sec: t, layer, expert_id, num_tokens, window_steps: 1 });
        }
        let s = moe_expert(&routing);
        let l0 = &s.layers["0"];
        assert_eq!(l0.tokens_per_expert, vec![30, 10, 0, 0], "four experts: ids up to 3 seen");
        assert_eq!((l0.max_over_mean, l0.hottest_expert, l0.total_tokens), (3.0, Some(0), Some(40)));
        assert_eq!(s.layers["1"].tokens_per_expert, vec![20, 20, 0, 0]);
        assert_eq!(s.most_imbalanced_layers, vec![0, 1]);
        // (0.0, 0), (0.0, 1), (0.1, 1), (0.1, 0): four runs of one layer and one timestamp.
        assert_eq!(s.records, Some(4), "layer 0 in two steps, layer 1 in two");
    }
}
