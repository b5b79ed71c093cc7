"""Throughput arithmetic, the peak-FLOP/s table, memory stats, and the MetricLogger sinks."""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import math
import sys
import time
from pathlib import Path

import pytest
import torch

from treadle.train import loggers, metrics
from treadle.train.loggers import LoggingConfig, MetricLogger, WandbConfig
from treadle.train.metrics import Throughput, lookup_peak_flops, memory_stats, peak_flops

HAS_WANDB = importlib.util.find_spec("wandb") is not None
HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(time, "perf_counter", fake)
    return fake


def _throughput(peak: float | None, warmup_steps: int = 1) -> Throughput:
    # A 2-way tensor-parallel, 4-way data-parallel layout: 8 devices, 4 distinct token streams.
    return Throughput(
        flops_per_token=6e9,
        device=torch.device("cpu"),
        peak_flops_per_device=peak,
        num_devices=8,
        world_tokens_factor=4,
        warmup_steps=warmup_steps,
    )


def test_throughput_arithmetic_excludes_warmup(clock: FakeClock) -> None:
    tp = _throughput(peak=1e15)
    clock.now += 30.0  # step 1: compilation
    tp.update(1, 4096)
    assert tp.compute() == dict.fromkeys(
        ("tokens_per_s", "tokens_per_s_per_device", "tflops_per_device", "mfu", "step_time_s")
    ) | {"warmup_s": 30.0}
    for step in range(2, 12):
        clock.now += 0.5
        tp.update(step, 4096)
    out = tp.compute()
    # 10 steps × 4096 tokens × 4 data-parallel streams in 5 s.
    assert out["tokens_per_s"] == pytest.approx(10 * 4096 * 4 / 5.0)
    assert out["tokens_per_s_per_device"] == pytest.approx(10 * 4096 * 4 / 5.0 / 8)
    assert out["tflops_per_device"] == pytest.approx(6e9 * 4096 / 1e12)
    assert out["mfu"] == pytest.approx(6e9 * 4096 / 1e15)
    assert out["step_time_s"] == pytest.approx(0.5)
    assert "warmup_s" not in out


def test_throughput_paused_time_is_excluded(clock: FakeClock) -> None:
    tp = _throughput(peak=None, warmup_steps=0)
    clock.now += 1.0
    tp.update(1, 1000)
    with tp.paused():
        clock.now += 100.0  # evaluation
    clock.now += 1.0
    tp.update(2, 1000)
    out = tp.compute()
    assert out["tokens_per_s"] == pytest.approx(2 * 1000 * 4 / 2.0)
    assert out["mfu"] is None
    assert out["tflops_per_device"] == pytest.approx(6e9 * (2 * 1000 * 4 / 2.0) / 8 / 1e12)
    assert "warmup_s" not in out


def test_throughput_during_warmup_keeps_clock(clock: FakeClock) -> None:
    tp = _throughput(peak=1e15, warmup_steps=2)
    clock.now += 3.0
    tp.update(1, 10)
    assert tp.compute()["tokens_per_s"] is None
    clock.now += 2.0
    tp.update(2, 10)
    clock.now += 1.0
    tp.update(3, 10)
    out = tp.compute()
    assert out["warmup_s"] == pytest.approx(5.0)
    assert out["tokens_per_s"] == pytest.approx(10 * 4 / 1.0)


def test_peak_flops_table() -> None:
    assert lookup_peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12
    assert lookup_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert lookup_peak_flops("NVIDIA H100 NVL") == 835e12
    assert lookup_peak_flops("NVIDIA H200") == 989.4e12
    assert lookup_peak_flops("NVIDIA H200 NVL") == 835e12
    assert lookup_peak_flops("NVIDIA H20") == 148e12
    assert lookup_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert lookup_peak_flops("NVIDIA L4") == 121e12
    assert lookup_peak_flops("NVIDIA GeForce RTX 4090") == 165.2e12
    assert lookup_peak_flops("NVIDIA B200") == 2250e12
    assert lookup_peak_flops("NVIDIA GB200") == 2500e12
    assert lookup_peak_flops("AMD Instinct MI300X") == 1307.4e12
    for unknown in ("NVIDIA GeForce RTX 4090 D", "NVIDIA A10G", "NVIDIA GH200 480GB", "Tesla T4"):
        assert lookup_peak_flops(unknown) is None


def test_peak_flops_cpu_and_unknown_gpu(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert peak_flops(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Imaginary GPU 9000")
    with caplog.at_level(logging.WARNING, logger=metrics.__name__):
        assert peak_flops(torch.device("cuda", 0)) is None
        assert peak_flops(torch.device("cuda", 0)) is None
    assert [r.getMessage().count("Imaginary GPU 9000") for r in caplog.records] == [1]


def test_memory_stats_cpu() -> None:
    stats = memory_stats(torch.device("cpu"))
    assert stats.keys() == {"memory_max_rss_gib"}
    assert 0 < stats["memory_max_rss_gib"] < 1e4


def test_memory_stats_cuda_reads_and_resets(monkeypatch: pytest.MonkeyPatch) -> None:
    gib = 2**30
    resets: list[torch.device] = []

    class Props:
        total_memory = 80 * gib

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: Props())
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: 20 * gib)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda d: 40 * gib)
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda d: {"num_alloc_retries": 3})
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", resets.append)
    device = torch.device("cuda", 0)
    assert memory_stats(device) == {
        "memory_max_allocated_gib": 20.0,
        "memory_max_allocated_pct": 25.0,
        "memory_max_reserved_gib": 40.0,
        "memory_max_reserved_pct": 50.0,
        "memory_num_alloc_retries": 3,
    }
    assert resets == [device]


def _cfg(**kwargs: object) -> LoggingConfig:
    return LoggingConfig(wandb=WandbConfig(mode="disabled"), **kwargs)  # type: ignore[arg-type]


def _lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _logger(cfg: LoggingConfig, run_dir: Path, rank: int = 0, start_step: int = 0) -> MetricLogger:
    return MetricLogger(
        cfg, run_dir=run_dir, rank=rank, config_dict={"lr": 3e-4}, total_steps=100, start_step=start_step
    )


def test_jsonl_lines_append_on_reopen(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=loggers.__name__), _logger(_cfg(), tmp_path) as log:
        log.log(10, {"loss": 2.5, "lr": 3e-4, "mfu": None, "tokens_per_s": 12345.0})
        log.log(20, {"loss": float("nan"), "lr": 3e-4})
        log.log_eval(20, {"loss": 2.25, "ppl": math.exp(2.25)})
    # pytest captures stderr, so it is no TTY: the bar is off and one line per log call goes to logging.
    summaries = [r.getMessage() for r in caplog.records]
    assert "step 10/100 | loss=2.5000 | lr=3.00e-04 | tok/s=12.3k" in summaries
    with _logger(_cfg(), tmp_path, start_step=20) as log:
        log.log(30, {"loss": 2.0})
    lines = _lines(tmp_path)
    assert [(line["kind"], line["step"]) for line in lines] == [
        ("train", 10),
        ("train", 20),
        ("eval", 20),
        ("train", 30),
    ]
    assert lines[0]["mfu"] is None and lines[0]["loss"] == 2.5
    assert math.isnan(lines[1]["loss"])
    assert lines[2]["val_loss"] == 2.25 and "loss" not in lines[2]
    assert "null" in (tmp_path / "metrics.jsonl").read_text().splitlines()[0]


def test_progress_bar_on_a_tty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Tty())
    with _logger(_cfg(), tmp_path, start_step=5) as log:
        log.log(10, {"loss": 1.25, "mfu": 0.4123, "memory_max_reserved_gib": 61.27})
        log.message("saved checkpoint")
        assert log._bar is not None and log._bar.n == 10
    out = sys.stderr.getvalue()
    assert "loss=1.2500" in out and "mfu=41.2%" in out and "mem=61.3GiB" in out
    assert "saved checkpoint" in capsys.readouterr().out


def test_other_ranks_write_nothing(tmp_path: Path) -> None:
    cfg = LoggingConfig(
        tensorboard=HAS_TENSORBOARD, wandb=WandbConfig(mode="offline" if HAS_WANDB else "disabled")
    )
    with _logger(cfg, tmp_path / "run", rank=1) as log:
        log.log(1, {"loss": 1.0})
        log.log_eval(1, {"loss": 1.0})
        log.message("hello")
    assert not (tmp_path / "run").exists()


def test_config_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="logging.wandb.mode"):
        _logger(LoggingConfig(wandb=WandbConfig(mode="sometimes")), tmp_path)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real_find_spec(name, *a)
    )
    with pytest.raises(ValueError, match="pip install wandb"):
        _logger(LoggingConfig(wandb=WandbConfig(mode="offline")), tmp_path, rank=1)


@pytest.mark.skipif(HAS_TENSORBOARD, reason="tensorboard is installed")
def test_tensorboard_missing_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"logging.tensorboard.*pip install tensorboard"):
        _logger(_cfg(tensorboard=True), tmp_path)


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed")
def test_tensorboard_writes_events(tmp_path: Path) -> None:
    with _logger(_cfg(tensorboard=True), tmp_path) as log:
        log.log(1, {"loss": 1.0, "mfu": None})
    assert any((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.skipif(not HAS_WANDB, reason="wandb is not installed")
def test_wandb_offline_run_resumes_under_run_dir(tmp_path: Path) -> None:
    cfg = LoggingConfig(wandb=WandbConfig(mode="offline", tags=["test"]))
    run_dir = tmp_path / "my_run"
    ids = []
    for step in (1, 2):
        with _logger(cfg, run_dir, start_step=step - 1) as log:
            log.log(step, {"loss": 1.0 / step, "mfu": None})
            log.log_eval(step, {"loss": 2.0})
            ids.append(log._wandb_run.id)
            assert log._wandb_run.name == "my_run"
    run_id = (run_dir / "wandb" / "run_id").read_text().strip()
    assert ids == [run_id, run_id]
    # Offline run folders are named by the second they started, so the two may share one.
    runs = list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert runs and all((run / f"run-{run_id}.wandb").stat().st_size > 0 for run in runs)


def test_missing_tensorboard_fails_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """In `validate`, before the data and the model are built, not when the logger opens."""
    from treadle.train.config import load_config, validate

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "tensorboard" else real_find_spec(name, *a),
    )
    with pytest.raises(ValueError, match=r"logging.tensorboard=true needs .*pip install tensorboard"):
        validate(load_config(["logging.tensorboard=true"]), world_size=1)


@pytest.mark.skipif(not HAS_WANDB, reason="wandb is not installed")
def test_wandb_run_id_continues_on_resume_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A resumed run (start_step > 0) continues the run dir's W&B run; a fresh start there opens a new one."""
    import types

    import wandb

    ids: list[str] = []

    def fake_init(**kwargs):
        ids.append(kwargs["id"])
        return types.SimpleNamespace(finish=lambda **_: None)

    monkeypatch.setattr(wandb, "init", fake_init)
    cfg = LoggingConfig(wandb=WandbConfig(mode="offline"))
    for start_step in (0, 5, 0):
        _logger(cfg, tmp_path, start_step=start_step).close()
    assert ids[1] == ids[0] and ids[2] != ids[0]
    assert (tmp_path / "wandb" / "run_id").read_text().strip() == ids[2]
