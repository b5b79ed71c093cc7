"""FP8 storage of saved activations: per-group E4M3 quantisation along the last dim.

COAT (Xi et al. 2024) §5: activations saved for backward are the largest memory item of training at long
sequence lengths, and most of them can be kept in FP8 with fine-grained (per-group) scales, which follow the
outliers of activations far better than one scale per tensor. Each group of `group_size` consecutive elements
of a row is scaled by 448 / max|group| and rounded to E4M3 (relative rounding error <= 2^-4 per element);
backward sees the dequantised tensor. Storage: 1 byte per element plus one fp32 scale per group (1.03 bytes
per element at group 128, against 2 for bf16 and 4 for fp32).

The error enters gradients only (the forward uses the exact activations): weight gradients average it over
tokens, which is why it costs little accuracy (COAT §6 reports matching BF16 loss curves).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max


@dataclass
class CompressedTensor:
    payload: torch.Tensor  # float8_e4m3fn [rows, groups · group_size] (the last dim padded)
    inv_scale: torch.Tensor  # float32 [rows, groups, 1]
    shape: torch.Size
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return self.payload.numel() * self.payload.element_size() + self.inv_scale.numel() * 4


def quantize_groups(x: torch.Tensor, group_size: int) -> CompressedTensor:
    num_cols = x.shape[-1]
    # Rows narrower than a group (a head dim of 64 with groups of 128) are one group each, not padded.
    group_size = min(group_size, num_cols)
    num_groups = math.ceil(num_cols / group_size)
    x_RC = x.detach().reshape(-1, num_cols).float()
    x_RGc = F.pad(x_RC, (0, num_groups * group_size - num_cols)).view(x_RC.shape[0], num_groups, group_size)
    scale = FP8_MAX / x_RGc.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12)
    payload = (x_RGc * scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).view(x_RC.shape[0], -1)
    return CompressedTensor(payload, scale.reciprocal(), x.shape, x.dtype)


def dequantize_groups(c: CompressedTensor) -> torch.Tensor:
    rows, num_groups = c.inv_scale.shape[:2]
    x_RGc = c.payload.view(rows, num_groups, -1).float() * c.inv_scale
    return x_RGc.view(rows, -1)[:, : c.shape[-1]].reshape(c.shape).to(c.dtype)
