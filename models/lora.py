"""LoRA adapters (Hu et al. 2021), with rsLoRA scaling (Kalajdzievski 2023), DoRA (Liu et al. 2024) and a
QLoRA base in NF4 (Dettmers et al. 2023), applied to a model on the meta device before any parallel plan.

A targeted `nn.Linear` becomes a `LoRALinear`: the same frozen `weight` (so the base loads under its usual name)
plus `lora_A` [r, in] and `lora_B` [out, r], and with DoRA a `lora_magnitude_vector` [out]. Parameter names
are PEFT's (`...q_proj.lora_A.weight`), so exporting a PEFT adapter is a prefix. Only adapter parameters require
gradients; the optimizer, the gradient clipping and the checkpoints see only those.

    y = W x + s · B A dropout(x),      s = alpha / r   (rsLoRA: alpha / sqrt(r))
    DoRA:  y = m ⊙ (W + s·B A) x / ‖W + s·B A‖_row    (the norm detached, as the DoRA paper's §4.3 suggests)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, distribute_tensor

from treadle.memory.nf4 import dequantize_nf4, nf4_linear, quantize_nf4
from treadle.models.init import canonical_name, fill_
from treadle.models.spec import load_builtin_families

METHODS = ("none", "lora")
QUANTIZE = ("none", "nf4")


@dataclass(kw_only=True)
class PeftConfig:
    method: str = "none"  # none (train every parameter) | lora
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    # Module names (last component) to adapt; "all-linear" = every linear layer in the blocks (`model.layers`),
    # not the output head.
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    use_rslora: bool = False  # scale by alpha / sqrt(rank) instead of alpha / rank
    use_dora: bool = False  # weight-decomposed LoRA: a trained magnitude per output row
    quantize_base: str = "none"  # none | nf4 (QLoRA: frozen base weights stored in 4 bits)
    nf4_block_size: int = 64

    def targets(self) -> tuple[str, ...] | None:
        """The module names to adapt; None for every linear layer of the blocks."""
        return None if "all-linear" in self.target_modules else tuple(self.target_modules)

    def validate(
        self, linear_names: tuple[str, ...] | None = None, refused: Mapping[str, str] | None = None
    ) -> None:
        """`linear_names`: the blocks' linear layers of the model family (`ModelSpec.linear_names`); by default
        those of every built-in family. `refused`: names the family does not let LoRA adapt, with the reason
        (`ModelSpec.lora_refused`)."""
        if self.method not in METHODS:
            raise ValueError(f"peft.method={self.method!r} is not one of {METHODS}")
        if self.quantize_base not in QUANTIZE:
            raise ValueError(f"peft.quantize_base={self.quantize_base!r} is not one of {QUANTIZE}")
        if self.method == "none":
            return
        if self.rank < 1:
            raise ValueError(f"peft.rank={self.rank} must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"peft.dropout={self.dropout} must be in [0, 1)")
        if linear_names is None:
            linear_names = tuple(dict.fromkeys(n for s in load_builtin_families() for n in s.linear_names()))
        for target in self.target_modules:
            if refused and target in refused:
                raise ValueError(f"peft.target_modules: {target!r} cannot be adapted: {refused[target]}")
        unknown = [t for t in self.target_modules if t != "all-linear" and t not in linear_names]
        if unknown:
            raise ValueError(
                f"peft.target_modules: {unknown} are not linear layers of the model; choose from "
                f"{list(linear_names)} or 'all-linear'"
            )
        if self.use_dora and self.quantize_base != "none":
            raise ValueError("peft.use_dora=true with peft.quantize_base=nf4 is not supported; pick one")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


class LoRALinear(nn.Linear):
    """A frozen linear layer (dense, or NF4 when quantized) plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, cfg: PeftConfig) -> None:
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.lora_A = nn.Linear(self.in_features, cfg.rank, bias=False, device="meta")
        self.lora_B = nn.Linear(cfg.rank, self.out_features, bias=False, device="meta")
        self.lora_magnitude_vector = (
            nn.Parameter(torch.empty(self.out_features, device="meta")) if cfg.use_dora else None
        )
        self.scaling = cfg.scaling
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.quantized = cfg.quantize_base == "nf4"
        if self.quantized:
            # The base lives in buffers (which FSDP leaves unsharded) instead of the parameter `weight`.
            numel = self.in_features * self.out_features
            del self.weight
            # Not persistent: checkpoints hold the adapters, and the base is re-read from model.pretrained.
            self.register_buffer(
                "weight_nf4", torch.empty(numel // 2, dtype=torch.uint8, device="meta"), persistent=False
            )
            self.register_buffer(
                "weight_absmax", torch.empty(numel // cfg.nf4_block_size, device="meta"), persistent=False
            )
            self.nf4_block_size = cfg.nf4_block_size

    @property
    def base_shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    @torch.no_grad()
    def set_quantized_base(self, full_weight: torch.Tensor) -> None:
        packed, absmax = quantize_nf4(full_weight.to(self.weight_nf4.device), self.nf4_block_size)
        self.weight_nf4.copy_(packed)
        self.weight_absmax.copy_(absmax)

    def dense_base(self, dtype: torch.dtype) -> torch.Tensor:
        if self.quantized:
            return dequantize_nf4(self.weight_nf4, self.weight_absmax, self.base_shape, dtype)
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized:
            base = nf4_linear(x, self.weight_nf4, self.weight_absmax, self.base_shape)
        else:
            base = F.linear(x, self.weight)
        dropped = self.dropout(x)
        update = self.lora_B(self.lora_A(dropped)) * self.scaling
        if self.lora_magnitude_vector is None:
            out = base + update
        else:
            delta = (self.lora_B.weight @ self.lora_A.weight) * self.scaling
            norm = (self.weight + delta.to(self.weight.dtype)).norm(dim=1).detach()
            scale = (self.lora_magnitude_vector / norm).to(x.dtype)
            base_dropped = base if isinstance(self.dropout, nn.Identity) else F.linear(dropped, self.weight)
            out = base + (scale - 1) * base_dropped + scale * update
        return out if self.bias is None else out + self.bias


def apply_lora(model: nn.Module, cfg: PeftConfig, linear_names: tuple[str, ...] | None = None) -> list[str]:
    """Replace the targeted linear layers of `model` (on the meta device) in place and freeze everything that is
    not an adapter; returns the adapted module names. With `linear_names` (the family's
    `ModelSpec.linear_names`), `all-linear` adapts only linear layers of those names: an MoE router's gate is a
    linear layer in the blocks but no projection to adapt (models/moe/__init__.py says why)."""
    targets = cfg.targets()
    adapted: list[str] = []
    for name, module in list(model.named_modules()):
        in_blocks = name == "layers" or name.startswith("layers.")
        for child_name, child in list(module.named_children()):
            if targets is None:
                wanted = in_blocks and (linear_names is None or child_name in linear_names)
            else:
                wanted = child_name in targets
            if wanted and type(child) is nn.Linear:
                setattr(module, child_name, LoRALinear(child, cfg))
                adapted.append(f"{name}.{child_name}" if name else child_name)
    if not adapted:
        raise ValueError(
            f"peft.target_modules={list(cfg.target_modules)} matched no linear layer of the model"
        )
    for param_name, param in model.named_parameters():
        param.requires_grad_(".lora_" in param_name)
    return adapted


def _layout_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if isinstance(like, DTensor):
        return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()
    return full


@torch.no_grad()
def finish_adapters(model: nn.Module) -> None:
    """After the base weights are in place: set DoRA magnitudes to the row norms of the base weight (so training
    starts from the base model). Every rank must call this: sharded bases are gathered."""
    for module in model.modules():
        magnitude = getattr(module, "lora_magnitude_vector", None) if isinstance(module, LoRALinear) else None
        if magnitude is not None:
            weight = module.weight.full_tensor() if isinstance(module.weight, DTensor) else module.weight
            norms = weight.float().norm(dim=1).to(magnitude.dtype)
            local = magnitude.to_local() if isinstance(magnitude, DTensor) else magnitude
            local.copy_(_layout_like(norms, magnitude))


@torch.no_grad()
def init_quantized_bases(model: nn.Module, seed: int) -> None:
    """Random NF4 bases for a model without pretrained weights (benchmarks, tests), drawn from the same per-name
    streams and scales as the model's `init_weights` uses for a dense base (`model.weight_std`), one layer at a
    time (a full-precision copy of every base at once would be 4 bytes per parameter)."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear) and module.quantized:
            full = torch.empty(module.base_shape, device=module.weight_nf4.device)
            weight_name = canonical_name(f"{name}.weight")
            fill_(full, weight_name, seed, std=model.weight_std(weight_name))
            module.set_quantized_base(full)


def merged_weight(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """The dense weight that equals base + adapter: W + s·B A, or for DoRA m ⊙ (W + s·B A) / ‖W + s·B A‖_row."""
    merged = weight.float() + scaling * (lora_B.float() @ lora_A.float())
    if magnitude is not None:
        merged = merged * (magnitude.float() / merged.norm(dim=1))[:, None]
    return merged


def adapter_state(model: nn.Module) -> dict[str, Any]:
    """Full (gathered) adapter tensors keyed by canonical parameter name; every rank must call it."""
    out: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        if ".lora_" in name:
            full = param.full_tensor() if isinstance(param, DTensor) else param.detach()
            out[canonical_name(name)] = full.cpu()
    return out


def adapted_names(model: nn.Module) -> list[str]:
    """The module names (last component) that carry adapters, sorted."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, LoRALinear)})


def peft_adapter_config(cfg: PeftConfig, base_model: str | None, target_modules: list[str]) -> dict[str, Any]:
    """The `adapter_config.json` that `peft.PeftModel.from_pretrained` reads for these adapters."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": target_modules,
        "use_rslora": cfg.use_rslora,
        "use_dora": cfg.use_dora,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
