"""Context-parallel attention (ring and Ulysses) against full-sequence attention, outputs and gradients, and
whole runs of ring attention on the Triton kernels against a single process.

Packed documents cross the chunk boundaries of the load-balanced layout on purpose. fp32: the ring merges
per-block softmaxes through their log-sum-exps, so it agrees with the one-shot softmax to ~1e-6, with the
eager blocks and with the Triton kernels alike (on CPU they run in Triton's interpreter, whose fp32 dots are
exact). Run parity tolerance: as tests/distributed/test_parity.py argues.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from _spawn import run_distributed
from test_parity import RTOL, train
from torch.distributed.device_mesh import init_device_mesh

from treadle.kernels.attention import attention_op, attention_reference
from treadle.models.ops import attention_eager, attention_sdpa
from treadle.parallel.cp import ContextParallelAttention, load_balanced_indices
from treadle.parallel.ring import EagerBlocks, TritonBlocks, ring_blocks

pytestmark = pytest.mark.slow
STEPS = 10
B, S, H, K, D = 2, 64, 4, 2, 16
INNER = {"eager": attention_eager, "triton": attention_op}


def _inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    q, dout = torch.randn(B, S, H, D, generator=g), torch.randn(B, S, H, D, generator=g)
    k, v = torch.randn(B, S, K, D, generator=g), torch.randn(B, S, K, D, generator=g)
    # Row 0: a one-token document and documents across every chunk boundary at cp = 2 and 4; row 1: one.
    lengths = torch.tensor([5, 1, 27, 31])
    doc_ids = torch.stack(
        [torch.repeat_interleave(torch.arange(4), lengths), torch.zeros(S, dtype=torch.long)]
    )
    return q, k, v, doc_ids, dout


def _cp_attention(
    rank: int, world_size: int, variant: str, inner: str, use_docs: bool, compiled: bool = False
) -> dict[str, float]:
    q, k, v, doc_ids, dout = _inputs()
    doc_ids = doc_ids if use_docs else None
    ref_inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    expected, _ = attention_reference(*ref_inputs, doc_ids_BS=doc_ids)
    expected.backward(dout)

    index = load_balanced_indices(S, world_size, rank)
    local = [t.index_select(1, index).clone().requires_grad_() for t in (q, k, v)]
    op = ContextParallelAttention(INNER[inner], init_device_mesh("cpu", (world_size,)), variant)

    def attend(q, k, v, doc_ids_BS):
        return op(q, k, v, doc_ids_BS=doc_ids_BS)

    if compiled:
        # As in compiled blocks under cp (parallel/engine.py): not fullgraph, the ring's sends break the graph.
        attend = torch.compile(attend, backend="aot_eager")
    out = attend(*local, None if doc_ids is None else doc_ids.index_select(1, index))
    out.backward(dout.index_select(1, index))
    errors = {"out": (out - expected.index_select(1, index)).abs().max().item()}
    for name, mine, ref in zip("qkv", local, ref_inputs, strict=True):
        errors[f"d{name}"] = (mine.grad - ref.grad.index_select(1, index)).abs().max().item()
    return errors


@pytest.mark.parametrize("use_docs", [True, False], ids=["documents", "no_documents"])
@pytest.mark.parametrize("inner", ["eager", "triton"])
@pytest.mark.parametrize(("variant", "cp"), [("ring", 2), ("ring", 4), ("ulysses", 2)])
def test_context_parallel_attention_matches_full_attention(variant, cp, inner, use_docs):
    for errors in run_distributed(_cp_attention, cp, variant, inner, use_docs):
        assert max(errors.values()) < 1e-5, errors


def test_ring_on_triton_kernels_under_torch_compile():
    for errors in run_distributed(_cp_attention, 2, "ring", "triton", True, True):
        assert max(errors.values()) < 1e-5, errors


def test_ring_runs_the_triton_kernels_only_for_the_triton_op():
    assert isinstance(ring_blocks(attention_op, D), TritonBlocks)
    for inner in (attention_eager, attention_sdpa):
        assert isinstance(ring_blocks(inner, D), EagerBlocks)


def test_load_balanced_chunks_cover_the_sequence_once():
    held = torch.cat([load_balanced_indices(16, 4, r) for r in range(4)])
    assert sorted(held.tolist()) == list(range(16))
    assert load_balanced_indices(16, 4, 0).tolist() == [0, 1, 14, 15]


# --- whole runs: ring attention on the Triton kernels, per-step losses ---------------------------------------


@pytest.fixture(scope="module")
def short_documents(tmp_path_factory) -> Path:
    """A token file of documents 1-40 tokens long (EOS = 0), so every 64-token row packs several and they
    cross the cp chunk boundaries; each document counts up from a random start, which a model can learn."""
    rng = np.random.default_rng(0)
    docs = []
    for _ in range(3000):
        start, length = rng.integers(1, 200), rng.integers(1, 41)
        docs.append(np.append(1 + (start + np.arange(length)) % 250, 0))
    path = tmp_path_factory.mktemp("short_docs") / "tokens.bin"
    np.concatenate(docs).astype("<u2").tofile(path)
    return path


@pytest.mark.parametrize("document_mask", [True, False], ids=["documents", "no_documents"])
def test_ring_on_triton_kernels_matches_single_process(document_mask, short_documents, tmp_path):
    # One micro-batch per step keeps the interpreted kernels' time down; the second half of the steps still
    # compounds any gradient error through AdamW.
    data = [
        "trainer.global_batch_size=2",
        "model.num_heads=2",
        "model.num_kv_heads=1",
        f"trainer.max_steps={STEPS}",
        "kernels.attention=triton",
        "data.source=tokens",
        f"data.path={short_documents}",
        "data.token_dtype=uint16",
        "data.eos_id=0",
        f"data.document_mask={str(document_mask).lower()}",
    ]
    cache = tmp_path / "cache"
    expected = train(1, tmp_path / "ref", cache, *data)
    losses = train(2, tmp_path / "cp", cache, *data, "parallel.cp=2", "parallel.cp_variant=ring")
    assert len(losses) == STEPS and expected[-1] < expected[0] - 0.3
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=RTOL, atol=0)
