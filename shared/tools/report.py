"""Training-curve report of a run: a PNG (loss, lr, reward, eval scores over steps, controls
marked, the steps a rollback discarded shaded) and an HTML page with the same plus the
guarded controls, the proposals and how each ended, the run's config and summary.

The events come from ``<run>/timeline.jsonl`` (written by the embedded runner) or, for runs
deployed elsewhere, from the run's stored stream (``stored_events``). Building the timeline is
pure; only ``write_png`` / ``write_html`` touch files.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..storage import RunDir
from ..task import goal, shown_of
from ..events import (BY_KIND, CheckpointRecorded, ControlApplied, ControlConfirmed, ControlRolledBack, DatasetReady,
                     EvalVerdict, Event, Proposal, ProposalResolved, StepMetrics)

TIMELINE_FILE = "timeline.jsonl"
BACKTEST_FILE = "backtest.json"  # written by `tuneloop replay RUN --grid`: the trade-off table
KINDS = (StepMetrics, EvalVerdict, ControlApplied, ControlRolledBack, ControlConfirmed, Proposal, ProposalResolved,
         CheckpointRecorded, DatasetReady)


@dataclass
class Timeline:
    run_id: str
    steps: list[StepMetrics] = field(default_factory=list)
    verdicts: list[EvalVerdict] = field(default_factory=list)  # periodic, on the validation split
    controls: list[ControlApplied] = field(default_factory=list)
    checkpoints: list[int] = field(default_factory=list)
    datasets: list[DatasetReady] = field(default_factory=list)  # what the data-quality gate found in each
    rollbacks: list[ControlRolledBack] = field(default_factory=list)
    confirmed: list[ControlConfirmed] = field(default_factory=list)
    proposals: list[Proposal] = field(default_factory=list)
    resolved: dict[str, ProposalResolved] = field(default_factory=dict)  # proposal id -> how it ended

    @classmethod
    def of(cls, run_id: str, events: list[Event]) -> "Timeline":
        t = cls(run_id)
        for e in sorted(events, key=lambda e: e.time):
            if isinstance(e, StepMetrics) and e.loss is not None:
                t.steps.append(e)
            elif isinstance(e, ControlRolledBack):  # what was trained after the savepoint is not the run's any more
                t.rollbacks.append(e)
                t.steps = [s for s in t.steps if s.step <= e.savepoint_step]
                t.verdicts = [v for v in t.verdicts if v.step <= e.savepoint_step]
            elif isinstance(e, ControlConfirmed):
                t.confirmed.append(e)
            elif isinstance(e, Proposal):
                t.proposals.append(e)
            elif isinstance(e, ProposalResolved):
                t.resolved[e.proposal_id] = e
            elif isinstance(e, EvalVerdict) and e.purpose == "periodic":
                t.verdicts.append(e)
            elif isinstance(e, ControlApplied):
                t.controls.append(e)
            elif isinstance(e, CheckpointRecorded):
                t.checkpoints.append(e.step)
            elif isinstance(e, DatasetReady) and all(d.dataset_id != e.dataset_id for d in t.datasets):
                t.datasets.append(e)
        return t


def write_timeline(path: Path, events: list[Event]) -> None:
    path.write_text("".join(timeline_line(e) for e in events))


def timeline_line(e: Event) -> str:
    return json.dumps({"kind": e.KIND, "event": e.model_dump(mode="json")}) + "\n"


def read_timeline(path: Path) -> list[Event]:
    """The events of a timeline file; a line that no longer parses is named, not skipped."""
    events = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            events.append(BY_KIND[row["kind"]].model_validate(row["event"]))
        except (ValueError, KeyError) as e:
            raise ValueError(f"{path}:{n}: not a timeline event: {e}") from None
    return events


async def stored_events(bus, run_id: str, settle_s: float = 1.0, kinds: tuple = KINDS) -> list[Event]:
    """Every event of ``kinds`` the stream still holds for ``run_id`` (in order within a kind)."""
    import asyncio

    events: list[Event] = []

    async def keep(e: Event) -> None:
        events.append(e)

    subs = [await bus.follow(cls, run_id, keep) for cls in kinds]
    seen = -1
    while seen != len(events):  # replay until nothing new arrives for settle_s
        seen = len(events)
        await asyncio.sleep(settle_s)
    for s in subs:
        await s.unsubscribe()
    return events


def write_png(t: Timeline, path: Path, parent: tuple[str, int, list] | None = None) -> Path:
    """The run's curves; a full-state fork's ``parent`` (its run, the fork step, its steps up
    to there) drawn in grey before them, so the child reads as the branch it is."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rewards = [s for s in t.steps if s.reward is not None]
    rows = 3 + bool(rewards)
    fig, axes = plt.subplots(rows, 1, figsize=(9, 2.6 * rows), sharex=True)
    loss, lr, scores = axes[0], axes[1], axes[-1]
    if parent:
        name, at, before = parent
        loss.plot([s.step for s in before], [s.loss for s in before], color="grey", label=f"{name} (parent)")
        for ax in axes:
            ax.axvline(at, color="black", linewidth=0.8)
        loss.annotate(f"forked from {name}", (at, 0.05), xycoords=("data", "axes fraction"), fontsize=7)
    loss.plot([s.step for s in t.steps], [s.loss for s in t.steps], color="tab:blue", label="train")
    loss.set_ylabel("loss")
    lr.plot([s.step for s in t.steps if s.learning_rate is not None],
            [s.learning_rate for s in t.steps if s.learning_rate is not None], color="tab:orange")
    lr.set_ylabel("learning rate")
    if rewards:
        axes[2].plot([s.step for s in rewards], [s.reward for s in rewards], color="tab:purple")
        axes[2].set_ylabel("GRPO reward")
    val = [v for v in t.verdicts if v.split == "val"]
    shown = shown_of(val[-1].scores) if val else []
    for metric in shown:  # fractions on the score panel; the held-out loss beside the training loss
        points = [(v.step, v.scores[metric]) for v in val if metric in v.scores]
        ax = loss if goal(metric) == "min" else scores
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                **({"label": f"val {metric}", "color": "tab:red", "linestyle": "--"} if ax is loss else {"label": metric}))
    if any(goal(m) == "min" for m in shown):
        loss.legend(loc="upper right", fontsize=7)
    scores.set_ylim(-0.02, 1.02)
    scores.set_ylabel("validation score")
    scores.set_xlabel("step")
    scores.legend(loc="lower right")
    for r in t.rollbacks:  # the discarded span: trained, then undone
        for ax in axes:
            ax.axvspan(r.savepoint_step, r.step, color="tab:red", alpha=0.15, linewidth=0)
        loss.annotate(f"{r.command} rolled back", (r.savepoint_step, 0.5), xycoords=("data", "axes fraction"),
                      fontsize=7, color="tab:red")
    for c in t.controls:
        for ax in axes:
            ax.axvline(c.step, color="grey", linestyle="--", linewidth=0.8)
        loss.annotate(c.command, (c.step, 1.0), xycoords=("data", "axes fraction"), rotation=90, fontsize=7,
                      va="top", ha="right", color="grey")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"tuneloop run {t.run_id}")
    fig.tight_layout()
    # What was drawn, in the PNG's text chunk: a reader (or a test) can check the axes came from the run.
    drawn = {"steps": [t.steps[0].step, t.steps[-1].step] if t.steps else [], "xlim": list(scores.get_xlim()),
             "panels": [ax.get_ylabel() for ax in axes], "controls": [[c.step, c.command] for c in t.controls],
             "rolled_back": [[r.savepoint_step, r.step, r.command] for r in t.rollbacks],
             "evaluations": len(val), "metrics": shown, "parent": [parent[0], parent[1]] if parent else None}
    fig.savefig(path, dpi=100, metadata={"Title": f"tuneloop run {t.run_id}", "Description": json.dumps(drawn)})
    plt.close(fig)
    return path


def quality_html(t: Timeline, examples: dict[str, dict]) -> str:
    """Per data set: the quality gate's findings and drops by reason, and the first examples
    (``examples``: dataset id -> its quality.json)."""
    esc, out = html.escape, []
    for d in t.datasets:
        q = d.quality
        if not q:
            continue
        reasons = sorted({*q.get("findings", {}), *q.get("dropped", {})})
        rows = "".join(f"<tr><td>{esc(r)}</td><td>{q['findings'].get(r, 0)}</td><td>{q['dropped'].get(r, 0)}</td>"
                       "<td style='text-align:left'>" + "<br>".join(
                           esc(f"{e['where']}: {e['detail']}") for e in examples.get(d.dataset_id, {}).get(
                               "examples", {}).get(r, [])[:3]) + "</td></tr>" for r in reasons)
        out.append(f"<h3>data set {esc(d.dataset_id)}</h3><p>{q['rows']} train rows checked; format violation rate "
                   f"{q['violation_rate']:.1%}; categories {esc(json.dumps(q['categories']))} (balance "
                   f"{q['balance']:.2f}); {d.augmented_rows} rows added by augmentation.</p><table><tr><th>finding</th>"
                   f"<th>rows</th><th>dropped</th><th>first examples</th></tr>"
                   f"{rows or '<tr><td colspan=4>none</td></tr>'}</table>")
    return "".join(out) or "<p>no data-quality report recorded</p>"


def backtest_html(backtest: dict | None) -> str:
    """The replay's trade-off table (steps saved against score lost, per setting tried)."""
    if not backtest:
        return "<p>no backtest: <code>tuneloop replay RUN --grid ...</code> writes one</p>"
    esc, rows = html.escape, backtest["rows"]
    head = "".join(f"<th>{esc(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{esc(v)}</td>" for v in r.values()) + "</tr>" for r in rows)
    return f"<p>{esc(backtest['title'])} (grid {esc(backtest['grid'])})</p><table><tr>{head}</tr>{body}</table>"


def write_html(t: Timeline, png: Path, path: Path, config_text: str = "", summary: dict | None = None,
               quality: dict[str, dict] | None = None, backtest: dict | None = None) -> Path:
    esc = html.escape
    image = base64.b64encode(png.read_bytes()).decode()
    controls = "".join(f"<tr><td>{c.step}</td><td>{esc(c.command)}</td><td>{esc(repr(c.old))}</td>"
                       f"<td>{esc(repr(c.new))}</td></tr>" for c in t.controls) or "<tr><td colspan=4>none</td></tr>"
    names = list(dict.fromkeys(m for v in t.verdicts for m in v.scores))  # every metric any verdict has, in order
    verdicts = "".join(f"<tr><td>{v.step}</td><td>{esc(v.split)}</td><td>{v.cases}</td>"
                       + "".join(f"<td>{v.scores[m]:.3f}</td>" if m in v.scores else "<td>-</td>" for m in names)
                       + "</tr>" for v in t.verdicts) or f"<tr><td colspan={3 + len(names)}>none</td></tr>"
    guards = "".join(f"<tr><td>{esc(r.command)} {esc(repr(r.value))}</td><td>{esc(r.guard)}</td>"
                     f"<td style='color:#b00'>rolled back at step {r.step} to the savepoint at step {r.savepoint_step} "
                     f"(verdict of step {r.verdict_step}: {esc(json.dumps(r.metrics))})</td></tr>" for r in t.rollbacks)
    guards += "".join(f"<tr><td>{esc(c.command)}</td><td>{esc(c.guard)}</td><td>confirmed at step {c.step} (verdicts "
                      f"of steps {c.verdict_steps})</td></tr>" for c in t.confirmed)
    props = "".join(f"<tr><td>{esc(p.event_id)}</td><td>{esc(p.command)} {esc(str(p.value or ''))}</td><td>{esc(p.proposer)}"
                    f"</td><td>{p.step}</td><td style='text-align:left'>{esc(p.reason)}</td><td>"
                    + (esc(f"{r.outcome} by {r.by} at step {r.step}: {'applied' if r.applied else 'not applied'}")
                       if (r := t.resolved.get(p.event_id)) else "open") + "</td></tr>" for p in t.proposals)
    last = t.steps[-1] if t.steps else None
    path.write_text(f"""<!doctype html>
<html><head><meta charset="utf-8"><title>tuneloop run {esc(t.run_id)}</title>
<style>body{{font-family:sans-serif;max-width:960px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}pre{{background:#f6f6f6;padding:1em;overflow:auto}}</style>
</head><body>
<h1>tuneloop run {esc(t.run_id)}</h1>
<p>{len(t.steps)} logged steps{f", last step {last.step} of {last.max_steps}, loss {last.loss:.4f}" if last else ""};
{len(t.checkpoints)} checkpoints; {len(t.verdicts)} evaluations; {len(t.controls)} controls applied.</p>
<img alt="training curves" src="data:image/png;base64,{image}">
<h2>Evaluations</h2><table><tr><th>step</th><th>split</th><th>cases</th>{"".join(f"<th>{esc(m)}</th>" for m in names)}</tr>{verdicts}</table>
<h2>Controls applied</h2><table><tr><th>step</th><th>command</th><th>old</th><th>new</th></tr>{controls}</table>
<h2>Guarded controls</h2><table><tr><th>control</th><th>guard</th><th>outcome</th></tr>{guards or "<tr><td colspan=3>none</td></tr>"}</table>
<h2>Proposals</h2><table><tr><th>id</th><th>what</th><th>by</th><th>step</th><th>why</th><th>outcome</th></tr>{props or "<tr><td colspan=6>none</td></tr>"}</table>
<h2>Data quality</h2>{quality_html(t, quality or {})}
<h2>Backtest of the feedback policy</h2>{backtest_html(backtest)}
<h2>Summary</h2><pre>{esc(json.dumps(summary, indent=2)) if summary else "(no summary: the run has not finished)"}</pre>
<h2>Config</h2><pre>{esc(config_text)}</pre>
</body></html>
""")
    return path


def fork_parent(run_dir: Path) -> tuple[str, int, list] | None:
    """A full-state fork's parent, the fork step and the parent's steps up to it (from the
    parent's timeline beside this run), or None."""
    info = run_dir / "run.json"
    lineage = json.loads(info.read_text()).get("forked_from") if info.is_file() else None
    timeline = run_dir.parent / lineage["run"] / TIMELINE_FILE if lineage else None
    if not lineage or lineage["weights_only"] or not timeline.is_file():
        return None
    steps = [e for e in read_timeline(timeline) if isinstance(e, StepMetrics) and e.loss is not None
             and e.step <= lineage["step"]]
    return lineage["run"], lineage["step"], steps


def write_report(run_dir: Path, events: list[Event], out_dir: Path | None = None) -> tuple[Path, Path]:
    """``report.png`` and ``report.html`` for the run in ``run_dir`` (into ``out_dir``, default the run's)."""
    out_dir = out_dir or run_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    t = Timeline.of(run_dir.name, events)
    if not t.steps:
        raise ValueError(f"run {run_dir.name}: no training steps recorded yet, nothing to plot")
    png = write_png(t, out_dir / "report.png", fork_parent(run_dir))
    config = run_dir / "config.yaml"
    summary = run_dir / "summary.json"
    quality = {d.dataset_id: json.loads(f.read_text()) for d in t.datasets
               if (f := RunDir(run_dir).data / d.dataset_id / "quality.json").is_file()}
    backtest = run_dir / BACKTEST_FILE
    page = write_html(t, png, out_dir / "report.html", config.read_text() if config.exists() else "",
                      json.loads(summary.read_text()) if summary.exists() else None, quality,
                      json.loads(backtest.read_text()) if backtest.exists() else None)
    return png, page
