"""What the data-quality gate and augmentation do to the example: the example's SFT phase run
through ``tuneloop run`` (real services) once per arm, scored on the held-out test split and
the two suites of the example (``protocol``; ``phrasings``: ways of asking found neither in the
data nor in the augmentation templates).

Arms: the legacy prose answers (protocol violations) kept or dropped, each without and with
``data.augment``. Not a timing bench: figures are scores, with the gate's counts.

``--jobs`` runs the whole example job instead (SFT, then GRPO) with the violations kept and
dropped: does the GRPO phase still earn its place once the data is clean?

    .venv/bin/python bench/data_study.py [--seeds 0 1] [--json bench/results/data_study.json]
    .venv/bin/python bench/data_study.py --jobs [--json bench/results/data_jobs.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from common import write_figures

REPO = Path(__file__).resolve().parents[1]
TUNELOOP = Path(sys.executable).parent / "tuneloop"
ARMS = {
    "violations kept": {"protocol_violations": "report", "augment": False},
    "violations dropped": {"protocol_violations": "drop", "augment": False},
    "violations kept, augmented": {"protocol_violations": "report", "augment": True},
    "violations dropped, augmented": {"protocol_violations": "drop", "augment": True},
}


def arm_config(tmp: Path, arm: dict, seed: int) -> Path:
    """The example's SFT phase as one run, with the arm's quality and augmentation settings."""
    from tuneloop.config import load_config

    example = load_config(REPO / "examples" / "protocol-tiny.yaml")
    raw = example.phase_config(0).model_dump(mode="json")
    raw["run"].update(output_dir=str(tmp / "runs"), name="study", seed=seed)
    raw["data"]["quality"]["protocol_violations"] = arm["protocol_violations"]
    raw["data"]["augment"]["enabled"] = arm["augment"]
    raw["data"]["adapt"]["enabled"] = False  # one mixture for every arm: the data, not the loop, differs
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def job_config(tmp: Path, violations: str) -> Path:
    """The example job as it is, but for ``data.quality.protocol_violations``."""
    from tuneloop.config import dump_config, load_config

    cfg = load_config(REPO / "examples" / "protocol-tiny.yaml")
    cfg.run.output_dir = str(tmp / "runs")
    cfg.data.quality.protocol_violations = violations
    path = tmp / "job.yaml"
    dump_config(cfg, path)
    return path


def run_job(violations: str) -> dict:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        subprocess.run([str(TUNELOOP), "run", str(job_config(tmp, violations)), "--run-id", "job"], check=True, cwd=tmp,
                       stdout=subprocess.DEVNULL)
        job = json.loads((tmp / "runs" / "job" / "summary.json").read_text())
        out = {}
        for p in job["phases"]:
            out[p["phase"]] = {"steps": p["steps"], "protocol": p["test"]["protocol"],
                               "correctness": p["test"]["correctness"],
                               "suite_protocol": p["suites"]["protocol"]["pass"],
                               "suite_phrasings": p["suites"]["phrasings"]["pass"]}
        return out


def run_arm(arm: dict, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        config = arm_config(tmp, arm, seed)
        t0 = time.perf_counter()
        subprocess.run([str(TUNELOOP), "run", str(config)], check=True, cwd=tmp, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - t0
        run_dir = next(p for p in (tmp / "runs").iterdir() if (p / "summary.json").is_file())
        summary = json.loads((run_dir / "summary.json").read_text())
        q = json.loads((run_dir / "data" / summary["data"]["dataset_id"] / "quality.json").read_text())
        ready = (run_dir / "data" / summary["data"]["dataset_id"] / "train.jsonl").read_text().count("\n")
        return {"seed": seed, "seconds": round(seconds, 1), "steps": summary["steps"], "train_rows": ready,
                "findings": q["findings"], "dropped": q["dropped"], "violation_rate": q["violation_rate"],
                "test_protocol": summary["test"]["protocol"], "test_correctness": summary["test"]["correctness"],
                "suite_protocol": summary["suites"]["protocol"]["pass"],
                "suite_phrasings": summary["suites"]["phrasings"]["pass"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--jobs", action="store_true", help="the whole example job, violations kept and dropped")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.jobs:
        jobs = {}
        for violations in ("report", "drop"):
            jobs[violations] = run_job(violations)
            print(f"job, protocol_violations {violations}: {json.dumps(jobs[violations])}", flush=True)
        write_figures(args.json, {"jobs": jobs})
        return
    results: dict[str, list[dict]] = {}
    for seed in args.seeds:
        for name in args.arms:
            r = run_arm(ARMS[name], seed)
            results.setdefault(name, []).append(r)
            print(f"{name:32s} seed {seed}: test protocol {r['test_protocol']:.3f} correctness "
                  f"{r['test_correctness']:.3f}; suite protocol {r['suite_protocol']:.3f}, phrasings "
                  f"{r['suite_phrasings']:.3f}; {r['train_rows']} train rows, dropped {r['dropped']} ({r['seconds']:.0f} s)",
                  flush=True)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    arms = {name: {k: round(mean([r[k] for r in rs]), 4) for k in
                   ("test_protocol", "test_correctness", "suite_protocol", "suite_phrasings", "train_rows")}
            | {"runs": rs} for name, rs in results.items()}
    write_figures(args.json, {"arms": arms, "seeds": args.seeds, "max_steps": results[args.arms[0]][0]["steps"]})


if __name__ == "__main__":
    main()
