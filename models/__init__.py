"""Model families. Each registers a `ModelSpec` (models/spec.py); the trainer looks it up by `model.name`."""

from __future__ import annotations

from treadle.models.spec import ModelSpec, get_model_spec, load_builtin_families, register_model

__all__ = ["ModelSpec", "get_model_spec", "load_builtin_families", "register_model"]
