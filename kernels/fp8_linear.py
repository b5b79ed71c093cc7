"""The FP8 linear layer in plain PyTorch: dynamic scaling, the reference casts, the scaled (or emulated)
matmul and the autograd Function. On CUDA in eager mode the casts run the Triton kernels of
`kernels/fp8_cast.py`, imported at the first such cast: this module imports no Triton, so configs and CPU runs
that only build FP8 layers need none (`pip install "treadle[kernels]"` adds it).

Shape legend: R rows of the scaled view, C its columns (each row has its own scale when rowwise), M tokens,
K input features, N output features.

Dynamic scaling (Micikevicius et al. 2022, "FP8 Formats for Deep Learning", §4.3; the "dynamic" recipe of
torchao's float8): each cast measures amax = max |x| over the tensor (tensorwise) or over each row
(rowwise), maps it to the format's largest finite value with scale = fp8_max / amax, and stores
round(clamp(x · scale)) together with the dequantisation factor 1 / scale. `torch._scaled_mm` takes those
factors directly: out = (a_fp8 · sa) @ (b_fp8 · sb), accumulated in fp32.

`Float8MatmulFunction` is y = x Wᵀ with all three GEMMs in FP8 (forward, grad input, grad weight):
forward operands in E4M3 (more mantissa), gradients in E5M2 with tensorwise scaling (more range; the
"hybrid" format of the FP8 paper §3) and in E4M3 with rowwise scaling, where per-row scales already cover
the range and `_scaled_mm`'s rowwise kernels take E4M3 only. It saves x and W in their own precision and
casts them again in backward: the saved x is the one the other projections of the same input share
(q/k/v, gate/up), and W is FSDP2's unsharded parameter, whose storage FSDP frees and re-gathers.
Where `_scaled_mm` cannot run (no CUDA, compute capability < 8.9, dims not multiples of 16) the GEMM is
emulated: the FP8 operands are dequantised and multiplied in fp32, so the numerics are those of the FP8
path up to fp32 summation order, with no speedup.
"""

from __future__ import annotations

import os

import torch
import torch.distributed._functional_collectives as funcol
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor

__all__ = [
    "AMAX_EPS",
    "E4M3",
    "E5M2",
    "RECIPES",
    "Float8MatmulFunction",
    "Float8MatmulGraphFunction",
    "cast_to_fp8",
    "cast_to_fp8_reference",
    "fp8_linear_reference",
    "fp8_matmul_supported",
    "scale_from_amax",
    "scaled_mm",
]

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
# Floor of amax: an all-zero tensor gets a finite scale (torchao uses the same 1e-12).
AMAX_EPS = 1e-12
RECIPES = ("tensorwise", "rowwise")


def fp8_max(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).max


def scale_from_amax(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 scale that maps amax to the format's largest finite value."""
    return fp8_max(dtype) / amax.float().clamp(min=AMAX_EPS)


def _reduce_amax(amax: torch.Tensor, group) -> torch.Tensor:
    """The max over a tensor-parallel group of each rank's amax: a sharded operand is scaled as the whole
    tensor would be, so tensor parallelism casts to the same FP8 values as one device."""
    if group is None:
        return amax
    return funcol.wait_tensor(funcol.all_reduce(amax.contiguous(), "max", group))


def cast_to_fp8_reference(
    x: torch.Tensor, dtype: torch.dtype, rowwise: bool, amax_group=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch: (x_fp8 [R, C], dequantisation factor: [] tensorwise or [R, 1] rowwise, fp32).
    `amax_group`: the amax is the max over that process group's ranks (see `_reduce_amax`)."""
    x32 = x.float()
    amax = x32.abs().amax(dim=-1, keepdim=True) if rowwise else x32.abs().amax()
    amax = _reduce_amax(amax, amax_group)
    scale = scale_from_amax(amax, dtype)
    limit = fp8_max(dtype)
    return (x32 * scale).clamp(-limit, limit).to(dtype), scale.reciprocal()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _traced(x: torch.Tensor) -> bool:
    """Whether `x` flows through a compiler's trace rather than eager execution: Dynamo's, or AOTAutograd's
    tracing of a Function kept whole in the graph (`Float8MatmulGraphFunction`), whose fake tensors
    `torch.compiler.is_compiling()` does not flag on every supported torch version."""
    return torch.compiler.is_compiling() or isinstance(x, (FakeTensor, FunctionalTensor))


def cast_to_fp8(
    x: torch.Tensor, dtype: torch.dtype, rowwise: bool, amax_group=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton cast on CUDA in eager mode; the reference elsewhere. Under torch.compile the reference is
    what Inductor sees and fuses into its own amax and cast kernels, where a Triton launch would be opaque."""
    if x.is_cuda and not _traced(x):
        from treadle.kernels.fp8_cast import cast_to_fp8_triton

        return cast_to_fp8_triton(x, dtype, rowwise, amax_group)
    return cast_to_fp8_reference(x, dtype, rowwise, amax_group)


def fp8_matmul_supported(device: torch.device) -> bool:
    """`torch._scaled_mm` needs FP8 tensor cores: compute capability 8.9 (Ada) or 9.0+ (Hopper)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def scaled_mm(
    a_MK: torch.Tensor,
    b_KN: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    out_dtype: torch.dtype,
    *,
    emulate: bool,
    fast_accum: bool = False,
) -> torch.Tensor:
    """(a · scale_a) @ (b · scale_b): `torch._scaled_mm` (a row-major, b column-major) or its emulation.

    Rowwise scales are [M, 1] and [1, N]. The emulation dequantises to fp32 and multiplies there; it is
    also taken on a GPU when a dim is not a multiple of 16, which `_scaled_mm` requires. Callers decide
    `emulate` for GPUs without FP8 tensor cores (`fp8_matmul_supported`).
    """
    # Static properties only (no device query): under torch.compile this branch is decided at trace time.
    aligned = all(d % 16 == 0 for d in (*a_MK.shape, b_KN.shape[1]))
    if emulate or not aligned or not a_MK.is_cuda:
        out = (a_MK.float() * scale_a) @ (b_KN.float() * scale_b)
        return out.to(out_dtype)
    rowwise = scale_a.numel() > 1 or scale_b.numel() > 1
    # Rowwise kernels write bf16 only.
    mm_dtype = torch.bfloat16 if rowwise else out_dtype
    out = torch._scaled_mm(
        a_MK.contiguous(),
        b_KN.t().contiguous().t(),
        scale_a=scale_a.reshape(-1, 1) if rowwise else scale_a,
        scale_b=scale_b.reshape(1, -1) if rowwise else scale_b,
        out_dtype=mm_dtype,
        use_fast_accum=fast_accum,
    )
    return out.to(out_dtype)


def _grad_dtype(rowwise: bool) -> torch.dtype:
    return E4M3 if rowwise else E5M2


class _AmaxGroups:
    """Which casts of a tensor-parallel FP8 linear take their amax over the TP group (`tp_group`).

    The weight is column-parallel (`Shard(0)`: each rank holds output rows, x is replicated, y and dy are
    sharded on N) or row-parallel (`Shard(1)`: x and W are sharded on K, y is a partial sum, dy is
    replicated). Tensorwise, every sharded operand needs the group's amax; rowwise (one scale per row along
    the GEMM's contraction dim), only the operands whose contraction dim is the sharded one: column-parallel
    grad input (contracts N), row-parallel forward (contracts K). Replicated operands are the same on every
    rank and need nothing.
    """

    def __init__(self, rowwise: bool, tp_group, tp_split: str | None):
        col, row = tp_split == "colwise", tp_split == "rowwise"
        group = tp_group if tp_split else None
        self.dy = group if col else None  # sharded on N (tensorwise); contracting N (rowwise, grad input)
        self.x = group if row else None  # sharded on K; contracting K (rowwise, forward)
        # Tensorwise, W and its transpose are one cast of a sharded tensor; rowwise, W's forward cast
        # contracts K like x's and its transposed cast contracts N like dy's.
        self.w = self.x if rowwise else group
        self.wt = self.dy if rowwise else group


class Float8MatmulFunction(torch.autograd.Function):
    """y [..., N] = x [..., K] @ weight [N, K]ᵀ with FP8 operands in all three GEMMs (see module doc).

    Scales always run along each GEMM's contraction dim: forward x per token and W per output row over K;
    grad input dy per token over N and W per input column over N; grad weight dy and x per feature over M.
    Tensorwise the transposed operands are transposes of one cast (a per-tensor scale has no direction).

    Under tensor parallelism x and weight are this rank's local tensors, `tp_split` says how the weight is
    sharded (colwise | rowwise) and `tp_group` is the TP process group: the casts of sharded operands take
    their amax over the group (`_AmaxGroups`: one small all-reduce of a scalar, or of one value per row,
    per cast), so every rank quantises with the scales one device would use.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor,
        recipe: str,
        emulate: bool,
        tp_group=None,
        tp_split: str | None = None,
    ) -> torch.Tensor:
        rowwise = recipe == "rowwise"
        groups = _AmaxGroups(rowwise, tp_group, tp_split)
        x_MK = x.reshape(-1, x.shape[-1])
        x_q, x_s = cast_to_fp8(x_MK, E4M3, rowwise, groups.x)
        w_q, w_s = cast_to_fp8(weight, E4M3, rowwise, groups.w)
        y_MN = scaled_mm(x_q, w_q.t(), x_s, w_s.t(), x.dtype, emulate=emulate, fast_accum=True)
        ctx.save_for_backward(x, weight)
        ctx.recipe, ctx.emulate, ctx.groups = recipe, emulate, groups
        return y_MN.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        rowwise, emulate, groups = ctx.recipe == "rowwise", ctx.emulate, ctx.groups
        x_MK, dy_MN = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
        grad = _grad_dtype(rowwise)
        if rowwise:
            dy_q, dy_s = cast_to_fp8(dy_MN, grad, True, groups.dy)
            dyt_q, dyt_s = cast_to_fp8(dy_MN.t().contiguous(), grad, True)
            wt_q, wt_s = cast_to_fp8(weight.t().contiguous(), E4M3, True, groups.wt)
            xt_q, xt_s = cast_to_fp8(x_MK.t().contiguous(), E4M3, True)
        else:
            dy_q, dy_s = cast_to_fp8(dy_MN, grad, False, groups.dy)
            dyt_q, dyt_s = dy_q.t().contiguous(), dy_s
            w_q, wt_s = cast_to_fp8(weight, E4M3, False, groups.w)
            wt_q = w_q.t().contiguous()
            x_q, xt_s = cast_to_fp8(x_MK, E4M3, False, groups.x)
            xt_q = x_q.t().contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            # [M, N] @ [N, K]: b = W, column-major, as the transpose of the [K, N] row-major cast.
            dx = scaled_mm(
                dy_q, wt_q.t(), dy_s, wt_s.reshape(1, -1) if rowwise else wt_s, x.dtype, emulate=emulate
            )
            dx = dx.view(x.shape)
        if ctx.needs_input_grad[1]:
            # [N, M] @ [M, K]: b = x, column-major, as the transpose of the [K, M] row-major cast.
            dw = scaled_mm(
                dyt_q,
                xt_q.t(),
                dyt_s,
                xt_s.reshape(1, -1) if rowwise else xt_s,
                weight.dtype,
                emulate=emulate,
            )
        return dx, dw, None, None, None, None


@torch._dynamo.allow_in_graph
class Float8MatmulGraphFunction(Float8MatmulFunction):
    """`Float8MatmulFunction` kept whole in a compiled graph (without tensor parallelism).

    Dynamo otherwise traces an autograd Function into a higher-order op whose forward graph keeps what
    `ctx.save_for_backward` names, outside the reach of the activation-checkpoint tags of the region around
    it: under compiled full activation checkpointing the FP8 linears' inputs stayed saved for every block
    (+7.2 GiB at 3B, micro-batch 4, H100). Kept whole, AOTAutograd traces its ops like any others in the
    region, and they are recomputed. The tensor-parallel path passes a process group, which this form cannot
    take as a graph input, and keeps the traced form.
    """


def _qdq(x: torch.Tensor, dtype: torch.dtype, rowwise: bool) -> torch.Tensor:
    q, inv = cast_to_fp8_reference(x, dtype, rowwise)
    return q.float() * inv


def fp8_linear_reference(
    x: torch.Tensor, weight: torch.Tensor, dy: torch.Tensor, recipe: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The FP8 linear's math written out (y, dx, dW), no autograd: every GEMM operand quantised and
    dequantised along its contraction dim, products in fp32."""
    rowwise = recipe == "rowwise"
    grad = _grad_dtype(rowwise)
    x_MK, dy_MN = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    y = _qdq(x_MK, E4M3, rowwise) @ _qdq(weight, E4M3, rowwise).t()
    dx = _qdq(dy_MN, grad, rowwise) @ _qdq(weight.t(), E4M3, rowwise).t()
    dw = _qdq(dy_MN.t(), grad, rowwise) @ _qdq(x_MK.t(), E4M3, rowwise).t()
    return (
        y.to(x.dtype).view(*x.shape[:-1], -1),
        dx.to(x.dtype).view(x.shape),
        dw.to(weight.dtype),
    )
