"""Per-group FP8 (E4M3) quantisation along the last dim in plain PyTorch, the storage format of FP8
activation compression (memory/compression.py, COAT §5), and the dispatch that runs the Triton kernels of
`kernels/fp8_groups.py` on CUDA in eager mode (imported at the first such call: no Triton here).

Shape legend: R rows (every leading dim flattened), C columns (the last dim), G groups per row, c elements
per group (the effective group size).

Each group of c consecutive elements of a row gets scale = 448 / max(max|group|, 1e-12), its elements are
stored as round(clamp(x · scale, ±448)) in E4M3 (nearest even, saturated) and the group keeps 1 / scale in
fp32. The last dim is padded with zeros to G · c (the payload is [R, G·c], inv_scale [R, G, 1]); a row
narrower than a group is one group of C elements (c = min(group_size, C)), not padded.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from treadle.kernels.fp8_linear import AMAX_EPS, E4M3, _traced

__all__ = [
    "E4M3",
    "FP8_MAX",
    "dequantize_groups",
    "dequantize_groups_reference",
    "quantize_groups",
    "quantize_groups_reference",
]

FP8_MAX = torch.finfo(E4M3).max


def quantize_groups_reference(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch: (payload E4M3 [R, G·c], inv_scale fp32 [R, G, 1]) of x [..., C]."""
    num_cols = x.shape[-1]
    # Rows narrower than a group (a head dim of 64 with groups of 128) are one group each, not padded.
    group_size = min(group_size, num_cols)
    num_groups = math.ceil(num_cols / group_size)
    x_RC = x.detach().reshape(-1, num_cols).float()
    x_RGc = F.pad(x_RC, (0, num_groups * group_size - num_cols)).view(x_RC.shape[0], num_groups, group_size)
    scale = FP8_MAX / x_RGc.abs().amax(dim=-1, keepdim=True).clamp(min=AMAX_EPS)
    payload = (x_RGc * scale).clamp(-FP8_MAX, FP8_MAX).to(E4M3).view(x_RC.shape[0], -1)
    return payload, scale.reciprocal()


def dequantize_groups_reference(
    payload: torch.Tensor, inv_scale: torch.Tensor, shape: torch.Size, dtype: torch.dtype
) -> torch.Tensor:
    """Plain PyTorch: the tensor of `shape` and `dtype` that `quantize_groups_reference` stored."""
    rows, num_groups = inv_scale.shape[:2]
    x_RGc = payload.view(rows, num_groups, -1).float() * inv_scale
    return x_RGc.view(rows, -1)[:, : shape[-1]].reshape(shape).to(dtype)


def quantize_groups(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton kernel on CUDA in eager mode; the reference elsewhere (Inductor fuses the reference's ops
    itself, where a Triton launch would be opaque to it)."""
    if x.is_cuda and not _traced(x):
        from treadle.kernels.fp8_groups import quantize_groups_triton

        return quantize_groups_triton(x, group_size)
    return quantize_groups_reference(x, group_size)


def dequantize_groups(
    payload: torch.Tensor, inv_scale: torch.Tensor, shape: torch.Size, dtype: torch.dtype
) -> torch.Tensor:
    """The Triton kernel on CUDA in eager mode; the reference elsewhere."""
    if payload.is_cuda and not _traced(payload):
        from treadle.kernels.fp8_groups import dequantize_groups_triton

        return dequantize_groups_triton(payload, inv_scale, shape, dtype)
    return dequantize_groups_reference(payload, inv_scale, shape, dtype)
