"""Whole-run parity of the FSDP2 layouts with a single-process reference, exact resume, resume at another
data-parallel size. Real gloo process groups on CPU.

Tolerance: everything runs in fp32, and the layouts compute the same global-mean loss over the same global
batch (the loss is normalised by the global token count). What differs is only the order of floating-point
sums: the gradient reduce-scatter/all-reduce and the loss all-reduce add the same terms in another order
(relative error ~1e-7 per sum), which AdamW then carries through the following steps. Over 12 steps that stays
below 1e-5 relative here; 1e-4 leaves room for other BLAS builds while still catching any real bug (a
wrong shard, a missing or doubled gradient, a wrong normalisation all move the loss by > 1e-2 within a step).
Resuming in the same layout must be bitwise exact.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from _spawn import run_distributed

from treadle.train.build import build_trainer
from treadle.train.config import load_config, validate
from treadle.train.errors import UserError

pytestmark = pytest.mark.slow
STEPS = 12
RTOL = 1e-4

BASE = [
    "model.dim=64",
    "model.num_layers=2",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.ffn_dim=128",
    "data.seq_len=64",
    "trainer.micro_batch_size=2",
    "trainer.global_batch_size=8",
    f"trainer.max_steps={STEPS}",
    "trainer.eval_batches=1",
    "optim.lr=3e-3",
    "optim.schedule.warmup_steps=3",
    "logging.every=1",
    "logging.progress_bar=false",
    "logging.wandb.mode=disabled",
    "checkpoint.every=0",
    "checkpoint.save_final=false",
]


def _train(rank: int, world_size: int, overrides: list[str]) -> list[float]:
    cfg = load_config(BASE + overrides)
    dims = validate(cfg, world_size)
    trainer = build_trainer(cfg, dims, torch.device("cpu"))
    return trainer.fit()


def train(world_size: int, run_dir: Path, cache: Path, *overrides: str) -> list[float]:
    args = [f"run.dir={run_dir}", f"data.cache_dir={cache}", *overrides]
    return run_distributed(_train, world_size, args)[0]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data_cache")


@pytest.fixture(scope="module")
def reference(cache, tmp_path_factory) -> list[float]:
    return train(1, tmp_path_factory.mktemp("ref"), cache)


def test_reference_loss_falls(reference):
    assert len(reference) == STEPS
    assert reference[-1] < reference[0] - 0.5


@pytest.mark.parametrize(
    ("world_size", "overrides"),
    [
        pytest.param(2, ["parallel=fsdp"], id="zero3_2ranks"),
        pytest.param(2, ["parallel=zero2"], id="zero2_2ranks"),
        pytest.param(2, ["memory=selective_ac"], id="zero3_2ranks_selective_ac"),
        pytest.param(2, ["memory=full_ac", "parallel.tp=2"], id="tp2_full_ac"),
        pytest.param(4, ["parallel=hsdp", "parallel.dp_replicate=2"], id="hsdp_2x2"),
        pytest.param(4, ["parallel=fsdp", "trainer.micro_batch_size=1"], id="zero3_4ranks_accum2"),
        pytest.param(2, ["parallel.tp=2"], id="tp2_sp"),
        pytest.param(2, ["parallel.tp=2", "parallel.sequence_parallel=false"], id="tp2_no_sp"),
        pytest.param(
            2,
            ["parallel.tp=2", "parallel.sequence_parallel=false", "parallel.tp_batch_overlap=true"],
            id="tp2_batch_overlap",
        ),
        pytest.param(
            4,
            [
                "parallel.tp=2",
                "parallel.sequence_parallel=false",
                "parallel.tp_batch_overlap=true",
                "memory=full_ac",
            ],
            id="dp2_tp2_batch_overlap_full_ac",
        ),
        pytest.param(4, ["parallel.tp=2"], id="dp2_tp2_sp"),
        pytest.param(2, ["parallel.cp=2", "parallel.cp_variant=ring"], id="cp2_ring"),
        pytest.param(2, ["parallel.cp=2", "parallel.cp_variant=ulysses"], id="cp2_ulysses"),
        pytest.param(4, ["parallel.cp=2", "parallel.dp_shard=2"], id="dp2_cp2_ring"),
    ],
)
def test_layout_matches_single_process(world_size, overrides, reference, cache, tmp_path):
    losses = train(world_size, tmp_path, cache, *overrides)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference), rtol=RTOL, atol=0)


def test_resume_is_exact_and_reshards_to_another_dp_size(reference, cache, tmp_path):
    ckpt = ["checkpoint.every=6", "checkpoint.keep_last=0", f"checkpoint.dir={tmp_path}/ckpt"]
    straight = train(2, tmp_path / "a", cache, *ckpt)
    shutil.rmtree(tmp_path / "ckpt" / "step_00000012")
    resumed = train(2, tmp_path / "b", cache, *ckpt, "checkpoint.resume=auto")
    assert resumed == straight[6:]  # same layout: bitwise
    # The step-6 checkpoint written by 2 ranks, resumed by 4 ranks and by 1: model and optimizer reshard,
    # and the data position (a global sample count) continues the same stream.
    for world_size in (4, 1):
        shutil.rmtree(tmp_path / "ckpt" / "step_00000012")
        resharded = train(world_size, tmp_path / f"c{world_size}", cache, *ckpt, "checkpoint.resume=auto")
        torch.testing.assert_close(torch.tensor(resharded), torch.tensor(reference[6:]), rtol=RTOL, atol=0)


def test_untied_output_layer_under_tp(cache, tmp_path):
    """The separate, column-parallel output layer (no weight tying) against its own single-process run."""
    untied = "model.tie_embeddings=false"
    expected = train(1, tmp_path / "ref", cache, untied)
    losses = train(2, tmp_path / "tp", cache, untied, "parallel.tp=2")
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=RTOL, atol=0)


def test_checkpoint_moves_from_fsdp4_to_tp_and_cp_layouts(reference, cache, tmp_path):
    """DCP reshards between layouts: a step-6 checkpoint of dp_shard=4 resumed at dp_shard=2 × tp=2 and at
    dp_shard=2 × cp=2 continues with the losses of the straight single-process run."""
    ckpt = ["checkpoint.every=6", "checkpoint.keep_last=0", f"checkpoint.dir={tmp_path}/ckpt"]
    train(4, tmp_path / "a", cache, *ckpt)
    for layout in (["parallel.tp=2"], ["parallel.cp=2"]):
        shutil.rmtree(tmp_path / "ckpt" / "step_00000012")
        resumed = train(4, tmp_path / "b", cache, *ckpt, "checkpoint.resume=auto", *layout)
        torch.testing.assert_close(torch.tensor(resumed), torch.tensor(reference[6:]), rtol=RTOL, atol=0)


def _train_expecting_error(rank: int, world_size: int, overrides: list[str]) -> str:
    try:
        _train(rank, world_size, overrides)
    except ValueError as err:
        return str(err)
    return "no error"


def test_corrupt_checkpoint_is_refused_with_its_path(cache, tmp_path):
    train(
        1,
        tmp_path / "a",
        cache,
        "trainer.max_steps=2",
        "checkpoint.save_final=true",
        f"checkpoint.dir={tmp_path}/c",
    )
    step_dir = tmp_path / "c" / "step_00000002"
    metadata = step_dir / ".metadata"
    metadata.write_bytes(metadata.read_bytes()[:20])
    args = [
        f"run.dir={tmp_path}/b",
        f"data.cache_dir={cache}",
        "trainer.max_steps=4",
        f"checkpoint.dir={tmp_path}/c",
    ]
    (message,) = run_distributed(_train_expecting_error, 1, args)
    assert str(step_dir) in message and "checkpoint.resume" in message


def _train_expecting_runtime_error(rank: int, world_size: int, overrides: list[str]) -> str:
    try:
        _train(rank, world_size, overrides)
    except UserError as err:
        return str(err)
    return "no error"


@pytest.mark.parametrize(("policy", "first_bad_step"), [("abort", 2), ("skip", 4)])
def test_non_finite_loss_is_skipped_or_aborts_with_a_message(policy, first_bad_step, cache, tmp_path):
    """An absurd learning rate blows the weights up after step 1, so every later gradient is not finite."""
    args = [
        f"run.dir={tmp_path}",
        f"data.cache_dir={cache}",
        "optim.lr=1e30",
        "optim.clip_grad_norm=0",
        "optim.schedule.warmup_steps=0",
        f"trainer.nan_policy={policy}",
        "trainer.max_consecutive_skips=3",
    ]
    (message,) = run_distributed(_train_expecting_runtime_error, 1, args)
    assert f"step {first_bad_step}:" in message and "is not finite" in message
    assert f"trainer.nan_policy={policy}" in message and "lower optim.lr" in message
