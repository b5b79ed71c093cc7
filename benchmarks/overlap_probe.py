"""Can communication run beside a GEMM on this machine? Under torchrun on 2+ GPUs: times a TP-sized GEMM alone,
a collective alone, and both issued together (the collective first, on its own stream, so the GEMM does not
depend on it), and reports how much of the shorter of the two the pair hides:

    hidden = (t_gemm + t_comm - t_both) / min(t_gemm, t_comm)      1: fully concurrent, 0: serialised

Collectives: NCCL all-reduce and all-gather. `--carveout N` also runs every pair with the GEMMs told to leave N
SMs free (`torch._C._set_sm_carveout_experimental`). Default shapes:
the 1B recipe at TP=2, micro-batch 4, seq 4096 (16384 tokens, hidden 2048, a rank's gate+up columns 8192).

    torchrun --nproc_per_node=2 benchmarks/overlap_probe.py --carveout 0,16,32 --out overlap_probe.jsonl
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from _results import emit, triton_version


def _time_ms(fn: Callable[[], None], iters: int) -> float:
    """Median wall time of `fn` in ms, all ranks in step (a barrier before each timed call)."""
    times = []
    for i in range(iters + 3):
        dist.barrier()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--columns", type=int, default=8192, help="the GEMM's output columns on one rank")
    parser.add_argument("--carveout", default="0", help="comma list of SMs the GEMM leaves free")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--note", default="")
    args = parser.parse_args()

    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    world = dist.get_world_size()
    x = torch.randn(args.tokens, args.hidden, device=device, dtype=torch.bfloat16)
    w = torch.randn(args.hidden, args.columns, device=device, dtype=torch.bfloat16)
    reduced = torch.randn(args.tokens, args.hidden, device=device, dtype=torch.bfloat16)
    shard = reduced[: args.tokens // world].contiguous()
    gathered = torch.empty_like(reduced)

    def gemm() -> None:
        torch.mm(x, w)

    comms: dict[str, Callable[[], dist.Work]] = {
        f"nccl_all_reduce_{reduced.numel() * 2 >> 20}MiB": lambda: dist.all_reduce(reduced, async_op=True),
        f"nccl_all_gather_{gathered.numel() * 2 >> 20}MiB": lambda: dist.all_gather_into_tensor(
            gathered, shard, async_op=True
        ),
    }

    def together(comm: Callable[[], dist.Work]) -> Callable[[], None]:
        def run() -> None:
            work = comm()  # NCCL's own stream: the GEMM below does not wait for it
            gemm()
            work.wait()

        return run

    def alone(comm: Callable[[], dist.Work]) -> Callable[[], None]:
        return lambda: comm().wait()

    common = {
        "bench": "overlap_probe",
        "device": torch.cuda.get_device_name(),
        "world_size": world,
        "torch": torch.__version__,
        "triton": triton_version(),
        "date": datetime.date.today().isoformat(),
        "note": args.note
        or f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}"
        + "".join(f", {k}={v}" for k, v in os.environ.items() if k.startswith("NCCL_") and "MAX" in k),
    }
    shape = f"gemm_{args.tokens}x{args.hidden}x{args.columns}"
    for carveout in [int(c) for c in args.carveout.split(",")]:
        if carveout:
            torch._C._set_sm_carveout_experimental(carveout)
        t_gemm = _time_ms(gemm, args.iters)
        for name, comm in comms.items():
            t_comm = _time_ms(alone(comm), args.iters)
            t_both = _time_ms(together(comm), args.iters)
            hidden = (t_gemm + t_comm - t_both) / min(t_gemm, t_comm)
            case = f"{name}+{shape}" + (f"_carveout{carveout}" if carveout else "")
            pair = [
                {**common, "case": case, "metric": "both_ms", "value": t_both, "peer": "serial",
                 "peer_value": t_gemm + t_comm, "ratio": t_both / (t_gemm + t_comm), "higher_is_better": False,
                 "gemm_ms": t_gemm, "comm_ms": t_comm},
                {**common, "case": case, "metric": "hidden_fraction", "value": hidden, "peer": None,
                 "peer_value": None, "ratio": None, "higher_is_better": True},
            ]  # fmt: skip
            if dist.get_rank() == 0:
                emit(pair, args.out, append=True)
        if carveout:
            torch._C._set_sm_carveout_experimental(None)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
