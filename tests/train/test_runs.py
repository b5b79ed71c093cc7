"""Whole short runs through `launch/train.py` (one process, CPU): what a user sees when re-running, resuming or
sweeping. Each run is the tiny recipe for a couple of steps (a few seconds, mostly start-up)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TRAIN = str(ROOT / "launch" / "train.py")
FAST = [
    "+config=debug/tiny",
    "trainer.max_steps=2",
    "trainer.eval_batches=1",
    "logging.progress_bar=false",
    "logging.wandb.mode=disabled",
]


def launch(cwd: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    """`python launch/train.py` with FAST, then `overrides`; stdout and stderr together in `.stdout`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, TRAIN, *FAST, *overrides],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )


def test_rerunning_a_finished_run_says_it_is_complete(tmp_path: Path) -> None:
    run_dir = f"run.dir={tmp_path / 'run'}"
    assert launch(tmp_path, run_dir).returncode == 0
    again = launch(tmp_path, run_dir)
    assert again.returncode == 0, again.stdout[-3000:]
    assert "already complete at step 2; nothing to train — raise trainer.max_steps or use a new run.name" in (
        again.stdout
    )
