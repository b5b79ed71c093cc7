"""Mixture-of-Experts decoder: the Llama family's attention (GQA, RoPE, optional qk-norm) with a routed MoE
feed-forward (models/moe/layer.py) in every layer after the first `first_k_dense`, optionally with shared experts.
Qwen3-MoE, Mixtral and DeepSeek-V3-style routing (with GQA attention in place of DeepSeek's MLA) are shapes of it.

Shape legend: B batch, S sequence, E model dim, D head dim.

Like the Llama module it holds no collective: parallel/ep.py swaps the layers' dispatcher for expert
parallelism. A training forward leaves the summed auxiliary (balancing) loss of its MoE layers for the engine
(`pop_auxiliary_loss`), which adds it to the language-model loss before backward; as a pipeline stage, whose
output is all the schedule backpropagates through, it attaches its layers' auxiliary loss to that output instead
(`AddAuxiliaryLoss`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from treadle.models.init import canonical_name
from treadle.models.llama.model import Attention, FeedForward, Llama, ModelConfig, RMSNorm
from treadle.models.moe.layer import MoE
from treadle.models.ops import KernelsConfig, Ops

ROUTER_SCORING = ("softmax", "sigmoid")


@dataclass(kw_only=True)
class MoEConfig(ModelConfig):
    """The Llama config's fields (attention, norms, RoPE, vocabulary; `ffn_dim` is the dense layers' width) and
    the MoE layer's."""

    name: str = "moe"
    num_experts: int = 8
    num_experts_per_tok: int = 2  # top-k
    moe_ffn_dim: int = 768  # each routed expert's hidden width
    num_shared_experts: int = 0  # dense experts every token goes through, as one MLP of their summed width
    shared_ffn_dim: int | None = None  # their summed width; null = num_shared_experts × moe_ffn_dim
    first_k_dense: int = 0  # the first k layers keep a dense SwiGLU MLP (DeepSeek-V3: 3)
    router_scoring: str = "softmax"  # softmax (Qwen3-MoE, Mixtral) | sigmoid (DeepSeek-V3)
    norm_topk_prob: bool = True  # renormalise the top-k weights to sum to 1 (always with sigmoid scoring)
    num_expert_groups: int = 1  # group-limited routing (DeepSeek-V3: 8 groups, top 4)
    topk_groups: int = 1
    route_scale: float = 1.0  # routed output multiplier (DeepSeek-V3: 2.5)
    aux_loss_coeff: float = 0.0  # load-balancing loss weight per MoE layer (Qwen3-MoE: 0.001)
    z_loss_coeff: float = 0.0  # router z-loss weight per MoE layer (ST-MoE: 0.001)
    bias_update_rate: float = 0.0  # auxiliary-loss-free balancing rate (DeepSeek-V3: 0.001; 0 = off)
    capacity_factor: float | None = None  # null = dropless; else rows per expert ≤ factor · T·k / experts

    @property
    def shared_width(self) -> int:
        return self.shared_ffn_dim or self.num_shared_experts * self.moe_ffn_dim

    def is_moe_layer(self, index: int) -> bool:
        return index >= self.first_k_dense

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - min(self.first_k_dense, self.num_layers)

    def validate(self) -> None:
        super().validate()
        checks = (
            (self.num_experts >= 1, f"model.num_experts={self.num_experts} must be >= 1"),
            (
                1 <= self.num_experts_per_tok <= self.num_experts,
                f"model.num_experts_per_tok={self.num_experts_per_tok} must be between 1 and model.num_experts="
                f"{self.num_experts}; fix: route each token to at most as many experts as there are",
            ),
            (
                self.router_scoring in ROUTER_SCORING,
                f"model.router_scoring={self.router_scoring!r} is not one of {ROUTER_SCORING}",
            ),
            (
                self.num_expert_groups >= 1 and self.num_experts % self.num_expert_groups == 0,
                f"model.num_expert_groups={self.num_expert_groups} must divide model.num_experts={self.num_experts}",
            ),
            (
                1 <= self.topk_groups <= self.num_expert_groups,
                f"model.topk_groups={self.topk_groups} must be between 1 and model.num_expert_groups="
                f"{self.num_expert_groups}",
            ),
            (
                self.num_experts_per_tok <= self.topk_groups * (self.num_experts // self.num_expert_groups),
                f"model.num_experts_per_tok={self.num_experts_per_tok} exceeds the experts of the "
                f"model.topk_groups={self.topk_groups} eligible groups; fix: raise model.topk_groups",
            ),
            (
                self.capacity_factor is None or self.capacity_factor > 0,
                f"model.capacity_factor={self.capacity_factor} must be > 0, or null for dropless routing",
            ),
            (
                0 <= self.first_k_dense <= self.num_layers,
                f"model.first_k_dense={self.first_k_dense} must be between 0 and model.num_layers={self.num_layers}",
            ),
            (
                min(self.aux_loss_coeff, self.z_loss_coeff, self.bias_update_rate) >= 0,
                "model.aux_loss_coeff, model.z_loss_coeff and model.bias_update_rate must be >= 0",
            ),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


class MoEBlock(nn.Module):
    """Attention then a routed MoE (or, in the first `first_k_dense` layers, a dense MLP), pre-norm residual.
    Returns (hidden, auxiliary loss of this layer's router)."""

    def __init__(self, cfg: MoEConfig, ops: Ops, index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps, ops)
        self.self_attn = Attention(cfg, ops)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps, ops)
        if cfg.is_moe_layer(index):
            shared = FeedForward(cfg, ops, hidden_dim=cfg.shared_width) if cfg.shared_width else None
            self.mlp: nn.Module = MoE(cfg.dim, cfg, cfg.moe_ffn_dim, shared, ops)
        else:
            self.mlp = FeedForward(cfg, ops)

    def forward(
        self,
        x_BSE: torch.Tensor,
        cos_BSD: torch.Tensor,
        sin_BSD: torch.Tensor,
        doc_ids_BS: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h_BSE = x_BSE + self.self_attn(self.input_layernorm(x_BSE), cos_BSD, sin_BSD, doc_ids_BS)
        if isinstance(self.mlp, MoE):
            out_BSE, aux = self.mlp(self.post_attention_layernorm(h_BSE))
        else:
            out_BSE, aux = (
                self.mlp(self.post_attention_layernorm(h_BSE)),
                h_BSE.new_zeros((), dtype=torch.float32),
            )
        return h_BSE + out_BSE, aux


class AddAuxiliaryLoss(torch.autograd.Function):
    """Identity on the hidden states (a copy) whose backward also sends `weight` as the gradient of `aux`, the
    stage's summed auxiliary loss (DeepSeek-V2/V3's `AddAuxiliaryLoss`): backpropagating from the last stage's
    loss through a stage's output then differentiates `aux · weight` as if it were a term of the loss. No
    communication.

    Why the weight is `count · loss_scale`: without pipeline stages the engine differentiates
    `(loss_sum + aux · count) · loss_scale` per micro-batch (`engine.add_auxiliary_loss`; `count` the micro-batch's
    counted tokens on this rank, `loss_scale` the step's dp_cp size / global token count), so d/d aux is
    `count · loss_scale`. Under PP the engine passes it per row (`aux_loss_weight_B`, this rank's counted tokens
    of the row times the scale) as a keyword input; the schedule cuts keyword inputs into micro-batches with the
    rows, so every stage sums its micro-batch's rows into that micro-batch's weight, whatever the schedule's
    order. With one pipeline micro-batch per trainer micro-batch (`parallel.pp_microbatches=0`) the gradients are
    those of the run without PP; with other micro-batches the auxiliary loss is taken per pipeline micro-batch.
    """

    @staticmethod
    def forward(ctx, h_BSE: torch.Tensor, aux: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(weight)
        ctx.aux_dtype = aux.dtype
        # A copy, not the input itself (which autograd would return as a view of it): the zero-bubble schedules
        # detach stage outputs in place, which a view refuses. The input is not kept, so the copy is transient.
        return h_BSE.clone()

    @staticmethod
    def backward(ctx, grad_BSE: torch.Tensor):  # type: ignore[override]
        (weight,) = ctx.saved_tensors
        return grad_BSE, weight.to(ctx.aux_dtype), None


class MoETransformer(Llama):
    """Decoder with MoE blocks; `forward` returns the final hidden states like `Llama`."""

    def __init__(self, cfg: MoEConfig, kernels: KernelsConfig | None = None):
        super().__init__(cfg, kernels, block=MoEBlock)
        self._aux_loss: torch.Tensor | None = None
        # [sum of per-forward auxiliary losses, number of training forwards] since the last optimizer step.
        self.register_buffer("aux_loss_stats", torch.zeros(2), persistent=False)

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    @property
    def compile_fullgraph(self) -> bool:
        """Whether each block traces as one graph (see `MoE.graphable`)."""
        return all(layer.graphable() for layer in self.moe_layers())

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        super().init_weights(seed)
        for name, buf in self.named_buffers():
            if name != "inv_freq":
                buf.zero_()

    def weight_std(self, name: str) -> float:
        if canonical_name(name).endswith("experts.down_proj"):
            return self.cfg.init_std / (2 * self.cfg.num_layers) ** 0.5
        return super().weight_std(name)

    def forward(
        self,
        tokens_BS: torch.Tensor,
        *,
        positions_BS: torch.Tensor | None = None,
        doc_ids_BS: torch.Tensor | None = None,
        aux_loss_weight_B: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The final hidden states [B, S, E]; in training the layers' summed auxiliary loss is kept for
        `pop_auxiliary_loss`, or, given `aux_loss_weight_B` (a pipeline stage: each row's weight of the auxiliary
        loss), attached to the output by `AddAuxiliaryLoss` with weight `aux_loss_weight_B.sum()`.

        As a pipeline stage it passes through what it lacks, as `Llama.forward` does: hidden states [B, S, E]
        (floating point) in place of token ids are not embedded, and without the final norm the last block's
        output is returned."""
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
        aux = torch.zeros((), dtype=torch.float32, device=h_BSE.device)
        for block in self.layers.values():
            h_BSE, block_aux = block(h_BSE, cos_BSD, sin_BSD, doc_ids_BS)
            aux = aux + block_aux
        if self.training:
            self.aux_loss_stats.add_(torch.stack([aux.detach(), torch.ones_like(aux)]))
            if aux_loss_weight_B is None:
                self._aux_loss = aux
            elif aux.requires_grad:
                h_BSE = AddAuxiliaryLoss.apply(h_BSE, aux, aux_loss_weight_B.sum())
        return h_BSE if self.norm is None else self.norm(h_BSE)

    def pop_auxiliary_loss(self) -> torch.Tensor | None:
        """The last training forward's auxiliary loss (a per-token mean, summed over MoE layers; 0 when no
        coefficient is set), handed over once."""
        aux, self._aux_loss = self._aux_loss, None
        return aux


def flops_per_token(cfg: MoEConfig, seq_len: int) -> float:
    """Training FLOPs per token over the *active* parameters (6 per parameter a token passes through: the
    attention projections, the router, its k experts and the shared experts, the output layer) plus causal
    attention's 6·L·S·E (models/llama/model.py has the accounting)."""
    attention = cfg.dim * cfg.head_dim * (cfg.num_heads * 2 + cfg.num_kv_heads * 2)
    dense_mlp = 3 * cfg.dim * cfg.hidden_dim
    moe_mlp = cfg.dim * cfg.num_experts + 3 * cfg.dim * (
        cfg.num_experts_per_tok * cfg.moe_ffn_dim + cfg.shared_width
    )
    layers = cfg.num_layers * attention + cfg.first_k_dense * dense_mlp + cfg.num_moe_layers * moe_mlp
    return 6 * (layers + cfg.dim * cfg.vocab_size) + 6 * cfg.num_layers * seq_len * cfg.dim
