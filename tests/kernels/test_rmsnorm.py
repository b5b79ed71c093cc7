"""RMSNorm kernels vs the plain-PyTorch reference (`treadle.models.ops.rmsnorm_torch`), forward and gradients.

On CPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1) at small shapes; on a GPU
the same tests run compiled, and the `gpu` tests add real shapes.

Tolerances. The kernel and the reference differ only in how the fp32 sum of squares is ordered and in
rsqrt, a few fp32 ulps, so the forward is bit-equal except where that moves a rounding to the storage
dtype by one ulp: fp32 1e-5, fp16 2**-10 (one ulp). Gradients: the reference rounds dy·w (and each dy·n
of the dweight sum) to the storage dtype where the kernel stays in fp32, so a few ulps: fp16 1e-2.
bf16 forward, 2**-6 (atol and rtol) on CPU and GPU: normed is rounded to bf16 *before* the weight multiply
(`normed.to(x.dtype) * weight`), and where the few fp32 ulps between the kernel's and the reference's normed
straddle a bf16 rounding boundary (compiled), or where the interpreter truncates instead of rounding to
nearest even (Triton 3.6, `_convert_float`), normed is one bf16 step (<= 2**-7 relative) off. The multiply
by w carries that step into y, and y's own rounding can add one more step of y: up to 2 · 2**-7 relative
(the second step exceeds 2**-7 · (1 + |y|) where w > 1 keeps y in normed's binade). 2**-7 rejected one
element of 41M at width 20000 on an H200;
`test_bf16_tolerance_covers_one_step_of_normed` checks the bound over every bf16 normed in (-8, 8).
"""

from __future__ import annotations

import os

import pytest
import torch

from treadle.kernels import rmsnorm as rms
from treadle.models.ops import KernelsConfig, build_ops

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else ("cuda" if torch.cuda.is_available() else "cpu")
EPS = 1e-5

# dtype -> (forward atol/rtol, gradient atol/rtol)
TOLERANCES = {
    torch.float32: (1e-5, 1e-4),
    torch.float16: (2**-10, 1e-2),
    torch.bfloat16: (2**-6, 5e-2),
}


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol, rtol=tol)


def _inputs(shape: tuple[int, ...], dtype: torch.dtype, w_dtype: torch.dtype | None = None, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(DEVICE, dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(shape[-1], generator=gen)).to(DEVICE, w_dtype or dtype).requires_grad_()
    dy = torch.randn(shape, generator=gen).to(DEVICE)
    return x, w, dy


def _check_against_reference(
    x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor, fwd_tol: float, grad_tol: float
):
    y = rms.rmsnorm(x, w, EPS)
    y_ref = rms.rmsnorm_reference(x, w, EPS)
    _close(y, y_ref, fwd_tol)
    grads = torch.autograd.grad(y, (x, w), dy.to(y.dtype))
    grads_ref = torch.autograd.grad(y_ref, (x, w), dy.to(y.dtype))
    # dweight sums over all rows, so its tolerance scales with the row count.
    _close(grads[0], grads_ref[0], grad_tol)
    _close(grads[1], grads_ref[1], grad_tol * max(1, x.numel() // x.shape[-1]) ** 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 8), (4, 33), (2, 3, 1000), (200, 33)])
def test_matches_reference(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """Widths off the power-of-two block (masking), one row, and 200 narrow rows (several rows per
    program, a partial last tile, several tiles per backward program)."""
    x, w, dy = _inputs(shape, dtype)
    _check_against_reference(x, w, dy, *TOLERANCES[dtype])


@pytest.mark.parametrize(
    ("x_dtype", "w_dtype"), [(torch.float16, torch.float32), (torch.float32, torch.bfloat16)]
)
def test_weight_dtype_differs(x_dtype: torch.dtype, w_dtype: torch.dtype) -> None:
    """Output dtype follows torch's promotion of `normed.to(x.dtype) * weight`; dweight keeps w's dtype."""
    x, w, dy = _inputs((3, 40), x_dtype, w_dtype)
    assert rms.rmsnorm(x, w, EPS).dtype == torch.promote_types(x_dtype, w_dtype)
    tol = max(TOLERANCES[x_dtype][0], TOLERANCES[w_dtype][0])
    _check_against_reference(x, w, dy, tol, max(TOLERANCES[x_dtype][1], TOLERANCES[w_dtype][1]))


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("fwd_max", [64, 128])
def test_wide_rows_loop_over_column_blocks(
    monkeypatch: pytest.MonkeyPatch, fwd_max: int, residual: bool
) -> None:
    """Rows wider than the fused block take the two-sweep path (forced here: width 100, fused limit 64,
    column block 32); with a forward limit of 128 only the backward loops, as at E = 16384 on a GPU."""
    monkeypatch.setattr(rms, "_MAX_FUSED_BLOCK_E", fwd_max)
    monkeypatch.setattr(rms, "_MAX_FUSED_BLOCK_E_BWD", 64)
    monkeypatch.setattr(rms, "_LOOP_BLOCK_E", 32)
    assert rms.launch_config(100).single_pass == (fwd_max > 100)
    assert not rms.launch_config(100, backward=True).single_pass
    x, w, dy = _inputs((6, 100), torch.float32)
    if not residual:
        _check_against_reference(x, w, dy, *TOLERANCES[torch.float32])
        return
    r = torch.randn_like(x).requires_grad_()
    _check_residual(x, r, w, dy, torch.randn_like(dy), *TOLERANCES[torch.float32])


def _check_residual(
    x, r, w, dy, dres, fwd_tol: float, grad_tol: float, use: tuple[bool, bool] = (True, True)
):
    out = rms.rmsnorm_residual(x, r, w, EPS)
    out_ref = rms.rmsnorm_residual_reference(x, r, w, EPS)
    for actual, expected in zip(out, out_ref, strict=True):
        _close(actual, expected, fwd_tol)
    # Only the outputs in `use` reach the loss, so autograd passes None for the others.
    outputs = [o for o, u in zip(out, use, strict=True) if u]
    outputs_ref = [o for o, u in zip(out_ref, use, strict=True) if u]
    cotangents = [c.to(out[0].dtype) for c, u in zip((dy, dres), use, strict=True) if u]
    grads = torch.autograd.grad(outputs, (x, r, w), cotangents, allow_unused=True)
    grads_ref = torch.autograd.grad(outputs_ref, (x, r, w), cotangents, allow_unused=True)
    rows = x.numel() // x.shape[-1]
    for actual, expected, scale in zip(grads, grads_ref, (1, 1, rows**0.5), strict=True):
        expected = torch.zeros_like(w) if expected is None else expected  # dweight when only h is used
        _close(actual, expected, grad_tol * max(1.0, scale))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("use", [(True, True), (True, False), (False, True)])
def test_residual_variant(dtype: torch.dtype, use: tuple[bool, bool]) -> None:
    """(rmsnorm(x + r), x + r) and the gradients of x, r and w, with either output unused."""
    x, w, dy = _inputs((5, 37), dtype)
    gen = torch.Generator().manual_seed(1)
    r = torch.randn(5, 37, generator=gen).to(DEVICE, dtype).requires_grad_()
    dres = torch.randn(5, 37, generator=gen).to(DEVICE)
    _check_residual(x, r, w, dy, dres, *TOLERANCES[dtype], use=use)


def test_non_contiguous_inputs() -> None:
    """A row-strided slice (read in place), a column-strided transpose (copied), an expanded gradient."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(33, generator=gen).to(DEVICE).requires_grad_()
    wide = torch.randn(6, 80, generator=gen).to(DEVICE).requires_grad_()
    transposed = torch.randn(33, 6, generator=gen).to(DEVICE).requires_grad_()
    dy = torch.randn(6, 33, generator=gen).to(DEVICE)
    fwd_tol, grad_tol = TOLERANCES[torch.float32]
    for leaf, view in ((wide, lambda t: t[:, 10:43]), (transposed, lambda t: t.t())):
        assert not view(leaf).is_contiguous()
        y, y_ref = rms.rmsnorm(view(leaf), w, EPS), rms.rmsnorm_reference(view(leaf), w, EPS)
        _close(y, y_ref, fwd_tol)
        for actual, expected in zip(
            torch.autograd.grad(y, (leaf, w), dy), torch.autograd.grad(y_ref, (leaf, w), dy), strict=True
        ):
            _close(actual, expected, grad_tol)
    # y.sum() hands the backward an expanded (stride-0) gradient.
    y, y_ref = rms.rmsnorm(wide, w[:1].expand(80), EPS), rms.rmsnorm_reference(wide, w[:1].expand(80), EPS)
    for actual, expected in zip(
        torch.autograd.grad(y.sum(), (wide, w)), torch.autograd.grad(y_ref.sum(), (wide, w)), strict=True
    ):
        _close(actual, expected, grad_tol * 80**0.5)


def test_gradcheck_fp64() -> None:
    """Against finite differences: fp64 inputs keep the kernels' math in fp64."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 9, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    r = torch.randn(3, 9, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    w = torch.randn(9, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: rms.rmsnorm(a, b, EPS), (x, w), fast_mode=True)
    assert torch.autograd.gradcheck(
        lambda a, b, c: rms.rmsnorm_residual(a, b, c, EPS), (x, r, w), fast_mode=True
    )


def test_empty_and_op_table() -> None:
    x, w, _ = _inputs((0, 16), torch.float32)
    y = rms.rmsnorm(x, w, EPS)
    assert y.shape == (0, 16)
    y.sum().backward()
    assert w.grad is not None and torch.equal(w.grad, torch.zeros_like(w))
    assert build_ops(KernelsConfig(rmsnorm="triton")).rmsnorm is rms.rmsnorm_op
    with pytest.raises(ValueError, match="weight"):
        rms.rmsnorm(x, w[:4], EPS)


def test_bf16_tolerance_covers_one_step_of_normed() -> None:
    """The bf16 forward tolerance accepts any normed one bf16 step off the reference's, times a weight in
    [0.5, 1.5] (the module docstring's bound), and is still tight: two steps off are rejected somewhere."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    normed = bits.view(torch.bfloat16)
    normed = normed[torch.isfinite(normed) & (normed.float().abs() < 8)]
    one_step = torch.nextafter(normed, torch.full_like(normed, float("inf")))
    w = torch.linspace(0.5, 1.5, 257).to(torch.bfloat16)
    expected = normed[:, None] * w
    _close(one_step[:, None] * w, expected, TOLERANCES[torch.bfloat16][0])
    two_steps = torch.nextafter(one_step, torch.full_like(one_step, float("inf")))
    with pytest.raises(AssertionError):
        _close(two_steps[:, None] * w, expected, TOLERANCES[torch.bfloat16][0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs a CUDA device")
@pytest.mark.parametrize("width", [4096, 8192, 20000])
def test_gpu_bf16_real_shapes(width: int) -> None:
    """Compiled bf16 (round-to-nearest-even, unlike the interpreter), Llama widths and a looped width."""
    x, w, dy = _inputs((2048, width), torch.bfloat16)
    _check_against_reference(x, w, dy, *TOLERANCES[torch.bfloat16])
    r = torch.randn_like(x).requires_grad_()
    _check_residual(x, r, w, dy, torch.randn_like(dy), *TOLERANCES[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs a CUDA device")
def test_gpu_under_torch_compile() -> None:
    """The trainer compiles blocks: the autograd Function must trace (or graph-break) cleanly."""
    x, w, dy = _inputs((64, 4096), torch.bfloat16)
    compiled = torch.compile(rms.rmsnorm_op)
    y = compiled(x, w, EPS)
    _close(y, rms.rmsnorm_reference(x, w, EPS), TOLERANCES[torch.bfloat16][0])
    grads = torch.autograd.grad(y, (x, w), dy.to(y.dtype))
    grads_ref = torch.autograd.grad(rms.rmsnorm_reference(x, w, EPS), (x, w), dy.to(y.dtype))
    for actual, expected in zip(grads, grads_ref, strict=True):
        _close(actual, expected, 5e-2)
