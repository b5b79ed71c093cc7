"""Llama-family decoder: RMSNorm, RoPE (with Llama-3 frequency scaling), grouped-query attention, SwiGLU MLP.

Shape legend: B batch, S sequence, E model dim, H query heads, K key/value heads, D head dim, F MLP hidden, V vocab.

The model holds no collective and no parallel logic: `parallel/` applies the family's plans (models/llama/plan.py)
to it from outside. Build it on the meta device, apply the plans, `to_empty`, then `init_weights`. Hot ops go
through `models.ops.Ops`; the loss is applied to the returned hidden states by `models.loss`.
Parameter names follow the Hugging Face Llama layout where it costs nothing (q/k/v/o_proj, gate/up/down_proj),
which keeps the HF state-dict adapter a renaming.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from treadle.models.init import canonical_name, fill_
from treadle.models.ops import KernelsConfig, Ops, build_ops


@dataclass(kw_only=True)
class RopeScalingConfig:
    """Llama-3.1 RoPE frequency scaling: long wavelengths stretched by `factor`, short ones kept, smooth between."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192


@dataclass(kw_only=True)
class ModelConfig:
    name: str = "llama"
    dim: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 8
    vocab_size: int = 128256
    # MLP hidden size; when null it follows Llama's rule from dim, ffn_dim_multiplier and multiple_of.
    ffn_dim: int | None = None
    ffn_dim_multiplier: float | None = None
    multiple_of: int = 256
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScalingConfig | None = None
    max_seq_len: int = 8192
    tie_embeddings: bool = False
    init_std: float = 0.02
    # Per-head size when it is not dim / num_heads (Qwen3, Mistral-Nemo set it explicitly).
    attention_head_dim: int | None = None
    qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2)
    qk_norm: bool = False  # RMSNorm over each query and key head before RoPE (Qwen3)
    # Attention window of a pretrained model (Mistral v0.1); runs keep data.seq_len within it, where windowed
    # attention equals full causal attention (windowed attention itself is not implemented).
    sliding_window: int | None = None
    # A local Hugging Face model directory: its config.json sets the shape fields above and its safetensors
    # are the initial weights (see `models.hf`).
    pretrained: str | None = None

    @property
    def head_dim(self) -> int:
        return self.attention_head_dim or self.dim // self.num_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_dim is not None:
            return self.ffn_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    def validate(self) -> None:
        if self.attention_head_dim is None and self.dim % self.num_heads:
            raise ValueError(f"model.dim={self.dim} must be divisible by model.num_heads={self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model.num_heads={self.num_heads} must be a multiple of model.num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head dim model.dim/model.num_heads={self.head_dim} must be even for RoPE")


def rope_frequencies(cfg: ModelConfig, device: torch.device | None = None) -> torch.Tensor:
    """Inverse frequencies [D/2], with Llama-3.1 scaling (wavelength-banded) when `cfg.rope_scaling` is set."""
    exponents = torch.arange(0, cfg.head_dim, 2, dtype=torch.float64, device=device) / cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta**exponents)
    scaling = cfg.rope_scaling
    if scaling is None:
        return inv_freq.float()
    low_wavelen = scaling.original_max_seq_len / scaling.low_freq_factor
    high_wavelen = scaling.original_max_seq_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (scaling.original_max_seq_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    is_mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return torch.where(is_mid, blended, scaled).float()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, ops: Ops):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rmsnorm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: Ops):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.dim, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, ops) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, ops) if cfg.qk_norm else None
        self.ops = ops

    def forward(
        self,
        x_BSE: torch.Tensor,
        cos_BSD: torch.Tensor,
        sin_BSD: torch.Tensor,
        doc_ids_BS: torch.Tensor | None,
    ) -> torch.Tensor:
        batch, seq_len, _ = x_BSE.shape
        # -1 rather than the configured head count: under tensor parallelism each rank holds a slice of heads.
        q_BSHD = self.q_proj(x_BSE).view(batch, seq_len, -1, self.head_dim)
        k_BSKD = self.k_proj(x_BSE).view(batch, seq_len, -1, self.head_dim)
        v_BSKD = self.v_proj(x_BSE).view(batch, seq_len, -1, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q_BSHD, k_BSKD = self.q_norm(q_BSHD), self.k_norm(k_BSKD)
        q_BSHD, k_BSKD = self.ops.rope(q_BSHD, k_BSKD, cos_BSD, sin_BSD)
        out_BSHD = self.ops.attention(q_BSHD, k_BSKD, v_BSKD, causal=True, doc_ids_BS=doc_ids_BS)
        return self.o_proj(out_BSHD.reshape(batch, seq_len, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: Ops, *, hidden_dim: int | None = None):
        super().__init__()
        hidden = hidden_dim or cfg.hidden_dim
        self.gate_proj = nn.Linear(cfg.dim, hidden, bias=False)
        self.up_proj = nn.Linear(cfg.dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, cfg.dim, bias=False)
        self.ops = ops

    def forward(self, x_BSE: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.ops.swiglu(self.gate_proj(x_BSE), self.up_proj(x_BSE)))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: Ops):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps, ops)
        self.self_attn = Attention(cfg, ops)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps, ops)
        self.mlp = FeedForward(cfg, ops)

    def forward(
        self,
        x_BSE: torch.Tensor,
        cos_BSD: torch.Tensor,
        sin_BSD: torch.Tensor,
        doc_ids_BS: torch.Tensor | None,
    ) -> torch.Tensor:
        h_BSE = x_BSE + self.self_attn(self.input_layernorm(x_BSE), cos_BSD, sin_BSD, doc_ids_BS)
        return h_BSE + self.mlp(self.post_attention_layernorm(h_BSE))

    def residual_branches(self) -> list[Callable[..., torch.Tensor]]:
        """The block as its residual branches, in order: x ← x + branch(x, cos, sin, doc_ids) for each, which
        is what `forward` computes. Experiments that reorder work across batch chunks run them one at a time
        (experiments/tp_batch_overlap.py)."""
        return [
            lambda x, cos, sin, doc: self.self_attn(self.input_layernorm(x), cos, sin, doc),
            lambda x, cos, sin, doc: self.mlp(self.post_attention_layernorm(x)),
        ]


class Llama(nn.Module):
    """Decoder-only transformer. `forward(tokens)` returns the final (normed) hidden states [B, S, E]; the loss
    (`models.loss`) multiplies them by `output_weight`."""

    def __init__(
        self,
        cfg: ModelConfig,
        kernels: KernelsConfig | None = None,
        *,
        block: Callable[[ModelConfig, Ops, int], nn.Module] | None = None,
    ):
        """`block(cfg, ops, layer_index)` builds each layer (a family that reuses this decoder, e.g. models/moe,
        passes its own); Llama's `TransformerBlock` by default."""
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.ops = build_ops(kernels or KernelsConfig())
        # The embedding, the final norm and the output layer are None on the pipeline stages that lack them.
        self.embed_tokens: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.dim)
        make_block = block or (lambda cfg, ops, _: TransformerBlock(cfg, ops))
        # A ModuleDict keyed by layer index keeps parameter names stable when plans wrap or replace blocks.
        self.layers = nn.ModuleDict({str(i): make_block(cfg, self.ops, i) for i in range(cfg.num_layers)})
        self.norm: RMSNorm | None = RMSNorm(cfg.dim, cfg.norm_eps, self.ops)
        self.lm_head: nn.Linear | None = (
            None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        )
        self.register_buffer("inv_freq", torch.empty(cfg.head_dim // 2), persistent=False)

    @property
    def output_weight(self) -> torch.Tensor:
        if self.lm_head is not None:
            return self.lm_head.weight
        assert self.embed_tokens is not None, "the output weight is asked of a stage without it"
        return self.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Fill every parameter (see `models.init`) and recompute the RoPE buffer on the current device.

        Projections that write into the residual stream (o_proj, down_proj) get std scaled by
        1/sqrt(2·num_layers) (GPT-2 §2.3) so that the residual variance does not grow with depth.
        """
        self.inv_freq.copy_(rope_frequencies(self.cfg, device=self.inv_freq.device))
        for name, param in self.named_parameters():
            if name.endswith(("norm.weight", "layernorm.weight")):
                fill_(param, name, seed, std=None)
            elif name.endswith((".bias", "lora_B.weight")):
                # LoRA's B starts at zero so that the adapted model starts as the base model (Hu et al. 2021 §4.1).
                fill_(param, name, seed, std=None, constant=0.0)
            else:
                fill_(param, name, seed, std=self.weight_std(name))

    def weight_std(self, name: str) -> float:
        """The init std of the weight called `name` (also used for NF4 bases created quantized)."""
        if canonical_name(name).endswith(("o_proj.weight", "down_proj.weight")):
            return self.cfg.init_std / math.sqrt(2 * self.cfg.num_layers)
        return self.cfg.init_std

    def rope_tables(self, positions_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles_BSd = positions_BS[..., None].float() * self.inv_freq
        angles_BSD = torch.cat((angles_BSd, angles_BSd), dim=-1)
        return angles_BSD.cos(), angles_BSD.sin()

    def forward(
        self,
        tokens_BS: torch.Tensor,
        *,
        positions_BS: torch.Tensor | None = None,
        doc_ids_BS: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The final hidden states [B, S, E] (after the final norm).

        As a pipeline stage (parallel/pipeline.py removes the modules a stage lacks) it passes through what it
        does not hold: a stage given hidden states [B, S, E] (floating point) rather than token ids does not
        embed them, even where it keeps the embedding as the tied output weight; a stage without the final norm
        returns its last block's output."""
        if positions_BS is None:
            positions_BS = torch.arange(tokens_BS.shape[1], device=tokens_BS.device).expand(
                tokens_BS.shape[:2]
            )
        if tokens_BS.is_floating_point():
            h_BSE = tokens_BS
        else:
            assert self.embed_tokens is not None, "a stage without the embedding was given token ids"
            h_BSE = self.embed_tokens(tokens_BS)
        cos_BSD, sin_BSD = self.rope_tables(positions_BS)
        cos_BSD, sin_BSD = cos_BSD.to(h_BSE.dtype), sin_BSD.to(h_BSE.dtype)
        for block in self.layers.values():
            h_BSE = block(h_BSE, cos_BSD, sin_BSD, doc_ids_BS)
        return h_BSE if self.norm is None else self.norm(h_BSE)

    def num_params(self, exclude_embedding: bool = False) -> int:
        total = sum(p.numel() for p in self.parameters())
        if exclude_embedding and self.embed_tokens is not None:
            total -= self.embed_tokens.weight.numel()
        return total


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6·N for the matmuls with the non-embedding parameters (the output layer
    included), plus 6·L·S·E for causal attention scores and values (12·L·S·E halved by the causal mask),
    as in the PaLM paper's appendix B accounting."""
    per_layer = (
        cfg.dim * cfg.head_dim * (cfg.num_heads * 2 + cfg.num_kv_heads * 2)  # q, o and k, v projections
        + 3 * cfg.dim * cfg.hidden_dim
    )
    dense = cfg.num_layers * per_layer + cfg.dim * cfg.vocab_size
    attention = 6 * cfg.num_layers * seq_len * cfg.dim
    return 6 * dense + attention
