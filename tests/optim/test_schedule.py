import math

import pytest
import torch

from treadle.optim.builder import build_optimizer, lr_factor
from treadle.optim.clip import clip_grad_norm_
from treadle.optim.config import OptimConfig, ScheduleConfig


def test_warmup_is_linear_then_cosine_reaches_the_floor():
    cfg = ScheduleConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg, 100) == pytest.approx(0.1)
    assert lr_factor(9, cfg, 100) == pytest.approx(1.0)
    assert lr_factor(10, cfg, 100) == pytest.approx(1.0)
    assert lr_factor(55, cfg, 100) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(100, cfg, 100) == pytest.approx(0.1)


def test_linear_and_wsd_schedules():
    linear = ScheduleConfig(name="linear", warmup_steps=0, min_lr_ratio=0.0)
    assert lr_factor(50, linear, 100) == pytest.approx(0.5)
    wsd = ScheduleConfig(name="wsd", warmup_steps=10, min_lr_ratio=0.0, decay_fraction=0.2)
    assert lr_factor(50, wsd, 100) == 1.0  # stable phase
    assert lr_factor(90, wsd, 100) == pytest.approx(0.5)  # halfway through the last 20 steps
    assert lr_factor(100, wsd, 100) == pytest.approx(0.0)


def test_constant_schedule_and_unknown_name():
    assert lr_factor(500, ScheduleConfig(name="constant", warmup_steps=5), 100) == 1.0
    with pytest.raises(ValueError, match="optim.schedule.name"):
        lr_factor(0, ScheduleConfig(name="cosin"), 10)


def test_weight_decay_skips_vectors():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1), torch.device("cpu"))
    decays = {p.ndim: g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decays == {2: 0.1, 1: 0.0}


def test_clip_matches_torch_on_plain_tensors():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn_like(p) * 10
    expected_grads = [p.grad.clone() for p in params]
    norm_ref = torch.linalg.vector_norm(torch.stack([g.norm() for g in expected_grads]))
    norm = clip_grad_norm_(params, 1.0)
    torch.testing.assert_close(norm, norm_ref)
    clipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
    torch.testing.assert_close(clipped, torch.tensor(1.0), rtol=1e-5, atol=1e-5)
