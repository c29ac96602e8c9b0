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

/// Every figure of `step_timeline` recomputed from the other tables' rows, joined by `step`.
#[test]
fn the_step_timeline_joins_the_tables_exactly() {
    use std::collections::BTreeMap;
    let config = SimConfig {
        shape: Shape::VisionLanguage,
        kv_blocks: 40,
        experts: 8,
        moe_layers: 2,
        ..small(Shape::VisionLanguage)
    };
    let (stats, rows) = run_recorded(&config);
    assert!(stats.preemptions > 0 && stats.encoder_calls > 0, "the run must exercise preemptions and encoders");
    // One timeline row per step the engine opened, in order; forward passes and CPU operations
    // all inside a step, graph captures (before the loop) outside any.
    assert_eq!(rows.step_timeline.len() as u64, stats.steps + stats.empty_schedules);
    let ids: Vec<u64> = rows.step_timeline.iter().map(|r| r.step).collect();
    assert_eq!(ids, (1..=ids.len() as u64).collect::<Vec<_>>());
    assert!(rows.forward_pass.iter().all(|r| r.step.is_some()));
    assert!(rows.cpu_operations.iter().all(|r| r.step.is_some()));
    assert!(rows.cuda_graph.iter().filter(|r| r.event == profilemate::GraphEvent::Capture).all(|r| r.step.is_none()));

    #[derive(Default, Debug, PartialEq)]
    struct Join {
        forward_ns: Option<u64>,
        passes: u32,
        tokens: Option<u32>,
        scheduling: Option<u64>,
        preparation: Option<u64>,
        sampling: Option<u64>,
        other_cpu: Option<u64>,
        preemptions: u32,
        resumes: u32,
        encoder: Option<u64>,
        token_util: Option<f64>,
    }
    let add = |slot: &mut Option<u64>, ns: u64| *slot = Some(slot.unwrap_or(0) + ns);
    let mut by_step: BTreeMap<u64, Join> = BTreeMap::new();
    for r in &rows.forward_pass {
        let j = by_step.entry(r.step.unwrap()).or_default();
        add(&mut j.forward_ns, r.forward_time_ns);
        j.passes += 1;
        j.tokens = Some(j.tokens.unwrap_or(0) + r.num_tokens);
    }
    for r in &rows.cpu_operations {
        let j = by_step.entry(r.step.unwrap()).or_default();
        match &*r.operation {
            "scheduling" => add(&mut j.scheduling, r.duration_ns),
            "batch_preparation" => add(&mut j.preparation, r.duration_ns),
            "sampling" => add(&mut j.sampling, r.duration_ns),
            "model_execution" => {}
            _ => add(&mut j.other_cpu, r.duration_ns),
        }
    }
    for r in rows.preemption_events.iter().filter(|r| r.step.is_some()) {
        let j = by_step.entry(r.step.unwrap()).or_default();
        match r.event {
            LifecycleEvent::Preempted => j.preemptions += 1,
            LifecycleEvent::Resumed => j.resumes += 1,
            _ => {}
        }
    }
    for r in &rows.encoder_decoder {
        let j = by_step.entry(r.step.unwrap()).or_default();
        let e = j.encoder.get_or_insert(0);
        if r.component == Component::Encoder {
            *e += r.duration_ns;
        }
    }
    for r in &rows.batch_utilization {
        by_step.entry(r.step.unwrap()).or_default().token_util = r.token_utilization_pct;
    }
    for t in &rows.step_timeline {
        let j = by_step.remove(&t.step).unwrap_or_default();
        let from_timeline = Join {
            forward_ns: t.forward_time_ns,
            passes: t.forward_passes,
            tokens: t.num_tokens,
            scheduling: t.scheduling_ns,
            preparation: t.batch_preparation_ns,
            sampling: t.sampling_ns,
            other_cpu: t.other_cpu_ns,
            preemptions: t.preemptions.unwrap(),
            resumes: t.resumes.unwrap(),
            encoder: t.encoder_time_ns,
            token_util: t.token_utilization_pct,
        };
        assert_eq!(from_timeline, j, "step {}", t.step);
        let claimed: u64 = [t.forward_time_ns, t.scheduling_ns, t.batch_preparation_ns, t.sampling_ns, t.other_cpu_ns]
            .iter()
            .map(|v| v.unwrap_or(0))
            .sum();
        assert_eq!(t.unclaimed_ns, t.wall_ns.saturating_sub(claimed), "step {}", t.step);
    }
    assert!(by_step.is_empty(), "rows of steps without a timeline row: {:?}", by_step.keys().collect::<Vec<_>>());
    // Preemptions land in the steps the engine says it preempted in.
    let preempted: Vec<u64> =
        rows.step_timeline.iter().filter(|t| t.preemptions.unwrap() > 0).map(|t| t.step).collect();
    assert_eq!(preempted, stats.preempted_steps);
}

#[test]
fn an_injected_stall_is_the_host_gap_before_its_step() {
    let config = SimConfig { stall_every: 10, stall_ms: 5.0, ..small(Shape::DecoderOnly) };
    let (stats, rows) = run_recorded(&config);
    assert!(!stats.stalled_steps.is_empty());
    for t in &rows.step_timeline {
        let gap = t.host_gap_before_ns.unwrap_or(0);
        if stats.stalled_steps.contains(&t.step) {
            assert!(gap >= 5_000_000, "step {} after a 5 ms stall has a gap of {gap} ns", t.step);
        }
    }
}

#[test]
fn without_a_step_guard_each_forward_pass_opens_a_step() {
    let memory = MemorySink::new();
    let session = Session::builder().in_memory_only().sink(memory.clone()).build().expect("session");
    let (forward, cpu) = (session.forward_pass(), session.cpu_timing());
    cpu.start(profilemate::CpuOp::SCHEDULING).stop(); // before any step: no step
    for _ in 0..3 {
        forward.start(Phase::Decode, 4, 4).stop();
        cpu.start(profilemate::CpuOp::SAMPLING).stop(); // after the pass: its step
        cpu.start(profilemate::CpuOp::SCHEDULING).stop(); // the next batch: still this step
    }
    session.shutdown().expect("shutdown");
    let rows = memory.rows();
    let steps: Vec<Option<u64>> = rows.cpu_operations.iter().map(|r| r.step).collect();
    assert_eq!(steps, [None, Some(1), Some(1), Some(2), Some(2), Some(3), Some(3)]);
    assert_eq!(rows.forward_pass.iter().map(|r| r.step).collect::<Vec<_>>(), [Some(1), Some(2), Some(3)]);
    assert_eq!(rows.step_timeline.len(), 3);
}
