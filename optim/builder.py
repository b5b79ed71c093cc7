"""Build the optimizer and its LR schedule from `OptimConfig`."""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn
from torch.optim.lr_scheduler import LambdaLR

from treadle.optim.config import SCHEDULES, OptimConfig, ScheduleConfig
from treadle.optim.low_precision import LowPrecisionAdamW

IMPLEMENTATIONS = ("auto", "fused", "foreach", "for_loop")
# optim.name -> dtype of the stored AdamW moments; "adamw" is torch's own AdamW.
OPTIMIZERS = {"adamw": "fp32", "adamw_bf16": "bf16", "adamw_fp8": "fp8"}


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Weight decay on matrices only (norm weights and other 1-D parameters are not decayed); empty groups
    are dropped."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, device: torch.device, *, host_offload: bool = False
) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (see `param_groups`).

    `host_offload`: the parameters live in host memory because they are offloaded from a GPU (FSDP2's CPU
    offload), so the step is on the training's critical path: `auto` then picks torch's fused CPU AdamW, one
    vectorised pass per tensor (7x faster than foreach on 16M-element tensors here)."""
    if cfg.name not in OPTIMIZERS:
        raise ValueError(f"optim.name={cfg.name!r} is not available; choose one of {tuple(OPTIMIZERS)}")
    if cfg.implementation not in IMPLEMENTATIONS:
        raise ValueError(f"optim.implementation={cfg.implementation!r} is not one of {IMPLEMENTATIONS}")
    groups = param_groups(model, cfg)
    if cfg.name != "adamw":
        if cfg.implementation != "auto":
            warnings.warn(
                f"optim.implementation={cfg.implementation!r} has no effect with optim.name={cfg.name!r}",
                stacklevel=2,
            )
        return LowPrecisionAdamW(
            groups,
            lr=cfg.lr,
            betas=tuple(cfg.betas),
            eps=cfg.eps,
            state_dtype=OPTIMIZERS[cfg.name],
            group_size=cfg.fp8_group_size,
            dynamic_range_expansion=cfg.fp8_dynamic_range_expansion,
        )
    impl = cfg.implementation
    if impl == "auto":
        impl = "fused" if device.type == "cuda" or host_offload else "foreach"
    return torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        fused=impl == "fused",
        foreach=impl == "foreach",
    )


def lr_factor(step: int, cfg: ScheduleConfig, total_steps: int) -> float:
    """Multiplier on the base LR for the optimizer update that follows `step` completed steps."""
    if cfg.name not in SCHEDULES:
        raise ValueError(f"optim.schedule.name={cfg.name!r} is not one of {SCHEDULES}")
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.name == "constant":
        return 1.0
    floor = cfg.min_lr_ratio
    if cfg.name == "wsd":
        decay_steps = max(1, int(total_steps * cfg.decay_fraction))
        decay_start = total_steps - decay_steps
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / decay_steps)
        return floor + (1 - floor) * (1 - progress)
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    if cfg.name == "linear":
        return floor + (1 - floor) * (1 - progress)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: lr_factor(step, cfg, total_steps))
