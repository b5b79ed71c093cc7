"""How the Llama family is split: its tensor-parallel plan (as data), its pipeline split and its checks of the
model's shapes against the parallel degrees. `parallel/` applies the plan; it never names these modules.

TP (Megatron-LM's layout; placements and communication per style in parallel/tp.py): q/k/v and gate/up are
column-parallel (each rank holds num_heads/tp query and num_kv_heads/tp key/value heads, hidden/tp MLP
columns), o_proj and down_proj row-parallel; each sublayer's input is made Replicate from the residual stream;
the embedding and the output layer are sharded on the vocabulary (the loss runs on vocabulary-sharded logits).
"""

from __future__ import annotations

from treadle.models.llama.model import ModelConfig
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
    "layers.*.mlp": "sublayer_input",
    "layers.*.mlp.gate_proj": "colwise",
    "layers.*.mlp.up_proj": "colwise",
    "layers.*.mlp.down_proj": "rowwise",
}


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def validate(cfg: ModelConfig, dims: Dims, *, seq_len: int, cp_variant: str) -> None:
    """The model's own fields, then its shapes against the degrees (raises ValueError naming keys and fix)."""
    cfg.validate()
    validate_shapes(cfg, dims, seq_len=seq_len, cp_variant=cp_variant)
    _check(
        dims.ep == 1,
        f"parallel.ep={dims.ep}: model.name={cfg.name} has no experts; fix: parallel.ep=1",
    )


def validate_shapes(cfg: ModelConfig, dims: Dims, *, seq_len: int, cp_variant: str) -> None:
    """The decoder's shapes against tp, cp and pp, and the sequence length against the model's limits (shared
    with families built on this decoder, e.g. models/moe)."""
    _check(
        cfg.num_heads % dims.tp == 0 and cfg.num_kv_heads % dims.tp == 0,
        f"parallel.tp={dims.tp} must divide model.num_heads={cfg.num_heads} and model.num_kv_heads="
        f"{cfg.num_kv_heads}; fix: pick a tensor-parallel degree that divides both",
    )
    _check(
        cfg.dim % dims.tp == 0 and cfg.hidden_dim % dims.tp == 0,
        f"parallel.tp={dims.tp} must divide model.dim={cfg.dim} and the MLP hidden size {cfg.hidden_dim}",
    )
    _check(
        dims.tp == 1 or cfg.vocab_size % dims.tp == 0,
        f"model.vocab_size={cfg.vocab_size} must be divisible by parallel.tp={dims.tp} (the embedding and "
        f"output are sharded on the vocabulary); fix: pad model.vocab_size to a multiple of {dims.tp}",
    )
    if dims.cp > 1 and cp_variant == "ulysses":
        heads, kv_heads = cfg.num_heads // dims.tp, cfg.num_kv_heads // dims.tp
        _check(
            heads % dims.cp == 0 and kv_heads % dims.cp == 0,
            f"parallel.cp_variant=ulysses splits heads over parallel.cp={dims.cp}, but each tensor-parallel rank "
            f"has {heads} query and {kv_heads} key/value heads; fix: use parallel.cp_variant=ring or a cp "
            f"that divides both",
        )
    _check(
        dims.pp <= cfg.num_layers,
        f"parallel.pp={dims.pp} exceeds model.num_layers={cfg.num_layers}: every stage needs a layer; fix: "
        f"parallel.pp <= {cfg.num_layers}",
    )
    _check(
        cfg.sliding_window is None or seq_len <= cfg.sliding_window,
        f"data.seq_len={seq_len} exceeds the pretrained model's attention window "
        f"model.sliding_window={cfg.sliding_window}, and windowed attention is not implemented; "
        f"fix: data.seq_len <= {cfg.sliding_window}",
    )
    _check(
        seq_len <= cfg.max_seq_len,
        f"data.seq_len={seq_len} exceeds model.max_seq_len={cfg.max_seq_len}; "
        f"fix: lower data.seq_len or raise model.max_seq_len",
    )


def pipeline_split(cfg: ModelConfig, num_stages: int) -> list[list[str]]:
    """Per stage, the modules it keeps: consecutive layers as even as they go (the earlier stages take the
    remainder), the embedding on the first stage, the final norm and the output layer on the last. A stage's
    forward passes through what it lacks (parallel/pipeline.py; with tied embeddings it adds the embedding to the
    last stage as the output weight)."""
    if not 1 <= num_stages <= cfg.num_layers:
        raise ValueError(
            f"parallel.pp={num_stages} must be between 1 and model.num_layers={cfg.num_layers}; fix: choose a "
            f"pipeline degree of at most {cfg.num_layers}"
        )
    per_stage, extra = divmod(cfg.num_layers, num_stages)
    stages, start = [], 0
    for stage in range(num_stages):
        end = start + per_stage + (stage < extra)
        stages.append([f"layers.{i}" for i in range(start, end)])
        start = end
    stages[0].insert(0, "embed_tokens")
    stages[-1] += ["norm"] + ([] if cfg.tie_embeddings else ["lm_head"])
    return stages
