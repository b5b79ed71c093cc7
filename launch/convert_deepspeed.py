"""Convert a DeepSpeed (ZeRO-1/2/3) checkpoint to our DCP format or to Hugging Face format.

    python launch/convert_deepspeed.py runs/x/checkpoints/step_00001000 --to dcp out/step_00001000_dcp
    python launch/convert_deepspeed.py runs/x/checkpoints/step_00001000 --to hf out/hf \
        --config runs/x/config.yaml [--dtype bf16]

The input is a step directory written with `parallel.engine=deepspeed` (its `deepspeed/` holds DeepSpeed's
files) or a plain DeepSpeed checkpoint directory. The ZeRO partitions of every rank are merged into full fp32
weights with DeepSpeed's `zero_to_fp32` (CPU only, no process group; it needs host memory for the whole model).

- `dcp`: the weights as a DCP checkpoint under the key the native engine uses (`engine.model.<name>`), so
  `dcp.load({"engine": {"model": get_model_state_dict(model)}}, ...)` loads them into a model at any layout.
  Optimizer states are not converted: ZeRO's flat partitions have no per-parameter layout to map.
- `hf`: a Hugging Face model directory written by `treadle.models.hf` (config.json + safetensors), which
  transformers loads unchanged.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

DS_SUBDIR = "deepspeed"  # treadle.parallel.deepspeed_engine.DS_SUBDIR, without importing DeepSpeed's engine
DS_TAG = "zero"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def full_state_dict(path: Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    """Full fp32 weights merged from every rank's ZeRO partition, keyed by our parameter names."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ds_dir = path / DS_SUBDIR if (path / DS_SUBDIR).is_dir() else path
    if tag is None:
        tag = DS_TAG if (ds_dir / DS_TAG).is_dir() else None  # None: DeepSpeed reads its `latest` file
    if not ds_dir.is_dir():
        raise ValueError(f"{path} is neither a DeepSpeed checkpoint nor a step directory with {DS_SUBDIR}/")
    from treadle.models.init import canonical_name

    state = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=tag)
    return {canonical_name(name): tensor.contiguous() for name, tensor in state.items()}


def to_dcp(state: dict[str, torch.Tensor], out: Path) -> None:
    import torch.distributed.checkpoint as dcp

    out.mkdir(parents=True, exist_ok=True)
    # No process group: DCP writes a single-rank checkpoint.
    dcp.save({"engine": {"model": state}}, checkpoint_id=str(out), no_dist=True)


def to_hf(state: dict[str, torch.Tensor], config: Path, out: Path, dtype: torch.dtype) -> None:
    """Through `treadle.models.hf.write_hf`, the same writer as every other Hugging Face export."""
    from omegaconf import OmegaConf

    from treadle.models import get_model_spec
    from treadle.models.hf import write_hf

    saved = OmegaConf.load(config).model
    spec = get_model_spec(saved.name)
    model_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(spec.config_cls), saved))
    write_hf(state.items(), model_cfg, out, dtype=dtype)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="step directory or DeepSpeed checkpoint directory")
    parser.add_argument("--to", choices=("dcp", "hf"), required=True)
    parser.add_argument("out", type=Path)
    parser.add_argument("--tag", default=None, help="DeepSpeed tag (default: zero, else DeepSpeed's latest)")
    parser.add_argument("--config", type=Path, help="the run's config.yaml (needed for --to hf)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bf16", help="HF weights dtype")
    args = parser.parse_args(argv)
    state = full_state_dict(args.checkpoint, args.tag)
    if args.to == "dcp":
        to_dcp(state, args.out)
    else:
        if args.config is None:
            parser.error("--to hf needs --config <run dir>/config.yaml (the model's shape)")
        to_hf(state, args.config, args.out, DTYPES[args.dtype])
    print(
        f"wrote {args.out} ({len(state)} tensors, {sum(t.numel() for t in state.values()) / 1e6:.2f}M params)"
    )


if __name__ == "__main__":
    main()
