//! The trackers beyond the five profilers (KV cache, CUDA graphs, MoE experts): their files
//! follow the contract, and every summary equals a recomputation from the rows read back.

use profilemate::{KvCacheSample, ProfilerKind};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

fn read_csv(dir: &Path, file: &str, header: &[&str]) -> Vec<BTreeMap<String, String>> {
    let mut reader = csv::Reader::from_path(dir.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
    let got: Vec<String> = reader.headers().expect("header").iter().map(String::from).collect();
    // The contract's columns, then the `step` column every step table ends with.
    let want: Vec<&str> = header.iter().copied().chain(["step"]).collect();
    assert_eq!(got, want, "{file} header");
    reader
        .records()
        .map(|r| {
            let r = r.expect("record");
            header.iter().zip(r.iter()).map(|(h, v)| (h.to_string(), v.to_string())).collect()
        })
        .collect()
}

fn read_json(dir: &Path, file: &str) -> Value {
    let text = std::fs::read_to_string(dir.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
    assert!(!text.contains("null") && !text.contains("NaN") && !text.contains("Infinity"), "{file}: {text}");
    serde_json::from_str(&text).expect("valid JSON")
}

const MOE_COLUMNS: [&str; 6] =
    ["timestamp_sec", "layer", "expert_id", "num_tokens", "window_first_step", "window_steps"];

fn f(v: &str) -> f64 {
    v.parse().unwrap_or_else(|_| panic!("not a number: {v:?}"))
}

fn close(a: f64, b: f64, what: &str) {
    assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{what}: {a} != {b}");
}

#[test]
fn tracker_files_follow_the_contract_and_their_summaries_recompute() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let session = profilemate::builder().dir(tmp.path()).build().expect("session");
    let (kv, graphs, moe) = (session.kv_cache(), session.cuda_graphs(), session.moe_experts());

    // KV cache: rising usage, a full cache, a cache with no block (usage empty), prefix hits.
    let samples = [(10u32, 100u32, 4u64, 1u64), (55, 100, 0, 0), (100, 100, 8, 8), (120, 100, 2, 0), (0, 0, 0, 0)];
    for (used, total, q, h) in samples {
        kv.record(&KvCacheSample {
            used_blocks: used,
            total_blocks: total,
            prefix_cache_queries: q,
            prefix_cache_hits: h,
        });
    }
    // CUDA graphs: captures, replays with padding, eager steps.
    for size in [1u32, 2, 4, 8] {
        graphs.capture(size, Duration::from_micros(1500 + u64::from(size)));
    }
    for (batch, padded) in [(1u32, 1u32), (3, 4), (5, 8), (8, 8)] {
        graphs.replay(batch, padded);
    }
    graphs.eager(64);
    graphs.eager(9);
    // MoE: two layers, one even, one skewed, over three steps, in one window (the default is
    // 100 steps; shutdown closes it); experts with 0 tokens in the window have no row.
    let even = [10u32, 10, 10, 10];
    let skewed = [37u32, 2, 1, 0];
    for _ in 0..3 {
        moe.record_layer(0, &even);
        moe.record_layer(7, &skewed);
    }
    let manifest = session.shutdown().expect("shutdown");
    let dir = tmp.path();

    // ---- kv_cache_usage.csv / kv_cache_summary.json
    let rows = read_csv(
        dir,
        "kv_cache_usage.csv",
        &["timestamp_sec", "used_blocks", "total_blocks", "usage_pct", "prefix_cache_queries", "prefix_cache_hits"],
    );
    assert_eq!(rows.len(), samples.len());
    let usage: Vec<Option<f64>> =
        rows.iter().map(|r| (!r["usage_pct"].is_empty()).then(|| f(&r["usage_pct"]))).collect();
    assert_eq!(
        usage,
        [Some(10.0), Some(55.0), Some(100.0), Some(100.0), None],
        "over-full clamps, empty cache is empty"
    );
    let s = read_json(dir, "kv_cache_summary.json");
    let present: Vec<f64> = usage.iter().flatten().copied().collect();
    close(s["mean_usage_pct"].as_f64().unwrap(), present.iter().sum::<f64>() / present.len() as f64, "mean usage");
    close(s["max_usage_pct"].as_f64().unwrap(), 100.0, "max usage");
    assert_eq!(s["samples"], 5);
    let (q, h): (u64, u64) = rows.iter().fold((0, 0), |(q, h), r| {
        (q + r["prefix_cache_queries"].parse::<u64>().unwrap(), h + r["prefix_cache_hits"].parse::<u64>().unwrap())
    });
    close(s["prefix_cache_hit_rate_pct"].as_f64().unwrap(), h as f64 / q as f64 * 100.0, "hit rate");

    // ---- cuda_graph_events.csv / cuda_graph_summary.json
    let rows = read_csv(
        dir,
        "cuda_graph_events.csv",
        &["timestamp_sec", "event", "batch_size", "padded_batch_size", "duration_ms"],
    );
    assert_eq!(rows.len(), 10);
    for r in &rows {
        match r["event"].as_str() {
            "capture" => assert!(!r["duration_ms"].is_empty() && r["padded_batch_size"].is_empty()),
            "replay" => assert!(!r["padded_batch_size"].is_empty() && r["duration_ms"].is_empty()),
            "eager" => assert!(r["padded_batch_size"].is_empty()),
            other => panic!("unexpected event {other}"),
        }
    }
    let s = read_json(dir, "cuda_graph_summary.json");
    let count = |e: &str| rows.iter().filter(|r| r["event"] == e).count() as u64;
    assert_eq!(
        (s["captures"].as_u64(), s["replays"].as_u64(), s["eager_steps"].as_u64()),
        (Some(count("capture")), Some(4), Some(2))
    );
    close(s["replay_rate_pct"].as_f64().unwrap(), 4.0 / 6.0 * 100.0, "replay rate");
    let padding: Vec<f64> = rows
        .iter()
        .filter(|r| r["event"] == "replay")
        .map(|r| (f(&r["padded_batch_size"]) - f(&r["batch_size"])) / f(&r["padded_batch_size"]) * 100.0)
        .collect();
    close(s["mean_padding_pct"].as_f64().unwrap(), padding.iter().sum::<f64>() / padding.len() as f64, "padding");
    let capture_ms: f64 = rows.iter().filter(|r| r["event"] == "capture").map(|r| f(&r["duration_ms"])).sum();
    close(s["capture_time_ms"].as_f64().unwrap(), capture_ms, "capture time");
    assert_eq!(s["captured_sizes"], serde_json::json!([1, 2, 4, 8]));

    // ---- moe_expert_routing.csv / moe_expert_summary.json
    let rows = read_csv(dir, "moe_expert_routing.csv", &MOE_COLUMNS);
    assert_eq!(rows.len(), 4 + 3, "one window; experts with no token have no row");
    assert!(rows.iter().all(|r| r["window_first_step"] == "0" && r["window_steps"] == "3"), "{rows:?}");
    let mut per_layer: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for r in &rows {
        let v = per_layer.entry(r["layer"].clone()).or_insert_with(|| vec![0; 4]);
        v[r["expert_id"].parse::<usize>().unwrap()] += r["num_tokens"].parse::<u64>().unwrap();
    }
    let s = read_json(dir, "moe_expert_summary.json");
    for (layer, tokens) in &per_layer {
        let stats = &s["layers"][layer];
        let got: Vec<u64> =
            stats["tokens_per_expert"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        assert_eq!(&got, tokens, "layer {layer}");
        let mean = tokens.iter().sum::<u64>() as f64 / tokens.len() as f64;
        let max = *tokens.iter().max().unwrap() as f64;
        close(stats["max_over_mean"].as_f64().unwrap(), max / mean, "max_over_mean");
        let var = tokens.iter().map(|t| (*t as f64 - mean).powi(2)).sum::<f64>() / tokens.len() as f64;
        close(stats["coefficient_of_variation"].as_f64().unwrap(), var.sqrt() / mean, "cv");
    }
    close(s["layers"]["0"]["max_over_mean"].as_f64().unwrap(), 1.0, "an even layer");
    assert!(s["layers"]["7"]["max_over_mean"].as_f64().unwrap() > 3.5, "the skewed layer shows its skew");
    assert_eq!(s["most_imbalanced_layers"], serde_json::json!([7, 0]));
    assert_eq!(s["layers"]["7"]["hottest_expert"], 0);

    assert_eq!(manifest.rows["kv_cache_usage.csv"], 5);
    assert_eq!(s["records"], 6, "two layers routed in three steps");
    assert_eq!(manifest.rows["moe_expert_routing.csv"], 7);
    assert_eq!(manifest.total_dropped(), 0);
}

#[test]
fn too_many_experts_are_dropped_and_counted() {
    let memory = profilemate::MemorySink::new();
    let session = profilemate::builder().in_memory_only().sink(memory.clone()).build().expect("session");
    let moe = session.moe_experts();
    moe.record_layer(0, &vec![1u32; profilemate::MAX_EXPERTS]);
    moe.record_layer(1, &vec![1u32; profilemate::MAX_EXPERTS + 1]);
    let manifest = session.shutdown().expect("shutdown");
    assert_eq!(memory.rows().moe_routing.len(), profilemate::MAX_EXPERTS);
    assert_eq!(manifest.dropped["moe_expert"]["text_too_long"], 1);
}

#[test]
fn disabled_trackers_write_no_files() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let session = profilemate::builder()
        .dir(tmp.path())
        .disable(ProfilerKind::KvCache)
        .disable(ProfilerKind::CudaGraph)
        .disable(ProfilerKind::MoeExpert)
        .build()
        .expect("session");
    session.kv_cache().record(&KvCacheSample::default());
    session.cuda_graphs().eager(1);
    session.moe_experts().record_layer(0, &[1, 2]);
    session.shutdown().expect("shutdown");
    for f in ["kv_cache_usage.csv", "cuda_graph_events.csv", "moe_expert_routing.csv", "kv_cache_summary.json"] {
        assert!(!tmp.path().join(f).exists(), "{f} must not exist");
    }
}

/// Windows of N steps close at the first collector pass after N routing calls: each row says
/// which steps it sums, the windows of a layer tile its steps without gap or overlap, and their
/// sums are the exact totals. Per-step detail writes one row per step instead.
#[test]
fn moe_windows_tile_the_steps_and_per_step_detail_is_opt_in() {
    for window in [0u64, 1, 7] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let session = profilemate::builder()
            .dir(tmp.path())
            .moe_window_steps(window)
            .flush_interval(Duration::from_millis(1))
            .build()
            .expect("session");
        let moe = session.moe_experts();
        let steps = 300u64;
        for step in 0..steps {
            moe.record_layer(0, &[1, 2, (step % 3) as u32]);
            moe.record_layer(5, &[4, 0, 0, 1]);
            if step % 50 == 0 {
                std::thread::sleep(Duration::from_millis(3));
            }
        }
        let manifest = session.shutdown().expect("shutdown");
        assert_eq!(manifest.total_dropped(), 0);
        let rows = read_csv(tmp.path(), "moe_expert_routing.csv", &MOE_COLUMNS);
        let s = read_json(tmp.path(), "moe_expert_summary.json");
        assert_eq!(s["records"], 2 * steps);
        for (layer, experts) in [("0", 3usize), ("5", 4)] {
            let mine: Vec<_> = rows.iter().filter(|r| r["layer"] == layer).collect();
            let mut tokens = vec![0u64; experts];
            let mut windows: Vec<(u64, u64)> = Vec::new();
            for r in &mine {
                tokens[r["expert_id"].parse::<usize>().unwrap()] += r["num_tokens"].parse::<u64>().unwrap();
                let w = (r["window_first_step"].parse().unwrap(), r["window_steps"].parse().unwrap());
                if windows.last() != Some(&w) {
                    windows.push(w);
                }
            }
            let got: Vec<u64> = s["layers"][layer]["tokens_per_expert"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
                .collect();
            assert_eq!(got, tokens, "window {window}, layer {layer}: the rows sum to the totals");
            let mut next = 0;
            for (first, n) in &windows {
                assert_eq!(*first, next, "window {window}, layer {layer}: windows tile the steps {windows:?}");
                if window == 0 {
                    assert_eq!(*n, 1, "per-step detail");
                }
                next += n;
            }
            assert_eq!(next, steps);
            if window == 7 {
                let (last_first, _) = windows[windows.len() - 1];
                assert!(windows.iter().all(|(f, n)| *n >= 7 || *f == last_first), "{windows:?}");
            }
        }
    }
}
