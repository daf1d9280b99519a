"""A sweep in figures: ``tuneloop sweep`` against what a user would pick instead.

- **baseline**: ``transformers.Trainer.hyperparameter_search(backend="optuna")`` on TRL's
  ``SFTTrainer`` in one process: the same grid, the same Optuna pruner, evaluation in the
  training loop (generate and score the val cases) every ``eval.every`` steps, reported to
  the pruner; the test split scored at the end of every trial that was not pruned.
- **tuneloop**: ``tuneloop sweep`` on the same grid: trials queued to pooled trainer workers,
  ``concurrency`` at a time, evaluation by the shared evaluator pool, pruning by ``prune``
  controls, each trial's value its export's score on test.

Both run as a user runs them, each a command of its own timed from its start to its exit
(imports, NATS and pools included), in alternating paired rounds (``--rounds``, >= 3: a round
is minutes long). Prints the wall time of each, the ratio, the best
trial of each; then, once, plain sequential TRL with in-loop evaluation and no pruning.

    .venv/bin/python bench/sweep.py [--rounds 3] [--steps 100] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import os
import statistics
import tempfile
import time
from pathlib import Path

import yaml
from rich.console import Console
from transformers import TrainerCallback

from common import order, write_figures

from tuneloop.data_pipeline.prepare import prepare
from tuneloop.evaluator.__main__ import load_cases
from tuneloop.evaluator.generate import generate
from tuneloop.evaluator.suite import score
from tuneloop.events import DatasetReady, SplitInfo
from tuneloop.storage import confine
from tuneloop.summary import SweepSummary, print_sweep
from tuneloop.sweep.spec import grid, load_sweep, trial_config
from tuneloop.trainer import model as models
from tuneloop.trainer import recipe

REPO = Path(__file__).resolve().parents[1]
LEARNING_RATES = [3.0e-3, 1.0e-3, 3.0e-4, 1.0e-4]  # x LoRA r 8, 32: the example's grid widened to 8 trials


def bench_sweep_file(src: Path, tmp: Path, name: str, steps: int, every: int) -> Path:
    """``src`` widened to 8 trials, with runs under ``tmp``, ``steps`` per trial, evaluation every ``every``."""
    raw = yaml.safe_load(src.read_text())
    base = yaml.safe_load((src.parent / raw["config"]).read_text())
    base["run"]["output_dir"] = str(tmp / "runs")
    for s in base["data"]["sources"]:
        s["path"] = str((src.parent / s["path"]).resolve())
    for s in base.get("eval", {}).get("suites", []):
        s["path"] = str((src.parent / s["path"]).resolve())
    (tmp / "base.yaml").write_text(yaml.safe_dump(base))
    raw.update(config="base.yaml", name=name)
    raw["params"]["train.learning_rate"] = {"values": LEARNING_RATES}
    over = raw.setdefault("overrides", {})
    over.setdefault("train", {}).update(max_steps=steps)
    over.setdefault("eval", {}).update(every=every)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def eval_score(model, tok, cases, cfg, metric: str) -> float:
    side = tok.padding_side
    tok.padding_side = "left"
    was_training = model.training
    model.eval()
    outputs, _ = generate(model, tok, [c.prompt for c in cases], cfg.eval.max_new_tokens, cfg.eval.batch_size)
    model.train(was_training)
    tok.padding_side = side
    return score(cases, outputs).scores[metric]


class EvalEvery(TrainerCallback):
    """Ask the Trainer to evaluate every N steps (its evaluation reports to the HP search's pruner)."""

    def __init__(self, every: int):
        self.every = every

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            control.should_evaluate = True


def setup_data(cfg, rdir: Path):
    p = prepare(cfg, rdir / "data", rdir)
    ds = DatasetReady(run_id="bench", dataset_id=p.fingerprint[:16], fingerprint=p.fingerprint, chat_template=cfg.model.template(),
                      splits={k: SplitInfo(path=path, rows=n, categories=c) for k, (path, n, c) in p.splits.items()})
    val = load_cases(confine(rdir, ds.splits["val"].path), 0, cfg.eval.max_cases)
    test = load_cases(confine(rdir, ds.splits["test"].path), 0, cfg.eval.max_cases)
    return ds, val, test


def baseline(spec, base, rdir: Path) -> tuple[float, list[dict]]:
    """transformers' hyperparameter_search with optuna over TRL's SFTTrainer; (seconds, trials)."""
    import optuna
    import trl
    from peft import get_peft_model

    from tuneloop.sweep.search import make_study

    points = grid(spec)
    first = trial_config(spec, base, points[0], "baseline")
    metric = spec.metric or first.feedback.metric
    t0 = time.perf_counter()
    ds, val, test = setup_data(first, rdir)
    _, base_path = recipe.prepare_base(first, rdir, ds)
    results: dict[int, dict] = {}

    def peft_model(r: int):
        """What SFTTrainer's __init__ does to its model, for each trial's fresh one: LoRA, and
        TRL's fused LM head (its loss reads the log-probabilities that head returns)."""
        from trl.trainer.sft_trainer import add_fused_lm_head

        cfg = trial_config(spec, base, {**points[0], "train.lora.r": r}, "baseline")
        model = get_peft_model(models.load(base_path)[0], recipe.lora_config(cfg))
        add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy", "is_top1"))
        return model

    space = {"learning_rate": LEARNING_RATES, "lora_r": sorted({p["train.lora.r"] for p in points})}

    def model_init(trial):  # transformers calls it before hp_space; suggesting twice gives the same value
        return peft_model(trial.suggest_categorical("lora_r", space["lora_r"]))

    class InlineEvalSFT(trl.SFTTrainer):
        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            return {f"eval_{metric}": eval_score(self.model, self.processing_class, val, first, metric)}

        def train(self, *args, trial=None, **kwargs):
            out = super().train(*args, trial=trial, **kwargs)  # a pruned trial raises TrialPruned here
            results[trial.number] = {"params": dict(trial.params), "state": "complete",
                                     "test": eval_score(self.model, self.processing_class, test, first, metric)}
            return out

    args = recipe.trl_args(first, rdir / "checkpoints")
    args.save_strategy = "no"  # like the baseline users run: no checkpoints; tuneloop's serve resume
    tokenizer = models.load(base_path)[1]
    trainer = InlineEvalSFT(model=peft_model(points[0]["train.lora.r"]), args=args,
                            train_dataset=_dataset(first, rdir, ds), processing_class=tokenizer,
                            callbacks=[EvalEvery(first.eval.every)])
    trainer.model_init = model_init
    pruner = make_study(spec).pruner  # the very pruner tuneloop's sweep uses
    trainer.hyperparameter_search(
        hp_space=lambda t: {k: t.suggest_categorical(k, v) for k, v in space.items()},
        compute_objective=lambda m: m[f"eval_{metric}"], n_trials=len(points), direction="maximize",
        backend="optuna", sampler=optuna.samplers.GridSampler(space, seed=spec.seed), pruner=pruner)
    seconds = time.perf_counter() - t0
    n = len(points)
    trials = [results.get(i, {"state": "pruned"}) for i in range(n)]
    return seconds, trials


def _dataset(cfg, rdir, ds):
    from datasets import Dataset

    return Dataset.from_list(recipe.train_rows(cfg, rdir, ds))


def plain_sequential(spec, base, rdir: Path) -> tuple[float, float]:
    """Every trial to the end, one after another, evaluating in the loop; (seconds, best test score)."""
    points = grid(spec)
    first = trial_config(spec, base, points[0], "plain")
    metric = spec.metric or first.feedback.metric
    t0 = time.perf_counter()
    ds, val, test = setup_data(first, rdir)
    best = 0.0
    for params in points:
        cfg = trial_config(spec, base, params, "plain")

        class Inline(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
                if state.global_step % cfg.eval.every == 0:
                    eval_score(model, processing_class, val, cfg, metric)

        args = recipe.trl_args(cfg, rdir / "checkpoints")
        args.save_strategy = "no"
        trainer = recipe.build_trainer(cfg, rdir, ds, [Inline()], args=args)
        trainer.train()
        best = max(best, eval_score(trainer.model, trainer.processing_class, test, cfg, metric))
    return time.perf_counter() - t0, best


def time_baseline(path: Path, tmp: Path, r: int) -> tuple[float, list[dict]]:
    """The baseline as a user runs it: a fresh ``python`` process, imports included; (wall s, trials)."""
    out = tmp / f"baseline-{r}.json"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--baseline-child", str(path), str(tmp / f"baseline-{r}"), str(out)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0, json.loads(out.read_text())


def time_tuneloop(path: Path, tmp: Path, name: str) -> tuple[float, dict]:
    """``tuneloop sweep`` as a user types it: NATS, pools and all; (wall s, its summary)."""
    t0 = time.perf_counter()
    subprocess.run([str(Path(sys.executable).parent / "tuneloop"), "sweep", str(path)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0, json.loads((tmp / "runs" / name / "summary.json").read_text())


def main(args) -> None:
    console = Console(width=130)
    rounds = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for r in range(args.rounds):
            name = f"bench-r{r}"
            path = bench_sweep_file(args.sweep.resolve(), tmp, name, args.steps, args.every)
            spec, base = load_sweep(path)
            got = {}
            for arm in order(r, "baseline", "tuneloop"):
                got[arm] = time_baseline(path, tmp, r) if arm == "baseline" else time_tuneloop(path, tmp, name)
            (b_s, b_trials), (t_s, summary) = got["baseline"], got["tuneloop"]
            b_best = max((t["test"] for t in b_trials if t["state"] == "complete"), default=None)
            t_best = (summary["best"] or {}).get("value")
            rounds.append({"baseline_s": b_s, "tuneloop_s": t_s, "ratio": t_s / b_s, "baseline_best_test": b_best,
                           "tuneloop_best_test": t_best,
                           "baseline_pruned": sum(t["state"] == "pruned" for t in b_trials),
                           "tuneloop_pruned": sum(t["state"] == "pruned" for t in summary["trials"])})
            print(f"round {r + 1}: baseline {b_s:6.1f} s ({rounds[-1]['baseline_pruned']} pruned, best test "
                  f"{b_best if b_best is None else round(b_best, 3)})  tuneloop {t_s:6.1f} s ({rounds[-1]['tuneloop_pruned']} "
                  f"pruned, best test {t_best if t_best is None else round(t_best, 3)})  ratio {t_s / b_s:.3f}", flush=True)
            if r == args.rounds - 1:
                print_sweep(SweepSummary.model_validate(summary), console)
        plain_s, plain_best = plain_sequential(spec, base, tmp / "plain") if args.plain else (None, None)

    first = trial_config(spec, base, grid(spec)[0], "x")
    ratios = [r["ratio"] for r in rounds]
    print(f"\n{spec.total()} trials of {first.train.max_steps} steps (grid lr x LoRA r), evaluation every "
          f"{first.eval.every} steps on {first.eval.max_cases} val cases, {spec.pruner.kind} pruner "
          f"(startup {spec.pruner.startup_trials}), tuneloop {spec.concurrency} at a time with {spec.evaluators} "
          f"evaluator(s); {os.cpu_count()} CPU cores, {args.rounds} rounds, order alternating")
    print(f"baseline (transformers hyperparameter_search, optuna): median {statistics.median(r['baseline_s'] for r in rounds):.1f} s")
    print(f"tuneloop sweep:                                       median {statistics.median(r['tuneloop_s'] for r in rounds):.1f} s")
    print(f"tuneloop_over_baseline: median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f}; "
          "target <= 0.7)")
    print("best trial's test score per round: baseline " + ", ".join(f"{r['baseline_best_test']:.3f}" for r in rounds)
          + "; tuneloop " + ", ".join(f"{r['tuneloop_best_test']:.3f}" for r in rounds))
    if plain_s is not None:
        print(f"plain sequential TRL (every trial to the end, in-loop evaluation, no pruning): {plain_s:.1f} s, "
              f"best test {plain_best:.3f}; tuneloop / plain {statistics.median(r['tuneloop_s'] for r in rounds) / plain_s:.3f}")
    write_figures(args.json, {
        "tuneloop_over_baseline": round(statistics.median(ratios), 4), "ratio_min": round(min(ratios), 4),
        "ratio_max": round(max(ratios), 4), "rounds": rounds, "trials": spec.total(), "steps": first.train.max_steps,
        "plain_sequential_s": plain_s, "plain_best_test": plain_best,
        "tuneloop_over_plain": round(statistics.median(r["tuneloop_s"] for r in rounds) / plain_s, 4) if plain_s else None,
    })


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--baseline-child":
        spec, base = load_sweep(Path(sys.argv[2]))
        _, trials = baseline(spec, base, Path(sys.argv[3]))
        Path(sys.argv[4]).write_text(json.dumps(trials))
        sys.exit(0)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", type=Path, default=REPO / "examples" / "sweep.yaml")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=100, help="training steps per trial")
    ap.add_argument("--every", type=int, default=25, help="evaluate every N steps (both)")
    ap.add_argument("--no-plain", dest="plain", action="store_false", help="skip the plain sequential figure")
    ap.add_argument("--json", type=Path, default=None)
    main(ap.parse_args())
