//! The first ten lines of profiling: a forward pass and a scheduling step, recorded into the
//! contract files.
//!
//! ```text
//! cargo run --example quickstart            # writes into ./profilemate_out
//! PROFILEMATE_DIR=/tmp/run1 cargo run --example quickstart
//! ```

use profilemate::{BatchSample, Component, CpuOp, ModelType, Phase};
use std::hint::black_box;

/// Real work standing in for a model: `n` rounds of a 32x32 matrix-vector product.
fn matmul_work(n: usize) -> f32 {
    let a = vec![0.5f32; 32 * 32];
    let mut x = vec![1.0f32; 32];
    for _ in 0..n {
        let y: Vec<f32> = a.chunks_exact(32).map(|row| row.iter().zip(&x).map(|(a, b)| a * b).sum::<f32>()).collect();
        x = y.iter().map(|v| black_box(v * 1e-2)).collect();
    }
    x[0]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let session = profilemate::from_env()?;
    let (forward, cpu) = (session.forward_pass(), session.cpu_timing());
    let (batches, requests, components) = (session.batch_utilization(), session.requests(), session.components());
    components.declare_model_type(ModelType::DecoderOnly);

    // Eight requests: the first step prefills them all, then they decode together.
    let ids: Vec<String> = (0..8).map(|i| format!("req-{i}")).collect();
    for id in &ids {
        requests.started(id);
    }
    for step in 0..200u32 {
        let scheduling = cpu.start(CpuOp::SCHEDULING);
        let (phase, tokens) = if step == 0 { (Phase::Prefill, 8 * 64) } else { (Phase::Decode, 8) };
        batches.record(&BatchSample {
            num_seqs: 8,
            max_num_seqs: 16,
            num_tokens: tokens,
            max_tokens: 1024,
            phase,
            running_queue_len: 8,
            waiting_queue_len: 0,
        });
        scheduling.stop();

        let pass = forward.start(phase, 8, tokens);
        let decoder = components.start(Component::Decoder, "language_model");
        black_box(matmul_work(tokens as usize / 8 + 1));
        decoder.stop();
        pass.stop();

        cpu.time(CpuOp::SAMPLING, || black_box(matmul_work(1)));
    }
    for id in &ids {
        requests.finished(id, "status=FINISHED_LENGTH_CAPPED");
    }

    let dir = session.dir().map(|d| d.display().to_string()).unwrap_or_default();
    let manifest = session.shutdown()?;
    println!("profilemate wrote {} steps into {dir}:", manifest.steps);
    for (file, rows) in &manifest.rows {
        println!("  {file:<28} {rows:>6} rows");
    }
    println!("  + the *_summary.json files and profilemate_run.json ({} events dropped)", manifest.total_dropped());
    Ok(())
}
