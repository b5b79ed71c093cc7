"""The training loop: one explicit `train_step` that reads top to bottom.

Loss normalisation: the engine's loss gives a summed loss per micro-batch. Every micro-batch's loss is divided
by the number of counted tokens in the whole global batch (all micro-batches, all data-parallel ranks), so the
gradient is that of the global mean loss whatever the split into ranks and accumulation steps. Gradient
reduction averages over the `dp_cp` ranks, so the local loss is multiplied by that size to cancel it. The
engine runs the step's forward and backward (`Engine.forward_backward`) with that scale.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from treadle.models.ops import IGNORE_INDEX
from treadle.parallel.dims import ParallelDims
from treadle.parallel.engine import Engine
from treadle.train import preemption
from treadle.train.checkpoint import CheckpointManager
from treadle.train.config import TrainerConfig
from treadle.train.data import Batch, StepLoader, eval_batches
from treadle.train.errors import UserError
from treadle.train.loggers import MetricLogger
from treadle.train.metrics import Throughput, memory_stats, peak_flops

logger = logging.getLogger(__name__)


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    lr: float
    num_tokens: int  # tokens processed in the step over all data-parallel ranks (ignored labels included)
    skipped: bool
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # the engine's post-step metrics


class Trainer:
    def __init__(
        self,
        cfg: TrainerConfig,
        *,
        engine: Engine,
        model_parts: list[torch.nn.Module],
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        train_loader: StepLoader,
        val_dataset: Any,
        dims: ParallelDims,
        device: torch.device,
        checkpointer: CheckpointManager,
        metric_logger: MetricLogger,
        flops_per_token: float,
    ):
        self.cfg, self.engine, self.model_parts = cfg, engine, model_parts
        self.scheduler, self.train_loader, self.val_dataset = scheduler, train_loader, val_dataset
        self.dims, self.device = dims, device
        self.checkpointer, self.metric_logger, self.flops_per_token = (
            checkpointer,
            metric_logger,
            flops_per_token,
        )
        self.loss_group = dims.mesh("dp_cp").get_group()
        # Every context-parallel rank of a data-parallel rank holds the same (unsharded) batch: tokens are
        # counted over the data-parallel ranks only.
        self.count_group = dims.mesh("dp").get_group()
        self.step = 0
        self.consecutive_skips = 0

    # The trainer's own resumable state; DCP calls these through the checkpoint's app state.
    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "consecutive_skips": self.consecutive_skips}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step = int(state_dict["step"])
        self.consecutive_skips = int(state_dict["consecutive_skips"])

    def app_state(self) -> dict[str, Any]:
        return {
            "engine": self.engine,
            "scheduler": self.scheduler,
            "data": self.train_loader,
            "trainer": self,
        }

    def _all_reduce_sum(self, value: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
        dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group or self.loss_group)
        return value

    def forward_backward(self, batches: list[Batch]) -> float:
        """Accumulate gradients over this rank's micro-batches; returns the global mean loss."""
        batches = [b.to(self.device) for b in batches]
        # Counted on the device: an int() per micro-batch would stall the host on a GPU every time.
        local_count = sum((b.labels != IGNORE_INDEX).sum(dtype=torch.float64) for b in batches)
        global_count = self._all_reduce_sum(local_count, self.count_group).clamp(min=1)
        scale = self.loss_group.size() / global_count
        loss_sum = self.engine.forward_backward(batches, scale)
        return (self._all_reduce_sum(loss_sum) / global_count).item()

    def train_step(self) -> StepResult:
        batches = self.train_loader.next_step()
        lr = self.scheduler.get_last_lr()[0]
        loss = self.forward_backward(batches)
        stats = self.engine.step()
        self.scheduler.step()
        num_tokens = self.train_loader.global_batch_size * batches[0].tokens.shape[1]
        return StepResult(
            loss=loss,
            grad_norm=stats.grad_norm,
            lr=lr,
            num_tokens=num_tokens,
            skipped=stats.skipped,
            metrics=stats.metrics,
        )

    def _handle_non_finite(self, result: StepResult) -> None:
        if not result.skipped:
            self.consecutive_skips = 0
            return
        self.consecutive_skips += 1
        detail = (
            f"step {self.step}: loss={result.loss} grad_norm={result.grad_norm} is not finite; the update was "
            f"skipped ({self.consecutive_skips} in a row)"
        )
        if self.cfg.nan_policy == "abort" or self.consecutive_skips >= self.cfg.max_consecutive_skips:
            raise UserError(
                f"{detail}; stopping (trainer.nan_policy={self.cfg.nan_policy}, trainer.max_consecutive_skips="
                f"{self.cfg.max_consecutive_skips}). Fix: lower optim.lr, raise optim.schedule.warmup_steps, "
                f"check the data, or resume from an earlier checkpoint with checkpoint.resume=<step dir>"
            )
        self.metric_logger.message(f"warning: {detail}")

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss over the first `eval_batches` × micro-batch held-out samples, the same on every layout
        (`train.data.eval_batches`); empty when there is no held-out split (`data.val_fraction=0`)."""
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        count = torch.zeros((), dtype=torch.float64, device=self.device)
        for batch in eval_batches(
            self.val_dataset,
            micro_batch_size=self.cfg.micro_batch_size,
            dp_rank=self.dims.dp_rank(),
            dp_size=self.dims.dp_size,
            num_batches=self.cfg.eval_batches,
        ):
            micro_loss, micro_count = self.engine.eval_loss(batch.to(self.device))
            loss_sum += micro_loss.double()
            count += micro_count.double()
        count = self._all_reduce_sum(count)
        if count.item() == 0:
            return {}
        loss = (self._all_reduce_sum(loss_sum) / count).item()
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}

    def fit(self) -> list[float]:
        """Train from `self.step` to `cfg.max_steps`; returns this call's per-step losses."""
        if self.step >= self.cfg.max_steps:
            self.metric_logger.message(
                f"already complete at step {self.step}; nothing to train — raise trainer.max_steps or use a "
                "new run.name"
            )
            self.checkpointer.close()
            self.metric_logger.close()
            return []
        losses = []
        # Tokens are counted globally per step, so the rate needs no further scaling (world_tokens_factor=1).
        throughput = Throughput(
            flops_per_token=self.flops_per_token,
            device=self.device,
            peak_flops_per_device=peak_flops(self.device),
            num_devices=self.dims.world_size,
        )
        while self.step < self.cfg.max_steps:
            result = self.train_step()
            self.step += 1
            losses.append(result.loss)
            throughput.update(self.step, result.num_tokens)
            self._handle_non_finite(result)
            if self.step % self.metric_logger.cfg.every == 0 or self.step == self.cfg.max_steps:
                self._log(result, throughput.compute())
            with throughput.paused():
                if self.cfg.eval_every and self.step % self.cfg.eval_every == 0:
                    self._log_eval()
                self.checkpointer.maybe_save(self.step, self.app_state())
            if preemption.requested(self.device):  # SIGUSR1/SIGTERM on any rank: all stop at this step
                # Saves this step's checkpoint, raises Preempted.
                preemption.stop(self.step, self.checkpointer, self.app_state(), self.metric_logger)
        if not self.cfg.eval_every or self.cfg.max_steps % self.cfg.eval_every:
            self._log_eval()
        self.checkpointer.maybe_save(self.step, self.app_state(), final=True)
        self.checkpointer.close()
        self.metric_logger.close()
        return losses

    def _log_eval(self) -> None:
        metrics = self.evaluate()
        if metrics:
            self.metric_logger.log_eval(self.step, metrics)

    def _log(self, result: StepResult, rates: dict[str, float | None]) -> None:
        self.metric_logger.log(
            self.step,
            {
                "loss": result.loss,
                "grad_norm": result.grad_norm,
                "lr": result.lr,
                "skipped": int(result.skipped),
                **{name: float(value) for name, value in result.metrics.items()},
                **rates,
                **memory_stats(self.device),
            },
        )
