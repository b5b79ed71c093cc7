"""The routed Mixture-of-Experts feed-forward layer: router, stacked experts, dispatch, load statistics.

Shape legend: T tokens on this rank (B·S flattened), E model dim, N experts, K experts per token (top-k),
F expert width, M routed rows (T·K, sorted by expert), L local experts (N / ep).

One layer computes, per token t with router scores s_t (fp32):
    ids_t = top-K experts by s_t + bias (the bias, DeepSeek-V3's auxiliary-loss-free balancing, only chooses);
    w_t   = s_t[ids_t], renormalised over the K when asked (Qwen3-MoE, Mixtral; always with sigmoid scores,
            DeepSeek-V3 §2.1.2), times the route scale;
    y_t   = Σ_k w_tk · expert_{ids_tk}(x_t)  (+ the shared experts' output for every token).
Rows are sorted by expert so each expert's tokens are contiguous, and the experts run as grouped GEMMs over
those groups through the op table (`ops.moe`, models/ops.py). The layer holds no collective: a dispatcher
object moves rows to their experts and back. The local one here runs every expert on this rank; the expert-
parallel one (parallel/ep.py) exchanges rows with all-to-all, and the tensor-parallel token split (also there)
gives each TP rank its own share of the tokens.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from treadle.models.ops import Ops


class RouterConfig(Protocol):
    num_experts: int
    num_experts_per_tok: int
    router_scoring: str
    norm_topk_prob: bool
    num_expert_groups: int
    topk_groups: int
    route_scale: float
    aux_loss_coeff: float
    z_loss_coeff: float
    bias_update_rate: float
    capacity_factor: float | None


class Router(nn.Module):
    """fp32 gate → scores → top-K experts and their weights, with the balancing losses of one micro-batch.

    Scoring: `softmax` then top-K (Qwen3-MoE, Mixtral; `norm_topk_prob` renormalises the K weights), or
    `sigmoid` with group-limited top-K (DeepSeek-V3: experts in `num_expert_groups` groups, a group's score is
    the sum of its two best experts, only the `topk_groups` best groups are eligible) and renormalised weights.

    Auxiliary losses (a value per micro-batch, summed over layers by the model):
      load balance (Switch Transformer eq. 4, Fedus et al. 2021): N · Σ_e f_e · P_e, f_e the fraction of the
        T·K routed rows that chose e, P_e the mean (normalised) score of e;
      z-loss (ST-MoE, Zoph et al. 2022 §3): mean over tokens of logsumexp(logits)².
    """

    def __init__(self, dim: int, cfg: RouterConfig):
        super().__init__()
        self.gate = nn.Linear(dim, cfg.num_experts, bias=False)
        self.num_experts, self.top_k = cfg.num_experts, cfg.num_experts_per_tok
        self.scoring, self.norm_topk_prob = cfg.router_scoring, cfg.norm_topk_prob
        self.num_groups, self.topk_groups, self.route_scale = (
            cfg.num_expert_groups,
            cfg.topk_groups,
            cfg.route_scale,
        )
        self.aux_loss_coeff, self.z_loss_coeff = cfg.aux_loss_coeff, cfg.z_loss_coeff
        # Auxiliary-loss-free balancing (DeepSeek-V3 §2.1.2, Wang et al. 2024): added to the scores only to choose
        # experts; updated after each optimizer step (`update_expert_bias`). Persistent, so resumes are exact.
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts), persistent=cfg.bias_update_rate > 0)

    def forward(self, x_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(weights [T, K] fp32, expert ids [T, K] int64, auxiliary loss: a scalar, already weighted by its
        coefficients, 0 when both are 0)."""
        logits_TN = F.linear(x_TE.float(), self.gate.weight.float())
        scores_TN = logits_TN.softmax(dim=-1) if self.scoring == "softmax" else logits_TN.sigmoid()
        choice_TN = scores_TN.detach() + self.expert_bias
        if self.num_groups > 1:
            choice_TN = self._limit_groups(choice_TN)
        ids_TK = choice_TN.topk(self.top_k, dim=-1, sorted=False).indices
        weights_TK = scores_TN.gather(-1, ids_TK)
        if self.scoring == "sigmoid" or self.norm_topk_prob:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        weights_TK = weights_TK * self.route_scale
        return weights_TK, ids_TK, self._aux_loss(logits_TN, scores_TN, ids_TK)

    def _limit_groups(self, choice_TN: torch.Tensor) -> torch.Tensor:
        """Only experts of the `topk_groups` best groups stay eligible (node-limited routing, DeepSeek-V3)."""
        tokens = choice_TN.shape[0]
        grouped_TGn = choice_TN.view(tokens, self.num_groups, -1)
        group_scores_TG = grouped_TGn.topk(min(2, grouped_TGn.shape[-1]), dim=-1).values.sum(dim=-1)
        keep_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool)
        keep_TG.scatter_(1, group_scores_TG.topk(self.topk_groups, dim=-1).indices, True)
        return grouped_TGn.masked_fill(~keep_TG[..., None], float("-inf")).view(tokens, -1)

    def _aux_loss(
        self, logits_TN: torch.Tensor, scores_TN: torch.Tensor, ids_TK: torch.Tensor
    ) -> torch.Tensor:
        aux = logits_TN.new_zeros(())
        if self.aux_loss_coeff > 0:
            tokens = ids_TK.shape[0]
            fraction_N = torch.bincount(ids_TK.flatten(), minlength=self.num_experts).float() / (
                tokens * self.top_k
            )
            probs_TN = scores_TN / scores_TN.sum(dim=-1, keepdim=True)
            aux = aux + self.aux_loss_coeff * self.num_experts * (fraction_N * probs_TN.mean(dim=0)).sum()
        if self.z_loss_coeff > 0:
            aux = aux + self.z_loss_coeff * logits_TN.logsumexp(dim=-1).square().mean()
        return aux


class GroupedExperts(nn.Module):
    """N SwiGLU experts stored stacked (the layout expert parallelism shards on dim 0):
    gate_proj, up_proj [N, F, E] and down_proj [N, E, F], each expert's slice laid out as a Hugging Face
    per-expert `nn.Linear` weight (out features, in features).

    `forward(x_ME, counts_L)`: rows sorted by expert, `counts_L[i]` rows for the i-th expert held here. Under
    expert parallelism the parameters are DTensors sharded `Shard(0)` over `ep` and this rank computes with its
    local experts only."""

    def __init__(self, dim: int, ffn_dim: int, num_experts: int, ops: Ops):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(num_experts, ffn_dim, dim))
        self.up_proj = nn.Parameter(torch.empty(num_experts, ffn_dim, dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, ffn_dim))
        self.ops = ops

    def forward(self, x_ME: torch.Tensor, counts_L: torch.Tensor) -> torch.Tensor:
        weights = [_local(w) for w in (self.gate_proj, self.up_proj, self.down_proj)]
        return self.ops.moe(x_ME, *weights, counts_L, swiglu=self.ops.swiglu)


def _local(weight: torch.Tensor) -> torch.Tensor:
    return weight.to_local() if isinstance(weight, DTensor) else weight


class _SlotsToRows(torch.autograd.Function):
    """rows_M = x[order_M // K]: each token's K slots, sorted by expert. Backward gathers the row gradients back
    into slot order (`inverse_M`) and sums each token's K."""

    @staticmethod
    def forward(ctx, x_TE: torch.Tensor, order_M: torch.Tensor, inverse_M: torch.Tensor, top_k: int):  # type: ignore[override]
        ctx.save_for_backward(inverse_M)
        ctx.top_k = top_k
        return x_TE.index_select(0, order_M // top_k)

    @staticmethod
    def backward(ctx, grad_ME: torch.Tensor):  # type: ignore[override]
        (inverse_M,) = ctx.saved_tensors
        grad_TKE = grad_ME.index_select(0, inverse_M).view(-1, ctx.top_k, grad_ME.shape[-1])
        return grad_TKE.sum(1), None, None, None


class _PermuteRows(torch.autograd.Function):
    """rows[perm], for a permutation `perm`: its backward is the gather by `inverse` (no scatter-add)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor):  # type: ignore[override]
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def permute_rows(x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """x[perm] with `inverse` the inverse permutation (`inverse_permutation(perm)`), differentiable by gathers."""
    return _PermuteRows.apply(x, perm, inverse)


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(perm).scatter_(0, perm, torch.arange(perm.numel(), device=perm.device))


class Dispatcher(Protocol):
    """Moves routed rows to the experts that compute them and the results back (rows stay in sorted order)."""

    def __call__(
        self, x_ME: torch.Tensor, counts_N: torch.Tensor, experts: GroupedExperts
    ) -> torch.Tensor: ...


def local_dispatch(x_ME: torch.Tensor, counts_N: torch.Tensor, experts: GroupedExperts) -> torch.Tensor:
    """Every expert lives on this rank: the sorted rows go straight to the grouped GEMMs."""
    return experts(x_ME, counts_N)


class TokenSplit(Protocol):
    """Under tensor parallelism every TP rank holds the same tokens; a split gives each rank its share for the
    routed experts (parallel/ep.py). `split` keeps this rank's rows, `gather` restores all of them."""

    def split(self, t: torch.Tensor) -> torch.Tensor: ...
    def gather(self, t: torch.Tensor) -> torch.Tensor: ...


class MoE(nn.Module):
    """Router + routed experts (+ shared experts, a dense SwiGLU MLP every token goes through).

    Returns (output, auxiliary loss) and, in training, adds this micro-batch's per-expert row counts and
    dropped rows to `load_counts` / `dropped` (reduced over the data-parallel ranks and reset after each
    optimizer step by `update_expert_bias`)."""

    def __init__(self, dim: int, cfg: RouterConfig, ffn_dim: int, shared: nn.Module | None, ops: Ops):
        super().__init__()
        self.router = Router(dim, cfg)
        self.experts = GroupedExperts(dim, ffn_dim, cfg.num_experts, ops)
        self.shared_experts = shared
        self.num_experts, self.top_k, self.capacity_factor = (
            cfg.num_experts,
            cfg.num_experts_per_tok,
            cfg.capacity_factor,
        )
        self.bias_update_rate = cfg.bias_update_rate
        self.dispatch: Dispatcher = local_dispatch
        self.token_split: TokenSplit | None = None
        # Process group the load counts are summed over: every rank of the pipeline stage, whose token shares
        # are disjoint (set by parallel/ep.py; None on one process).
        self.load_group: object | None = None
        self.register_buffer("load_counts", torch.zeros(cfg.num_experts), persistent=False)
        self.register_buffer("dropped", torch.zeros(()), persistent=False)

    def forward(self, x_BSE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_TE = x_BSE.reshape(-1, x_BSE.shape[-1])
        weights_TK, ids_TK, aux = self.router(x_TE)
        routed_x_TE = x_TE
        if self.token_split is not None:
            routed_x_TE, weights_TK, ids_TK = (self.token_split.split(t) for t in (x_TE, weights_TK, ids_TK))
        if self.training:
            # This rank's rows (its TP share): summed over every rank of the stage after the step. Recomputation
            # under activation checkpointing adds them twice, which scales every count alike: the balancing
            # sign and the reported ratios do not change.
            self.load_counts.add_(torch.bincount(ids_TK.flatten(), minlength=self.num_experts).float())
        out_TE = self._routed(routed_x_TE, weights_TK, ids_TK)
        if self.token_split is not None:
            out_TE = self.token_split.gather(out_TE)
        if self.shared_experts is not None:
            out_TE = out_TE + self.shared_experts(x_TE)
        return out_TE.view_as(x_BSE), aux

    def _routed(self, x_TE: torch.Tensor, weights_TK: torch.Tensor, ids_TK: torch.Tensor) -> torch.Tensor:
        """Sort rows by expert (drop those over capacity), dispatch, weight by the router and sum per token.

        Dropless, every (token, k) slot has one sorted row, so both directions are gathers through the sort
        permutation and its inverse, in forward and backward alike (`_SlotsToRows`, `permute_rows`): no
        scatter-add, whose bf16 atomics took 4.5 ms of a 20 ms layer on an H200 (benchmarks/moe.py shape)."""
        ids_M = ids_TK.flatten()  # slot m = t·K + k
        order_M = ids_M.argsort(stable=True)
        counts_N = torch.bincount(ids_M, minlength=self.num_experts)
        if self.capacity_factor is not None:
            return self._routed_with_capacity(x_TE, weights_TK, ids_M, order_M, counts_N)
        inverse_M = inverse_permutation(order_M)
        rows_ME = self.dispatch(
            _SlotsToRows.apply(x_TE, order_M, inverse_M, self.top_k), counts_N, self.experts
        )
        slots_TKE = permute_rows(rows_ME, inverse_M, order_M).view(*weights_TK.shape, -1)
        return (slots_TKE * weights_TK.to(slots_TKE.dtype).unsqueeze(-1)).sum(1)

    def _routed_with_capacity(
        self,
        x_TE: torch.Tensor,
        weights_TK: torch.Tensor,
        ids_M: torch.Tensor,
        order_M: torch.Tensor,
        counts_N: torch.Tensor,
    ) -> torch.Tensor:
        token_M = order_M // self.top_k
        weights_M = weights_TK.flatten()[order_M]
        token_M, weights_M, counts_N = self._drop_over_capacity(token_M, weights_M, counts_N, ids_M[order_M])
        rows_ME = self.dispatch(x_TE.index_select(0, token_M), counts_N, self.experts)
        rows_ME = rows_ME * weights_M.to(rows_ME.dtype)[:, None]
        return torch.zeros_like(x_TE).index_add_(0, token_M, rows_ME)

    def _drop_over_capacity(
        self,
        token_M: torch.Tensor,
        weights_M: torch.Tensor,
        counts_N: torch.Tensor,
        sorted_ids_M: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep at most ceil(capacity_factor · T·K / N) rows per expert, earliest tokens first (GShard §2.2,
        capacity per rank's tokens); a dropped row contributes nothing (its token keeps the residual)."""
        capacity = math.ceil(self.capacity_factor * token_M.numel() / self.num_experts)
        starts_N = torch.cumsum(counts_N, 0) - counts_N
        position_M = torch.arange(token_M.numel(), device=token_M.device) - starts_N[sorted_ids_M]
        keep_M = position_M < capacity
        if self.training:
            self.dropped.add_((~keep_M).sum())
        return token_M[keep_M], weights_M[keep_M], counts_N.clamp(max=capacity)

    def graphable(self) -> bool:
        """Whether the layer traces as one graph: row counts must not reach the host (capacity drops make shapes
        data-dependent; the reference loop and expert parallelism read counts on the host)."""
        return (
            self.capacity_factor is None
            and self.dispatch is local_dispatch
            and not getattr(self.experts.ops.moe, "reads_counts_on_host", False)
        )


@torch.no_grad()
def update_expert_bias(
    layers: dict[str, MoE],
    aux_stats: torch.Tensor | None = None,
    *,
    pp_group: object | None = None,
    all_labels: list[str] | None = None,
    cfg: RouterConfig | None = None,
) -> dict[str, torch.Tensor]:
    """After an optimizer step: sum the step's per-expert counts over the stage's ranks (one all-reduce for
    every layer, with `aux_stats` = [summed auxiliary loss, forwards] packed in), move each layer's bias by
    rate · sign(mean load − load) (DeepSeek-V3 §2.1.2: overloaded experts become less likely, underloaded ones
    more), and return the step's statistics as device tensors: expert load relative to the balanced load
    (max over experts; per layer and the worst layer; 1.0 = balanced), the fraction of routed rows dropped over
    capacity, and the mean auxiliary loss. `layers` maps a label (the layer index) to each layer. Resets the
    counts.

    Under pipeline parallelism every rank passes the layers of its own stages (which may be none), `pp_group`,
    `all_labels` (the labels of every MoE layer of the model) and the model's `cfg`: the bias moves with the
    counts of this stage's ranks, and the statistics are then summed over `pp` (one more all-reduce, every rank
    takes part) into those of the whole model on every rank: each layer is held by one stage, and the model's
    auxiliary loss per forward is the sum of its stages' shares."""
    if not layers and pp_group is None:
        return {}
    labels, moe = list(layers), list(layers.values())
    if aux_stats is not None:
        device = aux_stats.device
    else:
        assert moe, "pipeline statistics need the forwards' auxiliary-loss statistics or a layer"
        device = moe[0].load_counts.device
    aux_2 = aux_stats.clone() if aux_stats is not None else torch.zeros(2, device=device)
    counts_LN = torch.zeros(0, 1, device=device)
    dropped_L = torch.zeros(0, device=device)
    if moe:
        counts_LN = torch.stack([layer.load_counts for layer in moe])
        dropped_L = torch.stack([layer.dropped for layer in moe])
        group = moe[0].load_group
        if group is not None:
            packed = torch.cat([counts_LN.flatten(), dropped_L, aux_2])
            torch.distributed.all_reduce(packed, group=group)
            counts_LN = packed[: counts_LN.numel()].view_as(counts_LN)
            dropped_L, aux_2 = packed[counts_LN.numel() : -2], packed[-2:]
    mean_L1 = counts_LN.mean(dim=1, keepdim=True)
    for i, layer in enumerate(moe):
        rate = layer.bias_update_rate
        if rate > 0:
            layer.router.expert_bias.add_(rate * torch.sign(mean_L1[i] - counts_LN[i]))
        layer.load_counts.zero_()
        layer.dropped.zero_()
    if aux_stats is not None:
        aux_stats.zero_()
    imbalance_L = counts_LN.max(dim=1).values / mean_L1.squeeze(1).clamp(min=1e-9)
    # [dropped rows, routed rows, auxiliary loss per forward]
    totals_3 = torch.stack([dropped_L.sum(), counts_LN.sum(), aux_2[0] / aux_2[1].clamp(min=1)])
    if pp_group is not None:
        assert all_labels is not None and set(labels) <= set(all_labels)
        imbalance_A = torch.zeros(len(all_labels), device=device)
        imbalance_A[[all_labels.index(label) for label in labels]] = imbalance_L
        packed = torch.cat([imbalance_A, totals_3])
        torch.distributed.all_reduce(packed, group=pp_group)
        labels, imbalance_L, totals_3 = all_labels, packed[:-3], packed[-3:]
    if not labels:
        return {}
    capacity = [cfg] if cfg is not None else moe
    routers = [cfg] if cfg is not None else [layer.router for layer in moe]
    stats = {"moe/max_load": imbalance_L.max()}
    if any(c.capacity_factor is not None for c in capacity):
        stats["moe/dropped_frac"] = totals_3[0] / totals_3[1].clamp(min=1)
    if any(r.aux_loss_coeff > 0 or r.z_loss_coeff > 0 for r in routers):
        stats["moe/aux_loss"] = totals_3[2]
    stats.update({f"moe/max_load_l{label}": imbalance_L[i] for i, label in enumerate(labels)})
    return stats
