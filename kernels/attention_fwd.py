"""FlashAttention-2 forward in Triton (Dao 2023, Algorithm 1): tiled QK^T, online softmax, no S×S matrix.

Shape legend: B batch, S sequence (Sq queries, Sk keys: they differ only for full attention), H query heads,
K key/value heads, D head dim, M query rows of a tile, N key rows of a tile. Tensors keep the model's BSHD
layout and are addressed through their strides; the last dim must be contiguous (it is for `.view`s of
linear outputs).

Masking is split the way FA2 §3.1 splits causal work: the key tiles strictly left of a query tile's diagonal
need no causal mask and are swept unmasked; only the tiles on the diagonal (or, for full attention, the last
ragged tile) pay for the `where`. With packed documents (`doc_ids_BS`, each document a contiguous run of a
row) the sweep starts at the first key of the document of the tile's first query and, for full attention,
stops after the document of the tile's last query, so tiles that no query of the tile can see are skipped.
Queries and keys may carry separate document ids (full attention of one slice of a row against another, as
context parallelism's ring does); the runs then say nothing about key positions, so no tile is skipped and
the ids only mask.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Kernels work in the log2 domain (exp2 is the native instruction); LSE is handed out in natural log.
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)

# Blocks used under TRITON_INTERPRET=1 (CPU tests): small enough that tiny sequences span several tiles,
# with M != N so that the diagonal split of the causal sweep is exercised. Tests may override the entries.
INTERPRET_BLOCKS: dict[str, int] = {
    "fwd_m": 32,
    "fwd_n": 16,
    "dkdv_m": 16,
    "dkdv_n": 32,
    "dq_m": 32,
    "dq_n": 16,
}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotuning() -> bool:
    """Autotune on a GPU unless TREADLE_ATTENTION_AUTOTUNE=0 (then a fixed per-head-dim config is used)."""
    return not interpreting() and os.environ.get("TREADLE_ATTENTION_AUTOTUNE", "1") != "0"


def seq_bucket(seq_len: int) -> int:
    """Autotune key for the sequence length: powers of two, so odd lengths in training reuse a tuning."""
    return min(triton.next_power_of_2(seq_len), 1 << 16)


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs are for tests: "ieee" keeps them exact; bf16/fp16 ignore the setting.
    return "ieee" if dtype == torch.float32 else "tf32"


def document_args(
    doc_ids_BS: torch.Tensor | None,
    doc_ids_k_BS: torch.Tensor | None,
    doc_start_BS: torch.Tensor | None,
    doc_end_BS: torch.Tensor | None,
    placeholder: torch.Tensor,
) -> tuple[tuple[torch.Tensor, ...], bool, bool]:
    """The kernels' (doc_q, doc_k, doc_start, doc_end) pointer arguments, HAS_DOC and DOC_RANGES.

    Absent tensors become `placeholder` (never read: the flags compile their loads away). The runs bound
    the sweeps only when queries and keys share one id row and the runs are given.
    """
    if doc_ids_BS is None:
        assert doc_ids_k_BS is None, "key document ids need query document ids"
        return (placeholder,) * 4, False, False
    doc_ranges = doc_ids_k_BS is None and doc_start_BS is not None and doc_end_BS is not None
    doc_k = doc_ids_BS if doc_ids_k_BS is None else doc_ids_k_BS
    runs = (doc_start_BS, doc_end_BS) if doc_ranges else (placeholder, placeholder)
    return (doc_ids_BS, doc_k, *runs), True, doc_ranges


def _fwd_configs() -> list[triton.Config]:
    # BLOCK_M must be a multiple of BLOCK_N: the causal split puts the diagonal at a key-tile boundary.
    # On an H100 (D = 128, bf16, causal) 128×128/8 warps won from S = 4k up and 64×64/4 at 2k (by 2%).
    shapes = [
        (128, 128, 8, 3),
        (128, 64, 8, 3),
        (128, 64, 8, 4),
        (128, 128, 8, 2),
        (64, 64, 4, 3),
        (64, 32, 4, 2),
    ]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


def default_fwd_config(head_dim: int) -> triton.Config:
    if head_dim <= 128:
        return triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3)
    return triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2)


@triton.jit
def _fwd_sweep(
    acc,
    m_i,
    l_i,
    q,
    k_base,
    v_base,
    stride_ks,
    stride_vs,
    doc_q,
    doc_base,
    offs_m,
    lo,
    hi,
    seq_len_k,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASK_CAUSAL: tl.constexpr,
    MASK_BOUNDS: tl.constexpr,
    HAS_DOC: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Algorithm 1 lines 6-10 over key tiles [lo, hi): scores, running max m_i, running sum l_i, rescaled acc.

    Scores live in the log2 domain (scale·log2(e) folded into qk_scale) so the exponential is one exp2.
    """
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in tl.range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k_ptrs = k_base + cols[:, None] * stride_ks + offs_d[None, :]
        v_ptrs = v_base + cols[:, None] * stride_vs + offs_d[None, :]
        if MASK_BOUNDS:  # noqa: SIM108 - a compile-time branch: interior tiles load without a mask
            k = tl.load(k_ptrs, mask=(cols < seq_len_k)[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if MASK_CAUSAL:
            s = tl.where(offs_m[:, None] >= cols[None, :], s, float("-inf"))
        elif MASK_BOUNDS:
            s = tl.where((cols < seq_len_k)[None, :], s, float("-inf"))
        if HAS_DOC:
            doc_k = tl.load(doc_base + cols, mask=cols < seq_len_k, other=-1)
            s = tl.where(doc_q[:, None] == doc_k[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_shift = m_new
        if HAS_DOC:
            # A row whose every key so far lies in another document still has m = -inf; shift by 0 instead
            # so that exp2(-inf - -inf) cannot produce NaN (its p and alpha are then exactly 0).
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_shift[:, None])
        alpha = tl.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASK_BOUNDS:  # noqa: SIM108 - as for k
            v = tl.load(v_ptrs, mask=(cols < seq_len_k)[:, None], other=0.0)
        else:
            v = tl.load(v_ptrs)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attn_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    lse_ptr,
    doc_q_ptr,
    doc_k_ptr,
    doc_start_ptr,
    doc_end_ptr,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_ob,
    stride_os,
    stride_oh,
    seq_len_q,
    seq_len_k,
    num_heads,
    group_size,
    softmax_scale,
    seq_bucket,
    seq_bucket_k,
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_DOC: tl.constexpr,
    DOC_RANGES: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program = one query tile of one (batch, head); Algorithm 1's outer loop is the grid.

    CAUSAL needs Sq == Sk. DOC_RANGES (queries and keys share one document-id row, so Sq == Sk): the runs
    `doc_start`/`doc_end` bound the sweep; without it, document ids only mask.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    if CAUSAL:
        # Causal tiles near the end of the sequence do the most work: launch them first for a shorter tail.
        pid_m = tl.cdiv(seq_len_q, BLOCK_M) - 1 - pid_m
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    kh = h // group_size  # GQA/MQA: the group's key/value head is indexed, never repeated in memory
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seq_len_q

    q_base = q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = k_ptr + b.to(tl.int64) * stride_kb + kh.to(tl.int64) * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + kh.to(tl.int64) * stride_vh
    doc_k_base = doc_k_ptr + b.to(tl.int64) * seq_len_k
    q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :], mask=row_ok[:, None], other=0.0)

    qk_scale = softmax_scale * LOG2E
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    lo = 0
    doc_q = 0
    if HAS_DOC:
        doc_q = tl.load(doc_q_ptr + b.to(tl.int64) * seq_len_q + offs_m, mask=row_ok, other=-2)
        if DOC_RANGES:
            lo = (tl.load(doc_start_ptr + b.to(tl.int64) * seq_len_q + start_m) // BLOCK_N) * BLOCK_N
    if CAUSAL:
        mid = start_m
        hi = tl.minimum(start_m + BLOCK_M, seq_len_k)
    else:
        hi = seq_len_k
        if DOC_RANGES:
            last = tl.minimum(start_m + BLOCK_M, seq_len_q) - 1
            hi = tl.load(doc_end_ptr + b.to(tl.int64) * seq_len_q + last)
        mid = tl.minimum(hi, (seq_len_k // BLOCK_N) * BLOCK_N)

    acc, m_i, l_i = _fwd_sweep(
        acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, doc_q, doc_k_base, offs_m, lo, mid,
        seq_len_k, qk_scale, HEAD_DIM, BLOCK_N, False, False, HAS_DOC, DOT_PRECISION,
    )  # fmt: skip
    acc, m_i, l_i = _fwd_sweep(
        acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, doc_q, doc_k_base, offs_m, mid, hi,
        seq_len_k, qk_scale, HEAD_DIM, BLOCK_N, CAUSAL, True, HAS_DOC, DOT_PRECISION,
    )  # fmt: skip

    # Algorithm 1 line 12-13: O = acc / l and L = m + log(l); L is kept in natural log for callers
    # (context parallel merges partial results with it). Padded rows (l = 0) are never stored; a row that
    # sees no key at all (possible with separate document ids) gets O = 0 and L = -inf.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = (m_i + tl.log2(l_safe)) * LN2
    o_base = o_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    tl.store(
        o_base + offs_m[:, None] * stride_os + offs_d[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=row_ok[:, None],
    )
    tl.store(lse_ptr + pid_bh.to(tl.int64) * seq_len_q + offs_m, lse, mask=row_ok)


_attn_fwd_tuned = triton.autotune(
    configs=_fwd_configs(),
    key=["HEAD_DIM", "seq_bucket", "seq_bucket_k", "CAUSAL", "HAS_DOC", "DOC_RANGES", "group_size"],
)(_attn_fwd_kernel)


def attention_forward(
    q_BSHD: torch.Tensor,
    k_BSKD: torch.Tensor,
    v_BSKD: torch.Tensor,
    doc_ids_BS: torch.Tensor | None,
    doc_ids_k_BS: torch.Tensor | None,
    doc_start_BS: torch.Tensor | None,
    doc_end_BS: torch.Tensor | None,
    causal: bool,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel; returns (out_BSHD in q's dtype, lse_BHS in fp32, natural log).

    q is [B, Sq, H, D], k and v [B, Sk, K, D]. `doc_ids_BS` holds the queries' document ids and, unless
    `doc_ids_k_BS` is given, the keys' too; the runs `doc_start_BS`/`doc_end_BS` serve only a shared row.
    """
    batch, seq_len, num_heads, head_dim = q_BSHD.shape
    seq_len_k, num_kv_heads = k_BSKD.shape[1], k_BSKD.shape[2]
    out_BSHD = torch.empty_like(q_BSHD, memory_format=torch.contiguous_format)
    lse_BHS = torch.empty(batch, num_heads, seq_len, device=q_BSHD.device, dtype=torch.float32)
    doc_args, has_doc, doc_ranges = document_args(doc_ids_BS, doc_ids_k_BS, doc_start_BS, doc_end_BS, lse_BHS)
    args = (
        q_BSHD, k_BSKD, v_BSKD, out_BSHD, lse_BHS, *doc_args,
        q_BSHD.stride(0), q_BSHD.stride(1), q_BSHD.stride(2),
        k_BSKD.stride(0), k_BSKD.stride(1), k_BSKD.stride(2),
        v_BSKD.stride(0), v_BSKD.stride(1), v_BSKD.stride(2),
        out_BSHD.stride(0), out_BSHD.stride(1), out_BSHD.stride(2),
        seq_len, seq_len_k, num_heads, num_heads // num_kv_heads, softmax_scale, seq_bucket(seq_len),
        seq_bucket(seq_len_k),
    )  # fmt: skip
    meta = {
        "HEAD_DIM": head_dim,
        "CAUSAL": causal,
        "HAS_DOC": has_doc,
        "DOC_RANGES": doc_ranges,
        "DOT_PRECISION": dot_precision(q_BSHD.dtype),
    }
    if autotuning():

        def grid(cfg: dict) -> tuple[int, int]:
            return (triton.cdiv(seq_len, cfg["BLOCK_M"]), batch * num_heads)

        _attn_fwd_tuned[grid](*args, **meta)
    else:
        if interpreting():
            blocks = {"BLOCK_M": INTERPRET_BLOCKS["fwd_m"], "BLOCK_N": INTERPRET_BLOCKS["fwd_n"]}
            launch = {"num_warps": 4, "num_stages": 1}
        else:
            cfg = default_fwd_config(head_dim)
            blocks, launch = cfg.kwargs, {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        grid_fixed = (triton.cdiv(seq_len, blocks["BLOCK_M"]), batch * num_heads)
        _attn_fwd_kernel[grid_fixed](*args, **meta, **blocks, **launch)
    return out_BSHD, lse_BHS
