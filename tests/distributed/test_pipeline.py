"""Pipeline parallelism against a single process: per-step losses of whole runs (1F1B and Interleaved1F1B at pp=2,
pp=2 × dp_shard=2, pp=2 × tp=2, tied and untied embeddings), and checkpoints that reshard between pipeline
layouts (pp=2 → pp=1 and pp=1 → pp=2 continue with the straight run's losses). Real gloo groups on CPU.

Tolerance as in test_parity.py: fp32, the same global-mean loss over the same global batch; only the order of
floating-point sums differs (the pipeline's micro-batches accumulate gradients in another order, the loss and
the gradient norm are summed over `pp`), ~1e-7 relative per sum, carried by AdamW over the steps. 1e-4 still
catches a real bug: a gradient missing from one stage, the tied copy's gradient not summed, a micro-batch
counted twice or scaled by 1/num_microbatches all move the loss by > 1e-2 within a few steps.

To stay within the CI budget, each spawn trains several configurations in one process group.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from _spawn import run_distributed

from treadle.train.build import build_trainer
from treadle.train.config import load_config, validate

pytestmark = pytest.mark.slow
STEPS = 10
RTOL = 1e-4

BASE = [
    "model.dim=32",
    "model.num_layers=4",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.ffn_dim=64",
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
]
UNTIED = "model.tie_embeddings=false"
INTERLEAVED = ["parallel.pp=2", "parallel.pp_schedule=Interleaved1F1B", "parallel.pp_virtual_stages=2"]


def _train_all(rank: int, world_size: int, runs: list[list[str]]) -> list[list[float]]:
    losses = []
    for overrides in runs:
        cfg = load_config(BASE + overrides)
        dims = validate(cfg, world_size)
        losses.append(build_trainer(cfg, dims, torch.device("cpu")).fit())
    return losses


def train(world_size: int, root: Path, cache: Path, runs: dict[str, list[str]]) -> dict[str, list[float]]:
    args = [[f"run.dir={root}/{name}", f"data.cache_dir={cache}", *overrides] for name, overrides in runs.items()]
    return dict(zip(runs, run_distributed(_train_all, world_size, args)[0], strict=True))


def assert_parity(losses: list[float], expected: list[float]) -> None:
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=RTOL, atol=0)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pp")


@pytest.fixture(scope="module")
def cache(root) -> Path:
    return root / "cache"


def ckpt(root: Path, name: str, *more: str) -> list[str]:
    return ["checkpoint.every=5", "checkpoint.keep_last=0", f"checkpoint.dir={root}/{name}", *more]


@pytest.fixture(scope="module")
def reference(root, cache) -> dict[str, list[float]]:
    """One process: tied and untied, the tied run checkpointing at step 5 (for pp=1 → pp=2)."""
    return train(1, root, cache, {"tied": ckpt(root, "ckpt_pp1"), "untied": [UNTIED]})


@pytest.fixture(scope="module")
def pp2(root, cache, reference) -> dict[str, list[float]]:
    shutil.rmtree(root / "ckpt_pp1" / "step_00000010")
    runs = {
        "1f1b": ["parallel.pp=2", *ckpt(root, "ckpt_pp2")],
        "interleaved": INTERLEAVED,
        "untied": ["parallel.pp=2", UNTIED],
        "interleaved_untied": [*INTERLEAVED, UNTIED, "parallel.pp_microbatches=2"],
        "resumed_from_pp1": ["parallel.pp=2", *ckpt(root, "ckpt_pp1", "checkpoint.resume=auto")],
    }
    return train(2, root, cache, runs)


def test_reference_loss_falls(reference):
    assert len(reference["tied"]) == STEPS
    assert reference["tied"][-1] < reference["tied"][0] - 0.5


@pytest.mark.parametrize(
    ("run", "expected"),
    [
        ("1f1b", "tied"),
        ("interleaved", "tied"),
        ("untied", "untied"),
        ("interleaved_untied", "untied"),
    ],
)
def test_pp2_matches_single_process(pp2, reference, run, expected):
    assert_parity(pp2[run], reference[expected])


def test_pp1_checkpoint_resumes_at_pp2(pp2, reference):
    assert_parity(pp2["resumed_from_pp1"], reference["tied"][5:])


def test_pp2_checkpoint_resumes_at_pp1(pp2, reference, root, cache):
    shutil.rmtree(root / "ckpt_pp2" / "step_00000010")
    resumed = train(1, root, cache, {"resumed_from_pp2": ckpt(root, "ckpt_pp2", "checkpoint.resume=auto")})
    assert_parity(resumed["resumed_from_pp2"], reference["tied"][5:])


def test_pp2_composes_with_fsdp_and_tp(reference, root, cache):
    runs = {
        "pp2_dp2": ["parallel.pp=2", "parallel.dp_shard=2"],
        "pp2_tp2": ["parallel.pp=2", "parallel.tp=2"],
        "pp2_tp2_untied": ["parallel.pp=2", "parallel.tp=2", UNTIED],
    }
    losses = train(4, root, cache, runs)
    assert_parity(losses["pp2_dp2"], reference["tied"])
    assert_parity(losses["pp2_tp2"], reference["tied"])
    assert_parity(losses["pp2_tp2_untied"], reference["untied"])
