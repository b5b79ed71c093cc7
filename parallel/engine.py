"""Engines own sharding, the forward/backward schedule and the optimizer step; every engine serves the same
`Trainer`, which keeps data, token counting and loss normalisation. This file holds the protocol, what engines
share and the native engine; parallel/registry.py maps engine names to their factories."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from treadle.experiments.tp_batch_overlap import apply_batch_overlap
from treadle.memory.activations import SavedActivationHooks, apply_activation_memory
from treadle.memory.checkpointing import MemoryConfig, apply_activation_checkpointing
from treadle.models.init import canonical_name
from treadle.models.loss import CausalLMLoss
from treadle.models.ops import IGNORE_INDEX, KernelsConfig, build_loss_op
from treadle.models.spec import ModelSpec
from treadle.optim.builder import build_optimizer
from treadle.optim.clip import clip_grad_norm_
from treadle.optim.config import OptimConfig
from treadle.parallel.config import ParallelConfig
from treadle.parallel.cp import apply_cp, shard_sequences
from treadle.parallel.dims import ParallelDims
from treadle.parallel.ep import apply_ep
from treadle.parallel.fp8 import Float8Config, convert_to_float8, weight_scale_refresh
from treadle.parallel.fsdp import apply_compile, apply_fsdp
from treadle.parallel.loss import vocab_parallel_linear_cross_entropy
from treadle.parallel.pipeline import OptimizerGroup, Pipeline, build_pipeline
from treadle.parallel.tp import apply_tp, enable_async_tp, enable_comm_reordering


class MicroBatch(Protocol):
    """One micro-batch of token rows (train.data.Batch has these fields), already on the engine's device."""

    tokens: torch.Tensor  # [B, S]
    labels: torch.Tensor  # [B, S], IGNORE_INDEX where no loss is taken
    positions: torch.Tensor | None  # [B, S]
    doc_ids: torch.Tensor | None  # [B, S]


@dataclass
class StepStats:
    grad_norm: float
    skipped: bool
    # What the spec's post-step hooks report (e.g. MoE expert load), as device tensors: read when logged.
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


# (this rank's model parts, the topology) -> metrics; the topology lets a hook reduce over pipeline stages.
PostStepHook = Callable[[list[nn.Module], ParallelDims], "dict[str, torch.Tensor] | None"]


def run_post_step(
    hooks: tuple[PostStepHook, ...], model_parts: list[nn.Module], dims: ParallelDims
) -> dict[str, torch.Tensor]:
    metrics: dict[str, torch.Tensor] = {}
    for hook in hooks:
        metrics.update(hook(model_parts, dims) or {})
    return metrics


def add_auxiliary_loss(part: nn.Module, loss_sum: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """The summed LM loss plus the model's auxiliary loss of the forward just run (`pop_auxiliary_loss`, a
    per-token mean: MoE balancing), weighted by the micro-batch's counted tokens so that it is normalised with
    the LM loss by the global token count."""
    pop = getattr(part, "pop_auxiliary_loss", None)
    aux = pop() if pop is not None else None
    return loss_sum if aux is None else loss_sum + aux.to(loss_sum.dtype) * count


# Keyword input of a pipeline stage whose model has an auxiliary loss (`pop_auxiliary_loss`): per row, the weight
# of that loss, i.e. its counted tokens times the step's loss scale (the gradient `add_auxiliary_loss` gives it
# without PP; models/moe/model.py `AddAuxiliaryLoss`).
AUX_LOSS_WEIGHT = "aux_loss_weight_B"


def auxiliary_loss_weights(labels_BS: torch.Tensor, loss_scale: torch.Tensor) -> torch.Tensor:
    """[B] fp64: each row's counted tokens (labels not IGNORE_INDEX) times `loss_scale`."""
    return (labels_BS != IGNORE_INDEX).sum(dim=1, dtype=torch.float64) * loss_scale.double()


# Fills a materialised model's parameters (e.g. from Hugging Face weights) after the default initialisation.
WeightLoader = Callable[[nn.Module], None]


@dataclass(kw_only=True)
class EngineSetup:
    """What an engine factory is given: the topology and the configs of what it owns."""

    dims: ParallelDims
    parallel: ParallelConfig
    memory: MemoryConfig
    kernels: KernelsConfig
    fp8: Float8Config
    device: torch.device
    seed: int
    micro_batch_size: int = 1
    grad_accum: int = 1  # micro-batches per optimizer step on each data-parallel rank
    # tokens per row; > 0 lets a pipeline build its schedule (and report its bubble) up front
    seq_len: int = 0


class Engine(Protocol):
    """What the Trainer sees. `forward_backward` runs all micro-batches of one step and `step` updates once."""

    model_parts: list[nn.Module]
    optimizer: torch.optim.Optimizer | None

    def prepare(
        self,
        spec: ModelSpec,
        model_cfg: Any,
        model: nn.Module,
        optim_cfg: OptimConfig,
        load_weights: WeightLoader | None = None,
    ) -> list[nn.Module]:
        """Plan, materialise and initialise `model` (built by `spec` on the meta device, adapters applied);
        build the optimizer. Returns the model parts."""
        ...

    def forward_backward(self, batches: list[MicroBatch], loss_scale: torch.Tensor) -> torch.Tensor:
        """Forward and backward of every micro-batch, each summed loss multiplied by `loss_scale` before its
        backward; returns this rank's summed loss (fp64, detached)."""
        ...

    def eval_loss(self, batch: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed loss, counted tokens) of one held-out micro-batch on this rank, without gradients."""
        ...

    def step(self) -> StepStats: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


def build_loss(setup: EngineSetup, *, compile_loss: bool) -> CausalLMLoss:
    """The loss component for the last part: vocabulary-parallel under TP, else `kernels.loss`; compiled with
    the blocks (its fp32 upcast and log-softmax then fuse instead of materialising [tokens, vocab] fp32 logits
    several times), except under TP, whose loss issues collectives from an autograd Function."""
    if setup.dims.tp > 1:
        return CausalLMLoss(vocab_parallel_linear_cross_entropy)
    op = build_loss_op(setup.kernels)
    return CausalLMLoss(torch.compile(op, fullgraph=True) if compile_loss else op)


class NativeEngine:
    """FSDP2 (ZeRO-3 / ZeRO-2 / HSDP) with DTensor tensor/sequence parallelism; plans applied in the fixed
    order of STYLE.md §3: FP8 linears → TP/SP (the spec's plan) → CP → activation checkpointing → compile →
    activation compression/offload hooks (outside the compiled blocks) → FSDP → materialise."""

    def __init__(self, setup: EngineSetup):
        self.setup, self.dims, self.cfg, self.memory_cfg = setup, setup.dims, setup.parallel, setup.memory
        self.device, self.seed = setup.device, setup.seed
        self.activation_hooks: SavedActivationHooks | None = None
        self.model_parts: list[nn.Module] = []
        self.optimizer: torch.optim.Optimizer | None = None
        self.loss = build_loss(setup, compile_loss=setup.parallel.compile)
        self.post_step: tuple[PostStepHook, ...] = ()
        self.clip_grad_norm = 0.0
        self.has_frozen = False
        self.pipeline: Pipeline | None = None  # with parallel.pp > 1
        self.part_optimizers: list[torch.optim.Optimizer] = []  # one per model part
        # The next load reads the optimizer state by group index, as treadle wrote it before pipeline
        # parallelism (`match_checkpoint`); saves always write the per-parameter layout.
        self._load_grouped_optimizer_state = False
        # Runs on the model whenever its weights change (torchao FP8 all-gather's scales; parallel/fp8.py).
        self.refresh_weight_state = weight_scale_refresh(setup.fp8)

    def prepare(
        self,
        spec: ModelSpec,
        model_cfg: Any,
        model: nn.Module,
        optim_cfg: OptimConfig,
        load_weights: WeightLoader | None = None,
    ) -> list[nn.Module]:
        """Split a meta-device model into this rank's pipeline stages (one part without PP), apply plans to each
        part, materialise it on `device` (initialised, then `load_weights`), and build the optimizer over the
        parameters that require gradients."""
        parts = [model]
        if self.dims.pp > 1:
            self.pipeline = build_pipeline(
                model,
                spec,
                model_cfg,
                cfg=self.cfg,
                dims=self.dims,
                device=self.device,
                micro_batch_size=self.setup.micro_batch_size,
                grad_accum=self.setup.grad_accum,
                loss=self.loss,
            )
            parts = self.pipeline.modules
        cpu_offload = self.memory_cfg.param_offload == "cpu"
        for part in parts:
            self._parallelize(part, spec, cpu_offload=cpu_offload)
            # Every part draws its parameters from the per-name streams of `models.init`, so a stage holds the
            # values the whole model would (a tied copy on the last stage equals the first stage's weight).
            part.init_weights(self.seed)
            if load_weights is not None:
                load_weights(part)
        if self.pipeline is not None and self.setup.seq_len > 0:
            rows = self.setup.micro_batch_size * self.setup.grad_accum
            self.pipeline.build_schedule(rows, self.setup.seq_len // self.dims.cp)
        # With frozen parameters (adapters), checkpoints hold only what trains; the base comes from its source.
        self.has_frozen = any(not p.requires_grad for part in parts for p in part.parameters())
        self.model_parts, self.clip_grad_norm, self.post_step = (
            parts,
            optim_cfg.clip_grad_norm,
            spec.post_step,
        )
        optim_device = torch.device("cpu") if cpu_offload else self.device
        optimizers = [build_optimizer(p, optim_cfg, optim_device, host_offload=cpu_offload) for p in parts]
        self.part_optimizers = optimizers
        self.optimizer = optimizers[0] if len(optimizers) == 1 else OptimizerGroup(optimizers)
        return self.model_parts

    def _parallelize(self, model: nn.Module, spec: ModelSpec, *, cpu_offload: bool) -> None:
        """Plans in the fixed order on one model part (still on the meta device), then `to_empty`."""
        convert_to_float8(model, self.setup.fp8, self.device)
        if self.dims.tp > 1:
            apply_tp(model, self.dims.mesh("tp"), spec.tp_plan, sequence_parallel=self.cfg.sequence_parallel)
            if self.cfg.async_tp:
                enable_async_tp(self.dims.mesh("tp"))
            if self.cfg.tp_batch_overlap:
                apply_batch_overlap(model.layers)
            if self.cfg.compile and (self.cfg.tp_comm_reorder or self.cfg.tp_batch_overlap):
                enable_comm_reordering(batch_chunks=self.cfg.tp_batch_overlap)
        if self.dims.cp > 1:
            apply_cp(model, self.dims.mesh("cp"), self.cfg.cp_variant)
        expert_units = apply_ep(model, self.dims, spec.ep_plan, sequence_parallel=self.cfg.sequence_parallel)
        apply_activation_checkpointing(model.layers, self.memory_cfg)
        if self.cfg.compile:
            # Ring attention's point-to-point sends break the graph, and so does activation compression's
            # eager attention (memory/activations.py): blocks are then more than one graph. So do MoE layers
            # whose row counts reach the host (expert parallelism, capacity drops; `compile_fullgraph`).
            one_graph = (
                self.dims.cp == 1
                and self.memory_cfg.activation_compression == "none"
                and getattr(model, "compile_fullgraph", True)
            )
            apply_compile(model, fullgraph=one_graph)
        self.activation_hooks = apply_activation_memory(model, self.memory_cfg, self.device)
        # Under PP a stage's parameters are kept gathered from a micro-batch's forward to its backward (torchtitan's
        # choice too): resharding would all-gather every block again for each of the step's micro-batches.
        fsdp_cfg = replace(self.cfg, reshard_after_forward=False) if self.dims.pp > 1 else self.cfg
        apply_fsdp(
            model,
            self.dims.fsdp_mesh(),
            fsdp_cfg,
            self.device,
            cpu_offload=cpu_offload,
            expert_units=expert_units,
            expert_mesh=self.dims.expert_fsdp_mesh() if expert_units else None,
            expert_grad_divide=self.dims.dp_size * self.dims.cp,
        )
        # Offloaded parameters are materialised in host memory, where FSDP2 keeps them; buffers (RoPE
        # frequencies) are used by the computation and go to the device.
        model.to_empty(device="cpu" if cpu_offload else self.device)
        if cpu_offload:
            for module in model.modules():
                for name, buf in module.named_buffers(recurse=False):
                    module._buffers[name] = buf.to(self.device)

    def forward_loss(self, batch: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and loss of one micro-batch (this rank's context-parallel slice of it): summed loss and
        counted tokens. `forward_backward` runs it per micro-batch; benchmarks call it to time the phases."""
        tokens, labels, positions, doc_ids = batch.tokens, batch.labels, batch.positions, batch.doc_ids
        if self.dims.cp > 1:
            tokens, labels, positions, doc_ids = shard_sequences(
                self.dims.mesh("cp"), tokens, labels, positions, doc_ids
            )
        (part,) = self.model_parts
        hidden = part(tokens, positions_BS=positions, doc_ids_BS=doc_ids)
        return self.loss(part, hidden, labels)

    def forward_objective(self, batch: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(what backward differentiates: the summed loss plus any auxiliary loss, the summed LM loss)."""
        loss_sum, count = self.forward_loss(batch)
        return add_auxiliary_loss(self.model_parts[0], loss_sum, count), loss_sum

    def forward_backward(self, batches: list[MicroBatch], loss_scale: torch.Tensor) -> torch.Tensor:
        """Forward and backward of each micro-batch in turn (gradients accumulate in place).

        With parameters offloaded to the host, FSDP2 would copy each micro-batch's reduced gradient to
        pageable host memory synchronously inside backward and add it there on the CPU (its overlapped pinned
        copy only applies when nothing is accumulated yet). So under offload the earlier micro-batches keep
        their gradients unsharded on the GPU (accumulated in fp32: 4 bytes per parameter until the step) and
        only the last one reduces them and moves them to the host, once per step."""
        if self.pipeline is not None:
            return self._pipeline_step(batches, loss_scale)
        (part,) = self.model_parts
        part.train()
        defer_sync = self.memory_cfg.param_offload == "cpu" and len(batches) > 1
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, batch in enumerate(batches):
            if defer_sync:
                part.set_requires_gradient_sync(i == len(batches) - 1)
            objective, micro_loss = self.forward_objective(batch)
            (objective * loss_scale.to(objective.dtype)).backward()
            loss_sum += micro_loss.detach().double()
        return loss_sum

    def _pipeline_inputs(
        self, batches: list[MicroBatch]
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """The step's micro-batches as one batch of rows (the schedule cuts its own micro-batches), this CP
        rank's slice of it, and the keyword inputs every stage takes."""
        cat = [torch.cat(ts) if ts[0] is not None else None for ts in zip(*((b.tokens, b.labels, b.positions,
               b.doc_ids) for b in batches), strict=True)]  # fmt: skip
        tokens, labels, positions, doc_ids = cat
        if self.dims.cp > 1:
            tokens, labels, positions, doc_ids = shard_sequences(
                self.dims.mesh("cp"), tokens, labels, positions, doc_ids
            )
        kwargs = {k: v for k, v in (("positions_BS", positions), ("doc_ids_BS", doc_ids)) if v is not None}
        assert tokens is not None and labels is not None
        return tokens, labels, kwargs

    def _pipeline_step(self, batches: list[MicroBatch], loss_scale: torch.Tensor) -> torch.Tensor:
        """The pipeline schedule over the step's rows; the loss summed over `pp`; tied copies' gradients summed.
        A model with an auxiliary loss gets its per-row weights as a keyword input of every stage."""
        assert self.pipeline is not None
        for part in self.model_parts:
            part.train()
        tokens, labels, kwargs = self._pipeline_inputs(batches)
        if hasattr(self.model_parts[0], "pop_auxiliary_loss"):
            kwargs[AUX_LOSS_WEIGHT] = auxiliary_loss_weights(labels, loss_scale)
        loss_sum = self.pipeline.step(tokens, labels, kwargs, loss_scale)
        self.pipeline.sync_tied_grads()
        return loss_sum

    @torch.no_grad()
    def eval_loss(self, batch: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        for part in self.model_parts:
            part.eval()
        if self.pipeline is not None:
            return self.pipeline.forward(*self._pipeline_inputs([batch]))
        return self.forward_loss(batch)

    def step(self) -> StepStats:
        """Clip to the global norm, then step, unless the norm is not finite: then skip the update.

        Every rank sees the same all-reduced norm, so every rank takes the same decision. The spec's post-step
        hooks run after an update.
        """
        assert self.model_parts and self.optimizer is not None
        params = [p for part in self.model_parts for p in part.parameters() if p.requires_grad]
        if self.pipeline is None:
            grad_norm = clip_grad_norm_(params, self.clip_grad_norm).item()
        else:  # each stage holds different parameters: their squared norms add up over `pp`
            stage_group = self.dims.mesh("pp").get_group()
            shared = self.pipeline.norm_shared()
            grad_norm = clip_grad_norm_(
                params, self.clip_grad_norm, stage_group=stage_group, shared=shared
            ).item()
        skipped = not math.isfinite(grad_norm)
        metrics = {}
        if not skipped:
            self.optimizer.step()
            if self.refresh_weight_state is not None:
                for part in self.model_parts:
                    self.refresh_weight_state(part)
            metrics = run_post_step(self.post_step, self.model_parts, self.dims)
        self.optimizer.zero_grad(set_to_none=True)
        return StepStats(grad_norm=grad_norm, skipped=skipped, metrics=metrics)

    def state_dict(self) -> dict[str, Any]:
        """Sharded (DTensor) model and optimizer state keyed by parameter name, as DCP reshards it. The
        optimizer's is flattened to one entry per parameter and state (`state.<fqn>.exp_avg`,
        `param_groups.<fqn>.lr`), so the entries of several pipeline stages merge, and a checkpoint of one
        pipeline layout loads into another."""
        model_sd: dict[str, Any] = {}
        optim_sd: dict[str, Any] = {}
        for part, optimizer in zip(self.model_parts, self.part_optimizers, strict=True):
            model_sd.update(get_model_state_dict(part, options=self._state_options()))
            optim_sd.update(get_optimizer_state_dict(part, optimizer, options=self._state_options()))
        return {"model": model_sd, "optim": optim_sd}

    def _state_options(self, *, strict: bool = True) -> StateDictOptions:
        return StateDictOptions(
            strict=strict,
            ignore_frozen_params=self.has_frozen,
            flatten_optimizer_state_dict=not self._load_grouped_optimizer_state,
        )

    def match_checkpoint(self, saved_keys: set[str], prefix: str) -> None:
        """Checkpoints written before pipeline parallelism hold the optimizer's param groups by index
        (`optim.param_groups.0.lr`) rather than by parameter name: read those in that layout (one model part)."""
        grouped = f"{prefix}.optim.param_groups.0."
        self._load_grouped_optimizer_state = any(key.startswith(grouped) for key in saved_keys)
        if self._load_grouped_optimizer_state and len(self.model_parts) > 1:
            raise ValueError(
                "the checkpoint was written by an earlier treadle (optimizer param groups by index), which "
                f"loads into one model part only, not {len(self.model_parts)} pipeline stages; fix: resume it "
                "once at parallel.pp=1 and save (its next checkpoint has the per-parameter layout), then resume "
                "that one with pipeline parallelism"
            )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        try:
            for part, optimizer in zip(self.model_parts, self.part_optimizers, strict=True):
                own = get_model_state_dict(part, options=self._state_options())
                set_model_state_dict(
                    part,
                    {k: v for k, v in state_dict["model"].items() if k in own},
                    options=self._state_options(strict=not self.has_frozen),
                )
                set_optimizer_state_dict(part, optimizer, state_dict["optim"], options=self._state_options())
        finally:
            self._load_grouped_optimizer_state = False
        for model in self.model_parts:
            self._check_loaded(model, state_dict)

    def _check_loaded(self, model: nn.Module, state_dict: dict[str, Any]) -> None:
        if self.refresh_weight_state is not None:
            self.refresh_weight_state(model)
        if self.has_frozen:
            trainable = {canonical_name(n) for n, p in model.named_parameters() if p.requires_grad}
            missing = sorted(trainable - set(state_dict["model"]))
            if missing:
                raise ValueError(
                    f"checkpoint.resume: the checkpoint lacks trainable parameters {missing[:3]} (of {len(missing)}); "
                    "it was saved with other peft settings (peft.method, peft.target_modules, peft.use_dora)"
                )
