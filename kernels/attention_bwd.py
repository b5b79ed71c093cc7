"""FlashAttention-2 backward in Triton (Dao 2023, Algorithm 2), recomputing P from Q, K and the saved L.

Shape legend: B batch, S sequence (Sq queries, Sk keys: they differ only for full attention), H query heads,
K key/value heads, D head dim, M query rows of a tile, N key rows of a tile. BSHD/BSKD layouts are addressed
through strides, as in the forward.

Three launches, no atomics:
  1. delta = rowsum(dO ∘ O) per query row (Algorithm 2 line 4, FA2 §3.2's D_i).
  2. dK, dV: one program per key tile of one key/value head; it loops over the query tiles of every query
     head of its GQA group (Algorithm 2's inner loop, j fixed), so the group's dK/dV are summed in registers
     and written once, with no per-query-head copies. When that grid is too small to fill the GPU (few kv
     heads, short sequences: MQA, or context parallelism's per-rank slices), the group is split over
     programs that write fp32 partial sums, added up in torch afterwards (`kv_group_splits`).
  3. dQ: one program per query tile (the transpose of 2), so dQ is accumulated in registers instead of
     FA2's atomic adds; it costs one more QK^T and dO V^T recompute, which is cheaper on H100 than fp32
     atomics into HBM and keeps the result deterministic.
Tile skipping, the causal diagonal split and separate query/key document ids follow the forward (see
attention_fwd.py). The saved L may come from a larger attention than this call's (context parallelism
passes the merged L and O of all its blocks): P = exp(S - L) is then this block's share of the global
softmax, and the gradients are this block's contribution (FA2 Algorithm 2 unchanged).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from treadle.kernels.attention_fwd import (
    INTERPRET_BLOCKS,
    LOG2E,
    autotuning,
    document_args,
    dot_precision,
    interpreting,
    seq_bucket,
)

_KEY = ["HEAD_DIM", "seq_bucket", "seq_bucket_k", "CAUSAL", "HAS_DOC", "DOC_RANGES", "group_size"]
# Below this many dK/dV programs per SM the GQA group is split over programs (several waves hide the
# causal imbalance: the first key tiles sweep every query row, the last ones a single tile).
_MIN_DKDV_PROGRAMS_PER_SM = 4


def _dkdv_configs() -> list[triton.Config]:
    # BLOCK_N (key rows, the program's tile) must be a multiple of BLOCK_M (query rows swept). Two fp32
    # [BLOCK_N, D] accumulators live in registers, so BLOCK_N = 128 at D = 128 wants 8 warps. The first
    # entry won at every S on an H100 (D = 128, bf16, causal); the small tiles are for D = 256.
    shapes = [
        (64, 128, 8, 3),
        (64, 128, 8, 2),
        (32, 128, 8, 3),
        (32, 64, 4, 3),
        (64, 64, 4, 3),
        (16, 64, 8, 2),
    ]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


def _dq_configs() -> list[triton.Config]:
    # BLOCK_M (query rows, the program's tile) must be a multiple of BLOCK_N (key rows swept).
    shapes = [
        (128, 64, 8, 3),
        (128, 64, 8, 2),
        (128, 32, 8, 3),
        (128, 32, 8, 4),
        (64, 32, 4, 3),
        (64, 64, 4, 3),
        (64, 16, 8, 2),
    ]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


def default_dkdv_config(head_dim: int) -> triton.Config:
    if head_dim <= 128:
        return triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=8, num_stages=3)
    return triton.Config({"BLOCK_M": 16, "BLOCK_N": 64}, num_warps=8, num_stages=2)


def default_dq_config(head_dim: int) -> triton.Config:
    if head_dim <= 128:
        return triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3)
    return triton.Config({"BLOCK_M": 64, "BLOCK_N": 16}, num_warps=8, num_stages=2)


@triton.jit
def _bwd_delta_kernel(
    o_ptr,
    do_ptr,
    delta_ptr,
    stride_ob,
    stride_os,
    stride_oh,
    stride_dob,
    stride_dos,
    stride_doh,
    seq_len,
    num_heads,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = (offs_m < seq_len)[:, None]
    o = tl.load(
        o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :], mask=row_ok
    )
    do = tl.load(
        do_ptr + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dos + offs_d[None, :], mask=row_ok
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + pid_bh.to(tl.int64) * seq_len + offs_m, delta, mask=offs_m < seq_len)


@triton.jit
def _dkdv_sweep(
    dk,
    dv,
    k,
    v,
    q_base,
    do_base,
    lse_base,
    delta_base,
    stride_qs,
    stride_dos,
    doc_k,
    doc_base,
    offs_n,
    lo,
    hi,
    seq_len_q,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    MASK_CAUSAL: tl.constexpr,
    HAS_DOC: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Algorithm 2 lines 8-20 with the key tile fixed, over query tiles [lo, hi), in transposed form.

    Working with S^T = K Q^T keeps K, V and the dK, dV accumulators as the left operands, so no register tile
    is transposed. Padded query rows load L = +inf, which makes their P exactly 0.
    """
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_m in tl.range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < seq_len_q
        q = tl.load(q_base + rows[:, None] * stride_qs + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_dos + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        lse2 = tl.load(lse_base + rows, mask=row_ok, other=float("inf")) * LOG2E
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        p_t = tl.exp2(s_t - lse2[None, :])
        if MASK_CAUSAL:
            p_t = tl.where(rows[None, :] >= offs_n[:, None], p_t, 0.0)
        if HAS_DOC:
            doc_q = tl.load(doc_base + rows, mask=row_ok, other=-2)
            p_t = tl.where(doc_k[:, None] == doc_q[None, :], p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dk_ptr,
    dv_ptr,
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
    stride_dob,
    stride_dos,
    stride_doh,
    stride_dkb,
    stride_dks,
    stride_dkh,
    seq_len_q,
    seq_len_k,
    num_heads,
    num_kv_heads,
    group_size,
    heads_per_split,
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
    pid_n = tl.program_id(0)
    pid_bks = tl.program_id(1)  # (batch, kv head, split of the GQA group)
    num_splits = group_size // heads_per_split
    split = pid_bks % num_splits
    b = (pid_bks // (num_splits * num_kv_heads)).to(tl.int64)
    kh = ((pid_bks // num_splits) % num_kv_heads).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = (offs_n < seq_len_k)[:, None]
    kv_rows = offs_n[:, None] * stride_ks + offs_d[None, :]
    k = tl.load(k_ptr + b * stride_kb + kh * stride_kh + kv_rows, mask=col_ok, other=0.0)
    v = tl.load(
        v_ptr + b * stride_vb + kh * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :],
        mask=col_ok,
        other=0.0,
    )
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    qk_scale = softmax_scale * LOG2E

    # Query rows that can see this key tile: from the diagonal (causal) or the first key's document start,
    # up to the end of the last key's document (or the sequence). CAUSAL and DOC_RANGES imply Sq == Sk.
    doc_q_base = doc_q_ptr + b * seq_len_q
    doc_k = 0
    q_hi = seq_len_q
    if HAS_DOC:
        doc_k = tl.load(doc_k_ptr + b * seq_len_k + offs_n, mask=offs_n < seq_len_k, other=-1)
        if DOC_RANGES:
            last = tl.minimum(start_n + BLOCK_N, seq_len_k) - 1
            q_hi = tl.load(doc_end_ptr + b * seq_len_k + last)
    if CAUSAL:
        diag_hi = tl.minimum(start_n + BLOCK_N, q_hi)
        rest_lo = start_n + BLOCK_N
    else:
        diag_hi = 0
        rest_lo = 0
        if DOC_RANGES:
            rest_lo = (tl.load(doc_start_ptr + b * seq_len_k + start_n) // BLOCK_M) * BLOCK_M

    for g in range(heads_per_split):
        h = kh * group_size + split * heads_per_split + g
        q_base = q_ptr + b * stride_qb + h * stride_qh
        do_base = do_ptr + b * stride_dob + h * stride_doh
        lse_base = lse_ptr + (b * num_heads + h) * seq_len_q
        delta_base = delta_ptr + (b * num_heads + h) * seq_len_q
        if CAUSAL:
            dk, dv = _dkdv_sweep(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_dos, doc_k, doc_q_base,
                offs_n, start_n, diag_hi, seq_len_q, qk_scale, HEAD_DIM, BLOCK_M, True, HAS_DOC, DOT_PRECISION,
            )  # fmt: skip
        dk, dv = _dkdv_sweep(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_dos, doc_k, doc_q_base,
            offs_n, rest_lo, q_hi, seq_len_q, qk_scale, HEAD_DIM, BLOCK_M, False, HAS_DOC, DOT_PRECISION,
        )  # fmt: skip

    # dS carries no softmax scale (Algorithm 2 line 16 with S = scale·QK^T): apply it once here.
    dk = dk * softmax_scale
    # dK and dV buffers share one shape, [B, S, K·splits, D] (one split: the gradients themselves).
    out_head = kh * num_splits + split
    out_offs = b * stride_dkb + out_head * stride_dkh + offs_n[:, None] * stride_dks + offs_d[None, :]
    tl.store(dk_ptr + out_offs, dk.to(dk_ptr.dtype.element_ty), mask=col_ok)
    tl.store(dv_ptr + out_offs, dv.to(dv_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _dq_sweep(
    dq,
    q,
    do,
    lse2,
    delta,
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
    """Algorithm 2 lines 11-21 with the query tile fixed, over key tiles [lo, hi): dQ += dS K."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in tl.range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k_ptrs = k_base + cols[:, None] * stride_ks + offs_d[None, :]
        v_ptrs = v_base + cols[:, None] * stride_vs + offs_d[None, :]
        if MASK_BOUNDS:
            k = tl.load(k_ptrs, mask=(cols < seq_len_k)[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=(cols < seq_len_k)[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        p = tl.exp2(s - lse2[:, None])
        if MASK_CAUSAL:
            p = tl.where(offs_m[:, None] >= cols[None, :], p, 0.0)
        elif MASK_BOUNDS:
            p = tl.where((cols < seq_len_k)[None, :], p, 0.0)
        if HAS_DOC:
            doc_k = tl.load(doc_base + cols, mask=cols < seq_len_k, other=-1)
            p = tl.where(doc_q[:, None] == doc_k[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dq_ptr,
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
    stride_dob,
    stride_dos,
    stride_doh,
    stride_dqb,
    stride_dqs,
    stride_dqh,
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
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    if CAUSAL:
        pid_m = tl.cdiv(seq_len_q, BLOCK_M) - 1 - pid_m
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    kh = h // group_size
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seq_len_q
    q = tl.load(
        q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )
    do = tl.load(
        do_ptr + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dos + offs_d[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )
    lse2 = tl.load(lse_ptr + pid_bh.to(tl.int64) * seq_len_q + offs_m, mask=row_ok, other=float("inf"))
    lse2 = lse2 * LOG2E
    delta = tl.load(delta_ptr + pid_bh.to(tl.int64) * seq_len_q + offs_m, mask=row_ok, other=0.0)
    k_base = k_ptr + b * stride_kb + kh * stride_kh
    v_base = v_ptr + b * stride_vb + kh * stride_vh
    doc_k_base = doc_k_ptr + b * seq_len_k
    qk_scale = softmax_scale * LOG2E
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    lo = 0
    doc_q = 0
    if HAS_DOC:
        doc_q = tl.load(doc_q_ptr + b * seq_len_q + offs_m, mask=row_ok, other=-2)
        if DOC_RANGES:
            lo = (tl.load(doc_start_ptr + b * seq_len_q + start_m) // BLOCK_N) * BLOCK_N
    if CAUSAL:
        mid = start_m
        hi = tl.minimum(start_m + BLOCK_M, seq_len_k)
    else:
        hi = seq_len_k
        if DOC_RANGES:
            last = tl.minimum(start_m + BLOCK_M, seq_len_q) - 1
            hi = tl.load(doc_end_ptr + b * seq_len_q + last)
        mid = tl.minimum(hi, (seq_len_k // BLOCK_N) * BLOCK_N)

    dq = _dq_sweep(
        dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, doc_q, doc_k_base, offs_m, lo, mid,
        seq_len_k, qk_scale, HEAD_DIM, BLOCK_N, False, False, HAS_DOC, DOT_PRECISION,
    )  # fmt: skip
    dq = _dq_sweep(
        dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, doc_q, doc_k_base, offs_m, mid, hi,
        seq_len_k, qk_scale, HEAD_DIM, BLOCK_N, CAUSAL, True, HAS_DOC, DOT_PRECISION,
    )  # fmt: skip
    dq = dq * softmax_scale
    tl.store(
        dq_ptr + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqs + offs_d[None, :],
        dq.to(dq_ptr.dtype.element_ty),
        mask=row_ok[:, None],
    )


_dkdv_tuned = triton.autotune(configs=_dkdv_configs(), key=[*_KEY, "heads_per_split"])(_attn_bwd_dkdv_kernel)
_dq_tuned = triton.autotune(configs=_dq_configs(), key=_KEY)(_attn_bwd_dq_kernel)


@functools.lru_cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def kv_group_splits(
    batch: int, seq_len: int, num_kv_heads: int, group_size: int, device: torch.device
) -> int:
    """How many programs share one kv head's GQA group in the dK/dV kernel (a divisor of the group size)."""
    if group_size == 1 or device.type != "cuda":
        return 1
    target = _MIN_DKDV_PROGRAMS_PER_SM * _num_sms(device.index if device.index is not None else 0)
    programs = triton.cdiv(seq_len, 128) * batch * num_kv_heads
    for splits in range(1, group_size + 1):
        if group_size % splits == 0 and programs * splits >= target:
            return splits
    return group_size


def _fixed_config(kind: str, head_dim: int) -> tuple[dict[str, int], dict[str, int]]:
    """(block sizes, launch options) when not autotuning: interpreter blocks on CPU, defaults on a GPU."""
    if interpreting():
        blocks = {"BLOCK_M": INTERPRET_BLOCKS[f"{kind}_m"], "BLOCK_N": INTERPRET_BLOCKS[f"{kind}_n"]}
        return blocks, {"num_warps": 4, "num_stages": 1}
    cfg = default_dkdv_config(head_dim) if kind == "dkdv" else default_dq_config(head_dim)
    return dict(cfg.kwargs), {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def _delta(out_BSHD: torch.Tensor, do_BSHD: torch.Tensor) -> torch.Tensor:
    """rowsum(dO ∘ O) as fp32 [B, H, S] (Algorithm 2 line 4)."""
    batch, seq_len, num_heads, head_dim = out_BSHD.shape
    delta_BHS = torch.empty(batch, num_heads, seq_len, device=out_BSHD.device, dtype=torch.float32)
    block = 64
    _bwd_delta_kernel[(triton.cdiv(seq_len, block), batch * num_heads)](
        out_BSHD, do_BSHD, delta_BHS,
        out_BSHD.stride(0), out_BSHD.stride(1), out_BSHD.stride(2),
        do_BSHD.stride(0), do_BSHD.stride(1), do_BSHD.stride(2),
        seq_len, num_heads, HEAD_DIM=head_dim, BLOCK_M=block,
    )  # fmt: skip
    return delta_BHS


def attention_backward(
    do_BSHD: torch.Tensor,
    q_BSHD: torch.Tensor,
    k_BSKD: torch.Tensor,
    v_BSKD: torch.Tensor,
    out_BSHD: torch.Tensor,
    lse_BHS: torch.Tensor,
    doc_ids_BS: torch.Tensor | None,
    doc_ids_k_BS: torch.Tensor | None,
    doc_start_BS: torch.Tensor | None,
    doc_end_BS: torch.Tensor | None,
    causal: bool,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the three backward kernels; returns (dq_BSHD, dk_BSKD, dv_BSKD) in the inputs' dtypes.

    Document arguments as in `attention_forward`; `lse_BHS` must be contiguous.
    """
    batch, seq_len, num_heads, head_dim = q_BSHD.shape
    seq_len_k, num_kv_heads = k_BSKD.shape[1], k_BSKD.shape[2]
    group_size = num_heads // num_kv_heads
    if do_BSHD.stride(-1) != 1:
        do_BSHD = do_BSHD.contiguous()
    num_splits = kv_group_splits(batch, seq_len_k, num_kv_heads, group_size, q_BSHD.device)
    dq_BSHD = torch.empty_like(q_BSHD, memory_format=torch.contiguous_format)
    if num_splits == 1:
        dk_BSKD = torch.empty_like(k_BSKD, memory_format=torch.contiguous_format)
        dv_BSKD = torch.empty_like(v_BSKD, memory_format=torch.contiguous_format)
    else:
        partial_shape = (batch, seq_len_k, num_kv_heads * num_splits, head_dim)
        dk_BSKD = k_BSKD.new_empty(partial_shape, dtype=torch.float32)
        dv_BSKD = k_BSKD.new_empty(partial_shape, dtype=torch.float32)
    delta_BHS = _delta(out_BSHD, do_BSHD)

    doc_args, has_doc, doc_ranges = document_args(doc_ids_BS, doc_ids_k_BS, doc_start_BS, doc_end_BS, lse_BHS)
    strides = (
        q_BSHD.stride(0), q_BSHD.stride(1), q_BSHD.stride(2),
        k_BSKD.stride(0), k_BSKD.stride(1), k_BSKD.stride(2),
        v_BSKD.stride(0), v_BSKD.stride(1), v_BSKD.stride(2),
        do_BSHD.stride(0), do_BSHD.stride(1), do_BSHD.stride(2),
    )  # fmt: skip
    meta = {
        "HEAD_DIM": head_dim,
        "CAUSAL": causal,
        "HAS_DOC": has_doc,
        "DOC_RANGES": doc_ranges,
        "DOT_PRECISION": dot_precision(q_BSHD.dtype),
    }
    buckets = (seq_bucket(seq_len), seq_bucket(seq_len_k))
    dkdv_args = (
        q_BSHD, k_BSKD, v_BSKD, do_BSHD, lse_BHS, delta_BHS, dk_BSKD, dv_BSKD, *doc_args, *strides,
        dk_BSKD.stride(0), dk_BSKD.stride(1), dk_BSKD.stride(2),
        seq_len, seq_len_k, num_heads, num_kv_heads, group_size, group_size // num_splits, softmax_scale,
        *buckets,
    )  # fmt: skip
    dq_args = (
        q_BSHD, k_BSKD, v_BSKD, do_BSHD, lse_BHS, delta_BHS, dq_BSHD, *doc_args, *strides,
        dq_BSHD.stride(0), dq_BSHD.stride(1), dq_BSHD.stride(2),
        seq_len, seq_len_k, num_heads, group_size, softmax_scale, *buckets,
    )  # fmt: skip

    def dkdv_grid(cfg: dict) -> tuple[int, int]:
        return (triton.cdiv(seq_len_k, cfg["BLOCK_N"]), batch * num_kv_heads * num_splits)

    def dq_grid(cfg: dict) -> tuple[int, int]:
        return (triton.cdiv(seq_len, cfg["BLOCK_M"]), batch * num_heads)

    if autotuning():
        _dkdv_tuned[dkdv_grid](*dkdv_args, **meta)
        _dq_tuned[dq_grid](*dq_args, **meta)
    else:
        blocks, launch = _fixed_config("dkdv", head_dim)
        _attn_bwd_dkdv_kernel[dkdv_grid(blocks)](*dkdv_args, **meta, **blocks, **launch)
        blocks, launch = _fixed_config("dq", head_dim)
        _attn_bwd_dq_kernel[dq_grid(blocks)](*dq_args, **meta, **blocks, **launch)
    if num_splits > 1:
        dk_BSKD, dv_BSKD = (
            t.view(batch, seq_len_k, num_kv_heads, num_splits, head_dim).sum(3).to(k_BSKD.dtype)
            for t in (dk_BSKD, dv_BSKD)
        )
    return dq_BSHD, dk_BSKD, dv_BSKD
