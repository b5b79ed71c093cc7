"""FlashAttention-2 (Dao 2023) in Triton: the op the model calls, its autograd Function, and the reference.

Shape legend: B batch, S sequence, H query heads, K key/value heads (K divides H; H // K is the GQA group),
D head dim (a power of two, 16..256); T the keys' sequence where it may differ from the queries'.

    out_BSHD = attention_op(q_BSHD, k_BSKD, v_BSKD, causal=True, doc_ids_BS=None)
    out_BSHD, lse_BHS = flash_attention(q_BSHD, k_BSKD, v_BSKD, causal=True, doc_ids_BS=None, softmax_scale=None)
    out_BSHD, lse_BHS = flash_attention(q_BSHD, k_BTKD, v_BTKD, causal=False, doc_ids_BS=.., doc_ids_k_BT=..)

The kernels (attention_fwd.py: Algorithm 1; attention_bwd.py: Algorithm 2) read the model's BSHD tensors
through their strides, so the `.view`s of the projections go in without a transpose or copy. Inputs may be
bf16, fp16 or fp32 (fp32 for tests); every product accumulates in fp32, the output has q's dtype and the
log-sum-exp is fp32, natural log, [B, H, S] — what context parallelism needs to merge partial results.
`lse_BHS` is returned without a gradient (it is marked non-differentiable).

`doc_ids_BS` packs documents: a query sees only keys with the same id. Each document must be a contiguous
run of its row (the loader packs them so); the kernels use the runs' boundaries to skip tiles.

Full (non-causal) attention also takes keys of another length than the queries, with their own document ids
(`doc_ids_k_BT`): context parallelism's ring attends one slice of a row to another this way. Tiles are then
not skipped by document (the runs of one slice say nothing about the other's positions), and a query that
shares no document with any key gets out = 0 and lse = -inf.

The kernels run as `torch.library` custom ops, so `torch.compile` treats them as opaque calls with known
output shapes instead of tracing into the launcher.
"""

from __future__ import annotations

import math

import torch

from treadle.kernels.attention_bwd import attention_backward
from treadle.kernels.attention_fwd import attention_forward, interpreting

_SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)


def attention_reference(
    q_BSHD: torch.Tensor,
    k_BSKD: torch.Tensor,
    v_BSKD: torch.Tensor,
    *,
    causal: bool = True,
    doc_ids_BS: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    doc_ids_k_BT: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(scale·QK^T + mask) V and its log-sum-exp, materialised in fp32: what the kernels must match.

    k and v may be [B, T, K, D] with T != S when `causal` is false; `doc_ids_k_BT` are then the keys' document
    ids (default: `doc_ids_BS`). Returns (out_BSHD in q's dtype, lse_BHS in fp32); differentiable through
    autograd.
    """
    seq_len, num_heads, head_dim = q_BSHD.shape[1], q_BSHD.shape[2], q_BSHD.shape[3]
    group_size = num_heads // k_BSKD.shape[2]
    scale = head_dim**-0.5 if softmax_scale is None else softmax_scale
    k_BSHD = k_BSKD.float().repeat_interleave(group_size, dim=2)
    v_BSHD = v_BSKD.float().repeat_interleave(group_size, dim=2)
    scores_BHSS = torch.einsum("bqhd,bkhd->bhqk", q_BSHD.float(), k_BSHD) * scale
    allowed_BHSS = torch.ones(seq_len, k_BSKD.shape[1], dtype=torch.bool, device=q_BSHD.device)
    if causal:
        allowed_BHSS = allowed_BHSS.tril()
    if doc_ids_BS is not None:
        doc_k = doc_ids_BS if doc_ids_k_BT is None else doc_ids_k_BT
        allowed_BHSS = allowed_BHSS & (doc_ids_BS[:, None, :, None] == doc_k[:, None, None, :])
    scores_BHSS = scores_BHSS.masked_fill(~allowed_BHSS, float("-inf"))
    lse_BHS = scores_BHSS.logsumexp(dim=-1)
    probs_BHSS = torch.exp(scores_BHSS - lse_BHS[..., None])
    out_BSHD = torch.einsum("bhqk,bkhd->bqhd", probs_BHSS, v_BSHD)
    return out_BSHD.to(q_BSHD.dtype), lse_BHS


def document_ranges(doc_ids_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token, the [start, end) of its document's run: (doc_start_BS, doc_end_BS), int32.

    O(B·S) work on the device; the kernels read it once per tile to bound their sweeps.
    """
    batch, seq_len = doc_ids_BS.shape
    pos_BS = torch.arange(seq_len, device=doc_ids_BS.device).expand(batch, seq_len)
    starts_BS = torch.ones_like(doc_ids_BS, dtype=torch.bool)
    starts_BS[:, 1:] = doc_ids_BS[:, 1:] != doc_ids_BS[:, :-1]
    ends_BS = torch.ones_like(starts_BS)
    ends_BS[:, :-1] = starts_BS[:, 1:]
    doc_start_BS = torch.where(starts_BS, pos_BS, 0).cummax(dim=1).values
    doc_end_BS = torch.where(ends_BS, pos_BS + 1, seq_len).flip(1).cummin(dim=1).values.flip(1)
    return doc_start_BS.to(torch.int32).contiguous(), doc_end_BS.to(torch.int32).contiguous()


def doc_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[1, S] document ids from varlen-style cumulative lengths (0, l0, l0+l1, ..., S) of one packed row."""
    positions = torch.arange(seq_len, device=cu_seqlens.device)
    return (torch.searchsorted(cu_seqlens[1:-1].contiguous(), positions, right=True))[None].to(torch.int32)


# The custom ops take doc tensors as optional inputs; the schema is spelled out so that it does not depend on
# how each torch version reads postponed annotations.
@torch.library.custom_op(
    "treadle::flash_attention_fwd",
    mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, Tensor? doc_ids, Tensor? doc_ids_k, Tensor? doc_start, "
    "Tensor? doc_end, bool causal, float softmax_scale) -> (Tensor, Tensor)",
)
def _fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    doc_ids: torch.Tensor | None,
    doc_ids_k: torch.Tensor | None,
    doc_start: torch.Tensor | None,
    doc_end: torch.Tensor | None,
    causal: bool,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_forward(q, k, v, doc_ids, doc_ids_k, doc_start, doc_end, causal, softmax_scale)


@_fwd_op.register_fake
def _fwd_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    doc_ids: torch.Tensor | None,
    doc_ids_k: torch.Tensor | None,
    doc_start: torch.Tensor | None,
    doc_end: torch.Tensor | None,
    causal: bool,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, seq_len, num_heads, _ = q.shape
    lse = q.new_empty(batch, num_heads, seq_len, dtype=torch.float32)
    return torch.empty_like(q, memory_format=torch.contiguous_format), lse


@torch.library.custom_op(
    "treadle::flash_attention_bwd",
    mutates_args=(),
    schema="(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? doc_ids, "
    "Tensor? doc_ids_k, Tensor? doc_start, Tensor? doc_end, bool causal, float softmax_scale) "
    "-> (Tensor, Tensor, Tensor)",
)
def _bwd_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    doc_ids: torch.Tensor | None,
    doc_ids_k: torch.Tensor | None,
    doc_start: torch.Tensor | None,
    doc_end: torch.Tensor | None,
    causal: bool,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_backward(
        dout, q, k, v, out, lse.contiguous(), doc_ids, doc_ids_k, doc_start, doc_end, causal, softmax_scale
    )


@_bwd_op.register_fake
def _bwd_fake(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    doc_ids: torch.Tensor | None,
    doc_ids_k: torch.Tensor | None,
    doc_start: torch.Tensor | None,
    doc_end: torch.Tensor | None,
    causal: bool,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


class FlashAttentionFunction(torch.autograd.Function):
    """Forward saves Q, K, V, O and the log-sum-exp L (not P); backward recomputes P tile by tile (FA2 §3.2)."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        q_BSHD: torch.Tensor,
        k_BSKD: torch.Tensor,
        v_BSKD: torch.Tensor,
        causal: bool,
        doc_ids_BS: torch.Tensor | None,
        softmax_scale: float,
        doc_ids_k_BT: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        doc_start_BS = doc_end_BS = None
        if doc_ids_BS is not None and doc_ids_k_BT is None:
            doc_start_BS, doc_end_BS = document_ranges(doc_ids_BS)
        out_BSHD, lse_BHS = _fwd_op(
            q_BSHD, k_BSKD, v_BSKD, doc_ids_BS, doc_ids_k_BT, doc_start_BS, doc_end_BS, causal, softmax_scale
        )
        ctx.save_for_backward(
            q_BSHD, k_BSKD, v_BSKD, out_BSHD, lse_BHS, doc_ids_BS, doc_ids_k_BT, doc_start_BS, doc_end_BS
        )
        ctx.causal = causal
        ctx.softmax_scale = softmax_scale
        ctx.mark_non_differentiable(lse_BHS)
        return out_BSHD, lse_BHS

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, dout_BSHD: torch.Tensor, _dlse_BHS: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        q_BSHD, k_BSKD, v_BSKD, out_BSHD, lse_BHS, doc_ids_BS, doc_ids_k_BT, doc_start_BS, doc_end_BS = (
            ctx.saved_tensors
        )
        dq, dk, dv = _bwd_op(
            dout_BSHD, q_BSHD, k_BSKD, v_BSKD, out_BSHD, lse_BHS, doc_ids_BS, doc_ids_k_BT, doc_start_BS,
            doc_end_BS, ctx.causal, ctx.softmax_scale,
        )  # fmt: skip
        return dq, dk, dv, None, None, None, None


def check_inputs(
    q_BSHD: torch.Tensor,
    k_BTKD: torch.Tensor,
    v_BTKD: torch.Tensor,
    doc_ids_BS: torch.Tensor | None,
    *,
    causal: bool = True,
    doc_ids_k_BT: torch.Tensor | None = None,
) -> None:
    """Raise ValueError/TypeError for inputs the kernels do not take (also for callers of the custom ops)."""
    if q_BSHD.dim() != 4 or k_BTKD.shape != v_BTKD.shape or k_BTKD.dim() != 4:
        raise ValueError(
            f"expected q [B,S,H,D] and k, v [B,T,K,D]; got {q_BSHD.shape}, {k_BTKD.shape}, {v_BTKD.shape}"
        )
    (batch, seq_len, num_heads, head_dim), (seq_len_k, num_kv_heads) = q_BSHD.shape, k_BTKD.shape[1:3]
    if k_BTKD.shape[0] != batch or k_BTKD.shape[3] != head_dim:
        raise ValueError(f"k/v shape {tuple(k_BTKD.shape)} does not match q {tuple(q_BSHD.shape)} in B or D")
    if causal and (seq_len_k != seq_len or doc_ids_k_BT is not None):
        raise ValueError(
            f"causal attention needs as many keys as queries and one document-id row; got S={seq_len}, "
            f"T={seq_len_k}{', separate key document ids' if doc_ids_k_BT is not None else ''}"
        )
    if doc_ids_k_BT is not None and (doc_ids_BS is None or tuple(doc_ids_k_BT.shape) != (batch, seq_len_k)):
        raise ValueError(
            f"doc_ids_k_BT must be [B, T] = {(batch, seq_len_k)} and come with doc_ids_BS; got "
            f"{tuple(doc_ids_k_BT.shape)}"
        )
    if doc_ids_BS is not None and doc_ids_k_BT is None and seq_len_k != seq_len:
        raise ValueError(f"keys ({seq_len_k}) and queries ({seq_len}) differ in length: pass doc_ids_k_BT")
    if num_heads % num_kv_heads:
        raise ValueError(f"kv heads ({num_kv_heads}) must divide query heads ({num_heads}) for GQA")
    if head_dim not in _SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"head dim {head_dim} unsupported by the Triton attention; use one of {_SUPPORTED_HEAD_DIMS}"
        )
    if not (q_BSHD.dtype == k_BTKD.dtype == v_BTKD.dtype):
        raise TypeError(f"q, k, v dtypes differ: {q_BSHD.dtype}, {k_BTKD.dtype}, {v_BTKD.dtype}")
    if q_BSHD.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"Triton attention takes bf16, fp16 or fp32, not {q_BSHD.dtype}")
    if doc_ids_BS is not None and tuple(doc_ids_BS.shape) != (batch, seq_len):
        raise ValueError(f"doc_ids_BS must be [B, S] = {(batch, seq_len)}, got {tuple(doc_ids_BS.shape)}")
    if q_BSHD.device.type == "cpu" and not interpreting():
        raise ValueError(
            "kernels.attention=triton on CPU needs TRITON_INTERPRET=1 (slow; for tests); "
            "choose kernels.attention=sdpa for CPU runs"
        )


def flash_attention(
    q_BSHD: torch.Tensor,
    k_BSKD: torch.Tensor,
    v_BSKD: torch.Tensor,
    *,
    causal: bool = True,
    doc_ids_BS: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    doc_ids_k_BT: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out_BSHD, lse_BHS); out is differentiable in q, k, v, lse is not (fp32, natural log).

    With `causal=False`, k and v may hold T != S keys, and `doc_ids_k_BT` their own document ids.
    """
    check_inputs(q_BSHD, k_BSKD, v_BSKD, doc_ids_BS, causal=causal, doc_ids_k_BT=doc_ids_k_BT)
    # The kernels need a unit stride along D only; any other stride is passed through.
    q_BSHD, k_BSKD, v_BSKD = (t if t.stride(-1) == 1 else t.contiguous() for t in (q_BSHD, k_BSKD, v_BSKD))
    if doc_ids_BS is not None:
        doc_ids_BS = doc_ids_BS.to(torch.int32).contiguous()
    if doc_ids_k_BT is not None:
        doc_ids_k_BT = doc_ids_k_BT.to(torch.int32).contiguous()
    scale = 1.0 / math.sqrt(q_BSHD.shape[-1]) if softmax_scale is None else float(softmax_scale)
    return FlashAttentionFunction.apply(q_BSHD, k_BSKD, v_BSKD, causal, doc_ids_BS, scale, doc_ids_k_BT)


def attention_op(
    q_BSHD: torch.Tensor,
    k_BSKD: torch.Tensor,
    v_BSKD: torch.Tensor,
    *,
    causal: bool = True,
    doc_ids_BS: torch.Tensor | None = None,
) -> torch.Tensor:
    """The `kernels.attention=triton` implementation of `treadle.models.ops` (same signature as sdpa/eager)."""
    return flash_attention(q_BSHD, k_BSKD, v_BSKD, causal=causal, doc_ids_BS=doc_ids_BS)[0]
