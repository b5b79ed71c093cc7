"""Context-parallel attention (ring and Ulysses) against full-sequence attention, outputs and gradients.

Packed documents cross the chunk boundaries of the load-balanced layout on purpose. fp32: the ring merges
per-block softmaxes through their log-sum-exps, so it agrees with the one-shot softmax to ~1e-6.
"""

from __future__ import annotations

import pytest
import torch
from _spawn import run_distributed
from torch.distributed.device_mesh import init_device_mesh

from treadle.models.ops import attention_eager
from treadle.parallel.cp import ContextParallelAttention, load_balanced_indices

pytestmark = pytest.mark.slow
B, S, H, K, D = 2, 32, 4, 2, 8


def _inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    q, dout = torch.randn(B, S, H, D, generator=g), torch.randn(B, S, H, D, generator=g)
    k, v = torch.randn(B, S, K, D, generator=g), torch.randn(B, S, K, D, generator=g)
    doc_ids = torch.tensor([[0] * 5 + [1] * 14 + [2] * 13, [0] * S])
    return q, k, v, doc_ids, dout


def _cp_attention(rank: int, world_size: int, variant: str, use_docs: bool) -> dict[str, float]:
    q, k, v, doc_ids, dout = _inputs()
    doc_ids = doc_ids if use_docs else None
    ref_inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = attention_eager(*ref_inputs, doc_ids_BS=doc_ids)
    expected.backward(dout)

    index = load_balanced_indices(S, world_size, rank)
    local = [t.index_select(1, index).clone().requires_grad_() for t in (q, k, v)]
    op = ContextParallelAttention(attention_eager, init_device_mesh("cpu", (world_size,)), variant)
    out = op(*local, doc_ids_BS=None if doc_ids is None else doc_ids.index_select(1, index))
    out.backward(dout.index_select(1, index))
    errors = {"out": (out - expected.index_select(1, index)).abs().max().item()}
    for name, mine, ref in zip("qkv", local, ref_inputs, strict=True):
        errors[f"d{name}"] = (mine.grad - ref.grad.index_select(1, index)).abs().max().item()
    return errors


@pytest.mark.parametrize("use_docs", [True, False], ids=["documents", "no_documents"])
@pytest.mark.parametrize(("variant", "cp"), [("ring", 2), ("ring", 4), ("ulysses", 2)])
def test_context_parallel_attention_matches_full_attention(variant, cp, use_docs):
    for errors in run_distributed(_cp_attention, cp, variant, use_docs):
        assert max(errors.values()) < 1e-5, errors


def test_load_balanced_chunks_cover_the_sequence_once():
    held = torch.cat([load_balanced_indices(16, 4, r) for r in range(4)])
    assert sorted(held.tolist()) == list(range(16))
    assert load_balanced_indices(16, 4, 0).tolist() == [0, 1, 14, 15]
