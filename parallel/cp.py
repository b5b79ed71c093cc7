"""Context parallelism: each of `cp` ranks holds a slice of every sequence, and attention is made global.

Shape legend: B batch, S full sequence, s = S/cp local sequence, H query heads, K key/value heads, D head dim.

Sharding (load-balanced causal, as in Llama 3 §3.3.2 / Megatron-CP): the sequence is cut into 2·cp chunks
and rank r keeps chunks r and 2·cp−1−r, so every rank gets the same amount of causal attention work. The
trainer's batches are sliced this way by `shard_batch` (tokens, labels, positions, document ids); every other
op is per-token and needs nothing more. Two ways to make attention see the whole sequence:

- ring (Liu et al. 2023, Ring Attention): key/value slices travel around the `cp` ring with point-to-point
  sends while each rank attends its queries to the slice it holds; partial results are merged with their
  log-sum-exps (the online softmax of FlashAttention). Backward passes the slices around again, with their
  gradient accumulators, which arrive back at their owner after `cp` hops.
- ulysses (Jacobs et al. 2023, DeepSpeed-Ulysses): an all-to-all turns [B, s, H, D] into [B, S, H/cp, D] — the
  whole sequence for a slice of the heads — so any attention op (SDPA, the Triton kernel) runs unchanged,
  and a second all-to-all turns the output back. Needs the query and key/value head counts divisible by cp.

Both handle packed documents: ring compares the global token indices and document ids carried with each
slice; ulysses all-gathers the document ids and attends over the re-assembled sequence.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.distributed.device_mesh import DeviceMesh

from treadle.train.data import Batch

CP_VARIANTS = ("ring", "ulysses")


def load_balanced_indices(
    seq_len: int, cp: int, rank: int, device: torch.device | None = None
) -> torch.Tensor:
    """Global sequence positions held by `rank`: chunk `rank` followed by chunk `2·cp−1−rank`."""
    chunk = seq_len // (2 * cp)
    first = torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
    second = torch.arange((2 * cp - 1 - rank) * chunk, (2 * cp - rank) * chunk, device=device)
    return torch.cat([first, second])


def shard_batch(batch: Batch, cp_mesh: DeviceMesh) -> Batch:
    """This rank's load-balanced slice of every per-token tensor of `batch` (no communication)."""
    index = load_balanced_indices(
        batch.tokens.shape[1], cp_mesh.size(), cp_mesh.get_local_rank(), batch.tokens.device
    )

    def take(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.index_select(1, index)

    return Batch(
        tokens=take(batch.tokens),
        labels=take(batch.labels),
        positions=take(batch.positions),
        doc_ids=take(batch.doc_ids),
    )


def _block_scores(
    q_BsHD: torch.Tensor, k_BsHD: torch.Tensor, q_idx: torch.Tensor, k_idx: torch.Tensor, q_doc, k_doc, scale
) -> torch.Tensor:
    """fp32 scores [B, H, s_q, s_k] with disallowed (future or other-document) pairs at -inf."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q_BsHD.float(), k_BsHD.float()) * scale
    allowed = (k_idx[None, :] <= q_idx[:, None])[None, None]
    if q_doc is not None:
        allowed = allowed & (q_doc[:, None, :, None] == k_doc[:, None, None, :])
    return scores.masked_fill(~allowed, float("-inf"))


def _finite(lse: torch.Tensor) -> torch.Tensor:
    """A row with nothing visible yet has lse = -inf; subtracting it would give -inf - -inf = nan, while
    subtracting 0 leaves exp(-inf) = 0, the right weight for such a row."""
    return torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)


class _Ring:
    """Point-to-point rotation of a tuple of tensors one hop around the cp group."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        self.send_to = dist.get_global_rank(group, (rank + 1) % size)
        self.recv_from = dist.get_global_rank(group, (rank - 1) % size)

    def start(self, tensors: list[torch.Tensor | None]) -> tuple[list, list[torch.Tensor | None]]:
        """Post the sends and receives of one hop (None entries travel as None) and return at once, so the
        caller computes on the current slice while the next one is in flight."""
        present = [t for t in tensors if t is not None]
        received = [torch.empty_like(t) for t in present]
        ops = [dist.P2POp(dist.isend, t.contiguous(), self.send_to, self.group) for t in present]
        ops += [dist.P2POp(dist.irecv, r, self.recv_from, self.group) for r in received]
        works = dist.batch_isend_irecv(ops)
        slots = iter(received)
        return works, [None if t is None else next(slots) for t in tensors]

    @staticmethod
    def finish(pending: tuple[list, list[torch.Tensor | None]]) -> list[torch.Tensor | None]:
        works, received = pending
        for work in works:
            work.wait()
        return received


class RingAttention(torch.autograd.Function):
    """Causal attention of local queries over the key/values of every cp rank, passed around a ring.

    Forward communication: cp−1 hops of (k, v, document ids), each a send to rank+1 and a receive from
    rank−1 in the cp group, posted before the block computes so that they overlap it. Backward: the same
    cp−1 overlapped hops of (k, v, document ids), plus cp hops of the (dk, dv) accumulators after each
    block, so that every slice's gradient returns to its owner. The per-block math is exact fp32 attention with a mask built
    from global token indices; memory per block is B·H·s², which suits CPUs and moderate s.
    """

    @staticmethod
    def forward(ctx, q_BsHD, k_BsKD, v_BsKD, doc_BS, group, seq_len: int):
        cp, rank = dist.get_world_size(group), dist.get_rank(group)
        group_size = q_BsHD.shape[2] // k_BsKD.shape[2]
        scale = q_BsHD.shape[-1] ** -0.5
        q_idx = load_balanced_indices(seq_len, cp, rank, q_BsHD.device)
        ring = _Ring(group)
        out = torch.zeros(q_BsHD.shape, dtype=torch.float32, device=q_BsHD.device)
        lse = torch.full(
            q_BsHD.shape[:1] + q_BsHD.shape[2:3] + q_BsHD.shape[1:2], float("-inf"), device=q_BsHD.device
        )
        k, v, doc = k_BsKD, v_BsKD, doc_BS
        for step in range(cp):
            pending = ring.start([k, v, doc]) if step < cp - 1 else None
            src = (rank - step) % cp
            k_idx = load_balanced_indices(seq_len, cp, src, q_BsHD.device)
            k_e, v_e = (t.repeat_interleave(group_size, dim=2) for t in (k, v))
            scores = _block_scores(q_BsHD, k_e, q_idx, k_idx, doc_BS, doc, scale)
            block_lse = torch.logsumexp(scores, dim=-1)
            probs = (scores - _finite(block_lse)[..., None]).exp()
            block_out = torch.einsum("bhqk,bkhd->bqhd", probs, v_e.float())
            # Online-softmax merge (FlashAttention-2 Alg. 1, lines 8-10, across blocks instead of tiles).
            new_lse = torch.logaddexp(lse, block_lse)
            base = _finite(new_lse)
            old_weight = (lse - base).exp().transpose(1, 2)[..., None]
            new_weight = (block_lse - base).exp().transpose(1, 2)[..., None]
            out, lse = out * old_weight + block_out * new_weight, new_lse
            if pending is not None:
                k, v, doc = ring.finish(pending)
        ctx.save_for_backward(
            q_BsHD, k_BsKD, v_BsKD, doc_BS if doc_BS is not None else torch.empty(0), out, lse
        )
        ctx.group, ctx.seq_len, ctx.has_doc = group, seq_len, doc_BS is not None
        return out.to(q_BsHD.dtype)

    @staticmethod
    def backward(ctx, dout_BsHD):
        q, k, v, doc_BS, out, lse = ctx.saved_tensors
        doc_BS = doc_BS if ctx.has_doc else None
        group, seq_len = ctx.group, ctx.seq_len
        cp, rank = dist.get_world_size(group), dist.get_rank(group)
        num_kv, group_size = k.shape[2], q.shape[2] // k.shape[2]
        scale = q.shape[-1] ** -0.5
        q_idx = load_balanced_indices(seq_len, cp, rank, q.device)
        ring = _Ring(group)
        dout = dout_BsHD.float()
        delta_BHs = (dout * out).sum(-1).transpose(1, 2)  # FlashAttention-2 Alg. 2: rowsum(dO ∘ O)
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dk_acc = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
        dv_acc = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
        k_cur, v_cur, doc = k, v, doc_BS
        for step in range(cp):
            # The key/value slice can travel on while this block computes; the accumulators cannot.
            pending = ring.start([k_cur, v_cur, doc]) if step < cp - 1 else None
            src = (rank - step) % cp
            k_idx = load_balanced_indices(seq_len, cp, src, q.device)
            k_e, v_e = (t.repeat_interleave(group_size, dim=2).float() for t in (k_cur, v_cur))
            probs = (_block_scores(q, k_e, q_idx, k_idx, doc_BS, doc, scale) - lse[..., None]).exp()
            dv = torch.einsum("bhqk,bqhd->bkhd", probs, dout)
            dprobs = torch.einsum("bqhd,bkhd->bhqk", dout, v_e)
            dscores = probs * (dprobs - delta_BHs[..., None]) * scale
            dq += torch.einsum("bhqk,bkhd->bqhd", dscores, k_e)
            dk = torch.einsum("bhqk,bqhd->bkhd", dscores, q.float())
            b, s = dk.shape[:2]
            dk_acc += dk.view(b, s, num_kv, group_size, -1).sum(3)
            dv_acc += dv.view(b, s, num_kv, group_size, -1).sum(3)
            dk_acc, dv_acc = ring.finish(ring.start([dk_acc, dv_acc]))
            if pending is not None:
                k_cur, v_cur, doc = ring.finish(pending)
        return dq.to(q.dtype), dk_acc.to(k.dtype), dv_acc.to(v.dtype), None, None, None


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
        seq_len = q_BsHD.shape[1] * self.cp
        if self.variant == "ring":
            return RingAttention.apply(q_BsHD, k_BsKD, v_BsKD, doc_ids_BS, self.group, seq_len)
        return self._ulysses(q_BsHD, k_BsKD, v_BsKD, doc_ids_BS, seq_len)

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
