"""The Llama family (Llama 2/3/3.1, Mistral, Qwen2, Qwen3 shapes): one `ModelSpec`, registered on import.

model.py   config dataclass, module, FLOP count
plan.py    TP plan (data), pipeline split, shape checks against the parallel degrees
hf.py      Hugging Face adapter (architectures, config.json fields, parameter names)
"""

from __future__ import annotations

from treadle.models.llama.hf import HF_ADAPTER
from treadle.models.llama.model import (
    Llama,
    ModelConfig,
    RopeScalingConfig,
    TransformerBlock,
    flops_per_token,
    rope_frequencies,
)
from treadle.models.llama.plan import TP_PLAN, pipeline_split, validate
from treadle.models.spec import ModelSpec, register_model

SPEC = ModelSpec(
    name="llama",
    config_cls=ModelConfig,
    build=Llama,
    flops_per_token=flops_per_token,
    validate=validate,
    tp_plan=TP_PLAN,
    ep_plan={},
    pipeline_split=pipeline_split,
    hf_adapter=HF_ADAPTER,
)
register_model(SPEC)

__all__ = [
    "SPEC",
    "TP_PLAN",
    "Llama",
    "ModelConfig",
    "RopeScalingConfig",
    "TransformerBlock",
    "flops_per_token",
    "rope_frequencies",
]
