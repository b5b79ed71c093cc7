"""Expert parallelism and the MoE layers' other parallel wiring, applied to any model by its family's EP plan
(`ModelSpec.ep_plan`: FQN pattern -> style; models/moe/plan.py). This file names no module.

Styles:
  moe      a routed layer (a module with `dispatch`, `token_split` and `load_group`): under EP its dispatcher
           becomes the all-to-all exchange below; under TP each TP rank routes a 1/tp share of the replicated
           tokens (`TPTokenSplit`); its load counts are summed over every rank of the stage after each step.
  experts  the stacked expert weights [N, ...]: DTensors sharded Shard(0) over `ep` (each rank holds N/ep
           experts), and their own FSDP unit over `efsdp` (parallel/fsdp.py; torch 2.11 has no per-parameter
           FSDP mesh). A pattern matching a module without these attributes (a dense first layer's MLP) is
           skipped.

Communication of one EP layer (forward; backward runs the same exchanges in reverse):
  1. all-to-all of the per-expert row counts (N integers per rank), then one host sync per layer to read the
     split sizes (rows sent to / received from each EP rank) — the only host sync of the layer;
  2. all-to-all of the rows, sorted by destination expert, so each rank receives its experts' rows;
  3. the local experts run as one grouped GEMM over the received rows, regrouped by expert;
  4. all-to-all of the results back to the rows' own ranks, where the router weights combine them.

Gradients of the expert weights: every rank's loss is scaled for averaging over `dp_cp` ranks (train/trainer.py),
and each token's contribution reaches its expert exactly once (TP ranks route disjoint shares), so the expert
units divide their reduced gradient by the dp_cp size rather than by their own mesh's size (`set_gradient_divide_
factor`); dividing by efsdp would double the gradient at EP=2 (the trap peers have fallen into).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import Shard, distribute_tensor

from treadle.models.moe.layer import inverse_permutation, permute_rows
from treadle.parallel.dims import ParallelDims
from treadle.parallel.tp import _matches


class _AllToAllRows(torch.autograd.Function):
    """Rows exchanged over `group`: forward sends `send_splits[r]` rows to rank r and receives `recv_splits[r]`
    from it (all_to_all_single); backward sends the gradients back the same way reversed."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, recv_splits: list[int], send_splits: list[int], group) -> torch.Tensor:  # type: ignore[override]
        ctx.splits, ctx.group = (recv_splits, send_splits), group
        return _all_to_all(x, recv_splits, send_splits, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        recv_splits, send_splits = ctx.splits
        return _all_to_all(grad, send_splits, recv_splits, ctx.group), None, None, None


def _all_to_all(x: torch.Tensor, recv_splits: list[int], send_splits: list[int], group) -> torch.Tensor:
    """The functional collective (an op selective activation checkpointing can keep instead of repeating)."""
    out = torch.ops._c10d_functional.all_to_all_single(
        x.contiguous(), recv_splits, send_splits, group.group_name
    )
    return torch.ops._c10d_functional.wait_tensor(out)


class AllToAllDispatch:
    """The expert-parallel dispatcher of one layer (the module docstring has the exchange). Runs eagerly: it
    reads split sizes on the host, so compiled blocks break their graph around it."""

    def __init__(self, group: dist.ProcessGroup, num_experts: int):
        self.group, self.ep = group, dist.get_world_size(group)
        self.local_experts = num_experts // self.ep

    @torch.compiler.disable
    def __call__(self, x_ME: torch.Tensor, counts_N: torch.Tensor, experts: nn.Module) -> torch.Tensor:
        ep, local = self.ep, self.local_experts
        send_counts_N = counts_N.to(torch.int64).contiguous()
        recv_counts_N = _all_to_all(send_counts_N, [local] * ep, [local] * ep, self.group)
        recv_RL = recv_counts_N.view(ep, local)  # rows from rank r for my local expert l
        splits = torch.cat([send_counts_N.view(ep, local).sum(1), recv_RL.sum(1)]).tolist()
        send_splits, recv_splits = splits[:ep], splits[ep:]
        x_recv = _AllToAllRows.apply(x_ME, recv_splits, send_splits, self.group)
        # Received rows are grouped by source rank, then expert; the grouped GEMM wants them by expert.
        expert_of_row = torch.repeat_interleave(
            torch.arange(local, device=x_ME.device).repeat(ep),
            recv_RL.flatten(),
            output_size=sum(recv_splits),
        )
        order = expert_of_row.argsort(stable=True)
        inverse = inverse_permutation(order)
        y_local = experts(permute_rows(x_recv, order, inverse), recv_RL.sum(0))
        return _AllToAllRows.apply(
            permute_rows(y_local, inverse, order), send_splits, recv_splits, self.group
        )


class _KeepShare(torch.autograd.Function):
    """Forward: this rank's 1/size share of the rows (no communication). Backward: the shares' gradients
    all-gathered, so every rank gets the whole (replicated) input's gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        return x.chunk(dist.get_world_size(group))[dist.get_rank(group)].contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return _all_gather_rows(grad, ctx.group), None


class _GatherShares(torch.autograd.Function):
    """Forward: every rank's share all-gathered into the whole rows. Backward: this rank's share of the
    gradient, which is whole on every rank since what follows runs replicated (no communication)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        return _all_gather_rows(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        size, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        return grad.chunk(size)[rank].contiguous(), None


def _all_gather_rows(x: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts)


class TPTokenSplit:
    """Each TP rank routes a 1/tp share of the tokens, which every TP rank holds whole (TP without sequence
    parallelism): `split` keeps this rank's rows, `gather` all-gathers the routed outputs back."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group

    @torch.compiler.disable
    def split(self, t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point():
            return t.chunk(dist.get_world_size(self.group))[dist.get_rank(self.group)]
        return _KeepShare.apply(t, self.group)

    @torch.compiler.disable
    def gather(self, t: torch.Tensor) -> torch.Tensor:
        return _GatherShares.apply(t, self.group)


def apply_ep(
    model: nn.Module, dims: ParallelDims, plan: dict[str, str], *, sequence_parallel: bool
) -> list[nn.Module]:
    """Wire `model`'s MoE layers (on the meta device) by `plan`; returns the expert modules that FSDP wraps as
    their own units over the experts' mesh (`fsdp.apply_fsdp(expert_units=...)`): none where that mesh is the
    blocks' (ep = tp = 1). Does nothing for a plan without entries."""
    if not plan:
        return []
    modules = list(model.named_modules())
    routed = [
        m for pattern, style in plan.items() if style == "moe" for fqn, m in modules if _matches(pattern, fqn)
    ]
    routed = [m for m in routed if hasattr(m, "dispatch")]
    if routed and dims.tp > 1 and sequence_parallel:
        raise ValueError(
            "parallel.sequence_parallel=true with a Mixture-of-Experts model is not supported: the routed layers "
            "split the replicated tokens over tp themselves; fix: parallel.sequence_parallel=false"
        )
    stage_size = dims.world_size // dims.pp
    if dims.ep > 1 or stage_size > 1:
        # The experts' meshes are created collectively (every rank, in the same order) on first use: here, even
        # on a pipeline stage without a routed layer.
        dims.mesh("experts_stage")
    for layer in routed:
        if dims.tp > 1:
            layer.token_split = TPTokenSplit(dims.mesh("tp").get_group())
        if dims.ep > 1:
            layer.dispatch = AllToAllDispatch(dims.mesh("ep").get_group(), layer.num_experts)
        if stage_size > 1:
            layer.load_group = dims.mesh("experts_stage").get_group()
    experts = [
        m
        for pattern, style in plan.items()
        if style == "experts"
        for fqn, m in modules
        if _matches(pattern, fqn)
    ]
    experts = [m for m in experts if any(True for _ in m.parameters(recurse=False))]
    if dims.ep == 1 and dims.tp == 1:
        # The experts' FSDP mesh (efsdp = dp_shard·cp) is then the block's own: they stay in the block's unit,
        # which keeps the compiled block one graph (an FSDP unit's hooks inside it would break the graph).
        return []
    if dims.ep > 1:
        ep_mesh = dims.mesh("ep")
        for module in experts:
            for name, param in list(module.named_parameters(recurse=False)):
                sharded = distribute_tensor(param, ep_mesh, [Shard(0)], src_data_rank=None)
                module.register_parameter(name, nn.Parameter(sharded, requires_grad=param.requires_grad))
    return experts
