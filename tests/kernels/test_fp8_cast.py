"""FP8 cast kernels vs the plain-PyTorch reference, and the FP8 matmul Function vs the written-out FP8 math.

Casts are held to bit equality: the kernel and the reference compute the same amax (a max is exact in any
order), the same scale (one torch expression, `scale_from_amax`) and round x · scale to nearest even. On CPU
the interpreter runs the kernel's software float8 encoder; on a GPU the hardware conversion (and the gpu test
checks the software encoder there too).
"""

from __future__ import annotations

import os

import pytest
import torch

from treadle.kernels import fp8_cast as f

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else ("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not INTERPRET, reason="needs the interpreter or CUDA")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def _assert_cast_equal(x: torch.Tensor, dtype: torch.dtype, rowwise: bool, soft_cast: bool | None = None):
    q, inv = f.cast_to_fp8_triton(x, dtype, rowwise, soft_cast=soft_cast)
    q_ref, inv_ref = f.cast_to_fp8_reference(x, dtype, rowwise)
    assert q.dtype == dtype and q.shape == x.shape and inv.shape == inv_ref.shape
    mismatches = (_bits(q) != _bits(q_ref)).sum().item()
    assert mismatches == 0, f"{mismatches} of {q.numel()} elements differ"
    torch.testing.assert_close(inv, inv_ref, rtol=0, atol=0)


@pytest.mark.parametrize("rowwise", [False, True], ids=["tensorwise", "rowwise"])
@pytest.mark.parametrize("dtype", [f.E4M3, f.E5M2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize(
    ("shape", "magnitude"), [((7, 33), 1.0), ((5, 1030), 1e-3), ((3, 64), 3e4), ((1, 1), 1.0)]
)
def test_cast_matches_reference_bitwise(shape, magnitude, dtype, rowwise) -> None:
    """Widths off the block (masking), more than one column block (1030 > 1024), tiny and huge magnitudes
    (subnormal codes, large scales), a zero row (amax floor), a single element."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen) * magnitude).to(DEVICE)
    if shape[0] > 2:
        x[1] = 0.0
        x[2, 0] = x[0].abs().max() * 0.999  # values near the top of the range round to the max code
    _assert_cast_equal(x, dtype, rowwise)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cast_low_precision_input_and_strided_rows(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    wide = torch.randn(6, 80, generator=gen).to(DEVICE, dtype)
    view = wide[:, 8:56]  # row-strided: read in place (rowwise) or copied (tensorwise)
    for rowwise in (False, True):
        _assert_cast_equal(view, f.E4M3, rowwise)


def test_every_e4m3_code_round_trips() -> None:
    """All 254 finite E4M3 values (and midpoints between neighbours, which must round to even) encode as
    torch encodes them."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(f.E4M3).float()
    finite = codes[torch.isfinite(codes)].unique()
    mids = (finite[1:] + finite[:-1]) / 2
    x = torch.cat([finite, mids]).to(DEVICE)[None, :]
    # amax is 448: the scale is exactly 1, so each value is encoded as it is.
    _assert_cast_equal(x, f.E4M3, rowwise=False)


@pytest.mark.parametrize("recipe", f.RECIPES)
def test_matmul_function_matches_written_out_fp8_math(recipe: str) -> None:
    """Emulated `_scaled_mm` path against `fp8_linear_reference`: the same quantised operands, the same fp32
    products, so equal up to fp32 summation order."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 16, 32, generator=gen).to(DEVICE).requires_grad_()
    w = (0.1 * torch.randn(48, 32, generator=gen)).to(DEVICE).requires_grad_()
    dy = torch.randn(2, 16, 48, generator=gen).to(DEVICE)
    y = f.Float8MatmulFunction.apply(x, w, recipe, True)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    y_ref, dx_ref, dw_ref = f.fp8_linear_reference(x.detach(), w.detach(), dy, recipe)
    for actual, expected in ((y, y_ref), (dx, dx_ref), (dw, dw_ref)):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs a CUDA device")
@pytest.mark.parametrize("soft_cast", [False, True])
def test_gpu_cast_real_shapes(soft_cast: bool) -> None:
    x = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16) * 3
    for dtype in (f.E4M3, f.E5M2):
        for rowwise in (False, True):
            _assert_cast_equal(x, dtype, rowwise, soft_cast=soft_cast)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or INTERPRET or not f.fp8_matmul_supported(torch.device("cuda")),
    reason="needs an FP8 GPU (compute capability >= 8.9)",
)
@pytest.mark.parametrize("recipe", f.RECIPES)
def test_gpu_scaled_mm_matches_emulation(recipe: str) -> None:
    """`_scaled_mm` against its emulation on the same FP8 operands: fp32 accumulation in both (fast accumulation
    in forward on the GPU), bf16 outputs: a few bf16 ulps."""
    x = torch.randn(1024, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (0.02 * torch.randn(4096, 2048, device="cuda")).to(torch.bfloat16).requires_grad_()
    dy = torch.randn(1024, 4096, device="cuda", dtype=torch.bfloat16)
    outs = []
    for emulate in (False, True):
        y = f.Float8MatmulFunction.apply(x, w, recipe, emulate)
        outs.append((y, *torch.autograd.grad(y, (x, w), dy)))
    for real, emulated in zip(*outs, strict=True):
        rel = (real.float() - emulated.float()).norm() / emulated.float().norm()
        assert rel < 1e-2, rel
