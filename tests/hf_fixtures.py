"""Tiny random Hugging Face models saved to a directory, made with `transformers` (no download)."""

from __future__ import annotations

from pathlib import Path

import torch

ARCHS = ("llama", "qwen2", "qwen3", "mistral")


def make_hf_model(
    arch: str, out: Path, *, tie: bool = False, sharded: bool = False, seed: int = 0, vocab_size: int = 160
) -> Path:
    import transformers

    common = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        rms_norm_eps=1e-6,
    )
    if arch == "llama":
        config = transformers.LlamaConfig(
            **common,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
        cls = transformers.LlamaForCausalLM
    elif arch == "qwen2":
        config, cls = transformers.Qwen2Config(**common, rope_theta=1e6), transformers.Qwen2ForCausalLM
    elif arch == "qwen3":
        # head_dim 24 != hidden/heads = 16, as in real Qwen3 models.
        config, cls = transformers.Qwen3Config(**common, head_dim=24), transformers.Qwen3ForCausalLM
    else:
        config, cls = (
            transformers.MistralConfig(**common, sliding_window=None),
            transformers.MistralForCausalLM,
        )
    torch.manual_seed(seed)
    model = cls(config).float()
    with torch.no_grad():  # random biases and norm weights, so that a loader that skips them fails
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.normal_(1.0 if "norm" in name else 0.0, 0.1)
    model.save_pretrained(out, max_shard_size="60KB" if sharded else "5GB", safe_serialization=True)
    return out
