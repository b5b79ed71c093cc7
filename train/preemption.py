"""A clean stop on SIGUSR1 / SIGTERM: finish the current step, save a checkpoint, exit with `PREEMPTED_EXIT_CODE`.

SLURM warns a job before its time limit or a preemption (`#SBATCH --signal=B:USR1@120`); `launch/slurm.sbatch`
forwards that to torchrun, which forwards it to every worker (`--signals-to-handle`). Without torchrun, `kill
-USR1 <pid>` or a SIGTERM (SLURM's own, a container runtime's) does the same.

The handler only sets a flag: a signal arrives between two arbitrary bytecodes, possibly inside a collective,
so the stop itself happens at the next step boundary. Ranks receive the signal at different moments (or some
not at all), so the flag is all-reduced MAX over the default group at every step boundary; every rank then
sees the same value at the same step and they all save the same step together (a save is collective). The
all-reduce is one int32 per step, next to the step's own gradient collectives.

Communication: one all-reduce (MAX) of a one-element tensor on the default group per `requested()` call.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from treadle.train.checkpoint import CheckpointManager
from treadle.train.loggers import MetricLogger

# EX_TEMPFAIL from sysexits.h, "temporary failure; the user is invited to retry": the run is not finished
# and resuming (checkpoint.resume=auto) continues it. Distinct from 0 (done) and 1 (an error).
PREEMPTED_EXIT_CODE = 75
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

# Process-wide on purpose: signal handlers are per process, so one flag per process is the honest shape.
_received: signal.Signals | None = None


class Preempted(Exception):
    """Raised by `stop()` on every rank once the checkpoint of `step` is on disk."""

    def __init__(self, step: int, signum: signal.Signals | None):
        name = signum.name if signum is not None else "a signal on another rank"
        super().__init__(
            f"stopped at step {step} on {name}; checkpoint saved, resume with checkpoint.resume=auto"
        )
        self.step = step


def _on_signal(signum: int, frame: FrameType | None) -> None:
    global _received
    _received = signal.Signals(signum)


@contextmanager
def stop_on_signals(signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> Iterator[None]:
    """Within the block, the `signals` request a stop at the next step boundary instead of killing the process."""
    global _received
    _received = None
    previous = {sig: signal.signal(sig, _on_signal) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def requested(device: torch.device) -> bool:
    """Whether any rank has received a stop signal. Collective: every rank calls it at the same step."""
    flag = torch.tensor([0 if _received is None else 1], dtype=torch.int32, device=device)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def stop(
    step: int, checkpointer: CheckpointManager, app_state: dict[str, Any], metric_logger: MetricLogger
) -> NoReturn:
    """Save the checkpoint of `step` (unless the periodic save just wrote it), close the checkpointer and the
    metric sinks, then raise `Preempted`. Collective, like the save itself."""
    # `Trainer.fit` asks after its periodic `maybe_save`, so a periodic step is on disk (or in flight) already;
    # a second save of it would only spend the time SLURM's warning leaves.
    every = checkpointer.cfg.every
    if not (every > 0 and step % every == 0):
        checkpointer.save(step, app_state)
    checkpointer.close()  # finishes an async save
    error = Preempted(step, _received)
    metric_logger.message(str(error))
    # Exit code 0 for the sinks: W&B would mark a nonzero one as a crashed run, and this one resumes.
    metric_logger.close()
    raise error
