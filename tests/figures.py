"""Figures the reliability scenarios observed, and their table in docs/reliability.md.

A scenario test records what it counted or timed (``figures`` fixture, tests/conftest.py);
a passing test's figures go to ``runs/reliability-figures.json`` with the commit they were
measured on, and at the end of the session the table between the markers below is written
anew from that file. Nothing in the table is typed by hand."""

from __future__ import annotations

import json
import os
import subprocess
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIGURES = Path(os.environ.get("TUNELOOP_RELIABILITY_FIGURES", REPO / "runs" / "reliability-figures.json"))
DOC = REPO / "docs" / "reliability.md"
BEGIN, END = "<!-- figures:begin -->", "<!-- figures:end -->"
UNITS = {"_s": " s", "_ms": " ms", "_mb": " MB"}


def record(test: str, where: str, figures: dict) -> None:
    """Keep ``figures`` of ``test`` (a node id's file and name) with the commit and time."""
    old = json.loads(FIGURES.read_text()) if FIGURES.exists() else {}
    old = {k: v for k, v in old.items() if isinstance(v, dict) and "where" in v}  # a file of an older format
    old[test] = {"where": where, "figures": figures, "commit": _commit(),
                 "time": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")}
    FIGURES.parent.mkdir(parents=True, exist_ok=True)
    FIGURES.write_text(json.dumps(old, indent=1, sort_keys=True))


def value(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, dict):
        return ", ".join(f"{k} {value(x)}" for k, x in v.items())
    if isinstance(v, list):
        return " / ".join(value(x) for x in v)
    return "—" if v is None else f"{v:,}".replace(",", " ") if isinstance(v, int) else str(v)


def cell(figures: dict) -> str:
    out = []
    for k, v in figures.items():
        unit = next((u for suffix, u in UNITS.items() if k.endswith(suffix)), "")
        name = k[: -len(next(s for s in UNITS if k.endswith(s)))] if unit else k
        out.append(f"{name.replace('_', ' ')} {value(v)}{unit}")
    return "; ".join(out)


def table(recorded: dict) -> str:
    rows = ["| scenario | observed | measured on |", "| --- | --- | --- |"]
    recorded = {k: v for k, v in recorded.items() if isinstance(v, dict) and "where" in v}
    for test, r in sorted(recorded.items(), key=lambda kv: (kv[1]["where"], kv[0])):
        rows.append(f"| `{r['where']}`: {test.removeprefix('test_').replace('_', ' ')} | {cell(r['figures'])} "
                    f"| {r['time']} UTC, {r['commit']} |")
    return "\n".join(rows)


def write_doc() -> None:
    """docs/reliability.md's figures table, from every scenario's latest passing run."""
    if not FIGURES.exists() or not DOC.exists():
        return
    text = DOC.read_text()
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    if not rest:
        return
    DOC.write_text(f"{head}{BEGIN}\n{table(json.loads(FIGURES.read_text()))}\n{END}{tail}")


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+" if dirty else "") if out.returncode == 0 else "?"
    except OSError:
        return "?"
