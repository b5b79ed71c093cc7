"""Memory-bound kernels on one GPU: treadle's Triton RMSNorm, RoPE and SwiGLU vs eager torch,
`torch.compile` of the same reference, and Liger-Kernel where it has the op.

    python benchmarks/bench_pointwise.py [--ops rmsnorm rmsnorm_residual rope swiglu] \
        [--out benchmarks/results/pointwise.jsonl]

Shapes are Llama-8B-like, bf16, B·S = 16384 tokens: RMSNorm over E = 8192 (the anchor shape: compile and
Liger reach ~2.9 TB/s there on an H100), SwiGLU at the MLP width F = 14336, RoPE with H = 32 query and
K = 8 key heads of D = 128 (B = 4, S = 4096) and bf16 tables, as `Llama.forward` passes them.

GB/s counts the bytes an implementation must move at minimum, the same for every peer: each input read once
and each output written once (RMSNorm: x, y, weight forward; x, dy, dx, weight, dweight backward; RoPE: q, k,
their outputs and the half-tables it needs; SwiGLU: gate, up, out; then dout, dgate, dup). Saved statistics
(rstd), partial sums and the reads of an implementation that re-reads are its own cost, not counted.
Times are medians of `triton.testing.do_bench` (CUDA events, L2 flushed between runs) with autograd on, as
in training; fwd+bwd times one forward plus `torch.autograd.grad` from fixed output gradients into the
inputs. `autograd.grad` rather than `.backward()`: accumulating into `.grad` of leaf inputs adds a copy
wherever one gradient tensor serves two leaves (x and residual get the same gradient), which inside a model,
where the inputs are activations, never happens. Compilation and Triton's first launch happen in a warm-up
call; `torch.compile` runs with `dynamic=False`, its specialised best case.

Host overhead: do_bench brackets each step with CUDA events, so where a step's kernels take less time than
Python takes to issue them, the GPU waits and the figure measures the host. RoPE at this shape is such a
case: on an H100 treadle's forward and backward kernels take 0.119 ms each, yet a fwd+bwd step measures
~0.53 ms (autograd plus two Triton launches of ~36 arguments); Liger's leaner launch path shows ~0.37 ms.
In a training step the host runs ahead of the GPU and only kernel time counts.

Liger-Kernel (`liger_kernel.ops`) is imported only if installed; otherwise its lines are skipped with a note
on stderr. Its RMSNorm and RoPE run with their defaults (in-place backward / in-place rotation).
"""

from __future__ import annotations

import argparse
import datetime
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
import triton.testing
from _results import emit

from treadle.kernels.rmsnorm import rmsnorm_op, rmsnorm_residual, rmsnorm_residual_reference
from treadle.kernels.rope import rope_op
from treadle.kernels.swiglu import swiglu_op
from treadle.models.ops import rmsnorm_torch, rope_torch, swiglu_torch

TOKENS = 16384
MODEL_DIM = 8192
MLP_DIM = 14336
BATCH, SEQ_LEN, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 4, 4096, 32, 8, 128
EPS = 1e-5
BF16 = 2  # bytes
OPS = ("rmsnorm", "rmsnorm_residual", "rope", "swiglu")


@dataclass
class Case:
    """One op at one shape: the inputs (leaves needing grad first), output gradients, and the minimal bytes."""

    name: str
    inputs: tuple[torch.Tensor, ...]
    grad_leaves: list[torch.Tensor]
    output_grads: tuple[torch.Tensor, ...]
    fwd_bytes: int
    bwd_bytes: int
    impls: dict[str, Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]]


def _randn(*shape: int, grad: bool = False) -> torch.Tensor:
    return torch.randn(shape, device="cuda", dtype=torch.bfloat16).requires_grad_(grad)


def _liger(module: str, attribute: str) -> Callable | None:
    try:
        return getattr(__import__(f"liger_kernel.ops.{module}", fromlist=[attribute]), attribute)
    except Exception as err:  # not installed, or an incompatible build: the peer is skipped, not the bench
        print(f"[bench_pointwise] liger-kernel peer skipped ({type(err).__name__}: {err})", file=sys.stderr)
        return None


def _with_peers(ours: Callable, reference: Callable, liger: Callable | None) -> dict[str, Callable]:
    compiled = torch.compile(reference, dynamic=False)
    impls = {"treadle_triton": ours, "torch_eager": reference, "torch_compile": compiled}
    if liger is not None:
        impls["liger_kernel"] = liger
    return impls


def rmsnorm_case() -> Case:
    x, w = _randn(TOKENS, MODEL_DIM, grad=True), _randn(MODEL_DIM, grad=True)
    act, vec = TOKENS * MODEL_DIM * BF16, MODEL_DIM * BF16
    liger = _liger("rms_norm", "LigerRMSNormFunction")
    return Case(
        name=f"rmsnorm_N{TOKENS}_E{MODEL_DIM}_bf16",
        inputs=(x, w, EPS),
        grad_leaves=[x, w],
        output_grads=(_randn(TOKENS, MODEL_DIM),),
        fwd_bytes=2 * act + vec,
        bwd_bytes=3 * act + 2 * vec,
        impls=_with_peers(rmsnorm_op, rmsnorm_torch, liger and (lambda x, w, eps: liger.apply(x, w, eps))),
    )


def rmsnorm_residual_case() -> Case:
    x, r, w = (
        _randn(TOKENS, MODEL_DIM, grad=True),
        _randn(TOKENS, MODEL_DIM, grad=True),
        _randn(MODEL_DIM, grad=True),
    )
    act, vec = TOKENS * MODEL_DIM * BF16, MODEL_DIM * BF16
    liger = _liger("fused_add_rms_norm", "LigerFusedAddRMSNormFunction")
    return Case(
        name=f"rmsnorm_residual_N{TOKENS}_E{MODEL_DIM}_bf16",
        inputs=(x, r, w, EPS),
        grad_leaves=[x, r, w],
        output_grads=(_randn(TOKENS, MODEL_DIM), _randn(TOKENS, MODEL_DIM)),
        # x, residual in; normed, new residual out. Backward: new residual, d normed, d new residual in;
        # one gradient out (it is the gradient of both x and residual).
        fwd_bytes=4 * act + vec,
        bwd_bytes=4 * act + 2 * vec,
        impls=_with_peers(
            rmsnorm_residual,
            rmsnorm_residual_reference,
            liger and (lambda x, r, w, eps: liger.apply(x, r, w, eps)),
        ),
    )


def rope_case() -> Case:
    q = _randn(BATCH, SEQ_LEN, NUM_HEADS, HEAD_DIM, grad=True)
    k = _randn(BATCH, SEQ_LEN, NUM_KV_HEADS, HEAD_DIM, grad=True)
    angles = torch.rand(BATCH, SEQ_LEN, HEAD_DIM // 2, device="cuda") * 1000
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()
    qk_bytes = (q.numel() + k.numel()) * BF16
    half_tables = 2 * BATCH * SEQ_LEN * (HEAD_DIM // 2) * BF16
    liger = _liger("rope", "LigerRopeFunction")

    def liger_rope(q_BSHD, k_BSKD, cos_BSD, sin_BSD):
        # Liger takes [B, H, S, D]; the transposed views have the model's [B, S, H, D] memory underneath.
        q_BHSD, k_BKSD = liger.apply(q_BSHD.transpose(1, 2), k_BSKD.transpose(1, 2), cos_BSD, sin_BSD)
        return q_BHSD.transpose(1, 2), k_BKSD.transpose(1, 2)

    return Case(
        name=f"rope_B{BATCH}_S{SEQ_LEN}_H{NUM_HEADS}_K{NUM_KV_HEADS}_D{HEAD_DIM}_bf16",
        inputs=(q, k, cos, sin),
        grad_leaves=[q, k],
        output_grads=(torch.randn_like(q), torch.randn_like(k)),
        fwd_bytes=2 * qk_bytes + half_tables,
        bwd_bytes=2 * qk_bytes + half_tables,
        impls=_with_peers(rope_op, rope_torch, liger and liger_rope),
    )


def swiglu_case() -> Case:
    gate, up = _randn(TOKENS, MLP_DIM, grad=True), _randn(TOKENS, MLP_DIM, grad=True)
    act = TOKENS * MLP_DIM * BF16
    liger = _liger("swiglu", "LigerSiLUMulFunction")
    return Case(
        name=f"swiglu_N{TOKENS}_F{MLP_DIM}_bf16",
        inputs=(gate, up),
        grad_leaves=[gate, up],
        output_grads=(_randn(TOKENS, MLP_DIM),),
        fwd_bytes=3 * act,
        bwd_bytes=5 * act,
        impls=_with_peers(swiglu_op, swiglu_torch, liger and (lambda g, u: liger.apply(g, u))),
    )


CASES: dict[str, Callable[[], Case]] = {
    "rmsnorm": rmsnorm_case,
    "rmsnorm_residual": rmsnorm_residual_case,
    "rope": rope_case,
    "swiglu": swiglu_case,
}


def _as_tuple(out: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def time_ms(case: Case, fn: Callable, with_backward: bool) -> float:
    def forward() -> None:
        fn(*case.inputs)

    def forward_backward() -> None:
        torch.autograd.grad(_as_tuple(fn(*case.inputs)), case.grad_leaves, case.output_grads)

    step = forward_backward if with_backward else forward
    step()  # compilation, first launch
    return triton.testing.do_bench(step, return_mode="median")


def measure(case: Case) -> dict[str, dict[str, float]]:
    """GB/s per implementation and metric; an implementation that fails here is left out with a note."""
    results: dict[str, dict[str, float]] = {}
    for name, fn in case.impls.items():
        try:
            fwd_ms = time_ms(case, fn, with_backward=False)
            fwd_bwd_ms = time_ms(case, fn, with_backward=True)
        except Exception as err:  # a peer's failure must not hide the other lines
            print(
                f"[bench_pointwise] {name} skipped on {case.name}: {type(err).__name__}: {err}",
                file=sys.stderr,
            )
            continue
        results[name] = {
            "fwd_gbps": case.fwd_bytes / fwd_ms / 1e6,
            "fwd_bwd_gbps": (case.fwd_bytes + case.bwd_bytes) / fwd_bwd_ms / 1e6,
        }
    return results


def cases(args: argparse.Namespace | None = None) -> Iterator[dict]:
    """One dict per (case, metric, peer); `args` may lack any of this script's options (defaults apply)."""
    ops = getattr(args, "ops", None) or OPS
    common = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.date.today().isoformat(),
    }
    for op in ops:
        case = CASES[op]()
        results = measure(case)
        ours = results.get("treadle_triton")
        if ours is None:
            continue
        for metric in ("fwd_gbps", "fwd_bwd_gbps"):
            for peer, peer_results in results.items():
                if peer == "treadle_triton":
                    continue
                yield {
                    "bench": "pointwise",
                    "case": case.name,
                    "metric": metric,
                    "value": ours[metric],
                    "peer": peer,
                    "peer_value": peer_results[metric],
                    "ratio": ours[metric] / peer_results[metric],
                    "higher_is_better": True,
                    **common,
                }
        del case
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--out", type=Path, default=None, help="also write the lines to this .jsonl")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_pointwise needs a CUDA device")
    emit(cases(args), args.out)


if __name__ == "__main__":
    main()
