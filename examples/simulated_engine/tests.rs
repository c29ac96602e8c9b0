//! Tests of the simulated engine (run by `cargo test`, see `test = true` in Cargo.toml).

use crate::engine::{run, RunStats, Shape, SimConfig};
use profilemate::{Component, LifecycleEvent, MemorySink, Outcome, Phase, Rows, Session};

fn small(shape: Shape) -> SimConfig {
    SimConfig {
        shape,
        requests: 40,
        hidden: 8,
        burst: 20,
        prompt_len: (16, 300),
        output_len: (4, 40),
        kv_blocks: 80,
        experts: 0,
        ..SimConfig::default()
    }
}

fn run_recorded(config: &SimConfig) -> (RunStats, Rows) {
    let memory = MemorySink::new();
    let session = Session::builder().in_memory_only().sink(memory.clone()).build().expect("session");
    let stats = run(config, &session).expect("run");
    let manifest = session.shutdown().expect("shutdown");
    assert_eq!(manifest.total_dropped(), 0, "nothing may be dropped: {:?}", manifest.dropped);
    (stats, memory.rows())
}

fn lifecycle_sequence(rows: &Rows) -> Vec<(String, LifecycleEvent)> {
    rows.preemption_events.iter().map(|r| (r.request_id.clone(), r.event)).collect()
}

#[test]
fn a_seed_gives_the_same_schedule() {
    let config = small(Shape::DecoderOnly);
    let (a, rows_a) = run_recorded(&config);
    let (b, rows_b) = run_recorded(&config);
    assert_eq!(a, b);
    assert_eq!(lifecycle_sequence(&rows_a), lifecycle_sequence(&rows_b));
    let shapes = |rows: &Rows| -> Vec<(Phase, u32, u32)> {
        rows.forward_pass.iter().map(|r| (r.phase, r.batch_size, r.num_tokens)).collect()
    };
    assert_eq!(shapes(&rows_a), shapes(&rows_b));
    assert_eq!(shapes(&rows_a), a.trace);

    let (c, _) = run_recorded(&SimConfig { seed: config.seed + 1, ..config });
    assert_ne!(a.trace, c.trace, "another seed must give another schedule");
}

#[test]
fn a_small_cache_preempts_and_a_large_one_does_not() {
    let tight = SimConfig { kv_blocks: 24, prompt_len: (16, 120), output_len: (20, 80), ..small(Shape::DecoderOnly) };
    let (stats, rows) = run_recorded(&tight);
    let preempted = rows.preemption_events.iter().filter(|r| r.event == LifecycleEvent::Preempted).count();
    assert!(stats.preemptions > 0, "a 24-block cache must preempt");
    assert_eq!(preempted as u64, stats.preemptions);
    assert!(rows
        .preemption_events
        .iter()
        .filter(|r| r.event == LifecycleEvent::Preempted)
        .all(|r| r.reason == "RECOMPUTE" && r.extra_info.contains("num_blocks=")));
    let resumed = rows.preemption_events.iter().filter(|r| r.event == LifecycleEvent::Resumed).count();
    assert_eq!(resumed, preempted, "every preempted request resumes in this workload");
    assert!(stats.peak_blocks <= tight.kv_blocks);

    let roomy = SimConfig { kv_blocks: 10_000, ..small(Shape::DecoderOnly) };
    let (stats, rows) = run_recorded(&roomy);
    assert_eq!(stats.preemptions, 0);
    assert!(rows.preemption_events.iter().all(|r| r.event != LifecycleEvent::Preempted));
}

#[test]
fn every_request_finishes() {
    let config = small(Shape::DecoderOnly);
    let (stats, rows) = run_recorded(&config);
    assert_eq!(stats.finished, config.requests as u64);
    assert_eq!(rows.request_lifecycle.len(), config.requests);
    assert!(rows.request_lifecycle.iter().all(|r| r.outcome == Outcome::Finished && r.total_time_ns.is_some()));
    let started = rows.preemption_events.iter().filter(|r| r.event == LifecycleEvent::Started).count();
    assert_eq!(started, config.requests);
}

#[test]
fn the_run_holds_every_phase_and_underutilized_batches() {
    let (stats, rows) = run_recorded(&small(Shape::DecoderOnly));
    assert!(stats.phases.iter().all(|&n| n > 0), "prefill, decode and mixed steps: {:?}", stats.phases);
    assert_eq!(rows.batch_utilization.len() as u64, stats.steps);
    assert!(rows.batch_utilization.iter().any(|r| r.token_utilization_pct.is_some_and(|p| p < 50.0)));
    let ops: std::collections::BTreeSet<&str> = rows.cpu_operations.iter().map(|r| &*r.operation).collect();
    for op in ["scheduling", "batch_preparation", "model_execution", "sampling", "detokenize"] {
        assert!(ops.contains(op), "missing CPU operation {op}");
    }
}

fn components(rows: &Rows, c: Component) -> Vec<&str> {
    rows.encoder_decoder.iter().filter(|r| r.component == c).map(|r| r.context.as_str()).collect()
}

#[test]
fn each_model_shape_produces_its_components() {
    let (gpt, rows) = run_recorded(&small(Shape::DecoderOnly));
    assert!(components(&rows, Component::Encoder).is_empty());
    assert_eq!(components(&rows, Component::Decoder).len() as u64, gpt.steps);

    let config = small(Shape::EncoderDecoder);
    let (whisper, rows) = run_recorded(&config);
    let encoders = components(&rows, Component::Encoder);
    assert_eq!(encoders.len(), config.requests, "the audio encoder runs once per request");
    assert!(encoders.iter().all(|c| *c == "audio_encoder"));
    assert_eq!(components(&rows, Component::CrossAttention).len() as u64, whisper.steps);

    let config = small(Shape::VisionLanguage);
    let (vlm, rows) = run_recorded(&config);
    let encoders = components(&rows, Component::Encoder);
    assert_eq!(encoders.len() as u64, vlm.encoder_calls);
    assert!(encoders.len() >= config.requests, "one vision encoder call per image, 1 or 2 images a request");
    assert!(encoders.iter().all(|c| *c == "vision_encoder"));
}

#[test]
fn bad_configurations_are_refused() {
    let too_small = SimConfig { kv_blocks: 2, ..small(Shape::DecoderOnly) };
    let err = too_small.validate().unwrap_err();
    assert!(err.contains("--kv-blocks 2"), "{err}");
    assert!(crate::parse_args(&["--model".into(), "bert".into()]).unwrap_err().contains("gpt, whisper or vlm"));
    assert!(crate::parse_args(&["--prompt-len".into(), "10".into()]).unwrap_err().contains("MIN-MAX"));
    assert!(crate::parse_args(&["--frobnicate".into(), "1".into()]).unwrap_err().contains("unknown option"));
}

#[test]
fn kv_usage_stays_within_the_cache_and_preemptions_happen_only_when_it_is_full() {
    let config = SimConfig { kv_blocks: 30, prompt_len: (16, 120), output_len: (20, 80), ..small(Shape::DecoderOnly) };
    let (stats, rows) = run_recorded(&config);
    assert!(stats.preemptions > 0);
    assert_eq!(rows.kv_cache.len() as u64, stats.steps + stats.empty_schedules);
    assert!(rows.kv_cache.iter().all(|r| r.total_blocks == config.kv_blocks && r.used_blocks <= r.total_blocks));
    assert!(rows.kv_cache.iter().any(|r| r.usage_pct() == Some(100.0) || r.used_blocks + 4 > r.total_blocks));
    for r in rows.preemption_events.iter().filter(|r| r.event == LifecycleEvent::Preempted) {
        let field = |k: &str| -> u32 {
            r.extra_info
                .split(';')
                .find_map(|kv| kv.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{k} missing in {}", r.extra_info))
        };
        assert!(field("free_blocks_before") < field("needed_blocks"), "preempted with room left: {}", r.extra_info);
    }
}

#[test]
fn a_skewed_router_shows_its_imbalance_and_an_even_one_does_not() {
    let skewed = SimConfig { experts: 16, moe_layers: 3, moe_skew: 1.2, ..small(Shape::DecoderOnly) };
    let memory = MemorySink::new();
    let session = Session::builder().in_memory_only().sink(memory.clone()).build().expect("session");
    run(&skewed, &session).expect("run");
    session.shutdown().expect("shutdown");
    let summary = memory.summaries().and_then(|s| s.moe_expert).expect("moe summary");
    assert_eq!(summary.layers.len(), 3);
    // Deeper layers were given a steeper skew: the summary must rank them so.
    assert_eq!(summary.most_imbalanced_layers, vec![2, 1, 0]);
    assert!(summary.layers.values().all(|l| l.max_over_mean > 2.0), "{summary:?}");

    let even = SimConfig { moe_skew: 0.0, ..skewed };
    let memory = MemorySink::new();
    let session = Session::builder().in_memory_only().sink(memory.clone()).build().expect("session");
    run(&even, &session).expect("run");
    session.shutdown().expect("shutdown");
    let summary = memory.summaries().and_then(|s| s.moe_expert).expect("moe summary");
    assert!(summary.layers.values().all(|l| l.max_over_mean < 1.3), "{summary:?}");
}

#[test]
fn decode_steps_replay_graphs_and_large_or_prefill_steps_run_eagerly() {
    let config = small(Shape::DecoderOnly);
    let (stats, rows) = run_recorded(&config);
    use profilemate::GraphEvent;
    let captures = rows.cuda_graph.iter().filter(|r| r.event == GraphEvent::Capture).count();
    assert_eq!(captures, config.graph_sizes.len());
    let steps = rows.cuda_graph.iter().filter(|r| r.event != GraphEvent::Capture).count() as u64;
    assert_eq!(steps, stats.steps);
    for r in rows.cuda_graph.iter().filter(|r| r.event == GraphEvent::Replay) {
        let padded = r.padded_batch_size.expect("padded size");
        assert!(padded >= r.batch_size && config.graph_sizes.contains(&padded));
    }
}
