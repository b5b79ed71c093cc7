"""Causal attention on one GPU: treadle's Triton FlashAttention-2 vs SDPA's flash and cuDNN backends.

    python benchmarks/bench_attention.py [--seqs 2048 4096 8192 16384] [--tokens 32768] [--heads 16] \
        [--out benchmarks/results/attention.jsonl]

Every implementation gets the same bf16 tensors in the model's layout: q, k, v as [B, S, H, D] (SDPA sees
them through `.transpose(1, 2)`, as `treadle.models.ops.attention_sdpa` passes them), D = 128, causal, with
B = tokens // S so each case holds the same number of tokens. Times are medians of
`triton.testing.do_bench` (CUDA events, L2 flushed between runs); fwd+bwd times one forward plus one
backward from a fixed dO. Triton's autotuning runs in the warm-up call, outside the timed region.

FLOPs follow FA2's accounting for every implementation: forward 4·B·H·S²·D halved by the causal mask,
forward+backward 3.5× that (backward = 2.5× forward: five S×S×D matmuls against two). One JSON line per
(case, metric, peer) in DESIGN.md's format.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.testing
from _results import emit
from torch.nn.attention import SDPBackend, sdpa_kernel

from treadle.kernels.attention import attention_op

HEAD_DIM = 128
DEFAULT_SEQS = (2048, 4096, 8192, 16384)

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _sdpa(backend: SDPBackend) -> AttentionFn:
    def run(q_BSHD: torch.Tensor, k_BSHD: torch.Tensor, v_BSHD: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel(backend):
            out_BHSD = F.scaled_dot_product_attention(
                q_BSHD.transpose(1, 2), k_BSHD.transpose(1, 2), v_BSHD.transpose(1, 2), is_causal=True
            )
        return out_BHSD.transpose(1, 2)

    return run


def _treadle(q_BSHD: torch.Tensor, k_BSHD: torch.Tensor, v_BSHD: torch.Tensor) -> torch.Tensor:
    return attention_op(q_BSHD, k_BSHD, v_BSHD, causal=True)


IMPLEMENTATIONS: dict[str, AttentionFn] = {
    "treadle_triton": _treadle,
    "sdpa_flash": _sdpa(SDPBackend.FLASH_ATTENTION),
    "sdpa_cudnn": _sdpa(SDPBackend.CUDNN_ATTENTION),
}


def causal_fwd_flops(batch: int, num_heads: int, seq_len: int, head_dim: int) -> float:
    """QK^T and PV, 2·S²·D each per head, halved by the causal mask."""
    return 2 * 2 * batch * num_heads * seq_len**2 * head_dim / 2


def _time_ms(fn: AttentionFn, tensors: tuple[torch.Tensor, ...], with_backward: bool) -> float:
    q, k, v, dout = tensors
    if with_backward:

        def step() -> None:
            fn(q, k, v).backward(dout)

        step()  # autotuning and compilation
        return triton.testing.do_bench(step, grad_to_none=[q, k, v], return_mode="median")

    def forward() -> None:
        with torch.no_grad():
            fn(q, k, v)

    forward()
    return triton.testing.do_bench(forward, return_mode="median")


def measure(seq_len: int, batch: int, num_heads: int) -> dict[str, dict[str, float]]:
    """TFLOP/s per implementation and metric; an implementation that cannot run this shape is left out."""
    shape = (batch, seq_len, num_heads, HEAD_DIM)
    gen = torch.Generator(device="cuda").manual_seed(0)
    tensors = tuple(
        torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_(i < 3)
        for i in range(4)
    )
    fwd_flops = causal_fwd_flops(batch, num_heads, seq_len, HEAD_DIM)
    results: dict[str, dict[str, float]] = {}
    for name, fn in IMPLEMENTATIONS.items():
        try:
            fwd_ms = _time_ms(fn, tensors, with_backward=False)
            fwd_bwd_ms = _time_ms(fn, tensors, with_backward=True)
        except RuntimeError as err:
            print(f"[bench_attention] {name} skipped at S={seq_len}: {err}", file=sys.stderr)
            continue
        results[name] = {
            "fwd_tflops": fwd_flops / fwd_ms / 1e9,
            "fwd_bwd_tflops": 3.5 * fwd_flops / fwd_bwd_ms / 1e9,
        }
    return results


def cases(args: argparse.Namespace) -> Iterator[dict]:
    """One dict per (case, metric, peer); `args` may lack any of this script's options (defaults apply)."""
    seqs = getattr(args, "seqs", None) or DEFAULT_SEQS
    tokens = getattr(args, "tokens", None) or 32768
    num_heads = getattr(args, "heads", None) or 16
    common = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.date.today().isoformat(),
    }
    for seq_len in seqs:
        batch = max(1, tokens // seq_len)
        results = measure(seq_len, batch, num_heads)
        ours = results.get("treadle_triton")
        if ours is None:
            continue
        for metric in ("fwd_tflops", "fwd_bwd_tflops"):
            for peer in ("sdpa_flash", "sdpa_cudnn"):
                if peer not in results:
                    continue
                yield {
                    "bench": "attention",
                    "case": f"causal_D{HEAD_DIM}_S{seq_len}_bf16",
                    "metric": metric,
                    "value": ours[metric],
                    "peer": peer,
                    "peer_value": results[peer][metric],
                    "ratio": ours[metric] / results[peer][metric],
                    "higher_is_better": True,
                    **common,
                    "batch": batch,
                    "heads": num_heads,
                }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=list(DEFAULT_SEQS))
    parser.add_argument("--tokens", type=int, default=32768, help="B·S per case")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--out", type=Path, default=None, help="also write the lines to this .jsonl")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_attention needs a CUDA device")
    emit(cases(args), args.out)


if __name__ == "__main__":
    main()
