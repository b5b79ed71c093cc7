"""Activation checkpointing applied per transformer block (recompute the block's forward in backward)."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

AC_MODES = ("none", "full")


@dataclass(kw_only=True)
class MemoryConfig:
    # none: keep every activation; full: keep only each block's input and recompute the block in backward
    # (saves activation memory at about one extra forward of compute, i.e. ~33% more FLOPs).
    activation_checkpoint: str = "none"

    def validate(self) -> None:
        if self.activation_checkpoint not in AC_MODES:
            raise ValueError(
                f"memory.activation_checkpoint={self.activation_checkpoint!r} is not one of {AC_MODES}"
            )


def apply_activation_checkpointing(blocks: nn.ModuleDict, cfg: MemoryConfig) -> None:
    """Wrap each block in place. Non-reentrant checkpointing: it composes with FSDP2 and torch.compile."""
    if cfg.activation_checkpoint == "none":
        return
    for name, block in blocks.items():
        blocks[name] = checkpoint_wrapper(block, preserve_rng_state=False)
