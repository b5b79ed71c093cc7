"""The loss component: next-token cross-entropy of the last model part's hidden states through its output
projection. The model returns hidden states; the engine applies this to the last part, so that pipeline
schedules and other engines can own where the loss runs.

Shape legend: B batch, S sequence, E model dim, N tokens (B·S), V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from treadle.models.ops import IGNORE_INDEX

# (hidden_ND, weight_VE, labels_N, *, ignore_index) -> (summed loss, number of counted tokens): `kernels.loss`'s
# implementations (models/ops.py), or the vocabulary-parallel one under TP (parallel/loss.py).
LossOp = Callable[..., tuple[torch.Tensor, torch.Tensor]]


class CausalLMLoss:
    """Summed loss and counted tokens of `labels_BS` (IGNORE_INDEX not counted), so the Trainer can normalise
    by the token count of the whole global batch. `op` fuses the output projection with the cross-entropy
    (the [N, V] logits need not be materialised)."""

    def __init__(self, op: LossOp) -> None:
        self.op = op

    def __call__(
        self, part: nn.Module, hidden_BSE: torch.Tensor, labels_BS: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.op(
            hidden_BSE.flatten(0, 1), part.output_weight, labels_BS.flatten(), ignore_index=IGNORE_INDEX
        )


def logits(part: nn.Module, hidden_BSE: torch.Tensor) -> torch.Tensor:
    """[B, S, V] logits of the last part's hidden states (inference, tests)."""
    return hidden_BSE @ part.output_weight.t()
