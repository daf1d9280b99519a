"""Write the benchmark figures of docs/ from ``bench/results/*.json`` (what ``make bench`` wrote).

The figures are never typed in: this script renders the part of docs/benchmarks.md between
``<!-- bench:begin -->`` and ``<!-- bench:end -->`` (and the data study's in docs/data.md) from
the JSON files, each with the commit it measured. ``make bench`` runs it last.

    .venv/bin/python bench/readme.py [--results bench/results] [--readme docs/benchmarks.md] [--study docs/data.md]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

from common import interval, verdict

REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
# The data study (bench/data_study.py): scores, not timings, in docs/data.md's Data quality section.
STUDY_BEGIN, STUDY_END = "<!-- data-study:begin -->", "<!-- data-study:end -->"
STUDY_FILES = ("data_study", "data_jobs")
# Written into the Quick start by bench/fresh_demo.py itself, not into the benchmark table.
OWN_SECTION = ("fresh_demo",)
# (file, key, goal, the key must be at most the goal: else at least)
TARGETS = [
    ("compute_to_target", "wall_to_target_over_fixed", 0.5, True),
    ("compute_to_target", "wall_to_target_over_trl_callback", 0.85, True),
    ("compute_to_target", "wall_to_target_over_early_stopping", 0.85, True),
    ("compute_to_target", "eval_seconds_per_verdict_over_inline", 0.5, True),
    ("compute_to_target", "adaptive_steps_ratio", 0.85, True),
    ("feedback_loop", "remote_over_inline_shared", 1.05, True),
    ("feedback_loop", "remote_over_inline_extra_core", 0.75, True),
    ("feedback_loop_real", "remote_over_inline_shared", 1.05, True),
    ("sweep", "tuneloop_over_baseline", 0.7, True),
    ("sweep_real", "tuneloop_over_baseline", 0.7, True),
    ("trainer_overhead", "median_of_ratios", 0.97, False),
    ("trainer_overhead_real", "median_of_ratios", 0.97, False),
    ("startup", "first_step_over_plain", 1.5, True),
    ("pbt", "pbt_best_over_grid_best", 1.0, False),
    ("pbt", "pbt_steps_over_grid_steps", 1.05, True),
    ("pbt_real", "pbt_best_over_grid_best", 1.0, False),
    ("pbt_real", "pbt_steps_over_grid_steps", 1.05, True),
]
# Figures a review found unfair, until their bench is rebuilt (or rerun): said in the table, not
# judged, not hidden. (bench, does this JSON predate the fix, why)
CAVEATS = [
    ("compute_to_target", lambda r: "early_stopping_final" not in r,
     "measured before the fix: 2 rounds for 4 arms, no warm-up, the headline against the callback took the adaptive "
     "arm (the callback adapts nothing), decisions on point estimates"),
    ("sweep", lambda r: "setup" not in r, "unfair arms: tuneloop stops trials at the target, walks the grid best-first and "
                              "runs 2 at a time; the baseline does none of these"),
    ("feedback_loop", lambda r: "config" not in r, "measured before the fix: the remote arm's last evaluation "
                                                    "was outside its timed window, inline's inside"),
]


# Results files that are not named for their script: what made them.
MADE_BY = {"sweep_real": "bench/sweep.py --real", "trainer_overhead_real": "bench/trainer_overhead.py --real",
           "feedback_loop_real": "bench/feedback_loop.py --config examples/protocol.yaml", "pbt_real": "bench/pbt.py --real"}


def made_by(name: str) -> str:
    return MADE_BY.get(name, f"bench/{name}.py")


def caveat(name: str, r: dict) -> str | None:
    return next((why for bench, applies, why in CAVEATS if bench == name and applies(r)), None)


PER_ROUND = {"remote_over_inline_shared": "remote_over_inline_shared_rounds",
             "remote_over_inline_extra_core": "remote_over_inline_extra_core_rounds"}
ARMS = {"fixed": "TRL, fixed schedule", "callback": "TRL + evaluation callback",
        "early_stopping": "TRL + transformers' EarlyStoppingCallback", "tuneloop": "tuneloop",
        "tuneloop_static": "tuneloop, adaptive data off"}


def key_interval(r: dict, key: str) -> tuple[float, float] | None:
    """The key's 95% interval: as the bench wrote it, or from the per-round values it kept."""
    if f"{key}_ci95" in r:
        return tuple(r[f"{key}_ci95"]) if r[f"{key}_ci95"] else None
    kept = r.get("rounds") if isinstance(r.get("rounds"), list) else []  # the sweep keeps its rounds whole
    rounds = r.get(PER_ROUND.get(key, "ratios")) or [x["ratio"] for x in kept if "ratio" in x]
    return interval(rounds) if rounds else None


def judged(r: dict, key: str, goal: float, at_most: bool) -> str:
    if f"{key}_verdict" in r:  # the bench judged it (it knows when a ratio does not count)
        return r[f"{key}_verdict"]
    ci = key_interval(r, key)
    return verdict(*ci, goal, at_most) if ci else "unresolved"


def history(results_dir: Path, name: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((results_dir / "history" / name).glob("*.json"))]


def stop_kind(reason: str) -> str:
    """'target', 'patience' or 'max_steps': why an arm of compute_to_target stopped."""
    return "target" if "target" in reason else "patience" if "patience" in reason or "improvement" in reason else "max_steps"


def ratio_text(r: dict, key: str) -> str:
    ci = r[f"{key}_ci95"]
    return f"{r[key]:.3f}" + (f" ({ci[0]:.3f} – {ci[1]:.3f})" if ci else " (one round)")


def render(results: dict[str, dict], results_dir: Path | None = None) -> str:
    lines = ["| bench | key | target | measured (95% interval) | verdict | runs that met it | commit |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, key, goal, at_most in TARGETS:
        target = f"{'<=' if at_most else '>='} {goal}"
        r = results.get(name)
        if r is None or r.get(key) is None:
            lines.append(f"| `{made_by(name)}` | `{key}` | {target} | not measured | | | |")
            continue
        ci = key_interval(r, key)
        shown = f"**{r[key]:.3f}**" + (f" ({ci[0]:.3f} – {ci[1]:.3f})" if ci else " (no interval: one round, or no per-round values kept)")
        said = f"not judged: {caveat(name, r)}" if caveat(name, r) else judged(r, key, goal, at_most)
        runs = [h for h in history(results_dir, name) if h.get(key) is not None] if results_dir else []
        runs = runs or [r]
        met = sum(not caveat(name, h) and judged(h, key, goal, at_most).startswith("met") for h in runs)
        lines.append(f"| `{made_by(name)}` | `{key}` | {target} | {shown} | {said} | {met} of {len(runs)} | `{r['commit']}` |")
    lines += ["", "Verdicts: **met** when the whole 95% bootstrap interval of the paired median is on the target's "
              "side, **missed** when all of it is on the other, **unresolved** when it spans the target (or no "
              "interval was kept)."]
    out = ["\n".join(lines), ""]
    if c := results.get("compute_to_target"):
        t = c["target"]
        planned = c.get("rounds_planned", c["rounds"])
        cut = f" of the {planned} planned (the run was cut short)" if planned > c["rounds"] else ""
        out += ["", f"Compute to target ({c['model']}, `{c['example']}`, {c['rounds']} rounds{cut}, one seed each; target on "
                f"the whole test split: protocol >= {t['protocol']}, correctness >= {t['correctness']}), medians:", "",
                "| arm | steps | seconds in `train()` | evaluations | test protocol | test correctness (range) | reached the target |",
                "| --- | --- | --- | --- | --- | --- | --- |"]
        arms = {a: label for a, label in ARMS.items() if f"{a}_final" in c}
        for arm, label in arms.items():
            f = c[f"{arm}_final"]
            lo, hi = f["test_correctness_range"]
            out.append(f"| {label} | {f['steps']:.0f} | {f['train_s']:.0f} | {f['evaluations']:.0f} | "
                       f"{f['test_protocol']:.3f} | {f['test_correctness']:.3f} ({lo:.3f} – {hi:.3f}) | "
                       f"{f['reached']} of {c['rounds']} |")
        out += ["", "Per round (steps, why it stopped, the step its result is from, test correctness):", "", "```"]
        for r in c["per_round"]:
            out.append(f"seed {r['seed']}: " + "; ".join(
                f"{a} {r[a]['steps']} ({stop_kind(r[a]['stopped_by'])}) -> step {r[a]['result_step']} "
                f"{r[a]['test']['correctness']:.3f}" for a in arms))
        out += ["```"]
        per_step = {arm: statistics.median(r[arm]["train_s"] / r[arm]["steps"] for r in c["per_round"]) for arm in arms}
        evaluating = statistics.median(r["callback"]["eval_s"] for r in c["per_round"])
        out += ["", "Seconds per step: " + ", ".join(f"{ARMS[a]} {v:.2f}" for a, v in per_step.items())
                + f"; the callback spent {evaluating:.0f} s of its time evaluating."]
        if "data_switches" in c["per_round"][0]["tuneloop"]:
            out += ["", "Adaptive data, per round: " + "; ".join(
                f"seed {r['seed']}: {r['tuneloop']['data_switches']} mixture switches, {r['tuneloop']['all_categories_weak']} "
                f"of {r['tuneloop']['evaluations']} feedbacks named every category weak" for r in c["per_round"]) + "."]
        out += ["", "Steps: tuneloop / fixed " + ratio_text(c, "steps_to_target_over_fixed") + ", tuneloop / callback "
                + ratio_text(c, "steps_to_target_over_trl_callback") + "; adaptive data on / off: steps "
                + ratio_text(c, "adaptive_steps_ratio") + ", seconds " + ratio_text(c, "adaptive_wall_ratio") + ".", ""]
    for f in filter(None, (results.get("feedback_loop"), results.get("feedback_loop_real"))):
        out += [f"Feedback loop ({f.get('config', 'protocol-tiny.yaml')}, {f['rounds']} paired rounds, {f['steps']} "
                f"steps, evaluation every {f['eval_every']} steps of {f['cases']} cases, up to {f['max_new_tokens']} "
                f"tokens): inline evaluation was {f['inline_eval_share_shared']:.0%} of the inline loop (shared)"
                + (f" and {f['inline_eval_share_extra_core']:.0%} (an extra core for the evaluator)"
                   if "inline_eval_share_extra_core" in f else "")
                + f"; `eval_scaling_1_to_2` {f['eval_scaling_1_to_2']:.2f}; snapshot saved -> feedback applied, "
                "per stage (medians):", "", "```"]
        out += [f"{stage:58s} {seconds * 1000:8.1f} ms" for stage, seconds in f["stages_s"].items()]
        out += ["```", ""]
    for name in ("sweep", "sweep_real"):
        s = results.get(name)
        if not s:
            continue
        if "setup" not in s:  # the old, unfair bench: its rounds as they were
            out += [f"Sweep ({s['trials']} trials of {s['steps']} steps, {len(s['rounds'])} rounds; not judged), "
                    "wall seconds: " + ", ".join(f"baseline {r['baseline_s']:.0f} / tuneloop {r['tuneloop_s']:.0f}"
                                                 for r in s["rounds"]) + ".", ""]
            continue
        out += [f"Sweep on the {s['model']} model: {s['setup']}. Per round, wall seconds, optimizer steps and "
                "evaluations over all trials, trials pruned, the best trial's test score:", "", "```"]
        for r in s["rounds"]:
            out.append(f"seed {r['seed']}: " + "; ".join(
                f"{arm} {r[arm]['wall_s']:.0f} s"
                + (f" ({r[arm]['train_s']:.0f} s in train(), all trials)" if "train_s" in r[arm] else "")
                + f", {r[arm]['steps']} steps, {r[arm]['evaluations']} evaluations, {r[arm]['pruned']} pruned, best "
                + ("none" if r[arm]["best_test"] is None else f"{r[arm]['best_test']:.3f}") for arm in ("optuna", "tuneloop"))
                + f"; ratio {r['ratio']:.3f}")
        out += ["```", "", f"Optimizer steps, tuneloop over the baseline: {s['steps_ratio']:.3f} (median of the rounds).", ""]
    for name in ("pbt", "pbt_real"):
        if not (b := results.get(name)):
            continue
        out += [f"Population-based training on the {b['model']} model against the grid of its first points: {b['setup']}. "
                "Per round, the best test score and the optimizer steps over all trials, and PBT's copies:", "", "```"]
        for r in b["rounds"]:
            out.append(f"seed {r['seed']}: " + "; ".join(
                f"{arm} best {'none' if r[arm]['best_test'] is None else format(r[arm]['best_test'], '.3f')}, "
                f"{r[arm]['steps']} steps" for arm in ("grid", "pbt")) + f", {r['pbt']['copies']} copies: " + (", ".join(
                    f"t{t['number']:02d}<-t{c['forked_from']['trial']:02d}@{c['forked_from']['step']}"
                    for c in r["pbt"]["trials"] if c["forked_from"]
                    for t in r["pbt"]["trials"] if t["replaced_by"] == c["number"]) or "none"))
        out += ["```", ""]
    if t := results.get("trainer_overhead"):
        out += [f"Trainer overhead ({t['rounds']} rounds of {t['steps']} steps, {t['device']}, a checkpoint every "
                f"{t['save_steps']} steps in both arms, a control every {t['control_every']} steps): plain TRL "
                f"{t['plain_tokens_per_s']:.0f} tokens/s, tuneloop {t['tuneloop_tokens_per_s']:.0f} tokens/s (the median of the "
                f"per-round ratios {t['median_of_ratios']:.3f}); control "
                f"latency median {t['control_latency_median_ms']:.0f} ms"
                + (f"; the bus's side (loop thread, nats-server, operator) took {t['bus_cpu_share']:.1%} of the CPU"
                   if t.get("bus_cpu_share") is not None else "") + ".", ""]
    if u := results.get("startup"):
        out += [f"Start-up ({u['rounds']} rounds): first training step after {u['plain_s']:.1f} s for a plain TRL "
                f"script, {u['tuneloop_s']:.1f} s for `tuneloop run` (medians)"
                + (f"; tuneloop's overhead {u['overhead_s']:+.1f} s ({u['overhead_s_ci95'][0]:+.1f} to "
                   f"{u['overhead_s_ci95'][1]:+.1f} s)" if "overhead_s" in u else "") + ".", ""]
    cpus = sorted({r.get("cpus") for name, r in results.items() if name not in STUDY_FILES})
    out.append(f"Measured on {', '.join(map(str, cpus))} CPU core(s); JSON files in `bench/results/`.")
    return "\n".join(out)


def render_study(results: dict[str, dict]) -> str:
    """The data study: per arm, the held-out scores of the example's SFT phase (means over the
    seeds, each seed's in brackets); then the whole job with the violations kept and dropped."""
    out = []
    if s := results.get("data_study"):
        keys = ("test_protocol", "test_correctness", "suite_protocol", "suite_phrasings")
        out += [f"The example's SFT phase ({s['max_steps']} steps), seeds {', '.join(map(str, s['seeds']))}; "
                f"commit `{s['commit']}`:", "",
                "| arm | train rows | test protocol | test correctness | suite `protocol` | suite `phrasings` (unseen) |",
                "| --- | --- | --- | --- | --- | --- |"]
        for name, arm in s["arms"].items():
            cells = [f"**{arm[k]:.3f}** ({', '.join(f'{r[k]:.3f}' for r in arm['runs'])})" for k in keys]
            out.append(f"| {name} | {arm['train_rows']:.0f} | " + " | ".join(cells) + " |")
        first = next(iter(s["arms"].values()))["runs"][0]
        out += ["", f"The gate on the example: findings {first['findings']}; violation rate {first['violation_rate']:.1%}.",
                ""]
        a = s["arms"]
        if {"violations kept", "violations dropped"} <= set(a):
            kept, dropped = a["violations kept"], a["violations dropped"]
            out += [f"Dropping the violations moved test protocol {kept['test_protocol']:.3f} -> "
                    f"{dropped['test_protocol']:.3f} and correctness {kept['test_correctness']:.3f} -> "
                    f"{dropped['test_correctness']:.3f} (means over the seeds).", ""]
        pairs = [(k, f"{k}, augmented") for k in ("violations kept", "violations dropped") if f"{k}, augmented" in a]
        if pairs:
            moves = [f"{a[w]['suite_phrasings'] - a[k]['suite_phrasings']:+.3f} with the {k.split()[1]} violations"
                     for k, w in pairs]
            out += [f"Augmentation moved the pass rate on unseen phrasings by {' and '.join(moves)}.", ""]
    if j := results.get("data_jobs"):
        out += [f"The whole example job (SFT, then GRPO), commit `{j['commit']}`:", "",
                "| protocol violations | phase | steps | test protocol | test correctness | suite `protocol` | suite `phrasings` |",
                "| --- | --- | --- | --- | --- | --- | --- |"]
        for violations, phases in j["jobs"].items():
            for phase, r in phases.items():
                out.append(f"| {'kept' if violations == 'report' else 'dropped'} | {phase} | {r['steps']} | "
                           f"{r['protocol']:.3f} | {r['correctness']:.3f} | {r['suite_protocol']:.3f} | "
                           f"{r['suite_phrasings']:.3f} |")
        out.append("")
        if "drop" in j["jobs"] and {"sft", "grpo"} <= set(j["jobs"]["drop"]):
            sft, grpo = j["jobs"]["drop"]["sft"], j["jobs"]["drop"]["grpo"]
            gain = {m: grpo[m] - sft[m] for m in ("protocol", "correctness")}
            verdict = ("so GRPO still earns its place: it trains on rewards for right answers, which clean "
                       "demonstrations alone do not give" if max(gain.values()) > 0.01 else
                       "so on clean data GRPO adds nothing measurable here: its gain came from undoing the prose answers")
            out += [f"With the violations dropped, GRPO moved test protocol by {gain['protocol']:+.3f} and correctness "
                    f"by {gain['correctness']:+.3f} over SFT, {verdict}.", ""]
    return "\n".join(out) or "not measured yet"


def replace(text: str, begin: str, end: str, body: str, readme: Path) -> str:
    if begin not in text or end not in text:
        raise SystemExit(f"{readme}: no {begin} ... {end} section to write the figures into")
    return re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: f"{begin}\n{body}\n{end}", text, flags=re.DOTALL)


def main(args) -> None:
    results = {p.stem: json.loads(p.read_text()) for p in sorted(args.results.glob("*.json"))}
    timings = {k: v for k, v in results.items() if k not in STUDY_FILES + OWN_SECTION}
    text = args.readme.read_text()
    args.readme.write_text(replace(text, BEGIN, END, render(timings, args.results), args.readme))
    text = args.study.read_text()
    args.study.write_text(replace(text, STUDY_BEGIN, STUDY_END, render_study(results), args.study))
    print(f"{args.readme}, {args.study}: benchmark figures from {', '.join(results)}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--readme", type=Path, default=REPO / "docs" / "benchmarks.md", help="the benchmark table's page")
    ap.add_argument("--study", type=Path, default=REPO / "docs" / "data.md", help="the data study's page")
    main(ap.parse_args())
