"""The FP8 compute plan: swap chosen `nn.Linear` layers for `Float8Linear`, whose matmuls run in FP8.

It lives in `parallel/` because it is a plan applied to a built model from outside, in the engine's fixed
order, like tensor parallelism (STYLE.md §3): the model file stays plain PyTorch and runs unchanged without
it, and the swap must come before the plans that wrap modules (activation checkpointing, compile, FSDP2).
It is not `memory/`'s: FP8 matmuls change how a layer computes, not what is kept for backward.

`Float8Linear` is an `nn.Linear` (same parameters, names and init) whose forward runs
`kernels.fp8_cast.Float8MatmulFunction`: dynamic scaling, E4M3 forward operands, E5M2 (tensorwise) or
E4M3 (rowwise) gradients. Under FSDP2 the weight is all-gathered in the parameter dtype (bf16) and cast to
FP8 after the gather; FP8 all-gather (gathering the 1-byte cast, torchao's `enable_fsdp_float8_all_gather`)
is not implemented. Tensor parallelism is refused at validation: DTensor-sharded FP8 matmuls need their own
TP styles (torchao's `Float8ColwiseParallel`), which are not written yet.

The output layer is excluded by default: the logits' error feeds the loss of every token directly, and FP8
output heads are known to hurt convergence (the FP8 recipes of DeepSeek-V3 §3.3 and torchao keep it in BF16).
"""

from __future__ import annotations

import fnmatch
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from treadle.kernels.fp8_cast import RECIPES, Float8MatmulFunction, fp8_matmul_supported

BACKENDS = ("treadle", "torchao")


@dataclass(kw_only=True)
class Float8Config:
    enabled: bool = False
    recipe: str = "tensorwise"  # tensorwise | rowwise (one scale per tensor, or per row along K)
    backend: str = "treadle"  # treadle (kernels/fp8_cast.py) | torchao (not implemented yet)
    # fnmatch patterns on module FQNs: a linear is converted if it matches an include and no exclude.
    include: list[str] = field(default_factory=lambda: ["layers.*"])
    exclude: list[str] = field(default_factory=lambda: ["lm_head", "*.lm_head", "output"])
    # Run the emulation (dequantise, matmul in fp32) even on an FP8 GPU: a numerics check, no speedup.
    emulate: bool = False

    def validate(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"fp8.recipe={self.recipe!r} is not one of {RECIPES}")
        if self.backend not in BACKENDS:
            raise ValueError(f"fp8.backend={self.backend!r} is not one of {BACKENDS}")
        if self.backend == "torchao":
            raise ValueError(
                "fp8.backend=torchao is not available in this build; fix: use fp8.backend=treadle"
            )


class Float8Linear(nn.Linear):
    """`nn.Linear` with FP8 matmuls (see module doc); `from_linear` converts one, keeping its parameters."""

    recipe: str = "tensorwise"
    emulate: bool = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: str, emulate: bool) -> Float8Linear:
        new = cls(linear.in_features, linear.out_features, bias=False, device="meta")
        # The same Parameter objects: conversion works before or after materialisation, and FSDP2 or an
        # optimizer built earlier keeps pointing at what the module uses.
        new.weight = linear.weight
        new.bias = linear.bias
        new.recipe, new.emulate = recipe, emulate
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = Float8MatmulFunction.apply(x, self.weight, self.recipe, self.emulate)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recipe={self.recipe}"


def _selected(fqn: str, cfg: Float8Config) -> bool:
    return any(fnmatch.fnmatchcase(fqn, p) for p in cfg.include) and not any(
        fnmatch.fnmatchcase(fqn, p) for p in cfg.exclude
    )


def convert_to_float8(model: nn.Module, cfg: Float8Config, device: torch.device) -> list[str]:
    """Replace the selected `nn.Linear` modules of `model` in place; returns their FQNs.

    Linears with a dim that is not a multiple of 16 are left alone (`torch._scaled_mm` needs it), on every
    device, so that a CPU run converts the same layers as a GPU run.
    """
    if not cfg.enabled:
        return []
    cfg.validate()
    emulate = cfg.emulate or not fp8_matmul_supported(device)
    if emulate and not cfg.emulate:
        warnings.warn(
            f"fp8.enabled=true on {device} without FP8 tensor cores (CUDA compute capability >= 8.9): FP8 "
            f"numerics are emulated (cast to float8 and back, matmuls in fp32), with no speedup",
            stacklevel=2,
        )
    converted = []
    for fqn, module in list(model.named_modules()):
        if type(module) is not nn.Linear or not _selected(fqn, cfg):
            continue
        if module.in_features % 16 or module.out_features % 16:
            continue
        parent_name, _, child = fqn.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, Float8Linear.from_linear(module, cfg.recipe, emulate))
        converted.append(fqn)
    if not converted:
        warnings.warn(
            f"fp8.enabled=true converted no layer: no nn.Linear matched fp8.include={cfg.include} outside "
            f"fp8.exclude={cfg.exclude} with dims that are multiples of 16",
            stacklevel=2,
        )
    return converted
