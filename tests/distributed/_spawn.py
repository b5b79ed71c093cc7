"""Run a function on N local processes joined in a real process group (gloo on CPU by default).

    def body(rank: int, world_size: int, tmp: Path) -> float: ...   # module level: spawned processes import it
    results = run_distributed(body, 2, tmp_path)                   # [rank 0's return value, rank 1's]

Each rank gets MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE in its environment, so code
under test that calls `init_process_group()` itself also works (pass `init=False`). A failure on any rank
fails the caller with that rank's traceback, and the other ranks are terminated instead of being left in a
collective. A run that outlives `deadline_s` (a rank stuck outside any collective, e.g. waiting on a stale
C++-extension build lock) fails with every rank's Python stack instead of hanging the test session.
"""

from __future__ import annotations

import faulthandler
import os
import pickle
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    # The OS picks an unused port; another process could take it before rank 0 binds it, which is rare
    # enough on a test machine (torch's own test suites do the same).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    rank: int,
    fn: Callable[..., Any],
    world_size: int,
    port: int,
    backend: str,
    init: bool,
    timeout_s: float,
    result_dir: str,
    args: tuple[Any, ...],
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    # run_distributed asks a rank that overruns its deadline for its stack with SIGUSR1.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    # N processes share the machine's cores; unbounded intra-op threads would oversubscribe them.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    if init:
        dist.init_process_group(
            backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s)
        )
    try:
        result = fn(rank, world_size, *args)
        if dist.is_initialized():
            # Rank 0 hosts the rendezvous store: it must not exit while other ranks still use the group.
            dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    with open(Path(result_dir) / f"rank{rank}.pkl", "wb") as f:
        pickle.dump(result, f)
    # Leave without interpreter teardown: a rank's result is on disk, and letting Python finalise with the
    # process group's C++ threads (gloo, the TCP store) still joinable occasionally aborts the process
    # ("terminate called without an active exception", SIGABRT) after the test itself has passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    init: bool = True,
    timeout_s: float = 120.0,
    deadline_s: float = 900.0,
) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` spawned processes; returns their results by rank.

    `fn` and `args` must be picklable (`fn` defined at module level). `timeout_s` bounds every collective,
    so a rank stuck waiting for a peer fails instead of hanging the test run; `deadline_s` bounds the whole
    run (DeepSpeed's first use compiles its C++ ops, a few minutes on two cores, hence the margin).
    """
    with tempfile.TemporaryDirectory(prefix="treadle_spawn_") as result_dir:
        context = mp.spawn(
            _worker,
            args=(fn, world_size, free_port(), backend, init, timeout_s, result_dir, args),
            nprocs=world_size,
            join=False,
        )
        deadline = time.monotonic() + deadline_s
        # join returns at each rank's exit (False while others run) or when the time left is up.
        while not context.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                _fail_overdue(context, deadline_s)
        results = []
        for rank in range(world_size):
            with open(Path(result_dir) / f"rank{rank}.pkl", "rb") as f:
                results.append(pickle.load(f))
        return results


def _fail_overdue(context: mp.ProcessContext, deadline_s: float) -> NoReturn:
    """Print every live rank's stack (faulthandler, to the inherited stderr), stop the ranks, and fail."""
    alive = [rank for rank, process in enumerate(context.processes) if process.is_alive()]
    for rank in alive:
        os.kill(context.processes[rank].pid, signal.SIGUSR1)
    time.sleep(2.0)  # let the stacks reach stderr before the processes go
    for process in context.processes:
        if process.is_alive():
            process.kill()
        process.join()
    raise TimeoutError(
        f"ranks {alive} still running after {deadline_s:.0f} s; their Python stacks are printed above "
        "(a rank waiting in torch/utils/file_baton.py is blocked by a stale C++-extension build lock: delete "
        "the `lock` file in TORCH_EXTENSIONS_DIR's op folder)"
    )
