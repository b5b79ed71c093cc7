"""Fused linear + cross-entropy (`treadle.kernels.linear_cross_entropy`) vs unfused and fused peers, one GPU.

    python benchmarks/bench_loss.py --out benchmarks/results/loss.jsonl

Case: the output layer of Llama-3-8B on one micro-batch — 8192 tokens, vocab 128256, hidden 4096, bf16,
summed loss, forward + backward into both the hidden states and the weight. Peers:

- `torch_eager`: `models.ops.linear_cross_entropy_torch` — bf16 logits, upcast to fp32, `F.cross_entropy`;
- `torch_compile`: the same function under `torch.compile` (Inductor fuses the upcast and the softmax);
- `liger`: Liger-Kernel's `LigerFusedLinearCrossEntropyLoss(reduction="sum")`, if it is installed.

Metrics: `fwd_bwd_ms` (median over `--reps` after `--warmup`, CUDA events, lower is better) and
`peak_memory_gib` (peak allocated during one forward + backward minus what was allocated before it: the
inputs, without gradients; the weight's gradient is counted for every side). `fwd_nograd_ms` times the
evaluation path (`torch.no_grad()`) against the two torch peers. One JSON line per (case, metric, peer), as
DESIGN.md gives; `cases(args)` yields them for `benchmarks/kernels.py`.
"""

import argparse
import datetime
import gc
import json
import statistics
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from _results import emit, triton_version

from treadle.kernels import linear_cross_entropy as lce
from treadle.models.ops import linear_cross_entropy_torch

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
DEFAULTS = {
    "tokens": 8192,
    "vocab": 128256,
    "dim": 4096,
    "reps": 20,
    "warmup": 3,
    "peers": "eager,compile,liger",
}


def _note(message: str) -> None:
    print(f"# {message}", file=sys.stderr, flush=True)


def _inputs(tokens: int, vocab: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(tokens, dim, device="cuda", generator=gen).bfloat16()
    # Init-scale weights (std 0.02, as treadle's init) give logits of std ~1.3, as in early training.
    weight = (torch.randn(vocab, dim, device="cuda", generator=gen) * 0.02).bfloat16()
    labels = torch.randint(0, vocab, (tokens,), device="cuda", generator=gen)
    return hidden.requires_grad_(), weight.requires_grad_(), labels


def _peers(names: list[str]) -> dict[str, LossFn]:
    peers: dict[str, LossFn] = {}
    if "eager" in names:
        peers["torch_eager"] = lambda h, w, y: linear_cross_entropy_torch(h, w, y)[0]
    if "compile" in names:
        compiled = torch.compile(linear_cross_entropy_torch)
        peers["torch_compile"] = lambda h, w, y: compiled(h, w, y)[0]
    if "liger" in names:
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except ImportError as err:
            _note(f"liger peer skipped: liger_kernel is not installed ({err})")
        else:
            liger = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="sum")
            peers["liger"] = lambda h, w, y: liger(w, h, y)
    return peers


def _fwd_bwd(fn: LossFn, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    hidden.grad = weight.grad = None
    loss = fn(hidden, weight, labels)
    loss.backward()
    return loss.detach()


def _time_ms(step: Callable[[], object], reps: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _peak_gib(step: Callable[[], object], hidden: torch.Tensor, weight: torch.Tensor) -> float:
    hidden.grad = weight.grad = None
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**30


def _measure(fn: LossFn, inputs: tuple, reps: int, warmup: int) -> dict[str, float]:
    hidden, weight, labels = inputs

    def step() -> torch.Tensor:
        return _fwd_bwd(fn, hidden, weight, labels)

    def eval_step() -> torch.Tensor:
        with torch.no_grad():
            return fn(hidden, weight, labels)

    result = {"fwd_bwd_ms": _time_ms(step, reps, warmup), "peak_memory_gib": _peak_gib(step, hidden, weight)}
    result["fwd_nograd_ms"] = _time_ms(eval_step, reps, warmup)
    hidden.grad = weight.grad = None
    return result


def _check(peer_fn: LossFn, inputs: tuple) -> str:
    """Loss and gradient agreement of ours with a peer, as a note (bf16 gradients: ~1e-2 relative)."""
    hidden, weight, labels = inputs
    loss = _fwd_bwd(lambda h, w, y: lce.linear_cross_entropy(h, w, y)[0], hidden, weight, labels)
    grads = hidden.grad, weight.grad
    peer_loss = _fwd_bwd(peer_fn, hidden, weight, labels)
    errs = [
        ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
        for a, b in zip(grads, (hidden.grad, weight.grad), strict=True)
    ]
    hidden.grad = weight.grad = None
    rel = abs(loss.item() - peer_loss.item()) / abs(peer_loss.item())
    return f"loss {loss.item():.6g} vs {peer_loss.item():.6g} (rel {rel:.2e}); grad max rel err h {errs[0]:.2e} W {errs[1]:.2e}"


def _sweep(inputs: tuple, reps: int, warmup: int) -> None:
    """Notes on the knobs of `linear_cross_entropy`: chunk size, vocab blocks, column tile."""
    blocks, tile = lce._NUM_VOCAB_BLOCKS, lce._MAX_TILE_V
    try:
        for chunk in (2048, 4096):
            fn = lambda h, w, y, c=chunk: lce.linear_cross_entropy(h, w, y, chunk_size=c)[0]  # noqa: E731
            _note(f"treadle chunk {chunk}: {json.dumps(_measure(fn, inputs, reps, warmup))}")
        fn = lambda h, w, y: lce.linear_cross_entropy(h, w, y)[0]  # noqa: E731
        for lce._NUM_VOCAB_BLOCKS in (4, 16):
            _note(
                f"treadle {lce._NUM_VOCAB_BLOCKS} vocab blocks: {json.dumps(_measure(fn, inputs, reps, warmup))}"
            )
        lce._NUM_VOCAB_BLOCKS = blocks
        for lce._MAX_TILE_V in (2048, 8192):
            _note(f"treadle tile {lce._MAX_TILE_V}: {json.dumps(_measure(fn, inputs, reps, warmup))}")
    finally:
        lce._NUM_VOCAB_BLOCKS, lce._MAX_TILE_V = blocks, tile


def cases(args: argparse.Namespace | None = None) -> Iterator[dict]:
    """One JSON-ready dict per (case, metric, peer); options missing from `args` take `DEFAULTS`."""
    opts = {key: getattr(args, key, None) or default for key, default in DEFAULTS.items()}
    if not torch.cuda.is_available():
        _note("bench_loss needs a CUDA device; nothing measured")
        return
    inputs = _inputs(opts["tokens"], opts["vocab"], opts["dim"])
    peers = _peers(opts["peers"].split(","))
    if "torch_eager" in peers:
        _note(f"check vs torch_eager: {_check(peers['torch_eager'], inputs)}")

    ours = _measure(
        lambda h, w, y: lce.linear_cross_entropy(h, w, y)[0], inputs, opts["reps"], opts["warmup"]
    )
    _note(f"treadle: {json.dumps(ours)}; fp32-output addmm used: {lce._FP32_OUT_ADDMM.get('cuda')}")
    if getattr(args, "sweep", False):
        _sweep(inputs, opts["reps"], opts["warmup"])
    results = {}
    for name, fn in peers.items():
        gc.collect()
        torch.cuda.empty_cache()
        results[name] = _measure(fn, inputs, opts["reps"], opts["warmup"])
        _note(f"{name}: {json.dumps(results[name])}")

    case = f"N{opts['tokens']}_V{opts['vocab']}_E{opts['dim']}_bf16"
    common = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton_version(),
        "date": datetime.date.today().isoformat(),
    }
    for metric in ("fwd_bwd_ms", "peak_memory_gib", "fwd_nograd_ms"):
        for peer, peer_result in results.items():
            if metric == "fwd_nograd_ms" and peer == "liger":
                continue  # Liger's fused loss always computes gradients; it has no evaluation path
            yield {
                "bench": "loss",
                "case": case,
                "metric": metric,
                "value": ours[metric],
                "peer": peer,
                "peer_value": peer_result[metric],
                "ratio": ours[metric] / peer_result[metric],
                "higher_is_better": False,
                **common,
            }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=DEFAULTS["tokens"])
    parser.add_argument("--vocab", type=int, default=DEFAULTS["vocab"])
    parser.add_argument("--dim", type=int, default=DEFAULTS["dim"])
    parser.add_argument("--reps", type=int, default=DEFAULTS["reps"])
    parser.add_argument("--warmup", type=int, default=DEFAULTS["warmup"])
    parser.add_argument("--peers", default=DEFAULTS["peers"], help="comma list of eager, compile, liger")
    parser.add_argument(
        "--sweep", action="store_true", help="also time other chunk sizes, vocab blocks, tiles"
    )
    parser.add_argument("--out", type=Path, default=None, help="write the JSON lines here (replacing it) too")
    args = parser.parse_args()
    emit(cases(args), args.out)


if __name__ == "__main__":
    main()
