"""Hugging Face checkpoints in and out (`config.json` + safetensors), for every family: each family's spec has an
adapter (its architectures, config.json fields and parameter names; e.g. models/llama/hf.py), and this file
does the rest. A directory's `architectures` field picks the family that reads it.

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
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor

from treadle.models.export_files import (
    absolute_base,
    save_safetensors,
    special_token_ids,
    write_generation_config,
)
from treadle.models.init import canonical_name
from treadle.models.lora import (
    LoRALinear,
    PeftConfig,
    adapted_names,
    adapter_state,
    merged_weight,
    peft_adapter_config,
)
from treadle.models.spec import HFAdapter, HFPart, get_model_spec, load_builtin_families

logger = logging.getLogger(__name__)

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


def hf_error(path: Path, field: str, problem: str, fix: str) -> ValueError:
    return ValueError(f"model.pretrained: {path}: {field}: {problem}; {fix}")


def _adapters() -> dict[str, HFAdapter]:
    """Architecture name → the adapter of the family that reads it, over every registered family."""
    return {
        arch: spec.hf_adapter
        for spec in load_builtin_families()
        if spec.hf_adapter is not None
        for arch in spec.hf_adapter.architectures
    }


def hf_adapter_for(architecture: str) -> HFAdapter:
    """The adapter that reads and writes `architecture`, with that architecture's tensor names."""
    adapters = _adapters()
    if architecture not in adapters:
        raise ValueError(f"no model family reads {architecture!r}; supported: {', '.join(adapters)}")
    return adapters[architecture].for_architecture(architecture)


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
        raise hf_error(
            path, "(file)", f"not valid JSON ({e})", "re-download or regenerate config.json"
        ) from e
    architectures = config.get("architectures") or []
    supported = _adapters()
    if not architectures or architectures[0] not in supported:
        raise hf_error(
            path,
            "architectures",
            f"{architectures or 'missing'} is not a supported architecture",
            f"supported: {', '.join(supported)}",
        )
    return config


def model_config_from_hf(base: Any) -> Any:
    """`base` (a family's model config with `pretrained` set) with every shape field taken from the directory's
    config.json, by the adapter of the family that reads its architecture."""
    assert base.pretrained is not None
    config = read_hf_config(base.pretrained)
    adapter = hf_adapter_for(config["architectures"][0])
    return adapter.config_from_hf(base, config, Path(base.pretrained).expanduser() / "config.json")


def adapter_of(cfg: Any) -> HFAdapter:
    """The Hugging Face adapter of the family `cfg` (a model config) belongs to."""
    adapter = get_model_spec(cfg.name).hf_adapter
    if adapter is None:
        raise ValueError(
            f"model.name={cfg.name} has no Hugging Face adapter: it cannot load or export HF weights"
        )
    return adapter


def architecture_of(cfg: Any) -> str:
    """The architecture to export as: the pretrained model's own, else what the family picks for the shape."""
    if cfg.pretrained is not None:
        return read_hf_config(cfg.pretrained)["architectures"][0]
    return adapter_of(cfg).architecture_of(cfg)


def hf_config_from_model(cfg: Any, architecture: str, dtype: torch.dtype) -> dict[str, Any]:
    """A config.json for `cfg`, written as `architecture`."""
    return hf_adapter_for(architecture).config_to_hf(cfg, architecture, dtype)


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
                raise hf_error(index, "weight_map", f"unreadable ({e})", "re-download the index file") from e
            missing = sorted({f for f in weight_map.values() if not (self.dir / f).is_file()})
            if missing:
                raise hf_error(index, "weight_map", f"names shard(s) missing from the directory: {missing}",
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

    def _view(self, key: str) -> Any:
        file = self.files[key]
        if file not in self._open:
            self._open[file] = _safe_open(file)
        return self._open[file].get_slice(key)

    def stored_shape(self, key: str) -> tuple[int, ...] | None:
        """The shape `key` is stored with (read from the file header, no data), None if it is absent."""
        return tuple(self._view(key).get_shape()) if key in self.files else None

    def slice(self, key: str, shape: Sequence[int], index: tuple[slice, ...]) -> torch.Tensor:
        """`key[index]`, after checking that the stored tensor has `shape`."""
        if key not in self.files:
            raise ValueError(
                f"model.pretrained={self.dir}: tensor {key!r} is missing from the checkpoint; the config.json does "
                "not match the weights, or shards are incomplete"
            )
        file = self.files[key]
        view = self._view(key)
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


def _plan(
    adapter: HFAdapter, model: nn.Module, checkpoint: SafetensorsCheckpoint
) -> list[tuple[torch.Tensor, list[HFPart]]]:
    """Every parameter (but adapters) with its checkpoint parts, decided before any read so that a checkpoint
    that does not fit the config (e.g. another expert count) fails on the first mismatch the adapter names."""
    plan = []
    for name, param in model.named_parameters():
        if ".lora_" in name:
            continue
        try:
            parts = adapter.hf_parts(canonical_name(name), tuple(param.shape), checkpoint.stored_shape)
        except ValueError as e:
            raise ValueError(f"model.pretrained={checkpoint.dir}: {e}") from e
        rows = sorted(p.row for p in parts if p.row is not None)
        assert (len(parts) == 1 and not rows) or rows == list(range(param.shape[0])), (name, parts)
        plan.append((param, parts))
    return plan


def _read_parts(
    checkpoint: SafetensorsCheckpoint, parts: list[HFPart], index: tuple[slice, ...], local: torch.Tensor
) -> None:
    """Fill `local` (the region `index` of a parameter's full tensor) from its parts: a stacked parameter's
    rank reads only the rows (experts) its shard covers."""
    for part in parts:
        region, target = index, local
        if part.row is not None:
            rows = index[0]
            if not rows.start <= part.row < rows.stop:
                continue
            region, target = index[1:], local[part.row - rows.start]
        offsets = part.offsets or (0,) * len(region)
        stored_index = tuple(slice(o + r.start, o + r.stop) for o, r in zip(offsets, region, strict=True))
        target.copy_(checkpoint.slice(part.key, part.shape, stored_index).to(target.dtype))


@torch.no_grad()
def load_hf_weights(model: nn.Module, model_dir: str | Path) -> int:
    """Copy the checkpoint into `model`'s (possibly sharded) parameters in place; returns the number of
    checkpoint tensors used.

    LoRA adapters (which the checkpoint does not have) are left alone; NF4 bases are quantized from the full
    tensor, which every rank reads (they are not sharded).
    """
    adapter = hf_adapter_for(read_hf_config(model_dir)["architectures"][0])
    checkpoint = SafetensorsCheckpoint(model_dir)
    loaded: set[str] = set()
    try:
        for param, parts in _plan(adapter, model, checkpoint):
            local = param.to_local() if isinstance(param, DTensor) else param
            _read_parts(checkpoint, parts, local_index(param), local)
            loaded.update(part.key for part in parts)
        for name, module in model.named_modules():
            if isinstance(module, LoRALinear) and module.quantized:
                key = adapter.hf_name(f"{name}.weight")
                module.set_quantized_base(checkpoint.slice(key, module.base_shape, ()))
                loaded.add(key)
    finally:
        checkpoint.close()
    unused = [k for k in checkpoint.files if k not in loaded and not adapter.ignored_keys(k)]
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


def write_hf(
    tensors: Iterable[tuple[str, torch.Tensor]],
    cfg: Any,
    out_dir: str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write (our parameter name, full tensor) pairs as a Hugging Face model directory: config.json,
    safetensors shards (+ index) and the tokenizer files of `cfg.pretrained` when there is one."""
    architecture = architecture_of(cfg)
    adapter = hf_adapter_for(architecture)
    writer = ShardWriter(out_dir, max_shard_bytes=max_shard_bytes)
    for name, tensor in tensors:
        for part in adapter.hf_parts(name, tuple(tensor.shape), None):
            assert part.offsets is None, f"{part.key}: an export layout writes whole tensors"
            writer.add(part.key, (tensor if part.row is None else tensor[part.row]).to(dtype))
    config = {**adapter.config_to_hf(cfg, architecture, dtype), **special_token_ids(cfg.pretrained)}
    return writer.finish(config, cfg.pretrained)


def export_hf(
    model: nn.Module,
    cfg: Any,
    out_dir: str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = 5 * 2**30,
) -> Path | None:
    """Write `model` (adapters merged) as a Hugging Face model directory that transformers loads unchanged.

    Every rank must call this (parameters are gathered one at a time); rank 0 writes and returns the directory.
    """
    # Every rank checks that the architecture can express the model (e.g. MoE shared experts) before the first
    # gather: a refusal on rank 0 alone would leave the other ranks waiting in a collective.
    hf_config_from_model(cfg, architecture_of(cfg), dtype)
    tensors = dense_tensors(model)
    if dist.is_initialized() and dist.get_rank() != 0:
        for _ in tensors:  # take part in every gather
            pass
        return None
    return write_hf(tensors, cfg, out_dir, dtype=dtype, max_shard_bytes=max_shard_bytes)


def export_peft(
    model: nn.Module, model_cfg: Any, cfg: PeftConfig, out_dir: str | Path, *, base_model: str | None
) -> Path | None:
    """Write the adapters as a PEFT directory (adapter_config.json + adapter_model.safetensors), atomically.

    Every rank must call this (adapters are gathered); rank 0 writes and returns the directory.
    """
    hf_name = hf_adapter_for(architecture_of(model_cfg)).hf_name
    state = adapter_state(model)
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    out_dir = Path(out_dir).expanduser()
    tmp = out_dir.with_name(f".{out_dir.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir(parents=True)
    tensors = {f"base_model.model.{hf_name(name)}": t.contiguous() for name, t in state.items()}
    save_safetensors(tensors, tmp / "adapter_model.safetensors")
    config = peft_adapter_config(cfg, absolute_base(base_model), adapted_names(model))
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
