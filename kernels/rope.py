"""Rotary position embedding (Su et al. 2021, RoFormer) in the rotate-half layout, in Triton, for q and k at once.

Shape legend: B batch, S sequence, H query heads, K key/value heads, D head dim, d = D/2 rotated pairs.

Semantics are `treadle.kernels.reference.rope_torch` (the Hugging Face Llama convention): with x = [x1, x2] split
at d and the per-position angle θ_i of pair i,
    out1 = x1·cos θ − x2·sin θ          out2 = x2·cos θ + x1·sin θ
computed in fp32 and rounded back to x's dtype. The model's tables `cos_BSD`/`sin_BSD` repeat every
frequency in both halves (Llama-3 frequency scaling already folded in by `rope_frequencies`), so the kernel
reads only their first d columns: half the table traffic.

A rotation is orthogonal, so the backward is the rotation by −θ (sin negated) applied to the output
gradients: the same kernel with SIGN = −1, and nothing is saved but the tables. The tables are constants
(they come from a non-trainable buffer), so no gradient flows to cos/sin.

One program handles one token (b, s): it loads that token's d angles once and rotates all H query and K key
heads with them, so q, k and the tables are each read once per launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from treadle.kernels.reference import rope_torch

__all__ = ["RoPEFunction", "rope", "rope_op", "rope_reference"]

# The op table's torch implementation is the reference: one definition of the op for both backends.
rope_reference = rope_torch


@triton.jit
def _rotate_heads(x_tok, out_tok, cos, sin, heads, pairs, num_heads, half_dim, stride_xh, stride_xd, stride_oh, stride_od, COMPUTE: tl.constexpr):  # fmt: skip
    """Rotates one token's [heads, D] block: pairs (i, i + d) by the angle in cos/sin [1, d]."""
    mask = (heads < num_heads) & (pairs < half_dim)
    x1_ptr = x_tok + heads * stride_xh + pairs * stride_xd
    x2_ptr = x1_ptr + half_dim * stride_xd
    x1 = tl.load(x1_ptr, mask=mask, other=0.0).to(COMPUTE)
    x2 = tl.load(x2_ptr, mask=mask, other=0.0).to(COMPUTE)
    o1_ptr = out_tok + heads * stride_oh + pairs * stride_od
    tl.store(o1_ptr, x1 * cos - x2 * sin, mask=mask)
    tl.store(o1_ptr + half_dim * stride_od, x2 * cos + x1 * sin, mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr,
    k_ptr,
    q_out_ptr,
    k_out_ptr,
    cos_ptr,
    sin_ptr,
    seq_len,
    num_q_heads,
    num_k_heads,
    half_dim,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_qob,
    stride_qos,
    stride_qoh,
    stride_qod,
    stride_kob,
    stride_kos,
    stride_koh,
    stride_kod,
    stride_cb,
    stride_cs,
    stride_cd,
    stride_sb,
    stride_ss,
    stride_sd,
    SIGN: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    token = tl.program_id(0)
    # int64: B·S·H·D passes 2**31 at long contexts.
    b = (token // seq_len).to(tl.int64)
    s = (token % seq_len).to(tl.int64)
    pairs = tl.arange(0, BLOCK_P)[None, :]
    table_mask = pairs < half_dim
    cos = tl.load(cos_ptr + b * stride_cb + s * stride_cs + pairs * stride_cd, mask=table_mask, other=0.0)
    sin = tl.load(sin_ptr + b * stride_sb + s * stride_ss + pairs * stride_sd, mask=table_mask, other=0.0)
    cos, sin = cos.to(COMPUTE), sin.to(COMPUTE) * SIGN
    q_tok, q_out_tok = q_ptr + b * stride_qb + s * stride_qs, q_out_ptr + b * stride_qob + s * stride_qos
    k_tok, k_out_tok = k_ptr + b * stride_kb + s * stride_ks, k_out_ptr + b * stride_kob + s * stride_kos
    q_heads = tl.arange(0, BLOCK_H)[:, None]
    k_heads = tl.arange(0, BLOCK_K)[:, None]
    _rotate_heads(q_tok, q_out_tok, cos, sin, q_heads, pairs, num_q_heads, half_dim, stride_qh, stride_qd, stride_qoh, stride_qod, COMPUTE)  # fmt: skip
    _rotate_heads(k_tok, k_out_tok, cos, sin, k_heads, pairs, num_k_heads, half_dim, stride_kh, stride_kd, stride_koh, stride_kod, COMPUTE)  # fmt: skip


def _num_warps(num_heads: int, half_dim: int) -> int:
    """Warps for one token's q block (H·d pairs). An H100 sweep at H = 32, d = 64 (bf16): 8 warps ~2850
    GB/s, 1 to 4 within 2%, 16 -5%."""
    return max(1, min(8, num_heads * half_dim // 256))


def _rotate(
    q_BSHD: torch.Tensor, k_BSKD: torch.Tensor, cos_BSD: torch.Tensor, sin_BSD: torch.Tensor, sign: int
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, seq_len, num_q_heads, head_dim = q_BSHD.shape
    num_k_heads = k_BSKD.shape[2]
    half_dim = head_dim // 2
    q_out = torch.empty(q_BSHD.shape, dtype=q_BSHD.dtype, device=q_BSHD.device)
    k_out = torch.empty(k_BSKD.shape, dtype=k_BSKD.dtype, device=k_BSKD.device)
    # A [1, S, D] table (one set of positions for the whole batch) is read with a zero batch stride.
    cos_BSD, sin_BSD = cos_BSD.expand(batch, seq_len, -1), sin_BSD.expand(batch, seq_len, -1)
    if batch * seq_len == 0:
        return q_out, k_out
    fp64 = q_BSHD.dtype == torch.float64 and k_BSKD.dtype == torch.float64
    _rope_kernel[(batch * seq_len,)](
        q_BSHD,
        k_BSKD,
        q_out,
        k_out,
        cos_BSD,
        sin_BSD,
        seq_len,
        num_q_heads,
        num_k_heads,
        half_dim,
        *q_BSHD.stride(),
        *k_BSKD.stride(),
        *q_out.stride(),
        *k_out.stride(),
        *cos_BSD.stride(),
        *sin_BSD.stride(),
        SIGN=sign,
        BLOCK_H=triton.next_power_of_2(num_q_heads),
        BLOCK_K=triton.next_power_of_2(num_k_heads),
        BLOCK_P=triton.next_power_of_2(half_dim),
        # fp64 stays fp64 so that torch.autograd.gradcheck can check the kernel against finite differences.
        COMPUTE=tl.float64 if fp64 else tl.float32,
        num_warps=_num_warps(num_q_heads, half_dim),
    )
    return q_out, k_out


def _check(q_BSHD: torch.Tensor, k_BSKD: torch.Tensor, cos_BSD: torch.Tensor, sin_BSD: torch.Tensor) -> None:
    if q_BSHD.dim() != 4 or k_BSKD.dim() != 4:
        raise ValueError(f"rope wants q [B, S, H, D] and k [B, S, K, D]; got {tuple(q_BSHD.shape)}, {tuple(k_BSKD.shape)}")  # fmt: skip
    batch, seq_len, _, head_dim = q_BSHD.shape
    if k_BSKD.shape[0] != batch or k_BSKD.shape[1] != seq_len or k_BSKD.shape[3] != head_dim:
        raise ValueError(f"rope: k {tuple(k_BSKD.shape)} does not match q {tuple(q_BSHD.shape)} in B, S or D")
    if head_dim % 2:
        raise ValueError(f"rope needs an even head dim; got {head_dim}")
    for name, table in (("cos", cos_BSD), ("sin", sin_BSD)):
        if table.dim() != 3 or table.shape[0] not in (1, batch) or table.shape[1:] != (seq_len, head_dim):
            raise ValueError(
                f"rope: {name} table {tuple(table.shape)} must be [B or 1, S, D] = [{batch}, {seq_len}, {head_dim}]"
            )


class RoPEFunction(torch.autograd.Function):
    """(q, k) rotated by θ; backward rotates (dq, dk) by −θ. Saves only the tables."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, q_BSHD: torch.Tensor, k_BSKD: torch.Tensor, cos_BSD: torch.Tensor, sin_BSD: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _check(q_BSHD, k_BSKD, cos_BSD, sin_BSD)
        ctx.save_for_backward(cos_BSD, sin_BSD)
        ctx.q_meta, ctx.k_meta = (q_BSHD.shape, q_BSHD.dtype), (k_BSKD.shape, k_BSKD.dtype)
        return _rotate(q_BSHD, k_BSKD, cos_BSD, sin_BSD, sign=1)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx, dq_BSHD: torch.Tensor | None, dk_BSKD: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        cos_BSD, sin_BSD = ctx.saved_tensors
        # Autograd passes None for an output that did not reach the loss; its gradient is then zero.
        if dq_BSHD is None:
            dq_BSHD = cos_BSD.new_zeros(ctx.q_meta[0], dtype=ctx.q_meta[1])
        if dk_BSKD is None:
            dk_BSKD = cos_BSD.new_zeros(ctx.k_meta[0], dtype=ctx.k_meta[1])
        dq, dk = _rotate(dq_BSHD, dk_BSKD, cos_BSD, sin_BSD, sign=-1)
        return dq, dk, None, None


def rope(
    q_BSHD: torch.Tensor, k_BSKD: torch.Tensor, cos_BSD: torch.Tensor, sin_BSD: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q [B, S, H, D] and k [B, S, K, D] with tables [B or 1, S, D]; any strides."""
    return RoPEFunction.apply(q_BSHD, k_BSKD, cos_BSD, sin_BSD)


def rope_op(
    q_BSHD: torch.Tensor, k_BSKD: torch.Tensor, cos_BSD: torch.Tensor, sin_BSD: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The op table's `triton` RoPE (`kernels.rope=triton`)."""
    return RoPEFunction.apply(q_BSHD, k_BSKD, cos_BSD, sin_BSD)
