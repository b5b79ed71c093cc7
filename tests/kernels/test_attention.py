"""FlashAttention-2 Triton kernels vs the fp32 reference: output, log-sum-exp and dq, dk, dv.

On CPU the kernels run in Triton's interpreter (tests/kernels/conftest.py) at tiny shapes in fp32 and fp16.
bf16 is tested only on a GPU: the interpreter multiplies bf16 tiles as their raw uint16 storage (its
`create_dot` has no bf16 path), so a CPU bf16 result says nothing about the kernel.

Tolerances:
- fp32 (CPU): 1e-4 absolute. The interpreter's dots are exact fp32 products, so the only differences are
  summation order and exp2 vs exp (~1e-6 observed).
- fp16: out 5e-3, grads 1e-2 of the reference's largest entry. The kernel rounds P and dS to fp16 before
  their matmuls (as FA2 does) and rounds the outputs: each rounding is ~2^-11 relative, and dK, dQ sum S of
  them, so a few 1e-3 of the gradient's scale is what a correct kernel shows.
- bf16 (GPU): 8 mantissa bits instead of 11, so 8x those bounds (2e-2 out, 5e-2 grads).
"""

from __future__ import annotations

import pytest
import torch

from treadle.kernels import attention_bwd, attention_fwd
from treadle.kernels.attention import (
    attention_op,
    attention_reference,
    doc_ids_from_cu_seqlens,
    document_ranges,
    flash_attention,
)
from treadle.models.ops import attention_eager

INTERPRET = attention_fwd.interpreting()
DEVICE = "cpu" if INTERPRET else ("cuda" if torch.cuda.is_available() else "cpu")
gpu = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs a CUDA device")


TOLERANCES = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (5e-3, 1e-2),
    torch.bfloat16: (2e-2, 5e-2),
}


def _inputs(
    batch: int,
    seq_len: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    seed: int = 0,
) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(batch, seq_len, num_heads, head_dim)] + [(batch, seq_len, num_kv_heads, head_dim)] * 2
    q, k, v = (torch.randn(s, generator=gen).to(DEVICE, dtype).requires_grad_() for s in shapes)
    dout = torch.randn(shapes[0], generator=gen).to(DEVICE, dtype)
    return q, k, v, dout


def _close(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    """Max error relative to the reference's largest entry (gradients of different heads differ in scale)."""
    err = (got.float() - want.float()).abs().max().item()
    scale = max(want.float().abs().max().item(), 1.0)
    assert err <= tol * scale, f"{name}: max |err| {err:.3g} > {tol} * {scale:.3g}"


def _check(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: torch.Tensor,
    *,
    causal: bool,
    doc_ids_BS: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    doc_ids_k_BT: torch.Tensor | None = None,
) -> None:
    out_tol, grad_tol = TOLERANCES[q.dtype]
    kwargs = {"causal": causal, "doc_ids_BS": doc_ids_BS, "softmax_scale": softmax_scale}
    if doc_ids_k_BT is not None:
        kwargs["doc_ids_k_BT"] = doc_ids_k_BT
    out, lse = flash_attention(q, k, v, **kwargs)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_out, ref_lse = attention_reference(q, k, v, **kwargs)
    ref_grads = torch.autograd.grad(ref_out, (q, k, v), dout)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    _close("out", out, ref_out, out_tol)
    _close("lse", lse, ref_lse, 1e-4 if q.dtype == torch.float32 else 1e-3)
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        assert got.dtype == q.dtype and got.shape == want.shape
        _close(name, got, want, grad_tol)


@pytest.mark.parametrize(
    ("causal", "seq_len", "num_heads", "num_kv_heads", "head_dim"),
    [
        (True, 37, 2, 2, 16),
        (False, 37, 2, 2, 16),
        (True, 65, 4, 2, 32),
        (False, 65, 4, 2, 32),
        (True, 48, 4, 1, 16),
        (False, 48, 4, 1, 16),
        (True, 80, 2, 1, 64),
    ],
)
def test_matches_reference_fp32(causal: bool, seq_len: int, num_heads: int, num_kv_heads: int, head_dim: int):
    q, k, v, dout = _inputs(2, seq_len, num_heads, num_kv_heads, head_dim, torch.float32)
    _check(q, k, v, dout, causal=causal)


@pytest.mark.parametrize("causal", [True, False])
def test_matches_reference_fp16(causal: bool):
    q, k, v, dout = _inputs(1, 65, 4, 2, 64, torch.float16)
    _check(q, k, v, dout, causal=causal)


def _doc_ids(seq_len: int, lengths_per_row: list[list[int]]) -> torch.Tensor:
    rows = []
    for lengths in lengths_per_row:
        assert sum(lengths) == seq_len
        rows.append(torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)))
    return torch.stack(rows).to(DEVICE)


# Row 0 has a one-token document and documents crossing tile edges; row 1 is a single document, so a batch
# mixes rows whose sweeps are skipped and rows whose are not.
DOC_LENGTHS = [[20, 1, 27, 32], [80]]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("num_kv_heads", [2, 1])
def test_documents_fp32(causal: bool, num_kv_heads: int):
    q, k, v, dout = _inputs(2, 80, 2, num_kv_heads, 16, torch.float32)
    _check(q, k, v, dout, causal=causal, doc_ids_BS=_doc_ids(80, DOC_LENGTHS))


def test_documents_many_short_and_odd_length():
    # Every tile holds several documents, and the last document ends in a ragged tile.
    doc_ids = _doc_ids(53, [[1, 3, 2, 7, 1, 16, 5, 18], [40, 1, 12]])
    q, k, v, dout = _inputs(2, 53, 2, 1, 16, torch.float32)
    _check(q, k, v, dout, causal=True, doc_ids_BS=doc_ids)
    _check(q, k, v, dout, causal=False, doc_ids_BS=doc_ids)


def test_equal_blocks_and_custom_scale(monkeypatch: pytest.MonkeyPatch):
    # BLOCK_M == BLOCK_N everywhere: the diagonal is a single tile in each sweep.
    monkeypatch.setattr(attention_fwd, "INTERPRET_BLOCKS", dict.fromkeys(attention_fwd.INTERPRET_BLOCKS, 16))
    q, k, v, dout = _inputs(1, 45, 2, 1, 32, torch.float32)
    _check(q, k, v, dout, causal=True, softmax_scale=0.3)
    _check(q, k, v, dout, causal=False, doc_ids_BS=_doc_ids(45, [[16, 1, 28]]))


@pytest.mark.parametrize("num_splits", [2, 4])
def test_gqa_group_split_over_programs(monkeypatch: pytest.MonkeyPatch, num_splits: int):
    # On a GPU with few kv heads the dK/dV kernel splits each GQA group over programs and sums the fp32
    # partials afterwards; force that path here.
    monkeypatch.setattr(attention_bwd, "kv_group_splits", lambda *args: num_splits)
    q, k, v, dout = _inputs(1, 37, 4, 1, 16, torch.float32)
    _check(q, k, v, dout, causal=True)
    _check(q, k, v, dout, causal=False, doc_ids_BS=_doc_ids(37, [[5, 1, 31]]))


def _q_and_kv(seq_len: int, seq_len_k: int, num_kv_heads: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    q, _, _, dout = _inputs(2, seq_len, 4, num_kv_heads, 16, torch.float32, seed=seed)
    _, k, v, _ = _inputs(2, seq_len_k, 4, num_kv_heads, 16, torch.float32, seed=seed + 1)
    return q, k, v, dout


@pytest.mark.parametrize(("seq_len", "seq_len_k"), [(48, 21), (21, 48), (32, 64), (64, 32)])
@pytest.mark.parametrize("num_kv_heads", [2, 1])
def test_full_attention_to_keys_of_another_length(seq_len: int, seq_len_k: int, num_kv_heads: int):
    # Context parallelism's ring attends 2c queries to c keys and c queries to 2c keys; ragged lengths
    # exercise the separate query and key bounds.
    q, k, v, dout = _q_and_kv(seq_len, seq_len_k, num_kv_heads)
    _check(q, k, v, dout, causal=False)


@pytest.mark.parametrize(("seq_len", "seq_len_k"), [(48, 21), (21, 48), (40, 40)])
def test_separate_query_and_key_documents(seq_len: int, seq_len_k: int):
    # Key ids are not in the queries' order (no tile can be skipped); every query shares a document with
    # some key, so the reference has no empty row.
    q, k, v, dout = _q_and_kv(seq_len, seq_len_k, 2)
    third = seq_len // 3
    doc_q = _doc_ids(seq_len, [[third, 1, seq_len - third - 1], [seq_len]])
    doc_k = torch.stack(
        [torch.arange(seq_len_k, device=DEVICE) % 3, torch.zeros(seq_len_k, dtype=torch.long, device=DEVICE)]
    )
    _check(q, k, v, dout, causal=False, doc_ids_BS=doc_q, doc_ids_k_BT=doc_k)


def test_query_that_sees_no_key_gets_zero_output_and_minus_inf_lse():
    # Queries of document 7 have no key: out 0, lse -inf, no gradient; the others match the reference
    # computed without them, and so do dk and dv (those queries add nothing to them).
    q, k, v, dout = (t[:1] for t in _q_and_kv(40, 24, 2))
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    doc_q = _doc_ids(40, [[11, 17, 12]])
    doc_q = torch.where(doc_q == 1, 7, doc_q)
    doc_k = _doc_ids(24, [[10, 14]]) * 2  # ids 0 and 2
    out, lse = flash_attention(q, k, v, causal=False, doc_ids_BS=doc_q, doc_ids_k_BT=doc_k)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    blind = doc_q[0] == 7
    assert (out[:, blind] == 0).all() and torch.isneginf(lse[:, :, blind]).all() and (dq[:, blind] == 0).all()
    seen = ~blind
    ref_out, ref_lse = attention_reference(
        q[:, seen], k, v, causal=False, doc_ids_BS=doc_q[:, seen], doc_ids_k_BT=doc_k
    )
    ref_grads = torch.autograd.grad(ref_out, (q, k, v), dout[:, seen])
    _close("out", out[:, seen], ref_out, 1e-4)
    _close("lse", lse[:, :, seen], ref_lse, 1e-4)
    _close("dq", dq[:, seen], ref_grads[0][:, seen], 1e-4)
    _close("dk", dk, ref_grads[1], 1e-4)
    _close("dv", dv, ref_grads[2], 1e-4)


def test_backward_with_a_larger_attentions_lse():
    # FA2's backward fed the L and O of a larger softmax (keys A then B) gives the part of that softmax's
    # gradients that flows through each key block alone: how context parallelism runs its ring's blocks.
    q, k, v, dout = _q_and_kv(24, 48, 2)
    out, lse = attention_reference(q, k, v, causal=False)
    ref_dq, ref_dk, ref_dv = torch.autograd.grad(out, (q, k, v), dout)
    dq = torch.zeros_like(q)
    for keys in (slice(0, 16), slice(16, 48)):
        dq_block, dk, dv = torch.ops.treadle.flash_attention_bwd(
            dout, q.detach(), k.detach()[:, keys], v.detach()[:, keys], out.detach(), lse.detach(),
            None, None, None, None, False, 16**-0.5,
        )  # fmt: skip
        dq += dq_block
        _close("dk", dk, ref_dk[:, keys], 1e-4)
        _close("dv", dv, ref_dv[:, keys], 1e-4)
    _close("dq", dq, ref_dq, 1e-4)


def test_causal_needs_keys_as_long_as_queries():
    q, k, v, _ = _q_and_kv(16, 32, 2)
    with pytest.raises(ValueError, match="causal attention needs as many keys as queries"):
        flash_attention(q, k, v, causal=True)


def test_strided_inputs_from_fused_projection():
    # q, k, v as slices of one fused [B, S, H + 2K, D] projection: BSHD strides that are not contiguous.
    gen = torch.Generator().manual_seed(1)
    qkv = torch.randn(2, 37, 4 + 2 + 2, 32, generator=gen).to(DEVICE).requires_grad_()
    q, k, v = qkv[:, :, :4], qkv[:, :, 4:6], qkv[:, :, 6:]
    dout = torch.randn(2, 37, 4, 32, generator=gen).to(DEVICE)
    assert not q.is_contiguous()
    _check(q, k, v, dout, causal=True)


def test_op_matches_eager_attention():
    q, k, v, _ = _inputs(2, 40, 4, 2, 16, torch.float32)
    doc_ids = _doc_ids(40, [[13, 1, 26], [40]])
    for kwargs in ({"causal": True}, {"causal": False}, {"causal": True, "doc_ids_BS": doc_ids}):
        got = attention_op(q, k, v, **kwargs)
        want = attention_eager(q, k, v, **kwargs)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_torch_compile_fullgraph():
    # The kernels are torch.library custom ops: Dynamo traces the autograd Function around them without a
    # graph break. aot_eager keeps the test free of a C++ toolchain; the GPU test below uses Inductor.
    q, k, v, dout = _inputs(1, 40, 4, 2, 16, torch.float32)
    doc_ids = _doc_ids(40, [[13, 27]])

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attention_op(q, k, v, causal=True, doc_ids_BS=doc_ids) * 2

    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    want = attend(q, k, v)
    want_grads = torch.autograd.grad(want, (q, k, v), dout)
    torch.testing.assert_close(out, want)
    for got, ref in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, ref)


def test_lse_is_not_differentiable():
    q, k, v, _ = _inputs(1, 16, 2, 2, 16, torch.float32)
    out, lse = flash_attention(q, k, v)
    assert out.requires_grad and not lse.requires_grad


def test_document_ranges_and_cu_seqlens():
    doc_ids = torch.tensor([[0, 0, 1, 2, 2, 2], [5, 5, 5, 5, 5, 5]])
    start, end = document_ranges(doc_ids)
    assert start.tolist() == [[0, 0, 2, 3, 3, 3], [0] * 6]
    assert end.tolist() == [[2, 2, 3, 6, 6, 6], [6] * 6]
    assert start.dtype == end.dtype == torch.int32
    cu_seqlens = torch.tensor([0, 2, 3, 6])
    assert doc_ids_from_cu_seqlens(cu_seqlens, 6).tolist() == [[0, 0, 1, 2, 2, 2]]


def test_custom_ops_schema_and_fake_tensors():
    q, k, v, dout = (t.detach() for t in _inputs(1, 20, 2, 1, 16, torch.float32))
    doc_ids = _doc_ids(20, [[7, 13]]).to(torch.int32)
    start, end = document_ranges(doc_ids)
    tests = ("test_schema", "test_faketensor")
    torch.library.opcheck(
        torch.ops.treadle.flash_attention_fwd,
        (q, k, v, doc_ids, None, start, end, True, 0.25),
        test_utils=tests,
    )
    out, lse = torch.ops.treadle.flash_attention_fwd(q, k, v, None, None, None, None, False, 0.25)
    torch.library.opcheck(
        torch.ops.treadle.flash_attention_bwd,
        (dout, q, k, v, out, lse, None, None, None, None, False, 0.25),
        test_utils=tests,
    )


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"head_dim": 24}, ValueError),
        ({"num_kv_heads": 3}, ValueError),
    ],
)
def test_rejects_unsupported_shapes(kwargs: dict, error: type[Exception]):
    shape = {"num_heads": 4, "num_kv_heads": 2, "head_dim": 16} | kwargs
    q = torch.zeros(1, 8, shape["num_heads"], shape["head_dim"], device=DEVICE)
    k = torch.zeros(1, 8, shape["num_kv_heads"], shape["head_dim"], device=DEVICE)
    with pytest.raises(error):
        flash_attention(q, k, k)


# --- GPU: real shapes, bf16, the autotuned and the default configs ---------------------------------------


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    ("seq_len", "num_heads", "num_kv_heads", "head_dim"), [(1024, 8, 2, 128), (777, 4, 4, 64)]
)
def test_gpu_matches_reference(
    dtype: torch.dtype,
    causal: bool,
    seq_len: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
):
    q, k, v, dout = _inputs(2, seq_len, num_heads, num_kv_heads, head_dim, dtype)
    _check(q, k, v, dout, causal=causal)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_documents_bf16(causal: bool):
    seq_len = 2048
    lengths = [[300, 1, 700, 47, 1000], [2048], [1] * 64 + [1984]]
    q, k, v, dout = _inputs(3, seq_len, 8, 1, 128, torch.bfloat16)
    _check(q, k, v, dout, causal=causal, doc_ids_BS=_doc_ids(seq_len, lengths))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_gqa_small_grid(causal: bool):
    # 2 kv heads for 32 query heads at S = 1024: the dK/dV grid is split over the GQA groups.
    q, k, v, dout = _inputs(1, 1024, 32, 2, 128, torch.bfloat16)
    assert attention_bwd.kv_group_splits(1, 1024, 2, 16, q.device) > 1
    _check(q, k, v, dout, causal=causal, doc_ids_BS=_doc_ids(1024, [[100, 1, 923]]))


@pytest.mark.gpu
@gpu
def test_gpu_torch_compile_inductor():
    q, k, v, dout = _inputs(2, 256, 4, 2, 64, torch.bfloat16)

    def block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attention_op(q * 0.5, k, v, causal=True).float().square()

    out = torch.compile(block, fullgraph=True)(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), dout.float())
    want = block(q, k, v)
    want_grads = torch.autograd.grad(want, (q, k, v), dout.float())
    torch.testing.assert_close(out, want)
    for got, ref in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, ref)


@pytest.mark.gpu
@gpu
def test_gpu_head_dim_256():
    q, k, v, dout = _inputs(1, 513, 4, 2, 256, torch.bfloat16)
    _check(q, k, v, dout, causal=True)


@pytest.mark.gpu
@gpu
def test_gpu_autotuned_matches_reference(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TREADLE_ATTENTION_AUTOTUNE", "1")
    q, k, v, dout = _inputs(1, 2048, 8, 4, 128, torch.bfloat16)
    _check(q, k, v, dout, causal=True)
