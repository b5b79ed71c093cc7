"""The DeepSpeed engine under the same Trainer: ZeRO-2/3 per-step loss parity with the native FSDP engine,
CPU and NVMe optimizer offload that train and resume exactly, and clear config errors. Real gloo process
groups on CPU: DeepSpeed's CPU accelerator reports gloo as its backend when oneCCL is absent and reuses the
process group that build.py creates.

Tolerance: fp32 on both sides, same init (every rank fills the full model from the seed before DeepSpeed
partitions it), same data, same global-mean loss normalisation. ZeRO's bucketed all-reduce/reduce-scatter
sums the same terms as FSDP's reduce-scatter in another order, and its clip coefficient adds 1e-6 to the norm
(FSDP's torch clipping too); observed: ZeRO-3 bitwise equal to FSDP over 6 steps, ZeRO-2 within 3e-8
relative. RTOL = 1e-5 catches a wrong loss or gradient scale (a missing 1/GAS or a double average moves the
loss by > 1e-3 within two steps) with margin for other BLAS builds.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest
import torch
from test_parity import BASE, train

from treadle.train.config import load_config, validate

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed"),
]
STEPS = 6
RTOL = 1e-5
SHORT = [f"trainer.max_steps={STEPS}"]
CONVERTER = Path(__file__).resolve().parents[2] / "launch" / "convert_deepspeed.py"


def _aio_available() -> bool:
    """Whether DeepSpeed's async_io op (libaio) can be built here; NVMe offload needs it."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        from deepspeed.ops.op_builder import AsyncIOBuilder
    except ImportError:
        return False
    return bool(AsyncIOBuilder().is_compatible(verbose=False))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data_cache")


@pytest.fixture(scope="module")
def fsdp(cache, tmp_path_factory) -> list[float]:
    return train(2, tmp_path_factory.mktemp("fsdp"), cache, "parallel=fsdp", *SHORT)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_matches_native_fsdp(stage, fsdp, cache, tmp_path):
    losses = train(2, tmp_path, cache, f"parallel=zero{stage}_deepspeed", *SHORT)
    assert len(losses) == STEPS and losses[-1] < losses[0] - 0.3
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(fsdp), rtol=RTOL, atol=0)


def _train_and_resume(cache: Path, tmp_path: Path, *overrides: str) -> tuple[list[float], list[float]]:
    """Six steps with a checkpoint at 3; then the step-6 checkpoint is dropped and the run resumes at 3."""
    ckpt = ["checkpoint.every=3", "checkpoint.keep_last=0", f"checkpoint.dir={tmp_path}/ckpt", *SHORT]
    straight = train(2, tmp_path / "a", cache, *overrides, *ckpt)
    assert (tmp_path / "ckpt" / "step_00000003" / "deepspeed").is_dir()
    shutil.rmtree(tmp_path / "ckpt" / "step_00000006")
    resumed = train(2, tmp_path / "b", cache, *overrides, *ckpt, "checkpoint.resume=auto")
    return straight, resumed


def test_cpu_offload_trains_and_resumes_exactly(fsdp, cache, tmp_path):
    straight, resumed = _train_and_resume(cache, tmp_path, "parallel=zero2_offload_cpu")
    # DeepSpeed's CPU Adam is a separate AdamW implementation: the same math, not the same rounding.
    torch.testing.assert_close(torch.tensor(straight), torch.tensor(fsdp), rtol=RTOL, atol=0)
    assert resumed == straight[3:]
    _check_conversion(tmp_path / "ckpt" / "step_00000006", tmp_path / "a" / "config.yaml", tmp_path)


def _check_conversion(step_dir: Path, config: Path, tmp_path: Path) -> None:
    """launch/convert_deepspeed.py: the merged fp32 weights come out unchanged in DCP and HF format."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    # launch/ is scripts, not a package (its train.py would shadow treadle.train on sys.path).
    spec = importlib.util.spec_from_file_location("convert_deepspeed", CONVERTER)
    converter = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(converter)
    full_state_dict, main = converter.full_state_dict, converter.main

    state = full_state_dict(step_dir)
    assert "layers.0.self_attn.q_proj.weight" in state and "lm_head.weight" not in state  # tied
    main([str(step_dir), "--to", "hf", str(tmp_path / "hf"), "--config", str(config), "--dtype", "fp32"])
    hf = load_file(tmp_path / "hf" / "model.safetensors")
    assert hf.keys() == {f"model.{name}" for name in state}
    torch.testing.assert_close(hf["model.norm.weight"], state["norm.weight"], rtol=0, atol=0)
    transformers = pytest.importorskip("transformers")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    torch.testing.assert_close(
        reloaded.model.layers[0].mlp.down_proj.weight, state["layers.0.mlp.down_proj.weight"]
    )
    main([str(step_dir), "--to", "dcp", str(tmp_path / "dcp")])
    loaded = {"engine": {"model": {name: torch.empty_like(t) for name, t in state.items()}}}
    dcp.load(loaded, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    for name, tensor in state.items():
        torch.testing.assert_close(loaded["engine"]["model"][name], tensor, rtol=0, atol=0)


NO_AIO = "DeepSpeed's async_io op needs libaio (apt-get install libaio-dev)"


@pytest.mark.skipif(not _aio_available(), reason=NO_AIO)
def test_nvme_param_offload_trains_and_resumes_exactly(fsdp, cache, tmp_path):
    """ZeRO-Infinity parameters on "NVMe" (a temp dir, through libaio), optimizer states on the host."""
    swap = tmp_path / "nvme"
    swap.mkdir()
    nvme = ["parallel=zero3_offload_nvme", f"parallel.deepspeed.nvme_path={swap}"]
    straight, resumed = _train_and_resume(cache, tmp_path, *nvme, "parallel.deepspeed.offload_optimizer=cpu")
    torch.testing.assert_close(torch.tensor(straight), torch.tensor(fsdp), rtol=RTOL, atol=0)
    assert resumed == straight[3:]


@pytest.mark.skipif(not _aio_available(), reason=NO_AIO)
def test_nvme_optimizer_offload_trains(fsdp, cache, tmp_path):
    """Parameters and optimizer states on "NVMe": trains like FSDP. Resume is not exact with DeepSpeed 0.19.8
    (its ZeRO-3 checkpoint leaves `offloaded_tensors/` empty and the swapped optimizer states are rebuilt from
    the fresh model), so the resumed half is checked as a known failure that turns into a test failure the
    day it starts to work."""
    swap = tmp_path / "nvme"
    swap.mkdir()
    straight, resumed = _train_and_resume(
        cache, tmp_path, "parallel=zero3_offload_nvme", f"parallel.deepspeed.nvme_path={swap}"
    )
    torch.testing.assert_close(torch.tensor(straight), torch.tensor(fsdp), rtol=RTOL, atol=0)
    assert resumed != straight[3:], "NVMe optimizer-state resume is exact now: drop the warning in validate"


def _validate(*overrides: str) -> None:
    validate(load_config(BASE + list(overrides)), 2)


def test_override_conflicting_with_typed_config_is_refused():
    with pytest.raises(ValueError) as err:
        _validate(
            "parallel=zero3_deepspeed",
            "+parallel.deepspeed.overrides.gradient_clipping=0.5",
            "+parallel.deepspeed.overrides.zero_optimization.stage=2",
        )
    message = str(err.value)
    assert "parallel.deepspeed.overrides.gradient_clipping=0.5 conflicts with optim.clip_grad_norm" in message
    assert "parallel.deepspeed.overrides.zero_optimization.stage=2 conflicts with " in message
    assert "parallel.deepspeed.zero_stage" in message and "fix:" in message
    with pytest.raises(ValueError, match="overrides.optimizer.type conflicts with optim.name"):
        _validate("parallel=zero3_deepspeed", "+parallel.deepspeed.overrides.optimizer.type=Adam")
    # Keys the typed config does not decide pass through, and repeating a derived value is no conflict.
    _validate(
        "parallel=zero3_deepspeed",
        "+parallel.deepspeed.overrides.zero_optimization.reduce_bucket_size=1000000",
        "+parallel.deepspeed.overrides.gradient_clipping=1.0",
    )


def test_bad_swap_path_is_refused(tmp_path):
    nvme = ["parallel=zero3_offload_nvme"]
    missing = tmp_path / "missing"
    with pytest.raises(
        ValueError, match=f"parallel.deepspeed.nvme_path={missing} does not exist; fix: create"
    ):
        _validate(*nvme, f"parallel.deepspeed.nvme_path={missing}")
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(ValueError, match="is not a directory"):
        _validate(*nvme, f"parallel.deepspeed.nvme_path={a_file}")
    # Root writes through any mode bits (CI runs as root); sysfs refuses new files to everyone.
    read_only = tmp_path / "ro"
    read_only.mkdir(mode=0o500)
    if os.geteuid() == 0:
        read_only = Path("/sys")
    with pytest.raises(ValueError, match=f"parallel.deepspeed.nvme_path={read_only} is not writable"):
        _validate(*nvme, f"parallel.deepspeed.nvme_path={read_only}")
    with pytest.raises(ValueError, match="offload_param=nvme needs parameters partitioned"):
        _validate(*nvme, f"parallel.deepspeed.nvme_path={tmp_path}", "parallel.deepspeed.zero_stage=2")
