"""A sweep in figures: the same trials (1) one after another with plain TRL, each evaluating
in-process (the training loop stops every ``save_steps`` to generate and score val, and scores
test at the end), and (2) as a tuneloop sweep: ``concurrency`` trials at a time, one shared
pool of evaluators, pruning. Prints the wall time of each, the ratio, and each one's best trial.

    .venv/bin/python bench/sweep.py [--sweep examples/sweep.yaml] [--steps N]
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from pathlib import Path

import yaml
from rich.console import Console

from feedback_loop import InProcessEval
from tuneloop.data_pipeline.prepare import prepare
from tuneloop.evaluator.__main__ import load_cases
from tuneloop.evaluator.generate import generate
from tuneloop.evaluator.suite import score
from tuneloop.events import DatasetReady, SplitInfo
from tuneloop.storage import confine
from tuneloop.sweep.driver import print_sweep, sweep
from tuneloop.sweep.spec import grid, load_sweep, trial_config
from tuneloop.trainer import recipe

REPO = Path(__file__).resolve().parents[1]


def bench_sweep_file(src: Path, tmp: Path, steps: int | None) -> Path:
    """``src`` with runs under ``tmp`` (and ``steps`` training steps per trial, if given)."""
    raw = yaml.safe_load(src.read_text())
    base = yaml.safe_load((src.parent / raw["config"]).read_text())
    base["run"]["output_dir"] = str(tmp / "runs")
    for s in base["data"]["sources"]:
        s["path"] = str((src.parent / s["path"]).resolve())
    for s in base.get("eval", {}).get("suites", []):
        s["path"] = str((src.parent / s["path"]).resolve())
    (tmp / "base.yaml").write_text(yaml.safe_dump(base))
    raw["config"] = "base.yaml"
    if steps:
        raw.setdefault("overrides", {}).setdefault("train", {})["max_steps"] = steps
    (tmp / "sweep.yaml").write_text(yaml.safe_dump(raw))
    return tmp / "sweep.yaml"


def plain_trial(cfg, rdir: Path) -> float:
    """One trial without tuneloop: prepare data, train with blocking evaluation, score test; its protocol score."""
    prepared = prepare(cfg, rdir / "data", rdir, "tuneloop", None, cfg.data.category_weights)
    ds = DatasetReady(run_id="bench", dataset_id=prepared.fingerprint[:16], fingerprint=prepared.fingerprint,
                      splits={k: SplitInfo(path=p, rows=n, categories=c) for k, (p, n, c) in prepared.splits.items()},
                      chat_template="tuneloop")
    val = load_cases(confine(rdir, ds.splits["val"].path), 0, cfg.eval.max_cases)
    test = load_cases(confine(rdir, ds.splits["test"].path), 0, cfg.eval.max_cases)
    evaluator = InProcessEval(val, cfg.train.save_steps, cfg.eval.max_new_tokens, cfg.eval.batch_size)
    trainer = recipe.build_trainer(cfg, rdir, ds, [evaluator], args=recipe.trl_args(cfg, rdir / "checkpoints"))
    trainer.train()
    tok = trainer.processing_class
    tok.padding_side = "left"
    trainer.model.eval()
    outputs, _ = generate(trainer.model, tok, [c.prompt for c in test], cfg.eval.max_new_tokens, cfg.eval.batch_size)
    return score(test, outputs).scores["protocol"]


def main(args) -> None:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        path = bench_sweep_file(args.sweep.resolve(), tmp, args.steps)
        spec, base = load_sweep(path)
        points = grid(spec)[: spec.total()] if spec.sampler == "grid" else None
        if points is None:
            raise SystemExit("bench/sweep.py compares grid sweeps (the same trials both ways)")

        t0 = time.perf_counter()
        plain = []
        for i, params in enumerate(points):
            cfg = trial_config(spec, base, params, f"plain-{i}")
            rdir = tmp / "plain" / str(i)
            rdir.mkdir(parents=True)
            t = time.perf_counter()
            plain.append((params, plain_trial(cfg, rdir), time.perf_counter() - t))
        plain_wall = time.perf_counter() - t0

        t0 = time.perf_counter()
        summary = sweep(path, console=Console(file=io.StringIO()))
        sweep_wall = time.perf_counter() - t0

    console = Console(width=120)
    first = trial_config(spec, base, points[0], "x")  # what every trial trains: the base with the overrides
    print(f"\n{len(points)} trials of {spec.name} ({first.train.max_steps} steps each, evaluation every "
          f"{first.train.save_steps} steps on {first.eval.max_cases} val cases), {os.cpu_count()} CPU cores")
    print("(1) plain TRL, one after another, in-process evaluation:")
    for params, protocol, seconds in plain:
        print(f"    {params}: test protocol {protocol:.3f}, {seconds:.1f} s")
    best = max(plain, key=lambda p: p[1])
    print(f"    total {plain_wall:.1f} s; best {best[0]} ({best[1]:.3f})")
    pruned = sum(t["state"] == "pruned" for t in summary["trials"])
    print(f"(2) tuneloop sweep, {spec.concurrency} at a time, {spec.evaluators} shared evaluator(s), "
          f"{spec.pruner.kind} pruning ({pruned} pruned): total {sweep_wall:.1f} s")
    print_sweep(summary, console)
    print(f"ratio tuneloop sweep / plain sequential: {sweep_wall / plain_wall:.2f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", type=Path, default=REPO / "examples" / "sweep.yaml")
    ap.add_argument("--steps", type=int, default=None, help="training steps per trial (default: the sweep file's)")
    main(ap.parse_args())
