"""The Llama family's Hugging Face adapter: Llama 2/3/3.1, Mistral, Qwen2 and Qwen3 `config.json` fields and
parameter names. File I/O, sharded reads and shard writing are generic (models/hf.py).

Our Llama uses Hugging Face's parameter names under the `model.` prefix (`layers.3.self_attn.q_proj.weight` is
`model.layers.3.self_attn.q_proj.weight`), the same rotate-half RoPE layout and the same GQA head order, so the
adapter is a renaming: no permutation of q/k rows is needed.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from treadle.models.hf import hf_error
from treadle.models.init import canonical_name
from treadle.models.llama.model import ModelConfig, RopeScalingConfig
from treadle.models.spec import HFPart, StoredShape

# Hugging Face architecture name → (model_type, attention q/k/v bias, per-head q/k RMSNorm).
ARCHITECTURES: dict[str, tuple[str, bool, bool]] = {
    "LlamaForCausalLM": ("llama", False, False),
    "MistralForCausalLM": ("mistral", False, False),
    "Qwen2ForCausalLM": ("qwen2", True, False),
    "Qwen3ForCausalLM": ("qwen3", False, True),
}


def _rope(config: dict[str, Any], path: Path) -> tuple[float, RopeScalingConfig | None]:
    """RoPE base and scaling from either layout: transformers 5 (`rope_parameters`) or 4 (`rope_theta` +
    `rope_scaling`)."""
    params = config.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    scaling = config.get("rope_scaling") or (
        params if params.get("rope_type", "default") != "default" else None
    )
    if not scaling:
        return theta, None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        field = "rope_scaling" if config.get("rope_scaling") else "rope_parameters"
        raise hf_error(path, field, f"RoPE type {kind!r} is not supported", "supported: default, llama3")
    return theta, RopeScalingConfig(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_seq_len=int(scaling["original_max_position_embeddings"]),
    )


class LlamaHFAdapter:
    architectures = tuple(ARCHITECTURES)

    def config_from_hf(self, base: ModelConfig, config: dict[str, Any], path: Path) -> ModelConfig:
        """`base` with every shape field taken from the checkpoint's config.json (init settings kept)."""
        _, qkv_bias, qk_norm = ARCHITECTURES[config["architectures"][0]]
        for field, allowed in (
            ("hidden_act", ("silu",)),
            ("attention_bias", (False,)),
            ("mlp_bias", (False,)),
        ):
            if config.get(field, allowed[0]) not in allowed and not (field == "attention_bias" and qkv_bias):
                raise hf_error(
                    path, field, f"{config.get(field)!r} is not supported", f"supported: {allowed}"
                )
        if qk_norm and config.get("attention_bias"):
            raise hf_error(path, "attention_bias", "true is not supported for Qwen3", "supported: false")
        try:
            theta, scaling = _rope(config, path)
            num_heads = int(config["num_attention_heads"])
            window = config.get("sliding_window") if config.get("use_sliding_window", True) else None
            return replace(
                base,
                name="llama",
                dim=int(config["hidden_size"]),
                num_layers=int(config["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(config.get("num_key_value_heads") or num_heads),
                vocab_size=int(config["vocab_size"]),
                ffn_dim=int(config["intermediate_size"]),
                norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                rope_theta=theta,
                rope_scaling=scaling,
                max_seq_len=int(config.get("max_position_embeddings", base.max_seq_len)),
                tie_embeddings=bool(config.get("tie_word_embeddings", False)),
                attention_head_dim=config.get("head_dim"),
                qkv_bias=qkv_bias,
                qk_norm=qk_norm,
                sliding_window=int(window) if window else None,
            )
        except KeyError as e:
            raise hf_error(path, e.args[0], "missing", "the file is not a complete model config") from e

    def config_to_hf(self, cfg: ModelConfig, architecture: str, dtype: torch.dtype) -> dict[str, Any]:
        """A config.json that transformers 4 and 5 both read (v4 spelling: `rope_theta` + `rope_scaling`)."""
        model_type, _, _ = ARCHITECTURES[architecture]
        config: dict[str, Any] = {
            "architectures": [architecture],
            "model_type": model_type,
            "hidden_size": cfg.dim,
            "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads,
            "num_key_value_heads": cfg.num_kv_heads,
            "head_dim": cfg.head_dim,
            "intermediate_size": cfg.hidden_dim,
            "vocab_size": cfg.vocab_size,
            "rms_norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta,
            "max_position_embeddings": cfg.max_seq_len,
            "tie_word_embeddings": cfg.tie_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "torch_dtype": str(dtype).removeprefix("torch."),
        }
        if model_type != "qwen2":
            config["mlp_bias"] = False
        if model_type in ("qwen2", "qwen3"):
            config["use_sliding_window"] = False
        if model_type == "mistral":
            config["sliding_window"] = cfg.sliding_window
        if cfg.rope_scaling is not None:
            config["rope_scaling"] = {
                "rope_type": "llama3",
                "factor": cfg.rope_scaling.factor,
                "low_freq_factor": cfg.rope_scaling.low_freq_factor,
                "high_freq_factor": cfg.rope_scaling.high_freq_factor,
                "original_max_position_embeddings": cfg.rope_scaling.original_max_seq_len,
            }
        return config

    def architecture_of(self, cfg: ModelConfig) -> str:
        """The architecture to export a model without a pretrained source as: Llama, or Qwen3 with q/k norms,
        Qwen2 with q/k/v biases."""
        if cfg.qk_norm:
            return "Qwen3ForCausalLM"
        return "Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"

    def for_architecture(self, architecture: str) -> LlamaHFAdapter:
        """Every Llama-family architecture names its tensors alike: one adapter serves them all."""
        return self

    def hf_name(self, name: str) -> str:
        """Our (canonical) parameter name → the Hugging Face checkpoint key."""
        name = canonical_name(name)
        return name if name.startswith("lm_head.") else f"model.{name}"

    def hf_parts(self, name: str, shape: tuple[int, ...], stored: StoredShape | None) -> list[HFPart]:
        """Each parameter is one checkpoint tensor of its own shape (nothing is stacked or fused)."""
        return [HFPart(self.hf_name(name), shape)]

    def ignored_keys(self, key: str) -> bool:
        """Checkpoint tensors with no parameter of ours: tied models' `lm_head.weight`, old RoPE buffers."""
        return "rotary_emb" in key or key == "lm_head.weight"


HF_ADAPTER = LlamaHFAdapter()
