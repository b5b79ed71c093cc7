"""A second model family, written here in a few lines (its own config class, module and TP plan, registered as a
`ModelSpec`), trains through the unchanged trainer under FSDP and under TP on gloo: the proof that a family is
one folder and that generic code names none of a model's modules.

Parity: the same fp32 run on one process, with ZeRO-3 on 2 ranks and with TP (+SP) on 2 ranks; tolerance as in
test_parity.py (only summation order differs: 1e-4 relative over the steps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _spawn import run_distributed

from treadle.models import ModelSpec, register_model
from treadle.models.init import fill_
from treadle.models.ops import KernelsConfig, Ops, build_ops
from treadle.train.build import build_trainer
from treadle.train.config import load_config, validate

pytestmark = pytest.mark.slow
STEPS = 6
RTOL = 1e-4


@dataclass(kw_only=True)
class ToyConfig:
    name: str = "toy"
    dim: int = 32
    hidden: int = 64
    num_layers: int = 2
    vocab_size: int = 258
    pretrained: str | None = None


class Norm(nn.Module):
    def __init__(self, dim: int, ops: Ops):
        super().__init__()
        self.weight, self.ops = nn.Parameter(torch.empty(dim)), ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rmsnorm(x, self.weight, 1e-6)


class Mixer(nn.Module):
    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.up, self.down = (
            nn.Linear(cfg.dim, cfg.hidden, bias=False),
            nn.Linear(cfg.hidden, cfg.dim, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.up(x)))


class Block(nn.Module):
    def __init__(self, cfg: ToyConfig, ops: Ops):
        super().__init__()
        self.pre, self.mixer = Norm(cfg.dim, ops), Mixer(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mixer(self.pre(x))


class Toy(nn.Module):
    """Embedding, residual MLP blocks (no attention), final norm, untied output."""

    def __init__(self, cfg: ToyConfig, kernels: KernelsConfig):
        super().__init__()
        self.cfg, self.ops = cfg, build_ops(kernels)
        self.tok = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleDict({str(i): Block(cfg, self.ops) for i in range(cfg.num_layers)})
        self.final, self.head = Norm(cfg.dim, self.ops), nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    @property
    def output_weight(self) -> torch.Tensor:
        return self.head.weight

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        for name, param in self.named_parameters():
            fill_(param, name, seed, std=None if name.endswith(("pre.weight", "final.weight")) else 0.05)

    def forward(self, tokens_BS, *, positions_BS=None, doc_ids_BS=None) -> torch.Tensor:
        h = self.tok(tokens_BS)
        for block in self.layers.values():
            h = block(h)
        return self.final(h)


UPDATES: list[int] = []  # one entry per optimizer update, appended by the spec's post-step hook


def _count_update(model_parts: list[nn.Module], dims) -> None:
    assert len(model_parts) == 1
    UPDATES.append(1)


def _validate(cfg: ToyConfig, dims, *, seq_len: int, cp_variant: str) -> None:
    if cfg.hidden % dims.tp or cfg.vocab_size % dims.tp:
        raise ValueError(f"parallel.tp={dims.tp} must divide model.hidden and model.vocab_size")


register_model(
    ModelSpec(
        name="toy",
        config_cls=ToyConfig,
        build=Toy,
        flops_per_token=lambda cfg, seq_len: 6.0 * cfg.num_layers * 2 * cfg.dim * cfg.hidden,
        validate=_validate,
        tp_plan={
            "tok": "embedding",
            "final": "final_norm",
            "head": "output",
            "layers.*.pre": "norm",
            "layers.*.mixer": "sublayer_input",
            "layers.*.mixer.up": "colwise",
            "layers.*.mixer.down": "rowwise",
        },
        post_step=(_count_update,),
    )
)

OVERRIDES = [
    "data.seq_len=32",
    "trainer.micro_batch_size=2",
    "trainer.global_batch_size=8",
    f"trainer.max_steps={STEPS}",
    "trainer.eval_batches=1",
    "optim.lr=3e-3",
    "optim.schedule.warmup_steps=2",
    "logging.progress_bar=false",
    "logging.wandb.mode=disabled",
    "checkpoint.every=0",
    "checkpoint.save_final=false",
]


def _train(rank: int, world_size: int, overrides: list[str]) -> list[float]:
    cfg = load_config(OVERRIDES + overrides)
    cfg.model = ToyConfig()
    dims = validate(cfg, world_size)
    trainer = build_trainer(cfg, dims, torch.device("cpu"))
    losses = trainer.fit()
    assert len(UPDATES) == STEPS, f"the post-step hook ran {len(UPDATES)} times in {STEPS} steps"
    return losses


def _run(world_size: int, tmp: Path, cache: Path, *overrides: str) -> list[float]:
    args = [f"run.dir={tmp}", f"data.cache_dir={cache}", *overrides]
    return run_distributed(_train, world_size, args)[0]


def test_a_family_defined_in_a_test_trains_under_fsdp_and_tp(tmp_path):
    cache = tmp_path / "cache"
    reference = _run(1, tmp_path / "ref", cache)
    assert all(math.isfinite(x) for x in reference) and reference[-1] < reference[0]
    fsdp = _run(2, tmp_path / "fsdp", cache, "parallel=fsdp")
    tp = _run(2, tmp_path / "tp", cache, "parallel.tp=2", "parallel.sequence_parallel=true")
    torch.testing.assert_close(torch.tensor(fsdp), torch.tensor(reference), rtol=RTOL, atol=0)
    torch.testing.assert_close(torch.tensor(tp), torch.tensor(reference), rtol=RTOL, atol=0)
