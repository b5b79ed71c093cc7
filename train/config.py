"""The typed config tree: one dataclass per component, registered in Hydra's ConfigStore as the schema that
every YAML file under `configs/` is merged into. A typo or a wrong type fails while Hydra composes, naming the
key; `validate` then checks the rules that span components, before any process group exists."""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from treadle.memory.checkpointing import MemoryConfig
from treadle.models import get_model_spec, load_builtin_families
from treadle.models.hf import model_config_from_hf
from treadle.models.lora import PeftConfig
from treadle.models.ops import KernelsConfig, build_ops
from treadle.optim.config import SCHEDULES, OptimConfig
from treadle.parallel.config import ParallelConfig
from treadle.parallel.cp import CP_VARIANTS
from treadle.parallel.deepspeed_config import build_ds_config
from treadle.parallel.dims import ParallelDims
from treadle.parallel.fp8 import Float8Config
from treadle.parallel.fsdp import dtype_name, resolve_dtype
from treadle.parallel.pipeline import check_schedule_backend, count_microbatches, num_blocks, plan_stages
from treadle.parallel.registry import engine_names, get_engine
from treadle.train.checkpoint import CheckpointConfig
from treadle.train.data import DataConfig, validate_data_config
from treadle.train.loggers import LoggingConfig, check_logging_config
from treadle.train.run_dir import check_resume_config

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
NAN_POLICIES = ("skip", "abort")
WANDB_MODES = ("offline", "online", "disabled")
DEFAULT_FAMILY = "llama"


@dataclass(kw_only=True)
class RunConfig:
    name: str = "default"
    dir: str = "runs/${run.name}"
    device: str = "auto"  # auto (cuda when available) | cpu | cuda


@dataclass(kw_only=True)
class TrainerConfig:
    max_steps: int = 1000
    seed: int = 0
    micro_batch_size: int = 8  # sequences per forward/backward on one data-parallel rank
    global_batch_size: int = 8  # sequences per optimizer step over all data-parallel ranks
    eval_every: int = 0  # 0 = evaluate only at the end
    # held-out sequences per evaluation, in micro-batches: eval_batches × micro_batch_size in all, the same on
    # every layout (dealt out over the data-parallel ranks)
    eval_batches: int = 8
    nan_policy: str = "skip"  # skip: drop the update of a step whose gradients are not finite; abort: stop
    max_consecutive_skips: int = 5  # abort after this many skipped steps in a row

    def grad_accum(self, dp_size: int) -> int:
        return self.global_batch_size // (self.micro_batch_size * dp_size)


@dataclass(kw_only=True)
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    # A family's config dataclass (`ModelSpec.config_cls`): each file of configs/model/ starts from its family's
    # schema (`defaults: [<family>_schema]`), registered below, so its keys and types are checked.
    model: Any = MISSING
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    fp8: Float8Config = field(default_factory=Float8Config)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def register_configs() -> None:
    store = ConfigStore.instance()
    store.store(name="treadle_schema", node=TrainConfig)
    for spec in load_builtin_families():
        store.store(group="model", name=f"{spec.name}_schema", node=spec.config_cls)


def structured(raw: DictConfig | dict) -> DictConfig:
    """`raw` (e.g. a run's saved config.yaml) merged into the typed schema, its model into its family's
    config class (`model.name`, llama when absent)."""
    schema = OmegaConf.structured(TrainConfig)
    name = OmegaConf.select(OmegaConf.create(raw), "model.name", default=DEFAULT_FAMILY)
    schema.model = OmegaConf.structured(get_model_spec(name).config_cls)
    return OmegaConf.merge(schema, raw)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def validate(cfg: TrainConfig, world_size: int) -> ParallelDims:
    """Check every rule that spans components; returns the validated topology. Raises ValueError naming the
    keys and the fix. Runs on every rank before any process group is created.

    With `model.pretrained` set, the model's shape fields are replaced by the directory's config.json first.
    """
    if cfg.model.pretrained is not None:
        cfg.model = model_config_from_hf(cfg.model)
    spec = get_model_spec(cfg.model.name)
    _check(
        isinstance(cfg.model, spec.config_cls),
        f"model: a {type(cfg.model).__name__} does not configure model.name={cfg.model.name}, whose config is "
        f"{spec.config_cls.__name__}; fix: choose a model= file of that family, or set model.name",
    )
    cfg.peft.validate(spec.linear_names(), spec.lora_refused)
    cfg.memory.validate()
    cfg.fp8.validate()
    build_ops(cfg.kernels)
    dims = ParallelDims.from_config(cfg.parallel, world_size)
    spec.validate(cfg.model, dims, seq_len=cfg.data.seq_len, cp_variant=cfg.parallel.cp_variant)
    _validate_parallel(cfg, dims)
    _validate_pipeline(cfg, dims)
    _validate_memory(cfg, dims)
    _validate_training(cfg, dims)
    _validate_run_dirs(cfg)
    check_resume_config(cfg)
    return dims


def _validate_memory(cfg: TrainConfig, dims: ParallelDims) -> None:
    """FP8 linears, activation compression/offload and parameter offload against the layout."""
    _check(
        not cfg.fp8.enabled or dims.tp == 1 or cfg.fp8.backend == "treadle",
        f"fp8.backend=torchao is not supported with parallel.tp={dims.tp} (torchao's FP8 tensor-parallel "
        f"styles are not wired up); fix: set fp8.backend=treadle, or parallel.tp=1",
    )
    _check(
        cfg.memory.param_offload == "none" or cfg.parallel.engine == "native",
        f"memory.param_offload={cfg.memory.param_offload} is FSDP2's CPUOffloadPolicy, in the native engine "
        f"only; fix: set parallel.engine=native",
    )
    if not _runs_on_cuda(cfg.run.device) and cfg.memory.param_offload != "none":
        warnings.warn(
            "memory.param_offload=cpu has no effect on a CPU run: parameters already live in host memory",
            stacklevel=3,
        )


def _validate_parallel(cfg: TrainConfig, dims: ParallelDims) -> None:
    """Degrees against the sequence length, the device and the engine (the model's shapes: its spec)."""
    _check(
        cfg.data.seq_len % (2 * dims.cp) == 0 or dims.cp == 1,
        f"data.seq_len={cfg.data.seq_len} must be divisible by 2 × parallel.cp = {2 * dims.cp} "
        f"(load-balanced causal sharding splits each sequence into 2·cp chunks)",
    )
    if cfg.parallel.async_tp:
        _check(
            _runs_on_cuda(cfg.run.device),
            "parallel.async_tp=true needs CUDA GPUs (it exchanges matmul chunks through GPU symmetric memory) and "
            "cannot run on the CPU; fix: set parallel.async_tp=false",
        )
        _check(
            cfg.parallel.compile and cfg.parallel.sequence_parallel,
            "parallel.async_tp=true is an Inductor pass over sequence-parallel TP: it needs parallel.compile=true "
            "and parallel.sequence_parallel=true; fix: set both, or parallel.async_tp=false",
        )
        if dims.tp == 1:
            warnings.warn("parallel.async_tp=true has no effect with parallel.tp=1", stacklevel=3)
    if cfg.parallel.tp_batch_overlap:
        _check(
            not cfg.parallel.sequence_parallel,
            "parallel.tp_batch_overlap=true overlaps the all-reduces of tensor parallelism without sequence "
            "parallelism (with it, each sublayer's all-gather sits in front of its own GEMMs); fix: set "
            "parallel.sequence_parallel=false, or parallel.tp_batch_overlap=false",
        )
        _check(
            cfg.trainer.micro_batch_size >= 2,
            f"parallel.tp_batch_overlap=true splits each micro-batch in two, but trainer.micro_batch_size="
            f"{cfg.trainer.micro_batch_size}; fix: trainer.micro_batch_size >= 2, or parallel.tp_batch_overlap=false",
        )
        if dims.tp == 1:
            warnings.warn("parallel.tp_batch_overlap=true has no effect with parallel.tp=1", stacklevel=3)
    if cfg.parallel.tp_comm_reorder and (dims.tp == 1 or not cfg.parallel.compile):
        warnings.warn(
            "parallel.tp_comm_reorder=true reorders compiled TP blocks: it has no effect without parallel.tp > 1 "
            "and parallel.compile=true",
            stacklevel=3,
        )
    if cfg.parallel.tp_comm_max_ctas:
        _check(
            cfg.parallel.tp_comm_max_ctas > 0
            and _runs_on_cuda(cfg.run.device)
            and cfg.parallel.backend in ("auto", "nccl"),
            f"parallel.tp_comm_max_ctas={cfg.parallel.tp_comm_max_ctas} limits NCCL's thread blocks for the TP "
            "group: it needs a positive count and NCCL (GPUs, parallel.backend auto or nccl); fix: set "
            "parallel.tp_comm_max_ctas=0",
        )
        if dims.tp == 1:
            warnings.warn("parallel.tp_comm_max_ctas has no effect with parallel.tp=1", stacklevel=3)
    _check(
        dims.tp == 1
        or cfg.peft.method == "none"
        or not (cfg.peft.use_dora or cfg.peft.quantize_base != "none"),
        f"parallel.tp={dims.tp} with peft.use_dora={cfg.peft.use_dora} / peft.quantize_base="
        f"{cfg.peft.quantize_base}: DoRA and NF4 bases are not tensor-parallel; fix: plain LoRA under tensor "
        "parallelism, or parallel.tp=1 (FSDP still shards the frozen base over all ranks)",
    )
    _check(
        cfg.parallel.engine in engine_names(),
        f"parallel.engine={cfg.parallel.engine!r} is not one of {engine_names()}",
    )
    engine = get_engine(cfg.parallel.engine)
    if engine.validate is not None:
        engine.validate(cfg.parallel, dims)
    if cfg.parallel.engine == "deepspeed":
        _check(
            cfg.peft.method == "none" and not cfg.fp8.enabled,
            "parallel.engine=deepspeed runs full-parameter bf16 training; peft adapters and fp8 linears are "
            "native-engine plans; fix: parallel.engine=native, or peft=none fp8=none",
        )
        _validate_deepspeed_overrides(cfg, dims)
    _check(
        cfg.parallel.cp_variant in CP_VARIANTS,
        f"parallel.cp_variant={cfg.parallel.cp_variant!r} is not one of {CP_VARIANTS}",
    )
    _check(
        dims.tp == 1 or not cfg.parallel.sequence_parallel or cfg.data.seq_len % dims.tp == 0,
        f"data.seq_len={cfg.data.seq_len} must be divisible by parallel.tp={dims.tp} with sequence parallelism; "
        f"fix: change data.seq_len or set parallel.sequence_parallel=false",
    )


def _validate_pipeline(cfg: TrainConfig, dims: ParallelDims) -> None:
    """The stage layout and micro-batch count `parallel.pp*` ask for (parallel/pipeline.py raises)."""
    if dims.pp == 1:
        p = cfg.parallel
        if p.pp_virtual_stages != 1 or p.pp_layers_per_stage or p.pp_split or p.pp_microbatches:
            warnings.warn(
                "parallel.pp_virtual_stages/pp_layers_per_stage/pp_split/pp_microbatches have no effect with "
                "parallel.pp=1",
                stacklevel=3,
            )
        return
    per_step = cfg.trainer.micro_batch_size * dims.dp_size
    if cfg.trainer.global_batch_size % per_step:
        return  # _validate_training names the batch sizes
    gloo = cfg.parallel.backend == "gloo" or (
        cfg.parallel.backend == "auto" and not _runs_on_cuda(cfg.run.device)
    )
    check_schedule_backend(cfg.parallel.pp_schedule, gloo)
    grad_accum = cfg.trainer.grad_accum(dims.dp_size)
    num_microbatches = count_microbatches(cfg.parallel, cfg.trainer.micro_batch_size, grad_accum)
    plan_stages(
        cfg.parallel, dims.pp, num_blocks(get_model_spec(cfg.model.name), cfg.model), num_microbatches
    )


def _validate_deepspeed_overrides(cfg: TrainConfig, dims: ParallelDims) -> None:
    """Generate the DeepSpeed config once here, so that a conflicting override fails before any process
    group exists (the engine generates the same dict again from the same inputs)."""
    trainer, parallel = cfg.trainer, cfg.parallel
    device = torch.device("cuda" if _runs_on_cuda(cfg.run.device) else "cpu")
    per_step = trainer.micro_batch_size * dims.dp_size
    build_ds_config(
        parallel.deepspeed,
        micro_batch_size=trainer.micro_batch_size,
        grad_accum=max(1, trainer.global_batch_size // max(per_step, 1)),
        dp_size=dims.dp_size,
        clip_grad_norm=cfg.optim.clip_grad_norm,
        param_dtype=dtype_name(resolve_dtype(parallel.param_dtype, device, "parallel.param_dtype")),
        reduce_dtype=dtype_name(resolve_dtype(parallel.reduce_dtype, device, "parallel.reduce_dtype")),
    )


def _runs_on_cuda(device: str) -> bool:
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


def _validate_training(cfg: TrainConfig, dims: ParallelDims) -> None:
    """Batch arithmetic, data, schedule, logging and checkpoint settings."""
    trainer = cfg.trainer
    _check(trainer.max_steps >= 1, f"trainer.max_steps={trainer.max_steps} must be >= 1")
    _check(
        math.isfinite(cfg.optim.lr) and cfg.optim.lr > 0,
        f"optim.lr={cfg.optim.lr} must be a positive number; fix: set optim.lr, e.g. optim.lr=3e-4",
    )
    _check(trainer.micro_batch_size >= 1, f"trainer.micro_batch_size={trainer.micro_batch_size} must be >= 1")
    per_step = trainer.micro_batch_size * dims.dp_size
    _check(
        trainer.global_batch_size % per_step == 0 and trainer.global_batch_size >= per_step,
        f"trainer.global_batch_size={trainer.global_batch_size} must be a positive multiple of "
        f"trainer.micro_batch_size × data-parallel size = {trainer.micro_batch_size}×{dims.dp_size} = "
        f"{per_step} (data-parallel size = parallel.dp_replicate × parallel.dp_shard); fix: set "
        f"trainer.global_batch_size to a multiple of {per_step} or change trainer.micro_batch_size",
    )
    _check(
        trainer.nan_policy in NAN_POLICIES,
        f"trainer.nan_policy={trainer.nan_policy!r} is not one of {NAN_POLICIES}",
    )
    _check(
        cfg.optim.schedule.name in SCHEDULES,
        f"optim.schedule.name={cfg.optim.schedule.name!r} is not one of {SCHEDULES}",
    )
    validate_data_config(cfg.data)
    if cfg.data.source in ("tokens", "hf", "chat"):
        _check(
            Path(cfg.data.path).expanduser().exists(),
            f"data.path={cfg.data.path} does not exist; fix: point data.path at the "
            + (
                "token .bin file (see launch/prepare_data.py)" if cfg.data.source == "tokens" else "documents"
            ),
        )
    _check(
        cfg.logging.wandb.mode in WANDB_MODES,
        f"logging.wandb.mode={cfg.logging.wandb.mode!r} is not one of {WANDB_MODES}",
    )
    _check(cfg.logging.every >= 1, f"logging.every={cfg.logging.every} must be >= 1")
    check_logging_config(cfg.logging)  # e.g. logging.tensorboard=true without tensorboard, before any work
    _check(cfg.checkpoint.every >= 0, f"checkpoint.every={cfg.checkpoint.every} must be >= 0 (0 = off)")
    _check(
        cfg.run.device in ("auto", "cpu", "cuda"), f"run.device={cfg.run.device!r} is not auto, cpu or cuda"
    )
    if cfg.optim.schedule.warmup_steps >= trainer.max_steps:
        warnings.warn(
            f"optim.schedule.warmup_steps={cfg.optim.schedule.warmup_steps} >= trainer.max_steps="
            f"{trainer.max_steps}: the run never leaves warmup",
            stacklevel=3,
        )


def _validate_run_dirs(cfg: TrainConfig) -> None:
    """run.dir and checkpoint.dir are directories this process can create or write: checked before any work,
    not at the first save."""
    for key, value in (("run.dir", cfg.run.dir), ("checkpoint.dir", cfg.checkpoint.dir)):
        path = Path(value).expanduser()
        existing = next(p for p in (path, *path.parents) if p.exists())
        _check(
            existing.is_dir(),
            f"{key}={value}: {existing} is a file, not a directory; fix: point {key} at a directory (or remove "
            f"the file)",
        )
        _check(
            os.access(existing, os.W_OK | os.X_OK),
            f"{key}={value}: {existing} is not writable by this user; fix: point {key} (or run.name) at a "
            f"writable place, or change the directory's permissions",
        )


def load_config(overrides: list[str] | None = None) -> TrainConfig:
    """Compose `configs/train.yaml` with Hydra overrides, outside `@hydra.main` (tests, benchmarks, notebooks)."""
    from hydra import compose, initialize_config_dir

    from treadle.train.config_keys import check_known_keys, check_overrides

    register_configs()
    check_overrides(list(overrides or []), CONFIG_DIR)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        raw = compose(config_name="train", overrides=list(overrides or []))
    check_known_keys(raw)
    return OmegaConf.to_object(raw)
