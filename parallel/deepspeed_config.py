"""The DeepSpeed engine's typed config, and the DeepSpeed JSON config generated from it.

There is no hand-written DeepSpeed JSON: every key that our config already decides (batch sizes, gradient
accumulation, clipping, precision, ZeRO stage, offload targets, async I/O sizes) is derived here from the typed
config, so the two cannot disagree. `parallel.deepspeed.overrides` may add any other DeepSpeed key (bucket
sizes, overlap, prefetch, ...); an override that sets a derived key to another value is refused, naming both
keys. This module does not import DeepSpeed, so configs compose and validate without it.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OFFLOAD_TARGETS = ("none", "cpu", "nvme")
ZERO_STAGES = (1, 2, 3)
# DeepSpeed keys owned by our optimizer and schedule (optim/): DeepSpeed must not build a second one.
_OWNED_SECTIONS = {"optimizer": "optim.name", "scheduler": "optim.schedule"}
_DS_DTYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}


@dataclass(kw_only=True)
class DeepSpeedConfig:
    """`parallel.deepspeed`: used when `parallel.engine=deepspeed`."""

    zero_stage: int = 3  # 1: optimizer states sharded; 2: + gradients; 3: + parameters (ZeRO §5)
    offload_optimizer: str = "none"  # none | cpu (ZeRO-Offload, CPU Adam) | nvme (ZeRO-Infinity)
    offload_param: str = "none"  # none | cpu | nvme; ZeRO-3 only
    nvme_path: str = ""  # swap directory for nvme offload (a local SSD); must exist and be writable
    pin_memory: bool = True  # page-locked host buffers for offload transfers (CUDA only)
    # ZeRO-Infinity swap buffers: parameters are swapped through `param_buffer_count` buffers of
    # `param_buffer_size` elements each (at least the largest parameter); optimizer states through
    # `optimizer_buffer_count` buffers.
    param_buffer_count: int = 5
    param_buffer_size: int = 100_000_000
    optimizer_buffer_count: int = 4
    # Linux async I/O (libaio) for the swaps: bytes per request, requests in flight, worker threads.
    aio_block_size: int = 1_048_576
    aio_queue_depth: int = 8
    aio_thread_count: int = 1
    aio_single_submit: bool = False
    aio_overlap_events: bool = True
    # Extra DeepSpeed config keys merged over the generated config; a key that the typed config decides may
    # only repeat the derived value (e.g. {"zero_optimization": {"reduce_bucket_size": 5e8}}).
    overrides: dict[str, Any] = field(default_factory=dict)


def validate_deepspeed(cfg: DeepSpeedConfig, *, tp: int, cp: int, dp_replicate: int) -> None:
    """Rules of the DeepSpeed engine that need no process group; raises ValueError naming key and fix."""
    if cfg.zero_stage not in ZERO_STAGES:
        raise ValueError(f"parallel.deepspeed.zero_stage={cfg.zero_stage} is not one of {ZERO_STAGES}")
    for key in ("offload_optimizer", "offload_param"):
        if getattr(cfg, key) not in OFFLOAD_TARGETS:
            raise ValueError(
                f"parallel.deepspeed.{key}={getattr(cfg, key)!r} is not one of {OFFLOAD_TARGETS}"
            )
    if cfg.offload_param != "none" and cfg.zero_stage != 3:
        raise ValueError(
            f"parallel.deepspeed.offload_param={cfg.offload_param} needs parameters partitioned (ZeRO-3), but "
            f"parallel.deepspeed.zero_stage={cfg.zero_stage}; fix: set parallel.deepspeed.zero_stage=3 or "
            f"parallel.deepspeed.offload_param=none"
        )
    if cfg.offload_optimizer == "nvme" and cfg.zero_stage != 3:
        raise ValueError(
            f"parallel.deepspeed.offload_optimizer=nvme is ZeRO-Infinity, which needs ZeRO-3, but "
            f"parallel.deepspeed.zero_stage={cfg.zero_stage}; fix: set zero_stage=3 or offload_optimizer=cpu"
        )
    if tp > 1 or cp > 1 or dp_replicate > 1:
        raise ValueError(
            f"parallel.engine=deepspeed shards over plain data parallelism only, but parallel.tp={tp}, "
            f"parallel.cp={cp}, parallel.dp_replicate={dp_replicate}; fix: set them to 1 or use "
            f"parallel.engine=native"
        )
    if "nvme" in (cfg.offload_optimizer, cfg.offload_param):
        check_swap_dir(cfg.nvme_path)
    if cfg.offload_optimizer == "nvme":
        # Measured in tests/distributed/test_deepspeed.py with DeepSpeed 0.19.8.
        warnings.warn(
            "parallel.deepspeed.offload_optimizer=nvme: DeepSpeed 0.19.8 does not save the NVMe-swapped optimizer "
            "states in its checkpoints, so a resumed run does not continue exactly; offload_optimizer=cpu (with "
            "offload_param=nvme) resumes exactly",
            stacklevel=3,
        )
    for key in ("param_buffer_count", "param_buffer_size", "optimizer_buffer_count", "aio_block_size"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"parallel.deepspeed.{key}={getattr(cfg, key)} must be >= 1")
    for key in ("aio_queue_depth", "aio_thread_count"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"parallel.deepspeed.{key}={getattr(cfg, key)} must be >= 1")


def check_swap_dir(path: str) -> None:
    """The NVMe swap directory must exist and accept files; DeepSpeed itself would fail deep in its swapper
    (or, worse, create the path on another file system) long after the run started."""
    key = "parallel.deepspeed.nvme_path"
    if not path:
        raise ValueError(
            f"{key} is empty but offload to nvme is on; fix: set {key} to a directory on a local SSD"
        )
    swap = Path(path).expanduser()
    if not swap.is_dir():
        what = "does not exist" if not swap.exists() else "is not a directory"
        raise ValueError(
            f"{key}={path} {what}; fix: create it (mkdir -p {path}) or point {key} at a local SSD"
        )
    try:
        with tempfile.NamedTemporaryFile(dir=swap, prefix=".treadle_write_test_"):
            pass
    except OSError as err:
        raise ValueError(
            f"{key}={path} is not writable ({err.strerror}); fix: chmod/chown it for this user or choose "
            f"another directory"
        ) from err
    if not os.access(swap, os.W_OK | os.X_OK):
        raise ValueError(f"{key}={path} is not writable; fix: chmod/chown it or choose another directory")


def _offload(target: str, cfg: DeepSpeedConfig, *, param: bool) -> dict[str, Any]:
    # "none" is spelled out so that an override cannot switch offload on behind the engine's back (offload
    # needs CPU Adam, which the engine picks from this config).
    if target == "none":
        return {"device": "none"}
    section: dict[str, Any] = {"device": target, "pin_memory": cfg.pin_memory}
    if target == "nvme":
        section["nvme_path"] = str(Path(cfg.nvme_path).expanduser())
        if param:
            section.update(buffer_count=cfg.param_buffer_count, buffer_size=cfg.param_buffer_size)
        else:
            section["buffer_count"] = cfg.optimizer_buffer_count
    return section


def derived_config(
    cfg: DeepSpeedConfig,
    *,
    micro_batch_size: int,
    grad_accum: int,
    dp_size: int,
    clip_grad_norm: float,
    param_dtype: str,
    reduce_dtype: str,
) -> dict[str, tuple[Any, str]]:
    """Every DeepSpeed key we decide, flattened ("a.b.c"), with the typed-config key it comes from.

    `param_dtype` and `reduce_dtype` are resolved names (bf16 | fp16 | fp32).
    """
    ds = "parallel.deepspeed"
    derived: dict[str, tuple[Any, str]] = {
        "train_micro_batch_size_per_gpu": (micro_batch_size, "trainer.micro_batch_size"),
        "gradient_accumulation_steps": (grad_accum, "trainer.global_batch_size"),
        "train_batch_size": (micro_batch_size * grad_accum * dp_size, "trainer.global_batch_size"),
        # DeepSpeed clips only when > 0, like optim.clip_grad_norm.
        "gradient_clipping": (max(clip_grad_norm, 0.0), "optim.clip_grad_norm"),
        "bf16.enabled": (param_dtype == "bf16", "parallel.param_dtype"),
        "fp16.enabled": (param_dtype == "fp16", "parallel.param_dtype"),
        "communication_data_type": (_DS_DTYPES[reduce_dtype], "parallel.reduce_dtype"),
        "zero_optimization.stage": (cfg.zero_stage, f"{ds}.zero_stage"),
        # The optimizer is ours (optim/), also with offload: CPU Adam is chosen by the engine, not by DeepSpeed.
        "zero_allow_untested_optimizer": (True, "optim.name"),
        "steps_per_print": (2**31 - 1, "logging.every"),
        "wall_clock_breakdown": (False, "logging.every"),
    }
    offloads = (
        ("offload_optimizer", cfg.offload_optimizer, False),
        ("offload_param", cfg.offload_param, True),
    )
    for key, target, param in offloads:
        for sub, value in _offload(target, cfg, param=param).items():
            source = f"{ds}.{key}"
            if sub in ("nvme_path", "pin_memory"):
                source = f"{ds}.{sub}"
            elif sub in ("buffer_count", "buffer_size"):
                source = f"{ds}.{'param' if param else 'optimizer'}_{sub}"
            derived[f"zero_optimization.{key}.{sub}"] = (value, source)
    if "nvme" in (cfg.offload_optimizer, cfg.offload_param):
        for sub in ("block_size", "queue_depth", "thread_count", "single_submit", "overlap_events"):
            derived[f"aio.{sub}"] = (getattr(cfg, f"aio_{sub}"), f"{ds}.aio_{sub}")
    return derived


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{path}."))
        else:
            flat[path] = value
    return flat


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, leaf = path.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def _same(a: Any, b: Any) -> bool:
    # Overrides come from YAML: 5e8 arrives as a float, "true" may arrive as a bool; compare by value.
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return float(a) == float(b)
    return a == b


def build_ds_config(cfg: DeepSpeedConfig, **derive_args: Any) -> dict[str, Any]:
    """The DeepSpeed config dict: derived keys, with `cfg.overrides` merged over them.

    Raises ValueError for every override that contradicts a derived key (all are listed at once), and for
    overrides of the optimizer or scheduler sections, which our optim/ config owns.
    """
    derived = derived_config(cfg, **derive_args)
    overrides = _flatten(dict(cfg.overrides))
    conflicts = []
    for path, value in overrides.items():
        section = path.split(".")[0]
        if section in _OWNED_SECTIONS:
            conflicts.append(
                f"parallel.deepspeed.overrides.{path} conflicts with {_OWNED_SECTIONS[section]} (the optimizer "
                f"and LR schedule are built from optim.*); fix: remove it and set {_OWNED_SECTIONS[section]}"
            )
        elif path in derived and not _same(derived[path][0], value):
            ours, source = derived[path]
            conflicts.append(
                f"parallel.deepspeed.overrides.{path}={value!r} conflicts with {source}, which sets DeepSpeed's "
                f"{path}={ours!r}; fix: remove the override and change {source} instead"
            )
        else:
            # An override below or above a derived key (e.g. replacing a whole section) would bypass the check.
            clash = [d for d in derived if d.startswith(f"{path}.") or path.startswith(f"{d}.")]
            if clash:
                ours, source = derived[clash[0]]
                conflicts.append(
                    f"parallel.deepspeed.overrides.{path} conflicts with {source}, which sets DeepSpeed's "
                    f"{clash[0]}={ours!r}; fix: override leaf keys only, and change {source} instead"
                )
    if conflicts:
        raise ValueError("; ".join(conflicts))
    merged = {path: value for path, (value, _) in derived.items()}
    merged.update(overrides)
    return _unflatten(merged)
