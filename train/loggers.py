"""Metric sinks for a run: `metrics.jsonl`, the console, Weights & Biases and TensorBoard, from rank 0."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from tqdm import tqdm

logger = logging.getLogger(__name__)

Metrics = dict[str, float | int | None]

_WANDB_MODES = ("offline", "online", "disabled")


@dataclass(kw_only=True)
class WandbConfig:
    mode: str = "offline"  # offline | online | disabled
    project: str = "treadle"
    entity: str | None = None
    name: str | None = None  # defaults to the run dir's name
    tags: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class LoggingConfig:
    every: int = 10  # log interval in steps
    progress_bar: bool = True
    tensorboard: bool = False
    wandb: WandbConfig = field(default_factory=WandbConfig)


def check_logging_config(cfg: LoggingConfig) -> None:
    """The sinks' settings and packages; `validate` calls it at start, the logger again."""
    # Checked on every rank, not only the writing one, so that a bad setting stops all ranks alike instead
    # of rank 0 raising while the others wait for it in a collective.
    if cfg.every < 1:
        raise ValueError(f"logging.every must be >= 1, got {cfg.every}")
    if cfg.wandb.mode not in _WANDB_MODES:
        raise ValueError(f"logging.wandb.mode must be one of {_WANDB_MODES}, got {cfg.wandb.mode!r}")
    if cfg.wandb.mode != "disabled" and importlib.util.find_spec("wandb") is None:
        raise ValueError(
            f"logging.wandb.mode={cfg.wandb.mode} needs the wandb package: `pip install wandb`, "
            "or set logging.wandb.mode=disabled"
        )
    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ValueError(
            "logging.tensorboard=true needs the tensorboard package: `pip install tensorboard`, "
            "or set logging.tensorboard=false"
        )


def _fmt_count(x: float) -> str:
    for threshold, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= threshold:
            return f"{x / threshold:.3g}{suffix}"
    return f"{x:.3g}"


def _fmt_float(x: float) -> str:
    if x == 0 or not math.isfinite(x) or 1e-3 <= abs(x) < 1e4:
        return f"{x:.4g}"
    return f"{x:.2e}"


# Keys shown in the compact console summary, in this order, with their labels and formatters.
_SUMMARY: tuple[tuple[str, str, Callable[[float], str]], ...] = (
    ("loss", "loss", lambda x: f"{x:.4f}"),
    ("lr", "lr", lambda x: f"{x:.2e}"),
    ("grad_norm", "gnorm", _fmt_float),
    ("tokens_per_s", "tok/s", _fmt_count),
    ("mfu", "mfu", lambda x: f"{100 * x:.1f}%"),
    ("memory_max_reserved_gib", "mem", lambda x: f"{x:.1f}GiB"),
    ("memory_max_rss_gib", "mem", lambda x: f"{x:.1f}GiB"),
    ("moe/max_load", "moe_load", lambda x: f"{x:.2f}"),
    ("moe/aux_loss", "aux", lambda x: f"{x:.4f}"),
)


def _summary(metrics: Metrics, sep: str) -> str:
    parts = [f"{label}={fmt(metrics[key])}" for key, label, fmt in _SUMMARY if metrics.get(key) is not None]
    return sep.join(parts)


class MetricLogger:
    """Writes metrics from rank 0 to every configured sink; on other ranks every method does nothing.

    Sinks:
    - `<run_dir>/metrics.jsonl`, always: one JSON object per `log`/`log_eval` call, flushed per line and
      opened in append mode, so a crash loses nothing and a resumed run continues the same file (steps
      between the last checkpoint and a crash then appear twice; the later line is the one that counts).
      Each line holds `kind`, `step`, `time` (Unix seconds) and the metrics; None is written as null,
      non-finite floats as Python's json writes them (NaN, Infinity).
    - the console: a tqdm bar (total `total_steps`, starting at `start_step`) whose postfix shows
      loss/lr/gnorm/tok/s/mfu/mem, when `progress_bar` is on and stderr (where the bar draws) is a TTY;
      otherwise, as in a SLURM log file, one compact `logging` INFO line per call instead.
    - Weights & Biases unless `wandb.mode=disabled`, in `<run_dir>/wandb`. The run id is kept in
      `<run_dir>/wandb/run_id` so that a resumed run (`start_step` > 0) continues the same W&B run (W&B drops values for
      steps at or below the last one it holds, so steps repeated after a crash keep their first value).
    - TensorBoard in `<run_dir>/tensorboard` when `tensorboard` is on.
    W&B and TensorBoard skip None values.

    Train and eval metrics are told apart as follows (pass bare names such as `loss` to both methods):
    - `log(step, {"loss": ...})`: jsonl `{"kind": "train", "step": ..., "loss": ...}`; W&B/TB key `loss`.
    - `log_eval(step, {"loss": ...})`: jsonl `{"kind": "eval", "step": ..., "val_loss": ...}`; W&B/TB
      key `val/loss`, so eval curves form their own section and never collide with train keys.
    """

    def __init__(
        self,
        cfg: LoggingConfig,
        *,
        run_dir: Path,
        rank: int,
        config_dict: dict[str, Any],
        total_steps: int,
        start_step: int = 0,
    ) -> None:
        check_logging_config(cfg)
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.total_steps = total_steps
        self.active = rank == 0
        self._closed = False
        self._bar: tqdm | None = None
        self._bar_step = start_step
        self._start_step = start_step
        self._wandb_run: Any = None
        self._tb_writer: Any = None
        if not self.active:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        if cfg.progress_bar and sys.stderr.isatty():
            self._bar = tqdm(
                total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stderr
            )
        if cfg.wandb.mode != "disabled":
            self._wandb_run = self._init_wandb(config_dict)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb_writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def _init_wandb(self, config_dict: dict[str, Any]) -> Any:
        import wandb

        wandb_cfg = self.cfg.wandb
        wandb_dir = self.run_dir / "wandb"
        wandb_dir.mkdir(exist_ok=True)
        id_file = wandb_dir / "run_id"
        # A resumed run (start_step > 0) continues its W&B run; a run that starts over in this directory is a
        # new W&B run, not more steps 1..N appended to (and dropped by) the old one.
        if id_file.exists() and self._start_step > 0:
            run_id = id_file.read_text().strip()
        else:
            run_id = secrets.token_hex(4)
            id_file.write_text(run_id + "\n")
        # An offline run prints only where to find its files, which the jsonl next to it makes redundant;
        # online, the run's URL is worth the lines.
        settings = wandb.Settings(silent=wandb_cfg.mode == "offline")
        return wandb.init(
            mode=wandb_cfg.mode,
            dir=str(self.run_dir),
            project=wandb_cfg.project,
            entity=wandb_cfg.entity,
            name=wandb_cfg.name or self.run_dir.name,
            tags=list(wandb_cfg.tags),
            config=config_dict,
            id=run_id,
            resume="allow",
            settings=settings,
        )

    def log(self, step: int, metrics: Metrics) -> None:
        """Log training metrics of optimizer step `step` (e.g. loss, lr, grad_norm, throughput, memory)."""
        if not self.active:
            return
        self._write_line("train", step, metrics)
        self._send(step, metrics)
        if self._bar is not None:
            self._bar.set_postfix_str(_summary(metrics, " "), refresh=False)
            self._bar.update(step - self._bar_step)
            self._bar_step = step
        else:
            logger.info("step %d/%d | %s", step, self.total_steps, _summary(metrics, " | "))

    def log_eval(self, step: int, metrics: Metrics) -> None:
        """Log evaluation metrics measured after optimizer step `step`; see the class docstring for keys."""
        if not self.active:
            return
        self._write_line("eval", step, {f"val_{k}": v for k, v in metrics.items()})
        self._send(step, {f"val/{k}": v for k, v in metrics.items()})
        text = " ".join(f"{k}={_fmt_float(v)}" for k, v in metrics.items() if v is not None)
        self.message(f"eval step {step} | {text}")

    def message(self, text: str) -> None:
        """Print `text` on rank 0 without breaking the progress bar."""
        if not self.active:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            logger.info(text)

    def close(self, *, exit_code: int = 0) -> None:
        """Close every sink; a nonzero `exit_code` marks the W&B run as failed. Safe to call twice."""
        if not self.active or self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        self._jsonl.close()
        if self._tb_writer is not None:
            self._tb_writer.close()
        if self._wandb_run is not None:
            self._wandb_run.finish(exit_code=exit_code)

    def __enter__(self) -> MetricLogger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(exit_code=0 if exc_type is None else 1)

    def _write_line(self, kind: str, step: int, metrics: Metrics) -> None:
        reserved = {"kind", "step", "time"} & metrics.keys()
        assert not reserved, f"metric names {sorted(reserved)} are reserved for the jsonl record"
        record = {"kind": kind, "step": step, "time": round(time.time(), 3), **metrics}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()

    def _send(self, step: int, metrics: Metrics) -> None:
        values = {k: v for k, v in metrics.items() if v is not None}
        if self._wandb_run is not None:
            self._wandb_run.log(values, step=step)
        if self._tb_writer is not None:
            for key, value in values.items():
                self._tb_writer.add_scalar(key, value, global_step=step)
