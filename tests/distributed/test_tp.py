"""Gradient parity of a tensor-parallel (+ sequence-parallel) model with its unsharded twin.

Both start from identical weights (initialisation is layout-independent, see models/init.py). fp32 on CPU:
the only differences are summation orders inside the row-parallel reductions, so gradients agree to ~1e-6.
"""

from __future__ import annotations

import pytest
import torch
from _spawn import run_distributed
from lm_helpers import lm_loss
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from treadle.experiments.tp_batch_overlap import apply_batch_overlap
from treadle.models.llama import TP_PLAN, Llama, ModelConfig
from treadle.models.ops import KernelsConfig
from treadle.parallel.fp8 import Float8Config, convert_to_float8
from treadle.parallel.loss import vocab_parallel_linear_cross_entropy
from treadle.parallel.tp import apply_tp

pytestmark = pytest.mark.slow
CFG = dict(dim=64, num_layers=1, num_heads=4, num_kv_heads=2, vocab_size=96, ffn_dim=128, max_seq_len=32)


def _grads(
    rank: int,
    world_size: int,
    sequence_parallel: bool,
    tie: bool,
    fp8: str | None = None,
    batch_overlap: bool = False,
    rmsnorm: str = "torch",
) -> dict[str, float]:
    torch.manual_seed(0)
    tokens = torch.randint(0, 96, (2, 16))
    labels = torch.randint(0, 96, (2, 16))
    labels[0, :5] = -100
    cfg = ModelConfig(**CFG, tie_embeddings=tie)

    # FP8 (emulated): every block linear on both sides; the TP side must quantise with the same scales.
    fp8_cfg = Float8Config(enabled=fp8 is not None, recipe=fp8 or "tensorwise", emulate=True)
    kernels = KernelsConfig(rmsnorm=rmsnorm)
    twin = Llama(cfg, kernels)
    twin.init_weights(seed=7)
    convert_to_float8(twin, fp8_cfg, torch.device("cpu"))
    loss, _ = lm_loss(twin, tokens, labels)
    loss.backward()

    with torch.device("meta"):
        model = Llama(cfg, kernels)
    converted = convert_to_float8(model, fp8_cfg, torch.device("cpu"))
    assert (fp8 is None) == (not converted)
    apply_tp(
        model,
        init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",)),
        TP_PLAN,
        sequence_parallel=sequence_parallel,
    )
    if batch_overlap:
        apply_batch_overlap(model.layers)
    model.to_empty(device="cpu")
    model.init_weights(seed=7)
    tp_loss, _ = lm_loss(model, tokens, labels, op=vocab_parallel_linear_cross_entropy)
    tp_loss.backward()

    errors = {"loss": abs(tp_loss.item() - loss.item())}
    if batch_overlap:
        # The chunked order really ran: both chunks' attention before either chunk's MLP.
        order = []
        block = model.layers["0"]
        for name in ("self_attn", "mlp"):
            getattr(block, name).register_forward_hook(lambda m, a, o, name=name: order.append(name))
        lm_loss(model, tokens, labels, op=vocab_parallel_linear_cross_entropy)
        errors["order"] = float(order != ["self_attn", "self_attn", "mlp", "mlp"])
    twin_params = dict(twin.named_parameters())
    for name, param in model.named_parameters():
        grad = param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad
        errors[name] = (grad - twin_params[name].grad).abs().max().item()
    return errors


@pytest.mark.parametrize("sequence_parallel", [True, False])
@pytest.mark.parametrize("tie", [True, False])
def test_tp_gradients_match_the_unsharded_twin(sequence_parallel, tie):
    errors = run_distributed(_grads, 2, sequence_parallel, tie)[0]
    assert len(errors) > 10
    assert max(errors.values()) < 1e-5, {k: v for k, v in errors.items() if v >= 1e-5}


@pytest.mark.parametrize("tie", [True, False])
def test_tp_batch_overlap_gradients_match_the_unsharded_twin(tie):
    """TP without SP, each block's batch in two chunks interleaved sublayer by sublayer (parallel.tp_batch_overlap)."""
    errors = run_distributed(_grads, 2, False, tie, None, True)[0]
    assert errors["order"] == 0.0
    assert max(errors.values()) < 1e-5, {k: v for k, v in errors.items() if v >= 1e-5}


@pytest.mark.parametrize("sequence_parallel", [True, False])
def test_tp_with_the_triton_rmsnorm_matches_the_unsharded_twin(sequence_parallel):
    """kernels.rmsnorm=triton under TP: the kernel runs on each rank's local rows (parallel/tp.py's LocalRowsNorm),
    never on a DTensor or on a collective's output still in flight (eager, without SP), and the norm weights'
    gradients are summed over the sequence shards with SP."""
    errors = run_distributed(_grads, 2, sequence_parallel, False, None, False, "triton")[0]
    assert len(errors) > 10
    assert max(errors.values()) < 1e-5, {k: v for k, v in errors.items() if v >= 1e-5}


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_tp_gradients_match_the_unsharded_fp8_twin(recipe):
    """FP8 linears under TP+SP: the amax of every sharded operand is taken over the TP group, so the shards
    are quantised exactly as the whole tensors are on one device; only the row-parallel sums' order differs
    (and may move a rare value across an FP8 rounding boundary)."""
    errors = run_distributed(_grads, 2, True, False, recipe)[0]
    assert len(errors) > 10
    assert max(errors.values()) < 1e-4, {k: v for k, v in errors.items() if v >= 1e-4}


def _compiled_block_order(rank: int, world_size: int, mode: str) -> list[str]:
    """Inductor's generated forward of one compiled, batch-chunked TP block (no SP) under `mode`'s settings: the
    sequence of its collectives, waits and matmuls."""
    import re

    import torch._inductor.config as inductor_config
    from torch._inductor.utils import run_and_get_code

    from treadle.parallel.tp import enable_comm_reordering

    torch.manual_seed(0)
    with torch.device("meta"):
        model = Llama(ModelConfig(**CFG))
    apply_tp(
        model,
        init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",)),
        TP_PLAN,
        sequence_parallel=False,
    )
    apply_batch_overlap(model.layers)
    model.to_empty(device="cpu")
    model.init_weights(seed=7)
    block = model.layers["0"]
    x = torch.randn(2, 16, CFG["dim"])
    cos, sin = model.rope_tables(torch.arange(16)[None])
    with inductor_config.patch(
        reorder_for_compute_comm_overlap=False,
        reorder_for_compute_comm_overlap_passes=[],
        score_fusion_memory_threshold=inductor_config.score_fusion_memory_threshold,
    ):
        if mode != "none":  # what the engine sets for tp_comm_reorder, and for tp_batch_overlap
            enable_comm_reordering(batch_chunks=mode == "batch_overlap")
        torch._dynamo.reset()
        _, codes = run_and_get_code(torch.compile(block), x, cos, sin, None)
    calls = re.findall(r"(all_reduce_|wait_tensor)\.default\(|extern_kernels\.(mm)\(", "\n".join(codes))
    return [collective or matmul for collective, matmul in calls]


@pytest.mark.parametrize("mode", ["none", "reorder", "batch_overlap"])
def test_comm_reordering_puts_the_other_halfs_matmuls_between_an_all_reduce_and_its_wait(mode):
    """All-reduces in issue order: attention's of halves 0 and 1, then the MLP's of halves 0 and 1.
    - none: Inductor waits each at once (the flag `reorder_for_compute_comm_overlap` alone runs no pass).
    - reorder (parallel.tp_comm_reorder): the first half's are issued before some of the second half's matmuls
      and waited after them. The second half's attention all-reduce is still waited at once: both halves'
      RMSNorms, which share their weight, are fused into one kernel that needs it.
    - batch_overlap (tp_batch_overlap under compile): the halves' kernels are kept apart, so the second half's
      attention all-reduce runs beside the first half's MLP matmuls too. Only the last all-reduce has nothing
      after it in the block."""
    calls = run_distributed(_compiled_block_order, 2, mode)[0]
    issued = [i for i, call in enumerate(calls) if call == "all_reduce_"]
    in_flight = [calls[i + 1 : calls.index("wait_tensor", i)].count("mm") > 0 for i in issued]
    expected = {
        "none": [False] * 4,
        "reorder": [True, False, True, False],
        "batch_overlap": [True, True, True, False],
    }
    assert in_flight == expected[mode], calls
