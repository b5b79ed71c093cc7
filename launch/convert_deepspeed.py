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
- `hf`: `config.json` (LlamaForCausalLM) + `model.safetensors`. Our Llama already uses Hugging Face's module
  names and its RoPE layout (rotate-half), so the mapping is a `model.` prefix, and no lm_head when tied.
"""

from __future__ import annotations

import argparse
import json
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
    state = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=tag)
    return {name: tensor.contiguous() for name, tensor in state.items()}


def to_dcp(state: dict[str, torch.Tensor], out: Path) -> None:
    import torch.distributed.checkpoint as dcp

    out.mkdir(parents=True, exist_ok=True)
    # No process group: DCP writes a single-rank checkpoint.
    dcp.save({"engine": {"model": state}}, checkpoint_id=str(out), no_dist=True)


def hf_config(model_cfg: dict) -> dict:
    """LlamaForCausalLM's config.json from our `model` config section."""
    dim, num_heads = model_cfg["dim"], model_cfg["num_heads"]
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": dim,
        "intermediate_size": model_cfg["ffn_dim"],
        "num_hidden_layers": model_cfg["num_layers"],
        "num_attention_heads": num_heads,
        "num_key_value_heads": model_cfg["num_kv_heads"],
        "head_dim": dim // num_heads,
        "vocab_size": model_cfg["vocab_size"],
        "rms_norm_eps": model_cfg["norm_eps"],
        "rope_theta": model_cfg["rope_theta"],
        "max_position_embeddings": model_cfg["max_seq_len"],
        "tie_word_embeddings": model_cfg["tie_embeddings"],
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": model_cfg["init_std"],
    }
    scaling = model_cfg.get("rope_scaling")
    if scaling:
        config["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": scaling["factor"],
            "low_freq_factor": scaling["low_freq_factor"],
            "high_freq_factor": scaling["high_freq_factor"],
            "original_max_position_embeddings": scaling["original_max_seq_len"],
        }
    return config


def hf_state_dict(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {(name if name == "lm_head.weight" else f"model.{name}"): t.to(dtype) for name, t in state.items()}


def to_hf(state: dict[str, torch.Tensor], model_cfg: dict, out: Path, dtype: torch.dtype) -> None:
    from safetensors.torch import save_file

    if model_cfg.get("ffn_dim") is None:
        raise ValueError(
            "model.ffn_dim is null in the config; fix: pass a config.yaml with model.ffn_dim set"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_config(model_cfg), indent=2))
    save_file(hf_state_dict(state, dtype), str(out / "model.safetensors"), metadata={"format": "pt"})


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
        from omegaconf import OmegaConf

        model_cfg = OmegaConf.to_container(OmegaConf.load(args.config).model, resolve=True)
        to_hf(state, model_cfg, args.out, DTYPES[args.dtype])
    print(
        f"wrote {args.out} ({len(state)} tensors, {sum(t.numel() for t in state.values()) / 1e6:.2f}M params)"
    )


if __name__ == "__main__":
    main()
