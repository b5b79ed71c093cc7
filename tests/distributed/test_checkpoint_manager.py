"""CheckpointManager on real gloo process groups: FSDP2-sharded model + AdamW, save → train → load.

The spawned bodies are module-level functions (the ranks import this module by name). Several cases share
one spawn because starting a process group costs seconds.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from _spawn import run_distributed
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from treadle.train.checkpoint import CheckpointConfig, CheckpointManager
from treadle.train.errors import UserError

# ---- the pieces a trainer would pass as app state ----


class _ModelOptimState:
    """What the native engine's Stateful does: DTensor-sharded model and optimizer state dicts."""

    def __init__(self, model: nn.Module, optim: torch.optim.Optimizer):
        self.model, self.optim = model, optim

    def state_dict(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optim)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_state_dict(
            self.model, self.optim, model_state_dict=state_dict["model"], optim_state_dict=state_dict["optim"]
        )


class _Counter:
    """Stands in for the trainer's and the data loader's plain-int state."""

    def __init__(self, key: str = "step"):
        self.key, self.value = key, 0

    def state_dict(self) -> dict[str, Any]:
        return {self.key: self.value}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.value = int(state_dict[self.key])


class _Run:
    def __init__(self, world_size: int):
        torch.manual_seed(0)  # identical full weights on every rank before sharding
        self.model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        mesh = init_device_mesh("cpu", (world_size,))
        for layer in (self.model[0], self.model[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)
        self.optim = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        self.scheduler = torch.optim.lr_scheduler.LinearLR(self.optim, start_factor=0.5, total_iters=10)
        self.trainer = _Counter()
        self.app_state = {
            "engine": _ModelOptimState(self.model, self.optim),
            "scheduler": self.scheduler,
            "trainer": self.trainer,
        }

    def train_step(self, step: int) -> None:
        generator = torch.Generator().manual_seed(1000 * step + dist.get_rank())
        loss = self.model(torch.randn(4, 8, generator=generator)).pow(2).mean()
        loss.backward()
        self.optim.step()
        self.optim.zero_grad()
        self.scheduler.step()
        self.trainer.value = step

    def full_state(self) -> dict[str, Any]:
        """Unsharded model + optimizer state (an all-gather), flattened and copied; comparable across sizes."""
        model_sd, optim_sd = get_state_dict(
            self.model, self.optim, options=StateDictOptions(full_state_dict=True)
        )
        flat = _flatten({"model": model_sd, "optim": optim_sd})
        flat["scheduler.last_epoch"] = self.scheduler.last_epoch
        flat["trainer.step"] = self.trainer.value
        return flat


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        return {k: v for key, value in obj.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    if isinstance(obj, list | tuple):
        return {k: v for i, value in enumerate(obj) for k, v in _flatten(value, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): obj.detach().clone() if isinstance(obj, torch.Tensor) else obj}


def _assert_same(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(actual[key], value), key
        else:
            assert actual[key] == value, key


def _draw_random() -> tuple[float, float, list[float]]:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


# ---- spawned bodies ----


def _save_train_load(rank: int, world_size: int, root: Path) -> None:
    run = _Run(world_size)
    cfg = CheckpointConfig(dir=str(root / "ckpt"), every=2, keep_last=0)
    manager = CheckpointManager(cfg, rank=rank, world_size=world_size)
    assert manager.resolve_resume() is None
    for step in (1, 2):
        run.train_step(step)
        assert manager.maybe_save(step, run.app_state) == (step == 2)
    saved = run.full_state()
    random_after_save = _draw_random()
    if rank == 0:
        torch.save(saved, root / "expected_step2.pt")
    run.train_step(3)
    after_step3 = run.full_state()
    assert not manager.maybe_save(3, run.app_state)

    path = manager.resolve_resume()
    assert path == root / "ckpt" / "step_00000002"
    assert manager.load(path, run.app_state) == 2
    _assert_same(run.full_state(), saved)
    assert _draw_random() == random_after_save  # same world size: this rank's RNG is restored
    run.train_step(3)
    _assert_same(run.full_state(), after_step3)  # identical continuation
    assert not manager.maybe_save(2, run.app_state, final=True)  # step 2 is already on disk

    # Corrupt copies; every rank must get the ValueError, not only the one that reads the broken file.
    bad = root / "bad"
    if rank == 0:
        for case in ("metadata", "shard", "marker", "extra_key"):
            shutil.copytree(path, bad / case)
        _truncate(bad / "metadata" / ".metadata")
        _truncate(bad / "shard" / "__0_0.distcp")
        (bad / "marker" / "treadle.json").unlink()
    dist.barrier()
    for case, app_state in [
        ("metadata", run.app_state),
        ("shard", run.app_state),
        ("marker", run.app_state),
        ("extra_key", {**run.app_state, "data": _Counter("consumed_samples")}),
    ]:
        with pytest.raises(ValueError, match="checkpoint.resume=none") as error:
            manager.load(bad / case, app_state)
        assert str(bad / case) in str(error.value), case
        assert case == "marker" or error.value.__cause__ is not None, case
    manager.close()


def _load_resharded(rank: int, world_size: int, root: Path) -> None:
    run = _Run(world_size)
    manager = CheckpointManager(CheckpointConfig(dir=str(root / "ckpt")), rank=rank, world_size=world_size)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("treadle.train.checkpoint").addHandler(handler)
    rng_before = torch.get_rng_state()

    path = manager.resolve_resume()
    assert path is not None and manager.load(path, run.app_state) == 2
    _assert_same(run.full_state(), torch.load(root / "expected_step2.pt", weights_only=True))
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert any("RNG states are not restored" in r.getMessage() for r in records)
    manager.close()


def _async_prune_overwrite(rank: int, world_size: int, root: Path) -> None:
    ckpt = root / "ckpt"
    if rank == 0:
        # Left by crashed saves: never the latest, and not pruned either.
        (ckpt / ".tmp_step_00000009").mkdir(parents=True)
        (ckpt / "step_00000010").mkdir()
        (ckpt / "step_00000010" / ".metadata").touch()
    dist.barrier()
    run = _Run(world_size)
    cfg = CheckpointConfig(dir=str(ckpt), every=1, keep_last=2, async_save=True)
    manager = CheckpointManager(cfg, rank=rank, world_size=world_size)
    expected = {}
    for step in (1, 2, 3, 4):
        run.train_step(step)
        expected[step] = run.full_state()
        assert manager.maybe_save(step, run.app_state)
        # The save copied the state to CPU before returning: changing parameters now must not reach the files.
        with torch.no_grad():
            for param in run.model.parameters():
                param.add_(100.0)
    manager.close()
    assert sorted(p.name for p in ckpt.iterdir()) == [
        ".tmp_step_00000009",
        "step_00000003",
        "step_00000004",
        "step_00000010",
    ]
    assert manager.resolve_resume() == ckpt / "step_00000004"
    assert manager.load(ckpt / "step_00000004", run.app_state) == 4
    _assert_same(run.full_state(), expected[4])

    # Saving a step that already exists replaces it.
    sync_manager = CheckpointManager(
        CheckpointConfig(dir=str(ckpt), keep_last=2), rank=rank, world_size=world_size
    )
    run.train_step(5)
    run.trainer.value = 4  # different contents under the same step
    replaced = run.full_state()
    sync_manager.save(4, run.app_state)
    assert not any(p.name.startswith(".old_") for p in ckpt.iterdir())
    assert (ckpt / "step_00000003").is_dir()
    run.train_step(6)
    assert sync_manager.load(ckpt / "step_00000004", run.app_state) == 4
    _assert_same(run.full_state(), replaced)
    sync_manager.close()


# ---- tests ----


@pytest.mark.slow
def test_save_load_same_and_different_world_size(tmp_path: Path) -> None:
    run_distributed(_save_train_load, 2, tmp_path)
    run_distributed(_load_resharded, 1, tmp_path)


@pytest.mark.slow
def test_async_save_prune_overwrite(tmp_path: Path) -> None:
    run_distributed(_async_prune_overwrite, 2, tmp_path)


def _fake_checkpoint(path: Path, *, marker: bool = True, metadata: bool = True) -> Path:
    path.mkdir(parents=True)
    if marker:
        (path / "treadle.json").write_text('{"step": 0, "world_size": 1}')
    if metadata:
        (path / ".metadata").touch()
    return path


def test_resolve_resume(tmp_path: Path) -> None:
    def resolve(resume: str) -> Path | None:
        cfg = CheckpointConfig(dir=str(tmp_path), resume=resume)
        return CheckpointManager(cfg, rank=0, world_size=1).resolve_resume()

    assert resolve("auto") is None
    step2 = _fake_checkpoint(tmp_path / "step_00000002")
    step5 = _fake_checkpoint(tmp_path / "step_00000005")
    no_marker = _fake_checkpoint(tmp_path / "step_00000007", marker=False)
    no_metadata = _fake_checkpoint(tmp_path / "step_00000008", metadata=False)
    _fake_checkpoint(tmp_path / ".tmp_step_00000009")
    _fake_checkpoint(tmp_path / "other")
    assert resolve("auto") == step5
    assert resolve("none") is None
    assert resolve(str(step2)) == step2
    for path, reason in [
        (tmp_path / "step_00000003", "does not exist"),
        (no_marker, "no treadle.json"),
        (no_metadata, "no DCP .metadata"),
        (tmp_path, "fix: did you mean its newest step directory .*step_00000005"),
    ]:
        with pytest.raises(
            ValueError, match=f"^checkpoint.resume={re.escape(repr(str(path)))}: .*{reason}"
        ) as error:
            resolve(str(path))
        assert "; fix: " in str(error.value)
        assert isinstance(error.value, UserError)  # printed without a traceback by launch/train.py


def test_maybe_save_schedule(tmp_path: Path) -> None:
    def saved_steps(every: int, save_final: bool, last: int) -> list[int]:
        cfg = CheckpointConfig(dir=str(tmp_path), every=every, save_final=save_final)
        manager = CheckpointManager(cfg, rank=0, world_size=1)
        steps: list[int] = []

        def record(step: int, app_state: dict[str, Any]) -> None:
            steps.append(step)
            manager._last_saved_step = step

        manager.save = record  # type: ignore[method-assign]
        for step in range(1, last + 1):
            manager.maybe_save(step, {})
        manager.maybe_save(last, {}, final=True)
        return steps

    assert saved_steps(3, True, 7) == [3, 6, 7]
    assert saved_steps(3, True, 6) == [3, 6]
    assert saved_steps(3, False, 7) == [3, 6]
    assert saved_steps(0, True, 7) == [7]


def test_config_errors(tmp_path: Path) -> None:
    for kwargs, key in [({"every": -1}, "checkpoint.every"), ({"keep_last": -2}, "checkpoint.keep_last")]:
        with pytest.raises(ValueError, match=f"{key}=.*fix:"):
            CheckpointManager(CheckpointConfig(dir=str(tmp_path), **kwargs), rank=0, world_size=1)


def test_auto_resume_logs_skipped_dirs_and_falls_back_past_a_corrupt_checkpoint(
    tmp_path: Path, caplog
) -> None:
    """resume=auto names every directory it passes over, and a newest complete checkpoint that does not load
    gives way to the previous one with a warning naming both; strict_resume keeps the refusal. One process,
    no process group (DCP's local mode)."""
    model = nn.Linear(3, 2)
    counter = _Counter()
    app_state = {"model": model, "trainer": counter}
    saver = CheckpointManager(CheckpointConfig(dir=str(tmp_path)), rank=0, world_size=1)
    for step in (1, 2):
        counter.value = step
        saver.save(step, app_state)
    _truncate(tmp_path / "step_00000002" / "__0_0.distcp")
    _fake_checkpoint(tmp_path / "step_00000003", marker=False)
    (tmp_path / ".tmp_step_00000004").mkdir()

    manager = CheckpointManager(CheckpointConfig(dir=str(tmp_path)), rank=0, world_size=1)
    with caplog.at_level(logging.WARNING, logger="treadle.train.checkpoint"):
        path = manager.resolve_resume()
        assert path == tmp_path / "step_00000002"
        counter.value = 0
        assert manager.load(path, app_state) == 1
    assert counter.value == 1
    messages = [r.getMessage() for r in caplog.records]
    assert any("skips" in m and "step_00000003" in m and "no treadle.json" in m for m in messages)
    assert any("skips" in m and ".tmp_step_00000004" in m for m in messages)
    assert any("step_00000002 does not load" in m and "step_00000001" in m for m in messages)

    strict = CheckpointConfig(dir=str(tmp_path), strict_resume=True)
    with pytest.raises(ValueError, match="step_00000002 is corrupt"):
        CheckpointManager(strict, rank=0, world_size=1).load(path, app_state)
