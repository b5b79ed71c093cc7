"""Ring attention (Liu et al. 2023) over the load-balanced causal layout of `parallel/cp.py`.

Shape legend: B batch, s local sequence (2c: the rank's two chunks of c tokens), c chunk, H query heads,
K key/value heads, D head dim.

Key/value slices travel around the cp ring while each rank attends its queries to the slice it holds; the
partial results are merged with their log-sum-exps (the online softmax of FlashAttention-2 Algorithm 1,
lines 8-10, across blocks instead of tiles). Rank r holds chunks r and 2·cp−1−r of the 2·cp chunks of every
row, in increasing global order, and so does every slice that visits it. At the ring step that brings the
slice of rank src:

    src == r   all 2c queries × all 2c keys, causal: local order is global order, so the causal mask is exact
    src <  r   all 2c queries × the slice's first chunk (c keys), full; its second chunk is in every query's
               future
    src >  r   the queries' second chunk (c) × all 2c keys, full; the first chunk is before every key

so no block needs a positional mask other than plain causal, and every step but the first does 2c·c work.
Packed documents add a document-id mask: the diagonal block shares the local id row; a cross block compares
the queries' ids with the visiting slice's.

The block math is chosen by the model's attention op (`kernels.attention`):

- `triton`: the FlashAttention-2 kernels of `kernels/attention*.py`, called as their `torch.library` custom ops
  without their autograd Function (the ring owns the backward). Compute is in the inputs' dtype (bf16 on a
  GPU), the per-block output in that dtype, the merge and the gradient accumulators in fp32. The diagonal
  block skips tiles by document like the single-device kernel; cross blocks with documents only mask (their
  two id rows come from different positions, so the runs of one say nothing about the other): exact, without
  the skipping.
- anything else (`sdpa`, `eager`, a registered peer): exact fp32 einsums that materialise the block's scores,
  B·H·2c·2c at most; meant for CPUs and moderate sequences.

Backward (FA2 Algorithm 2 per block) uses the merged output O and log-sum-exp L of the whole ring: with them,
exp(S − L) is the block's share of the global softmax and rowsum(dO ∘ O) the global delta, so each block's
dq, dk, dv are exactly its contribution.
"""

from __future__ import annotations

import sys
from typing import Protocol

import torch
import torch.distributed as dist


class RingBlocks(Protocol):
    """Attention of one block of the ring. `doc_q`/`doc_k` are None together; causal blocks are square and
    share one id row."""

    def check(self, q_BsHD: torch.Tensor, k_BsKD: torch.Tensor, v_BsKD: torch.Tensor, doc_BS) -> None: ...

    def forward(self, q, k, v, doc_q, doc_k, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(out [B, q, H, D], lse [B, H, q] fp32, natural log; -inf for a row that sees no key)."""
        ...

    def backward(self, dout, q, k, v, out, lse, doc_q, doc_k, causal: bool) -> tuple[torch.Tensor, ...]:
        """(dq, dk, dv) of this block, given the ring's merged out and lse for these queries."""
        ...


def _finite(lse: torch.Tensor) -> torch.Tensor:
    """A row with nothing visible yet has lse = -inf; subtracting it would give -inf - -inf = nan, while
    subtracting 0 leaves exp(-inf) = 0, the right weight for such a row."""
    return torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)


class EagerBlocks:
    """Exact fp32 blocks through einsums; the scores [B, H, q, k] are materialised."""

    def __init__(self, head_dim: int):
        self.scale = head_dim**-0.5

    def check(self, q_BsHD, k_BsKD, v_BsKD, doc_BS) -> None:
        pass

    def _scores(self, q, k_e, doc_q, doc_k, causal: bool) -> torch.Tensor:
        scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k_e) * self.scale
        allowed = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device)
        allowed = allowed.tril() if causal else allowed
        if doc_q is not None:
            allowed = allowed & (doc_q[:, None, :, None] == doc_k[:, None, None, :])
        return scores.masked_fill(~allowed, float("-inf"))

    @staticmethod
    def _expand(q, kv) -> torch.Tensor:
        return kv.float().repeat_interleave(q.shape[2] // kv.shape[2], dim=2)

    def forward(self, q, k, v, doc_q, doc_k, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self._scores(q, self._expand(q, k), doc_q, doc_k, causal)
        lse = torch.logsumexp(scores, dim=-1)
        probs = (scores - _finite(lse)[..., None]).exp()
        return torch.einsum("bhqk,bkhd->bqhd", probs, self._expand(q, v)), lse

    def backward(self, dout, q, k, v, out, lse, doc_q, doc_k, causal: bool) -> tuple[torch.Tensor, ...]:
        k_e, v_e = self._expand(q, k), self._expand(q, v)
        dout = dout.float()
        probs = (self._scores(q, k_e, doc_q, doc_k, causal) - lse[..., None]).exp()
        delta = (dout * out.float()).sum(-1).transpose(1, 2)  # FA2 Algorithm 2 line 4: rowsum(dO ∘ O)
        dv = torch.einsum("bhqk,bqhd->bkhd", probs, dout)
        dscores = probs * (torch.einsum("bqhd,bkhd->bhqk", dout, v_e) - delta[..., None]) * self.scale
        dq = torch.einsum("bhqk,bkhd->bqhd", dscores, k_e)
        dk = torch.einsum("bhqk,bqhd->bkhd", dscores, q.float())
        # GQA: a key/value head's gradient is the sum over the query heads of its group.
        b, s, num_kv, d = k.shape
        return dq, dk.view(b, s, num_kv, -1, d).sum(3), dv.view(b, s, num_kv, -1, d).sum(3)


class TritonBlocks:
    """FlashAttention-2 blocks through the Triton kernels' custom ops (`torch.ops.treadle.flash_attention_*`)."""

    def __init__(self, head_dim: int):
        from treadle.kernels import attention

        self.kernels = attention
        self.scale = head_dim**-0.5

    def check(self, q_BsHD, k_BsKD, v_BsKD, doc_BS) -> None:
        self.kernels.check_inputs(q_BsHD, k_BsKD, v_BsKD, doc_BS)

    def _runs(self, doc_q, causal: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        # Only the diagonal block shares one id row, whose runs bound the kernels' sweeps.
        return self.kernels.document_ranges(doc_q) if causal and doc_q is not None else (None, None)

    def forward(self, q, k, v, doc_q, doc_k, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self._runs(doc_q, causal)
        doc_k = None if causal else doc_k
        return torch.ops.treadle.flash_attention_fwd(q, k, v, doc_q, doc_k, start, end, causal, self.scale)

    def backward(self, dout, q, k, v, out, lse, doc_q, doc_k, causal: bool) -> tuple[torch.Tensor, ...]:
        start, end = self._runs(doc_q, causal)
        doc_k = None if causal else doc_k
        return torch.ops.treadle.flash_attention_bwd(
            dout, q, k, v, out, lse, doc_q, doc_k, start, end, causal, self.scale
        )


def ring_blocks(inner, head_dim: int) -> RingBlocks:
    """Triton blocks when the model's attention op is the Triton kernel, exact fp32 blocks otherwise.

    The kernels module is looked up, not imported: a model that uses the Triton op has imported it already
    (`models.ops.build_ops`), and a run that does not must not need Triton.
    """
    kernels = sys.modules.get("treadle.kernels.attention")
    if kernels is not None and inner is kernels.attention_op:
        return TritonBlocks(head_dim)
    return EagerBlocks(head_dim)


class _Ring:
    """Point-to-point rotation of a tuple of tensors one hop around the cp group."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        self.send_to = dist.get_global_rank(group, (rank + 1) % size)
        self.recv_from = dist.get_global_rank(group, (rank - 1) % size)

    def start(self, tensors: list[torch.Tensor | None]) -> tuple[list, list, list[torch.Tensor | None]]:
        """Post the sends and receives of one hop (None entries travel as None) and return at once, so the
        caller computes on the current slice while the next one is in flight. Every rank posts its hops in
        the same order, so the point-to-point messages between two neighbours match in order."""
        sent = [t.contiguous() for t in tensors if t is not None]
        received = [torch.empty_like(t) for t in sent]
        ops = [dist.P2POp(dist.isend, t, self.send_to, self.group) for t in sent]
        ops += [dist.P2POp(dist.irecv, r, self.recv_from, self.group) for r in received]
        works = dist.batch_isend_irecv(ops)
        slots = iter(received)
        # The sent tensors are held until `finish`: the caller may drop its own references meanwhile.
        return works, sent, [None if t is None else next(slots) for t in tensors]

    @staticmethod
    def finish(pending: tuple[list, list, list[torch.Tensor | None]]) -> list[torch.Tensor | None]:
        works, _sent, received = pending
        for work in works:
            work.wait()
        return received


def _merge(out_BqHD: torch.Tensor, lse_BHq: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor):
    """Fold one block's (out, lse) into the running fp32 (out, lse), in place (they may be views)."""
    new_lse = torch.logaddexp(lse_BHq, block_lse)
    base = _finite(new_lse)
    out_BqHD.mul_((lse_BHq - base).exp().transpose(1, 2)[..., None])
    out_BqHD.add_(block_out.float() * (block_lse - base).exp().transpose(1, 2)[..., None])
    lse_BHq.copy_(new_lse)


def _half(doc: torch.Tensor | None, half: slice) -> torch.Tensor | None:
    """One chunk of a document-id row, contiguous (the kernels address ids as dense [B, len] rows)."""
    return None if doc is None else doc[:, half].contiguous()


class RingAttention(torch.autograd.Function):
    """Causal attention of local queries over the key/values of every cp rank, passed around a ring.

    Forward communication: cp−1 hops of (k, v, document ids), each a send to rank+1 and a receive from
    rank−1 in the cp group, posted before the block computes so that they overlap it. Backward: the same
    cp−1 overlapped hops of (k, v, document ids), plus cp hops of the fp32 (dk, dv) accumulators: the one
    posted after a block travels while the next block computes, and each slice's accumulator is back at its
    owner after the last hop. Blocks are described in the module docstring.
    """

    @staticmethod
    def forward(ctx, q_BsHD, k_BsKD, v_BsKD, doc_BS, group, blocks: RingBlocks):
        cp, rank = dist.get_world_size(group), dist.get_rank(group)
        blocks.check(q_BsHD, k_BsKD, v_BsKD, doc_BS)
        c = q_BsHD.shape[1] // 2
        first, second = slice(0, c), slice(c, 2 * c)
        if doc_BS is not None:
            doc_BS = doc_BS.to(torch.int32).contiguous()
        doc_second = _half(doc_BS, second)
        ring = _Ring(group)
        out_BsHD = lse_BHs = None
        k, v, doc = k_BsKD, v_BsKD, doc_BS
        for step in range(cp):
            pending = ring.start([k, v, doc]) if step < cp - 1 else None
            src = (rank - step) % cp
            if step == 0:
                out_BsHD, lse_BHs = blocks.forward(q_BsHD, k, v, doc_BS, doc_BS, True)
                out_BsHD = out_BsHD.float()
            elif src < rank:
                block = blocks.forward(q_BsHD, k[:, first], v[:, first], doc_BS, _half(doc, first), False)
                _merge(out_BsHD, lse_BHs, *block)
            else:
                block = blocks.forward(q_BsHD[:, second], k, v, doc_second, doc, False)
                _merge(out_BsHD[:, second], lse_BHs[:, :, second], *block)
            if pending is not None:
                k, v, doc = ring.finish(pending)
        out_BsHD = out_BsHD.to(q_BsHD.dtype)
        ctx.save_for_backward(q_BsHD, k_BsKD, v_BsKD, doc_BS, out_BsHD, lse_BHs)
        ctx.group, ctx.blocks = group, blocks
        return out_BsHD

    @staticmethod
    def backward(ctx, dout_BsHD):
        q, k_own, v_own, doc_BS, out, lse = ctx.saved_tensors
        group, blocks = ctx.group, ctx.blocks
        cp, rank = dist.get_world_size(group), dist.get_rank(group)
        c = q.shape[1] // 2
        first, second = slice(0, c), slice(c, 2 * c)
        dout_BsHD = dout_BsHD.contiguous()
        # The second chunk's rows, for the blocks where only they see the visiting slice.
        q2, dout2, out2 = q[:, second], dout_BsHD[:, second], out[:, second]
        lse2, doc2 = lse[:, :, second].contiguous(), _half(doc_BS, second)
        ring = _Ring(group)
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        pending_grads = None
        k, v, doc = k_own, v_own, doc_BS
        for step in range(cp):
            # The key/value slice travels on while this block computes; so do the previous accumulators.
            pending_kv = ring.start([k, v, doc]) if step < cp - 1 else None
            src = (rank - step) % cp
            if step == 0:
                dq_b, dk_b, dv_b = blocks.backward(dout_BsHD, q, k, v, out, lse, doc_BS, doc_BS, True)
                dq += dq_b
                keys = slice(None)
            elif src < rank:
                dq_b, dk_b, dv_b = blocks.backward(
                    dout_BsHD, q, k[:, first], v[:, first], out, lse, doc_BS, _half(doc, first), False
                )
                dq += dq_b
                keys = first
            else:
                dq_b, dk_b, dv_b = blocks.backward(dout2, q2, k, v, out2, lse2, doc2, doc, False)
                dq[:, second] += dq_b
                keys = slice(None)
            if pending_grads is None:
                dk_acc = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
                dv_acc = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
            else:
                # The accumulators of the slice now held, from the rank that held it one step earlier.
                dk_acc, dv_acc = ring.finish(pending_grads)
            dk_acc[:, keys] += dk_b
            dv_acc[:, keys] += dv_b
            pending_grads = ring.start([dk_acc, dv_acc])
            if pending_kv is not None:
                k, v, doc = ring.finish(pending_kv)
        dk, dv = ring.finish(pending_grads)
        return dq.to(q.dtype), dk.to(k_own.dtype), dv.to(v_own.dtype), None, None, None
