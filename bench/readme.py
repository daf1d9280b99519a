"""Write the README's benchmark figures from ``bench/results/*.json`` (what ``make bench`` wrote).

The figures in the README are never typed in: this script renders the part between
``<!-- bench:begin -->`` and ``<!-- bench:end -->`` from the JSON files, each with the commit
it measured. ``make bench`` runs it last.

    .venv/bin/python bench/readme.py [--results bench/results] [--readme README.md]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
# The data study (bench/data_study.py): scores, not timings, in the README's Data quality section.
STUDY_BEGIN, STUDY_END = "<!-- data-study:begin -->", "<!-- data-study:end -->"
STUDY_FILES = ("data_study", "data_jobs")
# Written into the Quick start by bench/fresh_demo.py itself, not into the benchmark table.
OWN_SECTION = ("fresh_demo",)
# (file, key, target as text, is it met)
TARGETS = [
    ("feedback_loop", "remote_over_inline_shared", "<= 1.05", lambda v: v <= 1.05),
    ("feedback_loop", "remote_over_inline_own_core", "<= 0.75", lambda v: v <= 0.75),
    ("sweep", "tuneloop_over_baseline", "<= 0.7", lambda v: v <= 0.7),
    ("trainer_overhead", "ratio_of_medians", ">= 0.97", lambda v: v >= 0.97),
    ("startup", "first_step_over_plain", "<= 1.5", lambda v: v <= 1.5),
]
SPREAD = {"remote_over_inline_shared": ("remote_over_inline_shared_min", "remote_over_inline_shared_max"),
          "remote_over_inline_own_core": ("remote_over_inline_own_core_min", "remote_over_inline_own_core_max")}


def render(results: dict[str, dict]) -> str:
    lines = ["| bench | key | target | measured | commit |", "| --- | --- | --- | --- | --- |"]
    for name, key, target, met in TARGETS:
        r = results.get(name)
        if r is None or r.get(key) is None:
            lines.append(f"| `bench/{name}.py` | `{key}` | {target} | not measured | |")
            continue
        lo, hi = SPREAD.get(key, ("ratio_min", "ratio_max"))
        spread = f" ({r[lo]:.3f} – {r[hi]:.3f})" if lo in r and hi in r else ""
        verdict = "" if met(r[key]) else ": missed"
        lines.append(f"| `bench/{name}.py` | `{key}` | {target} | **{r[key]:.3f}**{spread}{verdict} | `{r['commit']}` |")
    out = ["\n".join(lines), ""]
    if f := results.get("feedback_loop"):
        out += [f"Feedback loop ({f['rounds']} paired rounds, {f['steps']} steps, evaluation every {f['eval_every']} "
                f"steps of {f['cases']} cases, up to {f['max_new_tokens']} tokens): inline evaluation was "
                f"{f['inline_eval_share_shared']:.0%} of the inline loop (shared) and {f['inline_eval_share_own_core']:.0%} "
                f"(own core); `eval_scaling_1_to_2` {f['eval_scaling_1_to_2']:.2f}; snapshot saved -> feedback applied, "
                "per stage (medians):", "", "```"]
        out += [f"{stage:58s} {seconds * 1000:8.1f} ms" for stage, seconds in f["stages_s"].items()]
        out += ["```", ""]
    if s := results.get("sweep"):
        out += [f"Sweep ({s['trials']} trials of {s['steps']} steps, {len(s['rounds'])} rounds), wall seconds:", "", "```"]
        for i, r in enumerate(s["rounds"], 1):
            out.append(f"round {i}: baseline {r['baseline_s']:6.1f} s ({r['baseline_pruned']} pruned, best test "
                       f"{r['baseline_best_test']})  tuneloop {r['tuneloop_s']:6.1f} s ({r['tuneloop_pruned']} pruned, "
                       f"best test {r['tuneloop_best_test']})  ratio {r['ratio']:.3f}")
        if s.get("plain_sequential_s"):
            out.append(f"plain sequential TRL: {s['plain_sequential_s']:.1f} s (best test {s['plain_best_test']}); "
                       f"tuneloop / plain {s['tuneloop_over_plain']:.3f}")
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
                f"script, {u['tuneloop_s']:.1f} s for `tuneloop run` (medians).", ""]
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
    return re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: f"{begin}\n{body}\n{end}", text, flags=re.S)


def main(args) -> None:
    results = {p.stem: json.loads(p.read_text()) for p in sorted(args.results.glob("*.json"))}
    text = args.readme.read_text()
    timings = {k: v for k, v in results.items() if k not in STUDY_FILES + OWN_SECTION}
    text = replace(text, BEGIN, END, render(timings), args.readme)
    text = replace(text, STUDY_BEGIN, STUDY_END, render_study(results), args.readme)
    args.readme.write_text(text)
    print(f"{args.readme}: benchmark figures from {', '.join(results)}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--readme", type=Path, default=REPO / "README.md")
    main(ap.parse_args())
