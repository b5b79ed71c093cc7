"""README's first command in an install without Triton (`pip install -e .`, no extras).

The test environment has Triton (the kernel tests need it), so a subprocess hides it: `sys.modules["triton"]
= None` makes every `import triton` fail as in a plain install. The run itself is the tiny recipe for two
steps through `launch/train.py`; `.ci/run` also runs the real command in a real plain virtual environment.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ROOT / "launch" / "train.py"

_WITHOUT_TRITON = """
import runpy, sys
sys.modules["triton"] = None
sys.argv = [{train!r}, *sys.argv[1:]]
runpy.run_path({train!r}, run_name="__main__")
"""


def _train_without_triton(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    args = [
        "+config=debug/tiny",
        "trainer.max_steps=2",
        "trainer.eval_batches=1",
        "logging.progress_bar=false",
        "logging.wandb.mode=disabled",
        f"run.dir={tmp_path / 'run'}",
        *overrides,
    ]
    code = _WITHOUT_TRITON.format(train=str(TRAIN))
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_readme_first_command_runs_without_triton(tmp_path) -> None:
    result = _train_without_triton(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "step_00000002").is_dir()


def test_triton_op_without_triton_is_a_config_error(tmp_path) -> None:
    result = _train_without_triton(tmp_path, "kernels.rmsnorm=triton")
    assert result.returncode != 0
    assert "kernels.rmsnorm=" in result.stderr and 'pip install "treadle[kernels]"' in result.stderr
    assert "Traceback" not in result.stderr
