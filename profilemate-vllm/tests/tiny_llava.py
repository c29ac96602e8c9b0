"""Builds a tiny randomly initialised LLaVA model (CLIP vision tower + Llama), to exercise the
multimodal encoder hook in real vLLM on the CPU.

Vision: CLIP, 32x32 images in 16x16 patches (4 image tokens), hidden 64, 2 heads (head size 32),
2 layers. Text: the tiny Llama of tiny_model.py. Processor: CLIPImageProcessor + the BPE tokenizer
with an ``<image>`` token, saved as a LlavaProcessor.

Usage: ``python tiny_llava.py OUT_DIR``
"""

from __future__ import annotations

import json
import os
import sys

from tiny_model import SENTENCES


def build(out: str) -> str:
    marker = os.path.join(out, ".complete")
    if os.path.exists(marker):
        return out
    os.makedirs(out, exist_ok=True)
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    torch.manual_seed(0)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=["<s>", "</s>", "<pad>", "<image>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    fast.model_max_length = 512
    image_token = fast.convert_tokens_to_ids("<image>")
    vocab = 1024

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        do_center_crop=True,
        do_resize=True,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=fast,
        patch_size=16,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
        chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}",
    )
    processor.save_pretrained(out)

    text = LlamaConfig(
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
        tie_word_embeddings=False,
    )
    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=16,
        projection_dim=64,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        torch_dtype="float32",
    )
    model = LlavaForConditionalGeneration(config).to(torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    # transformers 5 saves the CLIP tower without its `vision_model.` level; vLLM's LLaVA
    # loads the classic layout.
    from safetensors.torch import load_file, save_file

    path = os.path.join(out, "model.safetensors")
    weights = load_file(path)
    renamed = {
        ("vision_tower.vision_model." + k[len("vision_tower.") :])
        if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.")
        else k: v
        for k, v in weights.items()
    }
    save_file(renamed, path, metadata={"format": "pt"})
    with open(marker, "w") as f:
        json.dump({"image_token": image_token}, f)
    return out


if __name__ == "__main__":
    print(build(sys.argv[1]))
