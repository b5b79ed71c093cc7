"""Optimizer and learning-rate schedule configuration."""

from __future__ import annotations

from dataclasses import dataclass, field

SCHEDULES = ("constant", "cosine", "linear", "wsd")


@dataclass(kw_only=True)
class ScheduleConfig:
    name: str = "cosine"  # constant | cosine | linear | wsd
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # floor of the decay, as a fraction of optim.lr
    # wsd (warmup-stable-decay, MiniCPM §4): fraction of the run spent in the final decay.
    decay_fraction: float = 0.2


@dataclass(kw_only=True)
class OptimConfig:
    name: str = "adamw"  # adamw | adamw_bf16 | adamw_fp8 (moments in BF16 / FP8, optim/low_precision.py)
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    # auto: fused on CUDA and for host-offloaded parameters, foreach elsewhere; or fused | foreach | for_loop
    implementation: str = "auto"
    # adamw_fp8 (COAT §4): elements per quantisation group along a matrix's last dim, and per-group dynamic
    # range expansion before the E4M3 cast.
    fp8_group_size: int = 128
    fp8_dynamic_range_expansion: bool = True
    clip_grad_norm: float = 1.0  # max global L2 norm; <= 0 disables clipping (the norm is still logged)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
