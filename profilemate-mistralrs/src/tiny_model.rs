//! A tiny randomly initialised Llama model folder that mistral.rs loads from disk, for tests,
//! examples and benchmarks without a model hub.
//!
//! Hidden size 128, 2 layers, 4 attention heads (2 KV heads), MLP 256, a 1024-token word-level
//! vocabulary (`<s>`, `</s>`, `<unk>`, then `w3` ... `w1023`), 512 positions, float32 weights
//! drawn from a fixed-seed generator (the same folder every time with this lock file), a chat template in
//! `tokenizer_config.json` and `rope_theta` at the top level of `config.json` (both of which
//! mistral.rs needs). About 2 MB, written in milliseconds.
//!
//! ```
//! let dir = tempfile::tempdir()?;
//! profilemate_mistralrs::tiny_model::write(dir.path())?;
//! assert!(dir.path().join("model.safetensors").exists());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;

/// Vocabulary size: 3 special tokens and 1021 words `w3` ... `w1023`.
pub const VOCAB: usize = 1024;
const HIDDEN: usize = 128;
const INTERMEDIATE: usize = 256;
const LAYERS: usize = 2;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
/// The model's context length (`max_position_embeddings`).
pub const MAX_POSITIONS: usize = 512;

/// A prompt of `n` words (`n` tokens before the chat template adds its own), different for
/// each `seed`.
pub fn prompt(n: usize, seed: usize) -> String {
    (0..n).map(|i| format!("w{}", 3 + (seed * 131 + i * 17) % (VOCAB - 3))).collect::<Vec<_>>().join(" ")
}

/// Writes the model folder into `dir` (created if needed): `config.json`,
/// `generation_config.json`, `tokenizer.json`, `tokenizer_config.json`, `model.safetensors`.
///
/// # Errors
///
/// Any file that cannot be written, with its path.
pub fn write(dir: &Path) -> anyhow::Result<()> {
    use anyhow::Context;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let put = |name: &str, value: serde_json::Value| -> anyhow::Result<()> {
        let path = dir.join(name);
        std::fs::write(&path, serde_json::to_vec_pretty(&value)?).with_context(|| format!("writing {}", path.display()))
    };
    put(
        "config.json",
        json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "hidden_size": HIDDEN,
            "intermediate_size": INTERMEDIATE,
            "num_hidden_layers": LAYERS,
            "num_attention_heads": HEADS,
            "num_key_value_heads": KV_HEADS,
            "max_position_embeddings": MAX_POSITIONS,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "vocab_size": VOCAB,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "tie_word_embeddings": false,
            "torch_dtype": "float32"
        }),
    )?;
    put("generation_config.json", json!({"bos_token_id": 0, "eos_token_id": 1}))?;
    let specials = ["<s>", "</s>", "<unk>"];
    let mut vocab = serde_json::Map::new();
    for (id, token) in specials.iter().enumerate() {
        vocab.insert((*token).to_string(), json!(id));
    }
    for id in specials.len()..VOCAB {
        vocab.insert(format!("w{id}"), json!(id));
    }
    let added: Vec<_> = specials
        .iter()
        .enumerate()
        .map(|(id, token)| {
            json!({"id": id, "content": token, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    put(
        "tokenizer.json",
        json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": {"type": "WhitespaceSplit"},
            "post_processor": null,
            "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
        }),
    )?;
    put(
        "tokenizer_config.json",
        json!({
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "add_bos_token": false,
            "model_max_length": MAX_POSITIONS,
            "tokenizer_class": "PreTrainedTokenizerFast",
            "chat_template": "{{ bos_token }}{% for message in messages %}{{ message['content'] }} {% endfor %}"
        }),
    )?;
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let mut tensors = HashMap::new();
    let mut add = |name: String, shape: &[usize], rng: &mut StdRng| -> anyhow::Result<()> {
        let n = shape.iter().product();
        // Uniform in [-0.035, 0.035): standard deviation about 0.02, as Llama initialises.
        let data: Vec<f32> = (0..n).map(|_| (rng.random::<f32>() - 0.5) * 0.07).collect();
        tensors.insert(name, Tensor::from_vec(data, shape, &Device::Cpu)?);
        Ok(())
    };
    let head_dim = HIDDEN / HEADS;
    add("model.embed_tokens.weight".into(), &[VOCAB, HIDDEN], &mut rng)?;
    add("lm_head.weight".into(), &[VOCAB, HIDDEN], &mut rng)?;
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        add(format!("{p}.self_attn.q_proj.weight"), &[HIDDEN, HIDDEN], &mut rng)?;
        add(format!("{p}.self_attn.k_proj.weight"), &[KV_HEADS * head_dim, HIDDEN], &mut rng)?;
        add(format!("{p}.self_attn.v_proj.weight"), &[KV_HEADS * head_dim, HIDDEN], &mut rng)?;
        add(format!("{p}.self_attn.o_proj.weight"), &[HIDDEN, HIDDEN], &mut rng)?;
        add(format!("{p}.mlp.gate_proj.weight"), &[INTERMEDIATE, HIDDEN], &mut rng)?;
        add(format!("{p}.mlp.up_proj.weight"), &[INTERMEDIATE, HIDDEN], &mut rng)?;
        add(format!("{p}.mlp.down_proj.weight"), &[HIDDEN, INTERMEDIATE], &mut rng)?;
    }
    let ones = |n: usize| Tensor::ones(n, candle_core::DType::F32, &Device::Cpu);
    for l in 0..LAYERS {
        tensors.insert(format!("model.layers.{l}.input_layernorm.weight"), ones(HIDDEN)?);
        tensors.insert(format!("model.layers.{l}.post_attention_layernorm.weight"), ones(HIDDEN)?);
    }
    tensors.insert("model.norm.weight".into(), ones(HIDDEN)?);
    let path = dir.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
