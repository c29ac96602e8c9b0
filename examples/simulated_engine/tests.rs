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

/// Rows of a CSV table in `dir`, its rolled-over files (`<table>.<n>.csv`, oldest first) then
/// the file being written, as maps from column to field.
fn read_table(dir: &std::path::Path, file: &str) -> Vec<std::collections::BTreeMap<String, String>> {
    let stem = file.trim_end_matches(".csv");
    let mut rolled: Vec<(u64, std::path::PathBuf)> = std::fs::read_dir(dir)
        .expect("dir")
        .filter_map(|e| {
            let e = e.ok()?;
            let name = e.file_name().to_string_lossy().into_owned();
            let n = name.strip_prefix(&format!("{stem}."))?.strip_suffix(".csv")?.parse().ok()?;
            Some((n, e.path()))
        })
        .collect();
    rolled.sort();
    let mut rows = Vec::new();
    for path in rolled.into_iter().map(|(_, p)| p).chain([dir.join(file)]) {
        let mut reader = csv::Reader::from_path(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let header: Vec<String> = reader.headers().expect("header").iter().map(String::from).collect();
        for r in reader.records() {
            let r = r.expect("every line parses");
            rows.push(header.iter().cloned().zip(r.iter().map(String::from)).collect());
        }
    }
    rows
}

fn read_json(dir: &std::path::Path, file: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"))).expect("JSON")
}

fn phase_name(p: Phase) -> &'static str {
    p.as_str()
}

/// A DeepSeek-V3-shaped MoE model (58 layers x 256 experts, top-8), shortened: with the default
/// buffer size nothing is dropped, every step has its forward row, and the routing totals are
/// the engine's own (tokens x top-k per layer), exact in the summary and in the windowed rows.
#[test]
fn a_large_moe_model_never_crowds_out_the_core_profilers() {
    let config = SimConfig {
        experts: 256,
        moe_layers: 58,
        top_k: 8,
        requests: 60,
        hidden: 8,
        prompt_len: (16, 96),
        output_len: (8, 48),
        max_num_batched_tokens: 128,
        ..SimConfig::default()
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let session = profilemate::builder().dir(tmp.path()).build().expect("session");
    let started = std::time::Instant::now();
    let stats = run(&config, &session).expect("run");
    let elapsed = started.elapsed().as_secs_f64();
    let manifest = session.shutdown().expect("shutdown");
    for (profiler, reasons) in &manifest.dropped {
        assert!(reasons.values().all(|n| *n == 0), "{profiler} dropped events: {reasons:?}");
    }
    let dir = tmp.path();
    let forward = read_table(dir, "forward_pass_timing.csv");
    assert_eq!(forward.len() as u64, stats.steps, "one forward row per engine step");
    let shapes: Vec<(String, u32, u32)> = forward
        .iter()
        .map(|r| (r["phase"].clone(), r["batch_size"].parse().unwrap(), r["num_tokens"].parse().unwrap()))
        .collect();
    let trace: Vec<(String, u32, u32)> =
        stats.trace.iter().map(|(p, s, t)| (phase_name(*p).to_string(), *s, *t)).collect();
    assert_eq!(shapes, trace);

    // Routing: every layer routed every step's tokens top-k times.
    let routed: u64 = stats.trace.iter().map(|t| u64::from(t.2)).sum::<u64>() * u64::from(config.top_k);
    let summary = read_json(dir, "moe_expert_summary.json");
    assert_eq!(summary["records"], stats.steps * u64::from(config.moe_layers));
    let rows = read_table(dir, "moe_expert_routing.csv");
    let mut from_rows = vec![vec![0u64; config.experts as usize]; config.moe_layers as usize];
    for r in &rows {
        let (layer, expert): (usize, usize) = (r["layer"].parse().unwrap(), r["expert_id"].parse().unwrap());
        from_rows[layer][expert] += r["num_tokens"].parse::<u64>().unwrap();
    }
    for layer in 0..config.moe_layers as usize {
        let stats = &summary["layers"][layer.to_string()];
        assert_eq!(stats["total_tokens"], routed, "layer {layer}: tokens x top-k");
        let tokens: Vec<u64> =
            stats["tokens_per_expert"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        assert_eq!(tokens, from_rows[layer], "layer {layer}: the windowed rows sum to the summary");
        let mean = routed as f64 / f64::from(config.experts);
        let max = *tokens.iter().max().unwrap() as f64;
        assert!((stats["max_over_mean"].as_f64().unwrap() - max / mean).abs() < 1e-9);
    }
    // The forward summary is the rows'.
    let fs = read_json(dir, "forward_pass_summary.json");
    for phase in ["prefill", "decode", "mixed"] {
        let mine: Vec<&std::collections::BTreeMap<String, String>> =
            forward.iter().filter(|r| r["phase"] == phase).collect();
        assert_eq!(fs[phase]["count"], mine.len() as u64, "{phase}");
        let tokens: u64 = mine.iter().map(|r| r["num_tokens"].parse::<u64>().unwrap()).sum();
        assert_eq!(fs[phase]["total_tokens"], tokens, "{phase}");
        let total_ms: f64 = mine.iter().map(|r| r["forward_time_ms"].parse::<f64>().unwrap()).sum();
        let got = fs[phase]["total_ms"].as_f64().unwrap();
        assert!((got - total_ms).abs() <= 1e-6 * total_ms.max(1.0), "{phase}: {got} != {total_ms}");
    }
    let bytes: u64 = manifest.bytes_written.values().sum();
    eprintln!(
        "58x256 top-8: {} steps in {elapsed:.1} s ({:.0} steps/s), 0 drops, {} MoE rows, {:.0} bytes/step written",
        stats.steps,
        stats.steps as f64 / elapsed,
        rows.len(),
        bytes as f64 / stats.steps as f64
    );
}

/// Sizes of the table files (CSV, Parquet) in `dir`, by inode (a file renamed while the
/// directory is listed is counted once).
fn table_files(dir: &std::path::Path) -> std::collections::BTreeMap<u64, u64> {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return seen };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".csv") || name.contains(".parquet") {
            if let Ok(m) = e.metadata() {
                seen.insert(m.ino(), m.len());
            }
        }
    }
    seen
}

/// Bytes the table files held together at one moment, at least: a listing is not atomic (a file
/// removed to make room can be counted beside the bytes written after its removal), so a file
/// counts only if a second listing still finds it, no smaller. Files only grow while they exist,
/// so every counted file held at least its counted bytes at the moment between the listings.
fn table_bytes(dir: &std::path::Path) -> u64 {
    let first = table_files(dir);
    let second = table_files(dir);
    first.iter().filter(|(ino, len)| second.get(ino).is_some_and(|now| now >= len)).map(|(_, len)| len).sum()
}

/// A long run with per-step MoE rows under a 1 MB budget: the tables stay within it on disk at
/// every moment (watched while the run goes), the newest rows are kept, and the summaries equal
/// those of the same run without a budget.
#[test]
fn an_output_budget_keeps_the_newest_rows_within_it_at_every_moment() {
    let config = SimConfig {
        experts: 64,
        moe_layers: 16,
        top_k: 4,
        requests: 140,
        hidden: 8,
        prompt_len: (16, 96),
        output_len: (8, 64),
        max_num_batched_tokens: 128,
        ..SimConfig::default()
    };
    let mut sinks = vec![profilemate::SinkKind::Csv, profilemate::SinkKind::Json];
    if cfg!(feature = "parquet") {
        sinks.push(profilemate::SinkKind::Parquet);
    }
    const BUDGET: u64 = 1 << 20;
    let run_in = |dir: &std::path::Path, budget: Option<u64>| {
        let session = profilemate::builder()
            .dir(dir)
            .sinks(&sinks)
            .moe_window_steps(0)
            .max_output_bytes(budget)
            // The engine runs unpaced: room for the per-step MoE rows of a few collector passes
            // even when Parquet encoding (slow in a debug build) lengthens a pass.
            .buffer_events(1 << 18)
            .build()
            .expect("session");
        let stats = run(&config, &session).expect("run");
        (stats, session.shutdown().expect("shutdown"))
    };
    let free = tempfile::tempdir().expect("tempdir");
    let (free_stats, free_manifest) = run_in(free.path(), None);
    let free_bytes: u64 = free_manifest.bytes_written.values().sum();
    assert!(free_bytes > 3 * BUDGET, "the run must write well beyond the budget: {free_bytes} bytes");

    let bounded = tempfile::tempdir().expect("tempdir");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (dir, stop) = (bounded.path().to_path_buf(), stop.clone());
        std::thread::spawn(move || {
            let (mut max, mut looks) = (0u64, 0u64);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                max = max.max(table_bytes(&dir));
                looks += 1;
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            (max.max(table_bytes(&dir)), looks)
        })
    };
    let (stats, manifest) = run_in(bounded.path(), Some(BUDGET));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (max_on_disk, looks) = watcher.join().expect("watcher");
    assert!(max_on_disk <= BUDGET, "{max_on_disk} bytes on disk at one moment, over the budget of {BUDGET}");
    assert!(looks > 50, "the directory was watched while the run went ({looks} looks)");
    assert_eq!(stats, free_stats, "the same run");
    let report = manifest.output_budget.as_ref().expect("the manifest reports the budget");
    assert_eq!(report.max_bytes, BUDGET);
    assert!(!report.removed_files.is_empty() && report.rolled_files.len() >= report.removed_files.len());
    for removed in &report.removed_files {
        assert!(!bounded.path().join(removed).exists(), "{removed} is listed as removed");
    }
    assert_eq!(manifest.total_dropped(), 0, "{:?}", manifest.dropped);

    // The newest rows are kept: what is left of each table is the end of the run's rows.
    let forward = read_table(bounded.path(), "forward_pass_timing.csv");
    let shapes: Vec<(String, u32, u32)> = forward
        .iter()
        .map(|r| (r["phase"].clone(), r["batch_size"].parse().unwrap(), r["num_tokens"].parse().unwrap()))
        .collect();
    let trace: Vec<(String, u32, u32)> =
        stats.trace.iter().map(|(p, s, t)| (phase_name(*p).to_string(), *s, *t)).collect();
    assert!(!shapes.is_empty() && trace.ends_with(&shapes), "forward rows kept are the newest");
    let moe = read_table(bounded.path(), "moe_expert_routing.csv");
    let steps: Vec<u64> = moe.iter().map(|r| r["window_first_step"].parse().unwrap()).collect();
    assert_eq!(steps.last().copied(), Some(stats.steps - 1), "the last step's MoE rows are kept");
    assert!(steps.windows(2).all(|w| w[0] <= w[1]) && steps[0] > 0, "a suffix of the steps, the oldest removed");

    // The summaries are the whole run's, as without a budget.
    for file in ["moe_expert_summary.json", "batch_utilization_summary.json", "kv_cache_summary.json"] {
        assert_eq!(read_json(bounded.path(), file), read_json(free.path(), file), "{file}");
    }
    let (a, b) =
        (read_json(bounded.path(), "forward_pass_summary.json"), read_json(free.path(), "forward_pass_summary.json"));
    for phase in ["prefill", "decode", "mixed"] {
        assert_eq!(a[phase]["count"], b[phase]["count"]);
        assert_eq!(a[phase]["total_tokens"], b[phase]["total_tokens"]);
    }
    let (a, b) =
        (read_json(bounded.path(), "preemption_summary.json"), read_json(free.path(), "preemption_summary.json"));
    for key in ["total_preemptions", "total_requests", "requests_preempted", "preemption_reasons"] {
        assert_eq!(a[key], b[key], "{key}");
    }
    eprintln!(
        "budget {BUDGET} bytes: at most {max_on_disk} on disk over {looks} looks; {} files rolled, {} removed; \
         {free_bytes} bytes written without a budget; {} forward rows of {} kept",
        report.rolled_files.len(),
        report.removed_files.len(),
        forward.len(),
        stats.steps
    );
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

/// MoE routing and steps together: per-step detail rows carry the step their routing call was
/// made in, and the step timeline's `moe_max_over_mean` is recomputed exactly from them; windowed
/// rows (the default) span steps, so they carry no step and the timeline leaves the figure empty
/// rather than guess it.
#[test]
fn moe_rows_carry_their_step_and_feed_the_timeline_only_per_step() {
    use std::collections::BTreeMap;
    let config = SimConfig { experts: 8, moe_layers: 3, top_k: 2, ..small(Shape::DecoderOnly) };
    let run_with = |window: u64| {
        let memory = MemorySink::new();
        let session =
            Session::builder().in_memory_only().moe_window_steps(window).sink(memory.clone()).build().expect("session");
        let stats = run(&config, &session).expect("run");
        let manifest = session.shutdown().expect("shutdown");
        assert_eq!(manifest.total_dropped(), 0, "{:?}", manifest.dropped);
        (stats, memory.rows())
    };

    let (stats, rows) = run_with(0);
    assert!(!rows.moe_routing.is_empty());
    assert!(rows.moe_routing.iter().all(|r| r.window_steps == 1), "per-step detail rows");
    let forward_steps: std::collections::BTreeSet<u64> = rows.forward_pass.iter().filter_map(|r| r.step).collect();
    // (step, layer) -> tokens per expert.
    let mut routed: BTreeMap<(u64, u32), Vec<u64>> = BTreeMap::new();
    for r in &rows.moe_routing {
        let step = r.step.expect("a routing call inside a step carries it");
        assert!(forward_steps.contains(&step), "MoE row of step {step}, which has no forward pass");
        routed.entry((step, r.layer)).or_insert_with(|| vec![0; config.experts as usize])[r.expert_id as usize] +=
            u64::from(r.num_tokens);
    }
    let mut expected: BTreeMap<u64, f64> = BTreeMap::new();
    for ((step, _), tokens) in &routed {
        let total: u64 = tokens.iter().sum();
        let ratio = *tokens.iter().max().unwrap() as f64 / (total as f64 / tokens.len() as f64);
        let e = expected.entry(*step).or_insert(ratio);
        *e = e.max(ratio);
    }
    let layers_per_step = routed.keys().fold(BTreeMap::new(), |mut m: BTreeMap<u64, u32>, (s, _)| {
        *m.entry(*s).or_default() += 1;
        m
    });
    assert!(layers_per_step.values().all(|&n| n == config.moe_layers), "every layer routes once per step");
    let mut filled = 0;
    for t in &rows.step_timeline {
        match (t.moe_max_over_mean, expected.get(&t.step)) {
            (Some(got), Some(want)) => {
                assert!((got - want).abs() < 1e-9, "step {}: {got} != {want}", t.step);
                filled += 1;
            }
            (None, None) => {}
            (got, want) => panic!("step {}: timeline {got:?}, rows {want:?}", t.step),
        }
    }
    assert_eq!(filled as u64, stats.steps, "every step that routed has its imbalance");

    let (_, rows) = run_with(DEFAULT_WINDOW);
    assert!(!rows.moe_routing.is_empty());
    assert!(rows.moe_routing.iter().all(|r| r.step.is_none()), "a window spans steps: no step");
    assert!(rows.moe_routing.iter().any(|r| r.window_steps > 1));
    assert!(rows.step_timeline.iter().all(|t| t.moe_max_over_mean.is_none()), "no per-step data: empty, not guessed");
}

const DEFAULT_WINDOW: u64 = profilemate::DEFAULT_MOE_WINDOW_STEPS;
