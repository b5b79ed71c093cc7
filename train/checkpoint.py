"""Checkpoint save and resume with torch.distributed.checkpoint (DCP).

Layout of one checkpoint, `<dir>/step_<8-digit step>/`:

    .metadata            DCP's global index (written by the coordinator, rank 0)
    __<rank>_<n>.distcp  DCP's per-rank shard files
    rng_rank<r>.pt       rank r's python / numpy / torch CPU / torch CUDA generator states
    treadle.json         step, world size, time, torch version; written last, marks the checkpoint complete
    deepspeed/           with parallel.engine=deepspeed only: ZeRO partitions written by DeepSpeed itself
                         (see `WritesFiles`); DCP then holds the rest of the app state

The app state (engine, scheduler, data loader, trainer) is handed to DCP as a dict of `Stateful`s, so DCP
calls their `state_dict()` / `load_state_dict()` itself. The engine's state holds DTensor shards with their
global placement, which is what lets a checkpoint saved at one data-parallel size be loaded at another: DCP
reads every rank's slice of each tensor from whichever shard files hold it.

Atomicity: every rank writes into `<dir>/.tmp_step_<n>/`; once all ranks are done, rank 0 writes
`treadle.json` and renames the directory to its final name (a rename is atomic on POSIX file systems). A
crash at any point leaves either no step directory or a complete one, and `resume=auto` only ever picks
step directories that hold both `treadle.json` and DCP's `.metadata`. `<dir>` must be a file system that all
ranks see (DCP needs that too: every rank reads `.metadata` on load).

Communication: `dist.barrier()` on the default group around the rename, plus DCP's own plan gather/scatter
and metadata reduce (default group for synchronous saves and all loads; a dedicated gloo group for
`async_save`, whose collectives run in a background thread and must not interleave with the training
loop's collectives on the default group).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.stateful import Stateful

from treadle.train.errors import UserError

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "treadle.json"
DCP_METADATA = ".metadata"
_STEP_DIR = re.compile(r"step_(\d+)")
_TMP_PREFIX = ".tmp_"
_OLD_PREFIX = ".old_"


@dataclass(kw_only=True)
class CheckpointConfig:
    dir: str = "${run.dir}/checkpoints"  # resolved by Hydra before you see it
    every: int = 0  # save every N steps; 0 = never periodically
    save_final: bool = True  # save when training ends
    # "none" | "auto" (newest complete checkpoint in dir, or start fresh) | a path to a step dir
    resume: str = "auto"
    keep_last: int = 3  # keep the newest k complete checkpoints (0 = keep all)
    # resume=auto when the newest complete checkpoint fails to load: false falls back to the previous complete
    # one (with a warning naming both), true refuses to start
    strict_resume: bool = False
    async_save: bool = False  # dcp.async_save: training continues while the write finishes


@runtime_checkable
class WritesFiles(Protocol):
    """A stateful whose state is too large or too layout-specific for DCP (DeepSpeed's ZeRO partitions): it
    writes its own files into the step directory. `save_files` runs before DCP's save, inside the temporary
    directory, so the files are covered by the same atomic rename; `load_files` runs after DCP's load. Both
    are collective."""

    def save_files(self, step_dir: Path) -> None: ...
    def load_files(self, step_dir: Path) -> None: ...


@runtime_checkable
class MatchesCheckpoint(Protocol):
    """A stateful whose `state_dict` layout depends on the checkpoint being loaded (one written by an earlier
    version): `match_checkpoint` is given the checkpoint's DCP keys and its own key prefix before the load."""

    def match_checkpoint(self, saved_keys: set[str], prefix: str) -> None: ...


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def incomplete_reason(path: Path) -> str | None:
    """Why `path` is not a complete checkpoint, or None when it is one."""
    if not path.is_dir():
        return "it does not exist" if not path.exists() else "it is not a directory"
    if not (path / COMPLETE_MARKER).is_file():
        return f"it has no {COMPLETE_MARKER} (the save did not finish)"
    if not (path / DCP_METADATA).is_file():
        return f"it has no DCP {DCP_METADATA} file"
    return None


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """The complete `step_<n>` directories under `root`, oldest step first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.fullmatch(child.name)
        if match and incomplete_reason(child) is None:
            found.append((int(match.group(1)), child))
    return sorted(found)


def _fsync_dir(path: Path) -> None:
    # A rename is atomic but only durable once the parent directory's entry is flushed.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointManager:
    """Saves and restores the trainer's app state; see the module docstring for layout and guarantees.

    Every method that touches a checkpoint is collective: all ranks call it, in the same order, with the
    same arguments (the trainer's step loop guarantees this).
    """

    def __init__(
        self, cfg: CheckpointConfig, *, rank: int, world_size: int, metadata: dict[str, Any] | None = None
    ):
        if cfg.every < 0:
            raise UserError(f"checkpoint.every={cfg.every} must be >= 0; fix: 0 turns periodic saves off")
        if cfg.keep_last < 0:
            raise UserError(f"checkpoint.keep_last={cfg.keep_last} must be >= 0; fix: 0 keeps all")
        if not cfg.resume:
            raise UserError("checkpoint.resume is empty; fix: 'none', 'auto' or a path to a step directory")
        if dist.is_initialized():
            assert (rank, world_size) == (dist.get_rank(), dist.get_world_size()), (
                f"rank/world_size {rank}/{world_size} differ from the process group's "
                f"{dist.get_rank()}/{dist.get_world_size()}"
            )
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.metadata = dict(metadata or {})  # recorded in every checkpoint's marker
        self.root = Path(cfg.dir)
        self._last_saved_step: int | None = None
        self.loaded_from: Path | None = None  # the checkpoint `load` restored (after any fall-back)
        self._pending: tuple[int, Future[Any]] | None = None
        # async_save's collectives run in a background thread while training keeps using the default group;
        # a separate group keeps the two streams of collectives apart. It must be gloo: DCP's async path
        # needs a CPU backend, also on NCCL runs. new_group is itself collective, hence here on all ranks.
        self._async_group: dist.ProcessGroup | None = None
        if cfg.async_save and dist.is_initialized():
            self._async_group = dist.new_group(backend="gloo")

    # ---- saving ----

    def maybe_save(self, step: int, app_state: dict[str, Stateful], *, final: bool = False) -> bool:
        """Save when `step` is a multiple of `every`, or at the end of training; returns whether it saved."""
        periodic = self.cfg.every > 0 and step % self.cfg.every == 0
        if not (periodic or (final and self.cfg.save_final)) or step == self._last_saved_step:
            return False
        self.save(step, app_state)
        return True

    def save(self, step: int, app_state: dict[str, Stateful]) -> None:
        """Write `<dir>/step_<step>/`. With `async_save` this returns once the state is copied to CPU: the
        model and optimizer may be modified right away; the files are finished and renamed in `wait()`.
        """
        self.wait()
        tmp = self.root / f"{_TMP_PREFIX}{step_dir_name(step)}"
        if self.rank == 0:
            # Leftovers of a save that crashed at this step must not mix with this one's files.
            shutil.rmtree(tmp, ignore_errors=True)
        self._barrier()
        tmp.mkdir(parents=True, exist_ok=True)
        torch.save(_rng_state(), tmp / f"rng_rank{self.rank}.pt")
        for stateful in app_state.values():
            if isinstance(stateful, WritesFiles):
                stateful.save_files(tmp)
        self._last_saved_step = step
        if self.cfg.async_save:
            response = dcp.async_save(app_state, checkpoint_id=str(tmp), process_group=self._async_group)
            # With a staging executor DCP returns an AsyncSaveResponse; the default stager stages
            # synchronously and returns the upload future itself.
            future = getattr(response, "upload_completion", response)
            self._pending = (step, future)
        else:
            dcp.save(app_state, checkpoint_id=str(tmp))
            self._finalize(step)

    def wait(self) -> None:
        """Finish the save in flight, if any: wait for its files, then mark it complete and prune."""
        if self._pending is None:
            return
        step, future = self._pending
        self._pending = None
        future.result()
        self._finalize(step)

    def _finalize(self, step: int) -> None:
        tmp = self.root / f"{_TMP_PREFIX}{step_dir_name(step)}"
        final = self.root / step_dir_name(step)
        self._barrier()  # every rank's shard and RNG files are written
        if self.rank == 0:
            self._write_marker(tmp, step)
            if final.exists():
                # A directory cannot be renamed over a non-empty one. Between the two renames no step_<n>
                # exists; a crash there leaves the new checkpoint in .tmp_ and resume falls back one step.
                old = self.root / f"{_OLD_PREFIX}{final.name}"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old)
            else:
                os.replace(tmp, final)
            _fsync_dir(self.root)
            self._prune(step, keep=final)
            logger.info("saved checkpoint %s", final)
        # Pruning sits before the barrier so that every rank sees the final directory listing on return.
        self._barrier()

    def _write_marker(self, tmp: Path, step: int) -> None:
        marker = {
            "step": step,
            "world_size": self.world_size,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "torch": torch.__version__,
            **self.metadata,
        }
        with open(tmp / COMPLETE_MARKER, "w") as f:
            json.dump(marker, f, indent=2)
            f.flush()
            os.fsync(f.fileno())

    def _prune(self, step: int, keep: Path) -> None:
        checkpoints = complete_checkpoints(self.root)
        if checkpoints[-1][0] > step:
            logger.warning(
                "checkpoint.dir %s holds step %d, newer than step %d just saved (resumed from an older step?); "
                "checkpoint.resume=auto will pick step %d",
                self.root,
                checkpoints[-1][0],
                step,
                checkpoints[-1][0],
            )
        if self.cfg.keep_last == 0:
            return
        for _, path in checkpoints[: -self.cfg.keep_last]:
            if path != keep:
                shutil.rmtree(path)
                logger.info("pruned checkpoint %s (checkpoint.keep_last=%d)", path, self.cfg.keep_last)

    # ---- resuming ----

    def resolve_resume(self) -> Path | None:
        """The checkpoint to resume from according to `checkpoint.resume`, or None to start fresh."""
        resume = self.cfg.resume
        if resume == "none":
            return None
        if resume == "auto":
            self._log_skipped()
            checkpoints = complete_checkpoints(self.root)
            return checkpoints[-1][1] if checkpoints else None
        path = Path(resume).expanduser()
        reason = incomplete_reason(path)
        if reason is None:
            return path
        inside = complete_checkpoints(path) if path.is_dir() else []
        fix = (
            f"did you mean its newest step directory {inside[-1][1]}?"
            if inside
            else "pass a complete step directory (one with treadle.json), 'auto' or 'none'"
        )
        raise UserError(
            f"checkpoint.resume={resume!r}: {path} is not a usable checkpoint: {reason}; fix: {fix}"
        )

    def _log_skipped(self) -> None:
        """Name every step directory (or leftover of an unfinished save) that resume=auto passes over."""
        if self.rank != 0 or not self.root.is_dir():
            return
        for child in sorted(self.root.iterdir()):
            if child.name.startswith(_TMP_PREFIX) and _STEP_DIR.fullmatch(child.name[len(_TMP_PREFIX) :]):
                logger.warning("checkpoint.resume=auto skips %s: a save that did not finish", child)
            elif _STEP_DIR.fullmatch(child.name) and (reason := incomplete_reason(child)) is not None:
                logger.warning("checkpoint.resume=auto skips %s: %s", child, reason)

    def load(self, path: Path | str, app_state: dict[str, Stateful]) -> int:
        """Load the checkpoint at `path` into `app_state` in place; returns the step loaded.

        With checkpoint.resume=auto and strict_resume=false, a checkpoint that fails to load (on any rank) is
        passed over for the previous complete one, with a warning naming both; the error is raised when none
        is left. Every rank takes the same decision: the ranks agree on the outcome after each attempt.
        """
        self.wait()
        path = Path(path)
        fall_back = self.cfg.resume == "auto" and not self.cfg.strict_resume
        older = [p for s, p in complete_checkpoints(self.root) if p != path] if fall_back else []
        while True:
            try:
                step: int | None = self._load_one(path, app_state)
                error: ValueError | None = None
            except ValueError as e:
                step, error = None, e
            error = self._first_error(error)
            if error is None:
                assert step is not None
                self.loaded_from = path
                return step
            previous = [p for p in older if _step_of(p) < _step_of(path)]
            if not previous:
                raise error
            if self.rank == 0:
                logger.warning(
                    "checkpoint.resume=auto: %s does not load (%s); resuming from the previous complete "
                    "checkpoint %s instead (checkpoint.strict_resume=true refuses to start instead)",
                    path,
                    error,
                    previous[-1],
                )
            path = previous[-1]

    def _first_error(self, error: ValueError | None) -> ValueError | None:
        """This rank's error, or the lowest failing rank's where this one loaded: a checkpoint that fails
        anywhere is passed over everywhere (an RNG file is read per rank, after DCP's collective load)."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return error
        messages: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(messages, None if error is None else str(error))
        if error is not None:
            return error
        failed = next((m for m in messages if m is not None), None)
        return None if failed is None else ValueError(failed)

    def _load_one(self, path: Path, app_state: dict[str, Stateful]) -> int:
        fix = (
            "fix: resume from another step directory (checkpoint.resume=<dir>/step_<n>) or start fresh with "
            "checkpoint.resume=none"
        )
        reason = incomplete_reason(path)
        if reason is not None:
            raise UserError(f"checkpoint {path} cannot be loaded: {reason}; {fix}")
        try:
            with open(path / COMPLETE_MARKER) as f:
                marker = json.load(f)
            step, saved_world_size = int(marker["step"]), int(marker["world_size"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"checkpoint {path}: unreadable {COMPLETE_MARKER} ({e}); {fix}") from e
        if "base_model" in self.metadata and marker.get("base_model") != self.metadata["base_model"]:
            raise UserError(
                f"checkpoint {path} holds adapters for base model {marker.get('base_model')!r}, but this run's "
                f"model.pretrained is {self.metadata['base_model']!r}; fix: set model.pretrained to the base the "
                f"adapters were trained on, or {fix.removeprefix('fix: ')}"
            )
        try:
            saved_keys = set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
            for name, stateful in app_state.items():
                if isinstance(stateful, MatchesCheckpoint):
                    stateful.match_checkpoint(saved_keys, name)
            dcp.load(app_state, checkpoint_id=str(path))
            for stateful in app_state.values():
                if isinstance(stateful, WritesFiles):
                    stateful.load_files(path)
        # CheckpointException (DCP's failure on any rank, raised on all of them) is a BaseException.
        except (Exception, CheckpointException) as e:
            raise UserError(
                f"checkpoint {path} is corrupt or does not match the model/optimizer/app state being "
                f"resumed ({_describe(e)}); {fix}"
            ) from e
        self._restore_rng(path, saved_world_size, fix)
        # The loaded step is on disk already: a final save right after resuming would only rewrite it.
        self._last_saved_step = step
        if self.rank == 0:
            logger.info("resumed from checkpoint %s at step %d", path, step)
        return step

    def _restore_rng(self, path: Path, saved_world_size: int, fix: str) -> None:
        # Data order comes from the seed and the consumed-sample count, not from these generators, so a
        # resume that cannot restore them stays correct; only dropout-like randomness differs from an
        # unbroken run.
        rng_file = path / f"rng_rank{self.rank}.pt"
        if saved_world_size != self.world_size:
            if self.rank == 0:
                logger.warning(
                    "checkpoint %s was saved by %d ranks, this run has %d: RNG states are not restored "
                    "(the current ones are kept)",
                    path,
                    saved_world_size,
                    self.world_size,
                )
            return
        if not rng_file.is_file():
            logger.warning("checkpoint %s has no %s: RNG states are not restored", path, rng_file.name)
            return
        try:
            _set_rng_state(torch.load(rng_file, weights_only=True))
        except Exception as e:
            raise UserError(f"checkpoint {path}: unreadable {rng_file.name} ({e}); {fix}") from e

    def close(self) -> None:
        """Finish any save in flight and release the async group."""
        self.wait()
        if self._async_group is not None:
            dist.destroy_process_group(self._async_group)
            self._async_group = None

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()


def _step_of(path: Path) -> int:
    match = _STEP_DIR.fullmatch(path.name)
    return int(match.group(1)) if match else -1


def _describe(e: BaseException) -> str:
    """One line for an error message; DCP's own text is a traceback per rank."""
    if isinstance(e, CheckpointException) and e.failures:
        rank, (cause, _) = min(e.failures.items())
        return f"rank {rank}: {_describe(cause)}"
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        # Plain lists instead of a numpy array, so the file loads with torch.load(weights_only=True).
        "numpy": (name, keys.tolist(), pos, has_gauss, cached_gaussian),
        "torch": torch.get_rng_state(),
    }
    # Only when CUDA is in use: querying it would otherwise create a CUDA context on every rank.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
