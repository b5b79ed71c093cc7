"""benchmarks/memory.py's loss curves on CPU: several seeds per case, and the summary of curve logs from
several invocations (`--curve-combine`) equal to the one the runs printed themselves."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _memory_bench(*args: str) -> list[dict]:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "memory.py"), *args],
        capture_output=True, text=True, check=True, timeout=600,
    )  # fmt: skip
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def test_curves_over_seeds_and_combined_logs(tmp_path: Path) -> None:
    common = ["--device", "cpu", "--models", "", "--curve-model", "tiny", "--curve-steps", "3"]
    log_a, log_b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    both = _memory_bench(
        *common, "--curve-cases", "bf16_rerun", "--curve-seeds", "0,1", "--curve-log", str(log_a)
    )
    _memory_bench(*common, "--curve-cases", "bf16_rerun", "--curve-seeds", "2", "--curve-log", str(log_b))
    (line,) = both
    assert line["seeds"] == [0, 1] and line["metric"] == "mean_loss_last_1_steps_over_2_seeds"
    # On the CPU the rerun is bit-identical, so every ratio is exactly 1; the two seeds start differently.
    assert line["seed_ratios"] == [1.0, 1.0] and line["seed_ratios_standard_error"] == 0.0
    assert line["seed_losses"][0][0] != line["seed_losses"][1][0]

    (combined,) = _memory_bench("--curve-combine", f"{log_a},{log_b}")
    assert combined["seeds"] == [0, 1, 2]
    assert combined["seed_losses"][:2] == line["seed_losses"]
    assert combined["value"] == sum(sum(c[-1:]) for c in combined["seed_losses"]) / 3
    assert combined["device"] == "cpu" and combined["steps"] == 3
