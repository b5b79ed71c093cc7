"""The fused FP8-moment AdamW kernel against the plain-PyTorch step (dequantise, `adamw_update_`, quantise).

Kernel and reference cannot be bit-equal everywhere: the kernel's pow is 2^(e·log2 x) and its divisions by a
group's scale are multiplications by its reciprocal, a few fp32 ulps from torch's pow and division (see the
kernel's module doc). Three consequences, each bounded below with the worst case measured on CPU (the
interpreter, these tests) and on an H100 (the gpu test, 67M elements, and a 4-step trajectory at that size):
- the update inherits that relative error of the dequantised moments, amplified by the 1/k power;
- a moment within that distance of an E4M3 rounding boundary rounds to the neighbouring code;
- k = log(448 / 2^-6) / log(max / min) goes through the group's smallest non-zero magnitude, which the lerp
  of the first moment can bring close to 0 by cancellation, where ulp-level differences are relatively
  large; the group's codes then all move a little (each still rounds the exact value to within half a step).
So a step from a shared state is held tightly, on the parameters and on how the moments round the exact
fp32 moments; over free-running steps the two trajectories are two roundings of nearly the same fp32
trajectory and are held to the size of the FP8 rounding itself.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch
import torch.nn as nn

from treadle.kernels import adamw_fp8 as k
from treadle.optim.low_precision import LowPrecisionAdamW

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else ("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not INTERPRET, reason="needs the interpreter or CUDA")

STEPS = 6
# Of a step's codes, how many may differ from the reference's (at least 2), and of its groups' exponents, how
# many by more than 1e-4 relatively (at least 1). Measured: none on CPU; on an H100 <= 9.0e-5 of the codes
# and <= 0.34% of the first moment's exponents (none of the second's).
MAX_CODE_FRACTION = 1e-3
MAX_EXPONENT_FRACTION = 0.02

# (shape, group size, magnitude of params and grads, grad dtype, expansion, betas)
CASES = {
    "padded_last_group": ((6, 300), 128, 1.0, torch.float32, True, (0.9, 0.95)),
    "3d_bf16_grad": ((3, 2, 160), 64, 1.0, torch.bfloat16, True, (0.9, 0.95)),
    "tiny": ((5, 96), 32, 1e-8, torch.float32, True, (0.9, 0.95)),
    "large": ((4, 130), 128, 1e4, torch.float32, True, (0.9, 0.95)),
    "rows_past_one_block": ((40, 64), 64, 1.0, torch.float32, True, (0.9, 0.95)),
    "no_expansion": ((6, 300), 128, 1.0, torch.float32, False, (0.9, 0.95)),
    "group_not_power_of_two": ((4, 100), 48, 1.0, torch.float32, True, (0.9, 0.95)),
    "lerp_large_weight": ((6, 300), 128, 1.0, torch.float32, True, (0.3, 0.9)),
}


def _grad(
    shape: tuple[int, ...], group_size: int, magnitude: float, dtype: torch.dtype, gen: torch.Generator
) -> torch.Tensor:
    """Magnitudes spread over 6 decades along each row (wide groups: small k), a group of zeros (its moments
    stay all-zero: k = 1, scale 0) and a row of one magnitude (range 1: k = MAX_EXPONENT)."""
    cols = shape[-1]
    g = torch.randn(shape, generator=gen) * torch.logspace(-4, 2, cols) * magnitude
    rows = g.view(-1, cols)
    rows[1, :group_size] = 0.0
    rows[2] = magnitude * torch.randn(1, generator=gen).sign()
    return g.to(DEVICE, dtype)


def _copy(moment: k.Fp8Moment) -> k.Fp8Moment:
    return k.Fp8Moment(*(t.clone() for t in moment))


def _zeros(shape: tuple[int, ...], group_size: int, expand: bool) -> k.Fp8Moment:
    return k.quantize_fp8(torch.zeros(shape, device=DEVICE), group_size, expand)


def _code_index(payload: torch.Tensor) -> torch.Tensor:
    """E4M3 codes as signed integers in value order (±0 -> 0): neighbouring values differ by 1."""
    bits = payload.view(torch.uint8).int()
    return torch.where(bits >= 128, 128 - bits, bits)


class Exact(NamedTuple):
    """A moment after the step in fp32, before rounding (the reference's intermediate), and the magnitude of
    the terms it was summed from (|old| + |g| for the first moment, |old| + g² for the second)."""

    value: torch.Tensor
    terms: torch.Tensor


def _exact(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: k.Fp8Moment,
    exp_avg_sq: k.Fp8Moment,
    hp: k.AdamWStep,
    group_size: int,
) -> tuple[Exact, Exact]:
    m = k.dequantize_fp8(*exp_avg, group_size)
    v = k.dequantize_fp8(*exp_avg_sq, group_size)
    g = grad.float()
    terms = (m.abs() + g.abs(), v.abs() + g.square())
    k.adamw_update_(param.clone(), g, m, v, hp)
    return Exact(m, terms[0]), Exact(v, terms[1])


def _assert_rounds(moment: k.Fp8Moment, exact: Exact, group_size: int) -> None:
    """Every element within half an E4M3 step of the exact moment: 2^-4 relatively for normal codes,
    (1 + 2^-4)^(1/k) - 1 after the 1/k power, or half a subnormal step (no expansion); plus 1e-6 of the
    summed terms, for the two computations of the same fp32 moment (see the module doc), which are ulps
    apart in the terms but can be far apart relative to a result the lerp brings near 0 (measured: the
    reference needs none of it, the kernel <= 2.4e-8 on an H100, none on CPU)."""
    cols = exact.value.shape[-1]
    exponent = moment.exponent.repeat_interleave(group_size, dim=-1)[..., :cols]
    scale = moment.scale.repeat_interleave(group_size, dim=-1)[..., :cols]
    half_step = ((1 + 2**-4) ** (1 / exponent) - 1) * exact.value.abs() + scale * (2**-10 / 448) ** (
        1 / exponent
    )
    error = (k.dequantize_fp8(*moment, group_size) - exact.value).abs()
    excess = error - half_step - 1e-6 * exact.terms
    assert torch.all(excess <= 0), excess.max()


def _assert_moments_close(
    actual: k.Fp8Moment,
    expected: k.Fp8Moment,
    exact: Exact,
    group_size: int,
    max_code_fraction: float,
    max_exponent_fraction: float,
) -> None:
    """The kernel's moment rounds the exact one as the reference's does (which `_assert_rounds` checks too,
    so the bound is not slack for it), and is the reference's but for a few codes and exponents."""
    _assert_rounds(expected, exact, group_size)
    _assert_rounds(actual, exact, group_size)
    codes_differ = (_code_index(actual.payload) != _code_index(expected.payload)).sum().item()
    assert codes_differ <= max(2, max_code_fraction * actual.payload.numel()), codes_differ
    # The scale is the group's max |x|: its fp32 value carries the dequantisation's pow error, amplified by
    # 1/k. Measured <= 4.9e-7 (CPU), 5.7e-7 (H100).
    torch.testing.assert_close(actual.scale, expected.scale, rtol=4e-6, atol=0)
    # An all-zero group involves no rounding: scale 0 and k = 1 exactly.
    zero = expected.scale == 0
    assert torch.all(actual.scale[zero] == 0) and torch.all(actual.exponent[zero] == 1)
    # k goes through the group's smallest magnitude, which can sit on a cancellation (module doc).
    exponent_differs = ((actual.exponent - expected.exponent).abs() > 1e-4 * expected.exponent).sum().item()
    assert exponent_differs <= max(1, max_exponent_fraction * expected.exponent.numel()), exponent_differs


def _check_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: k.Fp8Moment,
    exp_avg_sq: k.Fp8Moment,
    hp: k.AdamWStep,
    group_size: int,
    expand: bool = True,
) -> tuple[k.Fp8Moment, k.Fp8Moment]:
    """One step of the kernel and of the reference from the same state; the reference's result goes on."""
    fused, fused_m, fused_v = param.clone(), _copy(exp_avg), _copy(exp_avg_sq)
    k.adamw_fp8_step_triton(fused, grad, fused_m, fused_v, hp, group_size, expand)
    exact_m, exact_v = _exact(param, grad, exp_avg, exp_avg_sq, hp, group_size)
    m, v = k.adamw_fp8_step_reference(param, grad, exp_avg, exp_avg_sq, hp, group_size, expand)
    torch.testing.assert_close(fused, param, rtol=2**-21, atol=1e-5 * hp.lr)
    _assert_moments_close(fused_m, m, exact_m, group_size, MAX_CODE_FRACTION, MAX_EXPONENT_FRACTION)
    _assert_moments_close(fused_v, v, exact_v, group_size, MAX_CODE_FRACTION, MAX_EXPONENT_FRACTION)
    return m, v


def _setup(
    case: str,
) -> tuple[
    torch.Tensor,
    tuple[k.Fp8Moment, k.Fp8Moment],
    list[torch.Tensor],
    Callable[[int], k.AdamWStep],
    int,
    bool,
]:
    shape, group_size, magnitude, grad_dtype, expand, betas = CASES[case]
    gen = torch.Generator().manual_seed(0)
    param = (torch.randn(shape, generator=gen) * magnitude).to(DEVICE)
    moments = (_zeros(shape, group_size, expand), _zeros(shape, group_size, expand))
    grads = [_grad(shape, group_size, magnitude, grad_dtype, gen) for _ in range(STEPS)]

    def hp(step: int) -> k.AdamWStep:
        return k.AdamWStep(
            lr=1e-2 * magnitude, beta1=betas[0], beta2=betas[1], eps=1e-8, weight_decay=0.1, step=step
        )

    return param, moments, grads, hp, group_size, expand


@pytest.mark.parametrize("case", list(CASES))
def test_each_step_matches_the_reference_from_the_same_state(case: str) -> None:
    """Along the reference's trajectory, every step of the kernel from the reference's state (`_check_step`).
    Parameters: 2^-21 relatively (2 to 4 fp32 ulps: on a GPU the compiler may contract the kernel's decay
    and update into one fma, and torch's CUDA division by the scalar bias correction multiplies by its
    reciprocal) plus 1e-5 of the learning rate, for the moments' relative error carried into the update
    (which is at most ~lr). Measured beyond 2 ulps: <= 8e-7·lr (CPU); <= 1.2e-5·lr, within 3 ulps (H100).
    Moments: `_assert_moments_close`."""
    param, (m, v), grads, hp, group_size, expand = _setup(case)
    for step, grad in enumerate(grads, start=1):
        m, v = _check_step(param, grad, m, v, hp(step), group_size, expand)


@pytest.mark.parametrize("case", ["padded_last_group", "3d_bf16_grad", "tiny", "no_expansion"])
def test_free_running_steps_stay_within_fp8_rounding_of_the_reference(case: str) -> None:
    """STEPS steps from one initial state, each path on its own state. Once a value rounds to the other
    neighbouring code (or a group's k moves), the two paths are two roundings of the same fp32 trajectory;
    two independent roundings differ by about sqrt(2) times one rounding's error in norm. So the distance
    between them is held below 1.5 times the reference's distance from AdamW with fp32 moments (measured
    <= 0.31 for the parameters, <= 0.23 for the moments)."""
    param, (m, v), grads, hp, group_size, expand = _setup(case)
    fused, fused_m, fused_v = param.clone(), _copy(m), _copy(v)
    exact, exact_m, exact_v = param.clone(), torch.zeros_like(param), torch.zeros_like(param)
    for step, grad in enumerate(grads, start=1):
        k.adamw_fp8_step_triton(fused, grad, fused_m, fused_v, hp(step), group_size, expand)
        m, v = k.adamw_fp8_step_reference(param, grad, m, v, hp(step), group_size, expand)
        k.adamw_update_(exact, grad.float(), exact_m, exact_v, hp(step))
    assert (fused - param).norm() <= 1.5 * (param - exact).norm()
    for ours, ref, fp32 in ((fused_m, m, exact_m), (fused_v, v, exact_v)):
        ours, ref = k.dequantize_fp8(*ours, group_size), k.dequantize_fp8(*ref, group_size)
        assert (ours - ref).norm() <= 1.5 * (ref - fp32).norm()


def test_padding_and_rows_past_the_end_are_not_written() -> None:
    """Every tensor is the front of a larger buffer: the kernel writes none of the sentinels behind it (an
    unmasked store of the padded columns of the last row, or of rows past the last, would)."""
    rows, cols, group_size, extra = 3, 40, 32, 64
    num_groups = 2
    gen = torch.Generator().manual_seed(3)

    def front(numel: int, fill: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        buffer = torch.full((numel + extra,), fill, dtype=dtype, device=DEVICE)
        return buffer, buffer[:numel]

    p_buf, p = front(rows * cols, 7.0, torch.float32)
    p.copy_(torch.randn(rows * cols, generator=gen).to(DEVICE))
    moments, buffers = [], []
    for _ in range(2):
        q_buf, q = front(rows * cols, 0.0, torch.uint8)
        q_buf.fill_(0x55)
        q.zero_()
        s_buf, s = front(rows * num_groups, 7.0, torch.float32)
        e_buf, e = front(rows * num_groups, 7.0, torch.float32)
        s.zero_()
        e.fill_(1.0)
        moments.append(
            k.Fp8Moment(
                q.view(k.FP8_DTYPE).view(rows, cols), s.view(rows, num_groups), e.view(rows, num_groups)
            )
        )
        buffers += [(q_buf, rows * cols), (s_buf, rows * num_groups), (e_buf, rows * num_groups)]
    grad = torch.randn(rows, cols, generator=gen).to(DEVICE)
    hp = k.AdamWStep(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=1)
    reference = p.view(rows, cols).clone()
    exact = _exact(reference, grad, *moments, hp, group_size)
    expected = k.adamw_fp8_step_reference(reference, grad, *(_copy(m) for m in moments), hp, group_size)
    k.adamw_fp8_step_triton(p.view(rows, cols), grad, *moments, hp, group_size)
    assert torch.all(p_buf[rows * cols :] == 7.0)
    for buffer, numel in buffers:
        sentinel = 0x55 if buffer.dtype == torch.uint8 else 7.0
        assert torch.all(buffer[numel:] == sentinel)
    torch.testing.assert_close(p.view(rows, cols), reference, rtol=2**-21, atol=1e-5 * hp.lr)
    for ours, ref, fp32 in zip(moments, expected, exact, strict=True):
        _assert_moments_close(ours, ref, fp32, group_size, MAX_CODE_FRACTION, MAX_EXPONENT_FRACTION)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(48, 40), nn.GELU(), nn.Linear(40, 24)).to(DEVICE)


def _optimizer(model: nn.Module, fused: bool) -> LowPrecisionAdamW:
    return LowPrecisionAdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), group_size=16, fused=fused)


def _train(model: nn.Module, opt: LowPrecisionAdamW, steps: int) -> list[float]:
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x = torch.randn(32, 48, generator=gen).to(DEVICE)
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_optimizer_runs_the_kernel_in_place_and_resumes_bitwise() -> None:
    """`LowPrecisionAdamW(fused=True)`: the matrices' moments are updated in place (the Python path stores
    new tensors), the losses follow the Python path's within FP8 rounding (measured: 3.8e-5 relative), and a
    checkpoint taken mid-run (with `step` a tensor, as before) resumes to the same bits."""
    python_model, fused_model = _model(), _model()
    python_opt, fused_opt = _optimizer(python_model, False), _optimizer(fused_model, True)
    python_losses = _train(python_model, python_opt, 3)
    fused_losses = _train(fused_model, fused_opt, 3)
    weight = fused_model[0].weight
    payload = fused_opt.state[weight]["exp_avg"]
    buffer = io.BytesIO()
    torch.save({"model": fused_model.state_dict(), "optim": fused_opt.state_dict()}, buffer)
    python_losses += _train(python_model, python_opt, 3)
    fused_losses += _train(fused_model, fused_opt, 3)
    assert fused_opt.state[weight]["exp_avg"] is payload
    assert fused_opt.state[weight]["step"].item() == 6
    torch.testing.assert_close(torch.tensor(fused_losses), torch.tensor(python_losses), rtol=1e-3, atol=0)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert isinstance(saved["optim"]["state"][0]["step"], torch.Tensor)
    # Loaded into the optimizer that ran on: its step counts must follow the checkpoint.
    straight = [p.detach().clone() for p in fused_model.parameters()]
    fused_model.load_state_dict(saved["model"])
    fused_opt.load_state_dict(saved["optim"])
    assert _train(fused_model, fused_opt, 3) == fused_losses[3:]
    for a, b in zip(straight, fused_model.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs a CUDA device")
def test_gpu_real_shape_matches_reference_and_allocates_nothing() -> None:
    """One 32768 x 2048 matrix (bf16 grad), three steps each from the reference's state, held as on the CPU;
    the kernel step allocates no temporaries beyond its launch."""
    shape, group_size = (32768, 2048), 128
    gen = torch.Generator(device="cuda").manual_seed(0)
    param = torch.randn(shape, device="cuda", generator=gen) * 0.02
    m, v = _zeros(shape, group_size, True), _zeros(shape, group_size, True)
    for step in range(1, 4):
        scales = torch.logspace(-4, 0, shape[-1], device="cuda")
        grad = (torch.randn(shape, device="cuda", generator=gen) * scales).to(torch.bfloat16)
        hp = k.AdamWStep(lr=3e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=step)
        fused, fused_m, fused_v = param.clone(), _copy(m), _copy(v)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        k.adamw_fp8_step_triton(fused, grad, fused_m, fused_v, hp, group_size)
        torch.cuda.synchronize()
        assert torch.cuda.max_memory_allocated() - before < 1 << 20
        m, v = _check_step(param, grad, m, v, hp, group_size)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs a CUDA device")
def test_gpu_integer_float8_codec_equals_the_hardware_conversion() -> None:
    """The path of GPUs without Triton's E4M3 type (compute capability < 8.9: float8 bits encoded and decoded
    in integers) against the hardware conversion, on a GPU that has both: the same parameters and moments,
    bit for bit, over three steps."""
    shape, group_size = (256, 1000), 128  # a padded last group
    gen = torch.Generator(device="cuda").manual_seed(0)
    param = torch.randn(shape, device="cuda", generator=gen) * 0.02
    states = {soft: (param.clone(), _zeros(shape, group_size, True), _zeros(shape, group_size, True))
              for soft in (False, True)}  # fmt: skip
    for step in range(1, 4):
        grad = (torch.randn(shape, device="cuda", generator=gen) * 1e-3).to(torch.bfloat16)
        hp = k.AdamWStep(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=step)
        for soft, (p, m, v) in states.items():
            k.adamw_fp8_step_triton(p, grad, m, v, hp, group_size, soft_cast=soft)
    (p0, m0, v0), (p1, m1, v1) = states[False], states[True]
    assert torch.equal(p0, p1)
    for a, b in ((m0, m1), (v0, v1)):
        assert torch.equal(a.payload.view(torch.uint8), b.payload.view(torch.uint8))
        assert torch.equal(a.scale, b.scale) and torch.equal(a.exponent, b.exponent)


def test_soft_float8_codec_is_chosen_below_compute_capability_8_9(monkeypatch) -> None:
    """GPUs without Triton's E4M3 type get the integer codec in every FP8 kernel (one rule, `_soft_cast`)."""
    from treadle.kernels import fp8_cast

    monkeypatch.setattr(fp8_cast, "_interpreting", lambda: False)
    for capability, soft in (((8, 0), True), ((8, 9), False), ((9, 0), False)):
        fp8_cast._has_e4m3.cache_clear()
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None, c=capability: c)
        assert fp8_cast._soft_cast(torch.device("cuda", 0)) is soft
    fp8_cast._has_e4m3.cache_clear()
    assert fp8_cast._soft_cast(torch.device("cpu")) is True
