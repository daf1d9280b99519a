"""``tuneloop watch RUN``: a live terminal view of a run, attached from any terminal.

It replays the run's stream from the start (so it shows the history of a run it joins late)
and then follows it live: progress, loss / lr / reward / validation curves as sparklines, the
latest verdict by category, controls pending and answered, the guarded control under watch
(then confirmed or rolled back), proposals waiting for approval, and how the run ended.
``WatchView`` only folds events into state and renders it; the bus part is ``watch``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

from rich.console import Group
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from ..events import (CheckpointRecorded, Control, ControlApplied, ControlConfirmed, ControlRejected, ControlRolledBack,
                     DatasetReady, DeadLetter, EvalVerdict, Event, ExportDone, Feedback, Proposal, ProposalResolved,
                     RunForked, StepMetrics, TrainingFinished)
from ..task import shown_of
from .progress import Progress

KINDS = (RunForked, DatasetReady, StepMetrics, CheckpointRecorded, EvalVerdict, Feedback, Control, ControlApplied,
         ControlRejected, ControlRolledBack, ControlConfirmed, Proposal, ProposalResolved, TrainingFinished, ExportDone)
BARS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 48) -> str:
    """The last ``width`` values as block characters, scaled between their min and max."""
    values = [v for v in values if v is not None][-width:]
    if not values:
        return ""
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(BARS[min(int((v - lo) / span * (len(BARS) - 1) + 0.5), len(BARS) - 1)] for v in values)


@dataclass
class WatchView:
    run_id: str
    step: int = 0
    max_steps: int = 0
    paused: bool = False
    method: str = ""
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    val: list[EvalVerdict] = field(default_factory=list)
    latest: EvalVerdict | None = None
    feedback: Feedback | None = None
    pending: dict[str, Control] = field(default_factory=dict)
    answered: deque = field(default_factory=lambda: deque(maxlen=6))
    checkpoints: int = 0
    guarded: ControlApplied | None = None  # the guarded control under watch
    proposals: dict[str, Proposal] = field(default_factory=dict)  # open ones
    dataset: str = ""
    finished: TrainingFinished | None = None
    exported: ExportDone | None = None
    forked: RunForked | None = None  # this run is a fork: of which run, at which step

    def update(self, e: Event) -> None:
        if isinstance(e, StepMetrics):
            self.step, self.max_steps, self.paused, self.method = e.step, e.max_steps, e.paused, e.method
            if e.loss is not None:
                self.losses.append(e.loss)
                self.lrs.append(e.learning_rate)
                if e.reward is not None:
                    self.rewards.append(e.reward)
        elif isinstance(e, EvalVerdict):
            self.latest = e
            if e.purpose == "periodic" and e.split == "val":
                self.val.append(e)
        elif isinstance(e, Control):
            self.pending[e.event_id] = e
        elif isinstance(e, (ControlApplied, ControlRejected, ControlRolledBack, ControlConfirmed)):
            self.pending.pop(e.control_id, None)
            self.answered.append(e)
            if isinstance(e, ControlApplied) and e.command in ("pause", "resume"):
                self.paused = e.command == "pause"
            if isinstance(e, ControlApplied) and e.guard:
                self.guarded = e
            elif isinstance(e, (ControlRolledBack, ControlConfirmed)) and self.guarded and self.guarded.control_id == e.control_id:
                self.guarded = None
        elif isinstance(e, Proposal):
            if e.control_id:
                self.pending.pop(e.control_id, None)
            self.proposals[e.event_id] = e
        elif isinstance(e, ProposalResolved):
            self.proposals.pop(e.proposal_id, None)
            if e.outcome != "unknown":
                self.answered.append(e)
        elif isinstance(e, Feedback):
            self.feedback = e
        elif isinstance(e, CheckpointRecorded):
            self.checkpoints += 1
        elif isinstance(e, DatasetReady):
            self.dataset = e.dataset_id
        elif isinstance(e, RunForked) and e.child == self.run_id:
            self.forked = e
        elif isinstance(e, TrainingFinished):
            self.finished = e
        elif isinstance(e, ExportDone):
            self.exported = e

    @property
    def state(self) -> str:
        if self.finished:
            return f"finished at step {self.finished.step}: {self.finished.reason} ({self.finished.detail})"
        return "paused" if self.paused else ("training" if self.losses else "starting")

    def __rich__(self) -> Group:
        head = Table.grid(padding=(0, 2))
        head.add_row(Text(f"run {self.run_id}", style="bold cyan"), Text(self.state, style="bold"),
                     Text(f"{self.method} · data {self.dataset or '-'} · {self.checkpoints} checkpoints"))
        if self.forked:
            f = self.forked
            head.add_row(Text(f"forked from {f.parent}", style="cyan"), Text(f"at step {f.step}"),
                         Text(("weights only" if f.weights_only else "full state")
                              + (f" · changed {f.changed}" if f.changed else "")))
        bar = Table.grid(padding=(0, 1))
        bar.add_row(ProgressBar(total=self.max_steps or 1, completed=self.step, width=50),
                    Text(f"step {self.step}/{self.max_steps}"))
        curves = Table("curve", "last", "history", box=None, padding=(0, 1))
        curves.add_row("loss", _fmt(self.losses), sparkline(self.losses))
        curves.add_row("lr", _fmt(self.lrs, ".2e"), sparkline(self.lrs))
        if self.rewards:
            curves.add_row("reward", _fmt(self.rewards), sparkline(self.rewards))
        shown = shown_of(self.val[-1].scores) if self.val else []
        for metric in shown:
            scores = [v.scores.get(metric) for v in self.val]
            curves.add_row(f"val {metric}", _fmt(scores), sparkline([s for s in scores if s is not None]))
        parts = [head, bar, curves]
        if self.latest:
            v = self.latest
            names = shown_of(v.scores)
            cats = "  ".join(f"{c} " + "/".join(f"{s.get(m, 0):.2f}" for m in names) for c, s in sorted(v.by_category.items()))
            parts.append(Text(f"latest verdict: step {v.step} {v.split} ({cases_of(v)}) "
                              + "  ".join(f"{m} {scored(v, m)}" for m in names)
                              + (f" · by category ({'/'.join(names)}): {cats}" if len(v.by_category) > 1 else "")))
        if self.feedback:
            parts.append(Text(f"feedback after step {self.feedback.step}: {self.feedback.action} ({self.feedback.reason})"))
        controls = Table("control", "value", "answer", box=None, padding=(0, 1))
        for c in self.pending.values():
            controls.add_row(c.command, str(c.value if c.value is not None else ""), Text("pending", style="yellow"))
        for a in self.answered:
            if isinstance(a, ControlApplied):
                guarded = f", guard {a.guard!r} watching {a.within} verdict(s)" if a.guard else ""
                controls.add_row(a.command, f"{a.old!r} -> {a.new!r}", Text(f"applied at step {a.step}{guarded}", style="green"))
            elif isinstance(a, ControlRolledBack):
                controls.add_row(a.command, repr(a.value), Text(
                    f"ROLLED BACK at step {a.step} to step {a.savepoint_step}: guard {a.guard!r} broken by the verdict of "
                    f"step {a.verdict_step}", style="bold red"))
            elif isinstance(a, ControlConfirmed):
                controls.add_row(a.command, "", Text(f"confirmed at step {a.step}: guard {a.guard!r} held on verdicts "
                                                     f"of steps {a.verdict_steps}", style="green"))
            elif isinstance(a, ProposalResolved):
                controls.add_row(f"proposal {a.command}", "", Text(
                    f"{a.outcome} by {a.by} at step {a.step}: {'applied' if a.applied else 'not applied'}",
                    style="green" if a.applied else "yellow"))
            else:
                controls.add_row(a.command, "", Text(f"rejected at step {a.step}: {a.reason}", style="red"))
        if controls.row_count:
            parts.append(controls)
        if self.guarded:
            g = self.guarded
            parts.append(Text(f"guard: {g.command} {g.new!r} (applied at step {g.step}) is kept only while the next "
                              f"{g.within} verdict(s) meet {g.guard!r}; savepoint at step {g.savepoint_step}", style="yellow"))
        if self.proposals:
            props = Table("open proposal", "what", "why", "unanswered", box=None, padding=(0, 1))
            for p in self.proposals.values():
                props.add_row(p.event_id, f"{p.command} {p.value if p.value is not None else ''}".strip() + f" (by {p.proposer})",
                              p.reason, f"{p.on_timeout} after {p.timeout_s:g}s")
            parts.append(props)
            parts.append(Text(f"answer with: tuneloop approve|reject {self.run_id} ID [--reason ...]", style="yellow"))
        if self.exported:
            parts.append(Text(f"exported step {self.exported.step}: {self.exported.merged_path or self.exported.adapter_path}"))
        return Group(Panel(Group(*parts), title="tuneloop watch", border_style="blue"))


def _fmt(values: list, spec: str = ".4f") -> str:
    values = [v for v in values if v is not None]
    return format(values[-1], spec) if values else "-"


def log_event(ev: Event, console) -> None:
    """One line in the run's log for the events worth one (the embedded runner prints them above its live view)."""
    if isinstance(ev, DatasetReady):
        console.log(f"data set {ev.dataset_id}: " + ", ".join(f"{k} {v.rows}" for k, v in ev.splits.items())
                    + (f" ({ev.rejected_rows} rows rejected)" if ev.rejected_rows else ""))
    elif isinstance(ev, CheckpointRecorded):
        console.log(f"checkpoint step {ev.step} recorded ({ev.bytes / 1e6:.1f} MB, sha256 {ev.sha256[:12]})")
    elif isinstance(ev, EvalVerdict):
        console.log(f"verdict step {ev.step} ({ev.split}, {cases_of(ev)}): "
                    + "".join(f"{m} {scored(ev, m)}  " for m in shown_of(ev.scores)) + f"tokens {ev.mean_new_tokens:.1f}")
    elif isinstance(ev, Feedback):
        console.log(f"feedback after step {ev.step}: [bold]{ev.action}[/] ({ev.reason})")
    elif isinstance(ev, (ControlApplied, ControlRejected)):
        what = "applied" if isinstance(ev, ControlApplied) else f"rejected: {ev.reason}"
        console.log(f"control {ev.command} {what} at step {ev.step}")
    elif isinstance(ev, ControlRolledBack):
        console.log(f"[red]rolled back[/] {ev.command} at step {ev.step} to the savepoint at step {ev.savepoint_step}: "
                    f"guard {ev.guard!r} broken by the verdict of step {ev.verdict_step} {ev.metrics}")
    elif isinstance(ev, ControlConfirmed):
        console.log(f"confirmed {ev.command}: guard {ev.guard!r} held on the verdicts of steps {ev.verdict_steps}")
    elif isinstance(ev, Proposal):
        console.log(f"[yellow]proposal[/] {ev.event_id}: {ev.command} by {ev.proposer} ({ev.reason}); "
                    f"`tuneloop approve {ev.run_id} {ev.event_id}`")
    elif isinstance(ev, ProposalResolved):
        console.log(f"proposal {ev.proposal_id} {ev.outcome} by {ev.by}: {'applied' if ev.applied else 'not applied'}")
    elif isinstance(ev, TrainingFinished):
        console.log(f"training finished at step {ev.step}: {ev.reason} ({ev.detail})")
    elif isinstance(ev, DeadLetter):
        console.log(f"[red]dead letter[/] from {ev.service} on {ev.subject}: {ev.reason}")
    elif isinstance(ev, ExportDone):
        console.log(f"exported step {ev.step}: adapter {ev.adapter_path}, merged {ev.merged_path}")


async def watch(url: str, run_id: str, console, *, exit_when_done: bool = True) -> WatchView:
    """Show the run live until it has finished and exported (or Ctrl-C)."""
    from rich.live import Live

    from ..bus import CONNECT_PATIENCE_S, Bus

    view = WatchView(run_id)
    # Over once exported (its verdict is not waited for), failed or pruned; an interrupted
    # trainer resumes when started again: keep watching.
    progress = Progress(run_id, wants_verdict=False, interrupted_ends=False)
    bus = await Bus.connect(url, "watch", patience=CONNECT_PATIENCE_S)
    try:
        async def on(e: Event) -> None:
            view.update(e)
            progress.update(e)

        for cls in KINDS:
            await bus.follow(cls, run_id, on)
        with Live(view, console=console, refresh_per_second=4, transient=False):
            while not (exit_when_done and progress.outcome):
                await asyncio.sleep(0.25)
            await asyncio.sleep(0.5)  # the last events, rendered once more
    finally:
        await bus.close()
    return view


def cases_of(v: EvalVerdict) -> str:
    """``48 cases``, or ``16 of 96 cases`` for a sequential verdict that ended early."""
    return f"{v.cases} of {v.planned} cases" if v.planned and v.cases < v.planned else f"{v.cases} cases"


def scored(v: EvalVerdict, metric: str) -> str:
    """A score with its bound where the verdict has one: ``0.625 [0.48, 0.75]``."""
    bound = v.bounds.get(metric)
    return f"{v.scores[metric]:.3f}" + (f" [{bound[0]:.2f}, {bound[1]:.2f}]" if bound else "")
