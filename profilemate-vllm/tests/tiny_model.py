"""Builds the tiny randomly initialised Llama model the tests serve (no model hub needed).

LlamaConfig: hidden 128, 2 layers, 4 attention heads (2 KV heads: head size 32, which the CPU
attention backend accepts), intermediate 256, vocabulary 1024, 512 positions, float32, saved as
safetensors; a byte-level BPE tokenizer trained on a few sentences, saved as a
PreTrainedTokenizerFast. About 6 s, under 1 MB.

Usage: ``python tiny_model.py OUT_DIR`` (skips the work if OUT_DIR already holds the model).
"""

from __future__ import annotations

import json
import os
import sys

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Profiling tells an inference server where each step's time goes.",
    "Prefill processes the prompt; decode generates one token at a time.",
    "Chunked prefill puts prompt chunks and decode tokens in one batch.",
    "When the KV cache is full, the scheduler preempts a request and recomputes it later.",
    "vLLM schedules requests continuously, step after step.",
    "Numbers like 0 1 2 3 4 5 6 7 8 9 and punctuation, quotes \" and commas, appear too.",
]


def tokenizer(vocab: int = 1024):
    """A byte-level BPE tokenizer trained on :data:`SENTENCES` (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.model_max_length = 512
    return fast


def build(out: str) -> str:
    marker = os.path.join(out, ".complete")
    if os.path.exists(marker):
        return out
    os.makedirs(out, exist_ok=True)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    vocab = 1024
    fast = tokenizer(vocab)
    fast.save_pretrained(out)

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        torch_dtype="float32",
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    with open(marker, "w") as f:
        json.dump({"vocab": vocab}, f)
    return out


if __name__ == "__main__":
    print(build(sys.argv[1]))
