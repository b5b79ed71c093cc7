"""Hugging Face checkpoints in and out: `config.json` + safetensors for Llama (2/3/3.1), Mistral, Qwen2 and Qwen3.

Our Llama uses Hugging Face's parameter names under the `model.` prefix (`layers.3.self_attn.q_proj.weight` is
`model.layers.3.self_attn.q_proj.weight`), the same rotate-half RoPE layout and the same GQA head order, so the
adapter is a renaming: no permutation of q/k rows is needed.

Loading runs after the parallel plans, on every rank: each parameter, sharded or not, reads only the slice of the
checkpoint tensor that its local shard covers (`safe_open(...).get_slice` maps the file and copies just those
rows), so no rank ever holds a full copy of the model. Export gathers one parameter at a time (a collective on
every rank, in the same order) and rank 0 streams them into safetensors shards of bounded size.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor

from treadle.models.export_files import save_safetensors, special_token_ids, write_generation_config
from treadle.models.init import canonical_name
from treadle.models.llama import ModelConfig, RopeScalingConfig
from treadle.models.lora import LoRALinear, merged_weight

logger = logging.getLogger(__name__)

# Hugging Face architecture name → (model_type, attention q/k/v bias, per-head q/k RMSNorm).
ARCHITECTURES: dict[str, tuple[str, bool, bool]] = {
    "LlamaForCausalLM": ("llama", False, False),
    "MistralForCausalLM": ("mistral", False, False),
    "Qwen2ForCausalLM": ("qwen2", True, False),
    "Qwen3ForCausalLM": ("qwen3", False, True),
}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Files copied along with exported weights so that the export directory is a complete model directory.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "tokenizer.model",
)


def _fail(path: Path, field: str, problem: str, fix: str) -> ValueError:
    return ValueError(f"model.pretrained: {path}: {field}: {problem}; {fix}")


def read_hf_config(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir).expanduser() / "config.json"
    if not path.is_file():
        raise ValueError(
            f"model.pretrained={model_dir}: no config.json there; point model.pretrained at a local Hugging Face "
            "model directory (config.json + *.safetensors)"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise _fail(path, "(file)", f"not valid JSON ({e})", "re-download or regenerate config.json") from e
    architectures = config.get("architectures") or []
    if not architectures or architectures[0] not in ARCHITECTURES:
        raise _fail(
            path,
            "architectures",
            f"{architectures or 'missing'} is not a supported architecture",
            f"supported: {', '.join(ARCHITECTURES)}",
        )
    return config


def _rope(config: dict[str, Any], path: Path) -> tuple[float, RopeScalingConfig | None]:
    """RoPE base and scaling from either layout: transformers 5 (`rope_parameters`) or 4 (`rope_theta` +
    `rope_scaling`)."""
    params = config.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    scaling = config.get("rope_scaling") or (
        params if params.get("rope_type", "default") != "default" else None
    )
    if not scaling:
        return theta, None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        field = "rope_scaling" if config.get("rope_scaling") else "rope_parameters"
        raise _fail(path, field, f"RoPE type {kind!r} is not supported", "supported: default, llama3")
    return theta, RopeScalingConfig(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_seq_len=int(scaling["original_max_position_embeddings"]),
    )


def model_config_from_hf(base: ModelConfig) -> ModelConfig:
    """`base` with every shape field taken from `base.pretrained`'s config.json (init settings kept)."""
    assert base.pretrained is not None
    path = Path(base.pretrained).expanduser() / "config.json"
    config = read_hf_config(base.pretrained)
    _, qkv_bias, qk_norm = ARCHITECTURES[config["architectures"][0]]
    for field, allowed in (
        ("hidden_act", ("silu",)),
        ("attention_bias", (False,)),
        ("mlp_bias", (False,)),
    ):
        if config.get(field, allowed[0]) not in allowed and not (field == "attention_bias" and qkv_bias):
            raise _fail(path, field, f"{config.get(field)!r} is not supported", f"supported: {allowed}")
    if qk_norm and config.get("attention_bias"):
        raise _fail(path, "attention_bias", "true is not supported for Qwen3", "supported: false")
    try:
        theta, scaling = _rope(config, path)
        num_heads = int(config["num_attention_heads"])
        window = config.get("sliding_window") if config.get("use_sliding_window", True) else None
        return replace(
            base,
            name="llama",
            dim=int(config["hidden_size"]),
            num_layers=int(config["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(config.get("num_key_value_heads") or num_heads),
            vocab_size=int(config["vocab_size"]),
            ffn_dim=int(config["intermediate_size"]),
            norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_seq_len=int(config.get("max_position_embeddings", base.max_seq_len)),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_head_dim=config.get("head_dim"),
            qkv_bias=qkv_bias,
            qk_norm=qk_norm,
            sliding_window=int(window) if window else None,
        )
    except KeyError as e:
        raise _fail(path, e.args[0], "missing", "the file is not a complete model config") from e


def hf_config_from_model(cfg: ModelConfig, architecture: str, dtype: torch.dtype) -> dict[str, Any]:
    """A config.json that transformers 4 and 5 both read (v4 spelling: `rope_theta` + `rope_scaling`)."""
    model_type, _, _ = ARCHITECTURES[architecture]
    config: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": model_type,
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.hidden_dim,
        "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if model_type != "qwen2":
        config["mlp_bias"] = False
    if model_type in ("qwen2", "qwen3"):
        config["use_sliding_window"] = False
    if model_type == "mistral":
        config["sliding_window"] = cfg.sliding_window
    if cfg.rope_scaling is not None:
        config["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": cfg.rope_scaling.factor,
            "low_freq_factor": cfg.rope_scaling.low_freq_factor,
            "high_freq_factor": cfg.rope_scaling.high_freq_factor,
            "original_max_position_embeddings": cfg.rope_scaling.original_max_seq_len,
        }
    return config


def hf_name(name: str) -> str:
    """Our (canonical) parameter name → the Hugging Face checkpoint key."""
    name = canonical_name(name)
    return name if name.startswith("lm_head.") else f"model.{name}"


def _safe_open(file: Path) -> Any:
    """`safe_open`, with a truncated or corrupt file (safetensors checks the header against the file size)
    named in the error."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(file, framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise ValueError(
            f"model.pretrained: {file} is not a readable safetensors file ({e}); it is truncated or corrupt: "
            "re-download or re-export it"
        ) from e


class SafetensorsCheckpoint:
    """The tensors of a model directory: one `model.safetensors` or shards listed by an index."""

    def __init__(self, model_dir: str | Path) -> None:
        self.dir = Path(model_dir).expanduser()
        index = self.dir / INDEX_FILE
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError) as e:
                raise _fail(index, "weight_map", f"unreadable ({e})", "re-download the index file") from e
            missing = sorted({f for f in weight_map.values() if not (self.dir / f).is_file()})
            if missing:
                raise _fail(index, "weight_map", f"names shard(s) missing from the directory: {missing}",
                            "download the missing shards")  # fmt: skip
            self.files = {key: self.dir / f for key, f in weight_map.items()}
        elif (self.dir / SINGLE_FILE).is_file():
            with _safe_open(self.dir / SINGLE_FILE) as f:
                self.files = {key: self.dir / SINGLE_FILE for key in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        else:
            raise ValueError(
                f"model.pretrained={model_dir}: found neither {INDEX_FILE} nor {SINGLE_FILE}; point "
                "model.pretrained at a directory with safetensors weights (.bin checkpoints are not read)"
            )
        self._open: dict[Path, Any] = {}

    def slice(self, key: str, shape: torch.Size, index: tuple[slice, ...]) -> torch.Tensor:
        """`key[index]`, after checking that the stored tensor has `shape`."""
        if key not in self.files:
            raise ValueError(
                f"model.pretrained={self.dir}: tensor {key!r} is missing from the checkpoint; the config.json does "
                "not match the weights, or shards are incomplete"
            )
        file = self.files[key]
        if file not in self._open:
            self._open[file] = _safe_open(file)
        view = self._open[file].get_slice(key)
        stored = tuple(view.get_shape())
        if stored != tuple(shape):
            raise ValueError(
                f"model.pretrained: {file}: tensor {key!r} has shape {list(stored)} but the model built from "
                f"config.json expects {list(shape)}; the config.json and the weights disagree"
            )
        return view[index] if index else view[:]

    def close(self) -> None:
        self._open.clear()


def local_index(param: torch.Tensor) -> tuple[slice, ...]:
    """The region of the full tensor that this rank's local shard of `param` holds (all of it if not sharded)."""
    if not isinstance(param, DTensor):
        return tuple(slice(0, n) for n in param.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))


@torch.no_grad()
def load_hf_weights(model: nn.Module, model_dir: str | Path) -> int:
    """Copy the checkpoint into `model`'s (possibly sharded) parameters in place; returns the number loaded.

    LoRA adapters (which the checkpoint does not have) are left alone; NF4 bases are quantized from the full
    tensor, which every rank reads (they are not sharded).
    """
    checkpoint = SafetensorsCheckpoint(model_dir)
    loaded: set[str] = set()
    try:
        for name, param in model.named_parameters():
            if ".lora_" in name:
                continue
            key = hf_name(name)
            index = local_index(param)
            local = param.to_local() if isinstance(param, DTensor) else param
            local.copy_(checkpoint.slice(key, param.shape, index).to(local.dtype))
            loaded.add(key)
        for name, module in model.named_modules():
            if isinstance(module, LoRALinear) and module.quantized:
                key = hf_name(f"{name}.weight")
                module.set_quantized_base(checkpoint.slice(key, module.base_shape, ()))
                loaded.add(key)
    finally:
        checkpoint.close()
    # Checkpoints of tied models may still carry lm_head.weight; old ones carry RoPE buffers.
    unused = [
        k for k in checkpoint.files if k not in loaded and "rotary_emb" not in k and k != "lm_head.weight"
    ]
    if unused:
        logger.warning("model.pretrained: %d checkpoint tensors unused, e.g. %s", len(unused), unused[:3])
    return len(loaded)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on the CPU; a sharded one is gathered (a collective: every rank must call in step)."""
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor.detach()).cpu()


def dense_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(canonical name, full CPU tensor) of `model` as a plain dense model, one parameter at a time: LoRA
    adapters merged into their base weight, NF4 bases dequantized. Every rank must iterate it in step."""
    for module_name, module in model.named_modules():
        if ".lora_" in module_name:
            continue
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, LoRALinear):
            weight = module.dense_base(torch.float32) if module.quantized else _full(module.weight)
            magnitude = module.lora_magnitude_vector
            merged = merged_weight(
                weight,
                _full(module.lora_A.weight),
                _full(module.lora_B.weight),
                None if magnitude is None else _full(magnitude),
                module.scaling,
            )
            yield canonical_name(prefix + "weight"), merged.cpu()
            if module.bias is not None:
                yield canonical_name(prefix + "bias"), _full(module.bias)
            continue
        for attr, param in module.named_parameters(recurse=False):
            yield canonical_name(prefix + attr), _full(param)


class ShardWriter:
    """Rank 0's side of an export: tensors streamed into `model-0000i-of-0000n.safetensors` files of at most
    `max_shard_bytes`, an index, written into a temporary directory that replaces `out_dir` at the end."""

    def __init__(self, out_dir: str | Path, *, max_shard_bytes: int) -> None:
        self.out_dir = Path(out_dir).expanduser()
        self.tmp = self.out_dir.with_name(f".{self.out_dir.name}.{uuid.uuid4().hex[:8]}.tmp")
        self.tmp.mkdir(parents=True)
        self.max_shard_bytes = max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[dict[str, torch.Tensor]] = []
        self.written: list[str] = []
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self.pending[key] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        name = f"part-{len(self.written):05d}.safetensors"
        save_safetensors(self.pending, self.tmp / name)
        self.written.append(name)
        self.weight_map.update(dict.fromkeys(self.pending, name))
        self.pending, self.pending_bytes = {}, 0

    def finish(self, config: dict[str, Any], source_dir: str | Path | None) -> Path:
        if self.pending:
            self._flush()
        total = len(self.written)
        renames = {old: f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i, old in enumerate(self.written)}
        if total == 1:
            renames = {self.written[0]: SINGLE_FILE}
        for old, new in renames.items():
            os.replace(self.tmp / old, self.tmp / new)
        if total > 1:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": {k: renames[v] for k, v in sorted(self.weight_map.items())},
            }
            (self.tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        (self.tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if source_dir is not None:
            for name in TOKENIZER_FILES:
                if (Path(source_dir).expanduser() / name).is_file():
                    shutil.copy2(Path(source_dir).expanduser() / name, self.tmp / name)
        write_generation_config(self.tmp, special_token_ids(source_dir))
        if self.out_dir.exists():
            shutil.rmtree(self.out_dir)
        os.replace(self.tmp, self.out_dir)
        return self.out_dir


def architecture_of(cfg: ModelConfig) -> str:
    """The architecture to export as: the pretrained model's own, else Llama (or Qwen3 with q/k norms)."""
    if cfg.pretrained is not None:
        return read_hf_config(cfg.pretrained)["architectures"][0]
    if cfg.qk_norm:
        return "Qwen3ForCausalLM"
    return "Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"


def write_hf(
    tensors: Iterable[tuple[str, torch.Tensor]],
    cfg: ModelConfig,
    out_dir: str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write (our parameter name, full tensor) pairs as a Hugging Face model directory: config.json,
    safetensors shards (+ index) and the tokenizer files of `cfg.pretrained` when there is one."""
    writer = ShardWriter(out_dir, max_shard_bytes=max_shard_bytes)
    for name, tensor in tensors:
        writer.add(hf_name(name), tensor.to(dtype))
    config = {**hf_config_from_model(cfg, architecture_of(cfg), dtype), **special_token_ids(cfg.pretrained)}
    return writer.finish(config, cfg.pretrained)


def export_hf(
    model: nn.Module,
    cfg: ModelConfig,
    out_dir: str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = 5 * 2**30,
) -> Path | None:
    """Write `model` (adapters merged) as a Hugging Face model directory that transformers loads unchanged.

    Every rank must call this (parameters are gathered one at a time); rank 0 writes and returns the directory.
    """
    tensors = dense_tensors(model)
    if dist.is_initialized() and dist.get_rank() != 0:
        for _ in tensors:  # take part in every gather
            pass
        return None
    return write_hf(tensors, cfg, out_dir, dtype=dtype, max_shard_bytes=max_shard_bytes)
