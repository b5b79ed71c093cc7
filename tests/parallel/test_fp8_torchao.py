"""`fp8.backend=torchao` on CPU (torchao's emulated FP8): the module swap and its filter, parity with fp32 and
with the treadle backend, the FP8 all-gather switch, state-dict names, the error without torchao.

Tolerances, as relative Frobenius errors of whole tensors (measured here in brackets):
- against fp32, the same bounds as tests/memory/test_fp8_linear.py, which derives them: forward [3.7%] < 8%,
  gradients [3.7-6%] < 12%;
- against the treadle backend, tensorwise: both cast every operand with the same per-tensor scale
  (fp8_max / amax) to the same formats, so only the fp32 summation order of the dequantised GEMMs
  differs: one linear [1e-7] < 1e-5; a whole model's gradients, where an operand that lands on an FP8
  rounding boundary can round the other way, [9e-6] < 1e-4;
- against the treadle backend, rowwise: torchao rounds each row's scale down to a power of two, ours
  does not, so the two quantisation errors (~3.7% each) are independent and add in quadrature: ≈ 5.2%
  [5.2%] < 8%.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
from fp8_fixtures import BLOCK_LINEARS, CFG, CPU, rel_error
from lm_helpers import lm_loss

from treadle.models.llama import Llama
from treadle.parallel import fp8 as fp8_plan
from treadle.parallel.fp8 import Float8Config, Float8Linear, convert_to_float8, weight_scale_refresh
from treadle.parallel.fp8_torchao import TORCHAO_MISSING, precompute_weight_scales, torchao_available

needs_torchao = pytest.mark.skipif(not torchao_available(), reason="torchao is not installed")


def _convert(model: nn.Module, **kwargs) -> list[str]:
    kwargs = {"backend": "torchao", "emulate": True, **kwargs}
    return convert_to_float8(model, Float8Config(enabled=True, **kwargs), CPU)


def _torchao_linear(linear: nn.Linear, recipe: str) -> nn.Module:
    holder = nn.Sequential(copy.deepcopy(linear))
    _convert(holder, recipe=recipe, include=["*"], exclude=[])
    return holder[0]


def test_missing_torchao_names_the_key_and_the_fix(monkeypatch) -> None:
    monkeypatch.setattr(fp8_plan, "torchao_available", lambda: False)
    with pytest.raises(ValueError, match="fp8.backend=torchao needs torchao") as err:
        Float8Config(enabled=True, backend="torchao").validate()
    assert str(err.value) == TORCHAO_MISSING and "fp8.backend=treadle" in TORCHAO_MISSING
    with pytest.raises(ValueError, match="fp8.backend=torchao needs torchao"):
        convert_to_float8(
            nn.Sequential(nn.Linear(16, 16)), Float8Config(enabled=True, backend="torchao"), CPU
        )
    Float8Config(enabled=False, backend="torchao").validate()  # not used, not needed
    with pytest.raises(ValueError, match="fp8.backend='te'"):
        Float8Config(enabled=True, backend="te").validate()


@needs_torchao
def test_filter_converts_the_treadle_backends_linears_and_never_the_output_layer() -> None:
    from torchao.float8.float8_linear import Float8Linear as TorchaoFloat8Linear

    model = Llama(CFG)
    names = [n for n, _ in model.named_parameters()]
    converted = _convert(model)
    expected = {f"layers.{i}.{name}" for i in range(CFG.num_layers) for name in BLOCK_LINEARS}
    assert set(converted) == expected
    assert set(converted) == set(convert_to_float8(Llama(CFG), Float8Config(enabled=True, emulate=True), CPU))
    assert type(model.lm_head) is nn.Linear
    for fqn, module in model.named_modules():
        assert isinstance(module, TorchaoFloat8Linear) == (fqn in expected), fqn
    assert [n for n, _ in model.named_parameters()] == names
    # A narrower include and an exclusion, as fnmatch patterns on the FQN.
    model = Llama(CFG)
    converted = _convert(model, include=["layers.*.mlp.*"], exclude=["*down_proj"])
    assert set(converted) == {f"layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj")}
    assert type(model.get_submodule("layers.0.mlp.down_proj")) is nn.Linear
    assert type(model.get_submodule("layers.0.self_attn.q_proj")) is nn.Linear
    assert isinstance(model.get_submodule("layers.1.mlp.up_proj"), TorchaoFloat8Linear)


@needs_torchao
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_linear_matches_fp32_and_the_treadle_backend(recipe: str) -> None:
    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(64, 96, bias=True)
    with torch.no_grad():
        linear.weight.copy_(0.05 * torch.randn(96, 64, generator=gen))
        linear.bias.copy_(torch.randn(96, generator=gen))
    x = torch.randn(4, 32, 64, generator=gen)
    dy = torch.randn(4, 32, 96, generator=gen)
    results = {}
    for name, module in (
        ("fp32", copy.deepcopy(linear)),
        ("treadle", Float8Linear.from_linear(copy.deepcopy(linear), recipe, emulate=True)),
        ("torchao", _torchao_linear(linear, recipe)),
    ):
        x_in = x.clone().requires_grad_()
        y = module(x_in)
        dx, dw, db = torch.autograd.grad(y, (x_in, module.weight, module.bias), dy)
        torch.testing.assert_close(db, dy.sum((0, 1)))
        results[name] = (y - module.bias, dx, dw)
    torchao, treadle, fp32 = results["torchao"], results["treadle"], results["fp32"]
    assert rel_error(torchao[0], fp32[0]) < 0.08
    assert rel_error(torchao[1], fp32[1]) < 0.12 and rel_error(torchao[2], fp32[2]) < 0.12
    assert rel_error(torchao[0], fp32[0]) > 1e-3  # FP8 rounding is visible: not a plain linear
    bound = 1e-5 if recipe == "tensorwise" else 0.08
    for ours, theirs in zip(treadle, torchao, strict=True):
        assert rel_error(theirs, ours) < bound


@needs_torchao
def test_model_tracks_fp32_and_the_treadle_backend() -> None:
    """A whole (tiny) model, tensorwise: loss within 1% of fp32, and gradients equal to the treadle
    backend's up to summation order."""
    tokens = torch.randint(0, 97, (2, 48), generator=torch.Generator().manual_seed(1))
    losses, grads = {}, {}
    for backend in ("fp32", "treadle", "torchao"):
        model = Llama(CFG)
        model.init_weights(seed=3)
        if backend != "fp32":
            _convert(model, backend=backend)
        loss, count = lm_loss(model, tokens, tokens)
        (loss / count).backward()
        losses[backend] = (loss / count).item()
        grads[backend] = {n: p.grad for n, p in model.named_parameters()}
    assert abs(losses["torchao"] - losses["fp32"]) < 0.01 * losses["fp32"]
    assert abs(losses["torchao"] - losses["treadle"]) < 1e-5 * losses["treadle"]
    for name, grad in grads["treadle"].items():
        assert rel_error(grads["torchao"][name], grad) < 1e-4, name
        assert rel_error(grads["torchao"][name], grads["fp32"][name]) < 0.15, name


@needs_torchao
def test_float8_all_gather_switch_wraps_weights_and_keeps_state_dict_names() -> None:
    """Converted on the meta device, as the engine does: the all-gather wrapper (tensorwise, switch on) is a
    tensor subclass of the weight's shape and dtype, and the state dict is the plain model's."""
    from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor

    def build(**kwargs) -> nn.Module:
        with torch.device("meta"):
            model = Llama(CFG)
        if kwargs:
            _convert(model, **kwargs)
        model.to_empty(device=CPU)
        model.init_weights(seed=3)
        return model

    plain = build()
    wrapped = build(recipe="tensorwise")
    weight = wrapped.get_submodule("layers.0.mlp.up_proj").weight
    assert isinstance(weight, nn.Parameter) and isinstance(weight, WeightWithDynamicFloat8CastTensor)
    # Plain tensors (a checkpoint of the wrapper class could only be loaded with torchao imported), which
    # share the parameter's storage, so loading into them in place fills the model.
    state = wrapped.state_dict()
    assert list(state) == list(plain.state_dict())
    for name, value in plain.state_dict().items():
        assert type(state[name]) is torch.Tensor and not state[name].requires_grad, name
        torch.testing.assert_close(state[name], value, rtol=0, atol=0)
    state["layers.0.mlp.up_proj.weight"].zero_()
    assert weight.abs().sum() == 0
    for kwargs in ({"recipe": "rowwise"}, {"fsdp_float8_all_gather": False}, {"backend": "treadle"}):
        other = build(**kwargs)
        assert not isinstance(
            other.get_submodule("layers.0.mlp.up_proj").weight, WeightWithDynamicFloat8CastTensor
        )
        assert list(other.state_dict()) == list(plain.state_dict())
    # The engine's post-step refresh exists exactly where the wrapper does.
    assert weight_scale_refresh(Float8Config(enabled=True, backend="torchao")) is precompute_weight_scales
    for kwargs in (
        {"backend": "torchao", "recipe": "rowwise"},
        {"backend": "torchao", "fsdp_float8_all_gather": False},
        {"backend": "treadle"},
        {"enabled": False, "backend": "torchao"},
    ):
        assert weight_scale_refresh(Float8Config(**{"enabled": True, **kwargs})) is None, kwargs


@needs_torchao
def test_cpu_without_emulate_warns_and_emulates() -> None:
    """As with the treadle backend: no FP8 tensor cores → a warning, and torchao's emulation."""
    model = Llama(CFG)
    with pytest.warns(UserWarning, match="emulated"):
        convert_to_float8(model, Float8Config(enabled=True, backend="torchao"), CPU)
    assert model.get_submodule("layers.0.mlp.up_proj").config.emulate
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _convert(Llama(CFG))  # fp8.emulate=true asked for it: nothing to warn about
