"""FP8 linears on CPU (emulated FP8 numerics): the module swap, its filter, and parity with fp32.

Tolerances against fp32, as relative Frobenius errors of whole tensors (measured here in brackets): E4M3
keeps 3 mantissa bits, a relative rounding error up to 2^-4 per element, ~2^-4/sqrt(3) ≈ 3.6% rms; a
product of two quantised operands has ~5% rms error before the sum averages independent errors down.
Forward [3-4%] < 8%; gradients, with E5M2 (2 mantissa bits) for dy in tensorwise [5-6%] < 12%.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
from fp8_fixtures import BLOCK_LINEARS, CFG, CPU, rel_error
from lm_helpers import lm_loss

from treadle.kernels.fp8_linear import fp8_linear_reference
from treadle.models.llama import Llama
from treadle.parallel.fp8 import Float8Config, Float8Linear, convert_to_float8


def _convert(model: nn.Module, **kwargs) -> list[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert_to_float8(model, Float8Config(enabled=True, **kwargs), CPU)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_linear_matches_fp8_reference_and_fp32(recipe: str) -> None:
    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(64, 96, bias=True)
    with torch.no_grad():
        linear.weight.copy_(0.05 * torch.randn(96, 64, generator=gen))
        linear.bias.copy_(torch.randn(96, generator=gen))
    fp8 = Float8Linear.from_linear(linear, recipe, emulate=True)
    assert fp8.weight is linear.weight and fp8.bias is linear.bias
    x = torch.randn(4, 32, 64, generator=gen).requires_grad_()
    dy = torch.randn(4, 32, 96, generator=gen)
    y = fp8(x)
    dx, dw, db = torch.autograd.grad(y, (x, fp8.weight, fp8.bias), dy)
    y_ref, dx_ref, dw_ref = fp8_linear_reference(x.detach(), linear.weight.detach(), dy, recipe)
    torch.testing.assert_close(y, y_ref + linear.bias, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw, dw_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(db, dy.sum((0, 1)))
    y32 = linear(x)
    dx32, dw32 = torch.autograd.grad(y32, (x, linear.weight), dy)
    assert rel_error(y - linear.bias, y32 - linear.bias) < 0.08
    assert rel_error(dx, dx32) < 0.12 and rel_error(dw, dw32) < 0.12
    # Not a no-op: FP8 rounding is visible.
    assert rel_error(y - linear.bias, y32 - linear.bias) > 1e-3


def test_filter_selects_block_linears_and_never_the_output_layer() -> None:
    model = Llama(CFG)
    converted = _convert(model)
    expected = {f"layers.{i}.{name}" for i in range(CFG.num_layers) for name in BLOCK_LINEARS}
    assert set(converted) == expected
    assert type(model.lm_head) is nn.Linear
    assert all(isinstance(model.get_submodule(fqn), Float8Linear) for fqn in expected)
    # Exclusions and a narrower include; parameter names do not change.
    model = Llama(CFG)
    names = [n for n, _ in model.named_parameters()]
    converted = _convert(model, include=["layers.*.mlp.*"], exclude=["*down_proj"])
    assert set(converted) == {f"layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj")}
    assert [n for n, _ in model.named_parameters()] == names


def test_dims_not_multiple_of_16_are_skipped_and_settings_validated() -> None:
    model = nn.Sequential(nn.Linear(64, 40), nn.Linear(40, 32))
    assert _convert(model, include=["*"]) == []
    with pytest.raises(ValueError, match="fp8.recipe='blockwise'"):
        Float8Config(enabled=True, recipe="blockwise").validate()
    with pytest.raises(ValueError, match="fp8.backend='transformer_engine'"):
        Float8Config(enabled=True, backend="transformer_engine").validate()


def test_cpu_warns_that_fp8_is_emulated() -> None:
    with pytest.warns(UserWarning, match="emulated"):
        convert_to_float8(Llama(CFG), Float8Config(enabled=True), CPU)


def test_model_with_fp8_linears_tracks_fp32_model() -> None:
    """A whole (tiny) model: loss within 1% and every gradient within the per-layer tolerance of fp32."""
    torch.manual_seed(0)
    ref, fp8 = Llama(CFG), Llama(CFG)
    ref.init_weights(seed=3)
    fp8.init_weights(seed=3)
    _convert(fp8)
    tokens = torch.randint(0, 97, (2, 48), generator=torch.Generator().manual_seed(1))
    losses, grads = [], []
    for model in (ref, fp8):
        loss, count = lm_loss(model, tokens, tokens)
        (loss / count).backward()
        losses.append((loss / count).item())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert abs(losses[1] - losses[0]) < 0.01 * losses[0]
    for name, grad in grads[0].items():
        assert rel_error(grads[1][name], grad) < 0.15, name
    assert max(rel_error(grads[1][n], g) for n, g in grads[0].items()) > 1e-3


@pytest.mark.skipif(not hasattr(torch, "compile"), reason="torch.compile missing")
def test_compiles_with_fullgraph() -> None:
    """Dynamo traces the autograd Function (the reference casts, `_scaled_mm` or its emulation) in one graph."""
    torch._dynamo.reset()
    fp8 = Float8Linear.from_linear(nn.Linear(32, 48, bias=False), "tensorwise", emulate=True)
    x = torch.randn(16, 32, requires_grad=True)
    compiled = torch.compile(fp8, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y_eager = fp8(x)
    torch.testing.assert_close(y, y_eager)
    g, g_eager = torch.autograd.grad(y.sum(), x), torch.autograd.grad(y_eager.sum(), x)
    torch.testing.assert_close(g, g_eager)
