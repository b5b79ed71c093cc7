"""Global gradient-norm clipping across every mesh a model's parameters live on."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor


@torch.no_grad()
def clip_grad_norm_(
    parameters: list[nn.Parameter],
    max_norm: float,
    *,
    stage_group: dist.ProcessGroup | None = None,
    shared: Sequence[nn.Parameter] = (),
) -> torch.Tensor:
    """Clip gradients to a global L2 norm of `max_norm` (no clipping when <= 0); returns the total norm.

    Gradients are grouped by the mesh and placements they live on; within a group torch's `get_total_norm`
    computes a partial norm per shard, and `full_tensor()` all-reduces it (sum of squares) over that group's
    mesh. Groups are then combined in fp32 on the host of this rank. Replicated dims contribute once, so
    the result equals the norm of the unsharded gradients.

    `stage_group` (pipeline parallelism): ranks holding different parameters, whose squared norms are summed
    by one all-reduce over it. `shared`: parameters whose gradient another rank of `stage_group` also holds
    (a tied copy); they are clipped but counted only there.
    """
    groups: dict[object, list[nn.Parameter]] = defaultdict(list)
    skip = {id(p) for p in shared}
    for p in parameters:
        if p.grad is not None:
            key = (p.grad.device_mesh, tuple(p.grad.placements)) if isinstance(p.grad, DTensor) else None
            groups[key].append(p)
    if not groups and stage_group is None:
        return torch.zeros(())
    # A zero on the gradients' device keeps the sum (and the all-reduce over `stage_group`) on it.
    device = parameters[0].device if parameters else torch.device("cpu")
    squares = [torch.zeros((), dtype=torch.float32, device=device)]
    for group in groups.values():
        counted = [p.grad for p in group if id(p) not in skip]
        if not counted:
            continue
        norm = torch.nn.utils.get_total_norm(counted, norm_type=2.0, foreach=True)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        squares.append(norm.float() ** 2)
    total_sq = torch.stack([s.to(device) for s in squares]).sum()
    if stage_group is not None:
        dist.all_reduce(total_sq, group=stage_group)
    total = total_sq.sqrt()
    if max_norm > 0:
        # Per group: a foreach kernel cannot mix DTensors of different meshes.
        for group in groups.values():
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total, foreach=True)
    return total
