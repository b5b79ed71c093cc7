"""The MoE family's Hugging Face adapter: Qwen3-MoE (`Qwen3MoeForCausalLM`) and Mixtral (`MixtralForCausalLM`)
config.json fields and tensor names; DeepSeek-V3 checkpoints are refused (their attention is MLA, which we do not
build). File I/O, sharded reads and shard writing are generic (models/hf.py).

Attention, norms, embedding and head are named as in the Llama family (`model.` + our name). The MoE layers:

    ours                                 Qwen3-MoE (v4 layout)                 Mixtral (v4 layout)
    layers.i.mlp.router.gate.weight      model.layers.i.mlp.gate.weight        ….block_sparse_moe.gate.weight
    layers.i.mlp.experts.gate_proj [N]   ….mlp.experts.{e}.gate_proj.weight    ….block_sparse_moe.experts.{e}.w1.weight
    layers.i.mlp.experts.up_proj   [N]   ….mlp.experts.{e}.up_proj.weight      ….block_sparse_moe.experts.{e}.w3.weight
    layers.i.mlp.experts.down_proj [N]   ….mlp.experts.{e}.down_proj.weight    ….block_sparse_moe.experts.{e}.w2.weight

Each of our stacked rows `experts.gate_proj[e]` is laid out as the per-expert `nn.Linear` weight, so a row is a
copy. transformers 5 computes with fused tensors, `mlp.experts.gate_up_proj` [N, 2F, E] (gate rows first) and
`mlp.experts.down_proj` [N, E, F], router `mlp.gate.weight` for both architectures; its `save_pretrained`
converts back to the v4 layout by default (verified with 5.24), but checkpoints saved in its own layout exist
(`save_original_format=False`), so reads accept both and exports write the v4 layout, which both versions load.
The auxiliary-loss-free bias (`router.expert_bias`) is a buffer with no HF key: zeros on import (the model's
init), absent from exports (only parameters are written).
"""

from __future__ import annotations

import logging
import re
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import torch

from treadle.models.hf import hf_error
from treadle.models.init import canonical_name
from treadle.models.llama.hf import _rope
from treadle.models.llama.model import ModelConfig
from treadle.models.moe.model import MoEConfig
from treadle.models.spec import HFPart, StoredShape

logger = logging.getLogger(__name__)

QWEN3_MOE = "Qwen3MoeForCausalLM"
MIXTRAL = "MixtralForCausalLM"
DEEPSEEK_V3 = "DeepseekV3ForCausalLM"

# Per architecture: model_type, the routed block's module name (v4 layout), the per-expert linear names of our
# gate_proj / up_proj / down_proj, and config.json's expert-count field.
LAYOUTS: dict[str, tuple[str, str, dict[str, str], str]] = {
    QWEN3_MOE: (
        "qwen3_moe",
        "mlp",
        {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"},
        "num_experts",
    ),
    MIXTRAL: (
        "mixtral",
        "block_sparse_moe",
        {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"},
        "num_local_experts",
    ),
}

_MOE_PARAM = re.compile(
    r"layers\.(\d+)\.mlp\.(router\.gate\.weight|experts\.(gate_proj|up_proj|down_proj)|shared_experts\..+)"
)


def _refuse_deepseek(path: Path) -> ValueError:
    return hf_error(
        path,
        "architectures",
        f"{DEEPSEEK_V3} is not supported: its attention is multi-head latent attention (MLA: queries and keys/values "
        "through low-rank compressions, with a decoupled RoPE key), which treadle does not build, so its attention "
        "weights (q_a_proj, kv_a_proj_with_mqa, kv_b_proj, …) have no parameters to load into",
        "train DeepSeek-V3-style routing from scratch with model.name=moe (GQA attention, router_scoring=sigmoid, "
        "num_expert_groups, route_scale, shared experts), or fine-tune a Qwen3-MoE or Mixtral checkpoint",
    )


def _moe_base(base: ModelConfig) -> MoEConfig:
    """`base` as an MoE config: a Llama config (`model=hf`) keeps its own fields, an MoE config all of them."""
    return MoEConfig(**{f.name: getattr(base, f.name) for f in fields(base) if f.init and f.name != "name"})


def _first_k_dense(config: dict[str, Any], path: Path) -> int:
    """Qwen3-MoE's `decoder_sparse_step` / `mlp_only_layers` as our `first_k_dense`: only dense layers that come
    first are expressible (DeepSeek-style); other patterns are refused."""
    step = int(config.get("decoder_sparse_step", 1))
    if step != 1:
        raise hf_error(
            path,
            "decoder_sparse_step",
            f"{step} (an MoE layer every {step} layers) is not supported",
            "only 1 (every layer routed, optionally after dense first layers) is built by treadle",
        )
    dense = sorted(int(i) for i in config.get("mlp_only_layers") or [])
    if dense != list(range(len(dense))):
        raise hf_error(
            path,
            "mlp_only_layers",
            f"{dense} is not supported",
            "treadle builds dense MLPs only in the first layers: [] or [0, 1, …, k-1] (model.first_k_dense=k)",
        )
    return len(dense)


class MoEHFAdapter:
    """Reads and writes one architecture's names (`for_architecture` gives the adapter of each)."""

    architectures = (QWEN3_MOE, MIXTRAL, DEEPSEEK_V3)

    def __init__(self, architecture: str = QWEN3_MOE) -> None:
        self.architecture = architecture

    def for_architecture(self, architecture: str) -> MoEHFAdapter:
        return self if architecture == self.architecture else MoEHFAdapter(architecture)

    def config_from_hf(self, base: ModelConfig, config: dict[str, Any], path: Path) -> MoEConfig:
        """`base` with every shape field taken from the checkpoint's config.json (init and training settings
        kept: capacity_factor, z_loss_coeff, bias_update_rate)."""
        architecture = config["architectures"][0]
        if architecture == DEEPSEEK_V3:
            raise _refuse_deepseek(path)
        qwen = architecture == QWEN3_MOE
        for field, allowed in (
            ("hidden_act", ("silu",)),
            ("attention_bias", (False,)),
            ("mlp_bias", (False,)),
        ):
            if config.get(field, allowed[0]) not in allowed:
                raise hf_error(
                    path, field, f"{config.get(field)!r} is not supported", f"supported: {allowed}"
                )
        jitter = float(config.get("router_jitter_noise") or 0.0)
        if jitter:
            logger.warning(
                "%s: router_jitter_noise=%s is ignored: treadle's router adds no input noise", path, jitter
            )
        try:
            theta, scaling = _rope(config, path)
            num_heads = int(config["num_attention_heads"])
            expert_count = config.get("num_experts", config.get("num_local_experts"))
            if expert_count is None:
                raise KeyError(LAYOUTS[architecture][3])
            if qwen:
                moe_ffn, dense_ffn = int(config["moe_intermediate_size"]), int(config["intermediate_size"])
                window = config.get("sliding_window") if config.get("use_sliding_window", False) else None
            else:  # Mixtral's intermediate_size is each expert's width; it has no dense layer
                moe_ffn = dense_ffn = int(config["intermediate_size"])
                window = config.get("sliding_window")
            return replace(
                _moe_base(base),
                dim=int(config["hidden_size"]),
                num_layers=int(config["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(config.get("num_key_value_heads") or num_heads),
                vocab_size=int(config["vocab_size"]),
                ffn_dim=dense_ffn,
                norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                rope_theta=theta,
                rope_scaling=scaling,
                max_seq_len=int(config.get("max_position_embeddings", base.max_seq_len)),
                tie_embeddings=bool(config.get("tie_word_embeddings", False)),
                attention_head_dim=config.get("head_dim"),
                qkv_bias=False,
                qk_norm=qwen,
                sliding_window=int(window) if window else None,
                num_experts=int(expert_count),
                num_experts_per_tok=int(config["num_experts_per_tok"]),
                moe_ffn_dim=moe_ffn,
                num_shared_experts=0,
                shared_ffn_dim=None,
                first_k_dense=_first_k_dense(config, path) if qwen else 0,
                router_scoring="softmax",
                # Qwen3-MoE's config decides (transformers' default is false; the released models set true);
                # Mixtral always renormalises the top-k weights.
                norm_topk_prob=bool(config.get("norm_topk_prob", False)) if qwen else True,
                num_expert_groups=1,
                topk_groups=1,
                route_scale=1.0,
                # transformers adds its balancing loss (weighted once, over all layers' routers pooled) only
                # with output_router_logits; ours is weighted per layer and summed over the layers.
                aux_loss_coeff=float(config.get("router_aux_loss_coef", 0.0)),
            )
        except KeyError as e:
            raise hf_error(path, e.args[0], "missing", "the file is not a complete model config") from e

    def config_to_hf(self, cfg: MoEConfig, architecture: str, dtype: torch.dtype) -> dict[str, Any]:
        """A config.json that transformers 4 and 5 both read; settings the architecture cannot express are
        refused, naming the key."""
        if architecture == DEEPSEEK_V3:
            raise ValueError(
                f"export as {DEEPSEEK_V3} is not supported: its attention is MLA, which treadle does not build; "
                f"fix: export as {QWEN3_MOE} or {MIXTRAL} (a model.pretrained of that architecture, or none)"
            )
        qwen = architecture == QWEN3_MOE
        unsupported = {
            "model.num_shared_experts": (cfg.shared_width == 0, 0),
            "model.router_scoring": (cfg.router_scoring == "softmax", "softmax"),
            "model.num_expert_groups": (cfg.num_expert_groups == 1, 1),
            "model.route_scale": (cfg.route_scale == 1.0, 1.0),
            "model.qkv_bias": (not cfg.qkv_bias, False),
            "model.qk_norm": (cfg.qk_norm == qwen, qwen),
        }
        if not qwen:
            unsupported["model.first_k_dense"] = (cfg.first_k_dense == 0, 0)
            unsupported["model.norm_topk_prob"] = (cfg.norm_topk_prob, True)
        for key, (ok, needed) in unsupported.items():
            if not ok:
                raise ValueError(
                    f"{key}={getattr(cfg, key.removeprefix('model.'))!r} cannot be exported as {architecture}, "
                    f"which has no such setting; fix: a model with {key}={needed!r}, or export our checkpoint "
                    "format instead of Hugging Face's"
                )
        model_type, _, _, count_field = LAYOUTS[architecture]
        config: dict[str, Any] = {
            "architectures": [architecture],
            "model_type": model_type,
            "hidden_size": cfg.dim,
            "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads,
            "num_key_value_heads": cfg.num_kv_heads,
            "head_dim": cfg.head_dim,
            "vocab_size": cfg.vocab_size,
            "rms_norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta,
            "max_position_embeddings": cfg.max_seq_len,
            "tie_word_embeddings": cfg.tie_embeddings,
            "hidden_act": "silu",
            count_field: cfg.num_experts,
            "num_experts_per_tok": cfg.num_experts_per_tok,
            "router_aux_loss_coef": cfg.aux_loss_coeff,
            "torch_dtype": str(dtype).removeprefix("torch."),
        }
        if qwen:
            config.update(
                intermediate_size=cfg.hidden_dim,
                moe_intermediate_size=cfg.moe_ffn_dim,
                norm_topk_prob=cfg.norm_topk_prob,
                decoder_sparse_step=1,
                mlp_only_layers=list(range(cfg.first_k_dense)),
                attention_bias=False,
                use_sliding_window=False,
            )
        else:
            config.update(
                intermediate_size=cfg.moe_ffn_dim, sliding_window=cfg.sliding_window, router_jitter_noise=0.0
            )
        if cfg.rope_scaling is not None:
            config["rope_scaling"] = {
                "rope_type": "llama3",
                "factor": cfg.rope_scaling.factor,
                "low_freq_factor": cfg.rope_scaling.low_freq_factor,
                "high_freq_factor": cfg.rope_scaling.high_freq_factor,
                "original_max_position_embeddings": cfg.rope_scaling.original_max_seq_len,
            }
        return config

    def architecture_of(self, cfg: MoEConfig) -> str:
        """A model without a pretrained source exports as Qwen3-MoE with q/k norms, else as Mixtral."""
        return QWEN3_MOE if cfg.qk_norm else MIXTRAL

    def hf_name(self, name: str) -> str:
        """Our (canonical) parameter name → the checkpoint key (v4 layout); stacked experts have several keys
        (`hf_parts`)."""
        name = canonical_name(name)
        match = _MOE_PARAM.fullmatch(name)
        if match is None:
            return name if name.startswith("lm_head.") else f"model.{name}"
        layer, what, _ = match.groups()
        if what == "router.gate.weight":
            return f"model.layers.{layer}.{LAYOUTS[self.architecture][1]}.gate.weight"
        if what.startswith("shared_experts."):
            raise ValueError(
                f"{name}: {self.architecture} has no shared experts; fix: model.num_shared_experts=0 to load or "
                "export this architecture"
            )
        raise ValueError(f"{name}: a stacked parameter has one checkpoint tensor per expert (see hf_parts)")

    def hf_parts(self, name: str, shape: tuple[int, ...], stored: StoredShape | None) -> list[HFPart]:
        """The checkpoint tensors of `name`: one for most parameters; for stacked experts one per expert (v4
        layout: what exports write) or a region of transformers 5's fused tensors, whichever the checkpoint
        holds. A checkpoint with another expert count than config.json fails here, naming the key."""
        name = canonical_name(name)
        match = _MOE_PARAM.fullmatch(name)
        if match is None or match.group(2).startswith("shared_experts."):
            return [HFPart(self.hf_name(name), shape)]
        layer, _, projection = match.groups()
        if projection is None:
            return [self._router_part(layer, shape, stored)]
        _, block, linear_names, _ = LAYOUTS[self.architecture]
        prefix = f"model.layers.{layer}.{block}.experts"
        per_expert = [
            HFPart(f"{prefix}.{e}.{linear_names[projection]}.weight", shape[1:], row=e)
            for e in range(shape[0])
        ]
        if stored is None or stored(per_expert[0].key) is not None:
            if stored is not None:
                self._check_expert_count(prefix, linear_names[projection], shape[0], stored)
            return per_expert
        fused = (
            f"model.layers.{layer}.mlp.experts.{'down_proj' if projection == 'down_proj' else 'gate_up_proj'}"
        )
        fused_shape = stored(fused)
        if fused_shape is None:
            raise ValueError(
                f"tensor {per_expert[0].key!r} (transformers 4 layout) and {fused!r} (transformers 5) are both "
                f"missing: layer {layer} holds no routed experts in the checkpoint; fix: check config.json's "
                "num_hidden_layers and mlp_only_layers against the weights"
            )
        self._check_count(fused, fused_shape[0], shape[0])
        if projection == "down_proj":
            return [HFPart(fused, shape)]
        num, width, dim = shape
        offset = 0 if projection == "gate_proj" else width
        return [HFPart(fused, (num, 2 * width, dim), offsets=(0, offset, 0))]

    def _router_part(self, layer: str, shape: tuple[int, ...], stored: StoredShape | None) -> HFPart:
        key = f"model.layers.{layer}.{LAYOUTS[self.architecture][1]}.gate.weight"
        if (
            stored is not None
            and stored(key) is None
            and stored(f"model.layers.{layer}.mlp.gate.weight") is not None
        ):
            key = f"model.layers.{layer}.mlp.gate.weight"  # Mixtral in transformers 5's own layout
        found = stored(key) if stored is not None else None
        if found is not None:
            self._check_count(key, found[0], shape[0])
        return HFPart(key, shape)

    def _check_count(self, key: str, found: int, expected: int) -> None:
        if found != expected:
            field = LAYOUTS[self.architecture][3]
            raise ValueError(
                f"tensor {key!r}: the checkpoint holds {found} experts in this layer but config.json sets "
                f"{field}={expected}; fix: set {field}={found} in config.json (the weights' count), or use "
                f"weights with {expected} experts"
            )

    def _check_expert_count(self, prefix: str, linear: str, expected: int, stored: StoredShape) -> None:
        """Per-expert tensors: the count is the number of consecutive expert indices present; the error names
        the first missing or the first extra expert's key."""
        found = 0
        while stored(f"{prefix}.{found}.{linear}.weight") is not None:
            found += 1
        self._check_count(f"{prefix}.{min(found, expected)}.{linear}.weight", found, expected)

    def ignored_keys(self, key: str) -> bool:
        """Checkpoint tensors with no parameter of ours: tied models' `lm_head.weight`, old RoPE buffers."""
        return "rotary_emb" in key or key == "lm_head.weight"


HF_ADAPTER = MoEHFAdapter()
