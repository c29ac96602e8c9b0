//! A tiny randomly initialised Llama model folder that mistral.rs loads from disk, for tests,
//! examples and benchmarks without a model hub.
//!
//! Hidden size 128, 2 layers, 4 attention heads (2 KV heads), MLP 256, a byte-level tokenizer of
//! 259 tokens (`<s>`, `</s>`, `<unk>`, then the 256 bytes; no merges, so one token per byte, which
//! mistral.rs's grammar support accepts), 1024 positions, float32 weights
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

/// Vocabulary size: 3 special tokens and the 256 bytes.
pub const VOCAB: usize = 259;
const HIDDEN: usize = 128;
const INTERMEDIATE: usize = 256;
const LAYERS: usize = 2;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
/// The model's context length (`max_position_embeddings`).
pub const MAX_POSITIONS: usize = 1024;

/// A prompt of exactly `n` tokens (`n` lowercase letters, one token each, before the chat template
/// adds its own), different for each `seed`.
pub fn prompt(n: usize, seed: usize) -> String {
    (0..n).map(|i| char::from(b'a' + ((seed * 7 + i * 3 + i / 26) % 26) as u8)).collect()
}

/// GPT-2's byte-to-character table: the character a byte-level tokenizer writes for each byte.
fn byte_chars() -> Vec<char> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut next = 256;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap_or('?')
            } else {
                next += 1;
                char::from_u32(next - 1).unwrap_or('?')
            }
        })
        .collect()
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
    for (byte, c) in byte_chars().into_iter().enumerate() {
        vocab.insert(c.to_string(), json!(specials.len() + byte));
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
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "ignore_merges": false, "vocab": vocab, "merges": []}
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
            "chat_template": "{{ bos_token }}{% for message in messages %}{{ message['content'] }}{% endfor %}"
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
