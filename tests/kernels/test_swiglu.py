"""SwiGLU kernels vs the plain-PyTorch reference (`treadle.models.ops.swiglu_torch`), forward and gradients.

On CPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1) at small shapes; on a GPU
the same tests run compiled, and the `gpu` test adds a real shape.

Tolerances. Forward: both sides round silu to the input dtype and then the product, so they differ only
where the two fp32 exp implementations do (an ulp or two): fp32 1e-5, fp16 2**-10 relative (one ulp).
Gradients: the reference rounds each intermediate (σ, silu, dy·up, ...) to the storage dtype where the
kernel stays in fp32, so a few ulps: fp16 1e-2. bf16: the interpreter converts fp32 → bf16 by
truncation, not round-to-nearest-even (Triton 3.6, `_convert_float`), so on CPU bf16 is held to two bf16
ulps per rounding (2**-5) as a layout/indexing check; the `gpu` test holds compiled bf16 to one ulp.
"""

from __future__ import annotations

import os

import pytest
import torch

from treadle.kernels import swiglu as sw
from treadle.models.ops import KernelsConfig, build_ops

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else ("cuda" if torch.cuda.is_available() else "cpu")
# dtype -> (forward tolerance, gradient tolerance), both atol and rtol
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2**-10, 1e-2),
    torch.bfloat16: (2**-5, 5e-2) if INTERPRET else (2**-7, 5e-2),
}


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol, rtol=tol)


def _check(gate_leaf: torch.Tensor, up_leaf: torch.Tensor, view=lambda g, u: (g, u), tols=None) -> None:
    """Compares outputs and the gradients of the leaves that `view` turns into (gate, up)."""
    fwd_tol, grad_tol = tols or TOLERANCES[gate_leaf.dtype]
    out = sw.swiglu(*view(gate_leaf, up_leaf))
    out_ref = sw.swiglu_reference(*view(gate_leaf, up_leaf))
    _close(out, out_ref, fwd_tol)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE, out.dtype)
    leaves = list(dict.fromkeys((gate_leaf, up_leaf)))  # one leaf when gate and up are views of one tensor
    grads = torch.autograd.grad(out, leaves, dout)
    grads_ref = torch.autograd.grad(out_ref, leaves, dout)
    for actual, expected in zip(grads, grads_ref, strict=True):
        _close(actual, expected, grad_tol)


def _leaf(shape: tuple[int, ...], dtype: torch.dtype, seed: int, scale: float = 3.0) -> torch.Tensor:
    # Scaled so that gate covers silu's curved region and both tails.
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=gen)).to(DEVICE, dtype).requires_grad_()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7,), (4, 33), (2, 3, 1000), (2, 4097)])
def test_matches_reference(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """Sizes off the block size (masking); 2×4097 spans several blocks with a ragged tail."""
    _check(_leaf(shape, dtype, 0), _leaf(shape, dtype, 1))


def test_non_contiguous_inputs() -> None:
    """Halves of a fused gate/up projection (row-strided, read in place), a transpose (copied), and an
    expanded output gradient."""
    fused = _leaf((3, 5, 2 * 40), torch.float32, 0)
    _check(fused, fused, view=lambda g, u: (g[..., :40], u[..., 40:]))
    gate_t, up = _leaf((33, 6), torch.float32, 1), _leaf((6, 33), torch.float32, 2)
    _check(gate_t, up, view=lambda g, u: (g.t(), u))
    out, out_ref = sw.swiglu(gate_t.t(), up), sw.swiglu_reference(gate_t.t(), up)
    grads = torch.autograd.grad(out.sum(), (gate_t, up))
    grads_ref = torch.autograd.grad(out_ref.sum(), (gate_t, up))
    for actual, expected in zip(grads, grads_ref, strict=True):
        _close(actual, expected, TOLERANCES[torch.float32][1])


def test_mixed_dtypes() -> None:
    """Output dtype follows torch's promotion; each gradient keeps its input's dtype."""
    gate, up = _leaf((4, 33), torch.float16, 0), _leaf((4, 33), torch.float32, 1)
    assert sw.swiglu(gate, up).dtype == torch.float32
    _check(gate, up, tols=TOLERANCES[torch.float16])


def test_saves_only_the_inputs() -> None:
    """silu is recomputed in the backward: autograd keeps gate and up and nothing else."""
    gate, up = _leaf((4, 33), torch.float32, 0), _leaf((4, 33), torch.float32, 1)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sw.swiglu(gate, up)
    assert len(saved) == 2 and saved[0] is gate and saved[1] is up


def test_gradcheck_fp64() -> None:
    """Against finite differences: fp64 inputs keep the kernels' math in fp64."""
    gate, up = _leaf((3, 7), torch.float64, 0, scale=2.0), _leaf((3, 7), torch.float64, 1, scale=1.0)
    assert torch.autograd.gradcheck(sw.swiglu, (gate, up), fast_mode=True)


def test_empty_shape_error_and_op_table() -> None:
    gate, up = _leaf((0, 8), torch.float32, 0), _leaf((0, 8), torch.float32, 1)
    assert sw.swiglu(gate, up).shape == (0, 8)
    with pytest.raises(ValueError, match="one shape"):
        sw.swiglu(gate, up[:, :4])
    assert build_ops(KernelsConfig(swiglu="triton")).swiglu is sw.swiglu_op


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs a CUDA device")
def test_gpu_bf16_llama_shape() -> None:
    """Compiled bf16 (round-to-nearest-even, unlike the interpreter) at Llama-8B's MLP width."""
    _check(_leaf((2048, 14336), torch.bfloat16, 0), _leaf((2048, 14336), torch.bfloat16, 1))
