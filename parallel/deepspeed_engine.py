"""`DeepSpeedEngine`: the Trainer's Engine on `deepspeed.initialize` (ZeRO-1/2/3, CPU and NVMe offload).

The model, data, loop, loss normalisation, optimizer (optim/) and LR schedule are ours; DeepSpeed owns
partitioning, gradient reduction, clipping and the optimizer step. The DeepSpeed config is generated from the
typed config (parallel/deepspeed_config.py).

Loss scale: the Trainer divides each micro-batch's summed loss by the global token count and multiplies it by
the data-parallel size, because the gradient reduction averages over ranks (FSDP does, and so does ZeRO:
reduce-scatter/all-reduce then divide by the world size, `gradient_predivide_factor=1`). DeepSpeed's
`backward` would also divide by the accumulation steps (`scale_wrt_gas`); the Trainer's normalisation already
covers them, so it is called with `scale_wrt_gas=False`. The result is the gradient of the global mean loss,
as with the native engine.

Accumulation: DeepSpeed reduces gradients (stage 1/2: all-reduce or reduce-scatter of the buckets; stage 3:
reduce-scatter per partitioned parameter) during the backward of the last micro-batch of a step. The engine
runs all of a step's micro-batches in `forward_backward` and tells DeepSpeed which one is last
(`set_gradient_accumulation_boundary`), so `step()` is called once per optimizer step.

The loss runs inside DeepSpeed's forward (`LossWrapped`): ZeRO-3 gathers a parameter used outside its own
module (the output weight the loss multiplies by) only while that forward runs.

Checkpoints: ZeRO's partitioned fp32 master weights and optimizer states are written by DeepSpeed's own
`save_checkpoint` into `<step dir>/deepspeed/` (so resume is exact), inside the CheckpointManager's atomic
step directory, next to the DCP files of the scheduler, data loader and trainer. `launch/convert_deepspeed.py`
turns such a checkpoint into a plain DCP model checkpoint or HF weights.
"""

from __future__ import annotations

import logging
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from treadle.memory.checkpointing import apply_activation_checkpointing
from treadle.models.init import LOSS_WRAPPER
from treadle.models.loss import CausalLMLoss
from treadle.models.spec import ModelSpec
from treadle.optim.builder import build_optimizer, param_groups
from treadle.optim.config import OptimConfig
from treadle.parallel.deepspeed_config import build_ds_config
from treadle.parallel.engine import (
    EngineSetup,
    MicroBatch,
    PostStepHook,
    StepStats,
    WeightLoader,
    build_loss,
    run_post_step,
)
from treadle.parallel.fsdp import dtype_name, resolve_dtype

logger = logging.getLogger(__name__)

DS_SUBDIR = "deepspeed"  # inside a checkpoint step directory
DS_TAG = "zero"
# An arch-specific or family-specific target of TORCH_CUDA_ARCH_LIST ("9.0a", "10.0f", "12.0a+PTX").
_ARCH_VARIANT = re.compile(r"^(\d+)\.(\d+)[af](\+PTX)?$")


def sanitize_cuda_arch_list(environ: dict[str, str] | os._Environ[str] = os.environ) -> str | None:
    """Drop the `a`/`f` variant suffixes from TORCH_CUDA_ARCH_LIST; returns the new value if it changed.

    DeepSpeed 0.19's op builder (`CUDAOpBuilder.compute_capability_args`, op_builder/builder.py:710 and :744)
    parses each entry as `int(major)`, `int(minor.split('+')[0])`, so "9.0a" (valid for torch >= 2.11 and set
    by CUDA 13 images) fails with `ValueError: invalid literal for int() with base 10: '0a'` as soon as any
    CUDA op is JIT-built (async_io for NVMe offload, fused Adam). DeepSpeed's kernels use no sm_90a-only
    instructions, so the generic target of the same architecture is what they need.
    """
    value = environ.get("TORCH_CUDA_ARCH_LIST")
    if not value:
        return None
    entries = [e for e in value.replace(";", " ").split() if e]
    fixed: list[str] = []
    for entry in entries:
        match = _ARCH_VARIANT.match(entry)
        plain = f"{match.group(1)}.{match.group(2)}{match.group(3) or ''}" if match else entry
        if plain not in fixed:
            fixed.append(plain)
    if fixed == entries:
        return None
    environ["TORCH_CUDA_ARCH_LIST"] = ";".join(fixed)
    return environ["TORCH_CUDA_ARCH_LIST"]


def import_deepspeed(device: torch.device) -> Any:
    """Import DeepSpeed for `device`: its accelerator is chosen once, at first import, from DS_ACCELERATOR.

    On CPU DeepSpeed's CPU accelerator talks gloo when oneCCL is absent (it reports
    `communication_backend_name() == "gloo"`), and it reuses the process group that build.py created.
    """
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
    fixed = sanitize_cuda_arch_list()
    if fixed is not None:
        logger.warning("TORCH_CUDA_ARCH_LIST rewritten to %s for DeepSpeed's op builder", fixed)
    try:
        import deepspeed
    except ImportError as err:
        raise ValueError(
            "parallel.engine=deepspeed needs the deepspeed package; fix: pip install -e '.[deepspeed]'"
        ) from err
    for lock, age_s in stale_build_locks().items():
        logger.warning(
            "%s is %.0f min old: a DeepSpeed op build that was killed leaves this lock, and every later build of "
            "the op waits on it without end; fix: if no other process is building that op, delete the file",
            lock,
            age_s / 60,
        )
    return deepspeed


def stale_build_locks(max_age_s: float = 600.0) -> dict[Path, float]:
    """`lock` files older than `max_age_s` in torch's C++-extension build folders (where DeepSpeed JIT-builds its
    ops: cpu_adam, async_io, ...), with their ages in seconds. torch holds the lock for one build, a few minutes
    at most, and never removes it when the building process is killed."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    now, stale = time.time(), {}
    # <root>/<op>/lock with TORCH_EXTENSIONS_DIR set, <root>/py311_cu130/<op>/lock without.
    for lock in sorted([*root.glob("*/lock"), *root.glob("*/*/lock")]):
        try:
            age_s = now - lock.stat().st_mtime
        except FileNotFoundError:  # a build finished meanwhile
            continue
        if age_s > max_age_s:
            stale[lock] = age_s
    return stale


class LossWrapped(nn.Module):
    """A model part and the loss in one forward, for DeepSpeed to run. The part is registered under
    `models.init.LOSS_WRAPPER`, which canonical parameter names drop, so names stay the part's own."""

    def __init__(self, part: nn.Module, loss: CausalLMLoss) -> None:
        super().__init__()
        self.add_module(LOSS_WRAPPER, part)
        self.loss = loss

    def forward(
        self,
        tokens_BS: torch.Tensor,
        labels_BS: torch.Tensor,
        positions_BS: torch.Tensor | None,
        doc_ids_BS: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        part = getattr(self, LOSS_WRAPPER)
        return self.loss(part, part(tokens_BS, positions_BS=positions_BS, doc_ids_BS=doc_ids_BS), labels_BS)


class DeepSpeedEngine:
    """ZeRO-1/2/3 through `deepspeed.initialize`; see the module docstring for the loss scale and checkpoints."""

    def __init__(self, setup: EngineSetup):
        self.dims, self.cfg, self.memory_cfg = setup.dims, setup.parallel, setup.memory
        self.device, self.seed = setup.device, setup.seed
        self.micro_batch_size, self.grad_accum = setup.micro_batch_size, setup.grad_accum
        self.loss = build_loss(setup, compile_loss=False)
        self.ds: Any = None  # deepspeed.DeepSpeedEngine, after prepare()
        self.model_parts: list[nn.Module] = []
        self.optimizer: torch.optim.Optimizer | None = None
        self.post_step: tuple[PostStepHook, ...] = ()

    def ds_config(self, optim_cfg: OptimConfig) -> dict[str, Any]:
        return build_ds_config(
            self.cfg.deepspeed,
            micro_batch_size=self.micro_batch_size,
            grad_accum=self.grad_accum,
            dp_size=self.dims.dp_size,
            clip_grad_norm=optim_cfg.clip_grad_norm,
            param_dtype=dtype_name(resolve_dtype(self.cfg.param_dtype, self.device, "parallel.param_dtype")),
            reduce_dtype=dtype_name(
                resolve_dtype(self.cfg.reduce_dtype, self.device, "parallel.reduce_dtype")
            ),
        )

    def prepare(
        self,
        spec: ModelSpec,
        model_cfg: Any,
        model: nn.Module,
        optim_cfg: OptimConfig,
        load_weights: WeightLoader | None = None,
    ) -> list[nn.Module]:
        """Materialise and initialise the full model (then `load_weights`, e.g. Hugging Face weights), then let
        DeepSpeed partition it and wrap the optimizer.

        Every rank initialises the same full weights from the seed (models.init draws per parameter name),
        so ZeRO-3's partitions equal the native engine's shards. With parameter offload the weights are
        materialised on the host; DeepSpeed then moves them to the device in `param_dtype` and partitions
        them, so the model must fit the device once in that dtype during initialisation.
        """
        if spec.ep_plan:
            raise ValueError(
                f"parallel.engine=deepspeed does not train model.name={spec.name} (a Mixture-of-Experts family: "
                "its auxiliary loss and expert parallelism are the native engine's); fix: parallel.engine=native"
            )
        deepspeed = import_deepspeed(self.device)
        ds_cfg = self.cfg.deepspeed
        if self.cfg.compile:
            warnings.warn("parallel.compile=true has no effect with parallel.engine=deepspeed", stacklevel=2)
        apply_activation_checkpointing(model.layers, self.memory_cfg)
        model.to_empty(device="cpu" if ds_cfg.offload_param != "none" else self.device)
        model.init_weights(self.seed)
        if load_weights is not None:
            load_weights(model)
        self.optimizer = self._build_optimizer(model, optim_cfg)
        # The scheduler stays ours (the Trainer steps it); DeepSpeed's lr_scheduler would step it a second time.
        self.ds, _, _, _ = deepspeed.initialize(
            model=LossWrapped(model, self.loss),
            optimizer=self.optimizer,
            config=self.ds_config(optim_cfg),
            dist_init_required=False,
        )
        self.model_parts, self.post_step = [model], spec.post_step
        return self.model_parts

    def _build_optimizer(self, model: nn.Module, optim_cfg: OptimConfig) -> torch.optim.Optimizer:
        if optim_cfg.name != "adamw":
            raise ValueError(
                f"optim.name={optim_cfg.name!r} is not supported with parallel.engine=deepspeed (ZeRO steps the "
                f"optimizer on flattened fp32 partitions); fix: optim.name=adamw or parallel.engine=native"
            )
        if self.cfg.deepspeed.offload_optimizer == "none":
            return build_optimizer(model, optim_cfg, self.device)
        # ZeRO-Offload steps on the host: DeepSpeed's vectorised CPU Adam (AdamW mode), JIT-built on first use.
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(
            param_groups(model, optim_cfg),
            lr=optim_cfg.lr,
            betas=tuple(optim_cfg.betas),
            eps=optim_cfg.eps,
            adamw_mode=True,
        )

    def forward_backward(self, batches: list[MicroBatch], loss_scale: torch.Tensor) -> torch.Tensor:
        self.ds.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, batch in enumerate(batches):
            self.ds.set_gradient_accumulation_boundary(i == len(batches) - 1)
            micro_loss, _ = self.ds(batch.tokens, batch.labels, batch.positions, batch.doc_ids)
            self.ds.backward(micro_loss * loss_scale.to(micro_loss.dtype), scale_wrt_gas=False)
            loss_sum += micro_loss.detach().double()
        return loss_sum

    @torch.no_grad()
    def eval_loss(self, batch: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        self.ds.eval()
        return self.ds(batch.tokens, batch.labels, batch.positions, batch.doc_ids)

    def step(self) -> StepStats:
        """Clip, step and zero gradients on the accumulation boundary. ZeRO skips the update itself when the
        global gradient norm is not finite (the same decision on every rank, from the all-reduced norm)."""
        assert self.ds.is_gradient_accumulation_boundary(), (
            "step() before forward_backward's last micro-batch"
        )
        self.ds.step()
        norm = self.ds.get_global_grad_norm()
        grad_norm = float(norm) if norm is not None else float("nan")
        applied = self.ds.was_step_applied()
        metrics = run_post_step(self.post_step, self.model_parts, self.dims) if applied else {}
        return StepStats(grad_norm=grad_norm, skipped=not applied, metrics=metrics)

    # DCP holds only what identifies the DeepSpeed files; they are written and read by save/load_files.
    def state_dict(self) -> dict[str, Any]:
        return {"zero_stage": self.cfg.deepspeed.zero_stage, "world_size": self.dims.world_size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = (int(state_dict["zero_stage"]), int(state_dict["world_size"]))
        if saved != (self.cfg.deepspeed.zero_stage, self.dims.world_size):
            raise ValueError(
                f"this DeepSpeed checkpoint was written with parallel.deepspeed.zero_stage={saved[0]} on "
                f"{saved[1]} ranks, this run has zero_stage={self.cfg.deepspeed.zero_stage} on "
                f"{self.dims.world_size}; ZeRO partitions only load into the same layout; fix: resume with the "
                f"same settings, or convert it with launch/convert_deepspeed.py and start from the weights"
            )

    def save_files(self, step_dir: Path) -> None:
        """Collective: every rank writes its ZeRO partition under `<step_dir>/deepspeed/`."""
        self.ds.save_checkpoint(str(step_dir / DS_SUBDIR), tag=DS_TAG, save_latest=False)

    def load_files(self, step_dir: Path) -> None:
        path, _ = self.ds.load_checkpoint(
            str(step_dir / DS_SUBDIR),
            tag=DS_TAG,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
        if path is None:
            raise ValueError(f"{step_dir} has no DeepSpeed checkpoint under {DS_SUBDIR}/{DS_TAG}")
