"""Fused output projection + cross-entropy that never materialises the [N, V] logits in fp32 or all at once.

Shape legend: N tokens, E model dim, V vocab, C tokens in one chunk, B vocab blocks, Vb columns in a block.

Tokens are processed in chunks of C, and each chunk's vocab in B (= 8) blocks, each block its own tensor:

1. `logits_CVb = h_CE @ W_VbE^T` per block (cuBLAS, input dtype, fp32 accumulation);
2. a Triton program per (row, block) computes the block's logsumexp online over column tiles (Milakov &
   Gimelshein 2018, "Online normalizer calculation for softmax") and picks the label's logit; the per-block
   logsumexps are combined into the row's;
3. per block: a Triton program per row overwrites the logits in place with d(loss)/d(logits) =
   softmax − onehot (+ the z-loss term), then `dh_CE += dlogits_CVb @ W_VbE` (fp32) and
   `dW_VbE (+)= dlogits_CVb^T @ h_CE`, and the block's logits are freed at once.

Holding the vocab as separate blocks is what keeps memory low without many chunks: each block is released as
soon as its gradient GEMMs are done, so the gradient of W grows while the logits shrink. With one chunk,
dW_VbE comes out of one GEMM over all N tokens (fp32 accumulation inside cuBLAS) in the weight's dtype; with
several chunks it is accumulated in fp32 across chunks (4 B·V·E, and a read and write of it per chunk).

Gradient in the forward. The loss is a scalar, so by the chain rule the gradients for any downstream use of
it are `grad_output · d(loss)/d(hidden, weight)`: computing d(loss)/d(·) during the forward (while the logits
are at hand) and only scaling it by the scalar `grad_output` in the backward is exact, and it saves
recomputing the logits in the backward. What it costs: the forward of a grad-enabled call does all the
gradient work even if no backward follows (the no-grad path — `torch.no_grad()`, or inputs that do not
require grad — skips it), `dh` and `dW` are held from the forward until the backward (dW is V×E in the
weight's dtype: 1 GiB for Llama-3's 128256×4096 in bf16), and second-order gradients are not supported.

Chunk size (`default_chunk_size`). A chunk's live logits are kept within `LOGITS_BUDGET_BYTES` (512 MiB:
2048 tokens × 128256 in bf16 when all blocks are live; a no-grad chunk has one block live at a time), except
that one chunk of all N tokens is taken whenever its logits cost no more than the fp32 dW accumulator plus a
budget chunk that several chunks would need instead (N ≤ 2E + budget/(2V) for bf16: Llama-3-8B's 8192-token
micro-batch is one chunk). More chunks lower peak memory; fewer make larger GEMMs and spare the accumulator,
whose read-modify-write costs ~1.4 ms per chunk at 128256×4096 on an H100 (a third of that GEMM's time).

Precision. The logits and the gradient written in place are in the input dtype (as in the plain-PyTorch op,
which upcasts bf16 logits); logsumexp, loss and softmax are computed in fp32; dh is summed over vocab blocks
in fp32 and dW over tokens in fp32, each rounded once to the input dtype.

Not supported yet: vocab-sharded (tensor-parallel) output weights — a DTensor weight raises `TypeError`; the
weight must be a plain tensor (under FSDP2 it is, inside the root module's forward: the all-gathered weight,
or the tied embedding weight, whose gradient then adds to the embedding's). Labels must lie in [0, V) or equal
`ignore_index`; other values are not checked (a check would need a device→host sync).
"""

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

IGNORE_INDEX = -100
# One chunk's live logits at most this many bytes; see the module docstring for the trade-off.
LOGITS_BUDGET_BYTES = 512 * 2**20
# Chunk sizes are multiples of this (when the budget allows) so that cuBLAS sees tile-friendly shapes.
_CHUNK_MULTIPLE = 64
# Vocab blocks (at most; at least 64 columns each). More blocks free memory in finer steps; fewer keep the
# per-block GEMMs large and the fp32 dh read-modify-write (once per block) rare.
_NUM_VOCAB_BLOCKS = 8
# Columns one Triton program handles per step of its sweep over a block (tests lower it to cover many steps).
_MAX_TILE_V = 4096
# Rows per Triton program. One on a GPU: a row's block (16032 columns at Llama-3's vocab) is already several
# tiles of work, and C programs fill the machine. Tests raise it: the interpreter's cost is per program.
_ROWS_PER_PROGRAM = 1


@triton.jit
def _block_stats_kernel(
    logits_ptr,
    labels_ptr,
    block_lse_ptr,
    target_ptr,
    num_rows,
    row_stride,
    col_start,
    ignore_index,
    BLOCK_COLS: tl.constexpr,
    TILE: tl.constexpr,
    ROWS: tl.constexpr,
):
    """ROWS rows of one vocab block: the block's logsumexp, and the label's logit if it lies in this block.

    The block width is a compile-time constant: a model has at most two (blocks differ by one column), and
    Triton 3.6's interpreter cannot loop to a runtime bound under NumPy ≥ 2.4.
    """
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < num_rows
    # Rows past the end read the last row (always valid) and store nothing.
    row_offsets = tl.minimum(rows, num_rows - 1).to(tl.int64) * row_stride
    tile_cols = tl.arange(0, TILE)
    # Online logsumexp: a running max and a sum of exponentials rescaled whenever the max grows.
    running_max = tl.full((ROWS,), float("-inf"), tl.float32)
    running_sum = tl.zeros((ROWS,), tl.float32)
    for start in range(0, BLOCK_COLS, TILE):
        cols = start + tile_cols
        ptrs = logits_ptr + row_offsets[:, None] + cols[None, :]
        x = tl.load(ptrs, mask=(cols < BLOCK_COLS)[None, :], other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, axis=1))
        scaled = tl.exp(x - new_max[:, None])
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(scaled, axis=1)
        running_max = new_max
    tl.store(block_lse_ptr + rows, running_max + tl.log(running_sum), mask=row_ok)

    labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index)
    local = labels - col_start
    in_block = (labels != ignore_index) & (local >= 0) & (local < BLOCK_COLS)
    target = tl.load(logits_ptr + row_offsets + tl.where(in_block, local, 0)).to(tl.float32)
    tl.store(target_ptr + rows, target, mask=in_block & row_ok)


@triton.jit
def _block_grad_kernel(
    logits_ptr,
    labels_ptr,
    lse_ptr,
    num_rows,
    row_stride,
    col_start,
    ignore_index,
    z_loss_weight,
    BLOCK_COLS: tl.constexpr,
    TILE: tl.constexpr,
    ROWS: tl.constexpr,
):
    """ROWS rows of one vocab block: logits replaced in place by d(loss)/d(logits)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < num_rows
    row_offsets = tl.minimum(rows, num_rows - 1).to(tl.int64) * row_stride
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index)
    valid_f = (labels != ignore_index).to(tl.float32)
    local = labels - col_start  # the label's column here; outside [0, BLOCK_COLS) when in another block
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    # d/dx_j [lse - x_t + w·lse²] = softmax_j·(1 + 2w·lse) - [j = t]; zero for an ignored row.
    softmax_coef = (1.0 + 2.0 * z_loss_weight * lse) * valid_f
    tile_cols = tl.arange(0, TILE)
    for start in range(0, BLOCK_COLS, TILE):
        cols = start + tile_cols
        ptrs = logits_ptr + row_offsets[:, None] + cols[None, :]
        mask = row_ok[:, None] & (cols < BLOCK_COLS)[None, :]
        x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        onehot = tl.where(cols[None, :] == local[:, None], valid_f[:, None], 0.0)
        grad = tl.exp(x - lse[:, None]) * softmax_coef[:, None] - onehot
        tl.store(ptrs, grad.to(logits_ptr.dtype.element_ty), mask=mask)


def _launch_config(logits_CVb: torch.Tensor) -> tuple[tuple[int], dict[str, int]]:
    """Grid and meta-parameters for a [C, Vb] logits block: one program per `_ROWS_PER_PROGRAM` rows."""
    num_rows, block_cols = logits_CVb.shape
    tile = min(_MAX_TILE_V, triton.next_power_of_2(block_cols))
    meta = {
        "BLOCK_COLS": block_cols,
        "TILE": tile,
        "ROWS": _ROWS_PER_PROGRAM,
        "num_warps": 8 if tile * _ROWS_PER_PROGRAM >= 2048 else 4,
    }
    return (triton.cdiv(num_rows, _ROWS_PER_PROGRAM),), meta


def vocab_blocks(vocab_size: int) -> list[tuple[int, int]]:
    """[start, end) of each vocab block: `_NUM_VOCAB_BLOCKS` near-equal blocks of at least 64 columns."""
    num_blocks = max(1, min(_NUM_VOCAB_BLOCKS, vocab_size // 64))
    edges = [vocab_size * i // num_blocks for i in range(num_blocks + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


def default_chunk_size(
    num_tokens: int,
    vocab_size: int,
    dim: int,
    dtype: torch.dtype,
    *,
    grad_hidden: bool = True,
    grad_weight: bool = True,
) -> int:
    """Tokens per chunk: see "Chunk size" in the module docstring.

    Chunks are spread evenly (8192 tokens as 4×2048 rather than 3×2093 + 1913) so their GEMMs match.
    """
    grad = grad_hidden or grad_weight
    live_cols = vocab_size if grad else max(end - start for start, end in vocab_blocks(vocab_size))
    bytes_per_token = live_cols * dtype.itemsize
    # One chunk needs no fp32 dW accumulator; several need one (4 B·V·E) beside their chunk's logits.
    accumulator = 4 * vocab_size * dim if grad_weight and dtype != torch.float32 else 0
    if num_tokens * bytes_per_token <= LOGITS_BUDGET_BYTES + accumulator:
        return max(1, num_tokens)
    max_rows = max(1, LOGITS_BUDGET_BYTES // bytes_per_token)
    if max_rows >= _CHUNK_MULTIPLE:
        max_rows -= max_rows % _CHUNK_MULTIPLE
    num_chunks = math.ceil(num_tokens / max_rows)
    rows = math.ceil(math.ceil(num_tokens / num_chunks) / _CHUNK_MULTIPLE) * _CHUNK_MULTIPLE
    return max(1, min(rows, max_rows))


# Whether `torch.addmm(..., out_dtype=torch.float32)` takes an fp32 accumulator with bf16/fp16 operands on
# this device type: newer torch builds (2.11 included) run it as one cuBLAS GEMM with an fp32 C.
_FP32_OUT_ADDMM: dict[str, bool] = {}


def _mm_fp32_(acc: torch.Tensor, mat1: torch.Tensor, mat2: torch.Tensor, *, accumulate: bool) -> None:
    """acc (fp32) = or += mat1 @ mat2, with mat1/mat2 in fp32, bf16 or fp16 and fp32 accumulation."""
    beta = 1 if accumulate else 0  # beta 0 ignores acc's contents, so acc may start uninitialised
    if mat1.dtype == torch.float32:
        torch.addmm(acc, mat1, mat2, beta=beta, out=acc)
        return
    device_type = acc.device.type
    if device_type == "cuda" and _FP32_OUT_ADDMM.get(device_type, True):
        try:
            torch.addmm(acc, mat1, mat2, beta=beta, out_dtype=torch.float32, out=acc)
            _FP32_OUT_ADDMM[device_type] = True
            return
        except (RuntimeError, TypeError, NotImplementedError):
            _FP32_OUT_ADDMM[device_type] = False
    # CPU (no fp32-output low-precision GEMM) or an older CUDA build: upcast, or add a low-precision product.
    product = torch.mm(mat1.float(), mat2.float()) if device_type != "cuda" else torch.mm(mat1, mat2)
    if accumulate:
        acc.add_(product)
    else:
        acc.copy_(product)


class _WeightGrad:
    """dW_VE as one part per vocab block: straight from one GEMM per block when there is a single chunk,
    else accumulated in fp32 across chunks and rounded to the weight's dtype once at the end."""

    def __init__(self, weight_VE: torch.Tensor, bounds: list[tuple[int, int]], num_chunks: int):
        self.dtype = weight_VE.dtype
        self.bounds = bounds
        self.single_chunk = num_chunks == 1
        # fp32 weights: the result is its own accumulator, written block by block through views.
        self.full = torch.empty_like(weight_VE) if self.dtype == torch.float32 else None
        self.parts: list[torch.Tensor | None] = [None] * len(bounds)

    def add(self, block: int, dlogits_CVb: torch.Tensor, h_CE: torch.Tensor, *, first_chunk: bool) -> None:
        start, end = self.bounds[block]
        if self.full is not None:
            _mm_fp32_(self.full[start:end], dlogits_CVb.t(), h_CE, accumulate=not first_chunk)
        elif self.single_chunk:
            self.parts[block] = torch.mm(dlogits_CVb.t(), h_CE)
        else:
            if first_chunk:
                self.parts[block] = h_CE.new_empty(end - start, h_CE.shape[1], dtype=torch.float32)
            part = self.parts[block]
            assert part is not None
            _mm_fp32_(part, dlogits_CVb.t(), h_CE, accumulate=not first_chunk)

    def finish(self) -> torch.Tensor:
        if self.full is not None:
            return self.full
        rounded = []
        for i in range(len(self.parts)):
            part, self.parts[i] = self.parts[i], None
            assert part is not None
            # Freeing each fp32 part as it is rounded keeps the fp32 and rounded copies from coexisting whole.
            rounded.append(part.to(self.dtype))
            del part
        return torch.cat(rounded)


def _chunk_forward(
    h_CE: torch.Tensor,
    weight_VE: torch.Tensor,
    labels_C: torch.Tensor,
    bounds: list[tuple[int, int]],
    ignore_index: int,
    grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
    """(lse_C, target_C, logits blocks): the blocks are kept only if `grad` (else freed one by one)."""
    num_rows = h_CE.shape[0]
    block_lse_BC = torch.empty(len(bounds), num_rows, dtype=torch.float32, device=h_CE.device)
    target_C = torch.zeros(num_rows, dtype=torch.float32, device=h_CE.device)
    kept: list[torch.Tensor | None] = []
    for i, (start, end) in enumerate(bounds):
        logits_CVb = torch.mm(h_CE, weight_VE[start:end].t())
        grid, meta = _launch_config(logits_CVb)
        _block_stats_kernel[grid](
            logits_CVb,
            labels_C,
            block_lse_BC[i],
            target_C,
            num_rows,
            logits_CVb.stride(0),
            start,
            ignore_index,
            **meta,
        )
        if grad:
            kept.append(logits_CVb)
    return torch.logsumexp(block_lse_BC, dim=0), target_C, kept


def _chunk_backward(
    logits: list[torch.Tensor | None],
    h_CE: torch.Tensor,
    weight_VE: torch.Tensor,
    labels_C: torch.Tensor,
    lse_C: torch.Tensor,
    bounds: list[tuple[int, int]],
    ignore_index: int,
    z_loss_weight: float,
    dh_CE: torch.Tensor | None,
    dw: _WeightGrad | None,
    first_chunk: bool,
) -> None:
    """Gradients of one chunk, block by block; empties `logits` so that each block is freed after its GEMMs."""
    num_rows = h_CE.shape[0]
    dh_acc = None
    if dh_CE is not None:
        dh_acc = dh_CE if dh_CE.dtype == torch.float32 else torch.empty_like(dh_CE, dtype=torch.float32)
    for i, (start, end) in enumerate(bounds):
        dlogits_CVb, logits[i] = logits[i], None
        assert dlogits_CVb is not None
        grid, meta = _launch_config(dlogits_CVb)
        _block_grad_kernel[grid](
            dlogits_CVb,
            labels_C,
            lse_C,
            num_rows,
            dlogits_CVb.stride(0),
            start,
            ignore_index,
            z_loss_weight,
            **meta,
        )
        if dh_acc is not None:
            _mm_fp32_(dh_acc, dlogits_CVb, weight_VE[start:end], accumulate=i > 0)
        if dw is not None:
            dw.add(i, dlogits_CVb, h_CE, first_chunk=first_chunk)
        del dlogits_CVb
    if dh_CE is not None and dh_acc is not dh_CE:
        dh_CE.copy_(dh_acc)


@torch.library.custom_op("treadle::linear_cross_entropy_fused", mutates_args=())
def _fused_linear_cross_entropy(
    hidden_ND: torch.Tensor,
    weight_VE: torch.Tensor,
    labels_N: torch.Tensor,
    ignore_index: int,
    z_loss_weight: float,
    chunk_size: int,
    grad_hidden: bool,
    grad_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss_sum, z_loss_sum, count, d loss_sum/d hidden, d loss_sum/d weight); gradients empty when not asked.

    A custom op so that `torch.compile(fullgraph=True)` (treadle compiles the loss) treats the chunk loop as
    one opaque call instead of tracing Triton launches and `out=` GEMMs.
    """
    (num_tokens, dim), vocab_size = hidden_ND.shape, weight_VE.shape[0]
    grad = grad_hidden or grad_weight
    chunk = chunk_size or default_chunk_size(
        num_tokens, vocab_size, dim, hidden_ND.dtype, grad_hidden=grad_hidden, grad_weight=grad_weight
    )
    bounds = vocab_blocks(vocab_size)
    # Autocast would recast the GEMMs (and reject `out=`); the dtypes here are the caller's.
    with torch.autocast(hidden_ND.device.type, enabled=False):
        ce_N = torch.empty(num_tokens, dtype=torch.float32, device=hidden_ND.device)
        lse_N = torch.empty_like(ce_N)
        dh_ND = torch.empty_like(hidden_ND) if grad_hidden else hidden_ND.new_empty(0)
        dw = _WeightGrad(weight_VE, bounds, math.ceil(num_tokens / chunk)) if grad_weight else None
        for start in range(0, num_tokens, chunk):
            end = min(start + chunk, num_tokens)
            h_CE, labels_C = hidden_ND[start:end], labels_N[start:end]
            lse_C, target_C, logits = _chunk_forward(h_CE, weight_VE, labels_C, bounds, ignore_index, grad)
            counted_C = labels_C != ignore_index
            # Ignored tokens contribute nothing, z-loss included: lse_N is 0 there.
            ce_N[start:end] = torch.where(counted_C, lse_C - target_C, 0.0)
            lse_N[start:end] = torch.where(counted_C, lse_C, 0.0)
            if grad:
                _chunk_backward(
                    logits,
                    h_CE,
                    weight_VE,
                    labels_C,
                    lse_C,
                    bounds,
                    ignore_index,
                    z_loss_weight,
                    dh_ND[start:end] if grad_hidden else None,
                    dw,
                    first_chunk=start == 0,
                )
        z_loss_sum = lse_N.square().sum() * z_loss_weight
        loss_sum = ce_N.sum() + z_loss_sum
        count = (labels_N != ignore_index).sum()
        dw_VE = dw.finish() if dw is not None else weight_VE.new_empty(0)
    return loss_sum, z_loss_sum, count, dh_ND, dw_VE


@_fused_linear_cross_entropy.register_fake
def _(
    hidden_ND: torch.Tensor,
    weight_VE: torch.Tensor,
    labels_N: torch.Tensor,
    ignore_index: int,
    z_loss_weight: float,
    chunk_size: int,
    grad_hidden: bool,
    grad_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    scalar = hidden_ND.new_empty((), dtype=torch.float32)
    return (
        scalar,
        scalar.clone(),
        labels_N.new_empty((), dtype=torch.int64),
        torch.empty_like(hidden_ND) if grad_hidden else hidden_ND.new_empty(0),
        torch.empty_like(weight_VE) if grad_weight else weight_VE.new_empty(0),
    )


class LinearCrossEntropyFunction(torch.autograd.Function):
    """(loss_sum, count, z_loss_sum) of `linear_cross_entropy`; gradients computed in the forward and saved.

    The backward only scales the saved d(loss_sum)/d(hidden) and d(loss_sum)/d(weight) by the scalar
    `grad_output` (exact by the chain rule, see the module docstring). `count` and `z_loss_sum` (a logging
    copy of the z-loss already inside `loss_sum`) are not differentiable.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        hidden_ND: torch.Tensor,
        weight_VE: torch.Tensor,
        labels_N: torch.Tensor,
        ignore_index: int,
        z_loss_weight: float,
        chunk_size: int,
        grad_hidden: bool,
        grad_weight: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        loss_sum, z_loss_sum, count, dh_ND, dw_VE = _fused_linear_cross_entropy(
            hidden_ND, weight_VE, labels_N, ignore_index, z_loss_weight, chunk_size, grad_hidden, grad_weight
        )
        ctx.save_for_backward(dh_ND, dw_VE)
        ctx.grad_hidden, ctx.grad_weight = grad_hidden, grad_weight
        ctx.mark_non_differentiable(count, z_loss_sum)
        return loss_sum, count, z_loss_sum

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx,
        grad_loss: torch.Tensor,
        _grad_count: torch.Tensor | None,
        _grad_z_loss: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, ...]:
        dh_ND, dw_VE = ctx.saved_tensors
        # Out of place, so that a retained graph's second backward scales the unscaled saved gradients again.
        grad_hidden = dh_ND * grad_loss if ctx.grad_hidden else None
        grad_weight = dw_VE * grad_loss if ctx.grad_weight else None
        return grad_hidden, grad_weight, None, None, None, None, None, None


def _check_inputs(hidden_ND: torch.Tensor, weight_VE: torch.Tensor, labels_N: torch.Tensor) -> None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        DTensor = None  # noqa: N806
    if DTensor is not None and isinstance(weight_VE, DTensor):
        raise TypeError(
            "linear_cross_entropy does not support vocab-sharded (DTensor) output weights yet; pass the full "
            "weight as a plain tensor (FSDP2's unsharded parameter is one), or use kernels.loss=torch"
        )
    if hidden_ND.dim() != 2 or weight_VE.dim() != 2 or labels_N.dim() != 1:
        raise ValueError(
            f"expected hidden [N, E], weight [V, E], labels [N]; got {tuple(hidden_ND.shape)}, "
            f"{tuple(weight_VE.shape)}, {tuple(labels_N.shape)} (flatten batch and sequence first)"
        )
    if hidden_ND.shape[0] != labels_N.shape[0] or hidden_ND.shape[1] != weight_VE.shape[1]:
        raise ValueError(
            f"shape mismatch: hidden {tuple(hidden_ND.shape)}, weight {tuple(weight_VE.shape)}, "
            f"labels {tuple(labels_N.shape)}"
        )
    if hidden_ND.dtype != weight_VE.dtype:
        raise TypeError(f"hidden ({hidden_ND.dtype}) and weight ({weight_VE.dtype}) must share a dtype")
    if hidden_ND.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"linear_cross_entropy supports fp32, bf16 and fp16 inputs, not {hidden_ND.dtype}")


def linear_cross_entropy(
    hidden_ND: torch.Tensor,
    weight_VE: torch.Tensor,
    labels_N: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    z_loss_weight: float = 0.0,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of `hidden_ND @ weight_VE^T` against `labels_N`, without materialising the logits.

    Returns `(loss_sum, count, z_loss_sum)`: fp32 sum over counted tokens (labels != `ignore_index`) of
    `logsumexp - logit[label] + z_loss_weight · logsumexp²` (z-loss: PaLM §5), the int64 number of counted
    tokens, and the z-loss part of `loss_sum` alone (detached, for logging). `chunk_size` tokens per chunk
    (default: `default_chunk_size`). Only `loss_sum` carries gradients.
    """
    _check_inputs(hidden_ND, weight_VE, labels_N)
    hidden_ND, labels_N = hidden_ND.contiguous(), labels_N.contiguous()
    grad_hidden = torch.is_grad_enabled() and hidden_ND.requires_grad
    grad_weight = torch.is_grad_enabled() and weight_VE.requires_grad
    chunk = int(chunk_size or 0)
    if not (grad_hidden or grad_weight):
        loss_sum, z_loss_sum, count, _, _ = _fused_linear_cross_entropy(
            hidden_ND, weight_VE, labels_N, ignore_index, float(z_loss_weight), chunk, False, False
        )
        return loss_sum, count, z_loss_sum
    return LinearCrossEntropyFunction.apply(
        hidden_ND, weight_VE, labels_N, ignore_index, float(z_loss_weight), chunk, grad_hidden, grad_weight
    )


def linear_cross_entropy_op(
    hidden_ND: torch.Tensor,
    weight_VE: torch.Tensor,
    labels_N: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The op-table entry (`kernels.loss=triton`): same contract as `models.ops.linear_cross_entropy_torch`."""
    loss_sum, count, _ = linear_cross_entropy(hidden_ND, weight_VE, labels_N, ignore_index=ignore_index)
    return loss_sum, count


def linear_cross_entropy_reference(
    hidden_ND: torch.Tensor,
    weight_VE: torch.Tensor,
    labels_N: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    z_loss_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same math in plain PyTorch on the whole [N, V] logits (input-dtype GEMM, fp32 softmax)."""
    logits_NV = (hidden_ND @ weight_VE.t()).float()
    counted_N = labels_N != ignore_index
    ce_sum = F.cross_entropy(logits_NV, labels_N, ignore_index=ignore_index, reduction="sum")
    lse_N = torch.logsumexp(logits_NV, dim=-1)
    z_loss_sum = z_loss_weight * torch.where(counted_N, lse_N.square(), 0.0).sum()
    return ce_sum + z_loss_sum, counted_N.sum(), z_loss_sum.detach()
