"""4-bit NormalFloat (NF4) storage for frozen weights, as in QLoRA (Dettmers et al. 2023, §3).

A weight is cut into blocks of `block_size` consecutive values; each block stores its absolute maximum (fp32)
and, per value, the index (4 bits, two per byte) of the nearest of 16 levels: the quantiles of a standard normal
rescaled to [-1, 1], with an exact zero (the paper's eq. 4 construction). A frozen 8B base thus takes ~4.5 GB
instead of 16 GB in bf16. The absmax constants are kept in fp32 (the paper's second, "double" quantization of
them, which saves another 0.37 bit per value, is not done).

Matmuls dequantize the weight to the activation dtype on the fly, in forward and again in backward (only the
gradient of the input is needed: the base weight is frozen), so no full-precision copy outlives one layer.
"""

from __future__ import annotations

import torch

# The 16 NF4 levels (QLoRA appendix E / bitsandbytes' table), ascending; index 7 is exactly zero.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip


_LEVEL_TABLES: dict[torch.device, torch.Tensor] = {}


def _levels(device: torch.device) -> torch.Tensor:
    """The level table on `device`, made once: dequantization runs on every matmul, a host-to-device copy of
    the table each time would be on the hot path."""
    table = _LEVEL_TABLES.get(device)
    if table is None:
        table = _LEVEL_TABLES[device] = torch.tensor(NF4_LEVELS, device=device)
    return table


def quantize_nf4(weight: torch.Tensor, block_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 codes [numel/2], fp32 block absmax [numel/block_size]) of `weight`."""
    if weight.numel() % block_size:
        raise ValueError(
            f"NF4 needs a weight size divisible by the block size {block_size}, got {weight.numel()}"
        )
    blocks = weight.detach().float().reshape(-1, block_size)
    absmax = blocks.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    normalized = (blocks / absmax[:, None]).flatten()
    levels = _levels(weight.device)
    # Nearest level = count of midpoints below the value (levels are sorted).
    codes = torch.bucketize(normalized, (levels[1:] + levels[:-1]) / 2).to(torch.uint8)
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed, absmax


def dequantize_nf4(
    packed: torch.Tensor, absmax: torch.Tensor, shape: torch.Size | tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    levels = _levels(packed.device)
    codes = torch.stack(((packed >> 4) & 0xF, packed & 0xF), dim=1).flatten().long()
    values = levels[codes].reshape(absmax.numel(), -1) * absmax[:, None]
    return values.reshape(shape).to(dtype)


class NF4Linear(torch.autograd.Function):
    """y = x · dequant(W)ᵀ. Backward returns dx = dy · dequant(W) only; W is frozen and gets no gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, shape: torch.Size):  # type: ignore[override]
        ctx.save_for_backward(packed, absmax)
        ctx.shape = shape
        return x @ dequantize_nf4(packed, absmax, shape, x.dtype).t()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        packed, absmax = ctx.saved_tensors
        return grad_out @ dequantize_nf4(packed, absmax, ctx.shape, grad_out.dtype), None, None, None


def nf4_linear(
    x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, shape: torch.Size
) -> torch.Tensor:
    if torch.compiler.is_compiling():
        # Compiled (blocks are compiled with their activation checkpointing), plain ops let the partitioner
        # recompute the dequantization in backward; measured on an H100, the autograd Function inside a
        # checkpointed compiled block instead kept every block's activations (8B QLoRA: 38 GiB vs 22 eager).
        return x @ dequantize_nf4(packed, absmax, shape, x.dtype).t()
    return NF4Linear.apply(x, packed, absmax, shape)
