"""Model builders. A model registers a `ModelSpec`; the trainer looks it up by `model.name`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn as nn

from treadle.models import llama
from treadle.models.ops import KernelsConfig


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[[llama.ModelConfig, KernelsConfig], nn.Module]
    flops_per_token: Callable[[llama.ModelConfig, int], float]


_MODELS: dict[str, ModelSpec] = {
    "llama": ModelSpec(name="llama", build=llama.Llama, flops_per_token=llama.flops_per_token),
}


def register_model(spec: ModelSpec) -> None:
    _MODELS[spec.name] = spec


def get_model_spec(name: str) -> ModelSpec:
    if name not in _MODELS:
        raise ValueError(f"model.name={name!r} is not a registered model; choose one of {sorted(_MODELS)}")
    return _MODELS[name]
