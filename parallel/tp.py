"""Tensor parallelism (Megatron-LM, Shoeybi et al. 2019) with sequence parallelism (Korthikanti et al. 2022)
and loss parallelism, applied to the Llama model through DTensor's `parallelize_module`.

Placements on the `tp` mesh axis, per block (S = sequence dim 1):

    residual stream      Shard(S)     sequence-parallel: each rank holds S/tp positions between blocks
    input_layernorm      Shard(S)     norms run on the shard (SequenceParallel), weights replicated
    -> attention input   Replicate    all-gather over S (forward), reduce-scatter of its gradient (backward)
    q/k/v_proj           column-wise  each rank computes num_heads/tp query and num_kv_heads/tp kv heads
    o_proj               row-wise     partial sums reduce-scattered back to Shard(S) (forward),
                                      all-gather of the gradient (backward)
    mlp gate/up_proj     column-wise, down_proj row-wise, with the same all-gather / reduce-scatter pair

Embedding: vocabulary-sharded (row-wise); its partial outputs are reduce-scattered to Shard(S). Output: the
final norm's output is all-gathered to Replicate and multiplied by the vocabulary-sharded output weight, so
logits are Shard(vocab) and never gathered: cross-entropy runs under torch's `loss_parallel` (all-reduces of
the row max, the sum of exponentials and the target logit over `tp`). With tied embeddings the embedding and
the output share one weight, sharded on the vocabulary in both roles.

Without sequence parallelism the residual stream is replicated and the block boundaries all-reduce instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from treadle.models.lora import LoRALinear
from treadle.models.ops import rmsnorm_torch


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


def apply_batch_overlap(blocks: nn.ModuleDict, *, chunks: int = 2) -> None:
    """Run each block's micro-batch as `chunks` batch chunks interleaved sublayer by sublayer (DeepSpeed Domino,
    Wang et al. 2024, "Domino: Eliminating Communication in LLM Training via Generic Tensor Slicing and
    Overlapping", its batch split only).

    Without sequence parallelism a TP block has one all-reduce after each row-parallel sublayer (attention's
    o_proj, the MLP's down_proj) and, in backward, one after each column-parallel input (the gradient of the
    replicated activations). With chunks c0, c1 in the order attention(c0), attention(c1), mlp(c0), mlp(c1),
    nothing c1 computes waits for c0's all-reduce: the collective runs on the communication stream while
    c1's GEMMs run, and backward (autograd follows the reverse order) interleaves the same way. The
    collectives are ordinary async ones. Eager, DTensor's functional all-reduce is waited at its first use.
    Traced, the wait follows the collective at once, so compiled blocks need Inductor's compute/communication
    reordering (`enable_comm_reordering`; the engine turns it on with this option). The price is GEMMs on half
    the rows. Sequence parallelism has an all-gather *before* each sublayer's GEMMs, on the critical path of its
    own chunk, so the option requires it off (checked in config).

    Measured (2 H200s, 1B, seq 4096, compiled; benchmarks/async_tp.sh), against plain TP+SP: 1.03-1.06x at
    micro-batch 4 and 1.03x at 8, where TP without SP under the same reordering is 1.02-1.08x. Exposed
    communication falls to 8-10 ms/step from 24-34, but the GEMMs slow down beside the all-reduces and at
    micro-batch 4 the host, not the GPU, sets the step time.
    """
    for name, block in blocks.items():
        if not hasattr(block, "batch_chunks"):
            raise ValueError(
                f"parallel.tp_batch_overlap=true needs the Llama blocks of treadle.models.llama; block {name} is "
                f"{type(block).__name__}; fix: set parallel.tp_batch_overlap=false"
            )
        block.batch_chunks = chunks


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, *, sequence_parallel: bool) -> None:
    """Shard `model` (still on the meta device) over `tp_mesh` in place."""
    # torch's styles re-create the parameters they shard as trainable; frozen ones (a LoRA base) stay frozen.
    frozen = {name for name, param in model.named_parameters() if not param.requires_grad}
    stream = Shard(1) if sequence_parallel else Replicate()
    norm_style = SequenceParallel() if sequence_parallel else None
    root_plan = {
        "embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=stream),
        # The loss takes the norm's output as a replicated DTensor (see the module docstring).
        "norm": PrepareModuleOutput(
            output_layouts=stream, desired_output_layouts=Replicate(), use_local_output=False
        ),
    }
    if model.lm_head is not None:
        root_plan["lm_head"] = ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)
    parallelize_module(model, tp_mesh, root_plan)
    # DTensor runs the torch norm itself; any other implementation runs on the local rows.
    if model.ops.rmsnorm is not rmsnorm_torch and not isinstance(model.ops.rmsnorm, LocalRowsNorm):
        model.ops.rmsnorm = LocalRowsNorm(model.ops.rmsnorm)
    if norm_style is not None:
        parallelize_module(model.norm, tp_mesh, norm_style)
    for block in model.layers.values():
        plan = {
            "self_attn": PrepareModuleInput(
                input_layouts=(stream, None, None, None),
                desired_input_layouts=(Replicate(), None, None, None),
            ),
            "self_attn.q_proj": _colwise(block.self_attn.q_proj),
            "self_attn.k_proj": _colwise(block.self_attn.k_proj),
            "self_attn.v_proj": _colwise(block.self_attn.v_proj),
            "self_attn.o_proj": _rowwise(block.self_attn.o_proj, output_layouts=stream),
            "mlp": PrepareModuleInput(input_layouts=(stream,), desired_input_layouts=(Replicate(),)),
            "mlp.gate_proj": _colwise(block.mlp.gate_proj),
            "mlp.up_proj": _colwise(block.mlp.up_proj),
            "mlp.down_proj": _rowwise(block.mlp.down_proj, output_layouts=stream),
        }
        if norm_style is not None:
            plan["input_layernorm"] = norm_style
            plan["post_attention_layernorm"] = norm_style
        parallelize_module(block, tp_mesh, plan)
    for name, param in model.named_parameters():
        if name in frozen:
            param.requires_grad_(False)
