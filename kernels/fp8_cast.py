"""FP8 casts with dynamic scaling in Triton: the kernels behind `kernels/fp8_linear.py`'s `cast_to_fp8` on
CUDA, bit-equal to its plain-PyTorch `cast_to_fp8_reference` (the scaling itself is described there).

Shape legend: R rows of the scaled view, C its columns (each row has its own scale when rowwise), P column
blocks of the amax pass.

The Triton cast is two kernels: an amax pass that leaves one partial max per (row, column block), and a
cast pass. Between them the scale is computed by the same torch expression as the reference
(`scale_from_amax`), so the kernel and the reference divide the same numbers the same (IEEE) way and the
casts are bit-equal: only max-reductions (exact in any order) and the rounding of x · scale differ in
where they run. The store rounds to nearest even with saturation; on a GPU that is the hardware
conversion (`cvt.rn.satfinite`); in Triton's CPU interpreter — whose float8 conversion is wrong (Triton
3.6: 31.66 → 16.0) — and on GPUs below compute capability 8.9, where Triton has no E4M3 type, the kernel
encodes the float8 bits itself with integer arithmetic (`SOFT_CAST`).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from treadle.kernels.fp8_linear import (
    AMAX_EPS,
    E4M3,
    E5M2,
    RECIPES,
    Float8MatmulFunction,
    Float8MatmulGraphFunction,
    _interpreting,
    _reduce_amax,
    cast_to_fp8,
    cast_to_fp8_reference,
    fp8_linear_reference,
    fp8_matmul_supported,
    fp8_max,
    scale_from_amax,
    scaled_mm,
)

# The plain-PyTorch names are re-exported: the kernel tests and the kernels of fp8_groups / adamw_fp8 take
# them from here, next to the kernels they check.
__all__ = [
    "AMAX_EPS",
    "E4M3",
    "E5M2",
    "RECIPES",
    "Float8MatmulFunction",
    "Float8MatmulGraphFunction",
    "cast_to_fp8",
    "cast_to_fp8_reference",
    "cast_to_fp8_triton",
    "fp8_linear_reference",
    "fp8_matmul_supported",
    "scale_from_amax",
    "scaled_mm",
]

# format -> (mantissa bits, exponent bias) for the software encoder
_FORMATS = {E4M3: (3, 7), E5M2: (2, 15)}
_AMAX_BLOCK = 1024
_CAST_BLOCK = 1024


@triton.jit
def _amax_kernel(x_ptr, partial_ptr, num_cols, stride_r, num_col_blocks, BLOCK: tl.constexpr):
    """Program r·P + p writes max |x[r, p·BLOCK : (p+1)·BLOCK]| to partial[r, p] (a 1-D grid: CUDA caps
    the second grid axis at 65535, which rows or blocks can pass)."""
    pid = tl.program_id(0).to(tl.int64)
    row, block = pid // num_col_blocks, pid % num_col_blocks
    cols = block * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * stride_r + cols, mask=cols < num_cols, other=0.0).to(tl.float32)
    tl.store(partial_ptr + row * num_col_blocks + block, tl.max(tl.abs(x), axis=0))


@triton.jit
def _encode_fp8(y, MANT: tl.constexpr, BIAS: tl.constexpr):
    """Float8 bits (uint8) of y, |y| <= the format's max, rounded to nearest even; integer arithmetic only.

    Normal range: add half an ulp of the target (plus the tie-to-even bit) to the fp32 bits and truncate the
    dropped mantissa bits; the exponent is rebiased. Subnormal range (|y| < 2^(1-BIAS)): the value counts in
    steps of 2^(1-BIAS-MANT); `(v + 2^23) - 2^23` rounds v to an integer, to nearest even, in fp32.
    """
    DROP: tl.constexpr = 23 - MANT
    bits = y.to(tl.int32, bitcast=True)
    sign = (bits >> 31) & 1
    mag_bits = bits & 0x7FFFFFFF
    rounded = mag_bits + ((1 << (DROP - 1)) - 1) + ((mag_bits >> DROP) & 1)
    exponent = ((rounded >> 23) & 0xFF) - 127 + BIAS
    normal = (exponent << MANT) | ((rounded >> DROP) & ((1 << MANT) - 1))
    # Clamped to the subnormal range so that the int cast of the branch not taken cannot overflow.
    mag = tl.abs(y)
    steps = tl.minimum(mag, 2.0 ** (1 - BIAS)) * (2.0 ** (BIAS - 1 + MANT))
    subnormal = ((steps + 8388608.0) - 8388608.0).to(tl.int32)
    code = tl.where(mag < 2.0 ** (1 - BIAS), subnormal, normal)
    return ((sign << 7) | code).to(tl.uint8)


@triton.jit
def _decode_e4m3(bits):
    """fp32 value of E4M3 bits (uint8), integer arithmetic only: exponent field 0 is subnormal (m · 2^-9),
    else (1 + m/8) · 2^(e-7) rebiased into fp32's fields; 0x7F / 0xFF are NaN (E4M3 has no infinity)."""
    b = bits.to(tl.int32)
    exponent = (b >> 3) & 0xF
    mantissa = b & 0x7
    normal = ((exponent - 7 + 127) << 23) | (mantissa << 20)
    normal = tl.where((b & 0x7F) == 0x7F, 0x7FC00000, normal).to(tl.float32, bitcast=True)
    magnitude = tl.where(exponent == 0, mantissa.to(tl.float32) * 0.001953125, normal)
    return tl.where((b & 0x80) != 0, -magnitude, magnitude)


@triton.jit
def _cast_kernel(
    x_ptr,
    scale_ptr,
    out_ptr,
    num_cols,
    num_col_blocks,
    stride_r,
    stride_scale,
    limit,
    BLOCK: tl.constexpr,
    SOFT_CAST: tl.constexpr,
    MANT: tl.constexpr,
    BIAS: tl.constexpr,
):
    """Program r·P + p casts x[r, p·BLOCK : (p+1)·BLOCK] · scale[r] (stride_scale 0: one scale)."""
    pid = tl.program_id(0).to(tl.int64)
    row, block = pid // num_col_blocks, pid % num_col_blocks
    cols = block * BLOCK + tl.arange(0, BLOCK)
    mask = cols < num_cols
    scale = tl.load(scale_ptr + row * stride_scale)
    x = tl.load(x_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.minimum(tl.maximum(x * scale, -limit), limit)
    if SOFT_CAST:
        tl.store(out_ptr + row * num_cols + cols, _encode_fp8(y, MANT, BIAS), mask=mask)
    else:
        tl.store(out_ptr + row * num_cols + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


@functools.cache
def _has_e4m3(device_index: int) -> bool:
    """Triton has an E4M3 type (`fp8e4nv`) from compute capability 8.9 on."""
    return torch.cuda.get_device_capability(device_index) >= (8, 9)


def _soft_cast(device: torch.device) -> bool:
    """Whether the Triton kernels on `device` encode and decode float8 bits in integers: in the interpreter
    (whose float8 conversion is wrong), on the CPU, and on GPUs without Triton's E4M3 type (`_has_e4m3`)."""
    if _interpreting() or device.type != "cuda":
        return True
    return not _has_e4m3(device.index if device.index is not None else torch.cuda.current_device())


def cast_to_fp8_triton(
    x: torch.Tensor, dtype: torch.dtype, rowwise: bool, amax_group=None, *, soft_cast: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `cast_to_fp8_reference` for a 2-D `x` (bit-equal to it)."""
    assert x.dim() == 2 and dtype in _FORMATS, (x.shape, dtype)
    soft_cast = _soft_cast(x.device) if soft_cast is None else soft_cast
    # Tensorwise, the amax pass sees the tensor as one long row, so its partials cover every element.
    x_RC = x if (x.stride(-1) == 1 and (rowwise or x.is_contiguous())) else x.contiguous()
    rows, cols = x_RC.shape
    amax_RC = x_RC if rowwise else x_RC.view(1, -1)
    num_blocks = triton.cdiv(amax_RC.shape[1], _AMAX_BLOCK)
    partial_RP = torch.empty(amax_RC.shape[0], num_blocks, dtype=torch.float32, device=x.device)
    out = torch.empty(rows, cols, dtype=dtype, device=x.device)
    if x.numel() == 0:
        if amax_group is None:
            return out, torch.ones((rows, 1) if rowwise else (), dtype=torch.float32, device=x.device)
        # An empty shard still joins its group's amax all-reduce (the other ranks wait for it).
        amax = torch.zeros((rows, 1) if rowwise else (), dtype=torch.float32, device=x.device)
    else:
        _amax_kernel[(amax_RC.shape[0] * num_blocks,)](
            amax_RC, partial_RP, amax_RC.shape[1], amax_RC.stride(0), num_blocks, BLOCK=_AMAX_BLOCK
        )
        amax = partial_RP.amax(dim=1, keepdim=True) if rowwise else partial_RP.amax()
    scale = scale_from_amax(_reduce_amax(amax, amax_group), dtype)
    if x.numel() == 0:
        return out, scale.reciprocal()
    mant, bias = _FORMATS[dtype]
    cast_blocks = triton.cdiv(cols, _CAST_BLOCK)
    _cast_kernel[(rows * cast_blocks,)](
        x_RC,
        scale,
        out.view(torch.uint8) if soft_cast else out,
        cols,
        cast_blocks,
        x_RC.stride(0),
        1 if rowwise else 0,
        fp8_max(dtype),
        BLOCK=_CAST_BLOCK,
        SOFT_CAST=soft_cast,
        MANT=mant,
        BIAS=bias,
    )
    return out, scale.reciprocal()
