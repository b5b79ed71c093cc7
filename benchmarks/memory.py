"""Peak memory and throughput of the low-precision and memory settings on one GPU, and BF16-vs-FP8 loss curves.

    python benchmarks/memory.py --models 1b --out benchmarks/results/memory.jsonl            # cases, 1B
    python benchmarks/memory.py --models 3b --curve-steps 0 --out benchmarks/results/memory.jsonl --append
    python benchmarks/memory.py --plot benchmarks/results/memory.jsonl --png benchmarks/results/memory_loss.png
    python benchmarks/memory.py --models 1b,3b --cases bf16,fp8,fp8_torchao --curve-steps 0   # the FP8 backends
    python benchmarks/memory.py --models 3b --micro-batch 8 --accum 2 --cases full_ac,fp8_full_ac --repeats 2 \
        --curve-steps 0                                                         # the 3B FP8 speed figure
    python benchmarks/memory.py --models 1b --cases bf16,fp8_all,fp8_all_fused_loss,bf16_fused_loss --repeats 2 \
        --curve-steps 0                                                         # the memory figure

Cases (`--cases`, comma list; each is one configuration of the same model, data and batch):
    bf16                    FSDP2 bf16 compute, fp32 master weights, compiled blocks (the recipe's baseline)
    bf16_rerun              bf16 once more (a curve case: the baseline's own run-to-run spread)
    fp8 / fp8_rowwise       + FP8 linears in every block (parallel/fp8.py), tensorwise / rowwise scaling
    full_ac / selective_ac  bf16 + activation checkpointing
    fp8_full_ac             FP8 linears + full activation checkpointing
    fp8_selective_ac        FP8 linears + selective activation checkpointing (matmul outputs kept)
    full_ac_eager / fp8_full_ac_eager
                            the same two with eager blocks (is a memory difference the compiler's?)
    bf16_eager / fp8_eager  uncompiled blocks: the baseline of the cases that need eager blocks
    fp8_torchao / fp8_torchao_rowwise / fp8_torchao_eager
                            the same FP8 linears from torchao (`fp8.backend=torchao`, torchao==0.18.0):
                            torchao's tensorwise / rowwise recipe, FP8 all-gather on (tensorwise)
    fp8_optim / fp8_act     bf16 + FP8 AdamW states (COAT §4) / + FP8 activation compression (COAT §5)
    fp8_all                 FP8 linears + FP8 AdamW states + FP8 activation compression, compiled blocks
                            (attention runs eagerly between two compiled graphs per block, memory/activations.py)
    fp8_all_eager           the same with eager blocks (before 2026-11-23 the only form: lines named `fp8_all`
                            with peer `bf16_eager` are this case)
    bf16_fused_loss         bf16 + the chunked linear-cross-entropy loss kernel (no [tokens, vocab] logits)
    fp8_all_fused_loss      fp8_all + the chunked loss; second peer bf16_fused_loss, so the loss kernel's share
                            of the saving is on its own line
    offload                 bf16 + activation offload to pinned host memory
    param_offload           bf16 + FSDP2 CPUOffloadPolicy (optimizer on the CPU: slow by design)
Each compiled case is compared with `bf16`, each eager case with `bf16_eager`: one JSON line per (case,
metric) in DESIGN.md's format, for tokens/s and peak memory (`torch.cuda.max_memory_allocated` over the
timed steps, after the first steps have created the optimizer states). A treadle FP8 case is also compared
with its torchao twin when both ran (`fp8` with `fp8_torchao`, `fp8_rowwise` with `fp8_torchao_rowwise`,
`fp8_eager` with `fp8_torchao_eager`): a second line whose peer is the torchao case. torchao's conversion
patches Inductor's Triton min/max codegen for the rest of the process (a numerically identical form, see
torchao/float8/_inductor_patch.py), so torchao cases run after the others in the default lists; a torchao
case is skipped with a note where torchao is not installed.

Loss curves: `--curve-steps` steps (300 by default) of a ~100M-parameter Llama (dim 1024, 8 layers) on the
embedded stdlib corpus, BF16 and each case of `--curve-cases` (default `fp8`: FP8 linears, tensorwise; `fp8_all`
is the whole FP8 set) from the same initialisation and batches; the per-step losses go into the JSONL
(`losses`) and `--plot` turns them into a PNG where matplotlib is installed. `--curve-seeds 0,1,2` repeats
every curve per seed (initialisation and batch order) and compares the means over seeds; the case `bf16_rerun`
measures how far two runs of the baseline itself land apart:
    python benchmarks/memory.py --models "" --curve-cases bf16_rerun,fp8,fp8_all --curve-seeds 0,1,2 \
        --curve-log curves.jsonl
    python benchmarks/memory.py --curve-combine a.jsonl,b.jsonl --out benchmarks/results/memory.jsonl --append
The second form summarises the curve logs of several invocations (more seeds than one call's time allows).

Needs no Hydra: configs are built from the dataclasses directly. Model shapes mirror configs/model/*.yaml.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from _results import emit, read_lines, triton_version, write_lines

from treadle.memory.checkpointing import MemoryConfig
from treadle.models import get_model_spec
from treadle.models.llama import ModelConfig, RopeScalingConfig
from treadle.models.ops import KernelsConfig
from treadle.optim.builder import build_scheduler
from treadle.optim.config import OptimConfig, ScheduleConfig
from treadle.parallel.config import ParallelConfig
from treadle.parallel.dims import ParallelDims
from treadle.parallel.engine import EngineSetup, NativeEngine
from treadle.parallel.fp8 import Float8Config
from treadle.parallel.fp8_torchao import TORCHAO_MISSING, torchao_available
from treadle.train.data import DataConfig, StepLoader, build_datasets, prepare_data

_LLAMA32_ROPE = RopeScalingConfig(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0)
MODELS = {
    "1b": ModelConfig(
        dim=2048, num_layers=16, num_heads=32, num_kv_heads=8, vocab_size=128256, ffn_dim=8192,
        rope_scaling=_LLAMA32_ROPE, max_seq_len=131072, tie_embeddings=True,
    ),
    "3b": ModelConfig(
        dim=3072, num_layers=28, num_heads=24, num_kv_heads=8, vocab_size=128256, ffn_dim=8192,
        rope_scaling=_LLAMA32_ROPE, max_seq_len=131072, tie_embeddings=True,
    ),
    "tiny": ModelConfig(
        dim=128, num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=258, ffn_dim=384, max_seq_len=512,
    ),
    "curve": ModelConfig(
        dim=1024, num_layers=8, num_heads=16, num_kv_heads=8, vocab_size=258, ffn_dim=4096,
        rope_theta=10000.0, max_seq_len=4096, tie_embeddings=True,
    ),
}  # fmt: skip
# model -> (micro-batch, sequence length) that fit every default case on one 80 GB H100
BATCH = {"1b": (4, 2048), "3b": (1, 2048), "tiny": (2, 128), "curve": (8, 1024)}
DEFAULT_CASES = {
    "1b": "bf16,fp8,fp8_rowwise,full_ac,bf16_eager,fp8_all,fp8_torchao,fp8_torchao_rowwise",
    "3b": "bf16,fp8,bf16_eager,fp8_all,fp8_torchao",
    "tiny": "bf16_eager,fp8_eager,fp8_all,fp8_torchao_eager",
}
# `--device cpu` (a smoke test of this script: FP8 emulated, no compile, no peak memory) sets it to cpu.
DEVICE = torch.device("cuda", 0)


@dataclass
class Case:
    fp8: str | None = None  # FP8 linear recipe
    fp8_backend: str = "treadle"  # fp8.backend: treadle | torchao
    optim: str = "adamw"
    memory: dict = field(default_factory=dict)
    compile: bool = True
    twin: str | None = (
        None  # a second peer (the same case with the other FP8 backend, or without one feature)
    )
    peer: str | None = None  # the BF16 case it is measured against (default: bf16, or bf16_eager if eager)
    kernels: dict = field(default_factory=dict)  # KernelsConfig overrides (e.g. the chunked linear-CE loss)


CASES = {
    "bf16": Case(),
    # bf16 again, as a curve case: its ratio to bf16 is the run-to-run spread of the baseline itself (the GPU's
    # non-deterministic reductions), the floor under every other case's ratio.
    "bf16_rerun": Case(),
    "fp8": Case(fp8="tensorwise", twin="fp8_torchao"),
    "fp8_rowwise": Case(fp8="rowwise", twin="fp8_torchao_rowwise"),
    "full_ac": Case(memory={"activation_checkpoint": "full"}),
    "selective_ac": Case(memory={"activation_checkpoint": "selective"}),
    "fp8_full_ac": Case(
        fp8="tensorwise", memory={"activation_checkpoint": "full"}, peer="full_ac", twin="fp8_torchao_full_ac"
    ),
    "fp8_selective_ac": Case(
        fp8="tensorwise", memory={"activation_checkpoint": "selective"}, peer="selective_ac"
    ),
    "fp8_torchao_full_ac": Case(
        fp8="tensorwise", fp8_backend="torchao", memory={"activation_checkpoint": "full"}, peer="full_ac"
    ),
    "full_ac_eager": Case(memory={"activation_checkpoint": "full"}, compile=False, peer="full_ac"),
    "fp8_full_ac_eager": Case(
        fp8="tensorwise", memory={"activation_checkpoint": "full"}, compile=False, peer="full_ac_eager"
    ),
    "bf16_eager": Case(compile=False),
    "fp8_eager": Case(fp8="tensorwise", compile=False, twin="fp8_torchao_eager"),
    "fp8_optim": Case(optim="adamw_fp8"),
    "fp8_act": Case(memory={"activation_compression": "fp8"}),
    "fp8_all": Case(fp8="tensorwise", optim="adamw_fp8", memory={"activation_compression": "fp8"}),
    "fp8_all_eager": Case(
        fp8="tensorwise", optim="adamw_fp8", memory={"activation_compression": "fp8"}, compile=False
    ),
    "bf16_fused_loss": Case(kernels={"loss": "triton"}),
    # Every memory feature at once: the FP8 trio plus the chunked linear + cross-entropy loss kernel, which
    # never materialises the [tokens, vocab] logits (6 GiB in fp32 + bf16 at 1B, mb 4 × 2048).
    "fp8_all_fused_loss": Case(
        fp8="tensorwise", optim="adamw_fp8", memory={"activation_compression": "fp8"},
        kernels={"loss": "triton"}, twin="bf16_fused_loss",
    ),
    "offload": Case(memory={"activation_offload": True}),
    "param_offload": Case(memory={"param_offload": "cpu"}),
    "fp8_torchao": Case(fp8="tensorwise", fp8_backend="torchao"),
    "fp8_torchao_rowwise": Case(fp8="rowwise", fp8_backend="torchao"),
    "fp8_torchao_eager": Case(fp8="tensorwise", fp8_backend="torchao", compile=False),
}  # fmt: skip


def _build(
    model_cfg: ModelConfig,
    case: Case,
    loader_cfg: tuple[int, int],
    total_steps: int,
    lr: float,
    seed: int,
    accum: int = 1,
):
    """(model, engine, scheduler, loader) for one case, without the Trainer (no Hydra)."""
    micro_batch, seq_len = loader_cfg
    dims = ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=1, world_size=1)
    dims.build_mesh(DEVICE.type)
    data_cfg = DataConfig(source="stdlib", seq_len=seq_len, document_mask=False)
    prepare_data(data_cfg)
    train_data, _ = build_datasets(data_cfg, vocab_size=model_cfg.vocab_size)
    loader = StepLoader(
        train_data, global_batch_size=micro_batch * accum, micro_batch_size=micro_batch, dp_rank=0, dp_size=1,
        seed=seed, shuffle=True,
    )  # fmt: skip
    kernels = KernelsConfig(**case.kernels)
    spec = get_model_spec(model_cfg.name)
    with torch.device("meta"):
        model = spec.build(model_cfg, kernels)
    setup = EngineSetup(
        dims=dims,
        parallel=ParallelConfig(compile=case.compile and DEVICE.type == "cuda"),
        memory=MemoryConfig(**case.memory),
        kernels=kernels,
        fp8=Float8Config(
            enabled=case.fp8 is not None, recipe=case.fp8 or "tensorwise", backend=case.fp8_backend
        ),
        device=DEVICE,
        seed=seed,
        grad_accum=accum,
    )
    engine = NativeEngine(setup)
    schedule = ScheduleConfig(name="cosine", warmup_steps=max(1, total_steps // 10))
    (model,) = engine.prepare(spec, model_cfg, model, OptimConfig(name=case.optim, lr=lr, schedule=schedule))
    return model, engine, build_scheduler(engine.optimizer, schedule, total_steps), loader


def _step(model, engine, scheduler, loader, phases: dict | None = None) -> torch.Tensor:
    """One optimizer step over the loader's micro-batches; with `phases`, the peak allocated GiB of each phase
    (forward and backward of the last micro-batch, optimizer step) and what stays allocated between steps, each
    peak measured from the phase's start."""
    micro_batches = loader.next_step()

    def mark(name: str | None) -> None:
        if phases is None:
            return
        _sync()
        if name is not None:
            phases[name] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()

    if phases is not None:
        phases["resting"] = torch.cuda.memory_allocated() / 2**30
    # The engine's forward_backward, one phase at a time: forward + loss, then backward; under parameter offload
    # only the last micro-batch reduces gradients (NativeEngine.forward_backward says why).
    defer_sync = engine.memory_cfg.param_offload == "cpu" and len(micro_batches) > 1
    model.train()
    for i, batch in enumerate(micro_batches):
        batch = batch.to(DEVICE, non_blocking=True)
        if defer_sync:
            model.set_requires_gradient_sync(i == len(micro_batches) - 1)
        mark(None)
        loss_sum, count = engine.forward_loss(batch)
        loss = loss_sum / count / len(micro_batches)
        mark("forward")
        loss.backward()
        mark("backward")
    engine.step()
    mark("optimizer_step")
    scheduler.step()
    return loss.detach()


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def run_case(
    model_cfg: ModelConfig, case: Case, batch: tuple[int, int], steps: int, warmup: int, accum: int = 1
) -> dict:
    model, engine, scheduler, loader = _build(
        model_cfg, case, batch, steps + warmup, lr=3e-4, seed=0, accum=accum
    )
    losses = [_step(model, engine, scheduler, loader) for _ in range(warmup)]
    _sync()
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    losses += [_step(model, engine, scheduler, loader) for _ in range(steps)]
    _sync()
    seconds = time.perf_counter() - start
    cuda = DEVICE.type == "cuda"
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    # One more step, untimed, split into phases: where the peak is.
    phases: dict[str, float] | None = {} if cuda else None
    _step(model, engine, scheduler, loader, phases)
    return {
        "tokens_per_s": steps * accum * batch[0] * batch[1] / seconds,
        "peak_memory_gib": peak,
        "last_loss": float(losses[-1]),
        "phase_peaks_gib": phases,
    }


def run_curve(model_name: str, case: Case, steps: int, lr: float, seed: int) -> list[float]:
    model, engine, scheduler, loader = _build(
        MODELS[model_name], case, BATCH[model_name], steps, lr=lr, seed=seed
    )
    losses = [_step(model, engine, scheduler, loader) for _ in range(steps)]
    return [float(x) for x in torch.stack(losses).cpu()]


def _free() -> None:
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
    torch._dynamo.reset()


def _median_run(case_runs: list[dict | None]) -> dict | None:
    """The run with the median tokens/s (the lower middle one of an even count), with every run's tokens/s;
    None if any run ran out of memory."""
    if any(r is None for r in case_runs):
        return None
    ordered = sorted(case_runs, key=lambda r: r["tokens_per_s"])
    return {**ordered[(len(ordered) - 1) // 2], "runs_tokens_per_s": [r["tokens_per_s"] for r in case_runs]}


def _detail(metric: str, result: dict, base: dict | None) -> dict:
    """What a result line carries besides the figure: every run's tokens/s, or the per-phase peaks."""
    key = "runs_tokens_per_s" if metric == "tokens_per_s" else "phase_peaks_gib"
    return {key: result[key], f"peer_{key}": base[key] if base else None}


def _common(steps: int) -> dict:
    return {
        "device": torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": triton_version(),
        "date": datetime.date.today().isoformat(),
        "steps": steps,
        "world_size": 1,
    }


def bench(args: argparse.Namespace) -> list[dict]:
    lines = []
    for name in filter(None, args.models.split(",")):
        micro_batch, seq_len = BATCH[name]
        batch = (args.micro_batch or micro_batch, args.seq_len or seq_len)
        accum_tag = f"x{args.accum}" if args.accum > 1 else ""
        runs: dict[str, list[dict | None]] = {}
        # Repeats go round the whole case list (A B C A B C): a drift of the GPU's speed over the minutes of
        # a run then touches every case alike instead of whichever case ran during it.
        for _ in range(args.repeats):
            for case_name in (args.cases or DEFAULT_CASES[name]).split(","):
                if CASES[case_name].fp8_backend == "torchao" and not torchao_available():
                    print(f"# {name} {case_name}: skipped, {TORCHAO_MISSING}", flush=True)
                    continue
                _free()
                try:
                    result = run_case(
                        MODELS[name], CASES[case_name], batch, args.steps, args.warmup, args.accum
                    )
                except torch.OutOfMemoryError:
                    result = None
                runs.setdefault(case_name, []).append(result)
                print(f"# {name} {case_name}: {json.dumps(result)}", flush=True)
        results = {case_name: _median_run(case_runs) for case_name, case_runs in runs.items()}
        for case_name, result in results.items():
            peer = CASES[case_name].peer or ("bf16" if CASES[case_name].compile else "bf16_eager")
            if peer == case_name or result is None:
                continue
            twin = CASES[case_name].twin
            for peer_name in [peer] + ([twin] if results.get(twin) else []):
                base = results.get(peer_name)
                for metric, higher in (("tokens_per_s", True), ("peak_memory_gib", False)):
                    peer_value = base[metric] if base else None
                    lines.append(
                        {
                            "bench": "memory",
                            "case": f"llama3_{name}_S{batch[1]}_mb{batch[0]}{accum_tag}_{case_name}",
                            "metric": metric,
                            "value": result[metric],
                            "peer": peer_name if base else None,
                            "peer_value": peer_value,
                            "ratio": result[metric] / peer_value if peer_value else None,
                            "higher_is_better": higher,
                            **_common(args.steps),
                            **_detail(metric, result, base),
                        }
                    )
        lines += [
            {"bench": "memory", "case": f"llama3_{name}_S{batch[1]}_mb{batch[0]}{accum_tag}_{c}", "metric": "oom",
             "value": True, **_common(args.steps)}
            for c, r in results.items() if r is None
        ]  # fmt: skip
    if args.curve_steps:
        lines += curve_lines(args)
    return lines


def curve_lines(args: argparse.Namespace) -> list[dict]:
    """Loss curves of bf16 and each `--curve-cases` case, for every seed of `--curve-seeds` (a seed sets the
    initialisation and the batch order, the same for every case of that seed); each curve is appended to
    `--curve-log` as it finishes. Lines as `summarise_curves` makes them."""
    records = []
    for seed in (int(s) for s in args.curve_seeds.split(",")):
        for case_name in ["bf16", *args.curve_cases.split(",")]:
            _free()
            start = time.perf_counter()
            losses = run_curve(args.curve_model, CASES[case_name], args.curve_steps, args.curve_lr, seed)
            record = {"model": args.curve_model, "seed": seed, "case": case_name, "lr": args.curve_lr,
                      "seconds": round(time.perf_counter() - start, 1), **_common(args.curve_steps)}  # fmt: skip
            print(f"# curve {json.dumps(record)}", flush=True)
            records.append({**record, "losses": losses})
            if args.curve_log:
                write_lines(records[-1:], args.curve_log, append=True)
    return summarise_curves(records)


def summarise_curves(records: list[dict]) -> list[dict]:
    """One line per case other than bf16: the mean over seeds of the last tenth's mean loss, against bf16's over
    the same seeds; each seed's ratio with their mean and standard error (two bf16 runs of one seed land about
    1% apart, so one seed's ratio says little: see `bf16_rerun`); the first seed's curves (`losses`,
    `peer_losses`) and every seed's (`seed_losses`, `peer_seed_losses`)."""
    by_case: dict[str, dict[int, dict]] = {}
    for r in records:
        by_case.setdefault(r["case"], {})[r["seed"]] = r
    base = by_case.get("bf16", {})
    lines = []
    for case_name, runs in by_case.items():
        seeds = sorted(set(runs) & set(base))
        if case_name == "bf16" or not seeds:
            continue
        first = runs[seeds[0]]
        steps = len(first["losses"])
        tail = max(1, steps // 10)
        final = [sum(runs[s]["losses"][-tail:]) / tail for s in seeds]
        peer = [sum(base[s]["losses"][-tail:]) / tail for s in seeds]
        ratios = [a / b for a, b in zip(final, peer, strict=True)]
        standard_error = statistics.stdev(ratios) / len(ratios) ** 0.5 if len(ratios) > 1 else None
        label = "fp8_tensorwise" if case_name == "fp8" else case_name
        lines.append(
            {
                "bench": "memory",
                "case": f"loss_curve_{first['model']}_{steps}steps_{label}",
                "metric": f"mean_loss_last_{tail}_steps" + (f"_over_{len(seeds)}_seeds" if len(seeds) > 1 else ""),
                "value": sum(final) / len(seeds),
                "peer": "bf16",
                "peer_value": sum(peer) / len(seeds),
                "ratio": sum(final) / sum(peer),
                "higher_is_better": False,
                "seeds": seeds,
                "seed_ratios": ratios,
                "seed_ratios_mean": statistics.mean(ratios),
                "seed_ratios_standard_error": standard_error,
                "lr": first.get("lr"),
                "losses": first["losses"],
                "peer_losses": base[seeds[0]]["losses"],
                **({"seed_losses": [runs[s]["losses"] for s in seeds],
                    "peer_seed_losses": [base[s]["losses"] for s in seeds]} if len(seeds) > 1 else {}),
                **{k: first[k] for k in ("device", "torch", "triton", "date", "world_size")},
                "steps": steps,
            }
        )  # fmt: skip
    return lines


def _smooth(values: list[float], window: int = 10) -> list[float]:
    """Trailing moving average (per-batch losses of this corpus swing by ±0.3 nats from step to step)."""
    return [
        sum(values[max(0, i - window + 1) : i + 1]) / (i - max(0, i - window + 1) + 1)
        for i in range(len(values))
    ]


def _seed_mean(curves: list[list[float]]) -> list[float]:
    return [sum(step) / len(step) for step in zip(*curves, strict=True)]


def _curve_label(line: dict) -> str:
    """The case part of a curve line's name (`loss_curve_<model>_<steps>steps_<case>`)."""
    return line["case"].split("steps_", 1)[1]


def plot(jsonl: Path, png: Path) -> None:
    """Loss curves of the JSONL's curve lines. Where some lines ran several seeds, only those: left, each case's
    curve averaged over its seeds (10-step moving average); right, each seed's final-loss ratio to bf16."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [line for line in read_lines(jsonl) if "losses" in line]
    if not curves:
        raise SystemExit(f"{jsonl} holds no loss curve (a line with 'losses')")
    seeded = [line for line in curves if "seed_losses" in line]
    title = f"{curves[0]['case'].split('steps_', 1)[0]}steps, on {curves[0]['device']}"
    if not seeded:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(curves[0]["peer_losses"], label=curves[0]["peer"], linewidth=1)
        for line in curves:
            ax.plot(line["losses"], label=_curve_label(line), linewidth=1)
    else:
        fig, (ax, spread) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [2, 1]})
        widest = max(seeded, key=lambda line: len(line["seeds"]))
        ax.plot(
            _smooth(_seed_mean(widest["peer_seed_losses"])),
            label=f"bf16 ({len(widest['seeds'])} seeds)",
            linewidth=1,
        )
        for i, line in enumerate(seeded):
            ax.plot(
                _smooth(_seed_mean(line["seed_losses"])),
                label=f"{_curve_label(line)} ({len(line['seeds'])} seeds)",
                linewidth=1,
            )
            spread.scatter(
                [i] * len(line["seed_ratios"]), line["seed_ratios"], s=12, alpha=0.6, color=f"C{i + 1}"
            )
            se = line["seed_ratios_standard_error"] or 0.0
            spread.errorbar([i + 0.15], [line["seed_ratios_mean"]], yerr=[se], fmt="k_", capsize=3)
        spread.axhline(1.0, color="grey", linewidth=0.8)
        spread.set_xticks(range(len(seeded)), [_curve_label(line) for line in seeded], rotation=20)
        spread.set_ylabel("final loss / bf16's (each seed; mean ± s.e.)")
        spread.grid(alpha=0.3)
        ax.set_ylim(top=min(4.0, ax.get_ylim()[1]))
        title = f"{title}; mean over seeds"
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="1b", help="comma list of 1b, 3b, tiny (empty: only the curves)")
    parser.add_argument("--cases", default=None, help=f"comma list of {', '.join(CASES)}")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per case")
    parser.add_argument(
        "--warmup", type=int, default=4, help="untimed steps first (compile, optimizer states)"
    )
    parser.add_argument(
        "--micro-batch", type=int, default=None, help="sequences per step (default per model)"
    )
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument(
        "--accum", type=int, default=1, help="micro-batches per optimizer step (gradient accumulation)"
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs per case, interleaved; tokens/s is the median run's"
    )
    parser.add_argument("--curve-steps", type=int, default=300, help="0 skips the loss curves")
    parser.add_argument("--curve-lr", type=float, default=1e-3)
    parser.add_argument(
        "--curve-cases", default="fp8", help="comma list of cases whose loss curves run against bf16's"
    )
    parser.add_argument(
        "--curve-seeds", default="0", help="comma list of seeds; every case runs once per seed, bf16 too"
    )
    parser.add_argument(
        "--curve-log", type=Path, default=None, help="append each curve here as it finishes (JSON lines)"
    )
    parser.add_argument(
        "--curve-combine",
        default=None,
        help="comma list of --curve-log files (of several invocations): print their lines instead of running",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the JSON lines here as well as stdout")
    parser.add_argument("--append", action="store_true", help="append to --out instead of replacing it")
    parser.add_argument("--plot", type=Path, default=None, help="make a PNG of the loss curves in this JSONL")
    parser.add_argument("--png", type=Path, default=Path("benchmarks/results/memory_loss.png"))
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test of the script")
    parser.add_argument("--curve-model", default="curve", help="model of the loss curves (curve, tiny)")
    args = parser.parse_args()
    if args.plot:
        plot(args.plot, args.png)
        return
    if args.curve_combine:
        emit(summarise_curves(read_lines(*args.curve_combine.split(","))), args.out, append=args.append)
        return
    global DEVICE
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    if args.device == "cpu":
        DEVICE = torch.device("cpu")
        dist.init_process_group("gloo")
    else:
        torch.cuda.set_device(0)
        dist.init_process_group("nccl", device_id=DEVICE)
    try:
        emit(bench(args), args.out, append=args.append)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
