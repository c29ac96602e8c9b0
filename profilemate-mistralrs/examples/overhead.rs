//! What the wrapper costs a real mistral.rs engine (not a timed test: a measurement printed side
//! by side in one run).
//!
//! Two engines on the tiny Llama (CPU), one with its pipeline wrapped (writing CSV and JSON
//! files as a user's run would) and one without, run the same workload in interleaved rounds
//! (plain, profiled, plain, ...). Per round: generated tokens per second. Printed: each mode's
//! median, the ratio profiled/plain per pair of rounds (median, min, max), the extra time per
//! engine step that difference amounts to, and the recording calls the wrapper makes per step
//! timed on their own.
//!
//! ```text
//! bash scripts/bench-mistralrs.sh            # or: cargo run --example overhead -- [ROUNDS]
//! ```

use mistralrs::model_builder_trait::{build_model_from_pipeline, build_text_pipeline};
use mistralrs::{Model, ModelDType, RequestBuilder, TextMessageRole, TextModelBuilder, TokenSource};
use profilemate::{BatchSample, CpuOp, Phase};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// (prompt words, max_len) per request of one round.
const WORK: [(usize, usize); 8] = [(8, 48), (30, 40), (60, 32), (15, 48), (45, 24), (20, 40), (70, 16), (10, 32)];

async fn engine(model: &Path, session: Option<&profilemate::Session>) -> anyhow::Result<Arc<Model>> {
    let builder = TextModelBuilder::new(model.display())
        .with_dtype(ModelDType::F32)
        .with_token_source(TokenSource::None)
        .with_force_cpu()
        .with_max_num_seqs(8);
    let (pipeline, scheduler, config) = build_text_pipeline(builder).await?;
    let pipeline = match session {
        Some(session) => profilemate_mistralrs::profile(pipeline, session, &scheduler)?,
        None => pipeline,
    };
    Ok(Arc::new(build_model_from_pipeline(pipeline, scheduler, config).await))
}

/// One round: all requests at once; returns (completion tokens, wall time).
async fn round(model: &Arc<Model>, round: usize) -> anyhow::Result<(usize, Duration)> {
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, &(words, max_len)) in WORK.iter().enumerate() {
        let model = model.clone();
        tasks.spawn(async move {
            let request = RequestBuilder::new()
                .add_message(TextMessageRole::User, profilemate_mistralrs::tiny_model::prompt(words, i + 8 * round))
                .set_deterministic_sampler()
                .set_sampler_max_len(max_len);
            model.send_chat_request(request).await
        });
    }
    let mut tokens = 0;
    while let Some(done) = tasks.join_next().await {
        tokens += done??.usage.completion_tokens;
    }
    Ok((tokens, start.elapsed()))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rounds: usize = std::env::args().nth(1).map(|s| s.parse()).transpose()?.unwrap_or(15);
    let tmp = tempfile::tempdir()?;
    let model = tmp.path().join("tiny-llama");
    profilemate_mistralrs::tiny_model::write(&model)?;
    let out = tmp.path().join("profile");
    let session = profilemate::builder().dir(&out).build()?;
    let plain = engine(&model, None).await?;
    let profiled = engine(&model, Some(&session)).await?;

    // Warm-up: one round each, not counted.
    round(&plain, 0).await?;
    round(&profiled, 0).await?;
    let steps_before = session.flush().map(|_| count_rows(&out))?;

    let (mut plain_tps, mut prof_tps, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let (mut plain_time, mut prof_time) = (Duration::ZERO, Duration::ZERO);
    for r in 1..=rounds {
        let (tokens_a, time_a) = round(&plain, r).await?;
        let (tokens_b, time_b) = round(&profiled, r).await?;
        // Token counts may differ by a few between the engines: which sequences share a step
        // depends on arrival timing, and a recomputed prompt step rounds differently from the
        // decode steps it replaces, which moves near-ties of the random model (and so where an
        // end-of-sequence token falls). Each round's rate uses its own count.
        let (a, b) = (tokens_a as f64 / time_a.as_secs_f64(), tokens_b as f64 / time_b.as_secs_f64());
        plain_tps.push(a);
        prof_tps.push(b);
        ratios.push(b / a);
        plain_time += time_a;
        prof_time += time_b;
    }
    session.flush()?;
    let steps = count_rows(&out) - steps_before;

    let (pa, pb) = (median(&mut plain_tps), median(&mut prof_tps));
    let ratio = median(&mut ratios);
    let (lo, hi) = (ratios[0], ratios[ratios.len() - 1]);
    println!(
        "mistral.rs 0.8.1, tiny Llama on the CPU, {} requests per round, {rounds} interleaved rounds per mode",
        WORK.len()
    );
    println!("  generated tokens/s, median: without profiling {pa:.0}, with profiling {pb:.0}");
    println!("  ratio with/without per round pair: median {ratio:.3} (min {lo:.3}, max {hi:.3})");
    let per_step_us = (prof_time.as_secs_f64() - plain_time.as_secs_f64()) / steps as f64 * 1e6;
    println!(
        "  engine steps profiled: {steps}; mean step {:.3} ms without, difference {per_step_us:+.1} us per step (total time, noisy)",
        plain_time.as_secs_f64() / steps as f64 * 1e3
    );

    // The recording calls one decode step makes, on their own (no mistral.rs): scheduling,
    // batch row, batch preparation, forward pass, sampling.
    let bench = profilemate::Session::builder().in_memory_only().build()?;
    let (forward, cpu, batches) = (bench.forward_pass(), bench.cpu_timing(), bench.batch_utilization());
    let n = 200_000u32;
    let start = Instant::now();
    for i in 0..n {
        cpu.record(CpuOp::SCHEDULING, Duration::from_micros(3), "");
        batches.record(&BatchSample {
            num_seqs: 8,
            max_num_seqs: 8,
            num_tokens: 8,
            max_tokens: 0,
            phase: Phase::Decode,
            running_queue_len: 8,
            waiting_queue_len: i % 3,
        });
        cpu.start_with(CpuOp::BATCH_PREPARATION, "phase=decode").stop();
        forward.start(Phase::Decode, 8, 8).stop();
        cpu.start(CpuOp::SAMPLING).stop();
    }
    let per_step_ns = start.elapsed().as_nanos() as f64 / f64::from(n);
    println!("  the wrapper's recording calls per step, timed alone: {per_step_ns:.0} ns");
    drop(bench);
    drop((plain, profiled));
    session.shutdown()?;
    Ok(())
}

/// Forward rows written so far (one per engine step).
fn count_rows(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("forward_pass_timing.csv"))
        .map(|s| s.lines().count().saturating_sub(1))
        .unwrap_or(0)
}
