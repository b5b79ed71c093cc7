"""FSDP2 plan: shard each block of `model.layers`, then the root (what is left: embedding, final norm, output).

Communication (per block, ZeRO-3): forward all-gathers the block's parameters before it runs and frees them
after (`reshard_after_forward=True`); backward all-gathers them again and reduce-scatters the gradients in
`reduce_dtype`. ZeRO-2 (`reshard_after_forward=False`) keeps the gathered parameters from forward to backward,
trading memory for one all-gather per block. With HSDP the mesh is 2-D and gradients are additionally
all-reduced across `dp_replicate`.

Parameter offload (`memory.param_offload=cpu`, ZeRO-Offload's placement, Ren et al. 2021): FSDP2's
`CPUOffloadPolicy` keeps the sharded parameters, their gradients and therefore the optimizer states in
(pinned) host memory. Each all-gather first copies the shard host-to-device; each reduce-scatter's output is
copied device-to-host; the optimizer step runs on the CPU (torch's fused CPU AdamW).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)

from treadle.parallel.config import ParallelConfig

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_dtype(name: str, device: torch.device, key: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"{key}={name!r} is not one of {['auto', *DTYPES]}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, d in DTYPES.items() if d == dtype)


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    cfg: ParallelConfig,
    device: torch.device,
    *,
    cpu_offload: bool = False,
    expert_units: list[nn.Module] = (),
    expert_mesh: DeviceMesh | None = None,
    expert_grad_divide: float = 1.0,
) -> None:
    """Shard `model` (see the module docstring). `expert_units` (parallel/ep.py) are MoE expert weights: each
    its own unit over `expert_mesh` (efsdp, with dp_replicate under HSDP), wrapped before its block, with its
    reduced gradient divided by `expert_grad_divide` (the dp_cp size; parallel/ep.py says why)."""
    param_dtype = resolve_dtype(cfg.param_dtype, device, "parallel.param_dtype")
    mp_policy = MixedPrecisionPolicy(
        param_dtype=param_dtype, reduce_dtype=resolve_dtype(cfg.reduce_dtype, device, "parallel.reduce_dtype")
    )
    # Frozen parameters (a LoRA base) are never updated, so an fp32 master copy of them would only cost memory:
    # they are stored in the compute dtype. FSDP2 requires one dtype only among the trainable parameters.
    for param in model.parameters():
        if not param.requires_grad:
            param.data = param.data.to(param_dtype)
    # Pinned host memory makes the host-device copies asynchronous; it needs CUDA.
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if cpu_offload else OffloadPolicy()
    # With one rank on the shard axis resharding frees only FSDP's unsharded copy of the parameters, at the cost
    # of repeating that copy in backward: worth it when frozen weights (a LoRA base) are most of the memory, since
    # the copy would double them; otherwise a trainable parameter's gradient and optimizer state dwarf it.
    has_frozen = any(not p.requires_grad for p in model.parameters())
    reshard = cfg.reshard_after_forward and (mesh.size(mesh.ndim - 1) > 1 or has_frozen)
    for unit in expert_units:
        fully_shard(
            unit, mesh=expert_mesh, mp_policy=mp_policy, offload_policy=offload, reshard_after_forward=reshard
        )
        unit.set_gradient_divide_factor(expert_grad_divide)
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again at once by backward: resharding them is wasted work.
        fully_shard(
            block,
            mesh=mesh,
            mp_policy=mp_policy,
            offload_policy=offload,
            reshard_after_forward=reshard and i < len(blocks) - 1,
        )
    # The root (embedding, final norm, output layer) is not resharded after forward: the loss, applied by the
    # engine right after it, multiplies by the output weight, and backward would all-gather the root at once.
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, offload_policy=offload, reshard_after_forward=False)
    _set_prefetch(blocks, cfg.fsdp_prefetch_forward, cfg.fsdp_prefetch_backward)


def _set_prefetch(blocks: list[nn.Module], forward: int, backward: int) -> None:
    """Explicit prefetch: issue the all-gather of the next `forward` (previous `backward`) blocks early so it
    overlaps the current block's compute. FSDP2's implicit prefetch already covers one block; deeper
    prefetch helps when all-gathers are slow relative to a block's compute, at the cost of memory."""
    if forward > 1:
        for i, block in enumerate(blocks):
            nxt = [b for b in blocks[i + 1 : i + 1 + forward] if isinstance(b, FSDPModule)]
            if isinstance(block, FSDPModule) and nxt:
                block.set_modules_to_forward_prefetch(nxt)
    if backward > 1:
        for i, block in enumerate(blocks):
            prev = [b for b in reversed(blocks[max(0, i - backward) : i]) if isinstance(b, FSDPModule)]
            if isinstance(block, FSDPModule) and prev:
                block.set_modules_to_backward_prefetch(prev)


def apply_compile(model: nn.Module, *, fullgraph: bool = True) -> None:
    """Compile each block (fullgraph) before FSDP wraps it, so FSDP's hooks stay outside the compiled graph.

    `torch.compile(block)` rather than `block.compile()`: the latter compiles `__call__` with its hooks, and
    FSDP2's hooks are not traceable. The wrapper adds `_orig_mod.` to parameter names; `models.init` and
    DCP's state-dict helpers strip it, so checkpoints keep the plain names. Blocks share one compiled graph,
    so compile time does not grow with depth.
    """
    for name, block in model.layers.named_children():
        model.layers.register_module(name, torch.compile(block, fullgraph=fullgraph))
