"""What every bench shares: paired rounds in alternating order, and figures written as JSON
with the commit and the machine they were measured on."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def order(round_index: int, first: str, second: str) -> list[str]:
    """Which arm runs first in this round: they alternate, so drift hits both alike."""
    return [first, second] if round_index % 2 == 0 else [second, first]


def cpu_seconds(pid: int | str = "self", tid: int | None = None) -> float:
    """CPU time (user + system) of a process, or of one of its threads, from /proc."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def spread(values: list[float]) -> str:
    return f"median {statistics.median(values):.3f} (min {min(values):.3f}, max {max(values):.3f}, n={len(values)})"


def write_figures(path: Path | None, figures: dict) -> None:
    """``figures`` plus the commit, the time and the cores, to ``path`` (if given)."""
    if not path:
        return
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results",
                            ":!README.md"], cwd=REPO, capture_output=True, text=True).stdout.strip()  # what benches write
    out = {**figures, "commit": commit + ("+changes" if dirty else ""), "cpus": len(os.sched_getaffinity(0)),
           "time": datetime.now().isoformat(timespec="seconds")}
    Path(path).write_text(json.dumps(out, indent=2))
    print(f"figures: {path}")
