"""Builds the tiny randomly initialised Mixtral (mixture of experts) the MoE tests serve.

MixtralConfig: hidden 128, 2 layers, 4 attention heads (2 KV heads), 8 experts of intermediate
size 128, top-2 routing, vocabulary 1024, 512 positions, float32, safetensors; the tokenizer of
``tiny_model.py``. On vLLM's CPU backend every MoE layer routes through
``FusedMoERouter.select_experts`` once per step. A few seconds, about 3 MB.

Usage: ``python tiny_mixtral.py OUT_DIR`` (skips the work if OUT_DIR already holds the model).
"""

from __future__ import annotations

import json
import os
import sys

NUM_LAYERS = 2
NUM_EXPERTS = 8
TOP_K = 2


def build(out: str) -> str:
    marker = os.path.join(out, ".complete")
    if os.path.exists(marker):
        return out
    os.makedirs(out, exist_ok=True)
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from tiny_model import tokenizer

    torch.manual_seed(0)
    vocab = 1024
    fast = tokenizer(vocab)
    fast.save_pretrained(out)
    config = MixtralConfig(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=128,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        num_local_experts=NUM_EXPERTS,
        num_experts_per_tok=TOP_K,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        torch_dtype="float32",
        tie_word_embeddings=False,
    )
    MixtralForCausalLM(config).to(torch.float32).save_pretrained(out, safe_serialization=True)
    with open(marker, "w") as f:
        json.dump({"vocab": vocab, "layers": NUM_LAYERS, "experts": NUM_EXPERTS, "top_k": TOP_K}, f)
    return out


if __name__ == "__main__":
    print(build(sys.argv[1]))
