"""What every benchmark script shares: printing result lines and writing them in DESIGN.md's format."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path


def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def read_lines(*paths: Path) -> list[dict]:
    """The JSON objects of one or more JSON-lines files, in order (blank lines skipped)."""
    return [
        json.loads(line) for path in paths for line in Path(path).read_text().splitlines() if line.strip()
    ]


def write_lines(lines: list[dict], out: Path, *, append: bool = False) -> None:
    """One JSON object per line; the newest run replaces the file (DESIGN.md) unless `append`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a" if append else "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)


def emit(rows: Iterable[dict], out: Path | None = None, *, append: bool = False) -> list[dict]:
    """Print each result line as it arrives; with `out`, also write them there. Returns the lines."""
    lines = []
    for row in rows:
        print(json.dumps(row), flush=True)
        lines.append(row)
    if out is not None and lines:
        write_lines(lines, out, append=append)
    return lines
