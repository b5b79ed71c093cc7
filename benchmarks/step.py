"""Whole training steps on one GPU: treadle's trainer vs Hugging Face transformers' LlamaForCausalLM.

    python benchmarks/step.py --recipe pretrain/llama3_1b --steps 50 --out benchmarks/results/step.jsonl

Under torchrun (any number of processes) it times one parallel layout instead (no peer), optionally profiling how much of the
communication kernel time is not hidden behind compute, and appends a record to `--summary`;
`--combine SUMMARY --baseline NAME` then writes the layouts' result lines against one of them:

    torchrun --nproc_per_node=2 benchmarks/step.py --name fsdp2 --summary s.jsonl --profile parallel.dp_shard=2
    torchrun --nproc_per_node=2 benchmarks/step.py --name tp2 --summary s.jsonl --profile parallel.tp=2
    python benchmarks/step.py --combine s.jsonl --baseline fsdp2 --out benchmarks/results/step_parallel.jsonl

Both sides train the same Llama shape on the same token batches (micro-batch × seq from treadle's loader,
with the same gradient accumulation: `--global-batch` sequences per step), with AdamW, the recipe's LR
schedule and global-norm clipping, in bf16 compute:
treadle with FSDP2 mixed precision (fp32 master weights, bf16 compute, fp32 gradient reduce) and its recipe's
compile setting; transformers with fp32 weights under `torch.autocast(bfloat16)`, SDPA attention and fused
AdamW — the usual way to train it in plain PyTorch. Time is wall-clock over `--steps` steps after
`--warmup` steps (compilation, allocator growth), with the GPU synchronised at both ends.

FLOPs per token come from treadle's model (`flops_per_token`: 6·N plus causal attention) and are used for
both sides, so TFLOP/s and MFU are comparable. One JSON line per (case, metric, peer), as DESIGN.md gives.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import gc
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from _results import emit, read_lines, triton_version

from treadle.models import get_model_spec
from treadle.optim.builder import build_scheduler
from treadle.train.build import build_trainer, process_group, select_device, world_size_from_env
from treadle.train.config import TrainConfig, load_config, validate
from treadle.train.metrics import peak_flops


def _timed(step_fn, steps: int, warmup: int) -> tuple[float, list[float]]:
    losses = [step_fn() for _ in range(warmup)]
    torch.cuda.synchronize()
    start = time.perf_counter()
    losses += [step_fn() for _ in range(steps)]
    torch.cuda.synchronize()
    return time.perf_counter() - start, losses


def run_treadle(cfg: TrainConfig, steps: int, warmup: int) -> dict:
    device = select_device("cuda")
    dims = validate(cfg, world_size=1)
    with process_group(device, "auto"):
        trainer = build_trainer(cfg, dims, device)
        torch.cuda.reset_peak_memory_stats()
        batches = [trainer.train_loader.next_step() for _ in range(4)]
        trainer.train_loader.load_state_dict({"consumed_samples": 0})
        seconds, losses = _timed(lambda: trainer.train_step().loss, steps, warmup)
        peak = torch.cuda.max_memory_allocated() / 2**30
    return {"seconds": seconds, "losses": losses, "peak_gib": peak, "batches": batches}


def _profile(trainer, steps: int, trace: Path | None = None) -> dict:
    """From the torch profiler's CUDA kernel timeline of this rank over `steps` steps, per step in ms:
    communication kernel time, the part of it not overlapped by any compute kernel, the time any kernel runs
    (`gpu_busy_ms_per_step`; against the step's wall time, what the host leaves the GPU idle), and the 12
    kernels with the most time. With `trace`, rank 0 also writes the profiled steps' Chrome trace there."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            trainer.train_step()
        torch.cuda.synchronize()
    if trace is not None and dist.get_rank() == 0:
        prof.export_chrome_trace(str(trace))
    comm, compute = [], []
    per_kernel: dict[str, float] = {}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        interval = (event.time_range.start, event.time_range.end)
        name = event.name.lower()
        is_comm = "nccl" in name or "symm" in name or "cross_device" in name or "multimem" in name
        (comm if is_comm else compute).append(interval)
        per_kernel[event.name[:80]] = per_kernel.get(event.name[:80], 0.0) + interval[1] - interval[0]
    total_comm = sum(end - start for start, end in _union(comm))
    hidden = sum(end - start for start, end in _intersect(_union(comm), _union(compute)))
    busy = sum(end - start for start, end in _union(comm + compute))
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:12]
    return {
        "comm_ms_per_step": total_comm / steps / 1e3,
        "exposed_comm_ms_per_step": (total_comm - hidden) / steps / 1e3,
        "gpu_busy_ms_per_step": busy / steps / 1e3,
        "top_kernels_ms_per_step": {k: v / steps / 1e3 for k, v in top},
    }


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def _intersect(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < end:
            out.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def run_layout(args: argparse.Namespace, cfg: TrainConfig) -> None:
    """Under torchrun: time one parallel layout, profile its communication, append a record (rank 0)."""
    device = select_device("cuda")
    dims = validate(cfg, world_size_from_env())
    with process_group(device, "auto"):
        trainer = build_trainer(cfg, dims, device)
        torch.cuda.reset_peak_memory_stats()
        seconds, losses = _timed(lambda: trainer.train_step().loss, args.steps, args.warmup)
        profiled = _profile(trainer, 3, args.trace) if args.profile else {}
        peak_gib = torch.cuda.max_memory_allocated() / 2**30
        if dist.get_rank() != 0:
            return
        flops_per_token = get_model_spec(cfg.model.name).flops_per_token(cfg.model, cfg.data.seq_len)
        tokens_per_s = args.steps * cfg.trainer.global_batch_size * cfg.data.seq_len / seconds
        per_device = tokens_per_s / dims.world_size
        peak = peak_flops(device)
        record = {
            "name": args.name,
            "seq_len": cfg.data.seq_len,
            "world_size": dims.world_size,
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_device": per_device,
            "mfu": per_device * flops_per_token / peak if peak else None,
            "comm_ms_per_step": profiled.get("comm_ms_per_step"),
            "exposed_comm_ms_per_step": profiled.get("exposed_comm_ms_per_step"),
            "gpu_busy_ms_per_step": profiled.get("gpu_busy_ms_per_step"),
            "step_ms": seconds / args.steps * 1e3,
            "peak_memory_gib": peak_gib,
            "last_loss": losses[-1],
            "device": torch.cuda.get_device_name(),
            "inductor": args.inductor,
            "top_kernels_ms_per_step": profiled.get("top_kernels_ms_per_step"),
        }
        print(f"# {json.dumps(record)}", flush=True)
        if args.summary:
            with open(args.summary, "a") as f:
                f.write(json.dumps(record) + "\n")


def combine(summary: Path, baseline: str, case: str, out: Path | None) -> None:
    """Turn layout records into DESIGN.md result lines, each layout against `baseline`; plus the longest
    sequence that fitted per `fit:<group>:...` record group."""
    records = read_lines(summary)
    by_name = {r["name"]: r for r in records}
    base = by_name[baseline]
    common = {
        "torch": torch.__version__,
        "triton": triton_version(),
        "date": datetime.date.today().isoformat(),
    }
    lines = []
    metrics = (
        ("tokens_per_s", True),
        ("mfu", True),
        ("exposed_comm_ms_per_step", False),
        ("gpu_busy_ms_per_step", False),
        ("peak_memory_gib", False),
    )
    for record in records:
        if record["name"] == baseline or record["name"].startswith("fit:"):
            continue
        for metric, higher in metrics:
            value, peer_value = record.get(metric), base.get(metric)
            lines.append(
                {
                    "bench": "step",
                    "case": f"{case}_{record['name']}",
                    "metric": metric,
                    "value": value,
                    "peer": baseline,
                    "peer_value": peer_value,
                    "ratio": value / peer_value if value is not None and peer_value else None,
                    "higher_is_better": higher,
                    "device": record["device"],
                    "world_size": record["world_size"],
                    **common,
                }
            )
    longest: dict[str, int] = {}
    for record in records:
        if record["name"].startswith("fit:"):
            group = record["name"].split(":")[1]
            longest[group] = max(longest.get(group, 0), record["seq_len"])
    if len(longest) == 2:
        (group, value), (peer, peer_value) = sorted(longest.items(), key=lambda kv: -kv[1])
        lines.append(
            {
                "bench": "step",
                "case": f"{case}_longest_sequence",
                "metric": "longest_seq_len",
                "value": value,
                "peer": peer,
                "peer_value": peer_value,
                "ratio": value / peer_value,
                "higher_is_better": True,
                "layout": group,
                "device": records[0]["device"],
                **common,
            }
        )
    emit(lines, out, append=True)


def summarize(
    results: dict[str, dict], steps: int, tokens_per_step: int, flops_per_token: float, peak: float | None
) -> dict[str, dict]:
    """Per run: tokens/s, TFLOP/s, MFU, peak memory and first/last loss over the timed steps; printed as it goes."""
    summary = {}
    for name, r in results.items():
        tps = steps * tokens_per_step / r["seconds"]
        summary[name] = {
            "tokens_per_s": tps,
            "tflops_per_device": tps * flops_per_token / 1e12,
            "mfu": tps * flops_per_token / peak if peak else None,
            "peak_memory_gib": r["peak_gib"],
            "first_loss": r["losses"][0],
            "last_loss": r["losses"][-1],
        }
        print(f"# {name}: {json.dumps(summary[name])}", flush=True)
    return summary


def hf_step(forward, batches: list, optimizer, params: list, clip: float, scheduler=None):
    """One optimizer step of a transformers model per call, over the next group of micro-batches: bf16 autocast,
    loss averaged over the micro-batches, global-norm clipping, then the optimizer (and schedule) step."""
    state = {"i": 0}

    def step() -> float:
        micro_batches = batches[state["i"] % len(batches)]
        state["i"] += 1
        total = 0.0
        for batch in micro_batches:
            tokens = batch.tokens.cuda(non_blocking=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = forward(input_ids=tokens, labels=tokens).loss / len(micro_batches)
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return float(total)

    return step


def hf_llama_config(m):
    """transformers' `LlamaConfig` of a treadle model config (the config.json `launch/export.py` writes), with
    SDPA attention."""
    from transformers import LlamaConfig

    from treadle.models.hf import hf_config_from_model

    return LlamaConfig(
        **hf_config_from_model(m, "LlamaForCausalLM", torch.float32), attn_implementation="sdpa"
    )


def time_peer(step, steps: int, warmup: int) -> dict:
    """`_timed` of a peer's step function, with the GPU's peak memory over those steps."""
    torch.cuda.reset_peak_memory_stats()
    seconds, losses = _timed(step, steps, warmup)
    return {"seconds": seconds, "losses": losses, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def run_hf(cfg: TrainConfig, batches: list, steps: int, warmup: int, compile_model: bool) -> dict:
    from transformers import LlamaForCausalLM

    hf_cfg = hf_llama_config(cfg.model)
    model = LlamaForCausalLM(hf_cfg).cuda()
    model.gradient_checkpointing_disable()
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=cfg.optim.lr,
        betas=tuple(cfg.optim.betas),
        eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay,
        fused=True,
    )
    scheduler = build_scheduler(optimizer, cfg.optim.schedule, cfg.trainer.max_steps)
    forward = torch.compile(model) if compile_model else model
    step = hf_step(forward, batches, optimizer, list(model.parameters()), cfg.optim.clip_grad_norm, scheduler)
    return time_peer(step, steps, warmup)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", default="pretrain/llama3_1b")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--global-batch", type=int, default=None, help="sequences per step (default: micro)")
    parser.add_argument("--peers", default="hf,hf_compile", help="comma list of hf, hf_compile, or empty")
    parser.add_argument(
        "--vs",
        action="append",
        default=[],
        help="a treadle peer: the same run with these extra overrides (space-separated), e.g. --vs kernels=torch",
    )
    parser.add_argument("--out", type=Path, default=None, help="append JSON lines here as well as stdout")
    parser.add_argument("--name", default="layout", help="under torchrun: the record's name")
    parser.add_argument("--summary", type=Path, default=None, help="under torchrun: append the record here")
    parser.add_argument(
        "--profile", action="store_true", help="under torchrun: measure exposed communication"
    )
    parser.add_argument("--trace", type=Path, default=None, help="with --profile: rank 0's Chrome trace here")
    parser.add_argument("--combine", type=Path, default=None, help="turn a --summary file into result lines")
    parser.add_argument("--baseline", default=None, help="with --combine: the record the others compare to")
    parser.add_argument("--case", default="llama3_1b", help="with --combine: case name prefix")
    parser.add_argument(
        "--inductor",
        action="append",
        default=[],
        help="an Inductor setting for this run, KEY=PYTHON_LITERAL, e.g. reorder_for_compute_comm_overlap=True",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. trainer.micro_batch_size=4")
    args = parser.parse_args()
    for setting in args.inductor:
        import torch._inductor.config as inductor_config

        key, _, value = setting.partition("=")
        if not hasattr(inductor_config, key):
            raise SystemExit(f"--inductor {setting}: torch._inductor.config has no setting {key!r}")
        setattr(inductor_config, key, ast.literal_eval(value))
    if args.combine:
        combine(args.combine, args.baseline, args.case, args.out)
        return

    run_dir = tempfile.mkdtemp(prefix="treadle_bench_")
    base = [
        f"+config={args.recipe}",
        f"run.dir={run_dir}",
        f"trainer.global_batch_size={args.global_batch or '${trainer.micro_batch_size}'}",
        "logging.wandb.mode=disabled",
        "logging.progress_bar=false",
        "checkpoint.every=0",
        "checkpoint.save_final=false",
        "checkpoint.resume=none",
        *args.overrides,
    ]
    cfg = load_config(base)
    if "LOCAL_RANK" in os.environ:  # under torchrun, one process per GPU included
        run_layout(args, cfg)
        return
    tokens_per_step = cfg.trainer.global_batch_size * cfg.data.seq_len
    flops_per_token = get_model_spec(cfg.model.name).flops_per_token(cfg.model, cfg.data.seq_len)
    peak = peak_flops(torch.device("cuda"))

    results = {"treadle": run_treadle(cfg, args.steps, args.warmup)}
    for extra in args.vs:
        gc.collect()
        torch.cuda.empty_cache()
        results[f"treadle[{extra}]"] = run_treadle(load_config(base + extra.split()), args.steps, args.warmup)
    for peer in filter(None, args.peers.split(",")):
        gc.collect()  # the previous run's model and optimizer are unreachable once its function returned
        torch.cuda.empty_cache()
        results[peer] = run_hf(
            cfg, results["treadle"]["batches"], args.steps, args.warmup, peer == "hf_compile"
        )

    summary = summarize(results, args.steps, tokens_per_step, flops_per_token, peak)

    case = (
        f"{args.recipe.split('/')[-1]}_S{cfg.data.seq_len}_mb{cfg.trainer.micro_batch_size}"
        f"_gb{cfg.trainer.global_batch_size}_bf16"
        f"{'_compile' if cfg.parallel.compile else ''}_{cfg.memory.activation_checkpoint}AC"
    )
    common = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton_version(),
        "date": datetime.date.today().isoformat(),
        "steps": args.steps,
        "world_size": 1,
    }
    lines = []
    mine = summary["treadle"]
    for metric, higher in (
        ("tokens_per_s", True),
        ("tflops_per_device", True),
        ("mfu", True),
        ("peak_memory_gib", False),
    ):
        for peer in [p for p in summary if p != "treadle"] or [None]:
            peer_value = summary[peer][metric] if peer else None
            lines.append(
                {
                    "bench": "step",
                    "case": case,
                    "metric": metric,
                    "value": mine[metric],
                    "peer": (peer if peer.startswith("treadle") else f"transformers_{peer}")
                    if peer
                    else None,
                    "peer_value": peer_value,
                    "ratio": mine[metric] / peer_value if peer_value else None,
                    "higher_is_better": higher,
                    **common,
                }
            )
    # Appended: one results file collects several invocations (cases, global batches) of one run.
    emit(lines, args.out, append=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
