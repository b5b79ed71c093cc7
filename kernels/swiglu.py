"""SwiGLU's gating (Shazeer 2020, "GLU Variants Improve Transformer") in Triton: silu(gate) · up.

Shape legend: N rows (all leading dims flattened: tokens), F MLP hidden width.

Semantics are `treadle.kernels.reference.swiglu_torch`: torch computes silu in fp32 and rounds it to gate's dtype
before the product, so the kernel rounds there too and the forward matches to the last bit except where the
two exp implementations differ in fp32. With σ = sigmoid(gate):
    d gate = dy · up · σ · (1 + gate · (1 − σ))          d up = dy · round(gate · σ)
The backward recomputes σ from the saved inputs: nothing but gate and up is kept between passes.

Contiguous inputs (the usual case: two separate projections) are streamed as one flat array; otherwise
(e.g. the halves of a fused gate/up projection) as rows with their own strides, so no copy is made.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from treadle.kernels.reference import swiglu_torch

__all__ = ["SwiGLUFunction", "swiglu", "swiglu_op", "swiglu_reference"]

# The op table's torch implementation is the reference: one definition of the op for both backends.
swiglu_reference = swiglu_torch

# Elements per program. An H100 sweep at 16384 × 14336 bf16 found every block of 1024 to 8192 elements and
# 4 to 16 warps within 1% (~3000 GB/s forward and backward): the op is bound by HBM, not by the tiling.
_BLOCK = 4096
_NUM_WARPS = 16


@triton.jit
def _offsets(num_cols, stride, BLOCK: tl.constexpr):
    """This program's [BLOCK] offsets into a [rows, num_cols] view with row stride `stride`, and the mask."""
    pid = tl.program_id(0).to(tl.int64)  # N·F passes 2**31 at Llama-70B sizes
    blocks_per_row = tl.cdiv(num_cols, BLOCK)
    row, col_block = pid // blocks_per_row, pid % blocks_per_row
    cols = col_block * BLOCK + tl.arange(0, BLOCK)
    return row * stride + cols, cols < num_cols


@triton.jit
def _swiglu_fwd_kernel(gate_ptr, up_ptr, out_ptr, num_cols, stride_gate, stride_up, stride_out, BLOCK: tl.constexpr, COMPUTE: tl.constexpr):  # fmt: skip
    gate_offs, mask = _offsets(num_cols, stride_gate, BLOCK)
    up_offs, _ = _offsets(num_cols, stride_up, BLOCK)
    out_offs, _ = _offsets(num_cols, stride_out, BLOCK)
    gate = tl.load(gate_ptr + gate_offs, mask=mask, other=0.0).to(COMPUTE)
    up = tl.load(up_ptr + up_offs, mask=mask, other=0.0).to(COMPUTE)
    silu = (gate / (1.0 + tl.exp(-gate))).to(gate_ptr.dtype.element_ty).to(COMPUTE)
    tl.store(out_ptr + out_offs, silu * up, mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    dout_ptr,
    gate_ptr,
    up_ptr,
    dgate_ptr,
    dup_ptr,
    num_cols,
    stride_dout,
    stride_gate,
    stride_up,
    stride_dgate,
    stride_dup,
    BLOCK: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    gate_offs, mask = _offsets(num_cols, stride_gate, BLOCK)
    up_offs, _ = _offsets(num_cols, stride_up, BLOCK)
    dout_offs, _ = _offsets(num_cols, stride_dout, BLOCK)
    dgate_offs, _ = _offsets(num_cols, stride_dgate, BLOCK)
    dup_offs, _ = _offsets(num_cols, stride_dup, BLOCK)
    dout = tl.load(dout_ptr + dout_offs, mask=mask, other=0.0).to(COMPUTE)
    gate = tl.load(gate_ptr + gate_offs, mask=mask, other=0.0).to(COMPUTE)
    up = tl.load(up_ptr + up_offs, mask=mask, other=0.0).to(COMPUTE)
    sig = 1.0 / (1.0 + tl.exp(-gate))
    silu = (gate * sig).to(gate_ptr.dtype.element_ty).to(COMPUTE)
    tl.store(dgate_ptr + dgate_offs, dout * up * sig * (1.0 + gate * (1.0 - sig)), mask=mask)
    tl.store(dup_ptr + dup_offs, dout * silu, mask=mask)


def _as_rows(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], int, int]:
    """Views of same-shaped tensors as [rows, cols] with unit column stride, plus (rows, cols).

    All contiguous: one flat row, so no block straddles a row end. Otherwise rows of the last dim, each
    tensor with its own row stride (copied only if its last dim itself is strided).
    """
    if all(t.is_contiguous() for t in tensors):
        numel = tensors[0].numel()
        return [t.view(1, numel) for t in tensors], 1, numel
    num_cols = tensors[0].shape[-1]
    views = [t.reshape(-1, num_cols) for t in tensors]
    views = [v if v.stride(-1) == 1 else v.contiguous() for v in views]
    return views, views[0].shape[0], num_cols


def _compute_dtype(*tensors: torch.Tensor) -> tl.dtype:
    # fp64 stays fp64 so that torch.autograd.gradcheck can check the kernels against finite differences.
    return tl.float64 if all(t.dtype == torch.float64 for t in tensors) else tl.float32


def _forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    out = torch.empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
    if out.numel() == 0:
        return out
    (gate_2d, up_2d, out_2d), num_rows, num_cols = _as_rows([gate, up, out])
    _swiglu_fwd_kernel[(num_rows * triton.cdiv(num_cols, _BLOCK),)](
        gate_2d,
        up_2d,
        out_2d,
        num_cols,
        gate_2d.stride(0),
        up_2d.stride(0),
        out_2d.stride(0),
        BLOCK=_BLOCK,
        COMPUTE=_compute_dtype(gate, up),
        num_warps=_NUM_WARPS,
    )
    return out


def _backward(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    dup = torch.empty(up.shape, dtype=up.dtype, device=up.device)
    if gate.numel() == 0:
        return dgate, dup
    views, num_rows, num_cols = _as_rows([dout, gate, up, dgate, dup])
    _swiglu_bwd_kernel[(num_rows * triton.cdiv(num_cols, _BLOCK),)](
        *views,
        num_cols,
        *(v.stride(0) for v in views),
        BLOCK=_BLOCK,
        COMPUTE=_compute_dtype(gate, up),
        num_warps=_NUM_WARPS,
    )
    return dgate, dup


class SwiGLUFunction(torch.autograd.Function):
    """silu(gate) · up; saves gate and up only (silu is recomputed in the backward)."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if gate.shape != up.shape:
            raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have one shape")
        ctx.save_for_backward(gate, up)
        return _forward(gate, up)

    @staticmethod
    def backward(ctx, dout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        gate, up = ctx.saved_tensors
        return _backward(dout, gate, up)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up for same-shaped gate and up of any strides; differentiable in both."""
    return SwiGLUFunction.apply(gate, up)


def swiglu_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The op table's `triton` SwiGLU (`kernels.swiglu=triton`)."""
    return SwiGLUFunction.apply(gate, up)
