"""Context parallelism: each of `cp` ranks holds a slice of every sequence, and attention is made global.

Shape legend: B batch, S full sequence, s = S/cp local sequence, H query heads, K key/value heads, D head dim.

Sharding (load-balanced causal, as in Llama 3 §3.3.2 / Megatron-CP): the sequence is cut into 2·cp chunks
and rank r keeps chunks r and 2·cp−1−r, so every rank gets the same amount of causal attention work. The
trainer's batches are sliced this way by `shard_batch` (tokens, labels, positions, document ids); every other
op is per-token and needs nothing more. Two ways to make attention see the whole sequence:

- ring (Liu et al. 2023, Ring Attention; `parallel/ring.py`): key/value slices travel around the `cp` ring
  with point-to-point sends while each rank attends its queries to the slice it holds; partial results are
  merged with their log-sum-exps (the online softmax of FlashAttention). Backward passes the slices around
  again, with their gradient accumulators, which arrive back at their owner after `cp` hops. Each block runs
  the Triton FlashAttention-2 kernels when the model's attention op is `kernels.attention=triton`, and exact
  fp32 einsums otherwise.
- ulysses (Jacobs et al. 2023, DeepSpeed-Ulysses): an all-to-all turns [B, s, H, D] into [B, S, H/cp, D] — the
  whole sequence for a slice of the heads — so any attention op (SDPA, the Triton kernel) runs unchanged,
  and a second all-to-all turns the output back. Needs the query and key/value head counts divisible by cp.

Both handle packed documents: ring sends each slice's document ids with it and masks every block by them;
ulysses all-gathers the document ids and attends over the re-assembled sequence.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.distributed.device_mesh import DeviceMesh

from treadle.parallel.ring import RingAttention, ring_blocks

CP_VARIANTS = ("ring", "ulysses")


def load_balanced_indices(
    seq_len: int, cp: int, rank: int, device: torch.device | None = None
) -> torch.Tensor:
    """Global sequence positions held by `rank`: chunk `rank` followed by chunk `2·cp−1−rank`."""
    chunk = seq_len // (2 * cp)
    first = torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
    second = torch.arange((2 * cp - 1 - rank) * chunk, (2 * cp - rank) * chunk, device=device)
    return torch.cat([first, second])


def shard_sequences(cp_mesh: DeviceMesh, *tensors_BS: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """This rank's load-balanced slice (dim 1) of each per-token tensor of one batch (no communication)."""
    first = next(t for t in tensors_BS if t is not None)
    index = load_balanced_indices(first.shape[1], cp_mesh.size(), cp_mesh.get_local_rank(), first.device)
    return tuple(None if t is None else t.index_select(1, index) for t in tensors_BS)


def _seq_to_heads(x_BsXD: torch.Tensor, group: dist.ProcessGroup, cp: int) -> torch.Tensor:
    """[B, s, X, D] → [B, S, X/cp, D] with the sequence in rank-concatenated order (one all-to-all)."""
    b, s, x, d = x_BsXD.shape
    send = x_BsXD.reshape(b, s, cp, x // cp, d).permute(2, 0, 1, 3, 4).contiguous()
    recv = funcol.all_to_all_single_autograd(send, None, None, group)
    return funcol.wait_tensor(recv).permute(1, 0, 2, 3, 4).reshape(b, cp * s, x // cp, d)


def _heads_to_seq(x_BSXD: torch.Tensor, group: dist.ProcessGroup, cp: int) -> torch.Tensor:
    """The inverse of `_seq_to_heads`: [B, S, X/cp, D] → [B, s, X, D]."""
    b, seq, xc, d = x_BSXD.shape
    send = x_BSXD.reshape(b, cp, seq // cp, xc, d).permute(1, 0, 2, 3, 4).contiguous()
    recv = funcol.wait_tensor(funcol.all_to_all_single_autograd(send, None, None, group))
    return recv.permute(1, 2, 0, 3, 4).reshape(b, seq // cp, cp * xc, d)


class ContextParallelAttention:
    """The `attention` op under context parallelism; wraps the model's own attention op (`inner`)."""

    def __init__(self, inner, cp_mesh: DeviceMesh, variant: str):
        if variant not in CP_VARIANTS:
            raise ValueError(f"parallel.cp_variant={variant!r} is not one of {CP_VARIANTS}")
        self.inner, self.variant = inner, variant
        self.group, self.cp = cp_mesh.get_group(), cp_mesh.size()

    def __call__(self, q_BsHD, k_BsKD, v_BsKD, *, causal: bool = True, doc_ids_BS=None) -> torch.Tensor:
        assert causal, "context parallelism here is for causal decoders"
        if self.variant == "ring":
            blocks = ring_blocks(self.inner, q_BsHD.shape[-1])
            return RingAttention.apply(q_BsHD, k_BsKD, v_BsKD, doc_ids_BS, self.group, blocks)
        return self._ulysses(q_BsHD, k_BsKD, v_BsKD, doc_ids_BS, q_BsHD.shape[1] * self.cp)

    def _ulysses(self, q_BsHD, k_BsKD, v_BsKD, doc_ids_BS, seq_len: int) -> torch.Tensor:
        device = q_BsHD.device
        # Rank-concatenated order → natural order of the full sequence, and back.
        concat = torch.cat([load_balanced_indices(seq_len, self.cp, r, device) for r in range(self.cp)])
        to_natural = torch.argsort(concat)
        q, k, v = (
            _seq_to_heads(t, self.group, self.cp).index_select(1, to_natural)
            for t in (q_BsHD, k_BsKD, v_BsKD)
        )
        docs = None
        if doc_ids_BS is not None:
            gathered = [torch.empty_like(doc_ids_BS) for _ in range(self.cp)]
            dist.all_gather(gathered, doc_ids_BS.contiguous(), group=self.group)
            docs = torch.cat(gathered, dim=1).index_select(1, to_natural)
        out_BSHD = self.inner(q, k, v, causal=True, doc_ids_BS=docs)
        return _heads_to_seq(out_BSHD.index_select(1, concat), self.group, self.cp)


def apply_cp(model: torch.nn.Module, cp_mesh: DeviceMesh, variant: str) -> None:
    model.ops.attention = ContextParallelAttention(model.ops.attention, cp_mesh, variant)
