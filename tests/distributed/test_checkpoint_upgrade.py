"""A checkpoint written before pipeline parallelism (the optimizer's param groups stored by index,
`optim.param_groups.0.lr`, as `get_state_dict` nests them) resumes in today's per-parameter layout and continues
exactly as the uninterrupted run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from _spawn import run_distributed

from treadle.train.build import build_trainer
from treadle.train.config import load_config, validate

pytestmark = pytest.mark.slow

BASE = [
    "+config=debug/tiny",
    "trainer.eval_batches=1",
    "trainer.eval_every=0",
    "logging.every=1",
    "logging.progress_bar=false",
    "logging.wandb.mode=disabled",
    "checkpoint.save_final=false",
]


def _train(rank: int, world_size: int, overrides: list[str], grouped_layout: bool) -> list[float]:
    cfg = load_config(BASE + overrides)
    trainer = build_trainer(cfg, validate(cfg, world_size), torch.device("cpu"))
    # The layout earlier versions saved: the engine's state_dict in its by-index (loading) mode throughout.
    trainer.engine._load_grouped_optimizer_state = grouped_layout
    return trainer.fit()


def test_a_checkpoint_of_the_earlier_optimizer_layout_resumes_exactly(tmp_path: Path) -> None:
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    reference = run_distributed(
        _train, 1, [f"run.dir={tmp_path / 'ref'}", cache, "trainer.max_steps=4", "checkpoint.every=0"], False
    )[0]
    run = [f"run.dir={tmp_path / 'old'}", cache, "checkpoint.every=2"]
    first = run_distributed(_train, 1, [*run, "trainer.max_steps=2"], True)[0]
    saved = dcp.FileSystemReader(str(tmp_path / "old" / "checkpoints" / "step_00000002")).read_metadata()
    assert "engine.optim.param_groups.0.lr" in saved.state_dict_metadata  # the earlier layout
    resumed = run_distributed(_train, 1, [*run, "trainer.max_steps=4"], False)[0]
    assert first + resumed == reference
