"""The FP8 compute plan: swap chosen `nn.Linear` layers for FP8 linears, whose matmuls run in FP8.

It lives in `parallel/` because it is a plan applied to a built model from outside, in the engine's fixed
order, like tensor parallelism (STYLE.md §3): the model file stays plain PyTorch and runs unchanged without
it, and the swap must come before the plans that wrap modules (activation checkpointing, compile, FSDP2).
It is not `memory/`'s: FP8 matmuls change how a layer computes, not what is kept for backward.

Two backends behind one switch, `fp8.backend`, converting the same layers (`fp8.include` / `fp8.exclude`)
so that they can be compared run for run:

- `treadle` (default): `Float8Linear` below, an `nn.Linear` (same parameters, names and init) whose forward
  runs `kernels.fp8_linear.Float8MatmulFunction`: dynamic scaling, E4M3 forward operands, E5M2 (tensorwise) or
  E4M3 (rowwise) gradients. Under FSDP2 the weight is all-gathered in the parameter dtype (bf16) and cast
  to FP8 after the gather; FP8 all-gather is not implemented here.
- `torchao`: torchao's `Float8Linear` (`torchao.float8.convert_to_float8_training`) with the matching
  recipe, and with `fp8.fsdp_float8_all_gather` (tensorwise) FSDP2 all-gathers the FP8 weight: see
  parallel/fp8_torchao.py for the mapping and its communication. The engine runs `weight_scale_refresh`'s
  function after each optimizer step.

Both emulate FP8 (quantise, dequantise, matmul in high precision) where `torch._scaled_mm` cannot run — on
a CPU, with a warning — or when `fp8.emulate=true`. Under tensor parallelism (treadle backend) torch's
Colwise/RowwiseParallel styles shard `Float8Linear` like any `nn.Linear`; its forward runs the FP8 matmul on
the local shards with every sharded operand's amax taken over the TP group, so a TP run quantises exactly as
one device would (`Float8Linear._forward_tensor_parallel`). The torchao backend with TP is refused: it needs
torchao's own `Float8ColwiseParallel` styles, not wired up.

The output layer is excluded by default: the logits' error feeds the loss of every token directly, and FP8
output heads are known to hurt convergence (the FP8 recipes of DeepSeek-V3 §3.3 and torchao keep it in BF16).
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, Partial, Shard

from treadle.kernels.fp8_linear import (
    RECIPES,
    Float8MatmulFunction,
    Float8MatmulGraphFunction,
    fp8_matmul_supported,
)
from treadle.parallel.fp8_torchao import (
    TORCHAO_MISSING,
    convert_with_torchao,
    precompute_weight_scales,
    torchao_available,
)

BACKENDS = ("treadle", "torchao")


@dataclass(kw_only=True)
class Float8Config:
    enabled: bool = False
    recipe: str = "tensorwise"  # tensorwise | rowwise (one scale per tensor, or per row along K)
    backend: str = "treadle"  # treadle (kernels/fp8_linear.py) | torchao (parallel/fp8_torchao.py)
    # fnmatch patterns on module FQNs: a linear is converted if it matches an include and no exclude.
    include: list[str] = field(default_factory=lambda: ["layers.*"])
    exclude: list[str] = field(default_factory=lambda: ["lm_head", "*.lm_head", "output"])
    # Emulate (dequantise, matmul in high precision) even on an FP8 GPU: a numerics check, no speedup.
    emulate: bool = False
    # torchao with recipe=tensorwise only: FSDP2 all-gathers weights in FP8 (half the bytes of bf16), their
    # scales refreshed after each optimizer step. No effect with the treadle backend or rowwise scaling.
    fsdp_float8_all_gather: bool = True

    def validate(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"fp8.recipe={self.recipe!r} is not one of {RECIPES}")
        if self.backend not in BACKENDS:
            raise ValueError(f"fp8.backend={self.backend!r} is not one of {BACKENDS}")
        if self.enabled and self.backend == "torchao" and not torchao_available():
            raise ValueError(TORCHAO_MISSING)

    @property
    def float8_all_gather(self) -> bool:
        """Whether FSDP2 gathers the converted weights in FP8 (torchao, tensorwise, switch on)."""
        return (
            self.enabled
            and self.backend == "torchao"
            and self.recipe == "tensorwise"
            and self.fsdp_float8_all_gather
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
        if isinstance(self.weight, DTensor):
            return self._forward_tensor_parallel(x)
        y = Float8MatmulGraphFunction.apply(x, self.weight, self.recipe, self.emulate)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _forward_tensor_parallel(self, x: DTensor) -> DTensor:
        """Under torch's Colwise/RowwiseParallel styles (which hand forward DTensors): the FP8 matmul of the
        local shards, scaled over the TP group, wrapped back in the placements a sharded linear produces.

        Column-parallel: x Replicate, W Shard(0) → y Shard(-1); x's local gradient is a partial sum
        (this rank's output columns only), so it leaves as Partial and the style's input redistribution
        reduces it. Row-parallel: x Shard(-1), W Shard(1) → y Partial, reduced by the style's output
        redistribution (all-reduce, or reduce-scatter under sequence parallelism).
        """
        weight = self.weight
        (placement,) = weight.placements
        if placement == Shard(0):
            split, x_grad, y_placement = "colwise", Partial(), Shard(x.ndim - 1)
        elif placement == Shard(1):
            split, x_grad, y_placement = "rowwise", Shard(x.ndim - 1), Partial()
        else:
            raise ValueError(f"FP8 linear with a weight placed {weight.placements}: only Shard(0)/Shard(1)")
        mesh = weight.device_mesh
        y_local = Float8MatmulFunction.apply(
            x.to_local(grad_placements=[x_grad]), weight.to_local(), self.recipe, self.emulate,
            mesh.get_group(), split,
        )  # fmt: skip
        if self.bias is not None and split == "colwise":
            y_local = y_local + self.bias.to_local().to(y_local.dtype)
        y = DTensor.from_local(y_local, mesh, [y_placement], run_check=False)
        if self.bias is not None and split == "rowwise":
            y = y + self.bias.to(y.dtype)  # DTensor reduces the partial sum first
        return y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recipe={self.recipe}"


def _selected(fqn: str, cfg: Float8Config) -> bool:
    return any(fnmatch.fnmatchcase(fqn, p) for p in cfg.include) and not any(
        fnmatch.fnmatchcase(fqn, p) for p in cfg.exclude
    )


def convert_to_float8(model: nn.Module, cfg: Float8Config, device: torch.device) -> list[str]:
    """Replace the selected `nn.Linear` modules of `model` in place with `fp8.backend`'s FP8 linear; returns
    their FQNs.

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
            f"numerics are emulated (cast to float8 and back, matmuls in high precision), with no speedup",
            stacklevel=2,
        )
    converted = [
        fqn
        for fqn, module in model.named_modules()
        if type(module) is nn.Linear
        and _selected(fqn, cfg)
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    ]
    if cfg.backend == "torchao":
        convert_with_torchao(
            model,
            set(converted),
            cfg.recipe,
            emulate=emulate,
            fsdp_float8_all_gather=cfg.float8_all_gather,
        )
    else:
        for fqn in converted:
            parent_name, _, child = fqn.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, child, Float8Linear.from_linear(parent.get_submodule(child), cfg.recipe, emulate))
    if not converted:
        warnings.warn(
            f"fp8.enabled=true converted no layer: no nn.Linear matched fp8.include={cfg.include} outside "
            f"fp8.exclude={cfg.exclude} with dims that are multiples of 16",
            stacklevel=2,
        )
    return converted


def weight_scale_refresh(cfg: Float8Config) -> Callable[[nn.Module], None] | None:
    """What the engine runs on the model after each optimizer step and after loading weights, or None.

    Only torchao's FP8 all-gather keeps state derived from the weights (a precomputed scale per weight,
    parallel/fp8_torchao.py); every other setting casts with scales measured in the forward itself.
    """
    return precompute_weight_scales if cfg.float8_all_gather else None
