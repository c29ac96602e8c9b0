//! Property tests of the statistics the summaries are made of.
//!
//! The contract (`CONTRACT.md`): `count`, `mean`, `std` (population), `min`, `max` and `total`
//! are exact; percentiles come from a histogram with a relative error of at most 0.1 %. Here
//! every statistic is checked against an exact recomputation on random inputs, first on
//! [`DurationStats`] alone, then through a whole in-memory session, whose summaries must agree
//! with a recomputation from the very rows the session handed to its sink.

use profilemate_core::{BatchSample, DurationStats, MemorySink, Phase, Session};
use proptest::prelude::*;
use std::time::Duration;

// ---------------------------------------------------------------------------------------------
// Exact references

/// Nearest-rank percentile `sorted[ceil(p/100 * n) - 1]`, with the rank computed in integers so
/// that float rounding of `p/100 * n` cannot move it.
fn nearest_rank(sorted: &[u64], p: u64) -> u64 {
    let n = sorted.len() as u64;
    let rank = (p * n).div_ceil(100).max(1);
    sorted[(rank - 1) as usize]
}

/// Population standard deviation in nanoseconds, computed from exact integer deviations
/// `n * x - sum` (no cancellation), so it is accurate to about 1e-13 relative.
fn exact_std_ns(values: &[u64]) -> f64 {
    let n = values.len() as i128;
    let sum: i128 = values.iter().map(|&v| i128::from(v)).sum();
    let squares: f64 = values
        .iter()
        .map(|&v| {
            let d = (n * i128::from(v) - sum) as f64;
            d * d
        })
        .sum();
    (squares / (n as f64).powi(3)).sqrt()
}

fn exact_mean_ms(values: &[u64]) -> f64 {
    let sum: u128 = values.iter().map(|&v| u128::from(v)).sum();
    sum as f64 / values.len() as f64 / 1e6
}

/// `|got - want| <= 1e-9 * |want|`, or `<= 1e-9` absolute where `want` is tiny.
fn close(got: f64, want: f64) -> bool {
    (got - want).abs() <= (1e-9 * want.abs()).max(1e-9)
}

/// A percentile in milliseconds within 0.1 % of the exact value `want_ns`.
fn percentile_ok(got_ms: f64, want_ns: u64) -> bool {
    let want_ms = want_ns as f64 / 1e6;
    (got_ms - want_ms).abs() <= 1e-3 * want_ms + 1e-12 * want_ms.max(1.0)
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// Checks one `DurationStats` against the values it was fed. Returns a description of the first
/// mismatch.
fn check_stats(stats: &DurationStats, values: &[u64]) -> Result<(), TestCaseError> {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    let sum: u128 = values.iter().map(|&v| u128::from(v)).sum();
    prop_assert_eq!(stats.count(), values.len() as u64);
    prop_assert_eq!(stats.total_ns(), sum);
    prop_assert_eq!(stats.total_ms(), sum as f64 / 1e6);
    prop_assert_eq!(stats.min_ms(), ms(sorted[0]));
    prop_assert_eq!(stats.max_ms(), ms(sorted[sorted.len() - 1]));
    let mean = exact_mean_ms(values);
    prop_assert!(close(stats.mean_ms(), mean), "mean_ms {} != exact {}", stats.mean_ms(), mean);
    let std = exact_std_ns(values) / 1e6;
    prop_assert!(close(stats.std_ms(), std), "std_ms {} != exact {}", stats.std_ms(), std);
    for p in [50u64, 95, 99] {
        let want = nearest_rank(&sorted, p);
        let got = stats.percentile_ms(p as f64);
        prop_assert!(percentile_ok(got, want), "p{} = {} ms, exact nearest rank {} ns", p, got, want);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Strategies

/// A duration in nanoseconds: zero, exact-bucket small values, realistic engine times, and large
/// values up to `u64::MAX`.
fn duration_ns() -> impl Strategy<Value = u64> {
    prop_oneof![
        2 => Just(0u64),
        6 => 0u64..2_048,
        20 => 0u64..100_000_000,
        8 => 0u64..10_000_000_000_000,
        2 => any::<u64>(),
        1 => Just(u64::MAX),
    ]
}

/// 1 to 1999 durations: independent ones, or a tight cluster around a large base (as a steady
/// decode loop gives), where a naive variance formula would cancel catastrophically.
fn durations() -> impl Strategy<Value = Vec<u64>> {
    prop_oneof![
        4 => prop::collection::vec(duration_ns(), 1..2000),
        1 => (0u64..10_000_000_000, 0u64..1_000_000)
            .prop_flat_map(|(base, spread)| prop::collection::vec(base..=base + spread, 1..2000)),
        1 => (0u64..10_000_000_000_000, 0u64..1_000)
            .prop_flat_map(|(base, spread)| prop::collection::vec(base..=base + spread, 1..2000)),
    ]
}

fn phase() -> impl Strategy<Value = Phase> {
    prop_oneof![Just(Phase::Prefill), Just(Phase::Decode), Just(Phase::Mixed)]
}

#[derive(Debug, Clone)]
struct Pass {
    phase: Phase,
    batch_size: u32,
    num_tokens: u32,
    ns: u64,
}

fn pass() -> impl Strategy<Value = Pass> {
    let time = prop_oneof![1 => Just(0u64), 1 => 0u64..2_048, 8 => 0u64..5_000_000_000];
    (phase(), 0u32..1024, 0u32..65_536, time).prop_map(|(phase, batch_size, num_tokens, ns)| Pass {
        phase,
        batch_size,
        num_tokens,
        ns,
    })
}

fn limit_pair() -> impl Strategy<Value = (u32, u32)> {
    // (num, max): a zero limit, a batch over its limit, or an ordinary one.
    prop_oneof![
        1 => (0u32..100, Just(0u32)),
        1 => (1u32..1000).prop_flat_map(|max| (max + 1..=max * 3, Just(max))),
        6 => (1u32..100_000).prop_flat_map(|max| (0..=max, Just(max))),
    ]
}

fn sample() -> impl Strategy<Value = BatchSample> {
    (limit_pair(), limit_pair(), phase(), 0u32..512, 0u32..4096).prop_map(
        |((num_seqs, max_num_seqs), (num_tokens, max_tokens), phase, running_queue_len, waiting_queue_len)| {
            BatchSample { num_seqs, max_num_seqs, num_tokens, max_tokens, phase, running_queue_len, waiting_queue_len }
        },
    )
}

// ---------------------------------------------------------------------------------------------
// DurationStats alone

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn duration_stats_match_exact_recomputation(values in durations()) {
        let mut stats = DurationStats::new();
        for &v in &values {
            stats.record(v);
        }
        check_stats(&stats, &values)?;
    }
}

#[test]
fn empty_duration_stats_are_all_zero() {
    let s = DurationStats::new();
    assert_eq!(s.count(), 0);
    for v in [s.mean_ms(), s.std_ms(), s.min_ms(), s.max_ms(), s.total_ms(), s.percentile_ms(50.0)] {
        assert_eq!(v, 0.0);
    }
}

// ---------------------------------------------------------------------------------------------
// Through a whole session

fn phase_values(rows: &[profilemate_core::ForwardPassRow], phase: Phase) -> Vec<&profilemate_core::ForwardPassRow> {
    rows.iter().filter(|r| r.phase == phase).collect()
}

fn mean(values: impl IntoIterator<Item = f64>) -> f64 {
    let (mut n, mut sum) = (0u64, 0.0);
    for v in values {
        n += 1;
        sum += v;
    }
    if n == 0 {
        0.0
    } else {
        sum / n as f64
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn session_forward_pass_summary_matches_its_rows(passes in prop::collection::vec(pass(), 0..400)) {
        let memory = MemorySink::new();
        let session = Session::builder().in_memory_only().sink(memory.clone()).build().expect("session builds");
        let forward = session.forward_pass();
        for p in &passes {
            forward.record(p.phase, p.batch_size, p.num_tokens, Duration::from_nanos(p.ns));
        }
        let manifest = session.shutdown().expect("clean shutdown");
        prop_assert_eq!(manifest.total_dropped(), 0);
        prop_assert_eq!(manifest.steps, passes.len() as u64);

        let rows = memory.rows().forward_pass;
        // One thread recorded them in order: the rows are exactly the passes, in order.
        prop_assert_eq!(rows.len(), passes.len());
        for (row, p) in rows.iter().zip(&passes) {
            prop_assert_eq!(
                (row.phase, row.batch_size, row.num_tokens, row.forward_time_ns),
                (p.phase, p.batch_size, p.num_tokens, p.ns)
            );
        }

        let summary = memory.summaries().expect("summaries written").forward_pass.expect("forward summary");
        for (phase, stats) in [(Phase::Prefill, &summary.prefill), (Phase::Decode, &summary.decode), (Phase::Mixed, &summary.mixed)] {
            let rows = phase_values(&rows, phase);
            prop_assert_eq!(stats.count, rows.len() as u64);
            prop_assert_eq!(stats.total_tokens, rows.iter().map(|r| u64::from(r.num_tokens)).sum::<u64>());
            let throughput = mean(rows.iter().filter_map(|r| r.throughput_tokens_per_sec()));
            prop_assert!(close(stats.mean_throughput_tokens_per_sec, throughput),
                "{phase}: mean throughput {} != {}", stats.mean_throughput_tokens_per_sec, throughput);
            if rows.is_empty() {
                // An empty group is all zeros, so `count * mean_ms` keeps working.
                for v in [stats.mean_ms, stats.std_ms, stats.min_ms, stats.max_ms, stats.p50_ms, stats.p95_ms, stats.p99_ms, stats.total_ms] {
                    prop_assert_eq!(v, 0.0);
                }
                continue;
            }
            let values: Vec<u64> = rows.iter().map(|r| r.forward_time_ns).collect();
            let mut sorted = values.clone();
            sorted.sort_unstable();
            let sum: u128 = values.iter().map(|&v| u128::from(v)).sum();
            prop_assert_eq!(stats.total_ms, sum as f64 / 1e6);
            prop_assert_eq!(stats.min_ms, ms(sorted[0]));
            prop_assert_eq!(stats.max_ms, ms(sorted[sorted.len() - 1]));
            prop_assert!(close(stats.mean_ms, exact_mean_ms(&values)), "{phase}: mean_ms {}", stats.mean_ms);
            prop_assert!(close(stats.std_ms, exact_std_ns(&values) / 1e6), "{phase}: std_ms {}", stats.std_ms);
            for (p, got) in [(50, stats.p50_ms), (95, stats.p95_ms), (99, stats.p99_ms)] {
                let want = nearest_rank(&sorted, p);
                prop_assert!(percentile_ok(got, want), "{phase}: p{p} = {got} ms, exact {want} ns");
            }
        }
    }

    #[test]
    fn session_batch_utilization_summary_matches_its_rows(
        samples in prop::collection::vec(sample(), 0..300),
        threshold in 0.0f64..=100.0,
    ) {
        let memory = MemorySink::new();
        let session = Session::builder()
            .in_memory_only()
            .underutilization_threshold(threshold)
            .sink(memory.clone())
            .build()
            .expect("session builds");
        let batches = session.batch_utilization();
        for s in &samples {
            batches.record(s);
        }
        let manifest = session.shutdown().expect("clean shutdown");
        prop_assert_eq!(manifest.total_dropped(), 0);

        let rows = memory.rows().batch_utilization;
        prop_assert_eq!(rows.len(), samples.len());
        for (row, s) in rows.iter().zip(&samples) {
            prop_assert_eq!(
                (row.num_seqs, row.max_num_seqs, row.num_tokens, row.max_tokens, row.phase, row.running_queue_len, row.waiting_queue_len),
                (s.num_seqs, s.max_num_seqs, s.num_tokens, s.max_tokens, s.phase, s.running_queue_len, s.waiting_queue_len)
            );
            // `num / max * 100`, empty when max is 0, never above 100.
            for (pct, num, max) in [(row.seq_utilization_pct, s.num_seqs, s.max_num_seqs), (row.token_utilization_pct, s.num_tokens, s.max_tokens)] {
                match pct {
                    None => prop_assert_eq!(max, 0),
                    Some(v) => {
                        prop_assert!(max > 0);
                        let want = (f64::from(num) / f64::from(max) * 100.0).min(100.0);
                        prop_assert!(close(v, want) && (0.0..=100.0).contains(&v), "{v} != {want}");
                    }
                }
            }
        }

        let summary = memory.summaries().expect("summaries written").batch_utilization.expect("batch summary");
        prop_assert_eq!(summary.total_samples, rows.len() as u64);
        let seq = mean(rows.iter().filter_map(|r| r.seq_utilization_pct));
        let tok = mean(rows.iter().filter_map(|r| r.token_utilization_pct));
        prop_assert!(close(summary.mean_seq_utilization_pct, seq), "{} != {seq}", summary.mean_seq_utilization_pct);
        prop_assert!(close(summary.mean_token_utilization_pct, tok), "{} != {tok}", summary.mean_token_utilization_pct);
        for (phase, got) in [
            (Phase::Prefill, summary.prefill_avg_utilization),
            (Phase::Decode, summary.decode_avg_utilization),
            (Phase::Mixed, summary.mixed_avg_utilization),
        ] {
            let want = mean(rows.iter().filter(|r| r.phase == phase).filter_map(|r| r.token_utilization_pct));
            prop_assert!(close(got, want), "{phase}: {got} != {want}");
        }
        let under = rows.iter().filter_map(|r| r.token_utilization_pct).filter(|&v| v < threshold).count() as u64;
        prop_assert_eq!(summary.underutilization_events, under);
        prop_assert_eq!(summary.underutilization_threshold_pct, threshold);
        let last = rows.last().map_or((0, 0), |r| (r.max_num_seqs, r.max_tokens));
        prop_assert_eq!((summary.max_num_seqs, summary.max_tokens), last);
        let running = mean(rows.iter().map(|r| f64::from(r.running_queue_len)));
        let waiting = mean(rows.iter().map(|r| f64::from(r.waiting_queue_len)));
        prop_assert!(close(summary.mean_running_queue_len, running));
        prop_assert!(close(summary.mean_waiting_queue_len, waiting));
        prop_assert_eq!(summary.max_waiting_queue_len, rows.iter().map(|r| r.waiting_queue_len).max().unwrap_or(0));
    }
}
