"""AdamW with FP8 moments (COAT §4) in plain PyTorch: the moment format, its quantisation and the step that
`kernels/adamw_fp8.py` fuses into one Triton kernel. No Triton here: optimizers that only run the reference
(CPU, or `fused=False`) import this module alone.

Shape legend: R rows (every leading dim of the parameter flattened), C its last dim, N = ceil(C / G) groups
per row, G the group size.

An FP8 moment of an [..., C] parameter is three tensors (`Fp8Moment`): the E4M3 payload [..., C] and per
group of G consecutive elements along the last dim its scale (max |x| of the group) and exponent k, both
fp32 [..., N]. `quantize_fp8` stores sign(x)·448·(|x| / scale)^k, with k chosen per group so that the
group's dynamic range fills E4M3's normal range (COAT §4.2, "dynamic range expansion").

The reference step (`adamw_fp8_step_reference`) dequantises both moments to fp32 tensors as large as the
parameter, runs `adamw_update_`, and quantises again. Step-dependent scalars (bias corrections, decay) are
computed once on the host (`AdamWStep`) for it and for the kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from treadle.kernels.fp8_linear import E4M3

__all__ = [
    "FP8_DTYPE",
    "FP8_MAX",
    "MAX_EXPONENT",
    "AdamWStep",
    "Fp8Moment",
    "adamw_fp8_step_reference",
    "adamw_update_",
    "dequantize_fp8",
    "quantize_fp8",
]

FP8_DTYPE = E4M3
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
# Target the *normal* range of E4M3, [2^-6, 448]: an expanded group then keeps 3 mantissa bits on every
# element (relative rounding error <= 2^-4), instead of reaching into the subnormals where the smallest
# elements would keep 0-2 bits.
FP8_MIN_NORMAL = torch.finfo(FP8_DTYPE).smallest_normal
FP8_LOG_RANGE = math.log(FP8_MAX / FP8_MIN_NORMAL)
# A group whose non-zeros all have one magnitude has range 1 and would get k = inf; any k >= 1 represents it
# exactly (its elements map to ±448), so cap k where fp32 pow stays well-conditioned.
MAX_EXPONENT = 16.0


class Fp8Moment(NamedTuple):
    payload: torch.Tensor  # float8_e4m3fn [..., C]
    scale: torch.Tensor  # float32 [..., N]
    exponent: torch.Tensor  # float32 [..., N]


@dataclass(frozen=True)
class AdamWStep:
    """The scalars of one AdamW step (`torch.optim.AdamW`'s: decoupled weight decay, bias correction),
    computed on the host in double and rounded to fp32 where a kernel (torch's or ours) takes them."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    step: int  # 1 on the first update

    @property
    def decay(self) -> float:
        return 1 - self.lr * self.weight_decay

    @property
    def step_size(self) -> float:
        return self.lr / (1 - self.beta1**self.step)

    @property
    def bias_correction2_sqrt(self) -> float:
        return math.sqrt(1 - self.beta2**self.step)


def quantize_fp8(x: torch.Tensor, group_size: int, dynamic_range_expansion: bool = True) -> Fp8Moment:
    """Per-group E4M3 quantisation along the last dim; returns (payload, scale, exponent).

    With expansion (COAT §4.2) each group is normalised by its max |x|, raised to k = log(R_E4M3) / log(R_g)
    (R = max/min of |x| over the non-zeros), which maps its smallest non-zero to E4M3's smallest normal and
    its largest to 448; without it k = 1 (plain per-group absmax scaling, COAT's baseline).
    """
    *lead, num_cols = x.shape
    num_groups = math.ceil(num_cols / group_size)
    pad = num_groups * group_size - num_cols
    x32 = torch.nn.functional.pad(x.float(), (0, pad)).view(*lead, num_groups, group_size)
    mag = x32.abs()
    scale = mag.amax(dim=-1)
    if dynamic_range_expansion:
        smallest = torch.where(mag > 0, mag, torch.inf).amin(dim=-1)
        log_range = torch.log(scale / smallest)
        exponent = torch.where(log_range > 0, FP8_LOG_RANGE / log_range, MAX_EXPONENT).clamp_(
            max=MAX_EXPONENT
        )
        exponent = torch.where(scale > 0, exponent, 1.0)
    else:
        exponent = torch.ones_like(scale)
    # Normalising to [0, 1] before the power keeps |x|^k inside fp32 for any k (|x| ~ 1e-12 and k = 16 would
    # underflow otherwise).
    y = mag / torch.where(scale > 0, scale, 1.0).unsqueeze(-1)
    q = (y.pow(exponent.unsqueeze(-1)) * FP8_MAX).copysign(x32)
    q = q.view(*lead, num_groups * group_size)[..., :num_cols].to(FP8_DTYPE)
    return Fp8Moment(q, scale, exponent)


def dequantize_fp8(
    q: torch.Tensor, scale: torch.Tensor, exponent: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Inverse of `quantize_fp8`: sign(q) · scale · (|q| / 448)^(1/k), in fp32."""
    *lead, num_cols = q.shape
    num_groups = scale.shape[-1]
    pad = num_groups * group_size - num_cols
    q32 = torch.nn.functional.pad(q.float(), (0, pad)).view(*lead, num_groups, group_size)
    y = (q32.abs() / FP8_MAX).pow(exponent.reciprocal().unsqueeze(-1)) * scale.unsqueeze(-1)
    return y.copysign(q32).view(*lead, num_groups * group_size)[..., :num_cols]


def adamw_update_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    hp: AdamWStep,
) -> None:
    """One AdamW step in place on fp32 moments: the moments first, then the parameter from them (the
    unrounded fp32 values: rounding the stored moments is a storage matter, not part of this update)."""
    beta1, beta2 = hp.beta1, hp.beta2
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    param.mul_(hp.decay)
    denom = (exp_avg_sq.sqrt() / hp.bias_correction2_sqrt).add_(hp.eps)
    param.addcdiv_(exp_avg, denom, value=-hp.step_size)


def adamw_fp8_step_reference(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: Fp8Moment,
    exp_avg_sq: Fp8Moment,
    hp: AdamWStep,
    group_size: int,
    dynamic_range_expansion: bool = True,
) -> tuple[Fp8Moment, Fp8Moment]:
    """Updates `param` in place and returns the new moments (new tensors)."""
    m = dequantize_fp8(*exp_avg, group_size)
    v = dequantize_fp8(*exp_avg_sq, group_size)
    adamw_update_(param, grad.float(), m, v, hp)
    return (
        quantize_fp8(m, group_size, dynamic_range_expansion),
        quantize_fp8(v, group_size, dynamic_range_expansion),
    )
