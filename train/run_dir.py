"""Which run directory a job writes, and whether its checkpoints belong to this config.

A run directory holds one run: its `config.yaml`, metrics and checkpoints, and `checkpoint.resume=auto`
continues whatever checkpoint it finds there. Two things used to break that silently:

- a Hydra sweep (`launch/train.py -m ... optim.lr=1e-3,3e-4`) ran every job in the same `run.dir`, so the
  second job resumed the first's checkpoint. Under multirun each job now gets `<run.dir>/multirun/<job num>`
  (`hydra.sweep` in configs/train.yaml), the same directory when the sweep is run again, so a requeued
  sweep resumes each job;
- a run resumed a checkpoint written under another config. `check_resume_config` compares the config with
  the `config.yaml` saved in the run directory and refuses to resume when keys other than `MAY_CHANGE` differ.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from treadle.train.checkpoint import complete_checkpoints

__all__ = ["MAY_CHANGE", "changed_keys", "check_resume_config", "separate_multirun_job"]

# Keys a resumed run may change (prefixes end in "."): the run's length and its evaluation, logging and
# checkpoint cadence; where files go; and the layout, since checkpoints reshard to another data-, tensor- or
# context-parallel size and the data loader continues the same global stream at another micro-batch size.
MAY_CHANGE = (
    "trainer.max_steps",
    "trainer.eval_every",
    "trainer.eval_batches",
    "trainer.micro_batch_size",
    "logging.",
    "checkpoint.",
    "run.",
    "data.cache_dir",
    "parallel.dp_replicate",
    "parallel.dp_shard",
    "parallel.cp",
    "parallel.tp",
)


def separate_multirun_job(raw: DictConfig) -> None:
    """Under `-m`, point `run.dir` at this job's own directory (Hydra's job output dir, see module doc).

    A `checkpoint.dir` that does not follow `run.dir` would still be shared by every job: refused."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    checkpoint_dir = OmegaConf.to_container(raw.checkpoint, resolve=False)["dir"]
    if "${run.dir}" not in str(checkpoint_dir):
        raise ValueError(
            f"checkpoint.dir={checkpoint_dir} would be shared by every job of this sweep (-m), each resuming "
            "the others' checkpoints; fix: leave checkpoint.dir under ${run.dir} (the default), which each job "
            "gets for itself"
        )
    raw.run.dir = HydraConfig.get().runtime.output_dir


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix.removesuffix("."): tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}{key}."))
    return flat


def changed_keys(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys present in both (nested) configs whose values differ, outside `MAY_CHANGE`. Keys only one side
    has (the schema gained or lost a key between versions) are not compared."""
    old, new = _flatten(saved), _flatten(current)
    return sorted(
        key
        for key in old.keys() & new.keys()
        if old[key] != new[key]
        and not any(key == m or (m.endswith(".") and key.startswith(m)) for m in MAY_CHANGE)
    )


def check_resume_config(cfg: Any) -> None:
    """With `checkpoint.resume=auto`, refuse to resume a checkpoint of `run.dir` whose saved `config.yaml`
    differs from `cfg` (a `TrainConfig`) in keys outside `MAY_CHANGE`, naming them. An explicit
    `checkpoint.resume=<step dir>` is the user's own choice and is not compared."""
    saved_path = Path(cfg.run.dir).expanduser() / "config.yaml"
    if cfg.checkpoint.resume != "auto" or not saved_path.is_file():
        return
    if not complete_checkpoints(Path(cfg.checkpoint.dir).expanduser()):
        return
    saved = OmegaConf.to_container(OmegaConf.load(saved_path), resolve=True)
    current = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    changed = changed_keys(saved, current)
    if not changed:
        return
    old, new = _flatten(saved), _flatten(current)
    details = ", ".join(f"{k}: {old[k]!r} -> {new[k]!r}" for k in changed[:8])
    more = f" and {len(changed) - 8} more" if len(changed) > 8 else ""
    raise ValueError(
        f"run.dir={cfg.run.dir} holds checkpoints of another config ({saved_path} differs in {details}{more}); "
        f"checkpoint.resume=auto would continue them under this one. Fix: use a new run.name (or run.dir) for "
        f"this config, set checkpoint.resume=none to start over in this directory, or restore those keys"
    )
