"""The routed experts' computation in plain PyTorch: grouped GEMMs (`torch._grouped_mm`) and the per-expert loop
they are tested against. These are the op table's `moe` implementations `torch` and `loop` (models/ops.py); the
fused Triton kernels (`kernels.moe=triton`) plug in beside them with the same signature:

    moe(x_ME, gate_LFE, up_LFE, down_LEF, counts_L, *, swiglu) -> [M, E]

Shape legend: M rows sorted by expert, E model dim, F expert width, L experts held here. counts_L[i] rows (in
order) belong to expert i; they sum to M. Each expert is SwiGLU: down(swiglu(gate(x), up(x))), with weights laid
out as `nn.Linear` weights (out features, in features).

`torch._grouped_mm` runs on CPU (a reference implementation) and on Hopper/Blackwell GPUs (CUTLASS); it needs
16-byte aligned strides, so the dims must be multiples of 8 elements in bf16 (4 in fp32) — the family's checks
say so at start.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: `torch._grouped_mm`'s built-in backward
    fails on gradients with zero strides (an expanded `sum()` gradient), so its output passes through this."""

    @staticmethod
    def forward(ctx, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad.contiguous()


def grouped_mm(x_MI: torch.Tensor, w_LIO: torch.Tensor, offsets_L: torch.Tensor) -> torch.Tensor:
    """y_MO = x_MI @ w_LIO per group of rows (`offsets_L`, cumulative row counts), with torch's own backward
    (two more grouped GEMMs, dW written in the weight's layout)."""
    return _ContiguousGrad.apply(torch._grouped_mm(x_MI, w_LIO, offs=offsets_L))


def moe_experts_torch(
    x_ME: torch.Tensor,
    gate_LFE: torch.Tensor,
    up_LFE: torch.Tensor,
    down_LEF: torch.Tensor,
    counts_L: torch.Tensor,
    *,
    swiglu: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Three grouped GEMMs over the experts' row groups; the offsets stay on the device (no host sync)."""
    offsets_L = torch.cumsum(counts_L, dim=0, dtype=torch.int32)
    dtype = x_ME.dtype
    gate_MF = grouped_mm(x_ME, gate_LFE.to(dtype).transpose(-2, -1), offsets_L)
    up_MF = grouped_mm(x_ME, up_LFE.to(dtype).transpose(-2, -1), offsets_L)
    return grouped_mm(swiglu(gate_MF, up_MF), down_LEF.to(dtype).transpose(-2, -1), offsets_L)


def moe_experts_loop(
    x_ME: torch.Tensor,
    gate_LFE: torch.Tensor,
    up_LFE: torch.Tensor,
    down_LEF: torch.Tensor,
    counts_L: torch.Tensor,
    *,
    swiglu: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """The reference: each expert's rows through its three linears, one expert at a time (reads the counts on
    the host)."""
    outputs, start = [], 0
    dtype = x_ME.dtype
    for i, count in enumerate(counts_L.tolist()):
        rows = x_ME[start : start + count]
        hidden = swiglu(rows @ gate_LFE[i].to(dtype).t(), rows @ up_LFE[i].to(dtype).t())
        outputs.append(hidden @ down_LEF[i].to(dtype).t())
        start += count
    return torch.cat(outputs) if outputs else x_ME.new_zeros(x_ME.shape)


# The loop needs the counts on the host, so a layer using it does not trace as one graph.
moe_experts_loop.reads_counts_on_host = True  # type: ignore[attr-defined]
