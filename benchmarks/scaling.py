"""Scaling of the 8B recipe over GPUs: result lines from `benchmarks/scaling.sh`'s records, and a model of the
GPU counts that were not measured.

    python benchmarks/scaling.py --summary /tmp/treadle_scaling/summary.jsonl --out benchmarks/results/scaling.jsonl

Measured lines (one per layout and N): tokens/s per GPU and MFU against torchtitan's published Llama3-8B
figures on 8×H100 (seq 8192, local batch 1, FSDP: 5762 tokens/s/GPU eager bf16, 6667 compiled, 8532 FP8) —
a different GPU and N, so the ratio places us, it is not a like-for-like race — and scaling efficiency
(tokens/s per GPU at N over FSDP's at the smallest N measured — one GPU where it ran; FP8 over its own).

Modelled lines (`"modelled": true`) for the layouts and N the machine lacks. Weak scaling keeps each GPU's
work fixed, so a step is compute (a measured step minus its exposed communication) plus exposed communication,
which is split into the parts the two-GPU runs measure:
- FSDP: a ring all-gather/reduce-scatter moves (s−1)/s of a GPU's parameter bytes, s the shard count
  (dp_shard × cp), at a bus bandwidth an NVSwitch node keeps about constant with s; under TP a GPU holds 1/tp
  of the parameters. So the exposed FSDP time is the FSDP=2 run's × (1/tp) × [(s−1)/s] / (1/2).
- TP (+SP): per GPU, each block's all-gather/reduce-scatter moves (tp−1)/tp of an activation that holds tp
  sequences at equal tokens per GPU, so bytes ∝ tp−1: TP=4's exposed TP time is 3× TP=2's (its compute
  taken as TP=2's, the same FLOPs per GPU).
- CP=2: the all-to-all (or ring) traffic per GPU depends only on cp and the tokens per GPU: constant.
Each measured layout's exposed time at N=2 minus its FSDP part gives its TP or CP part. These are projections
from one node's two-GPU NVLink measurements; they ignore NCCL's algorithm changes with N, the inter-node
network (N > 8) and stragglers, and they keep each part's measured overlap.
"""

from __future__ import annotations

import argparse
import datetime
import re
from pathlib import Path

import torch
from _results import emit, read_lines, triton_version

# torchtitan, docs/performance.md: Llama 3 8B, 8×H100, seq 8192, local batch 1, FSDP, selective AC.
TORCHTITAN_8xH100 = {"bf16": 5762.0, "bf16_compile": 6667.0, "fp8_compile": 8532.0}


def _parse(name: str) -> tuple[str, int]:
    match = re.fullmatch(r"(.+):N(\d+)", name)
    if not match:
        raise ValueError(f"record name {name!r} is not <layout>:N<gpus> (written by benchmarks/scaling.sh)")
    return match.group(1), int(match.group(2))


def _anchor(layout: str) -> tuple[str, float]:
    key = "fp8_compile" if layout == "fp8" else "bf16_compile"
    return f"torchtitan_llama3_8b_8xH100_{key}", TORCHTITAN_8xH100[key]


def _degrees(layout: str) -> tuple[int, int]:
    """(tp, cp) of a layout name."""
    match = re.match(r"tp(\d+)", layout)
    tp = int(match.group(1)) if match else 1
    return tp, 2 if layout.startswith("cp2") else 1


def _fsdp_share(layout: str, n: int) -> float:
    """This layout's per-GPU FSDP bytes at N, relative to FSDP over 2 GPUs with whole parameters."""
    tp, cp = _degrees(layout)
    shards = n // tp  # dp_shard × cp
    return (1 / tp) * ((shards - 1) / shards) / 0.5 if shards > 1 else 0.0


def _modelled(
    by_layout: dict[str, dict[int, dict]], fsdp_family: dict[int, dict], counts: list[int], line
) -> None:
    """Projected tokens/s per GPU and scaling efficiency for (layout, N) not measured (see module doc), each
    written through `line`."""
    two = {layout: runs[2] for layout, runs in by_layout.items() if 2 in runs}
    if "fsdp" not in two or two["fsdp"].get("exposed_comm_ms_per_step") is None:
        return
    fsdp_exposed = two["fsdp"]["exposed_comm_ms_per_step"]
    parts = {}  # layout -> (compute_ms, own exposed ms without FSDP, FSDP exposed ms at share 1, 2-GPU record)
    for layout, r in two.items():
        if r.get("exposed_comm_ms_per_step") is None:
            continue
        own_fsdp = fsdp_exposed if layout != "fp8" else r["exposed_comm_ms_per_step"]
        rest = max(0.0, r["exposed_comm_ms_per_step"] - own_fsdp * _fsdp_share(layout, 2))
        parts[layout] = (r["step_ms"] - r["exposed_comm_ms_per_step"], rest, own_fsdp, r)
    if "tp2" in parts and "tp4" not in by_layout:
        compute, rest, own_fsdp, r = parts["tp2"]
        parts["tp4"] = (compute, 3 * rest, own_fsdp, r)
    for layout, (compute, rest, own_fsdp, r) in sorted(parts.items()):
        tp, cp = _degrees(layout)
        tokens_per_gpu_step = r["tokens_per_s_per_device"] * r["step_ms"] / 1e3
        anchor, anchor_value = _anchor(layout)
        for n in counts:
            if n <= 2 or n < tp * cp or n in by_layout.get(layout, {}):
                continue
            exposed = rest + own_fsdp * _fsdp_share(layout, n)
            step_ms = compute + exposed
            per_gpu = tokens_per_gpu_step / step_ms * 1e3
            case = f"llama3_8b_S{r['seq_len']}_{layout}_N{n}"
            extra = {"world_size": n, "modelled": True, "step_ms": step_ms, "exposed_comm_ms": exposed}
            line(case, "tokens_per_s_per_gpu", per_gpu, anchor, anchor_value, True, r, **extra)
            family = by_layout.get(layout, {}) if layout == "fp8" else fsdp_family
            if family:
                n_min = min(family)
                line(case, "scaling_efficiency", per_gpu / family[n_min]["tokens_per_s_per_device"], None, None,
                     True, r, relative_to=f"N{n_min}", **extra)  # fmt: skip


def lines(records: list[dict], counts: list[int]) -> list[dict]:
    common = {
        "torch": torch.__version__,
        "triton": triton_version(),
        "date": datetime.date.today().isoformat(),
    }
    by_layout: dict[str, dict[int, dict]] = {}
    for r in records:
        layout, n = _parse(r["name"])
        by_layout.setdefault(layout, {})[n] = r
    out = []

    def line(case, metric, value, peer, peer_value, higher, record, **extra):
        out.append(
            {
                "bench": "scaling",
                "case": case,
                "metric": metric,
                "value": value,
                "peer": peer,
                "peer_value": peer_value,
                "ratio": value / peer_value if value is not None and peer_value else None,
                "higher_is_better": higher,
                "device": record["device"],
                **extra,
                **common,
            }
        )

    fsdp_family = by_layout.get("fsdp", {})
    for layout, runs in sorted(by_layout.items()):
        anchor, anchor_value = _anchor(layout)
        family = runs if layout == "fp8" else fsdp_family or runs
        n_min = min(family)
        for n, r in sorted(runs.items()):
            case = f"llama3_8b_S{r['seq_len']}_{layout}_N{n}"
            line(case, "tokens_per_s_per_gpu", r["tokens_per_s_per_device"], anchor, anchor_value, True, r,
                 world_size=n)  # fmt: skip
            line(case, "mfu", r["mfu"], None, None, True, r, world_size=n)
            line(case, "peak_memory_gib", r["peak_memory_gib"], None, None, False, r, world_size=n)
            if r.get("exposed_comm_ms_per_step") is not None:
                line(case, "exposed_comm_ms_per_step", r["exposed_comm_ms_per_step"], None, None, False, r,
                     world_size=n, comm_ms_per_step=r["comm_ms_per_step"], step_ms=r["step_ms"])  # fmt: skip
            is_reference = n == n_min and layout in ("fsdp", "fp8")
            if not is_reference:
                base = family[n_min]
                line(case, "scaling_efficiency", r["tokens_per_s_per_device"] / base["tokens_per_s_per_device"],
                     None, None, True, r, world_size=n, relative_to=f"N{n_min}")  # fmt: skip
    _modelled(by_layout, fsdp_family, counts, line)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--summary", type=Path, required=True)
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 2, 4, 8], help="GPU counts to report")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    records = read_lines(args.summary)
    emit(lines(records, args.counts), args.out)


if __name__ == "__main__":
    main()
