"""Every kernel benchmark in one run on one GPU: attention, the memory-bound ops, the fused loss.

    python benchmarks/kernels.py [--only attention pointwise loss] [--results-dir benchmarks/results]

Each module's `cases(args)` yields one DESIGN.md result line per (case, metric, peer), with its peers
measured in the same process; lines are printed and, with --results-dir, written to `<bench>.jsonl` there
(the newest run replaces the file, as DESIGN.md asks).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_attention  # noqa: E402
import bench_loss  # noqa: E402
import bench_pointwise  # noqa: E402
from _results import emit, write_lines  # noqa: E402

MODULES = {"attention": bench_attention, "pointwise": bench_pointwise, "loss": bench_loss}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", nargs="*", default=list(MODULES), choices=list(MODULES))
    parser.add_argument("--results-dir", type=Path, default=None)
    args = parser.parse_args()
    by_bench: dict[str, list[dict]] = defaultdict(list)
    for name in args.only:
        for line in emit(MODULES[name].cases(argparse.Namespace())):
            by_bench[line["bench"]].append(line)
    if args.results_dir:
        for bench, lines in by_bench.items():
            write_lines(lines, args.results_dir / f"{bench}.jsonl")


if __name__ == "__main__":
    main()
