"""Offload on one GPU: the largest Llama that trains with ZeRO-3 + NVMe offload (DeepSpeed ZeRO-Infinity, to
the machine's local disk) vs native FSDP2 + CPU offload (and its DeepSpeed peer, ZeRO-3 with CPU offload) vs no
offload; tokens/s, TFLOP/s, peak GPU and host memory per model size.

    python benchmarks/offload.py --nvme /tmp/treadle_nvme --out benchmarks/results/offload.jsonl

Every (mode, size) case runs in its own process (an OOM, host or device, ends only that case; peaks start
from zero), sizes grow until a mode fails or runs out of its time. An NVMe case whose swap files cannot fit
on the disk is not started (the log says so). Each optimizer step takes `--accum` micro-batches. Data are
random tokens: the step's cost does not depend on them. The reference points are from the Fuyou paper (Liao
et al., 2024, Fig. 8): a 13B model on one RTX 4090 with SSD offload at 156 TFLOP/s for Fuyou and 45 for
ZeRO-Infinity; every NVMe case is reported against both, its case naming the size it reached.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import emit, triton_version, write_lines  # noqa: E402

MODES = ("none", "zero3_cpu", "fsdp_cpu_offload", "zero3_nvme")
# Bytes per parameter each mode keeps on the NVMe swap directory: ZeRO-Infinity swaps the fp32 master
# weights and both Adam moments (12 B) and the bf16 parameters (2 B).
NVME_BYTES_PER_PARAM = 14
# Llama-shaped sizes (vocab 128256, GQA 8 kv heads), smallest first.
SIZES = {
    "1b": dict(dim=2048, num_layers=16, num_heads=32, num_kv_heads=8, ffn_dim=8192),
    "3b": dict(dim=3072, num_layers=28, num_heads=24, num_kv_heads=8, ffn_dim=8192),
    "8b": dict(dim=4096, num_layers=32, num_heads=32, num_kv_heads=8, ffn_dim=14336),
    "13b": dict(dim=5120, num_layers=40, num_heads=40, num_kv_heads=8, ffn_dim=13824),
    "20b": dict(dim=6144, num_layers=44, num_heads=48, num_kv_heads=8, ffn_dim=16384),
}
PAPER = {"fuyou_13b_rtx4090_ssd": 156.0, "zero_infinity_13b_rtx4090_ssd": 45.0}


def _model_cfg(size: str, seq_len: int):
    from treadle.models.llama import ModelConfig

    return ModelConfig(vocab_size=128256, max_seq_len=seq_len, rope_theta=500000.0, **SIZES[size])


def _param_count(size: str) -> int:
    """Parameters of a size, counted on the meta device (nothing allocated)."""
    from treadle.models.llama import Llama

    with torch.device("meta"):
        return sum(p.numel() for p in Llama(_model_cfg(size, 2048)).parameters())


def run_case(mode: str, size: str, args: argparse.Namespace) -> dict:
    """One case in this process (world of one); returns its measurements."""
    from treadle.memory.checkpointing import MemoryConfig
    from treadle.models.llama import SPEC, Llama, flops_per_token
    from treadle.models.ops import KernelsConfig
    from treadle.optim.config import OptimConfig
    from treadle.parallel.config import ParallelConfig
    from treadle.parallel.deepspeed_config import DeepSpeedConfig
    from treadle.parallel.dims import ParallelDims
    from treadle.parallel.engine import EngineSetup
    from treadle.parallel.fp8 import Float8Config
    from treadle.parallel.registry import build_engine
    from treadle.train.build import process_group
    from treadle.train.data import Batch

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    cfg = _model_cfg(size, args.seq_len)
    with process_group(device, "nccl"):
        dims = ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=1, world_size=1)
        dims.build_mesh("cuda")
        # Full activation checkpointing in every mode: the comparison is about parameter/optimizer memory.
        memory = MemoryConfig(activation_checkpoint="full")
        with torch.device("meta"):
            model = Llama(cfg)
        optim = OptimConfig(lr=1e-4)
        if mode == "fsdp_cpu_offload":
            # FSDP2's CPUOffloadPolicy: parameters, gradients and the AdamW step on the host.
            memory.param_offload = "cpu"
        parallel = ParallelConfig(
            engine="deepspeed" if mode.startswith("zero3") else "native", param_dtype="bf16"
        )
        if mode == "zero3_cpu":
            # ZeRO-Offload's placement under ZeRO-3: parameters and optimizer states in host memory, the
            # step in DeepSpeedCPUAdam (SIMD C++); the DeepSpeed peer of FSDP2's CPU offload.
            parallel.deepspeed = DeepSpeedConfig(zero_stage=3, offload_param="cpu", offload_optimizer="cpu")
        if mode == "zero3_nvme":
            block_numel = sum(p.numel() for p in model.layers["0"].parameters())
            parallel.deepspeed = DeepSpeedConfig(
                zero_stage=3,
                offload_param="nvme",
                offload_optimizer="nvme",
                nvme_path=args.nvme,
                param_buffer_size=max(100_000_000, cfg.vocab_size * cfg.dim),
                # Every swapped-in parameter holds one whole buffer while it is live, and ZeRO-3 keeps the
                # current block's and the prefetched block's parameters live: two blocks' worth, plus the
                # embedding and output (5, DeepSpeed's default, fails with "Not enough buffers" at 3B).
                param_buffer_count=2 * sum(1 for _ in model.layers["0"].parameters()) + 4,
                # ...which holds only if ZeRO-3 keeps no more than those live: its default allowance
                # (1e9 elements) would keep the whole of a 1B model live and run out of swap buffers
                # ("Not enough buffers 0 for swapping 1", seen on the H100 at 1B).
                overrides={
                    "zero_optimization": {
                        "stage3_max_live_parameters": 2 * block_numel,
                        "stage3_prefetch_bucket_size": block_numel,
                        "stage3_max_reuse_distance": block_numel,
                    }
                },
            )
        setup = EngineSetup(
            dims=dims, parallel=parallel, memory=memory, kernels=KernelsConfig(), fp8=Float8Config(),
            device=device, seed=0, micro_batch_size=args.micro_batch_size, grad_accum=args.accum,
        )  # fmt: skip
        engine = build_engine(setup)
        (model,) = engine.prepare(SPEC, cfg, model, optim)
        tokens = torch.randint(0, cfg.vocab_size, (args.micro_batch_size, args.seq_len + 1), device=device)
        times = []
        for i in range(args.steps):
            torch.cuda.synchronize()
            start = time.perf_counter()
            # One optimizer step over `accum` micro-batches: offload pays its transfers and host-side
            # update once per step, so the tokens per step decide how much of it the GEMMs can hide.
            batch = Batch(tokens[:, :-1], tokens[:, 1:], None, None)
            count = torch.tensor(float(args.micro_batch_size * args.seq_len * args.accum), device=device)
            engine.forward_backward([batch] * args.accum, 1 / count)
            engine.step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            print(f"# {mode} {size} step {i}: {times[-1]:.1f}s", file=sys.stderr, flush=True)
            if i == 0:
                torch.cuda.reset_peak_memory_stats(device)
        step_s = sum(times[1:]) / len(times[1:])  # the first step builds kernels, buffers, swap files
        tokens_per_s = args.accum * args.micro_batch_size * args.seq_len / step_s
        return {
            "params_b": sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()) / 1e9,
            "step_s": step_s,
            "tokens_per_s": tokens_per_s,
            "tflops": tokens_per_s * flops_per_token(cfg, args.seq_len) / 1e12,
            "peak_gpu_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "peak_host_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        }


def _rows(mode: str, size: str, result: dict, refs: dict[str, dict], device: str) -> list[dict]:
    """Metric rows of one case, each against the no-offload run of the same size where that one fit, and
    FSDP2's CPU offload against DeepSpeed's (ZeRO-3, CPU) at the same size."""
    base = {
        "bench": "offload",
        "device": device,
        "torch": torch.__version__,
        "triton": triton_version(),
        "date": date.today().isoformat(),
        "params_b": round(result["params_b"], 2),
    }
    case = f"{mode}_llama{size}"
    rows = []
    for metric, higher in (("tflops", True), ("tokens_per_s", True), ("peak_gpu_gib", False),
                           ("peak_host_gib", False)):  # fmt: skip
        peers = [p for p in ("none", "zero3_cpu") if p != mode and f"{p}_{size}" in refs]
        if mode != "fsdp_cpu_offload":
            peers = [p for p in peers if p == "none"]
        for peer in peers or [None]:
            peer_value = refs[f"{peer}_{size}"][metric] if peer else None
            rows.append(
                base
                | {
                    "case": case,
                    "metric": metric,
                    "value": round(result[metric], 3),
                    "peer": f"{peer}_llama{size}" if peer else None,
                    "peer_value": round(peer_value, 3) if peer else None,
                    "ratio": result[metric] / peer_value if peer_value else None,
                    "higher_is_better": higher,
                }  # fmt: skip
            )
    if mode == "zero3_nvme":
        # The paper's points are a 13B model on an RTX 4090; the row's case names the size we reached.
        for peer, value in PAPER.items():
            rows.append(
                base
                | {
                    "case": case,
                    "metric": "tflops",
                    "value": round(result["tflops"], 3),
                    "peer": peer,
                    "peer_value": value,
                    "ratio": result["tflops"] / value,
                    "higher_is_better": True,
                }  # fmt: skip
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", nargs=2, metavar=("MODE", "SIZE"), help="run one case (internal)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--nvme", default="/tmp/treadle_nvme", help="swap directory on the local disk")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--accum", type=int, default=4, help="micro-batches per optimizer step")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps; the first is not timed")
    parser.add_argument("--case-timeout-s", type=float, default=150.0)
    parser.add_argument("--budget-s", type=float, default=540.0, help="stop starting cases after this")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--refs", type=Path, default=None, help="result lines of an earlier run on this machine: its cases "
        "serve as peers and are kept in --out, so a later run can redo only some modes"
    )  # fmt: skip
    args = parser.parse_args()
    if args.case:
        print("RESULT " + json.dumps(run_case(*args.case, args)), flush=True)
        return
    Path(args.nvme).mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name(0)
    start, rows, largest = time.time(), [], {}
    refs: dict[str, dict] = {}
    if args.refs is not None:
        for line in args.refs.read_text().splitlines():
            row = json.loads(line)
            if row["case"].split("_llama")[0] in args.modes:
                continue  # measured again in this run
            rows.append(row)
            if row["peer"] is None or row["peer"].startswith("none"):
                refs.setdefault(row["case"].replace("_llama", "_"), {})[row["metric"]] = row["value"]
    free_disk = shutil.disk_usage(args.nvme).free
    print(
        f"# host memory {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, "
        f"{os.cpu_count()} CPUs; {args.nvme}: {free_disk / 2**30:.0f} GiB free",
        flush=True,
    )
    for mode in args.modes:
        for size in args.sizes:
            left = args.budget_s - (time.time() - start)
            if left < 30:
                print(f"# budget spent: {mode} {size} not run", flush=True)
                break
            if mode == "zero3_nvme":
                need = NVME_BYTES_PER_PARAM * _param_count(size)
                if need > 0.95 * free_disk:
                    print(
                        f"# {mode} {size}: not run, its swap files need {need / 2**30:.0f} GiB and "
                        f"{args.nvme} has {free_disk / 2**30:.0f} GiB free",
                        flush=True,
                    )
                    break
            cmd = [sys.executable, __file__, "--case", mode, size, "--nvme", args.nvme, "--seq-len",
                   str(args.seq_len), "--micro-batch-size", str(args.micro_batch_size), "--steps", str(args.steps),
                   "--accum", str(args.accum)]  # fmt: skip
            try:
                proc = subprocess.run(
                    cmd, capture_output=True, text=True, timeout=min(args.case_timeout_s, left)
                )
                out = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
                failure = None if out else (proc.stderr.strip().splitlines() or ["no output"])[-1]
            except subprocess.TimeoutExpired:
                out, failure = [], f"timeout after {min(args.case_timeout_s, left):.0f}s"
            if failure:
                print(f"# {mode} {size}: failed ({failure[:300]})", flush=True)
                break  # larger sizes fail too
            result = json.loads(out[0][len("RESULT ") :])
            refs[f"{mode}_{size}"] = result
            largest[mode] = (size, result["params_b"])
            rows += emit(_rows(mode, size, result, refs, device))
    for mode, (size, params) in largest.items():
        print(f"# largest that trains with {mode}: llama {size} ({params:.2f}B params)", flush=True)
    if args.out is not None:
        write_lines(rows, args.out)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
