"""Whole runs through the real launchers, as subprocesses: `python launch/train.py`, torchrun with a c10d
rendezvous over two "nodes" on loopback, a stop on SIGUSR1 with resume, and torchrun's elastic restart after a
worker is killed. Losses are read back from `<run.dir>/metrics.jsonl` (the later line of a step counts).

Tolerance: the two-node run (world size 2, FSDP over both) against one process uses the parity tests' rtol
1e-4, for their reason: the same global-mean loss over the same global batch, only the order of the
floating-point sums of the gradient reduce-scatter and the loss all-reduce differs (~1e-7 relative per sum,
carried by AdamW through later steps). A resume or an elastic restart in the same layout redoes exactly the
same arithmetic, so those are compared bitwise.

SLURM itself is started by test_slurm.py, which submits `launch/slurm.sbatch` to a one-host cluster; here the
script is only checked with `bash -n`, so that a syntax error shows even where SLURM is not installed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _spawn import free_port
from test_parity import BASE

from treadle.train.preemption import PREEMPTED_EXIT_CODE

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TRAIN = str(ROOT / "launch" / "train.py")
STEPS = 16
RTOL = 1e-4
TIMEOUT_S = 150
# A constant LR after warm-up makes the schedule independent of trainer.max_steps, so a run started with a
# huge max_steps (to be stopped by a signal) continues the same trajectory as a 16-step run.
COMMON = [o for o in BASE if not o.startswith("trainer.max_steps=")] + [
    f"trainer.max_steps={STEPS}",
    "optim.schedule.name=constant",
]


def _env() -> dict[str, str]:
    # One intra-op thread per process: the runs share 2 cores (with each other and with other tests), and
    # oversubscribed OpenMP threads make a step orders of magnitude slower. Same count in every run.
    # TORCH_DISABLE_SHARE_RDZV_TCP_STORE: see launch/slurm.sbatch; without it a restarted group can hang.
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
    }


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def _overrides(run_dir: Path, cache: Path, *extra: str) -> list[str]:
    return [*COMMON, f"run.dir={run_dir}", f"data.cache_dir={cache}", *extra]


def _start(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=out, stderr=subprocess.STDOUT)


def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL `proc` and its descendants: torchrun starts its workers in sessions of their own, so they
    would outlive it (and keep their cores busy) if only torchrun were killed."""
    pids, todo = [], [proc.pid]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        with contextlib.suppress(OSError):
            todo += map(int, Path(f"/proc/{pid}/task/{pid}/children").read_text().split())
    for pid in reversed(pids):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()


def _finish(proc: subprocess.Popen[bytes], log: Path, expected_rc: int = 0) -> None:
    try:
        rc = proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        raise AssertionError(f"{proc.args} ran past {TIMEOUT_S}s:\n{log.read_text()[-4000:]}") from None
    assert rc == expected_rc, f"exit code {rc}, expected {expected_rc}:\n{log.read_text()[-4000:]}"


def _run(cmd: list[str], log: Path, expected_rc: int = 0) -> None:
    _finish(_start(cmd, log), log, expected_rc)


def _losses(run_dir: Path) -> dict[int, float]:
    """Train loss per step; a step logged twice (redone after a restart) keeps its later value."""
    losses = {}
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            record = json.loads(line)
            if record["kind"] == "train":
                losses[record["step"]] = record["loss"]
    return losses


def _wait_for(condition, proc: subprocess.Popen[bytes], log: Path, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"exited ({proc.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            _kill_tree(proc)
            raise AssertionError(f"no {what} after {TIMEOUT_S}s:\n{log.read_text()[-4000:]}")
        time.sleep(0.02)


def _checkpoint_steps(run_dir: Path) -> list[int]:
    root = run_dir / "checkpoints"
    return sorted(int(p.name.removeprefix("step_")) for p in root.glob("step_*")) if root.is_dir() else []


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data_cache")


@pytest.fixture(scope="module")
def reference(cache, tmp_path_factory) -> list[float]:
    """One plain `python launch/train.py` process, 16 steps; it also fills the shared data cache."""
    run_dir = tmp_path_factory.mktemp("ref")
    _run([sys.executable, TRAIN, *_overrides(run_dir, cache)], run_dir / "out.log")
    losses = _losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return [losses[s] for s in range(1, STEPS + 1)]


@pytest.fixture(scope="module")
def two_nodes(reference, cache, tmp_path_factory) -> list[float]:
    """Two torchrun agents, node ranks 0 and 1, one worker each, meeting at a c10d rendezvous on loopback."""
    run_dir = tmp_path_factory.mktemp("two_nodes")
    endpoint = f"127.0.0.1:{free_port()}"
    procs = []
    for node_rank in (0, 1):
        cmd = _torchrun(
            "--nnodes=2",
            f"--node-rank={node_rank}",
            "--nproc_per_node=1",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={endpoint}",
            "--rdzv-id=test_launch",
            # Both agents resolve 127.0.0.1 to themselves; say which one hosts the rendezvous store.
            f"--rdzv-conf=is_host={int(node_rank == 0)}",
            TRAIN,
            *_overrides(run_dir, cache),
        )
        log = run_dir / f"node{node_rank}.log"
        procs.append((_start(cmd, log), log))
    for proc, log in procs:
        _finish(proc, log)
    losses = _losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return [losses[s] for s in range(1, STEPS + 1)]


def test_slurm_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "launch" / "slurm.sbatch")], check=True)


def test_two_torchrun_nodes_match_one_process(two_nodes, reference):
    torch.testing.assert_close(torch.tensor(two_nodes), torch.tensor(reference), rtol=RTOL, atol=0)


def test_sigusr1_saves_stops_and_resumes_exactly(reference, cache, tmp_path):
    # max_steps far beyond reach: the run can only end through the signal.
    cmd = [
        sys.executable,
        TRAIN,
        *_overrides(tmp_path, cache, "trainer.max_steps=100000", "checkpoint.every=0"),
    ]
    log = tmp_path / "stopped.log"
    proc = _start(cmd, log)
    _wait_for(lambda: len(_losses(tmp_path)) >= 2, proc, log, "two logged steps")
    proc.send_signal(signal.SIGUSR1)
    _finish(proc, log, expected_rc=PREEMPTED_EXIT_CODE)
    stopped_at = max(_losses(tmp_path))
    assert _checkpoint_steps(tmp_path) == [stopped_at]
    assert f"stopped at step {stopped_at} on SIGUSR1" in log.read_text()
    assert stopped_at < STEPS, f"the signal took {stopped_at} steps to land; nothing left to resume"

    _run(
        [sys.executable, TRAIN, *_overrides(tmp_path, cache, "checkpoint.resume=auto")],
        tmp_path / "resumed.log",
    )
    losses = _losses(tmp_path)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert [losses[s] for s in range(stopped_at + 1, STEPS + 1)] == reference[stopped_at:]  # bitwise


def _worker_pids(agent_pid: int) -> dict[int, int]:
    """torchrun's workers (its direct children) by their RANK."""
    children = Path(f"/proc/{agent_pid}/task/{agent_pid}/children").read_text().split()
    ranks = {}
    for pid in map(int, children):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        for entry in environ:
            if entry.startswith(b"RANK="):
                ranks[int(entry[5:])] = pid
    return ranks


def test_elastic_restart_after_a_killed_worker_resumes_exactly(two_nodes, cache, tmp_path):
    """One worker of a 2-process torchrun job is SIGKILLed after the first checkpoint: torchrun restarts the
    group (--max-restarts=1), it resumes with checkpoint.resume=auto, and every step's final loss equals the
    uninterrupted 2-rank run's (the two-node run: the same world size and layout)."""
    cmd = _torchrun(
        "--standalone",
        "--nproc_per_node=2",
        "--max-restarts=1",
        TRAIN,
        *_overrides(
            tmp_path, cache, "checkpoint.every=2", "checkpoint.keep_last=0", "checkpoint.resume=auto"
        ),
    )
    log = tmp_path / "elastic.log"
    proc = _start(cmd, log)
    _wait_for(lambda: _checkpoint_steps(tmp_path), proc, log, "a checkpoint")
    os.kill(_worker_pids(proc.pid)[1], signal.SIGKILL)
    _finish(proc, log)
    text = log.read_text()
    assert "resumed from" in text, f"no restart from a checkpoint:\n{text[-4000:]}"
    losses = _losses(tmp_path)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert [losses[s] for s in range(1, STEPS + 1)] == two_nodes  # bitwise
