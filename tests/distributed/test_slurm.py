"""`launch/slurm.sbatch` under a real SLURM: the `cluster` fixture starts munged, slurmctld and two slurmd
from a generated single-host slurm.conf ("nodes" n1 and n2 on loopback, each slurmd on a port of its own),
and the tests submit the script with sbatch as a user would:

- a whole run: one torchrun per node, one worker each (world size 2, FSDP over both, gloo on CPU) meeting at
  a c10d rendezvous on the first node; the job completes with exit code 0 and leaves every step's metrics
  and the final checkpoint;
- preemption: `scancel --batch --signal=USR1`, the signal that `#SBATCH --signal=B:USR1@120` sends ahead of
  the time limit, reaches the batch shell only; its trap forwards it through srun and torchrun to the
  workers, which save a checkpoint and exit with code 75; the script requeues the job, and the requeued job
  resumes from that checkpoint to the last step. Its losses equal the whole run's bitwise: the same world
  size and layout redo exactly the same arithmetic (the reasoning of test_launch.py).

Plugins that need neither cgroups nor an accounting database (proctrack/linuxproc, task/none,
jobacct_gather/none, accounting_storage/none), so that slurmd runs in a container. The tests skip, with the
reason, where SLURM cannot run: its binaries are missing (`apt-get install slurm-wlm munge`, which .ci/run
does), the user is not root (slurmd starts jobs as their submitting user), or the daemons do not come up.
Every daemon, and every job process left behind, is killed at teardown.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from _spawn import free_port
from test_launch import _checkpoint_steps, _losses
from test_parity import BASE

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SBATCH = ROOT / "launch" / "slurm.sbatch"
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scontrol", "scancel", "srun")
NODES = ("n1", "n2")
# Enough steps that the stop lands well before the end (it takes a few steps to travel from scancel to the
# workers); a constant LR makes the resumed trajectory independent of where the stop lands.
STEPS = 60
START_TIMEOUT_S = 60
JOB_TIMEOUT_S = 180
COMMAND_TIMEOUT_S = 30
# A requeued job may start again only after the old allocation's credentials expire, cred_expire seconds after
# the requeue (default 120); 10 s still leaves a loaded machine time to launch a step with a fresh credential.
CRED_EXPIRE_S = 10
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}
OVERRIDES = [o for o in BASE if not o.startswith(("trainer.max_steps=", "checkpoint.save_final="))] + [
    f"trainer.max_steps={STEPS}",
    "optim.schedule.name=constant",
    "checkpoint.save_final=true",
]


def _which(name: str) -> str | None:
    # The daemons live in /usr/sbin, which a non-login shell's PATH may lack.
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))


def _slurm_conf(root: Path) -> str:
    return f"""\
ClusterName=treadle
SlurmctldHost={socket.gethostname()}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge.sock,cred_expire={CRED_EXPIRE_S}
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
# The nodes claim 1 CPU each whatever the machine has (config_overrides: no drain for a mismatch).
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
MinJobAge=600
NodeName={NODES[0]} NodeAddr=127.0.0.1 Port={free_port()} CPUs=1 State=UNKNOWN
NodeName={NODES[1]} NodeAddr=127.0.0.1 Port={free_port()} CPUs=1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class Cluster:
    root: Path
    env: dict[str, str]
    daemons: list[tuple[subprocess.Popen[bytes], Path]] = field(default_factory=list)

    def run(self, *cmd: str, env: dict[str, str] | None = None) -> str:
        done = subprocess.run(
            cmd, env=env or self.env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: exit code {done.returncode}\n{done.stdout}{done.stderr}")
        return done.stdout

    def start(self, name: str, daemon: str, *args: str) -> None:
        log = self.root / f"{name}.out"
        cmd = [_which(daemon) or daemon, *args]
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        self.daemons.append((proc, log))

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict, first value of a key (a command's own `key=value`s come later)."""
        fields: dict[str, str] = {}
        for item in self.run("scontrol", "-o", "show", "job", job_id).split():
            key, _, value = item.partition("=")
            fields.setdefault(key, value)
        return fields

    def logs(self) -> str:
        paths = [log for _, log in self.daemons] + sorted(self.root.glob("*.log"))
        return "\n".join(
            f"--- {p.name}:\n{p.read_text(errors='replace')[-1500:]}" for p in paths if p.exists()
        )


def _wait(condition: Callable[[], bool], timeout_s: float, interval_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval_s)
    return True


def _nodes_idle(cluster: Cluster) -> bool:
    dead = [log.name for proc, log in cluster.daemons if proc.poll() is not None]
    if dead:
        raise RuntimeError(f"{', '.join(dead)}: the daemon exited")
    try:
        states = cluster.run("sinfo", "-h", "-N", "-o", "%N %T").split()
    except (RuntimeError, subprocess.TimeoutExpired):
        return False  # slurmctld is not answering yet
    return states == [word for node in NODES for word in (node, "idle")]


def _start(cluster: Cluster) -> None:
    root = cluster.root
    (root / "state").mkdir()
    for node in NODES:
        (root / "spool" / node).mkdir(parents=True)
    key = root / "munge.key"
    key.write_bytes(os.urandom(128))
    key.chmod(0o400)
    # Our own munged on our own socket: a system munged (and its key), if any, is left alone.
    cluster.start(
        "munged",
        "munged",
        "--foreground",
        "--force",  # else munged refuses a socket in a folder others cannot enter (pytest's are 0700)
        f"--socket={root}/munge.sock",
        f"--key-file={key}",
        f"--pid-file={root}/munged.pid",
        f"--log-file={root}/munged.log",
        f"--seed-file={root}/munged.seed",
    )
    if not _wait((root / "munge.sock").exists, START_TIMEOUT_S):
        raise RuntimeError("munged did not create its socket")
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root))
    cluster.start("slurmctld", "slurmctld", "-D", "-f", str(conf))
    for node in NODES:
        cluster.start(f"slurmd-{node}", "slurmd", "-D", "-N", node, "-f", str(conf))
    if not _wait(lambda: _nodes_idle(cluster), START_TIMEOUT_S, interval_s=0.5):
        raise RuntimeError(f"nodes {', '.join(NODES)} not idle after {START_TIMEOUT_S}s")


def _kill_leftovers(root: Path) -> None:
    """SIGKILL every process whose command line names this cluster's folder: job scripts (in its spool
    folder), srun, torchrun and the workers (their run.dir and output are under it)."""
    needle = str(root).encode()
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit() or int(proc_dir.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if needle in (proc_dir / "cmdline").read_bytes():
                os.kill(int(proc_dir.name), signal.SIGKILL)


def _stop(cluster: Cluster) -> None:
    # Jobs first, while slurmctld and slurmd are there to end them: their processes do not descend from
    # the daemons we started (slurmstepd daemonizes), so stopping the daemons would leave them running.
    with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired, OSError):
        jobs = cluster.run("squeue", "-h", "-o", "%i").split()
        if jobs:
            cluster.run("scancel", *jobs)
            _wait(lambda: not cluster.run("squeue", "-h", "-o", "%i").split(), 30)
    for proc, _ in reversed(cluster.daemons):
        proc.terminate()
    for proc, _ in reversed(cluster.daemons):
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    _kill_leftovers(cluster.root)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    missing = [name for name in BINARIES if _which(name) is None]
    if missing:
        pytest.skip(
            f"SLURM is not installed ({', '.join(missing)} not found): apt-get install slurm-wlm munge"
        )
    if os.geteuid() != 0:
        pytest.skip("slurmd must run as root to start jobs")
    root = tmp_path_factory.mktemp("slurm")
    cluster = Cluster(root, {**os.environ, "SLURM_CONF": str(root / "slurm.conf")})
    try:
        try:
            _start(cluster)
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as err:
            pytest.skip(f"SLURM cannot run here: {err}\n{cluster.logs()}")
        yield cluster
    finally:
        _stop(cluster)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data_cache")


def _job_env(cluster: Cluster) -> dict[str, str]:
    """The environment sbatch exports to the job: `torchrun` of this interpreter first on PATH (the script
    runs whichever is there), one worker per node, one OpenMP thread per worker (2 shared cores)."""
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "torchrun").exists():  # a venv with --system-site-packages has no torchrun of its own
        bin_dir = cluster.root / "bin"
        bin_dir.mkdir(exist_ok=True)
        shim = bin_dir / "torchrun"
        shim.write_text(
            f"#!{sys.executable}\nimport sys\nfrom torch.distributed.run import main\nsys.exit(main())\n"
        )
        shim.chmod(0o755)
    return {
        **cluster.env,
        "PATH": f"{bin_dir}{os.pathsep}{cluster.env.get('PATH', '')}",
        "GPUS_PER_NODE": "1",
        "RDZV_PORT": str(free_port()),
        "OMP_NUM_THREADS": "1",
    }


def _submit(cluster: Cluster, run_dir: Path, cache: Path) -> str:
    """sbatch the script as it is; the command line only scales its #SBATCH resources down to this machine."""
    run_dir.mkdir(parents=True)
    log = run_dir / "job.out"
    return cluster.run(
        "sbatch",
        "--parsable",
        "--gpus-per-node=0",
        "--cpus-per-task=1",
        "--time=10",
        f"--output={log}",
        f"--error={log}",
        f"--chdir={ROOT}",
        str(SBATCH),
        *OVERRIDES,
        f"run.dir={run_dir}",
        f"data.cache_dir={cache}",
        env=_job_env(cluster),
    ).strip()


def _wait_job(cluster: Cluster, job_id: str, log: Path) -> dict[str, str]:
    """The job's final `scontrol` record; a requeued job is PENDING again, so this waits for its rerun."""
    info: dict[str, str] = {}

    def done() -> bool:
        info.update(cluster.job(job_id))
        return info["JobState"] in FINAL_STATES

    if not _wait(done, JOB_TIMEOUT_S, interval_s=0.5):
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            cluster.run("scancel", job_id)
        raise AssertionError(
            f"job {job_id} still {info.get('JobState')} after {JOB_TIMEOUT_S}s:\n"
            f"{log.read_text(errors='replace')[-4000:] if log.exists() else ''}\n{cluster.logs()}"
        )
    return info


def _assert_completed(info: dict[str, str], log: Path) -> None:
    text = log.read_text(errors="replace")
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), f"{info}:\n{text[-4000:]}"
    assert info["NodeList"] == "n[1-2]", info["NodeList"]


@pytest.fixture(scope="module")
def whole_run(cluster, cache) -> tuple[dict[str, str], Path]:
    """The job's final record and its run.dir."""
    run_dir = cluster.root / "jobs" / "whole"
    job_id = _submit(cluster, run_dir, cache)
    return _wait_job(cluster, job_id, run_dir / "job.out"), run_dir


def test_sbatch_trains_on_two_nodes_to_the_last_step(whole_run):
    info, run_dir = whole_run
    log = run_dir / "job.out"
    _assert_completed(info, log)
    assert info["Restarts"] == "0"
    text = log.read_text()
    assert "world 2 = dp_replicate 1 × dp_shard 2" in text, text[-4000:]
    assert _checkpoint_steps(run_dir) == [STEPS]
    assert (run_dir / "checkpoints" / f"step_{STEPS:08d}" / "treadle.json").exists()
    losses = _losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1] - 1, losses


def test_sigusr1_checkpoints_requeues_and_resumes_exactly(cluster, cache, whole_run):
    _, whole_dir = whole_run
    run_dir = cluster.root / "jobs" / "preempted"
    job_id = _submit(cluster, run_dir, cache)
    log = run_dir / "job.out"

    def two_steps() -> bool:
        if cluster.job(job_id)["JobState"] in FINAL_STATES:
            raise AssertionError(f"job {job_id} ended before two steps:\n{log.read_text()[-4000:]}")
        return len(_losses(run_dir)) >= 2

    assert _wait(two_steps, JOB_TIMEOUT_S, interval_s=0.1), f"no two steps:\n{log.read_text()[-4000:]}"
    cluster.run("scancel", "--batch", "--signal=USR1", job_id)

    info = _wait_job(cluster, job_id, log)
    _assert_completed(info, log)
    text = log.read_text()
    assert info["Restarts"] == "1", f"{info}:\n{text[-4000:]}"
    assert "SIGUSR1 (time limit or preemption ahead): stopping the workers, then requeueing" in text
    stops = {int(step) for step in re.findall(r"stopped at step (\d+) on SIGUSR1", text)}
    assert len(stops) == 1, f"not one stop step: {stops}:\n{text[-4000:]}"
    (stopped_at,) = stops
    assert stopped_at < STEPS, f"the signal took {stopped_at} steps to land; nothing left to resume"
    assert f"resumed from {run_dir}/checkpoints/step_{stopped_at:08d} at step {stopped_at}" in text
    assert _checkpoint_steps(run_dir) == [stopped_at, STEPS]
    losses = _losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses == _losses(whole_dir)  # bitwise, every step
