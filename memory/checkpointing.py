"""Activation checkpointing applied per transformer block: keep less in forward, recompute in backward.

Modes (`memory.activation_checkpoint`):
- none: keep every activation autograd saves.
- full: keep only each block's input; the whole block is recomputed in backward (about one extra forward,
  ~33% more FLOPs, for the least memory).
- every_k: `full` on every `memory.ac_every`-th block only — a memory/compute dial between none and full.
- selective: op-level (Korthikanti et al. 2022, "Reducing Activation Recomputation", §4): the outputs of
  matmuls and attention — expensive to recompute — are kept, while the cheap elementwise ops around them
  (norms, RoPE, SwiGLU, residual adds) are recomputed, through torch's selective checkpoint API.

`MemoryConfig` also holds the settings of activation compression and offload (memory/activations.py) and of
FSDP2's parameter offload (parallel/fsdp.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

AC_MODES = ("none", "full", "every_k", "selective")

# Ops whose outputs selective checkpointing keeps: matmuls (grouped ones too) and every SDPA backend, plus
# treadle's Triton attention (its custom op, when registered), whose recomputation would cost as much as the
# forward, and the MoE all-to-alls.
_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_mm.default,  # FP8 linears (parallel/fp8.py)
    torch.ops.aten._grouped_mm.default,  # MoE experts (kernels/moe_reference.py)
    # Expert parallelism's all-to-all exchanges (parallel/ep.py): recomputing them would repeat the
    # communication in backward.
    torch.ops._c10d_functional.all_to_all_single.default,
    torch.ops._c10d_functional.wait_tensor.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}


COMPRESSION_MODES = ("none", "fp8")
PARAM_OFFLOAD_MODES = ("none", "cpu")


@dataclass(kw_only=True)
class MemoryConfig:
    activation_checkpoint: str = "none"  # none | full | every_k | selective (see memory/checkpointing.py)
    ac_every: int = 2  # with every_k: checkpoint blocks 0, k, 2k, ...
    # none | fp8: saved activations stored as per-group E4M3 (COAT §5; memory/activations.py)
    activation_compression: str = "none"
    compression_group_size: int = 128  # elements per FP8 scale along the last dim
    activation_offload: bool = False  # saved activations to pinned host memory (memory/offload.py)
    # none | cpu: FSDP2 keeps sharded parameters, gradients and optimizer states in host memory
    param_offload: str = "none"

    def validate(self) -> None:
        if self.activation_checkpoint not in AC_MODES:
            raise ValueError(
                f"memory.activation_checkpoint={self.activation_checkpoint!r} is not one of {AC_MODES}"
            )
        if self.ac_every < 1:
            raise ValueError(f"memory.ac_every={self.ac_every} must be >= 1")
        if self.activation_compression not in COMPRESSION_MODES:
            raise ValueError(
                f"memory.activation_compression={self.activation_compression!r} is not one of "
                f"{COMPRESSION_MODES}"
            )
        if self.compression_group_size < 1:
            raise ValueError(f"memory.compression_group_size={self.compression_group_size} must be >= 1")
        if self.param_offload not in PARAM_OFFLOAD_MODES:
            raise ValueError(
                f"memory.param_offload={self.param_offload!r} is not one of {PARAM_OFFLOAD_MODES}"
            )


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if op in _SAVE_OPS or getattr(op, "namespace", None) == "treadle":
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


# Ops selective checkpointing must neither cache nor count: profiler annotations and FSDP2's own all-gather /
# reduce-scatter machinery. A module FSDP-sharded inside a checkpointed block (the MoE experts' unit) runs them
# a different number of times in forward and in recomputation (prefetching differs), which would break the
# per-op replay counters torch's selective checkpointing keys its cache by. They are runtime, not model math,
# so they simply run each time.
_SAC_BYPASS_NAMESPACES = frozenset({"profiler", "fsdp", "c10d"})
_bypass_classes: dict[type, type] = {}


def _bypassing(mode):
    cls = type(mode)
    if cls not in _bypass_classes:

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if getattr(func, "namespace", None) in _SAC_BYPASS_NAMESPACES:
                return func(*args, **(kwargs or {}))
            return cls.__torch_dispatch__(self, func, types, args, kwargs)

        _bypass_classes[cls] = type(cls.__name__, (cls,), {"__torch_dispatch__": __torch_dispatch__})
    mode.__class__ = _bypass_classes[cls]
    return mode


def _selective_contexts():
    forward_mode, recompute_mode = create_selective_checkpoint_contexts(_selective_policy)
    return _bypassing(forward_mode), _bypassing(recompute_mode)


def apply_activation_checkpointing(blocks: nn.ModuleDict, cfg: MemoryConfig) -> None:
    """Wrap blocks in place. Non-reentrant checkpointing: it composes with FSDP2 and torch.compile."""
    mode = cfg.activation_checkpoint
    if mode == "none":
        return
    for i, (name, block) in enumerate(blocks.items()):
        if mode == "every_k" and i % cfg.ac_every:
            continue
        if mode == "selective":
            blocks[name] = checkpoint_wrapper(block, context_fn=_selective_contexts, preserve_rng_state=False)
        else:
            blocks[name] = checkpoint_wrapper(block, preserve_rng_state=False)
