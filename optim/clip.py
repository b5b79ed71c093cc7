"""Global gradient-norm clipping across every mesh a model's parameters live on."""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor


@torch.no_grad()
def clip_grad_norm_(parameters: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip gradients to a global L2 norm of `max_norm` (no clipping when <= 0); returns the total norm.

    Gradients are grouped by the mesh and placements they live on; within a group torch's `get_total_norm`
    computes a partial norm per shard, and `full_tensor()` all-reduces it (sum of squares) over that group's
    mesh. Groups are then combined in fp32 on the host of this rank. Replicated dims contribute once, so
    the result equals the norm of the unsharded gradients.
    """
    groups: dict[object, list[nn.Parameter]] = defaultdict(list)
    for p in parameters:
        if p.grad is not None:
            key = (p.grad.device_mesh, tuple(p.grad.placements)) if isinstance(p.grad, DTensor) else None
            groups[key].append(p)
    if not groups:
        return torch.zeros(())
    squares = []
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group], norm_type=2.0, foreach=True)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        squares.append(norm.float() ** 2)
    total = torch.stack(squares).sum().sqrt()
    if max_norm > 0:
        # Per group: a foreach kernel cannot mix DTensors of different meshes.
        for group in groups.values():
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total, foreach=True)
    return total
