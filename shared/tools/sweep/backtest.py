"""Backtesting a sweep's pruner: which trials other settings would have pruned, and whether
the winner would have survived.

The sweep's stream keeps every trial's verdicts and ends with their times. ``run_pruner``
replays them in the order they happened through the scheduler the sweep driver runs
(``schedulers.OptunaScheduler``), with the pruner settings asked for, judging the running
trials again whenever one ends, as the driver does. With the sweep's own
settings it gives back the live prune decisions (a test holds it to that).

What the recording cannot say is said, not guessed: a trial pruned live that the replayed
settings would have kept has no verdicts past its prune, so its end is "past the recording".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from . import search
from .schedulers import OptunaScheduler, View
from .search import TrialRecord
from .spec import Pruner, SweepSpec


@dataclass
class Trace:
    """One trial as recorded: its verdicts (time, step, score) and when and how it ended."""

    record: TrialRecord
    verdicts: list[tuple[datetime, int, float]]
    ended: datetime | None  # None: still running when the recording stops
    prune_sent: datetime | None = None  # when the sweep sent its prune control


@dataclass
class Fate:
    number: int
    pruned_at: int | None = None   # the verdict step at which the pruner said "prune"
    value: float | None = None     # its test value, when it completes in the replay
    unknown: bool = False          # kept by the replay but pruned live: its end is past the recording


@dataclass
class PrunerReplay:
    pruner: Pruner
    fates: dict[int, Fate] = field(default_factory=dict)

    @property
    def pruned(self) -> list[int]:
        return sorted(n for n, f in self.fates.items() if f.pruned_at is not None)

    def winner(self) -> int | None:
        """The best trial among those the replay completes (unknown ones cannot compete)."""
        done = [f for f in self.fates.values() if f.value is not None]
        return max(done, key=lambda f: (f.value, -f.number)).number if done else None


def traces(records: list[TrialRecord], events: dict[str, list], metric: str) -> list[Trace]:
    """Each trial's trace from its recorded events (``events``: run id -> its verdicts, its
    prune controls, its train.done, export and release events): a verdict redelivered counts
    once, at its first time; a trial ends at the last of those events (the driver tells it then)."""
    from ...events import Control, EvalVerdict

    out = []
    for r in sorted(records, key=lambda r: r.number):
        evs = events.get(r.run_id, [])
        first: dict[int, tuple[datetime, int, float]] = {}
        for e in sorted((e for e in evs if isinstance(e, EvalVerdict) and e.purpose == "periodic"), key=lambda e: e.time):
            first.setdefault(e.step, (e.time, e.step, e.scores.get(metric, 0.0)))
        prunes = sorted(e.time for e in evs if isinstance(e, Control) and e.command == "prune")
        ends = [e.time for e in evs if not isinstance(e, (EvalVerdict, Control)) or getattr(e, "purpose", "") == "final"]
        out.append(Trace(r, sorted(first.values()), max(ends) if r.state != "running" and ends else None,
                         prunes[0] if prunes else None))
    return out


def live_prunes(traces: list[Trace]) -> dict[int, int]:
    """Trial -> the verdict step its live prune decision was made at (the trainer stops some
    steps later): as the sweep recorded it (``judged_at``), else, for records older than
    that field, the last verdict published before the sweep sent the prune."""
    out = {}
    for t in traces:
        if t.record.state == "pruned" and t.record.judged_at is not None:
            out[t.record.number] = t.record.judged_at
        elif t.record.state == "pruned" and t.prune_sent is not None:
            steps = [s for when, s, _ in t.verdicts if when <= t.prune_sent]
            if steps:
                out[t.record.number] = max(steps)
    return out


def run_pruner(spec: SweepSpec, pruner: Pruner, traces: list[Trace]) -> PrunerReplay:
    """The recorded verdicts and ends, in time order, through the scheduler the sweep driver
    runs (``schedulers.OptunaScheduler``) with ``pruner``: each end, recorded or a replayed
    prune, judges the trials still training again, as live."""
    sched = OptunaScheduler(spec.model_copy(update={"pruner": pruner}), metric="")
    records = [t.record.model_copy(update={"state": "running", "values": {}}) for t in sorted(traces, key=lambda t: t.record.number)]
    sched.restore(records)
    by_number = {t.record.number: t for t in traces}
    replayed = {r.number: r for r in records}
    out = PrunerReplay(pruner, {n: Fate(n) for n in by_number})
    stopped: set[int] = set()  # pruned by the replay, or ended

    def view() -> View:
        return View(records, set(replayed) - stopped)

    def carry_out(decisions) -> None:
        for d in decisions:
            if d.trial not in stopped:
                out.fates[d.trial].pruned_at = d.step
                stopped.add(d.trial)
                replayed[d.trial].state = "pruned"
                carry_out(sched.on_end(replayed[d.trial], view()))

    happenings = sorted([(when, 0, n, step, score) for n, t in by_number.items() for when, step, score in t.verdicts]
                        + [(t.ended, 1, n, None, None) for n, t in by_number.items() if t.ended is not None])
    for _, kind, n, step, score in happenings:
        if n in stopped:
            continue
        r = replayed[n]
        if kind == 0:
            r.values[step] = score
            carry_out(sched.on_verdict(r, step, score, view()))
            continue
        recorded = by_number[n].record
        stopped.add(n)
        r.state, r.value = recorded.state, recorded.value
        if recorded.state == "complete":
            out.fates[n].value = recorded.value
        elif recorded.state == "pruned":
            out.fates[n].unknown = True  # the replay kept it; the recording stops where live pruned it
        carry_out(sched.on_end(r, view()))
    return out


def parse_pruners(text: str, base: Pruner, warmup_steps: int | None = None,
                  startup_trials: int | None = None) -> list[Pruner]:
    """``percentile:25|median|none`` (alternatives: a grid) on top of ``base``, with the
    warm-up and start-up given; ValueError names what is wrong. Empty: the sweep's own."""
    out = []
    for part in (text.split("|") if text else [""]):
        kind, _, arg = part.strip().partition(":")
        raw = base.model_dump()
        if kind:
            raw["kind"] = kind
        if arg:
            if kind != "percentile":
                raise ValueError(f"{part!r}: only percentile takes a value (percentile:25)")
            raw["percentile"] = arg
        if warmup_steps is not None:
            raw["warmup_steps"] = warmup_steps
        if startup_trials is not None:
            raw["startup_trials"] = startup_trials
        try:
            out.append(Pruner.model_validate(raw))
        except Exception as e:  # pydantic names the field and the value
            raise ValueError(f"pruner {part!r}: {e}") from None
    return out


@dataclass
class Row:
    """One pruner setting against the live sweep."""

    pruner: Pruner
    replay: PrunerReplay
    winner_survives: bool | None  # None: no live winner
    steps: int            # steps the trials would have trained (a lower bound when ``unknown``)
    unknown: bool         # some trial would have trained past the recording
    steps_saved: int | None
    same_as_live: bool


def compare(spec: SweepSpec, records: list[TrialRecord], traces_: list[Trace], tries: list[Pruner]) -> list[Row]:
    """Each pruner of ``tries`` replayed, against what the live sweep did."""
    live, winner = live_prunes(traces_), search.best(records)
    lived = sum(r.steps or 0 for r in records)
    # A prune is applied at a step boundary after its verdict: the live lag, added to replayed prunes.
    lags = sorted((r.steps or 0) - live[r.number] for r in records if r.number in live)
    lag = lags[len(lags) // 2] if lags else 0
    rows = []
    for p in tries:
        out = run_pruner(spec, p, traces_)
        steps, unknown = 0, False
        for r in records:
            f = out.fates[r.number]
            if f.pruned_at is not None:
                steps += r.steps if live.get(r.number) == f.pruned_at else min(f.pruned_at + lag, r.steps or f.pruned_at)
            elif f.unknown:
                unknown = True
            else:
                steps += r.steps or 0
        rows.append(Row(p, out, None if winner is None else out.fates[winner.number].pruned_at is None, steps, unknown,
                        None if unknown else lived - steps,
                        {n: f.pruned_at for n, f in out.fates.items() if f.pruned_at is not None} == live))
    return rows


def describe(p: Pruner) -> str:
    kind = f"percentile:{p.percentile:g}" if p.kind == "percentile" else p.kind
    return f"{kind} (warm-up {p.warmup_steps}, start-up {p.startup_trials})"
