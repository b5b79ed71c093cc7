"""MoE under pipeline parallelism against a single process: per-step losses, gradient norms and the logged MoE
statistics (expert load per layer, auxiliary loss: reduced over `pp`, so rank 0 reports every stage's layers) of
pp=2 (1F1B), of pp=2 × ep=2 (each stage's experts sharded over its two ranks) and of ZBVZeroBubble (two stages per
rank) equal one process's over 10 steps.

The model has a dense first layer, a shared expert, the auxiliary loss (`AddAuxiliaryLoss` carries it from each
stage's output) and the auxiliary-loss-free bias on, with MoE layers on both stages. Tolerance as in
test_pipeline.py: fp32, only the order of sums differs. Routing is discrete and the bias moves by the sign of
integer counts. The coefficients are larger than a recipe's so that the auxiliary loss moves training: with its
gradient dropped on the stages (weight 0) the losses differ by 1e-3 relative and the logged load by 15-30 %;
without the bias update under PP, by 5e-4 and 20 %; a correct run is within 3e-7.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _spawn import run_distributed
from torch.torch_version import TorchVersion

from treadle.parallel.pipeline import GLOO_MIN_TORCH
from treadle.train.build import build_trainer
from treadle.train.config import load_config, validate

pytestmark = pytest.mark.slow
STEPS = 10
RTOL = 1e-4

BASE = [
    "model=moe_tiny",
    "model.dim=32",
    "model.num_layers=4",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.ffn_dim=64",
    "model.num_experts=4",
    "model.moe_ffn_dim=16",
    "model.aux_loss_coeff=0.1",
    "model.z_loss_coeff=0.01",
    "model.bias_update_rate=0.01",
    "data.seq_len=16",
    "trainer.micro_batch_size=2",
    "trainer.global_batch_size=8",
    f"trainer.max_steps={STEPS}",
    "trainer.eval_batches=1",
    "optim.lr=3e-3",
    "optim.schedule.warmup_steps=2",
    "logging.every=1",
    "logging.progress_bar=false",
    "logging.wandb.mode=disabled",
    "checkpoint.every=0",
    "checkpoint.save_final=false",
    # Eager: compiling the blocks on CPU would cost most of the test's time and is not what it checks.
    "parallel.compile=false",
]
MOE_KEYS = ("moe/max_load", "moe/aux_loss", "moe/max_load_l1", "moe/max_load_l2", "moe/max_load_l3")


def _train(rank: int, world_size: int, overrides: list[str]) -> dict[str, list[float]]:
    """The step losses and, on rank 0, the logged gradient norms, MoE statistics and held-out loss."""
    cfg = load_config(BASE + overrides)
    dims = validate(cfg, world_size)
    result = {"loss": build_trainer(cfg, dims, torch.device("cpu")).fit()}
    if rank == 0:
        records = [
            json.loads(line) for line in (Path(cfg.run.dir) / "metrics.jsonl").read_text().splitlines()
        ]
        train_records = [r for r in records if r["kind"] == "train"]
        for key in ("grad_norm", *MOE_KEYS):
            result[key] = [r[key] for r in train_records]
        result["val_loss"] = [r["val_loss"] for r in records if r["kind"] == "eval"]
    return result


def train(world_size: int, run_dir: Path, cache: Path, *overrides: str) -> dict[str, list[float]]:
    args = [f"run.dir={run_dir}", f"data.cache_dir={cache}", *overrides]
    return run_distributed(_train, world_size, args)[0]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def reference(cache, tmp_path_factory) -> dict[str, list[float]]:
    result = train(1, tmp_path_factory.mktemp("ref"), cache)
    assert len(result["loss"]) == STEPS and result["loss"][-1] < result["loss"][0] - 0.25
    assert min(result["moe/aux_loss"]) > 0 and max(result["moe/max_load"]) > 1
    return result


@pytest.mark.parametrize(
    ("world_size", "overrides"),
    [
        pytest.param(2, ["parallel.pp=2", "parallel.pp_schedule=1F1B"], id="pp2_1f1b"),
        pytest.param(4, ["parallel.pp=2", "parallel.ep=2"], id="pp2_ep2"),
        # Two stages per rank (V placement: rank 0 holds the first and the last) and zero-bubble's backward split
        # into input and weight gradients.
        pytest.param(
            2,
            ["parallel.pp=2", "parallel.pp_schedule=ZBVZeroBubble", "parallel.pp_virtual_stages=2"],
            id="pp2_zbv",
            marks=pytest.mark.skipif(
                TorchVersion(torch.__version__) < GLOO_MIN_TORCH["ZBVZeroBubble"],
                reason="ZBVZeroBubble is refused on gloo with this torch",
            ),
        ),
    ],
)
def test_moe_pipeline_matches_single_process(world_size, overrides, reference, cache, tmp_path):
    result = train(world_size, tmp_path, cache, *overrides)
    assert set(result) == set(reference)
    for key, want in reference.items():
        torch.testing.assert_close(torch.tensor(result[key]), torch.tensor(want), rtol=RTOL, atol=0, msg=key)
