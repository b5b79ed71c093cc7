"""torchao's float8 training (`torchao.float8`, 0.18) as the `fp8.backend=torchao` peer of parallel/fp8.py.

The same linears are converted (parallel/fp8.py selects them; this file only swaps them), at the same point
of the plan, so a run differs from `fp8.backend=treadle` only in the FP8 linear itself. How our config maps
onto torchao's `Float8LinearConfig`:

- `fp8.recipe=tensorwise` → `Float8LinearConfig.from_recipe_name("tensorwise")`: dynamic per-tensor scales,
  E4M3 input and weight, E5M2 grad_output, `_scaled_mm`'s fast accumulation in the forward GEMM only: as
  ours.
- `fp8.recipe=rowwise` → `from_recipe_name("rowwise")`: per-row (axiswise) scales, E4M3 for all three
  operands, as ours; torchao also rounds each scale down to a power of two, which ours does not.
- `fp8.emulate` (or a device without FP8 tensor cores) → `Float8LinearConfig.emulate`: the FP8 operands
  are dequantised and multiplied in the high-precision dtype, so CPU runs and tests exercise the same module.
- `fp8.fsdp_float8_all_gather` (tensorwise only) → `enable_fsdp_float8_all_gather`: each converted weight
  becomes a `WeightWithDynamicFloat8CastTensor` whose FSDP2 pre-all-gather hook casts the local shard to
  E4M3 with the scale of the whole weight, so FSDP2 all-gathers 1 byte per element instead of 2 (bf16) and
  the matmul takes the gathered FP8 weight as is; gradients are still reduce-scattered in `reduce_dtype`.
  That scale needs the amax of the whole weight: without a precomputed scale the hook issues one
  all-reduce (max) per weight over the shard mesh before its all-gather; `precompute_weight_scales`, which
  the engine runs after every optimizer step, computes the amax of all weights with one all-reduce
  (`torchao.float8.precompute_float8_dynamic_scale_for_fsdp`) and leaves each scale on its weight.

`Float8Linear` is an `nn.Linear` subclass with the same `weight` and `bias`, so state-dict keys are those of
the plain model. The all-gather wrapper is a tensor subclass of the same shape and dtype, but a checkpoint
that pickled it could only be read where torchao is imported (`torch.load(weights_only=True)` refuses the
class otherwise); a state-dict hook hands out the plain tensor inside it instead (same storage, so loading
in place still fills the parameter). Checkpoints therefore move between `fp8.backend` settings (and to and
from `fp8.enabled=false`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

TORCHAO_MISSING = (
    "fp8.backend=torchao needs torchao (pip install torchao==0.18.0); or use fp8.backend=treadle"
)


def torchao_available() -> bool:
    return importlib.util.find_spec("torchao") is not None


def convert_with_torchao(
    model: nn.Module, fqns: set[str], recipe: str, *, emulate: bool, fsdp_float8_all_gather: bool
) -> None:
    """Swap the `nn.Linear` modules named in `fqns` for torchao's `Float8Linear`, in place.

    `fsdp_float8_all_gather` is honoured for `recipe=tensorwise` only (torchao gathers tensorwise-scaled
    weights only); the caller decides when it applies.
    """
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as err:
        raise ValueError(TORCHAO_MISSING) from err
    config = dataclasses.replace(
        Float8LinearConfig.from_recipe_name(recipe),
        emulate=emulate,
        enable_fsdp_float8_all_gather=fsdp_float8_all_gather and recipe == "tensorwise",
    )
    # torchao's swap takes every nn.Linear subclass its filter accepts; ours converts plain nn.Linear only
    # (not a LoRALinear, whose forward is its own), so the filter checks the exact type.
    convert_to_float8_training(
        model,
        config=config,
        module_filter_fn=lambda module, fqn: type(module) is nn.Linear and fqn in fqns,
    )
    if config.enable_fsdp_float8_all_gather:
        for fqn in fqns:
            model.get_submodule(fqn).register_state_dict_post_hook(_plain_weight)


def _unwrap(tensor: torch.Tensor) -> torch.Tensor:
    """The plain tensor inside torchao's all-gather wrapper (a view of the same storage), else `tensor`."""
    from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor

    return tensor._tensor if isinstance(tensor, WeightWithDynamicFloat8CastTensor) else tensor


def _plain_weight(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    key = prefix + "weight"
    value = state_dict.get(key)
    if isinstance(value, DTensor):
        local = _unwrap(value._local_tensor)
        if local is not value._local_tensor:
            state_dict[key] = DTensor.from_local(
                local,
                value.device_mesh,
                value.placements,
                run_check=False,
                shape=value.shape,
                stride=value.stride(),
            )
    elif value is not None:
        state_dict[key] = _unwrap(value)


def precompute_weight_scales(model: nn.Module) -> None:
    """Refresh the FP8 scale of every FSDP2-sharded torchao weight from its current values: one all-reduce
    (max) of all weights' amax over the shard mesh. Run after the weights change (optimizer step, load)."""
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    precompute_float8_dynamic_scale_for_fsdp(model)
