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
    flags = [o for o in overrides if o.startswith("-")]  # Hydra's flags (-m) go before the overrides
    return subprocess.run(
        [sys.executable, TRAIN, *flags, *FAST, *(o for o in overrides if o not in flags)],
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


def test_each_job_of_a_sweep_gets_its_own_run_dir(tmp_path: Path) -> None:
    """`-m ... optim.lr=a,b`: the second job used to resume the first job's checkpoint in the shared run.dir."""
    sweep = launch(tmp_path, "-m", f"run.dir={tmp_path / 'sweep'}", "optim.lr=1e-3,3e-4")
    assert sweep.returncode == 0, sweep.stdout[-3000:]
    assert "resumed from" not in sweep.stdout
    for job, lr in (("0", 1e-3), ("1", 3e-4)):
        job_dir = tmp_path / "sweep" / "multirun" / job
        assert (job_dir / "checkpoints" / "step_00000002").is_dir()
        assert f"lr: {lr}" in (job_dir / "config.yaml").read_text()


def test_resuming_under_another_config_is_refused(tmp_path: Path) -> None:
    """resume=auto compares with the run dir's config.yaml: keys that may change (the length, logging,
    checkpoint cadence) pass, any other changed key is named."""
    import pytest
    from omegaconf import OmegaConf

    from treadle.train.config import load_config, validate

    run = [f"run.dir={tmp_path / 'run'}", "+config=debug/tiny"]
    first = load_config(run)
    validate(first, world_size=1)
    step = tmp_path / "run" / "checkpoints" / "step_00000002"
    step.mkdir(parents=True)
    (step / "treadle.json").write_text('{"step": 2, "world_size": 1}')
    (step / ".metadata").touch()
    OmegaConf.save(OmegaConf.structured(first), tmp_path / "run" / "config.yaml")

    validate(load_config([*run, "trainer.max_steps=900", "logging.every=1", "checkpoint.every=7"]), 1)
    validate(load_config([*run, "optim.lr=1e-3", "checkpoint.resume=none"]), 1)
    with pytest.raises(
        ValueError, match=r"differs in optim\.lr: 0\.003 -> 0\.001, trainer\.seed: 0 -> 5\).*run\.name"
    ):
        validate(load_config([*run, "optim.lr=1e-3", "trainer.seed=5", "trainer.max_steps=900"]), 1)


def test_user_errors_print_one_message_without_a_traceback(tmp_path: Path) -> None:
    """Found while the run works (here: a resume dir without its marker, the abort on non-finite losses):
    one `error:` line on rank 0 naming the cause and the fix, exit code 1, no traceback."""
    not_a_checkpoint = tmp_path / "step_00000003"
    not_a_checkpoint.mkdir()
    result = launch(tmp_path, f"run.dir={tmp_path / 'a'}", f"checkpoint.resume={not_a_checkpoint}")
    assert result.returncode == 1, result.stdout[-3000:]
    assert f"error: checkpoint.resume='{not_a_checkpoint}'" in result.stdout and "fix:" in result.stdout
    assert "Traceback" not in result.stdout

    diverging = ["optim.lr=1e30", "optim.clip_grad_norm=0", "optim.schedule.warmup_steps=0"]
    result = launch(tmp_path, f"run.dir={tmp_path / 'b'}", "trainer.nan_policy=abort", *diverging)
    assert result.returncode == 1, result.stdout[-3000:]
    assert "error: step 2: loss=" in result.stdout and "trainer.nan_policy=abort" in result.stdout
    assert "Traceback" not in result.stdout
