"""What every bench shares: paired rounds in alternating order, and figures written as JSON
with the commit and the machine they were measured on."""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def order(round_index: int, first: str, second: str) -> list[str]:
    """Which arm runs first in this round: they alternate, so drift hits both alike."""
    return [first, second] if round_index % 2 == 0 else [second, first]


def rotate(round_index: int, arms) -> list:
    """The arms in this round's order: each goes first in turn (``order`` for more than two)."""
    arms = list(arms)
    k = round_index % len(arms)
    return arms[k:] + arms[:k]


def interval(values: list[float], stat=statistics.median, resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """The 95% bootstrap (percentile) interval of ``stat`` over ``values``: the spread a key's
    rounds leave it. One value gives a point: too few rounds to tell."""
    rng = random.Random(seed)
    n = len(values)
    stats = sorted(stat(rng.choices(values, k=n)) for _ in range(resamples))
    return stats[int(0.025 * resamples)], stats[min(int(0.975 * resamples), resamples - 1)]


def verdict(lo: float, hi: float, goal: float, at_most: bool = True) -> str:
    """met: the whole interval on the goal's side; missed: all of it on the other; else unresolved."""
    if not at_most:
        lo, hi, goal = -hi, -lo, -goal
    return "met" if hi <= goal else "missed" if lo > goal else "unresolved"


def cpu_seconds(pid: int | str = "self", tid: int | None = None) -> float:
    """CPU time (user + system) of a process, or of one of its threads, from /proc."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def spread(values: list[float]) -> str:
    return f"median {statistics.median(values):.3f} (min {min(values):.3f}, max {max(values):.3f}, n={len(values)})"


def current_commit() -> str:
    """HEAD, with "+changes" when tracked code differs from it (what the benches write aside)."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results",
                            ":!README.md", ":!docs"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    return commit + ("+changes" if dirty else "")


def write_figures(path: Path | None, figures: dict) -> None:
    """``figures`` plus the commit, the time and the cores, to ``path`` (if given)."""
    if not path:
        return
    # figures made from rounds measured earlier (--from-rounds) say which code measured them
    out = {"commit": current_commit(), "cpus": len(os.sched_getaffinity(0)),
           "time": datetime.now().isoformat(timespec="seconds"), **figures}
    text = json.dumps(out, indent=2)
    Path(path).write_text(text)
    print(f"figures: {path}")
    # Every run is kept beside the latest: the README counts how many runs met each target.
    kept = Path(path).parent / "history" / Path(path).stem / f"{out['time'].replace(':', '')}-{out['commit']}.json"
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_text(text)
