"""Engines own sharding, backward and the optimizer step; every engine serves the same `Trainer`."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from treadle.memory.activations import SavedActivationHooks, apply_activation_memory
from treadle.memory.checkpointing import MemoryConfig, apply_activation_checkpointing
from treadle.models.init import canonical_name
from treadle.optim.builder import build_optimizer
from treadle.optim.clip import clip_grad_norm_
from treadle.optim.config import OptimConfig
from treadle.parallel.cp import apply_cp, shard_batch
from treadle.parallel.dims import ParallelConfig, ParallelDims
from treadle.parallel.fp8 import Float8Config, convert_to_float8, weight_scale_refresh
from treadle.parallel.fsdp import apply_compile, apply_fsdp
from treadle.parallel.loss import vocab_parallel_linear_cross_entropy
from treadle.parallel.tp import apply_batch_overlap, apply_tp, enable_async_tp, enable_comm_reordering
from treadle.train.data import Batch


@dataclass
class StepStats:
    grad_norm: float
    skipped: bool


# Fills a materialised model's parameters (e.g. from Hugging Face weights) after the default initialisation.
WeightLoader = Callable[[nn.Module], None]


class Engine(Protocol):
    """What the Trainer sees. `backward` is called once per micro-batch of a step (grad_accum times), then
    `step` once; an engine that accumulates in its own way (DeepSpeed) does so behind these two calls."""

    def prepare(
        self, model: nn.Module, optim_cfg: OptimConfig, load_weights: WeightLoader | None = None
    ) -> tuple[nn.Module, torch.optim.Optimizer]: ...
    def prepare_batch(self, batch: Batch) -> Batch: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def step(self) -> StepStats: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


class NativeEngine:
    """FSDP2 (ZeRO-3 / ZeRO-2 / HSDP) with DTensor tensor/sequence parallelism; plans applied in the fixed
    order of STYLE.md §3: FP8 linears → TP/SP → CP → activation checkpointing → compile → activation
    compression/offload hooks (outside the compiled blocks) → FSDP → materialise."""

    def __init__(
        self,
        dims: ParallelDims,
        cfg: ParallelConfig,
        memory_cfg: MemoryConfig,
        device: torch.device,
        seed: int,
        fp8_cfg: Float8Config | None = None,
        grad_accum: int = 1,
    ):
        self.dims, self.cfg, self.memory_cfg = dims, cfg, memory_cfg
        self.grad_accum, self.micro_step = grad_accum, 0
        self.fp8_cfg = fp8_cfg or Float8Config()
        self.device, self.seed = device, seed
        self.activation_hooks: SavedActivationHooks | None = None
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.clip_grad_norm = 0.0
        self.has_frozen = False
        # Runs on the model whenever its weights change (torchao FP8 all-gather's scales; parallel/fp8.py).
        self.refresh_weight_state = weight_scale_refresh(self.fp8_cfg)

    def prepare(
        self, model: nn.Module, optim_cfg: OptimConfig, load_weights: WeightLoader | None = None
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Apply plans to a meta-device model, materialise it on `device` (initialised, then `load_weights`),
        and build its optimizer over the parameters that require gradients."""
        convert_to_float8(model, self.fp8_cfg, self.device)
        if self.dims.tp > 1:
            apply_tp(model, self.dims.tp_mesh(), sequence_parallel=self.cfg.sequence_parallel)
            model.ops.loss = vocab_parallel_linear_cross_entropy
            if self.cfg.async_tp:
                enable_async_tp(self.dims.tp_mesh())
            if self.cfg.tp_batch_overlap:
                apply_batch_overlap(model.layers)
            if self.cfg.compile and (self.cfg.tp_comm_reorder or self.cfg.tp_batch_overlap):
                enable_comm_reordering(batch_chunks=self.cfg.tp_batch_overlap)
        if self.dims.cp > 1:
            apply_cp(model, self.dims.cp_mesh(), self.cfg.cp_variant)
        apply_activation_checkpointing(model.layers, self.memory_cfg)
        if self.cfg.compile:
            # Ring attention's point-to-point sends break the graph, and so does activation compression's
            # eager attention (memory/activations.py): blocks are then more than one graph.
            one_graph = self.dims.cp == 1 and self.memory_cfg.activation_compression == "none"
            apply_compile(model, compile_loss=self.dims.tp == 1, fullgraph=one_graph)
        self.activation_hooks = apply_activation_memory(model, self.memory_cfg, self.device)
        cpu_offload = self.memory_cfg.param_offload == "cpu"
        apply_fsdp(model, self.dims.fsdp_mesh(), self.cfg, self.device, cpu_offload=cpu_offload)
        # Offloaded parameters are materialised in host memory, where FSDP2 keeps them; buffers (RoPE
        # frequencies) are used by the computation and go to the device.
        model.to_empty(device="cpu" if cpu_offload else self.device)
        if cpu_offload:
            for module in model.modules():
                for name, buf in module.named_buffers(recurse=False):
                    module._buffers[name] = buf.to(self.device)
        model.init_weights(self.seed)
        if load_weights is not None:
            load_weights(model)
        # With frozen parameters (adapters), checkpoints hold only what trains; the base comes from its source.
        self.has_frozen = any(not p.requires_grad for p in model.parameters())
        self.model, self.clip_grad_norm = model, optim_cfg.clip_grad_norm
        optim_device = torch.device("cpu") if cpu_offload else self.device
        self.optimizer = build_optimizer(model, optim_cfg, optim_device, host_offload=cpu_offload)
        return model, self.optimizer

    def prepare_batch(self, batch: Batch) -> Batch:
        """This rank's part of a data-parallel rank's batch: its context-parallel slice of the sequence."""
        return shard_batch(batch, self.dims.cp_mesh()) if self.dims.cp > 1 else batch

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one of the step's `grad_accum` micro-batches.

        With parameters offloaded to the host, FSDP2 would copy each micro-batch's reduced gradient to
        pageable host memory synchronously inside backward and add it there on the CPU (its overlapped pinned
        copy only applies when nothing is accumulated yet). So under offload the earlier micro-batches keep
        their gradients unsharded on the GPU (accumulated in fp32: 4 bytes per parameter until the step) and
        only the last one reduces them and moves them to the host, once per step."""
        self.micro_step += 1
        last = self.micro_step == self.grad_accum
        if self.memory_cfg.param_offload == "cpu" and self.grad_accum > 1:
            self.model.set_requires_gradient_sync(last)
        loss.backward()
        if last:
            self.micro_step = 0

    def step(self) -> StepStats:
        """Clip to the global norm, then step, unless the norm is not finite: then skip the update.

        Every rank sees the same all-reduced norm, so every rank takes the same decision.
        """
        assert self.model is not None and self.optimizer is not None
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = clip_grad_norm_(params, self.clip_grad_norm).item()
        skipped = not math.isfinite(grad_norm)
        if not skipped:
            self.optimizer.step()
            if self.refresh_weight_state is not None:
                self.refresh_weight_state(self.model)
        self.optimizer.zero_grad(set_to_none=True)
        return StepStats(grad_norm=grad_norm, skipped=skipped)

    def state_dict(self) -> dict[str, Any]:
        """Sharded (DTensor) model and optimizer state keyed by parameter name, as DCP reshards it."""
        options = StateDictOptions(ignore_frozen_params=self.has_frozen)
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=options)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state_dict["model"],
            optim_state_dict=state_dict["optim"],
            options=StateDictOptions(strict=not self.has_frozen, ignore_frozen_params=self.has_frozen),
        )
        if self.refresh_weight_state is not None:
            self.refresh_weight_state(self.model)
        if self.has_frozen:
            trainable = {canonical_name(n) for n, p in self.model.named_parameters() if p.requires_grad}
            missing = sorted(trainable - set(state_dict["model"]))
            if missing:
                raise ValueError(
                    f"checkpoint.resume: the checkpoint lacks trainable parameters {missing[:3]} (of {len(missing)}); "
                    "it was saved with other peft settings (peft.method, peft.target_modules, peft.use_dora)"
                )


def build_engine(
    dims: ParallelDims,
    cfg: ParallelConfig,
    memory_cfg: MemoryConfig,
    device: torch.device,
    seed: int,
    fp8_cfg: Float8Config | None = None,
    *,
    micro_batch_size: int = 1,
    grad_accum: int = 1,
) -> Engine:
    """The engine named by `parallel.engine`. DeepSpeed generates its runtime config from the batch split; the
    native engine uses `grad_accum` only to find each step's last micro-batch (see `NativeEngine.backward`)."""
    if cfg.engine == "native":
        return NativeEngine(dims, cfg, memory_cfg, device, seed, fp8_cfg, grad_accum=grad_accum)
    if cfg.engine == "deepspeed":
        # Imported here: the module pulls in DeepSpeed only when this engine is used.
        from treadle.parallel.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(
            dims, cfg, memory_cfg, device, seed, micro_batch_size=micro_batch_size, grad_accum=grad_accum
        )
    raise ValueError(
        f"parallel.engine={cfg.engine!r} is not available in this build; use parallel.engine=native or "
        f"deepspeed (the megatron engine is a separate work item)"
    )
