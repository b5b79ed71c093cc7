"""How the MoE family is split: tensor parallelism on attention (and on the dense and shared-expert MLPs),
expert parallelism on the routed experts, and its checks of shapes against the degrees.

TP (no sequence parallelism): attention as in the Llama family (models/llama/plan.py). The routed experts are
not split by TP: each TP rank routes a 1/tp share of the (replicated) tokens through them (parallel/ep.py's token
split), so under TP the experts cost no more per rank than at tp=1 and EP may use the TP ranks as expert ranks.
The shared experts and the first dense layers' MLPs are column/row-parallel like Llama's MLP.

EP styles (parallel/ep.py): `moe` gives a MoE layer its dispatcher, token split and load-count group;
`experts` shards the stacked expert weights `Shard(0)` over `ep` and makes them their own FSDP unit over `efsdp`.
"""

from __future__ import annotations

from treadle.models.llama.plan import pipeline_split, validate_shapes
from treadle.models.moe.model import MoEConfig
from treadle.models.spec import Dims

TP_PLAN: dict[str, str] = {
    "embed_tokens": "embedding",
    "norm": "final_norm",
    "lm_head": "output",
    "layers.*.input_layernorm": "norm",
    "layers.*.self_attn": "sublayer_input",
    "layers.*.self_attn.q_proj": "colwise",
    "layers.*.self_attn.k_proj": "colwise",
    "layers.*.self_attn.v_proj": "colwise",
    "layers.*.self_attn.o_proj": "rowwise",
    "layers.*.post_attention_layernorm": "norm",
    # Dense layers' MLP (the routed layers' `mlp` is the MoE module, which takes no TP style).
    "layers.*.mlp.gate_proj": "colwise",
    "layers.*.mlp.up_proj": "colwise",
    "layers.*.mlp.down_proj": "rowwise",
    "layers.*.mlp.shared_experts": "sublayer_input",
    "layers.*.mlp.shared_experts.gate_proj": "colwise",
    "layers.*.mlp.shared_experts.up_proj": "colwise",
    "layers.*.mlp.shared_experts.down_proj": "rowwise",
}

EP_PLAN: dict[str, str] = {
    "layers.*.mlp": "moe",
    "layers.*.mlp.experts": "experts",
}

__all__ = ["EP_PLAN", "TP_PLAN", "pipeline_split", "validate"]


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def validate(cfg: MoEConfig, dims: Dims, *, seq_len: int, cp_variant: str) -> None:
    """The model's own fields, then its shapes against the degrees (raises ValueError naming keys and fix)."""
    cfg.validate()
    validate_shapes(cfg, dims, seq_len=seq_len, cp_variant=cp_variant)
    _check(
        cfg.num_experts % dims.ep == 0,
        f"parallel.ep={dims.ep} must divide model.num_experts={cfg.num_experts} (each expert rank holds "
        f"num_experts/ep experts); fix: choose an ep that divides {cfg.num_experts}",
    )
    _check(
        cfg.shared_width % dims.tp == 0,
        f"parallel.tp={dims.tp} must divide the shared experts' width {cfg.shared_width} (model.shared_ffn_dim)",
    )
    _check(
        seq_len % (dims.tp * dims.cp) == 0,
        f"data.seq_len={seq_len} must be divisible by parallel.tp × cp = {dims.tp * dims.cp}: each TP rank routes "
        f"its share of a context-parallel slice's tokens; fix: a seq_len that is a multiple of {dims.tp * dims.cp}",
    )
