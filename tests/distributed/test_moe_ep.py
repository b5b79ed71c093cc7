"""Expert parallelism on gloo: per-step losses of EP layouts (ep=2, ep=4, ep=2 × tp=2) equal one process's, every gradient (the expert
weights' included) at EP=2 and at EP=2 × TP=2 equals the single-process one, and an EP=2 checkpoint resumes at
EP=1 and EP=4.

The MoE model has a dense first layer, a shared expert, the auxiliary loss and the auxiliary-loss-free bias on,
so every part of the layer is in the comparison. Tolerance as in test_parity.py: fp32, only the order of sums
differs. Routing is discrete: a flipped top-k choice would move a loss by far more than the tolerance, and the
load counts that drive the bias are integers summed exactly.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from _spawn import run_distributed

from treadle.models.ops import IGNORE_INDEX
from treadle.train.batch import Batch
from treadle.train.build import build_model, build_trainer, engine_for
from treadle.train.config import load_config, validate

pytestmark = pytest.mark.slow
STEPS = 10
RTOL = 1e-4

BASE = [
    "model=moe_tiny",
    "model.dim=32",
    "model.num_layers=2",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.ffn_dim=64",
    "model.num_experts=4",
    "model.moe_ffn_dim=16",
    "model.aux_loss_coeff=0.01",
    "model.bias_update_rate=0.01",
    "data.seq_len=32",
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


def _train(rank: int, world_size: int, overrides: list[str]) -> list[float]:
    cfg = load_config(BASE + overrides)
    dims = validate(cfg, world_size)
    return build_trainer(cfg, dims, torch.device("cpu")).fit()


def train(world_size: int, run_dir: Path, cache: Path, *overrides: str) -> list[float]:
    return run_distributed(_train, world_size, [f"run.dir={run_dir}", f"data.cache_dir={cache}", *overrides])[
        0
    ]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def reference(cache, tmp_path_factory) -> list[float]:
    losses = train(1, tmp_path_factory.mktemp("ref"), cache)
    assert losses[-1] < losses[0]
    return losses


@pytest.mark.parametrize(
    ("world_size", "overrides"),
    [
        pytest.param(2, ["parallel.ep=2", "memory.activation_checkpoint=selective"], id="ep2_selective_ac"),
        # One expert per rank, experts unsharded by FSDP (efsdp = dp_shard/ep = 1), the rest over dp_shard=4.
        pytest.param(4, ["parallel.ep=4"], id="ep4"),
        # ep over the TP ranks, experts FSDP-sharded over efsdp = dp_shard·tp/ep = 2.
        pytest.param(
            4,
            ["parallel.dp_shard=2", "parallel.tp=2", "parallel.sequence_parallel=false", "parallel.ep=2"],
            id="dp2_tp2_ep2",
        ),
    ],
)
def test_expert_parallel_layout_matches_single_process(world_size, overrides, reference, cache, tmp_path):
    losses = train(world_size, tmp_path, cache, *overrides)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference), rtol=RTOL, atol=0)


def test_ep2_checkpoint_resumes_at_ep1_and_ep4(reference, cache, tmp_path):
    ckpt = ["checkpoint.every=5", "checkpoint.keep_last=0", f"checkpoint.dir={tmp_path}/ckpt"]
    train(2, tmp_path / "a", cache, "parallel.ep=2", *ckpt)
    for world_size, ep in ((1, 1), (4, 4)):
        shutil.rmtree(tmp_path / "ckpt" / f"step_{STEPS:08d}")
        resumed = train(
            world_size, tmp_path / f"b{ep}", cache, *ckpt, "checkpoint.resume=auto", f"parallel.ep={ep}"
        )
        torch.testing.assert_close(torch.tensor(resumed), torch.tensor(reference[5:]), rtol=RTOL, atol=0)


def _expert_grads(rank: int, world_size: int, overrides: list[str]) -> dict[str, torch.Tensor]:
    """One forward/backward on 2 rows per rank under `overrides`; every parameter's full gradient."""
    cfg = load_config(BASE + overrides)
    dims = validate(cfg, world_size)
    dims.build_mesh("cpu")
    spec, model = build_model(cfg)
    engine = engine_for(cfg, dims, torch.device("cpu"))
    (part,) = engine.prepare(spec, cfg.model, model, cfg.optim)
    tokens = torch.randint(0, cfg.model.vocab_size, (4, 33), generator=torch.Generator().manual_seed(0))
    rows = tokens.chunk(dims.dp_size)[dims.dp_rank()]
    batches = [Batch(tokens=t[:, :-1], labels=t[:, 1:], positions=None, doc_ids=None) for t in rows.split(2)]
    count = (tokens[:, 1:] != IGNORE_INDEX).sum().double()
    engine.forward_backward(batches, dims.dp_size * dims.cp / count)
    grads = {}
    for name, param in part.named_parameters():
        grad = param.grad
        grads[name] = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
    return grads


@pytest.mark.parametrize(
    ("world_size", "overrides"),
    [
        pytest.param(2, ["parallel.ep=2"], id="ep2"),
        pytest.param(
            4,
            ["parallel.dp_shard=2", "parallel.tp=2", "parallel.sequence_parallel=false", "parallel.ep=2"],
            id="dp2_tp2_ep2",
        ),
    ],
)
def test_gradients_under_expert_parallelism_equal_one_process(world_size, overrides, tmp_path):
    """Every parameter's gradient after one step's backward, experts included: a direct check that losses
    alone would be too weak for (a missing share of a small gradient moves a 10-step loss by < 1e-4)."""
    args = [f"run.dir={tmp_path}", f"data.cache_dir={tmp_path / 'cache'}"]
    single = run_distributed(_expert_grads, 1, args)[0]
    parallel = run_distributed(_expert_grads, world_size, [*args, *overrides])[0]
    assert set(parallel) == set(single)
    experts = [name for name in single if ".experts." in name]
    assert experts and all(single[name].abs().sum() > 0 for name in experts)
    for name, grad in single.items():
        torch.testing.assert_close(parallel[name], grad, rtol=1e-4, atol=1e-7, msg=name)
