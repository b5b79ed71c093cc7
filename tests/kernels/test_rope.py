"""RoPE kernel vs the plain-PyTorch reference (`treadle.models.ops.rope_torch`), forward and gradients.

On CPU the kernel runs in Triton's interpreter (conftest sets TRITON_INTERPRET=1) at small shapes; on a GPU
the same tests run compiled, and the `gpu` tests add real shapes.

Tolerances. Forward: both sides compute x1·cos − x2·sin in fp32 from the same inputs and round once; they
differ only where the compiler contracts a multiply-add into an FMA (one fp32 ulp), so fp32 1e-6 and fp16
2**-10 (one ulp after rounding). Gradients: the reference's autograd rounds its two paths to x (x·cos and
rotate_half(x)·sin) to the storage dtype separately and adds them, so its error is up to an ulp of the
larger term rather than of the result: absolute 2**-8 (fp16) and 2**-5 (bf16) cover terms up to |8|.
bf16: the interpreter converts fp32 → bf16 by truncation, not round-to-nearest-even (Triton 3.6,
`_convert_float`), so on CPU the bf16 forward is held to two ulps (2**-6) as a layout/indexing check; the
`gpu` test holds compiled bf16 to one ulp (2**-7).
"""

from __future__ import annotations

import os

import pytest
import torch

from treadle.kernels import rope as rp
from treadle.models.llama import ModelConfig, RopeScalingConfig, rope_frequencies
from treadle.models.ops import KernelsConfig, build_ops

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else ("cuda" if torch.cuda.is_available() else "cpu")
# dtype -> (forward atol/rtol, gradient atol/rtol)
TOLERANCES = {
    torch.float32: (1e-6, 1e-5),
    torch.float16: (2**-10, 2**-8),
    torch.bfloat16: (2**-6 if INTERPRET else 2**-7, 2**-5),
}


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol, rtol=tol)


def _tables(
    batch: int, seq_len: int, head_dim: int, *, scaling: bool = False, offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B, S, D] built as the model builds them (`Llama.rope_tables`), Llama-3 scaling optional."""
    cfg = ModelConfig(
        dim=head_dim * 2,
        num_heads=2,
        num_kv_heads=1,
        rope_scaling=RopeScalingConfig() if scaling else None,
    )
    positions_BS = offset + torch.arange(seq_len)[None].expand(batch, seq_len)
    angles_BSd = positions_BS[..., None].float() * rope_frequencies(cfg)
    angles_BSD = torch.cat((angles_BSd, angles_BSd), dim=-1).to(DEVICE)
    return angles_BSD.cos(), angles_BSD.sin()


def _check(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    tols: tuple[float, float],
    use_k: bool = True,
) -> None:
    fwd_tol, grad_tol = tols
    out = rp.rope(q, k, cos, sin)
    out_ref = rp.rope_reference(q, k, cos, sin)
    for actual, expected in zip(out, out_ref, strict=True):
        _close(actual, expected, fwd_tol)
    gen = torch.Generator().manual_seed(7)
    cotangents = [torch.randn(o.shape, generator=gen).to(DEVICE, o.dtype) for o in out]
    n = 2 if use_k else 1  # with k unused, autograd hands the backward None for dk
    leaves = [t for t in (q, k) if t.requires_grad]
    grads = torch.autograd.grad(out[:n], leaves, cotangents[:n], allow_unused=True)
    grads_ref = torch.autograd.grad(out_ref[:n], leaves, cotangents[:n], allow_unused=True)
    for actual, expected, leaf in zip(grads, grads_ref, leaves, strict=True):
        _close(actual, torch.zeros_like(leaf) if expected is None else expected, grad_tol)


def _qk(shape_q: tuple[int, ...], num_k_heads: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(shape_q, generator=gen).to(DEVICE, dtype).requires_grad_()
    k_shape = (*shape_q[:2], num_k_heads, shape_q[3])
    k = torch.randn(k_shape, generator=gen).to(DEVICE, dtype).requires_grad_()
    return q, k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("shape_q", "num_k_heads"), [((2, 5, 4, 8), 2), ((1, 3, 3, 6), 1), ((2, 2, 6, 20), 3)]
)
def test_matches_reference(shape_q: tuple[int, ...], num_k_heads: int, dtype: torch.dtype) -> None:
    """GQA head counts, head counts and half dims (3, 10) off the power-of-two block (masking)."""
    q, k = _qk(shape_q, num_k_heads, dtype)
    cos, sin = _tables(shape_q[0], shape_q[1], shape_q[3])
    _check(q, k, cos.to(dtype), sin.to(dtype), TOLERANCES[dtype])


@pytest.mark.parametrize("scaling", [False, True])
def test_llama3_scaled_tables(scaling: bool) -> None:
    """Tables from `rope_frequencies` with Llama-3.1 scaling, at positions past the original context."""
    q, k = _qk((2, 4, 4, 64), 2, torch.float32)
    cos, sin = _tables(2, 4, 64, scaling=scaling, offset=100_000)
    _check(q, k, cos, sin, TOLERANCES[torch.float32])


def test_non_contiguous_and_broadcast_tables() -> None:
    """q a transposed [B, H, S, D] tensor, k a slice of a fused projection, tables [1, S, D] and strided."""
    gen = torch.Generator().manual_seed(3)
    batch, seq_len, num_heads, num_k_heads, head_dim = 2, 5, 4, 2, 8
    q_BHSD = torch.randn(batch, num_heads, seq_len, head_dim, generator=gen).to(DEVICE).requires_grad_()
    qkv = torch.randn(batch, seq_len, (num_heads + num_k_heads) * head_dim, generator=gen).to(DEVICE)
    qkv.requires_grad_()
    q = q_BHSD.transpose(1, 2)
    k = qkv[..., num_heads * head_dim :].view(batch, seq_len, num_k_heads, head_dim)
    assert not q.is_contiguous() and not k.is_contiguous()
    cos, sin = _tables(1, seq_len, head_dim)
    wide_cos = torch.cat((cos, torch.zeros_like(cos)), dim=-1)[..., :head_dim]  # strided over S
    out, out_ref = rp.rope(q, k, wide_cos, sin), rp.rope_reference(q, k, wide_cos, sin)
    fwd_tol, grad_tol = TOLERANCES[torch.float32]
    for actual, expected in zip(out, out_ref, strict=True):
        _close(actual, expected, fwd_tol)
    cotangents = [torch.randn(o.shape, generator=gen).to(DEVICE) for o in out]
    grads = torch.autograd.grad(out, (q_BHSD, qkv), cotangents)
    grads_ref = torch.autograd.grad(out_ref, (q_BHSD, qkv), cotangents)
    for actual, expected in zip(grads, grads_ref, strict=True):
        _close(actual, expected, grad_tol)


def test_only_q_used() -> None:
    q, k = _qk((1, 3, 2, 8), 1, torch.float32)
    cos, sin = _tables(1, 3, 8)
    _check(q, k, cos, sin, TOLERANCES[torch.float32], use_k=False)


def test_gradcheck_fp64() -> None:
    """Against finite differences (fp64 inputs keep the kernel's math in fp64): the backward is the
    rotation by −θ."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 2, 4, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    k = torch.randn(1, 2, 1, 4, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    angles = torch.randn(1, 2, 2, generator=gen, dtype=torch.float64).to(DEVICE).repeat(1, 1, 2)
    assert torch.autograd.gradcheck(
        lambda a, b: rp.rope(a, b, angles.cos(), angles.sin()), (q, k), fast_mode=True
    )


def test_shape_errors_and_op_table() -> None:
    q, k = _qk((1, 3, 2, 8), 1, torch.float32)
    cos, sin = _tables(1, 3, 8)
    with pytest.raises(ValueError, match="cos"):
        rp.rope(q, k, cos[..., :4], sin)
    with pytest.raises(ValueError, match="even"):
        rp.rope(q[..., :7], k[..., :7], cos[..., :7], sin[..., :7])
    assert build_ops(KernelsConfig(rope="triton")).rope is rp.rope_op


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs a CUDA device")
def test_gpu_bf16_llama_shape() -> None:
    """Compiled bf16 (round-to-nearest-even, unlike the interpreter) at Llama-8B's head layout."""
    q, k = _qk((2, 1024, 32, 128), 8, torch.bfloat16)
    cos, sin = _tables(2, 1024, 128, scaling=True)
    _check(q, k, cos.bfloat16(), sin.bfloat16(), TOLERANCES[torch.bfloat16])
