"""Layout-independent weight initialisation.

Every parameter is filled from its own random stream, seeded by (run seed, parameter name). The values a
parameter gets are therefore the same on one device and under any sharding: a sharded (DTensor) parameter
draws its full tensor on its own device and keeps its local shard (`distribute_tensor(..., src_data_rank=None)`
slices locally and sends nothing). That is what lets every parallel layout start from identical weights, which
the parity tests rely on. The cost is one transient full-size tensor per parameter while initialising.
"""

from __future__ import annotations

import hashlib

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

# Wrappers that torch inserts into parameter names (activation checkpointing, torch.compile); a parameter's
# identity for seeding and checkpoints is its name without them.
# LOSS_WRAPPER: the child name under which an engine runs a model part and the loss in one module
# (parallel/deepspeed_engine.py).
LOSS_WRAPPER = "_loss_wrapped_module"
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.", f"{LOSS_WRAPPER}.")


def canonical_name(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _stream(seed: int, name: str, device: torch.device) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{canonical_name(name)}".encode()).digest()
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return generator


@torch.no_grad()
def fill_(
    param: torch.Tensor,
    name: str,
    seed: int,
    *,
    std: float | None,
    constant: float = 1.0,
    truncate: float = 3.0,
) -> None:
    """Fill `param` with N(0, std^2) truncated at ±truncate·std, or with `constant` when `std` is None.

    Draws in fp32 and casts, so the values do not depend on the parameter's storage dtype either.
    """
    is_dtensor = isinstance(param, DTensor)
    local = param.to_local() if is_dtensor else param
    if std is None:
        local.fill_(constant)
        return
    full = torch.empty(param.shape, dtype=torch.float32, device=local.device)
    torch.nn.init.trunc_normal_(
        full,
        mean=0.0,
        std=std,
        a=-truncate * std,
        b=truncate * std,
        generator=_stream(seed, name, local.device),
    )
    if is_dtensor:
        full = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
    local.copy_(full)
