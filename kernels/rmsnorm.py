"""RMSNorm (Zhang & Sennrich 2019) in Triton: forward, backward, and a variant fused with the residual add.

Shape legend: N rows (all leading dims flattened: tokens), E row width (model dim), P backward programs.

Semantics are those of `treadle.kernels.reference.rmsnorm_torch` (Llama's): the row is normalised in fp32, rounded
to the input dtype, then multiplied by the weight in the dtype torch's promotion gives (`normed.to(x.dtype) *
weight`), so a bf16 weight with bf16 input gives bf16 and an fp32 weight (FSDP without a param dtype) gives
fp32. The kernels reproduce that intermediate rounding, which makes the forward match the reference to the
last bit except where the two fp32 sums of squares round differently.

Backward, with n = x·r, r = 1/sqrt(mean(x²) + eps), g = dy·w:
    dx = r · (g − n · mean(g · n))          dw = Σ_rows dy · round(n)
`dw` is a reduction over all N rows: every backward program accumulates its rows' share in registers
(fp32) and writes one partial row [P, E]; a torch sum over P (P ≈ a few × the SM count, so a few MB) finishes
it. That keeps the row kernel free of atomics and the result deterministic.

Rows up to `_MAX_FUSED_BLOCK_E` wide (`_MAX_FUSED_BLOCK_E_BWD` in the backward) are held whole in registers,
one read of each tensor; wider rows loop over column blocks in two sweeps (sum of squares then normalise;
mean(g·n) then dx and the dweight share), the second sweep mostly served from L2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from treadle.kernels.reference import rmsnorm_torch

__all__ = [
    "RMSNormFunction",
    "RMSNormResidualFunction",
    "rmsnorm",
    "rmsnorm_op",
    "rmsnorm_reference",
    "rmsnorm_residual",
    "rmsnorm_residual_reference",
]

# The reference is the op table's torch implementation itself, so that `kernels.rmsnorm=triton` and
# `kernels.rmsnorm=torch` are held to one definition of the op.
rmsnorm_reference = rmsnorm_torch

# The widest rows kept whole in registers. Forward: a 16k-wide row in fp32 is 64 KiB per program (32 registers
# a thread at 16 warps), so Llama-405B's model dim still fits (~2990 GB/s at E = 16384 on an H100). Backward
# holds four such rows (x, dy, w and the dweight accumulator): past 8k they alone need 128 registers a thread
# at 16 warps, so wider rows take the two-sweep path, which reaches only ~1120 GB/s at E = 16384 against
# ~2500 at 8192 (H100): the place to improve next. Wider rows are streamed `_LOOP_BLOCK_E` columns at a time.
_MAX_FUSED_BLOCK_E = 16384
_MAX_FUSED_BLOCK_E_BWD = 8192
_LOOP_BLOCK_E = 4096


def rmsnorm_residual_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch `rmsnorm_residual`: (rmsnorm(x + residual), x + residual)."""
    new_residual = x + residual
    return rmsnorm_torch(new_residual, weight, eps), new_residual


@triton.jit
def _load_h(x_row, res_row, h_row, cols, mask, HAS_RESIDUAL: tl.constexpr, STORE_H: tl.constexpr, COMPUTE: tl.constexpr):  # fmt: skip
    """The rows to normalise: x, or x + residual rounded to its storage dtype (and stored when STORE_H)."""
    h = tl.load(x_row + cols, mask=mask, other=0.0).to(COMPUTE)
    if HAS_RESIDUAL:
        h += tl.load(res_row + cols, mask=mask, other=0.0).to(COMPUTE)
        # Round first: the reference normalises the stored (rounded) sum, not the exact one.
        h_stored = h.to(h_row.dtype.element_ty)
        if STORE_H:
            tl.store(h_row + cols, h_stored, mask=mask)
        h = h_stored.to(COMPUTE)
    return h


@triton.jit
def _store_normed(y_row, w_ptr, h, rstd, cols, mask, num_cols, ROUND_TY: tl.constexpr, COMPUTE: tl.constexpr):  # fmt: skip
    # Rounded to the input's dtype before the weight multiply, as `normed.to(x.dtype) * weight` does.
    normed = (h * rstd).to(ROUND_TY).to(COMPUTE)
    w = tl.load(w_ptr + cols, mask=cols < num_cols, other=0.0).to(COMPUTE)
    tl.store(y_row + cols, normed * w, mask=mask)


@triton.jit
def _rmsnorm_fwd_kernel(
    x_ptr,
    res_ptr,
    h_ptr,
    w_ptr,
    y_ptr,
    rstd_ptr,
    num_rows,
    num_cols,
    stride_x,
    stride_res,
    stride_h,
    stride_y,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_E: tl.constexpr,
    SINGLE_PASS: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    """Program p normalises rows [p·ROWS, (p+1)·ROWS); h is x, or x + residual stored to h_ptr."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None]
    row_mask = rows < num_rows
    rows = rows.to(tl.int64)  # N·E can pass 2**31
    x_row, res_row = x_ptr + rows * stride_x, res_ptr + rows * stride_res
    h_row, y_row = h_ptr + rows * stride_h, y_ptr + rows * stride_y
    round_ty: tl.constexpr = h_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK_E)[None, :]
    if SINGLE_PASS:
        mask = row_mask & (cols < num_cols)
        h = _load_h(x_row, res_row, h_row, cols, mask, HAS_RESIDUAL, True, COMPUTE)
        rstd = tl.math.rsqrt(tl.sum(h * h, axis=1, keep_dims=True) / num_cols + eps)
        _store_normed(y_row, w_ptr, h, rstd, cols, mask, num_cols, round_ty, COMPUTE)
    else:
        # `while` rather than `for ... in range(...)`: with NumPy 2, Triton 3.6's interpreter (our CPU
        # tests) cannot take a runtime value as a range bound. Compiled, the loop is the same.
        sum_sq = tl.zeros([ROWS, 1], dtype=COMPUTE)
        start = 0
        while start < num_cols:
            mask = row_mask & (start + cols < num_cols)
            h = _load_h(x_row, res_row, h_row, start + cols, mask, HAS_RESIDUAL, True, COMPUTE)
            sum_sq += tl.sum(h * h, axis=1, keep_dims=True)
            start += BLOCK_E
        rstd = tl.math.rsqrt(sum_sq / num_cols + eps)
        start = 0
        while start < num_cols:
            mask = row_mask & (start + cols < num_cols)
            # x + residual is recomputed rather than re-read from h: this program's own stores are not
            # guaranteed visible to its other threads without a barrier, and the recomputation is exact.
            h = _load_h(x_row, res_row, h_row, start + cols, mask, HAS_RESIDUAL, False, COMPUTE)
            _store_normed(y_row, w_ptr, h, rstd, start + cols, mask, num_cols, round_ty, COMPUTE)
            start += BLOCK_E
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@triton.jit
def _rmsnorm_bwd_kernel(
    dy_ptr,
    dres_ptr,
    h_ptr,
    w_ptr,
    rstd_ptr,
    dh_ptr,
    dw_partial_ptr,
    num_rows,
    num_cols,
    num_programs,
    stride_dy,
    stride_dres,
    stride_h,
    stride_dh,
    HAS_DRES: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_E: tl.constexpr,
    SINGLE_PASS: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    """Persistent: program p takes row tiles p, p + P, ... and leaves its dw share in dw_partial[p]."""
    pid = tl.program_id(0)
    round_ty: tl.constexpr = h_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK_E)[None, :]
    dw_row = dw_partial_ptr + pid.to(tl.int64) * num_cols
    if SINGLE_PASS:
        col_mask = cols < num_cols
        w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(COMPUTE)
        dw_acc = tl.zeros([1, BLOCK_E], dtype=COMPUTE)
    tile = pid
    while tile * ROWS < num_rows:  # `while`, not range(pid, ...): see the forward kernel
        rows = tile * ROWS + tl.arange(0, ROWS)[:, None]
        row_mask = rows < num_rows
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
        rows = rows.to(tl.int64)
        dy_row, dres_row = dy_ptr + rows * stride_dy, dres_ptr + rows * stride_dres
        h_row, dh_row = h_ptr + rows * stride_h, dh_ptr + rows * stride_dh
        if SINGLE_PASS:
            mask = row_mask & col_mask
            h = tl.load(h_row + cols, mask=mask, other=0.0).to(COMPUTE)
            dy = tl.load(dy_row + cols, mask=mask, other=0.0).to(COMPUTE)
            normed = h * rstd
            g = dy * w
            dh = (g - normed * (tl.sum(g * normed, axis=1, keep_dims=True) / num_cols)) * rstd
            if HAS_DRES:
                dh += tl.load(dres_row + cols, mask=mask, other=0.0).to(COMPUTE)
            tl.store(dh_row + cols, dh, mask=mask)
            dw_acc += tl.sum(dy * normed.to(round_ty).to(COMPUTE), axis=0, keep_dims=True)
        else:
            _rmsnorm_bwd_wide_rows(dy_row, dres_row, h_row, dh_row, w_ptr, rstd, dw_row, cols, row_mask, num_cols, HAS_DRES, ROWS, BLOCK_E, COMPUTE)  # fmt: skip
        tile += num_programs
    if SINGLE_PASS:
        tl.store(dw_row + cols, dw_acc, mask=col_mask)


@triton.jit
def _rmsnorm_bwd_wide_rows(dy_row, dres_row, h_row, dh_row, w_ptr, rstd, dw_row, cols, row_mask, num_cols, HAS_DRES: tl.constexpr, ROWS: tl.constexpr, BLOCK_E: tl.constexpr, COMPUTE: tl.constexpr):  # fmt: skip
    """One row tile too wide for registers: a sweep for mean(g·n), then one for dh and the dw share.

    The dw share accumulates in this program's own row of the zero-initialised partial buffer: no other
    program touches that row, and the threads that load a column block are the ones that store it.
    """
    round_ty: tl.constexpr = h_row.dtype.element_ty
    dot = tl.zeros([ROWS, 1], dtype=COMPUTE)
    start = 0
    while start < num_cols:
        mask = row_mask & (start + cols < num_cols)
        h = tl.load(h_row + start + cols, mask=mask, other=0.0).to(COMPUTE)
        dy = tl.load(dy_row + start + cols, mask=mask, other=0.0).to(COMPUTE)
        w = tl.load(w_ptr + start + cols, mask=start + cols < num_cols, other=0.0).to(COMPUTE)
        dot += tl.sum(dy * w * h * rstd, axis=1, keep_dims=True)
        start += BLOCK_E
    mean_dot = dot / num_cols
    start = 0
    while start < num_cols:
        col_mask = start + cols < num_cols
        mask = row_mask & col_mask
        h = tl.load(h_row + start + cols, mask=mask, other=0.0).to(COMPUTE)
        dy = tl.load(dy_row + start + cols, mask=mask, other=0.0).to(COMPUTE)
        w = tl.load(w_ptr + start + cols, mask=col_mask, other=0.0).to(COMPUTE)
        normed = h * rstd
        dh = (dy * w - normed * mean_dot) * rstd
        if HAS_DRES:
            dh += tl.load(dres_row + start + cols, mask=mask, other=0.0).to(COMPUTE)
        tl.store(dh_row + start + cols, dh, mask=mask)
        dw = tl.load(dw_row + start + cols, mask=col_mask, other=0.0)
        dw += tl.sum(dy * normed.to(round_ty).to(COMPUTE), axis=0, keep_dims=True)
        tl.store(dw_row + start + cols, dw, mask=col_mask)
        start += BLOCK_E


@dataclass(frozen=True)
class LaunchConfig:
    block_e: int
    rows: int
    num_warps: int
    single_pass: bool
    # Backward only: persistent programs per SM (each holds a [BLOCK_E] fp32 dweight accumulator).
    programs_per_sm: int = 2


def launch_config(num_cols: int, backward: bool = False) -> LaunchConfig:
    """Tile shape, warps and backward grid for a row width, from a sweep on an H100 at N = 16384 rows.

    Forward at E = 8192, bf16: 16 warps, one row a program ~2950 GB/s (4 or 8 warps within 1%, 32 warps -5%).
    Backward: one persistent program per SM at E = 8192 (~2500 GB/s; two per SM -3%), two at E = 4096
    (one per SM leaves the SMs half idle: -25%).
    """
    block_e = triton.next_power_of_2(num_cols)
    if block_e > (_MAX_FUSED_BLOCK_E_BWD if backward else _MAX_FUSED_BLOCK_E):
        return LaunchConfig(block_e=_LOOP_BLOCK_E, rows=1, num_warps=8, single_pass=False)
    # Narrow rows are batched so a program still moves ~4k elements: a launch of many tiny programs is
    # bound by scheduling, not by memory.
    rows = max(1, min(16, 4096 // block_e))
    num_warps = max(4, min(16, block_e * rows // 512))
    programs_per_sm = 1 if block_e >= 8192 else 2
    return LaunchConfig(block_e, rows, num_warps, single_pass=True, programs_per_sm=programs_per_sm)


def _num_bwd_programs(num_tiles: int, cfg: LaunchConfig, device: torch.device) -> int:
    if device.type == "cuda":
        sm_count = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(num_tiles, cfg.programs_per_sm * sm_count))
    # The interpreter runs programs one after another; a few suffice to exercise the partial reduction.
    return max(1, min(num_tiles, 4))


def _compute_dtype(dtype: torch.dtype) -> tl.dtype:
    # fp64 stays fp64 so that torch.autograd.gradcheck can check the kernels against finite differences.
    return tl.float64 if dtype == torch.float64 else tl.float32


def _rows(t: torch.Tensor, num_cols: int) -> torch.Tensor:
    """`t` as [N, E] with unit column stride (a view whenever the layout allows)."""
    t_NE = t.reshape(-1, num_cols)
    return t_NE if t_NE.stride(-1) == 1 else t_NE.contiguous()


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"rmsnorm weight has shape {tuple(weight.shape)}; it must be [{x.shape[-1]}], the last dim of x"
        )


def _forward(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (y [N, E], h [N, E] (x itself without a residual), rstd [N])."""
    num_cols = x.shape[-1]
    x_NE = _rows(x, num_cols)
    res_NE = _rows(residual, num_cols) if residual is not None else x_NE
    if residual is not None:
        h_NE = torch.empty(x_NE.shape, dtype=torch.promote_types(x.dtype, residual.dtype), device=x.device)
    else:
        h_NE = x_NE
    y_NE = torch.empty(x_NE.shape, dtype=torch.promote_types(h_NE.dtype, weight.dtype), device=x.device)
    num_rows = x_NE.shape[0]
    rstd_N = torch.empty(
        num_rows, dtype=torch.float64 if h_NE.dtype == torch.float64 else torch.float32, device=x.device
    )
    if num_rows == 0:
        return y_NE, h_NE, rstd_N
    cfg = launch_config(num_cols)
    _rmsnorm_fwd_kernel[(triton.cdiv(num_rows, cfg.rows),)](
        x_NE,
        res_NE,
        h_NE,
        weight.contiguous(),
        y_NE,
        rstd_N,
        num_rows,
        num_cols,
        x_NE.stride(0),
        res_NE.stride(0),
        h_NE.stride(0),
        y_NE.stride(0),
        eps,
        HAS_RESIDUAL=residual is not None,
        ROWS=cfg.rows,
        BLOCK_E=cfg.block_e,
        SINGLE_PASS=cfg.single_pass,
        COMPUTE=_compute_dtype(h_NE.dtype),
        num_warps=cfg.num_warps,
    )
    return y_NE, h_NE, rstd_N


def _backward(
    dy: torch.Tensor,
    dres: torch.Tensor | None,
    h_NE: torch.Tensor,
    weight: torch.Tensor,
    rstd_N: torch.Tensor,
    needs_dweight: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns (dh [N, E] in h's dtype, dweight or None)."""
    num_rows, num_cols = h_NE.shape
    dy_NE = _rows(dy, num_cols)
    dres_NE = _rows(dres, num_cols) if dres is not None else dy_NE
    dh_NE = torch.empty(h_NE.shape, dtype=h_NE.dtype, device=h_NE.device)
    cfg = launch_config(num_cols, backward=True)
    num_tiles = triton.cdiv(num_rows, cfg.rows)
    num_programs = _num_bwd_programs(num_tiles, cfg, h_NE.device)
    compute = _compute_dtype(h_NE.dtype)
    acc_dtype = torch.float64 if compute == tl.float64 else torch.float32
    # Single-pass programs overwrite their whole partial row; looped ones accumulate into it.
    alloc = torch.empty if cfg.single_pass else torch.zeros
    dw_partial_PE = alloc((num_programs, num_cols), dtype=acc_dtype, device=h_NE.device)
    if num_rows > 0:
        _rmsnorm_bwd_kernel[(num_programs,)](
            dy_NE,
            dres_NE,
            h_NE,
            weight.contiguous(),
            rstd_N,
            dh_NE,
            dw_partial_PE,
            num_rows,
            num_cols,
            num_programs,
            dy_NE.stride(0),
            dres_NE.stride(0),
            h_NE.stride(0),
            dh_NE.stride(0),
            HAS_DRES=dres is not None,
            ROWS=cfg.rows,
            BLOCK_E=cfg.block_e,
            SINGLE_PASS=cfg.single_pass,
            COMPUTE=compute,
            num_warps=cfg.num_warps,
        )
    else:
        dw_partial_PE.zero_()
    dweight = dw_partial_PE.sum(0).to(weight.dtype) if needs_dweight else None
    return dh_NE, dweight


class RMSNormFunction(torch.autograd.Function):
    """y = rmsnorm(x) · weight; saves x, weight and rstd [N] (fp32) for the backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # type: ignore[override]
        _check(x, weight)
        y_NE, x_NE, rstd_N = _forward(x, None, weight, eps)
        ctx.save_for_backward(x_NE, weight, rstd_N)
        ctx.x_shape = x.shape
        return y_NE.view(*x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:  # type: ignore[override]
        x_NE, weight, rstd_N = ctx.saved_tensors
        dx_NE, dweight = _backward(dy, None, x_NE, weight, rstd_N, ctx.needs_input_grad[1])
        return dx_NE.view(ctx.x_shape), dweight, None


class RMSNormResidualFunction(torch.autograd.Function):
    """(rmsnorm(h) · weight, h) with h = x + residual, in one pass over memory.

    Saves h (not x and residual) and rstd. Backward: dh = d(new_residual) + rmsnorm's dx, which is the
    gradient of both x and residual; the kernel adds the incoming residual gradient in-register.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _check(x, weight)
        if residual.shape != x.shape:
            raise ValueError(f"rmsnorm_residual: residual {tuple(residual.shape)} != x {tuple(x.shape)}")
        y_NE, h_NE, rstd_N = _forward(x, residual, weight, eps)
        ctx.save_for_backward(h_NE, weight, rstd_N)
        ctx.shape, ctx.x_dtype, ctx.res_dtype = x.shape, x.dtype, residual.dtype
        return y_NE.view(*x.shape), h_NE.view(*x.shape)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx, dy: torch.Tensor | None, dres: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, None]:
        h_NE, weight, rstd_N = ctx.saved_tensors
        if dy is None:
            # Only the new residual was used: the norm contributes nothing.
            dh, dweight = dres.reshape(ctx.shape), None
            if ctx.needs_input_grad[2]:
                dweight = torch.zeros_like(weight)
        else:
            dh_NE, dweight = _backward(dy, dres, h_NE, weight, rstd_N, ctx.needs_input_grad[2])
            dh = dh_NE.view(ctx.shape)
        return dh.to(ctx.x_dtype), dh.to(ctx.res_dtype), dweight, None


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of `x` [..., E] with `weight` [E]; differentiable in both."""
    return RMSNormFunction.apply(x, weight, eps)


def rmsnorm_residual(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(normed, new_residual) = (rmsnorm(x + residual) · weight, x + residual), fused."""
    return RMSNormResidualFunction.apply(x, residual, weight, eps)


def rmsnorm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The op table's `triton` RMSNorm (`kernels.rmsnorm=triton`)."""
    return RMSNormFunction.apply(x, weight, eps)
