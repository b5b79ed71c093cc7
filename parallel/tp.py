"""Tensor parallelism (Megatron-LM, Shoeybi et al. 2019) with sequence parallelism (Korthikanti et al. 2022)
and loss parallelism, applied to any model through DTensor's `parallelize_module` by its family's plan
(`ModelSpec.tp_plan`: FQN pattern -> style name, e.g. models/llama/plan.py). This file names no module.

Placements on the `tp` mesh axis, per style (S = sequence dim 1):

    residual stream      Shard(S)     sequence-parallel: each rank holds S/tp positions between blocks
    norm                 Shard(S)     norms run on the shard (SequenceParallel), weights replicated
    sublayer_input       Replicate    all-gather over S (forward), reduce-scatter of its gradient (backward)
    colwise              column-wise  each rank computes its slice of output features (heads, MLP columns)
    rowwise              row-wise     partial sums reduce-scattered back to Shard(S) (forward),
                                      all-gather of the gradient (backward)

embedding: vocabulary-sharded (row-wise); its partial outputs are reduce-scattered to Shard(S). final_norm and
output: the final norm's output is all-gathered to Replicate and multiplied by the vocabulary-sharded output
weight, so logits are Shard(vocab) and never gathered: cross-entropy runs vocabulary-parallel (parallel/loss.py:
all-reduces of the row max, the sum of exponentials and the target logit over `tp`). With tied embeddings the
embedding and the output share one weight, sharded on the vocabulary in both roles.

Without sequence parallelism the residual stream is replicated and the block boundaries all-reduce instead.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
import torch.nn as nn
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from treadle.kernels.reference import rmsnorm_torch
from treadle.models.lora import LoRALinear


def _distribute_own(module: nn.Module, mesh: DeviceMesh, placements: dict[str, Placement]) -> None:
    for name, param in list(module.named_parameters(recurse=False)):
        sharded = distribute_tensor(param, mesh, [placements[name]], src_data_rank=None)
        module.register_parameter(name, nn.Parameter(sharded, requires_grad=param.requires_grad))


class LoRAColwiseParallel(ColwiseParallel):
    """Column-wise TP of a `LoRALinear`: the base weight (and bias) and B are sharded on output rows, A is
    replicated, so y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ yields each rank's output columns with no communication beyond the
    base layer's (the replicated input's all-gather forward, reduce-scatter of its gradient backward); A's
    gradient is a partial sum over ranks, which FSDP all-reduces back to the replicated placement."""

    def _partition_linear_fn(self, name: str, module: nn.Module, device_mesh: DeviceMesh) -> None:
        placements = {"": {"weight": Shard(0), "bias": Shard(0)}, "lora_A": {"weight": Replicate()},
                      "lora_B": {"weight": Shard(0)}}  # fmt: skip
        if name in placements:
            _distribute_own(module, device_mesh, placements[name])


class LoRARowwiseParallel(RowwiseParallel):
    """Row-wise TP of a `LoRALinear`: the base weight and A are sharded on input columns, B (and the bias) are
    replicated; both x·Wᵀ and (x·Aᵀ)·Bᵀ are partial sums, added before the layer's one reduce(-scatter)."""

    def _partition_linear_fn(self, name: str, module: nn.Module, device_mesh: DeviceMesh) -> None:
        placements = {"": {"weight": Shard(1), "bias": Replicate()}, "lora_A": {"weight": Shard(1)},
                      "lora_B": {"weight": Replicate()}}  # fmt: skip
        if name in placements:
            _distribute_own(module, device_mesh, placements[name])


def _colwise(module: nn.Module) -> ColwiseParallel:
    return LoRAColwiseParallel() if isinstance(module, LoRALinear) else ColwiseParallel()


def _rowwise(module: nn.Module, **kwargs: Placement) -> RowwiseParallel:
    return LoRARowwiseParallel(**kwargs) if isinstance(module, LoRALinear) else RowwiseParallel(**kwargs)


class LocalRowsNorm:
    """A row-wise norm implementation (`ops.rmsnorm`: x [..., E], weight [E], eps) run on local tensors under TP.

    Kernels that launch Triton themselves (`kernels.rmsnorm=triton`) cannot take DTensors: eager they would read
    the wrong storage, and traced the kernel wrapper refuses them. Rows are independent, so each rank normalises
    its local rows with its local copy of the (replicated) weight and the output keeps x's placements. The
    weight's gradient is each rank's sum over its own rows: Partial wherever x is sharded (the sequence-parallel
    residual stream), as DTensor's own norm gives it; Replicate where x is replicated."""

    def __init__(self, norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]):
        self.norm = norm

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if not isinstance(x, DTensor):
            return self.norm(_waited(x), _local(weight, [Replicate()]), eps)
        if any(p.is_partial() or p.is_shard(x.ndim - 1) for p in x.placements):
            raise ValueError(f"a norm input placed as {x.placements} is not supported: rows must be whole")
        if isinstance(weight, DTensor) and weight.device_mesh != x.device_mesh:
            raise ValueError("a norm's weight and input must share one device mesh")
        grad_placements = [Replicate() if p.is_replicate() else Partial() for p in x.placements]
        y = self.norm(_waited(x.to_local()), _local(weight, grad_placements), eps)
        return DTensor.from_local(y, x.device_mesh, x.placements, shape=x.shape, stride=x.stride())


def _local(weight: torch.Tensor, grad_placements: list[Placement]) -> torch.Tensor:
    if not isinstance(weight, DTensor):
        return weight
    if not all(p.is_replicate() for p in weight.placements):
        raise ValueError(
            f"a norm weight sharded as {weight.placements} is not supported; it must be replicated"
        )
    return weight.to_local(grad_placements=grad_placements)


class _Wait(torch.autograd.Function):
    """The tensor inside an `AsyncCollectiveTensor` (eager DTensor's output while its collective is in flight),
    waited for, with the gradient passing through: kernels that launch Triton read the storage directly."""

    @staticmethod
    def forward(ctx, t: AsyncCollectiveTensor) -> torch.Tensor:  # type: ignore[override]
        return t.wait()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


def _waited(t: torch.Tensor) -> torch.Tensor:
    return _Wait.apply(t) if isinstance(t, AsyncCollectiveTensor) else t


def enable_async_tp(tp_mesh: DeviceMesh) -> None:
    """Turn on Inductor's micro-pipeline TP pass (Wang et al. 2022, "Overlap communication with dependent
    computation via decomposition"): in compiled blocks, each all-gather → matmul and matmul →
    reduce-scatter pair of sequence-parallel TP is decomposed into per-rank chunks exchanged through
    symmetric memory while the chunk matmuls run. Requires CUDA and compiled blocks (checked in config)."""
    import torch._inductor.config as inductor_config
    from torch.distributed._symmetric_memory import enable_symm_mem_for_group

    inductor_config._micro_pipeline_tp = True
    enable_symm_mem_for_group(tp_mesh.get_group().group_name)


def enable_comm_reordering(*, batch_chunks: bool = False) -> None:
    """Let Inductor reorder compiled graphs for compute/communication overlap, for the whole process: each
    collective is issued as soon as its input exists, its wait sunk to the first use of its result, and compute
    that depends on neither placed in between (the `reorder_compute_for_overlap` pass). Traced functional
    collectives are otherwise waited at once, so nothing overlaps them. The flag alone does nothing: Inductor
    runs the passes of `reorder_for_compute_comm_overlap_passes`, empty by default; a list set by the user is
    kept.

    `batch_chunks` (blocks run as interleaved batch chunks, `apply_batch_overlap`): also keep the chunks' kernels
    apart. Inductor fuses kernels that only share a small read, such as both chunks' RMSNorms (they read the same
    weight); that one kernel then waits for both chunks' attention all-reduces, and the second is no longer
    hidden behind the first chunk's MLP. Fusions that save less than 1 MiB of memory traffic are skipped
    (`score_fusion_memory_threshold`, 10 bytes by default), for the whole process; a producer and its consumer
    share their intermediate, far larger, and still fuse."""
    import torch._inductor.config as inductor_config

    inductor_config.reorder_for_compute_comm_overlap = True
    if not inductor_config.reorder_for_compute_comm_overlap_passes:
        inductor_config.reorder_for_compute_comm_overlap_passes = ["reorder_compute_for_overlap"]
    if batch_chunks:
        threshold = inductor_config.score_fusion_memory_threshold
        inductor_config.score_fusion_memory_threshold = max(threshold, 1 << 20)


def _matches(pattern: str, fqn: str) -> bool:
    """`*` matches exactly one name component: `layers.*.mlp` matches `layers.3.mlp`, not `layers.3.x.mlp`."""
    parts, names = pattern.split("."), fqn.split(".")
    return len(parts) == len(names) and all(p in ("*", n) for p, n in zip(parts, names, strict=True))


def _positional_inputs(module: nn.Module) -> int:
    params = inspect.signature(module.forward).parameters.values()
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


def _styles(style: str, module: nn.Module, stream: Placement, sequence_parallel: bool) -> list[ParallelStyle]:
    """The DTensor styles of one plan entry (style names: `models.spec.TP_STYLES`), applied in order."""
    if style == "colwise":
        return [_colwise(module)]
    if style == "rowwise":
        return [_rowwise(module, output_layouts=stream)]
    if style == "embedding":
        return [RowwiseParallel(input_layouts=Replicate(), output_layouts=stream)]
    if style == "output":
        return [ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)]
    norm = [SequenceParallel()] if sequence_parallel else []
    if style == "norm":
        return norm
    if style == "final_norm":
        # The loss takes the norm's output as a replicated DTensor (see the module docstring).
        to_replicate = PrepareModuleOutput(
            output_layouts=stream, desired_output_layouts=Replicate(), use_local_output=False
        )
        return [to_replicate, *norm]
    if style == "sublayer_input":
        others = (None,) * (_positional_inputs(module) - 1)
        return [
            PrepareModuleInput(input_layouts=(stream, *others), desired_input_layouts=(Replicate(), *others))
        ]
    raise ValueError(f"unknown tensor-parallel style {style!r}")


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, plan: dict[str, str], *, sequence_parallel: bool) -> None:
    """Shard `model` (still on the meta device) over `tp_mesh` in place by `plan` (FQN pattern -> style, a
    family's `ModelSpec.tp_plan`). A pattern that matches no module (an untied model's absent output layer) is
    skipped; every module a pattern matches gets that entry's styles."""
    # torch's styles re-create the parameters they shard as trainable; frozen ones (a LoRA base) stay frozen.
    frozen = {name for name, param in model.named_parameters() if not param.requires_grad}
    stream = Shard(1) if sequence_parallel else Replicate()
    # DTensor runs the torch norm itself; any other implementation runs on the local rows.
    if model.ops.rmsnorm is not rmsnorm_torch and not isinstance(model.ops.rmsnorm, LocalRowsNorm):
        model.ops.rmsnorm = LocalRowsNorm(model.ops.rmsnorm)
    modules = list(model.named_modules())
    for pattern, style in plan.items():
        for fqn, module in modules:
            if _matches(pattern, fqn):
                for parallel_style in _styles(style, module, stream, sequence_parallel):
                    parallelize_module(module, tp_mesh, parallel_style)
    for name, param in model.named_parameters():
        if name in frozen:
            param.requires_grad_(False)
