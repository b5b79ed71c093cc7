"""Plain-PyTorch references of the pointwise kernels (RMSNorm, RoPE, SwiGLU), in a file without Triton.

They are the op table's `torch` implementations (models/ops.py) and the definitions the Triton kernels in
`rmsnorm.py`, `rope.py` and `swiglu.py` are tested against: one definition of each op for both backends. They
live here rather than in the kernel files so that a run on the default op table never imports Triton.

Shape legend: B batch, S sequence, H query heads, K key/value heads, D head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rmsnorm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm (Zhang & Sennrich 2019) computed in fp32 and cast back, as Llama does."""
    x_fp32 = x.float()
    normed = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return normed.to(x.dtype) * weight


def rope_torch(
    q_BSHD: torch.Tensor, k_BSKD: torch.Tensor, cos_BSD: torch.Tensor, sin_BSD: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding in the rotate-half layout (the Hugging Face Llama convention, so HF weights load as is).

    `cos_BSD`/`sin_BSD` hold the per-position angles for the full head dim (each frequency twice).
    """
    cos, sin = cos_BSD[:, :, None, :], sin_BSD[:, :, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
        return (x.float() * cos + rotated.float() * sin).to(x.dtype)

    return rotate(q_BSHD), rotate(k_BSKD)


def swiglu_torch(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's gating (Shazeer 2020): silu(gate) * up."""
    return F.silu(gate) * up
