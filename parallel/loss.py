"""Vocabulary-parallel linear + cross-entropy: the loss on logits that stay sharded over the vocabulary.

Shape legend: N tokens, E model dim, V vocabulary, V/tp the local vocabulary slice.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Partial

from treadle.models.ops import IGNORE_INDEX


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of logits sharded on the vocabulary over `group` (Megatron-LM §3).

    Forward communication: three all-reduces over `group` of [N]-sized fp32 vectors — the row max (MAX),
    the sum of exponentials (SUM) and the target logit (SUM, from the one rank whose slice holds the
    target). Backward: none; each rank's gradient is softmax − one-hot restricted to its own slice.
    Input placement: the local [N, V/tp] slice of logits Shard(vocab); output: the loss, equal on all ranks.
    """

    @staticmethod
    def forward(
        ctx, logits_NV: torch.Tensor, labels_N: torch.Tensor, vocab_start: int, group, ignore_index: int
    ):
        logits_NV = logits_NV.float()
        row_max_N = logits_NV.max(dim=-1).values
        dist.all_reduce(row_max_N, op=dist.ReduceOp.MAX, group=group)
        shifted_NV = logits_NV - row_max_N[:, None]
        exp_NV = shifted_NV.exp()
        sum_exp_N = exp_NV.sum(dim=-1)
        dist.all_reduce(sum_exp_N, op=dist.ReduceOp.SUM, group=group)

        local_vocab = logits_NV.shape[-1]
        counted_N = labels_N != ignore_index
        local_label_N = labels_N - vocab_start
        here_N = counted_N & (local_label_N >= 0) & (local_label_N < local_vocab)
        safe_label_N = torch.where(here_N, local_label_N, torch.zeros_like(local_label_N))
        target_N = shifted_NV.gather(1, safe_label_N[:, None]).squeeze(1) * here_N
        dist.all_reduce(target_N, op=dist.ReduceOp.SUM, group=group)

        loss_N = (sum_exp_N.log() - target_N) * counted_N
        ctx.save_for_backward(exp_NV, sum_exp_N, safe_label_N, here_N, counted_N)
        return loss_N.sum()

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        exp_NV, sum_exp_N, safe_label_N, here_N, counted_N = ctx.saved_tensors
        grad_NV = exp_NV / sum_exp_N[:, None]
        grad_NV.scatter_add_(1, safe_label_N[:, None], -here_N.to(grad_NV.dtype)[:, None])
        grad_NV *= counted_N.to(grad_NV.dtype)[:, None] * grad_loss
        return grad_NV, None, None, None, None


def vocab_parallel_linear_cross_entropy(
    hidden_ND: torch.Tensor,
    weight_VE: torch.Tensor,
    labels_N: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The `loss` op under tensor parallelism: `hidden_ND` a Replicate DTensor, `weight_VE` Shard(0).

    The local matmul gives this rank's [N, V/tp] logits; the gradient it sends back to the hidden state is
    a partial sum over the vocabulary slices, so the hidden DTensor is unwrapped with `grad_placements=
    Partial()`: DTensor then reduce-scatters (sequence parallel) or all-reduces it in backward.
    """
    assert isinstance(hidden_ND, DTensor) and isinstance(weight_VE, DTensor), "expects the TP plan's DTensors"
    mesh = weight_VE.device_mesh
    local_hidden_ND = hidden_ND.to_local(grad_placements=[Partial()])
    local_weight_VE = weight_VE.to_local()
    # torch.chunk semantics (DTensor's Shard): every rank but the last holds ceil(V/tp) rows.
    vocab_start = mesh.get_local_rank() * -(-weight_VE.shape[0] // mesh.size())
    logits_NV = local_hidden_ND @ local_weight_VE.t()
    loss = _VocabParallelCrossEntropy.apply(logits_NV, labels_N, vocab_start, mesh.get_group(), ignore_index)
    return loss, (labels_N != ignore_index).sum()
