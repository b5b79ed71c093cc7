"""Build a run from a validated `TrainConfig`, in the order DESIGN.md gives:
process group → ParallelDims meshes → model on meta → engine (plans, materialise, optimizer) → schedule →
data → checkpoint resume → Trainer."""

from __future__ import annotations

import json
import logging
import os
import socket
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from treadle.models import ModelSpec, get_model_spec
from treadle.models.hf import load_hf_weights
from treadle.models.lora import apply_lora, finish_adapters, init_quantized_bases
from treadle.optim.builder import build_scheduler
from treadle.parallel.dims import ParallelDims
from treadle.parallel.engine import Engine, EngineSetup, WeightLoader
from treadle.parallel.registry import build_engine
from treadle.train.checkpoint import COMPLETE_MARKER, CheckpointManager
from treadle.train.config import TrainConfig
from treadle.train.data import StepLoader, build_datasets, prepare_data
from treadle.train.errors import UserError
from treadle.train.loggers import MetricLogger
from treadle.train.trainer import Trainer

logger = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def select_device(name: str) -> torch.device:
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("run.device=cuda but no CUDA device is visible; fix: run.device=auto or cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


@contextmanager
def process_group(device: torch.device, backend: str):
    """Join (or, for a plain `python` launch, create) the default process group; destroy it on exit.

    A single process still gets a group of one so that every code path (FSDP, DCP) is the same at any scale.
    """
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend=backend, **kwargs)
    try:
        yield
    finally:
        dist.destroy_process_group()


def weight_loader(cfg: TrainConfig) -> WeightLoader | None:
    """What fills the model after its default initialisation: the pretrained weights, and the adapters' own
    set-up (NF4 bases quantized, DoRA magnitudes from the base norms)."""
    if cfg.model.pretrained is None and cfg.peft.method == "none":
        return None

    def load(model: torch.nn.Module) -> None:
        if cfg.model.pretrained is not None:
            try:
                load_hf_weights(model, cfg.model.pretrained)
            except ValueError as e:  # the directory's files, named in the message (models/hf.py)
                raise UserError(str(e)) from e
        else:
            init_quantized_bases(model, cfg.trainer.seed)
        finish_adapters(model)

    return load


def build_model(cfg: TrainConfig) -> tuple[ModelSpec, torch.nn.Module]:
    """The family's spec and its model on the meta device, with adapters when `cfg.peft` asks for them."""
    spec = get_model_spec(cfg.model.name)
    with torch.device("meta"):
        model = spec.build(cfg.model, cfg.kernels)
    if cfg.peft.method == "lora":
        apply_lora(model, cfg.peft, spec.linear_names())
    return spec, model


def engine_for(cfg: TrainConfig, dims: ParallelDims, device: torch.device) -> Engine:
    """The engine `parallel.engine` names, given the configs of what it owns."""
    setup = EngineSetup(
        dims=dims,
        parallel=cfg.parallel,
        memory=cfg.memory,
        kernels=cfg.kernels,
        fp8=cfg.fp8,
        device=device,
        seed=cfg.trainer.seed,
        micro_batch_size=cfg.trainer.micro_batch_size,
        grad_accum=cfg.trainer.grad_accum(dims.dp_size),
        seq_len=cfg.data.seq_len,
    )
    return build_engine(setup)


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def build_trainer(cfg: TrainConfig, dims: ParallelDims, device: torch.device) -> Trainer:
    rank = dist.get_rank()
    dims.build_mesh(device.type, tp_comm_max_ctas=cfg.parallel.tp_comm_max_ctas)
    torch.manual_seed(cfg.trainer.seed)
    run_dir = Path(cfg.run.dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.structured(cfg), run_dir / "config.yaml")

    # The corpus cache is built once per node, then every rank opens it read-only.
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        prepare_data(cfg.data)
    dist.barrier()
    train_data, val_data = build_datasets(cfg.data, vocab_size=cfg.model.vocab_size)

    spec, model = build_model(cfg)
    engine = engine_for(cfg, dims, device)
    model_parts = engine.prepare(spec, cfg.model, model, cfg.optim, weight_loader(cfg))
    scheduler = build_scheduler(engine.optimizer, cfg.optim.schedule, cfg.trainer.max_steps)
    loader = StepLoader(
        train_data,
        global_batch_size=cfg.trainer.global_batch_size,
        micro_batch_size=cfg.trainer.micro_batch_size,
        dp_rank=dims.dp_rank(),
        dp_size=dims.dp_size,
        seed=cfg.trainer.seed,
        shuffle=cfg.data.shuffle,
    )
    # A checkpoint of adapters names the base it adapts (the base itself is not saved again).
    base = {"base_model": cfg.model.pretrained, "peft": cfg.peft.method} if cfg.peft.method != "none" else {}
    checkpointer = CheckpointManager(cfg.checkpoint, rank=rank, world_size=dims.world_size, metadata=base)
    flops_per_token = spec.flops_per_token(cfg.model, cfg.data.seq_len)
    trainer_kwargs = dict(
        engine=engine,
        model_parts=model_parts,
        scheduler=scheduler,
        train_loader=loader,
        val_dataset=val_data,
        dims=dims,
        device=device,
        checkpointer=checkpointer,
        flops_per_token=flops_per_token,
    )
    resume_from = checkpointer.resolve_resume()
    start_step = json.loads((resume_from / COMPLETE_MARKER).read_text())["step"] if resume_from else 0
    metric_logger = MetricLogger(
        cfg.logging,
        run_dir=run_dir,
        rank=rank,
        config_dict=OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True),
        total_steps=cfg.trainer.max_steps,
        start_step=start_step,
    )
    trainer = Trainer(cfg.trainer, metric_logger=metric_logger, **trainer_kwargs)
    if resume_from is not None:
        checkpointer.load(resume_from, trainer.app_state())
    # ZeRO-3 leaves each parameter empty outside forward/backward; ds_numel is its full size.
    # Under PP the parts are this rank's stages; the meta model, left whole by the split, counts every stage.
    params = (
        list(model.parameters()) if dims.pp > 1 else [p for part in model_parts for p in part.parameters()]
    )
    num_params = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    num_trainable = sum(getattr(p, "ds_numel", p.numel()) for p in params if p.requires_grad)
    trainable = f" ({num_trainable / 1e6:.2f}M trainable)" if num_trainable != num_params else ""
    source = f" from {cfg.model.pretrained}" if cfg.model.pretrained else ""
    pipeline = f"pp {dims.pp} × " if dims.pp > 1 else ""
    experts = f" (experts: efsdp {dims.efsdp} × ep {dims.ep})" if dims.ep > 1 else ""
    # The schedule's bubble (parallel/pipeline.py) belongs to this start-up summary of the layout.
    schedule = getattr(engine, "pipeline", None)
    if schedule is not None:
        trainer.metric_logger.message(schedule.describe())
    trainer.metric_logger.message(
        f"model {cfg.model.name}{source}: {num_params / 1e6:.2f}M parameters{trainable}, "
        f"{flops_per_token / 1e9:.3f} GFLOP/token; "
        f"world {dims.world_size} = {pipeline}dp_replicate {dims.dp_replicate} × dp_shard {dims.dp_shard} × "
        f"cp {dims.cp} × tp {dims.tp}{experts}; grad accumulation {cfg.trainer.grad_accum(dims.dp_size)}; device {device}"
        + (f"; resumed from {checkpointer.loaded_from} at step {trainer.step}" if resume_from else "")
    )
    return trainer
