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


MOE_ARCHS = ("qwen3_moe", "mixtral")


def make_hf_moe_model(
    arch: str, out: Path, *, num_experts: int = 8, fused: bool = False, seed: int = 0, vocab_size: int = 160
) -> Path:
    """A tiny random Qwen3-MoE (qk-norm, head_dim != hidden/heads, the first layer dense, top-k renormalised) or
    Mixtral. `fused` saves transformers 5's own layout (`experts.gate_up_proj` [E, 2F, D]) instead of the
    per-expert tensors its `save_pretrained` converts back to by default."""
    import transformers

    common = dict(
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        num_experts_per_tok=2,
        tie_word_embeddings=False,
    )
    if arch == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(
            **common,
            head_dim=24,
            intermediate_size=96,
            moe_intermediate_size=32,
            num_experts=num_experts,
            norm_topk_prob=True,
            mlp_only_layers=[0],
            rope_theta=1e6,
        )
        cls = transformers.Qwen3MoeForCausalLM
    else:
        config = transformers.MixtralConfig(
            **common, intermediate_size=32, num_local_experts=num_experts, rope_theta=1e6, sliding_window=None
        )
        cls = transformers.MixtralForCausalLM
    torch.manual_seed(seed)
    model = cls(config).float()
    with torch.no_grad():  # random norms; decisive routers, so that no top-k choice is a near tie
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.1)
            elif name.endswith("gate.weight") or name.endswith(".gate"):
                param.normal_(0.0, 0.5)
            elif "experts" in name:
                param.normal_(0.0, 0.05)
    kwargs = {"save_original_format": False} if fused else {}
    model.save_pretrained(out, safe_serialization=True, **kwargs)
    return out
