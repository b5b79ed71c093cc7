"""The Mixture-of-Experts family (Qwen3-MoE, Mixtral, DeepSeek-V3-style routing with GQA attention): one
`ModelSpec`, registered on import.

layer.py   router, stacked experts, dispatch, load statistics and the auxiliary-loss-free bias update
model.py   config dataclass, decoder (Llama attention + MoE feed-forward), active-parameter FLOP count
plan.py    TP and EP plans (data), pipeline split, shape checks against the parallel degrees
hf.py      Hugging Face adapter (Qwen3-MoE, Mixtral: config.json fields, per-expert and fused tensor layouts)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from treadle.models.init import canonical_name
from treadle.models.moe.hf import HF_ADAPTER
from treadle.models.moe.layer import MoE, update_expert_bias
from treadle.models.moe.model import MoEConfig, MoETransformer, flops_per_token
from treadle.models.moe.plan import EP_PLAN, TP_PLAN, pipeline_split, validate
from treadle.models.ops import KernelsConfig
from treadle.models.spec import ModelSpec, register_model

if TYPE_CHECKING:
    from treadle.parallel.dims import ParallelDims


def build(cfg: MoEConfig, kernels: KernelsConfig) -> MoETransformer:
    if kernels.moe == "torch" and (cfg.dim % 8 or cfg.moe_ffn_dim % 8):
        raise ValueError(
            f"kernels.moe=torch runs torch._grouped_mm, which needs model.dim={cfg.dim} and model.moe_ffn_dim="
            f"{cfg.moe_ffn_dim} to be multiples of 8 (16-byte aligned rows); fix: round them up, or use "
            "kernels.moe=loop"
        )
    return MoETransformer(cfg, kernels)


def post_step(model_parts: list[nn.Module], dims: ParallelDims | None = None) -> dict[str, torch.Tensor]:
    """Balance the experts for the next step and report this step's load (`update_expert_bias`).

    Under pipeline parallelism each rank moves the bias of the layers of its stages, and the reported
    statistics are reduced over `pp` (every stage's layers, on every rank). The auxiliary-loss statistics of
    this rank's stages add up: each stage counts its own layers' share of every micro-batch's forward."""
    layers = {
        canonical_name(name).split(".")[1]: m
        for part in model_parts
        for name, m in part.named_modules()
        if isinstance(m, MoE)
    }
    parts = [p for p in model_parts if isinstance(p, MoETransformer)]
    if dims is None or dims.pp == 1:
        return update_expert_bias(layers, parts[0].aux_loss_stats if parts else None)
    cfg = parts[0].cfg
    stats_P2 = torch.stack([p.aux_loss_stats for p in parts])
    aux = torch.stack([stats_P2[:, 0].sum(), stats_P2[0, 1]])  # every stage runs each micro-batch once
    for part in parts:
        part.aux_loss_stats.zero_()
    labels = [str(i) for i in range(cfg.num_layers) if cfg.is_moe_layer(i)]
    return update_expert_bias(layers, aux, pp_group=dims.mesh("pp").get_group(), all_labels=labels, cfg=cfg)


# Module names `peft.target_modules` may not name. (`all-linear` skips the router by itself: it adapts the blocks'
# TP-planned linears, `ModelSpec.linear_names`, and the router is not one.)
_EXPERTS_REASON = (
    "the routed experts are stacked 3-D parameters computed by grouped GEMMs, not nn.Linear layers, and LoRA "
    "on them is not implemented; fix: adapt attention (q_proj, k_proj, v_proj, o_proj) and the dense/shared "
    "MLP linears (gate_proj, up_proj, down_proj), or train the experts fully (peft=none)"
)
LORA_REFUSED = {
    "experts": _EXPERTS_REASON,
    **dict.fromkeys(("w1", "w2", "w3", "gate_up_proj"), _EXPERTS_REASON),
    "gate": (
        "the router gate is read directly as an fp32 weight (an adapter on it would never be applied), and it "
        "makes discrete top-k choices: a low-rank change moves tokens between experts trained on other tokens; "
        "fix: leave the router frozen (adapt attention and the dense/shared MLP linears)"
    ),
}

SPEC = ModelSpec(
    name="moe",
    config_cls=MoEConfig,
    build=build,
    flops_per_token=flops_per_token,
    validate=validate,
    tp_plan=TP_PLAN,
    ep_plan=EP_PLAN,
    pipeline_split=pipeline_split,
    hf_adapter=HF_ADAPTER,
    lora_refused=LORA_REFUSED,
    post_step=(post_step,),
)
register_model(SPEC)

__all__ = ["SPEC", "MoE", "MoEConfig", "MoETransformer", "flops_per_token"]
