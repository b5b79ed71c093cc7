"""`Batch`: one micro-batch of token rows, as the data pipeline yields it and the engines consume it."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    tokens: torch.Tensor  # [B, S] int64
    labels: torch.Tensor  # [B, S] int64, IGNORE_INDEX where no loss is taken
    positions: torch.Tensor  # [B, S] int64, RoPE positions (restart per document with document_mask)
    doc_ids: torch.Tensor | None  # [B, S] int64 document index within the row, or None without document_mask

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> Batch:
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=non_blocking)

        doc_ids = None if self.doc_ids is None else move(self.doc_ids)
        return Batch(move(self.tokens), move(self.labels), move(self.positions), doc_ids)

    @property
    def num_tokens(self) -> int:
        return self.tokens.numel()
