//! A mistral.rs engine profiled by profilemate: build the model, wrap its pipeline, send chat
//! requests as usual, get the contract files.
//!
//! ```text
//! PROFILEMATE_DIR=out cargo run --example chat -- path/to/model   # a local model folder
//! PROFILEMATE_DIR=out cargo run --example chat -- --tiny DIR      # writes the tiny test Llama to DIR first
//! profilemate report out
//! ```
//!
//! Settings come from the environment (`PROFILEMATE_DIR`, `PROFILEMATE_DISABLE`, ...; see the
//! profilemate README). `PROFILEMATE_DISABLE=all`-style runs leave the engine untouched.

use mistralrs::model_builder_trait::{build_model_from_pipeline, build_text_pipeline};
use mistralrs::{ModelDType, RequestBuilder, TextMessageRole, TextModelBuilder, TokenSource};
use std::sync::Arc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let model_dir = match (args.next(), args.next()) {
        (Some(flag), Some(dir)) if flag == "--tiny" => {
            profilemate_mistralrs::tiny_model::write(dir.as_ref())?;
            dir
        }
        (Some(dir), None) if !dir.starts_with('-') => dir,
        _ => anyhow::bail!(
            "usage: chat MODEL_DIR | chat --tiny DIR (a local model folder, or where to write the tiny test model)"
        ),
    };

    // The integration: a session, the pipeline built by mistral.rs's builder, wrapped.
    let session = profilemate::from_env()?;
    let builder = TextModelBuilder::new(&model_dir)
        .with_dtype(ModelDType::F32)
        .with_token_source(TokenSource::None)
        .with_max_num_seqs(8);
    let (pipeline, scheduler, config) = build_text_pipeline(builder).await?;
    let pipeline = profilemate_mistralrs::profile(pipeline, &session, &scheduler)?;
    let model = Arc::new(build_model_from_pipeline(pipeline.clone(), scheduler, config).await);

    // Requests as any mistral.rs program sends them: eight at once, different lengths.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..8 {
        let model = model.clone();
        tasks.spawn(async move {
            let prompt = profilemate_mistralrs::tiny_model::prompt(8 + 12 * i, i);
            let request = RequestBuilder::new()
                .add_message(TextMessageRole::User, prompt)
                .set_deterministic_sampler()
                .set_sampler_max_len(8 + 4 * i); // always bound the length
            model.send_chat_request(request).await
        });
    }
    while let Some(done) = tasks.join_next().await {
        let response = done??;
        println!(
            "request {}: {} prompt + {} completion tokens, finish_reason {}",
            response.id,
            response.usage.prompt_tokens,
            response.usage.completion_tokens,
            response.choices[0].finish_reason
        );
    }

    // The engine holds the pipeline during a step: once we hold it, the last step is recorded.
    drop(pipeline.lock().await);
    drop(model);
    if let Some(dir) = session.dir().map(|d| d.to_path_buf()) {
        let manifest = session.shutdown()?;
        println!(
            "profilemate: {} forward passes recorded into {}",
            manifest.rows.get("forward_pass_timing.csv").copied().unwrap_or(0),
            dir.display()
        );
    } else {
        session.shutdown()?;
        println!("profilemate: disabled, nothing written");
    }
    Ok(())
}
