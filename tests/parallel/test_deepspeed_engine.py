"""DeepSpeed engine helpers that need no process group."""

from __future__ import annotations

import logging
import os
import time

import pytest
import torch

from treadle.parallel.deepspeed_engine import import_deepspeed, stale_build_locks


def _lock(path, age_s: float):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def test_a_killed_builds_lock_is_named_and_a_fresh_one_is_not(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale = _lock(tmp_path / "async_io" / "lock", age_s=3 * 3600)
    _lock(tmp_path / "cpu_adam" / "lock", age_s=5)  # another rank building right now
    (tmp_path / "pin_memory").mkdir()  # built, unlocked
    assert list(stale_build_locks()) == [stale]


def test_import_warns_about_a_stale_lock(tmp_path, monkeypatch, caplog):
    pytest.importorskip("deepspeed")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale = _lock(tmp_path / "async_io" / "lock", age_s=7200)
    with caplog.at_level(logging.WARNING, logger="treadle.parallel.deepspeed_engine"):
        import_deepspeed(torch.device("cpu"))
    assert f"{stale} is 120 min old" in caplog.text and "delete the file" in caplog.text
