"""Per-group FP8 (E4M3) quantisation along the last dim, in Triton: the kernels of the storage format of FP8
activation compression (memory/compression.py, COAT §5), whose plain-PyTorch reference and dispatch are
`kernels/fp8_groups_reference.py` (re-exported here for the kernel tests).

Shape legend: R rows (every leading dim flattened), C columns (the last dim), G groups per row, c elements
per group (the effective group size), T a tile of consecutive (row, group) pairs, K the group padded to a
power of two (the kernels' column tile).

One program of the quantise kernel reads a [T, K] tile of x once (any input dtype, row and column strides
as given), takes each group's amax in fp32 and writes the payload tile and T inverse scales: no fp32 copy of
the tensor and no separate amax pass. The dequantise kernel is the same tiling backwards. A group size
that is not a power of two (a configured one, or a row narrower than the group) is handled by masking the
columns of the power-of-two tile past c; groups wider than `MAX_GROUP_TILE` (one tile would not fit in
registers) fall back to the reference.

Bit equality with the reference: a max is exact in any order, and the scale is computed with the reference's
own IEEE operations. torch evaluates `448 / amax` (Python scalar / tensor) as `amax.reciprocal() * 448`, two
roundings, so the kernel does the same, with `div_rn` because Triton's `/` on fp32 is not correctly rounded
on a GPU; inv_scale is a correctly rounded 1 / scale like `scale.reciprocal()`. The store rounds to nearest
even with saturation: on a GPU of compute capability >= 8.9 it is the hardware conversion; in Triton's CPU
interpreter (whose float8 conversion is wrong, see kernels/fp8_cast.py) and on older GPUs (no E4M3 type in
Triton) the kernels encode and decode the bits with integer arithmetic (`SOFT_CAST`; in the interpreter the
bf16 output is also rounded in integers first, as its fp32 -> bf16 conversion truncates). Finite inputs are
held to equality (checked on an H100 with fp32 inputs from 1e-38, subnormal, to 1e37); non-finite ones (NaN,
inf) are not.

No autograd Function: the only callers are saved-tensor pack/unpack hooks, which autograd runs outside the
graph on detached tensors, so there is no backward to define.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from treadle.kernels.fp8_cast import AMAX_EPS, _decode_e4m3, _encode_fp8, _soft_cast
from treadle.kernels.fp8_groups_reference import (
    E4M3,
    FP8_MAX,
    dequantize_groups,
    dequantize_groups_reference,
    quantize_groups,
    quantize_groups_reference,
)

__all__ = [
    "E4M3",
    "FP8_MAX",
    "MAX_GROUP_TILE",
    "dequantize_groups",
    "dequantize_groups_reference",
    "dequantize_groups_triton",
    "quantize_groups",
    "quantize_groups_reference",
    "quantize_groups_triton",
]

# Elements of a group's power-of-two tile above which the Triton path hands over to the reference.
MAX_GROUP_TILE = 16384
# Elements per program: 4096 keeps a tile of fp32 values at 32 registers per thread with 4 warps (on an H100,
# tiles of 1024 to 8192 elements ran equally fast: both kernels are bound by memory bandwidth).
_TILE = 4096
# Constants the kernels read (Triton kernels see module globals only as constexpr).
_MAX: tl.constexpr = tl.constexpr(FP8_MAX)
_EPS: tl.constexpr = tl.constexpr(AMAX_EPS)


@triton.jit
def _round_to_bf16(y):
    """y (fp32) rounded to bf16 precision, nearest even, still in fp32: the interpreter converts fp32 to bf16
    by truncation (Triton 3.6), which is then exact. Finite y only."""
    bits = y.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _tile(pid, num_row_groups, num_groups, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """Indices of program `pid`'s [T, K] tile: (row, group) pairs pid·T .. pid·T + T - 1, in int64."""
    rg_T = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    return rg_T, rg_T // num_groups, rg_T % num_groups, tl.arange(0, BLOCK_K), rg_T < num_row_groups


@triton.jit
def _quantize_kernel(
    x_ptr,
    payload_ptr,
    inv_scale_ptr,
    num_row_groups,
    num_groups,
    num_cols,
    stride_r,
    stride_c,
    GROUP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SOFT_CAST: tl.constexpr,
):
    """Program p quantises groups p·T .. p·T + T - 1 of the flattened [R·G] (row, group) pairs; group g of
    row r is x[r, g·c : (g+1)·c] and payload[r·G + g, :] seen as [R·G, c]."""
    rg_T, row_T, group_T, k_K, live_T = _tile(tl.program_id(0), num_row_groups, num_groups, BLOCK_T, BLOCK_K)
    col_TK = group_T[:, None] * GROUP + k_K[None, :]
    in_group_TK = live_T[:, None] & (k_K < GROUP)[None, :]
    # Columns past C are the reference's zero padding: they load as 0 and are stored as 0.
    x_TK = tl.load(
        x_ptr + row_T[:, None] * stride_r + col_TK * stride_c,
        mask=in_group_TK & (col_TK < num_cols),
        other=0.0,
    ).to(tl.float32)
    amax_T = tl.maximum(tl.max(tl.abs(x_TK), axis=1), _EPS)
    # The reference's `FP8_MAX / amax` is torch's `amax.reciprocal() * FP8_MAX` (see the module doc).
    scale_T = tl.math.div_rn(1.0, amax_T) * _MAX
    y_TK = tl.minimum(tl.maximum(x_TK * scale_T[:, None], -_MAX), _MAX)
    out_TK = payload_ptr + rg_T[:, None] * GROUP + k_K[None, :]
    if SOFT_CAST:
        tl.store(out_TK, _encode_fp8(y_TK, 3, 7), mask=in_group_TK)  # E4M3: 3 mantissa bits, bias 7
    else:
        tl.store(out_TK, y_TK.to(payload_ptr.dtype.element_ty), mask=in_group_TK)
    tl.store(inv_scale_ptr + rg_T, tl.math.div_rn(1.0, scale_T), mask=live_T)


@triton.jit
def _dequantize_kernel(
    payload_ptr,
    inv_scale_ptr,
    out_ptr,
    num_row_groups,
    num_groups,
    num_cols,
    GROUP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SOFT_CAST: tl.constexpr,
):
    """Program p writes out[r, g·c : (g+1)·c] (cut at C) = payload group · inv_scale[r, g] for its T groups."""
    rg_T, row_T, group_T, k_K, live_T = _tile(tl.program_id(0), num_row_groups, num_groups, BLOCK_T, BLOCK_K)
    col_TK = group_T[:, None] * GROUP + k_K[None, :]
    in_group_TK = live_T[:, None] & (k_K < GROUP)[None, :]
    q_TK = tl.load(payload_ptr + rg_T[:, None] * GROUP + k_K[None, :], mask=in_group_TK)
    q_TK = _decode_e4m3(q_TK) if SOFT_CAST else q_TK.to(tl.float32)
    inv_T = tl.load(inv_scale_ptr + rg_T, mask=live_T, other=1.0)
    y_TK = q_TK * inv_T[:, None]
    if SOFT_CAST and out_ptr.dtype.element_ty == tl.bfloat16:
        y_TK = _round_to_bf16(y_TK)
    y_TK = y_TK.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row_T[:, None] * num_cols + col_TK, y_TK, mask=in_group_TK & (col_TK < num_cols))


def _tiles(group_size: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_K, num_warps) for groups of `group_size`."""
    block_k = triton.next_power_of_2(group_size)
    block_t = max(1, _TILE // block_k)
    return block_t, block_k, 8 if block_t * block_k > _TILE else 4


def quantize_groups_triton(
    x: torch.Tensor, group_size: int, *, soft_cast: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `quantize_groups_reference` (bit-equal to it for finite inputs)."""
    num_cols = x.shape[-1]
    group_size = min(group_size, num_cols)
    if triton.next_power_of_2(group_size) > MAX_GROUP_TILE:
        return quantize_groups_reference(x, group_size)
    soft_cast = _soft_cast(x.device) if soft_cast is None else soft_cast
    num_groups = math.ceil(num_cols / group_size)
    # A view where reshape allows one (row-strided inputs are read in place), else reshape's copy.
    x_RC = x.detach().reshape(-1, num_cols)
    rows = x_RC.shape[0]
    payload = torch.empty(rows, num_groups * group_size, dtype=E4M3, device=x.device)
    inv_scale = torch.empty(rows, num_groups, 1, dtype=torch.float32, device=x.device)
    if payload.numel() == 0:
        return payload, inv_scale
    block_t, block_k, num_warps = _tiles(group_size)
    _quantize_kernel[(triton.cdiv(rows * num_groups, block_t),)](
        x_RC,
        payload.view(torch.uint8) if soft_cast else payload,
        inv_scale,
        rows * num_groups,
        num_groups,
        num_cols,
        x_RC.stride(0),
        x_RC.stride(1),
        GROUP=group_size,
        BLOCK_T=block_t,
        BLOCK_K=block_k,
        SOFT_CAST=soft_cast,
        num_warps=num_warps,
    )
    return payload, inv_scale


def dequantize_groups_triton(
    payload: torch.Tensor,
    inv_scale: torch.Tensor,
    shape: torch.Size,
    dtype: torch.dtype,
    *,
    soft_cast: bool | None = None,
) -> torch.Tensor:
    """Triton version of `dequantize_groups_reference` (bit-equal to it for finite payloads)."""
    rows, num_groups = inv_scale.shape[:2]
    group_size = payload.shape[-1] // max(num_groups, 1)
    if triton.next_power_of_2(group_size) > MAX_GROUP_TILE:
        return dequantize_groups_reference(payload, inv_scale, shape, dtype)
    soft_cast = _soft_cast(payload.device) if soft_cast is None else soft_cast
    num_cols = shape[-1]
    out = torch.empty(rows, num_cols, dtype=dtype, device=payload.device)
    if out.numel() == 0:
        return out.view(shape)
    payload, inv_scale = payload.contiguous(), inv_scale.contiguous()
    block_t, block_k, num_warps = _tiles(group_size)
    _dequantize_kernel[(triton.cdiv(rows * num_groups, block_t),)](
        payload.view(torch.uint8) if soft_cast else payload,
        inv_scale,
        out,
        rows * num_groups,
        num_groups,
        num_cols,
        GROUP=group_size,
        BLOCK_T=block_t,
        BLOCK_K=block_k,
        SOFT_CAST=soft_cast,
        num_warps=num_warps,
    )
    return out.view(shape)
