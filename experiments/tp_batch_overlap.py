"""`parallel.tp_batch_overlap`: each block's micro-batch runs as batch chunks interleaved sublayer by sublayer
(DeepSpeed Domino, Wang et al. 2024, "Domino: Eliminating Communication in LLM Training via Generic Tensor
Slicing and Overlapping", its batch split only).

Without sequence parallelism a TP block has one all-reduce after each row-parallel sublayer (attention's output
projection, the MLP's down projection) and, in backward, one after each column-parallel input (the gradient of
the replicated activations). With chunks c0, c1 in the order attention(c0), attention(c1), mlp(c0), mlp(c1),
nothing c1 computes waits for c0's all-reduce: the collective runs on the communication stream while c1's GEMMs
run, and backward (autograd follows the reverse order) interleaves the same way. The collectives are ordinary
async ones. Eager, DTensor's functional all-reduce is waited at its first use. Traced, the wait follows the
collective at once, so compiled blocks need Inductor's compute/communication reordering
(`parallel.tp.enable_comm_reordering`; the engine turns it on with this option). The price is GEMMs on half the
rows. Sequence parallelism has an all-gather *before* each sublayer's GEMMs, on the critical path of its own
chunk, so the option requires it off (checked in config).

Measured (2 H200s, 1B, seq 4096, compiled; benchmarks/async_tp.sh), against plain TP+SP: 1.03-1.06x at
micro-batch 4 and 1.03x at 8, where TP without SP under the same reordering is 1.02-1.08x. Exposed communication
falls to 8-10 ms/step from 24-34, but the GEMMs slow down beside the all-reduces and at micro-batch 4 the host,
not the GPU, sets the step time.

A block takes part by offering `residual_branches()`: its sublayers as callables, x ← x + branch(x, *context)
in order (the Llama block does). The block's `forward` is replaced on the instance, so parameter names and the
block's place in `model.layers` do not change.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch
import torch.nn as nn


def _split(t: torch.Tensor | None, batch: int, chunks: int) -> list[torch.Tensor | None]:
    # Per-sequence context ([B, ...]: RoPE tables, document ids) is split with the batch; shared context
    # ([1, ...]) and None go to every chunk.
    if t is None or t.shape[0] != batch:
        return [t] * chunks
    return list(t.tensor_split(chunks))


def chunked_forward(
    branches: Callable[[], list[Callable[..., torch.Tensor]]], num_chunks: int
) -> Callable[..., torch.Tensor]:
    """A block forward that runs `branches()` on batch chunks, ordered so that every chunk's sublayer output has
    the next chunk's work to hide its collective behind: branch 1 of every chunk, then per chunk the residual
    add (the first use of its branch-1 all-reduce) and branch 2, and so on; the last residual adds at the end.
    Only the last chunk's last all-reduce has nothing after it in the block. Rows are independent, so the
    result equals the unchunked forward's up to GEMM summation order."""

    def forward(self: nn.Module, x_BSE: torch.Tensor, *context: torch.Tensor | None) -> torch.Tensor:
        batch = x_BSE.shape[0]
        if batch < 2:
            return type(self).forward(self, x_BSE, *context)
        chunks = min(num_chunks, batch)
        xs = list(x_BSE.tensor_split(chunks))
        contexts = list(zip(*(_split(t, batch, chunks) for t in context), strict=True)) or [()] * chunks
        pending: list[torch.Tensor | None] = [None] * chunks
        for branch in branches():
            for c in range(chunks):
                if pending[c] is not None:
                    xs[c] = xs[c] + pending[c]
                pending[c] = branch(xs[c], *contexts[c])
        return torch.cat([x + p for x, p in zip(xs, pending, strict=True)])

    return forward


def apply_batch_overlap(blocks: nn.ModuleDict, *, chunks: int = 2) -> None:
    """Run every block of `blocks` as `chunks` interleaved batch chunks (see the module docstring)."""
    for name, block in blocks.items():
        if not hasattr(block, "residual_branches"):
            raise ValueError(
                f"parallel.tp_batch_overlap=true needs blocks that offer residual_branches(); block {name} is "
                f"{type(block).__name__}; fix: set parallel.tp_batch_overlap=false"
            )
        block.forward = types.MethodType(chunked_forward(block.residual_branches, chunks), block)
