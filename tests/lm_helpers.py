"""A model part's loss and logits the way an engine computes them: the model returns hidden states and the loss
component (`models.loss`) multiplies them by the output weight."""

from __future__ import annotations

import torch

from treadle.models.loss import CausalLMLoss, LossOp, logits
from treadle.models.ops import KernelsConfig, build_loss_op


def lm_loss(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    *,
    kernels: KernelsConfig | None = None,
    op: LossOp | None = None,
    **inputs: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, counted tokens) with `kernels.loss` (or `op`)."""
    loss = CausalLMLoss(op or build_loss_op(kernels or KernelsConfig()))
    return loss(model, model(tokens, **inputs), labels)


def lm_logits(model: torch.nn.Module, tokens: torch.Tensor, **inputs: torch.Tensor | None) -> torch.Tensor:
    return logits(model, model(tokens, **inputs))
