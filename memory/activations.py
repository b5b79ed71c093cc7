"""Where saved activations live: FP8-compressed (`memory.activation_compression=fp8`, memory/compression.py)
and/or in host memory (`memory.activation_offload=true`, memory/offload.py).

Both act through `torch.autograd.graph.saved_tensors_hooks` around each transformer block's forward: every
tensor autograd saves inside the block is packed (compressed, then offloaded) and unpacked in backward.
The hooks are entered by forward pre/post hooks of the block module itself, so parameter names do not change
and the hooks sit outside a compiled block: Dynamo cannot trace `saved_tensors_hooks` (torch 2.11–2.13), but
a compiled block's autograd node saves its tensors through the hooks active around it, so the packing runs
eagerly on what the compiled graph keeps for backward.

What is packed: floating tensors of at least `min_numel` elements that are not parameters or views of
parameters (weights are resident anyway; FSDP2 manages the gathered ones). Compression leaves out FP8
tensors, already as small as it would make them, and what the attention op saves — q, k, v, its output and
the softmax statistics (logsumexp): backward recomputes the attention probabilities from them, and FP8 noise
in q·k or the logsumexp would move exp(s − lse) multiplicatively. It compresses linear-layer inputs, the
SwiGLU inputs, RMSNorm inputs and RoPE tables (COAT §5 quantises the inputs of linear and non-linear layers
and keeps attention in high precision).

Attention is told apart by running it inside `exempt_from_compression`, a Python-side scope. Under
torch.compile the attention call is therefore kept out of the graph (`torch._dynamo.disable`): a compiled
block becomes two graphs (before and after attention, each fused by Inductor) with the attention op between
them in eager mode, and the engine compiles blocks with `fullgraph=False` when compression is on.

A tensor saved several times within a block (the normed input of q/k/v, of gate/up) is packed once.
Composition with activation checkpointing: a checkpointed region's own hooks take precedence inside it, so
with `full` AC only each block's input passes through these hooks.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from contextlib import contextmanager
from functools import wraps
from typing import Any

import torch
import torch.nn as nn

from treadle.memory.checkpointing import MemoryConfig
from treadle.memory.compression import CompressedTensor, dequantize_groups, quantize_groups
from treadle.memory.offload import OffloadedTensor, Offloader

# Below this, a tensor costs more in bookkeeping (and a copy launch) than it saves.
MIN_NUMEL = 1 << 14


class SavedActivationHooks:
    """pack/unpack for `saved_tensors_hooks`, with per-block scopes (`enter`/`exit`) and byte counters."""

    def __init__(
        self,
        *,
        compress: bool,
        offload: bool,
        group_size: int = 128,
        min_numel: int = MIN_NUMEL,
        host_copy: bool = False,
    ) -> None:
        self.compress, self.offload, self.group_size, self.min_numel = (
            compress,
            offload,
            group_size,
            min_numel,
        )
        self.offloader = Offloader(host_copy=host_copy)
        self.host_copy = host_copy
        self._scopes: list[torch.autograd.graph.saved_tensors_hooks] = []
        # Within a scope: the tensor's memory and layout -> (tensor, packed). Holding the tensor keeps its
        # storage from being reused by another tensor while the key is live.
        self._packed: dict[tuple, tuple[torch.Tensor, Any]] = {}
        self._exempt = 0
        self.packed_bytes = 0  # bytes kept for backward by the packed tensors, over every scope so far
        self.input_bytes = 0  # bytes those tensors had before packing

    def reset_counters(self) -> None:
        self.packed_bytes = self.input_bytes = 0

    def enter(self) -> None:
        hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        hooks.__enter__()
        self._scopes.append(hooks)
        if self.offload:
            self.offloader.new_group()

    def exit(self) -> None:
        self._scopes.pop().__exit__(None, None, None)
        if not self._scopes:
            self._packed.clear()

    @contextmanager
    def exempt_from_compression(self):
        self._exempt += 1
        try:
            yield
        finally:
            self._exempt -= 1

    def _eligible(self, t: torch.Tensor) -> bool:
        if not t.is_floating_point() or t.numel() < self.min_numel or isinstance(t, nn.Parameter):
            return False
        base = t._base
        return not (base is not None and isinstance(base, nn.Parameter))

    def pack(self, t: torch.Tensor) -> Any:
        if not self._eligible(t):
            return t
        # Views of one tensor (the [B·S, E] view each linear takes of a shared input) are distinct objects:
        # the key is the memory they read, so they share one packed copy.
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride(), t.dtype, t._version)
        hit = self._packed.get(key)
        if hit is not None:
            return hit[1]
        nbytes = t.numel() * t.element_size()
        packed: Any = t
        # FP8 tensors are already as small as compression would make them.
        if self.compress and not self._exempt and t.element_size() > 1:
            packed = quantize_groups(t, self.group_size)
        if self.offload and (t.is_cuda or self.host_copy):
            if isinstance(packed, CompressedTensor):
                packed.payload = self.offloader.offload(packed.payload)
                packed.inv_scale = self.offloader.offload(packed.inv_scale)
            else:
                packed = self.offloader.offload(t)
        self.input_bytes += nbytes
        self.packed_bytes += _device_bytes(packed)
        self._packed[key] = (t, packed)
        return packed

    def unpack(self, packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        if isinstance(packed, OffloadedTensor):
            return self.offloader.fetch(packed)
        payload, inv_scale = packed.payload, packed.inv_scale
        if isinstance(payload, OffloadedTensor):
            payload, inv_scale = self.offloader.fetch(payload), self.offloader.fetch(inv_scale)
        return dequantize_groups(CompressedTensor(payload, inv_scale, packed.shape, packed.dtype))


def _device_bytes(packed: Any) -> int:
    """Bytes that stay on the compute device (offloaded tensors count 0)."""
    if isinstance(packed, torch.Tensor):
        return packed.numel() * packed.element_size()
    if isinstance(packed, OffloadedTensor):
        return 0
    return sum(
        0 if isinstance(t, OffloadedTensor) else t.numel() * t.element_size()
        for t in (packed.payload, packed.inv_scale)
    )


def install_block_hooks(blocks: nn.ModuleDict, hooks: SavedActivationHooks) -> None:
    """Enter `hooks` around each block's forward (always exited, even when forward raises)."""
    for block in blocks.values():
        block.register_forward_pre_hook(lambda module, args: hooks.enter())
        block.register_forward_hook(lambda module, args, output: hooks.exit(), always_call=True)


def _exempt_op(op: Callable[..., Any], hooks: SavedActivationHooks) -> Callable[..., Any]:
    """`op` run with compression off for what it saves; kept out of compiled graphs, where the Python-side
    scope would be traced away (see the module doc)."""

    @wraps(op)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with hooks.exempt_from_compression():
            return op(*args, **kwargs)

    return torch._dynamo.disable(wrapped)


def apply_activation_memory(
    model: nn.Module, cfg: MemoryConfig, device: torch.device
) -> SavedActivationHooks | None:
    """Install compression and/or offload on `model.layers`; after CP and compile, before FSDP."""
    compress = cfg.activation_compression == "fp8"
    offload = cfg.activation_offload
    if offload and device.type != "cuda":
        warnings.warn(
            f"memory.activation_offload=true has no effect on {device}: activations already live in host "
            f"memory",
            stacklevel=2,
        )
        offload = False
    if not (compress or offload):
        return None
    hooks = SavedActivationHooks(compress=compress, offload=offload, group_size=cfg.compression_group_size)
    install_block_hooks(model.layers, hooks)
    if compress:
        model.ops.attention = _exempt_op(model.ops.attention, hooks)
    return hooks
