"""Whole runs with `fp8=torchao` (torchao's float8 training, emulated on CPU: `fp8.emulate=true`) through the
real config path (`parallel.engine=native`), on real gloo process groups.

Tolerance: 2e-4 relative on every step's loss. Both backends cast every operand with the same per-tensor
scale to the same formats (tests/parallel/test_fp8_torchao.py: 1e-7 per linear), so runs differ only by
summation order, which AdamW carries on: measured 3e-5 over 6 steps between the backends, 1e-5 between one
process and two ranks. A real difference in the FP8 math is larger: torchao's rowwise recipe instead of
tensorwise moves the loss by 4.5e-4 by step 3.

- One process: the loss falls, and follows the treadle backend's tensorwise run.
- Two ranks, FSDP2 with torchao's FP8 all-gather (gloo carries the float8 shards): the weights are sharded
  DTensors over torchao's `WeightWithDynamicFloat8CastTensor`; the engine refreshed their scales after the
  last step (the scale equals fp8_max / amax of the full weight); the losses match the one-process run and
  the same two ranks with the switch off (bf16/fp32 all-gather, cast after it): the weight is cast with the
  whole tensor's scale either way, so the FP8 values are the same (measured: equal losses; bound 1e-5).
- Checkpoints: state-dict keys are those of plain `nn.Linear`, so a treadle-backend checkpoint resumes under
  torchao and continues as the treadle run did, and a torchao checkpoint (saved from the all-gather
  wrappers) resumes bitwise under torchao and, in a process that never imports torchao, under treadle.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from _spawn import run_distributed
from test_parity import BASE
from test_parity import train as train_run

from treadle.models.init import canonical_name
from treadle.parallel.fp8_torchao import torchao_available
from treadle.train.build import build_trainer
from treadle.train.config import load_config, validate

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torchao_available(), reason="torchao is not installed"),
]
STEPS = 6
RESUME_AT = 3
RTOL = 2e-4
TORCHAO = ["fp8=torchao", "fp8.emulate=true"]
TREADLE = ["fp8=tensorwise", "fp8.emulate=true"]
SHORT = [f"trainer.max_steps={STEPS}"]


def _ckpt(directory: Path, resume: str = "none") -> list[str]:
    return [
        f"checkpoint.every={RESUME_AT}",
        "checkpoint.keep_last=0",
        f"checkpoint.dir={directory}",
        f"checkpoint.resume={resume}",
    ]


def _step_dir(directory: Path, step: int) -> Path:
    return directory / f"step_{step:08d}"


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data_cache")


@pytest.fixture(scope="module")
def torchao_run(cache, tmp_path_factory) -> tuple[list[float], Path]:
    """One process, fp8=torchao, checkpoints every RESUME_AT steps: (losses, checkpoint dir)."""
    root = tmp_path_factory.mktemp("torchao_one")
    losses = train_run(1, root / "run", cache, *SHORT, *TORCHAO, *_ckpt(root / "ckpt"))
    return losses, root / "ckpt"


def test_torchao_trains_and_follows_the_treadle_backend(torchao_run, cache, tmp_path):
    losses, _ = torchao_run
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.2
    treadle = train_run(1, tmp_path, cache, *SHORT, *TREADLE)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(treadle), rtol=RTOL, atol=0)


def _fsdp_float8_all_gather(rank: int, world_size: int, overrides: list[str]) -> dict:
    from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor

    cfg = load_config(BASE + overrides)
    dims = validate(cfg, world_size)
    trainer = build_trainer(cfg, dims, torch.device("cpu"))
    losses = trainer.fit()
    params = {canonical_name(n): p for n, p in trainer.model_parts[0].named_parameters()}
    weight = params["layers.0.mlp.up_proj.weight"]
    # The DTensor's own local tensor: `to_local()` returns a view, which torchao re-wraps without the scale.
    local = weight._local_tensor
    amax = local.abs().amax().float()  # the wrapper unwraps: a plain tensor
    dist.all_reduce(amax, op=dist.ReduceOp.MAX)
    return {
        "losses": losses,
        "weight": type(weight).__name__,
        "wrapped": isinstance(local, WeightWithDynamicFloat8CastTensor),
        "local_rows": local.shape[0],
        "scale": local._precomputed_scale,
        "expected_scale": torch.finfo(torch.float8_e4m3fn).max / amax.double(),
    }


def test_fsdp_two_ranks_with_float8_all_gather(torchao_run, cache, tmp_path):
    overrides = [f"run.dir={tmp_path / 'on'}", f"data.cache_dir={cache}", *SHORT, *TORCHAO]
    results = run_distributed(_fsdp_float8_all_gather, 2, overrides)
    gather_off = train_run(2, tmp_path / "off", cache, *SHORT, *TORCHAO, "fp8.fsdp_float8_all_gather=false")
    for result in results:
        assert result["weight"] == "DTensor" and result["wrapped"]
        assert result["local_rows"] == 128 // 2  # ffn_dim rows, sharded over 2 ranks
        assert result["scale"] is not None
        torch.testing.assert_close(result["scale"].double(), result["expected_scale"], rtol=1e-6, atol=0)
    losses = torch.tensor(results[0]["losses"])
    torch.testing.assert_close(losses, torch.tensor(torchao_run[0]), rtol=RTOL, atol=0)
    torch.testing.assert_close(losses, torch.tensor(gather_off), rtol=1e-5, atol=0)


def test_treadle_checkpoint_resumes_under_torchao(cache, tmp_path):
    treadle = train_run(1, tmp_path / "a", cache, *SHORT, *TREADLE, *_ckpt(tmp_path / "ckpt_a"))
    resumed = train_run(
        1,
        tmp_path / "b",
        cache,
        *SHORT,
        *TORCHAO,
        *_ckpt(tmp_path / "ckpt_b", resume=str(_step_dir(tmp_path / "ckpt_a", RESUME_AT))),
    )
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(treadle[RESUME_AT:]), rtol=RTOL, atol=0)
    assert (_step_dir(tmp_path / "ckpt_b", STEPS) / ".metadata").exists()  # and torchao's run saves


def _train_noting_torchao(rank: int, world_size: int, overrides: list[str]) -> tuple[list[float], bool]:
    """(losses, whether anything imported torchao in this process)."""
    cfg = load_config(BASE + overrides)
    trainer = build_trainer(cfg, validate(cfg, world_size), torch.device("cpu"))
    return trainer.fit(), "torchao" in sys.modules


def test_torchao_checkpoint_resumes_exactly_and_under_treadle(torchao_run, cache, tmp_path):
    losses, ckpt = torchao_run
    resume = str(_step_dir(ckpt, RESUME_AT))
    same = train_run(1, tmp_path / "a", cache, *SHORT, *TORCHAO, *_ckpt(tmp_path / "ckpt_a", resume))
    assert same == losses[RESUME_AT:]
    overrides = [f"run.dir={tmp_path / 'b'}", f"data.cache_dir={cache}", *SHORT, *TREADLE]
    (treadle, imported) = run_distributed(
        _train_noting_torchao, 1, overrides + _ckpt(tmp_path / "ckpt_b", resume)
    )[0]
    assert not imported  # the checkpoint holds plain tensors: reading it needs no torchao class
    torch.testing.assert_close(torch.tensor(treadle), torch.tensor(losses[RESUME_AT:]), rtol=RTOL, atol=0)
