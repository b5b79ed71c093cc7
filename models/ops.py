"""The op table: the few hot operations a model calls through one indirection so that kernels swap by config.

Shape legend: B batch, S sequence, H query heads, K key/value heads, D head dim, N tokens (B*S), V vocab, E model dim.

A model asks for `Ops` once (from `KernelsConfig`) and calls `ops.attention(...)`, `ops.rmsnorm(...)`, and so on.
The plain-PyTorch implementations here are the references the Triton kernels in `kernels/` are tested against;
`register_op` lets another module add an implementation under a new name that `configs/kernels/` can select.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from treadle.kernels.moe_reference import moe_experts_loop, moe_experts_torch
from treadle.kernels.reference import rmsnorm_torch, rope_torch, swiglu_torch

IGNORE_INDEX = -100


@dataclass(kw_only=True)
class KernelsConfig:
    """Which implementation each op uses; names are keys of the op registry (`available_ops()`)."""

    attention: str = "sdpa"
    rmsnorm: str = "torch"
    rope: str = "torch"
    swiglu: str = "torch"
    loss: str = "torch"
    moe: str = (
        "torch"  # routed experts (MoE families): torch = grouped GEMMs, loop = the per-expert reference
    )


@dataclass
class Ops:
    """One table per model, shared by reference by every module of it: a parallel plan that swaps an entry
    (`model.ops.attention = ...`) swaps it for every block at once."""

    attention: Callable[..., torch.Tensor]
    rmsnorm: Callable[..., torch.Tensor]
    rope: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    swiglu: Callable[..., torch.Tensor]
    # Not called by the model (it returns hidden states): the loss component (models/loss.py) applies it.
    loss: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    # Routed experts over rows sorted by expert (kernels/moe_reference.py has the signature).
    moe: Callable[..., torch.Tensor]


def document_causal_mask(doc_ids_BS: torch.Tensor) -> torch.Tensor:
    """Boolean [B, 1, S, S] mask: query i sees key j iff j <= i and both lie in the same packed document."""
    seq_len = doc_ids_BS.shape[1]
    causal_SS = torch.ones(seq_len, seq_len, dtype=torch.bool, device=doc_ids_BS.device).tril()
    same_doc_BSS = doc_ids_BS[:, :, None] == doc_ids_BS[:, None, :]
    return (same_doc_BSS & causal_SS)[:, None]


def attention_sdpa(
    q_BSHD: torch.Tensor,
    k_BSKD: torch.Tensor,
    v_BSKD: torch.Tensor,
    *,
    causal: bool = True,
    doc_ids_BS: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention through `F.scaled_dot_product_attention` (flash/cuDNN/efficient/math).

    With `doc_ids_BS` a document mask keeps packed documents from attending to each other; SDPA then runs
    its masked (efficient or math) path, which is slower than the causal flash path.
    """
    q, k, v = (t.transpose(1, 2) for t in (q_BSHD, k_BSKD, v_BSKD))
    gqa = q.shape[1] != k.shape[1]
    if doc_ids_BS is None:
        out_BHSD = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    else:
        mask = document_causal_mask(doc_ids_BS)
        if not causal:
            mask = doc_ids_BS[:, None, :, None] == doc_ids_BS[:, None, None, :]
        out_BHSD = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return out_BHSD.transpose(1, 2)


def attention_eager(
    q_BSHD: torch.Tensor,
    k_BSKD: torch.Tensor,
    v_BSKD: torch.Tensor,
    *,
    causal: bool = True,
    doc_ids_BS: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention written out (softmax(QK^T/sqrt(D)) V) in fp32: the reference every attention kernel matches."""
    num_heads, num_kv_heads, seq_len = q_BSHD.shape[2], k_BSKD.shape[2], q_BSHD.shape[1]
    k_BSHD = k_BSKD.repeat_interleave(num_heads // num_kv_heads, dim=2)
    v_BSHD = v_BSKD.repeat_interleave(num_heads // num_kv_heads, dim=2)
    scores_BHSS = torch.einsum("bqhd,bkhd->bhqk", q_BSHD.float(), k_BSHD.float()) / q_BSHD.shape[-1] ** 0.5
    allowed = torch.ones(seq_len, seq_len, dtype=torch.bool, device=q_BSHD.device)
    allowed = allowed.tril() if causal else allowed
    if doc_ids_BS is not None:
        allowed = allowed & (doc_ids_BS[:, None, :, None] == doc_ids_BS[:, None, None, :])
    scores_BHSS = scores_BHSS.masked_fill(~allowed, float("-inf"))
    out_BSHD = torch.einsum("bhqk,bkhd->bqhd", scores_BHSS.softmax(dim=-1), v_BSHD.float())
    return out_BSHD.to(q_BSHD.dtype)


def linear_cross_entropy_torch(
    hidden_ND: torch.Tensor,
    weight_VE: torch.Tensor,
    labels_N: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output projection then cross-entropy, materialising the [N, V] logits (fp32 for the softmax).

    Returns the summed loss and the number of counted tokens, so that the trainer can normalise by the token
    count of the whole global batch: that keeps every data-parallel layout and accumulation split equal.
    """
    logits_NV = (hidden_ND @ weight_VE.t()).float()
    loss_sum = F.cross_entropy(logits_NV, labels_N, ignore_index=ignore_index, reduction="sum")
    return loss_sum, (labels_N != ignore_index).sum()


# An implementation is a callable or a "module:attribute" string imported when first selected, so that a
# backend's dependencies (Triton, a peer library) are imported only by runs that use it.
_REGISTRY: dict[str, dict[str, Callable | str]] = {
    "attention": {
        "sdpa": attention_sdpa,
        "eager": attention_eager,
        "triton": "treadle.kernels.attention:attention_op",
    },
    "rmsnorm": {"torch": rmsnorm_torch, "triton": "treadle.kernels.rmsnorm:rmsnorm_op"},
    "rope": {"torch": rope_torch, "triton": "treadle.kernels.rope:rope_op"},
    "swiglu": {"torch": swiglu_torch, "triton": "treadle.kernels.swiglu:swiglu_op"},
    "loss": {
        "torch": linear_cross_entropy_torch,
        "triton": "treadle.kernels.linear_cross_entropy:linear_cross_entropy_op",
    },
    "moe": {"torch": moe_experts_torch, "loop": moe_experts_loop},
}


def register_op(op: str, name: str, fn: Callable | str) -> None:
    """Make `fn` (or the "module:attribute" it names) selectable as `kernels.<op>=<name>`."""
    if op not in _REGISTRY:
        raise ValueError(f"unknown op {op!r}; ops are {sorted(_REGISTRY)}")
    _REGISTRY[op][name] = fn


def available_ops() -> dict[str, list[str]]:
    return {op: sorted(impls) for op, impls in _REGISTRY.items()}


def build_ops(cfg: KernelsConfig) -> Ops:
    """The model's op table; checks (and imports) every choice of `cfg`."""
    return Ops(**{f.name: resolve_op(f.name, getattr(cfg, f.name)) for f in fields(KernelsConfig)})


def build_loss_op(cfg: KernelsConfig) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """`kernels.loss`: (hidden_ND, weight_VE, labels_N, *, ignore_index) -> (summed loss, counted tokens)."""
    return resolve_op("loss", cfg.loss)


def resolve_op(op: str, name: str) -> Callable:
    if name not in _REGISTRY[op]:
        raise ValueError(
            f"kernels.{op}={name!r} is not an implementation of {op}; choose one of {sorted(_REGISTRY[op])}"
        )
    return _resolve(op, name)


def _resolve(op: str, name: str) -> Callable:
    impl = _REGISTRY[op][name]
    if callable(impl):
        return impl
    module_name, attribute = impl.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        install = 'pip install "treadle[kernels]"' if err.name == "triton" else "install its dependencies"
        raise ValueError(
            f"kernels.{op}={name!r} needs {module_name}, which failed to import ({err}); fix: {install} "
            f"or choose another implementation ({sorted(_REGISTRY[op])})"
        ) from err
    _REGISTRY[op][name] = getattr(module, attribute)
    return _REGISTRY[op][name]
