"""Export a treadle checkpoint to Hugging Face: merged weights (config.json + safetensors) or a PEFT adapter.

    python launch/export.py --run runs/my_lora --format peft --out exports/adapter
    python launch/export.py --run runs/my_lora --format hf --out exports/merged        # adapters merged
    python launch/export.py --run runs/my_sft --checkpoint runs/my_sft/checkpoints/step_00000500 --format hf ...

The run directory's `config.yaml` rebuilds the model (and reads the base from `model.pretrained` for adapter
runs); the checkpoint (the newest complete one unless `--checkpoint` is given) is loaded into one process on
the CPU, whatever layout it was saved from (DCP reshards on load).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf

from treadle.models.hf import export_hf, export_peft
from treadle.parallel.fsdp import DTYPES
from treadle.train.build import build_model, engine_for, process_group, weight_loader
from treadle.train.checkpoint import CheckpointManager
from treadle.train.config import TrainConfig, structured, validate


def load_run_config(run_dir: Path) -> TrainConfig:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ValueError(f"--run {run_dir}: no config.yaml there; pass the run.dir of a treadle run")
    cfg: TrainConfig = OmegaConf.to_object(structured(OmegaConf.load(path)))
    # One CPU process: any saved layout is resharded into it.
    cfg.run.device = "cpu"
    # The native engine loads the DCP checkpoint at any layout (DeepSpeed runs: launch/convert_deepspeed.py).
    cfg.parallel.engine = "native"
    cfg.parallel.dp_replicate, cfg.parallel.dp_shard, cfg.parallel.tp, cfg.parallel.cp = 1, -1, 1, 1
    cfg.parallel.compile, cfg.parallel.async_tp, cfg.parallel.param_dtype = False, False, "fp32"
    cfg.trainer.micro_batch_size = cfg.trainer.global_batch_size = 1
    return cfg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", type=Path, required=True, help="the run directory (holds config.yaml)")
    parser.add_argument("--checkpoint", type=Path, help="a step directory; default: the run's newest")
    parser.add_argument("--format", choices=("hf", "peft"), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="hf: the stored dtype")
    args = parser.parse_args(argv)
    try:
        cfg = load_run_config(args.run)
        dims = validate(cfg, world_size=1)
        if args.format == "peft" and cfg.peft.method == "none":
            raise ValueError(f"--format peft: run {args.run} trained without adapters (peft.method=none)")
    except ValueError as err:
        sys.exit(f"export error: {err}")
    device = torch.device("cpu")
    with process_group(device, "gloo"):
        dims.build_mesh("cpu")
        spec, model = build_model(cfg)
        engine = engine_for(cfg, dims, device)
        engine.prepare(spec, cfg.model, model, cfg.optim, weight_loader(cfg))
        base = {"base_model": cfg.model.pretrained} if cfg.peft.method != "none" else {}
        manager = CheckpointManager(cfg.checkpoint, rank=0, world_size=1, metadata=base)
        if args.checkpoint is not None:
            manager.cfg.resume = str(args.checkpoint)
        elif manager.cfg.resume == "none":
            manager.cfg.resume = "auto"
        path = manager.resolve_resume()
        if path is None:
            sys.exit(f"export error: no complete checkpoint under {manager.root}; pass --checkpoint")
        dcp.load({"engine": engine}, checkpoint_id=str(path))
        if args.format == "peft":
            out = export_peft(model, cfg.model, cfg.peft, args.out, base_model=cfg.model.pretrained)
        else:
            out = export_hf(model, cfg.model, args.out, dtype=DTYPES[args.dtype])
    print(f"exported {path} as {args.format} to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
