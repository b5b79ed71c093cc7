"""Per-group FP8 quantisation kernels vs the plain-PyTorch reference (kernels/fp8_groups.py).

Held to bit equality both ways: the payload bytes, the inverse scales and the dequantised tensor. The kernel
takes the same max, computes the scale with the reference's IEEE operations and rounds x · scale to nearest
even, so nothing may differ. On CPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1)
with the software float8 (and bf16) conversions; on a GPU compiled, and the gpu test adds a real shape and
the software conversions there.
"""

from __future__ import annotations

import os

import pytest
import torch

from treadle.kernels import fp8_groups as g
from treadle.memory import compression

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else ("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not INTERPRET, reason="needs the interpreter or CUDA")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def _assert_matches_reference(x: torch.Tensor, group_size: int, soft_cast: bool | None = None) -> None:
    payload, inv_scale = g.quantize_groups_triton(x, group_size, soft_cast=soft_cast)
    payload_ref, inv_scale_ref = g.quantize_groups_reference(x, group_size)
    assert payload.dtype == g.E4M3 and payload.shape == payload_ref.shape
    assert inv_scale.dtype == torch.float32 and inv_scale.shape == inv_scale_ref.shape
    mismatches = (_bits(payload) != _bits(payload_ref)).sum().item()
    assert mismatches == 0, f"{mismatches} of {payload.numel()} payload bytes differ"
    torch.testing.assert_close(inv_scale, inv_scale_ref, rtol=0, atol=0)
    y = g.dequantize_groups_triton(payload, inv_scale, x.shape, x.dtype, soft_cast=soft_cast)
    y_ref = g.dequantize_groups_reference(payload_ref, inv_scale_ref, x.shape, x.dtype)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)


def _activations(shape: tuple[int, ...], dtype: torch.dtype, magnitude: float, seed: int = 0) -> torch.Tensor:
    """Magnitudes spread over 10^±2 along the last dim (each group its own scale), a zero row with negative
    zeros (the amax floor), and one value just under a row's max (rounds to the top code)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * torch.logspace(-2, 2, shape[-1]) * magnitude
    rows = x.view(-1, shape[-1])
    if rows.shape[0] > 2:
        rows[1] = 0.0
        rows[1, ::2] = -0.0
        rows[2, 0] = rows[0].abs().max() * 0.999
    return x.to(DEVICE, dtype)


@pytest.mark.parametrize(
    ("shape", "group_size", "dtype", "magnitude"),
    [
        ((5, 1000), 128, torch.bfloat16, 1.0),  # the default group; 1000 = 7·128 + 104: a padded last group
        ((7, 200), 64, torch.float32, 1e-6),  # padded; tiny values (subnormal codes, large scales)
        ((3, 5, 200), 64, torch.bfloat16, 3e4),  # 3-D; large values
        ((4, 72), 32, torch.float32, 1e30),  # fp32 beyond bf16's usual range; 72 = 2·32 + 8
        ((8, 32), 128, torch.float32, 1.0),  # group > C: one group of 32 per row
        ((4, 200), 256, torch.bfloat16, 1.0),  # group > C, and C not a power of two: a masked 256 tile
        ((6, 96), 48, torch.float16, 1e-3),  # a group size that is not a power of two
        ((1, 1), 128, torch.float32, 1.0),  # a single element
    ],
)
def test_matches_reference_bitwise(shape, group_size, dtype, magnitude) -> None:
    _assert_matches_reference(_activations(shape, dtype, magnitude), group_size)


def test_all_zero_tensor() -> None:
    x = torch.zeros(4, 70, device=DEVICE, dtype=torch.bfloat16)
    _assert_matches_reference(x, 32)
    payload, inv_scale = g.quantize_groups_triton(x, 32)
    assert not _bits(payload).any() and (inv_scale == inv_scale.flatten()[0]).all()


def test_strided_inputs() -> None:
    """A row-strided view is read in place, a transposed one through reshape's copy."""
    wide = _activations((6, 300), torch.bfloat16, 1.0, seed=1)
    _assert_matches_reference(wide[:, 20:220], 64)
    _assert_matches_reference(_activations((3, 4, 96), torch.float32, 1.0, seed=2).transpose(0, 1), 32)


def test_every_e4m3_code() -> None:
    """Every finite E4M3 value and every midpoint between neighbours (ties round to even) in one group whose
    amax is 448, so the scale is exactly 1; then all 256 codes (NaN included) through the dequantiser."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(g.E4M3)
    finite = codes.float()[torch.isfinite(codes.float())].unique()
    mids = (finite[1:] + finite[:-1]) / 2
    x = torch.cat([finite, mids]).to(DEVICE)[None, :]
    _assert_matches_reference(x, x.shape[1])
    payload, ones = codes.to(DEVICE).view(1, 256), torch.ones(1, 1, 1, device=DEVICE)
    y = g.dequantize_groups_triton(payload, ones, torch.Size([1, 256]), torch.float32)
    y_ref = g.dequantize_groups_reference(payload, ones, torch.Size([1, 256]), torch.float32)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0, equal_nan=True)


def test_groups_wider_than_a_tile_fall_back_to_the_reference() -> None:
    x = _activations((2, g.MAX_GROUP_TILE + 8), torch.float32, 1.0)
    _assert_matches_reference(x, 2 * g.MAX_GROUP_TILE)


def test_compression_api_round_trip() -> None:
    """memory/compression.py's names: the dispatching functions wrapped in a CompressedTensor."""
    x = _activations((3, 5, 200), torch.bfloat16, 1.0, seed=3)
    c = compression.quantize_groups(x, 64)
    payload_ref, inv_scale_ref = g.quantize_groups_reference(x, 64)
    assert c.shape == x.shape and c.dtype == x.dtype and c.nbytes == 15 * 256 + 15 * 4 * 4
    assert torch.equal(_bits(c.payload), _bits(payload_ref)) and torch.equal(c.inv_scale, inv_scale_ref)
    y = compression.dequantize_groups(c)
    assert torch.equal(y, g.dequantize_groups_reference(payload_ref, inv_scale_ref, x.shape, x.dtype))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs a CUDA device")
@pytest.mark.parametrize("soft_cast", [False, True])
def test_gpu_real_shapes(soft_cast: bool) -> None:
    """An MLP activation at the default group, a fp32 one with a padded last group; the hardware conversion
    and the software one the interpreter and pre-8.9 GPUs use."""
    x = torch.randn(8192, 2048, device="cuda", dtype=torch.bfloat16) * torch.logspace(
        -2, 2, 2048, device="cuda"
    )
    _assert_matches_reference(x, 128, soft_cast=soft_cast)
    _assert_matches_reference(torch.randn(4096, 1000, device="cuda") * 50, 128, soft_cast=soft_cast)
    _assert_matches_reference(torch.randn(2, 2048, 64, device="cuda", dtype=torch.bfloat16), 128, soft_cast)
