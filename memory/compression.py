"""FP8 storage of saved activations: per-group E4M3 quantisation along the last dim.

COAT (Xi et al. 2024) §5: activations saved for backward are the largest memory item of training at long
sequence lengths, and most of them can be kept in FP8 with fine-grained (per-group) scales, which follow the
outliers of activations far better than one scale per tensor. Each group of `group_size` consecutive elements
of a row is scaled by 448 / max|group| and rounded to E4M3 (relative rounding error <= 2^-4 per element);
backward sees the dequantised tensor. Storage: 1 byte per element plus one fp32 scale per group (1.03 bytes
per element at group 128, against 2 for bf16 and 4 for fp32).

The error enters gradients only (the forward uses the exact activations): weight gradients average it over
tokens, which is why it costs little accuracy (COAT §6 reports matching BF16 loss curves).

The quantisation itself is kernels/fp8_groups_reference.py: on CUDA it runs the Triton kernels of
kernels/fp8_groups.py (one each way, one read of the tensor, no fp32 temporaries), the plain-PyTorch reference
elsewhere; both give the same bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from treadle.kernels import fp8_groups_reference as fp8_groups
from treadle.kernels.fp8_groups_reference import E4M3, FP8_MAX

FP8_DTYPE = E4M3

__all__ = ["FP8_DTYPE", "FP8_MAX", "CompressedTensor", "dequantize_groups", "quantize_groups"]


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
    payload, inv_scale = fp8_groups.quantize_groups(x, group_size)
    return CompressedTensor(payload, inv_scale, x.shape, x.dtype)


def dequantize_groups(c: CompressedTensor) -> torch.Tensor:
    return fp8_groups.dequantize_groups(c.payload, c.inv_scale, c.shape, c.dtype)
