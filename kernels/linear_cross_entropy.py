"""Fused output projection + cross-entropy, chunked over tokens so that the [N, V] logits never exist whole.

Shape legend: N tokens, E model dim, V vocab, C tokens in one chunk.

For each chunk of C tokens:

1. `logits_CV = h_CE @ W^T` (cuBLAS, input dtype, fp32 accumulation) into one reused chunk buffer;
2. one Triton program per row computes the logsumexp online over vocab blocks (Milakov & Gimelshein 2018,
   "Online normalizer calculation for softmax"), the loss term, and — in a second sweep of the same row —
   overwrites the logits in place with d(loss)/d(logits) = softmax − onehot (plus the z-loss term);
3. `dh_CE = dlogits_CV @ W` and `dW_VE += dlogits_CV^T @ h_CE`, with dW accumulated in fp32.

Gradient in the forward. The loss is a scalar, so by the chain rule the gradients for any downstream use of
it are `grad_output · d(loss)/d(hidden, weight)`: computing d(loss)/d(·) during the forward (while the chunk's
logits are at hand) and only scaling it by the scalar `grad_output` in the backward is exact, and it saves
recomputing the logits in the backward. What it costs: the forward of a grad-enabled call does all the
gradient work even if no backward follows (the no-grad path — `torch.no_grad()`, or inputs that do not
require grad — skips it), `dh` and `dW` are held from the forward until the backward (dW is V×E in the
weight's dtype: 1 GiB for Llama-3's 128256×4096 in bf16), and second-order gradients are not supported.

Chunk size. A chunk's logits buffer is kept within `LOGITS_BUDGET_BYTES` (512 MiB: 2048 tokens of a 128256
vocab in bf16). Smaller chunks lower peak memory, larger chunks make better GEMMs: the dW update's reduction
dimension is C, and each chunk reads and writes the whole fp32 dW once (4 B·V·E each way), which at C = 2048
costs about a third of that GEMM's arithmetic time on an H100 and more at smaller C. Peak memory above the
inputs is then about the fp32 dW accumulator (4 B·V·E) + one chunk of logits + dh.

Precision. The logits and the gradient written in place are in the input dtype (as the plain-PyTorch op,
which upcasts the bf16 logits); the logsumexp, loss and softmax are computed in fp32. dW is accumulated in
fp32 across chunks (in row blocks, converted to the weight's dtype block by block at the end of the forward,
so the fp32 accumulator and the converted result never coexist in full).

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
# One chunk's logits at most this many bytes; see the module docstring for the trade-off.
LOGITS_BUDGET_BYTES = 512 * 2**20
# Chunk sizes are multiples of this (when the budget allows) so that cuBLAS sees tile-friendly shapes.
_CHUNK_MULTIPLE = 64
# Vocab elements one Triton program handles per step of its row sweep (tests lower it to cover many steps).
_MAX_BLOCK_V = 4096
# dW is accumulated as this many fp32 row blocks, so that converting it to the weight's dtype at the end of the
# forward frees fp32 blocks as it goes: peak 4 B·V·E + 2 B·V·E/blocks instead of 6 B·V·E for bf16 weights.
_NUM_DW_BLOCKS = 8


@triton.jit
def _cross_entropy_rows_kernel(
    logits_ptr,
    labels_ptr,
    ce_ptr,
    lse_ptr,
    row_stride,
    ignore_index,
    z_loss_weight,
    VOCAB_SIZE: tl.constexpr,
    BLOCK_V: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
):
    """Row `program_id` of a chunk: loss terms out, and (WRITE_GRAD) its logits replaced by d(loss)/d(logits).

    The row is swept twice (logsumexp, then gradient) instead of being held in registers, so any vocab size
    works with a fixed block; the second sweep partly hits L2. The vocab size is a compile-time constant: a
    model has one, so this compiles once, and Triton 3.6's interpreter cannot loop to a runtime bound under
    NumPy ≥ 2.4.
    """
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * row_stride
    label = tl.load(labels_ptr + row).to(tl.int32)
    valid = label != ignore_index
    offsets = tl.arange(0, BLOCK_V)

    # Online logsumexp: a running max and a sum of exponentials rescaled whenever the max grows.
    running_max = tl.full((), float("-inf"), tl.float32)
    running_sum = tl.full((), 0.0, tl.float32)
    for start in range(0, VOCAB_SIZE, BLOCK_V):
        cols = start + offsets
        x = tl.load(row_ptr + cols, mask=cols < VOCAB_SIZE, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
        running_max = new_max
    lse = running_max + tl.log(running_sum)

    safe_label = tl.where(valid, label, 0)
    target = tl.load(row_ptr + safe_label).to(tl.float32)
    valid_f = valid.to(tl.float32)
    tl.store(ce_ptr + row, (lse - target) * valid_f)
    tl.store(lse_ptr + row, lse * valid_f)

    if WRITE_GRAD:
        # d/dx_j [lse - x_t + w·lse²] = softmax_j·(1 + 2w·lse) - [j = t]; zero for an ignored row.
        softmax_coef = (1.0 + 2.0 * z_loss_weight * lse) * valid_f
        for start in range(0, VOCAB_SIZE, BLOCK_V):
            cols = start + offsets
            in_row = cols < VOCAB_SIZE
            x = tl.load(row_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
            grad = tl.exp(x - lse) * softmax_coef - tl.where(cols == label, valid_f, 0.0)
            tl.store(row_ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=in_row)


def _cross_entropy_rows(
    logits_CV: torch.Tensor,
    labels_C: torch.Tensor,
    ce_C: torch.Tensor,
    lse_C: torch.Tensor,
    *,
    ignore_index: int,
    z_loss_weight: float,
    write_grad: bool,
) -> None:
    num_rows, vocab_size = logits_CV.shape
    if num_rows == 0:
        return
    block_v = min(_MAX_BLOCK_V, triton.next_power_of_2(vocab_size))
    _cross_entropy_rows_kernel[(num_rows,)](
        logits_CV,
        labels_C,
        ce_C,
        lse_C,
        logits_CV.stride(0),
        ignore_index,
        z_loss_weight,
        VOCAB_SIZE=vocab_size,
        BLOCK_V=block_v,
        WRITE_GRAD=write_grad,
        num_warps=8 if block_v >= 2048 else 4,
    )


def default_chunk_size(num_tokens: int, vocab_size: int, dtype: torch.dtype) -> int:
    """Tokens per chunk: as many as keep one chunk's logits within `LOGITS_BUDGET_BYTES`, spread evenly.

    Spreading (8192 tokens as 4×2048 rather than 3×2093 + 1913) keeps every chunk's GEMMs the same shape.
    """
    max_rows = max(1, LOGITS_BUDGET_BYTES // (vocab_size * dtype.itemsize))
    if max_rows >= _CHUNK_MULTIPLE:
        max_rows -= max_rows % _CHUNK_MULTIPLE
    num_chunks = max(1, math.ceil(num_tokens / max_rows))
    rows = math.ceil(num_tokens / num_chunks)
    rows = math.ceil(rows / _CHUNK_MULTIPLE) * _CHUNK_MULTIPLE
    return max(1, min(rows, max_rows, num_tokens))


# Whether `torch.addmm(..., out_dtype=torch.float32)` accepts an fp32 accumulator with bf16/fp16 operands on
# this device type: newer torch builds run it as one cuBLAS GEMM with an fp32 C; older ones reject it.
_FP32_OUT_ADDMM: dict[str, bool] = {}


def _addmm_fp32_(acc: torch.Tensor, mat1: torch.Tensor, mat2: torch.Tensor) -> None:
    """acc (fp32) += mat1 @ mat2, with mat1/mat2 in fp32, bf16 or fp16."""
    if mat1.dtype == torch.float32:
        acc.addmm_(mat1, mat2)
        return
    device_type = acc.device.type
    if device_type == "cuda" and _FP32_OUT_ADDMM.get(device_type, True):
        try:
            torch.addmm(acc, mat1, mat2, out_dtype=torch.float32, out=acc)
            _FP32_OUT_ADDMM[device_type] = True
            return
        except (RuntimeError, TypeError, NotImplementedError):
            _FP32_OUT_ADDMM[device_type] = False
    if device_type == "cuda":
        # A low-precision product then an fp32 add: one extra pass over a row block, still exact enough.
        acc.add_(torch.mm(mat1, mat2))
    else:
        acc.addmm_(mat1.float(), mat2.float())


class _WeightGradAccumulator:
    """dW_VE summed over chunks in fp32, as row blocks (see `_NUM_DW_BLOCKS`)."""

    def __init__(self, weight_VE: torch.Tensor):
        vocab_size, dim = weight_VE.shape
        self.dtype = weight_VE.dtype
        rows = max(1, math.ceil(vocab_size / _NUM_DW_BLOCKS))
        rows = math.ceil(rows / _CHUNK_MULTIPLE) * _CHUNK_MULTIPLE
        self.bounds = [(s, min(s + rows, vocab_size)) for s in range(0, vocab_size, rows)]
        if self.dtype == torch.float32:
            # Already the result's dtype: one tensor, its row blocks are views.
            self.full: torch.Tensor | None = torch.zeros_like(
                weight_VE, memory_format=torch.contiguous_format
            )
            self.blocks: list[torch.Tensor | None] = [self.full[s:e] for s, e in self.bounds]
        else:
            self.full = None
            self.blocks = [
                torch.zeros(e - s, dim, dtype=torch.float32, device=weight_VE.device) for s, e in self.bounds
            ]

    def add(self, dlogits_CV: torch.Tensor, h_CE: torch.Tensor) -> None:
        for (start, end), block in zip(self.bounds, self.blocks, strict=True):
            assert block is not None
            _addmm_fp32_(block, dlogits_CV[:, start:end].t(), h_CE)

    def finish(self) -> torch.Tensor:
        if self.full is not None:
            return self.full
        parts = []
        for i in range(len(self.blocks)):
            block, self.blocks[i] = self.blocks[i], None
            assert block is not None
            parts.append(block.to(self.dtype))
            del block  # the last reference: this fp32 block is freed before the next one is converted
        return torch.cat(parts)


def _chunk_loop(
    hidden_ND: torch.Tensor,
    weight_VE: torch.Tensor,
    labels_N: torch.Tensor,
    chunk: int,
    ignore_index: int,
    z_loss_weight: float,
    dh_ND: torch.Tensor | None,
    dw_acc: _WeightGradAccumulator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (cross-entropy, logsumexp) over all chunks; fills `dh_ND` and `dw_acc` when given."""
    num_tokens, vocab_size = hidden_ND.shape[0], weight_VE.shape[0]
    ce_N = torch.empty(num_tokens, dtype=torch.float32, device=hidden_ND.device)
    lse_N = torch.empty_like(ce_N)
    logits_buf = hidden_ND.new_empty(min(chunk, num_tokens), vocab_size)
    for start in range(0, num_tokens, chunk):
        end = min(start + chunk, num_tokens)
        h_CE = hidden_ND[start:end]
        logits_CV = logits_buf[: end - start]
        torch.mm(h_CE, weight_VE.t(), out=logits_CV)
        _cross_entropy_rows(
            logits_CV,
            labels_N[start:end],
            ce_N[start:end],
            lse_N[start:end],
            ignore_index=ignore_index,
            z_loss_weight=z_loss_weight,
            write_grad=dh_ND is not None or dw_acc is not None,
        )
        if dh_ND is not None:
            torch.mm(logits_CV, weight_VE, out=dh_ND[start:end])
        if dw_acc is not None:
            dw_acc.add(logits_CV, h_CE)
    return ce_N, lse_N


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
    num_tokens = hidden_ND.shape[0]
    chunk = chunk_size or default_chunk_size(num_tokens, weight_VE.shape[0], hidden_ND.dtype)
    # Autocast would recast the GEMMs (and reject `out=`); the dtypes here are the caller's.
    with torch.autocast(hidden_ND.device.type, enabled=False):
        dh_ND = torch.empty_like(hidden_ND) if grad_hidden else hidden_ND.new_empty(0)
        dw_acc = _WeightGradAccumulator(weight_VE) if grad_weight else None
        ce_N, lse_N = _chunk_loop(
            hidden_ND,
            weight_VE,
            labels_N,
            chunk,
            ignore_index,
            z_loss_weight,
            dh_ND if grad_hidden else None,
            dw_acc,
        )
        # The kernel stores lse = 0 for ignored rows, so the z-loss sums over counted tokens only.
        z_loss_sum = lse_N.square().sum() * z_loss_weight
        loss_sum = ce_N.sum() + z_loss_sum
        count = (labels_N != ignore_index).sum()
        # After the loop has returned, so that the chunk buffer is freed before the fp32 → bf16 conversion.
        dw_VE = dw_acc.finish() if dw_acc is not None else weight_VE.new_empty(0)
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
