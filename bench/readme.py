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
    cpus = sorted({r.get("cpus") for r in results.values()})
    out.append(f"Measured on {', '.join(map(str, cpus))} CPU core(s); JSON files in `bench/results/`.")
    return "\n".join(out)


def main(args) -> None:
    results = {p.stem: json.loads(p.read_text()) for p in sorted(args.results.glob("*.json"))}
    text = args.readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{args.readme}: no {BEGIN} ... {END} section to write the figures into")
    new = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: f"{BEGIN}\n{render(results)}\n{END}", text,
                 flags=re.S)
    args.readme.write_text(new)
    print(f"{args.readme}: benchmark figures from {', '.join(results)}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--readme", type=Path, default=REPO / "README.md")
    main(ap.parse_args())
