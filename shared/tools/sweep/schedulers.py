"""Sweep schedulers: which trial to start next, and what each verdict and each end means for
the trials, decided from the trial records alone. Pure: no bus, no processes, no clock.

Shaped as Ray Tune splits a searcher (what to try) from a scheduler (what to stop): the driver
(driver.py) asks ``next_trial`` when a slot is free, tells every verdict (``on_verdict``) and
every end (``on_end``), and carries out the decisions it gets back (``Prune``, ``Resume``,
``Copy``), as the trainer's callback carries out the Steerer's effects. A restarted sweep
builds its scheduler again from the records and the state it saved (``restore``), so it
decides knowing everything that happened.

- ``OptunaScheduler``: Optuna's sampler proposes (grid, random, tpe), its pruner judges.
- ``AshaScheduler``: asynchronous successive halving over the same samplers.
- ``PbtScheduler``: population-based training (pbt.py's rules), in rounds at barriers.

A scheduler of another kind is a class with these methods, and a line in ``make``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from . import pbt, search
from .pbt import Check, PbtLog
from .search import TrialRecord
from .spec import SweepSpec, Value


# ---------------------------------------------------------------- decisions
@dataclass(frozen=True)
class Prune:
    """Stop trial ``trial``, judged on its verdict at ``step``."""

    trial: int
    step: int
    why: str
    policy: str = ""  # what decided it, as the control's audit record names it


@dataclass(frozen=True)
class Resume:
    """Trial ``trial`` waits at the barrier of ``step``: let it train on."""

    trial: int
    step: int


@dataclass(frozen=True)
class Copy:
    """The member of ``check`` stops; a fork of ``check.exploit.donor`` takes its place. The
    check itself, so that the driver can mark it refused when the fork cannot be made."""

    check: Check = field(hash=False)


Decision = Prune | Resume | Copy


@dataclass
class View:
    """What the driver knows beyond the records: the trials still training (not ended, not
    copied over). A trial whose training ended waits for its export, its record still running."""

    records: list[TrialRecord]
    training: set[int]


# ---------------------------------------------------------------- Optuna: sampler and pruner
class OptunaScheduler:
    """Optuna's sampler proposes each trial; its pruner judges each verdict at the top of the
    verdict's bound (``search.optimistic``), never at a trial's final report; each end is told
    to the study and the trials still training are judged again against it."""

    state_key: str | None = None  # nothing to save: the study is rebuilt from the records

    def __init__(self, spec: SweepSpec, metric: str):
        self.spec, self.metric = spec, metric
        self.study = None
        self.trials: dict[int, object] = {}  # trial number -> its Optuna trial, while it runs

    def describe(self) -> str:
        return f"{self.spec.total()} trials"

    def trial_overrides(self) -> dict:
        return {}

    def state(self) -> dict | None:
        return None

    def restore(self, records: list[TrialRecord], state: dict | None = None) -> list[Decision]:
        """The study rebuilt from ``records``; prunes of running trials that fell behind before the sweep died."""
        self.study = search.make_study(self.spec, drawn=len(records))
        self.trials = search.rebuild(self.study, self.spec, records)
        return [p for r in records if r.state == "running" and (p := self._judge(r)) is not None]

    def next_trial(self, records: list[TrialRecord]) -> dict[str, Value] | None:
        if len(records) >= self.spec.total():
            return None
        trial = search.ask(self.study, self.spec, search.next_params(self.spec, records))
        if trial.number != len(records):  # the study holds every recorded trial, in order
            raise RuntimeError(f"Optuna gave trial {trial.number} where the sweep has {len(records)}")
        self.trials[trial.number] = trial
        return trial.params

    def on_verdict(self, record: TrialRecord, step: int, score: float, view: View) -> list[Decision]:
        trial = self.trials.get(record.number)
        if trial is None:
            return []
        behind = search.report(trial, step, score, search.upper_of(record, step))
        return [self._prune(record, step, score)] if behind and search.prunable(record, step) else []

    def on_end(self, record: TrialRecord, view: View) -> list[Decision]:
        trial = self.trials.pop(record.number, None)
        if trial is not None:
            search.tell(self.study, trial, record)
        return [p for r in view.records if r.number in view.training and (p := self._judge(r)) is not None]

    def poll(self, view: View) -> list[Decision]:
        return []

    def _judge(self, record: TrialRecord) -> Prune | None:
        """``record`` judged again at its latest verdict (the others' results changed)."""
        trial = self.trials.get(record.number)
        if trial is None or not record.values:
            return None
        step = max(record.values)
        if search.prunable(record, step) and trial.should_prune():
            return self._prune(record, step, record.values[step])
        return None

    def _prune(self, record: TrialRecord, step: int, score: float) -> Prune:
        return Prune(record.number, step, f"{self.metric} {score:.3f} on val at step {step} fell behind "
                                          f"({self.spec.pruner.kind} pruner)", f"{self.spec.pruner.kind} pruner")


# ---------------------------------------------------------------- asynchronous successive halving
class AshaScheduler(OptunaScheduler):
    """Asynchronous successive halving (Li et al. 2018; Ray Tune's ``ASHAScheduler``): rungs at
    ``min_steps * reduction_factor**k`` steps. A trial's first verdict at or past a rung is its
    report there; it trains on only if that report (its upper bound, where verdicts have bounds)
    is at least the ``1 - 1/reduction_factor`` quantile of the reports the other trials made at
    that rung so far. The first trial at a rung always goes on. Optuna only samples."""

    def describe(self) -> str:
        a = self.spec.asha
        return f"{self.spec.total()} trials, successive halving from step {a.min_steps} by {a.reduction_factor:g}"

    def restore(self, records: list[TrialRecord], state: dict | None = None) -> list[Decision]:
        super().restore(records, state)  # the study's pruner is none: it samples only
        view = View(records, {r.number for r in records if r.state == "running"})
        return [p for r in records if r.state == "running" and r.values
                and (p := self._judge_at(r, max(r.values), view)) is not None]

    def on_verdict(self, record: TrialRecord, step: int, score: float, view: View) -> list[Decision]:
        p = self._judge_at(record, step, view)
        return [p] if p else []

    def on_end(self, record: TrialRecord, view: View) -> list[Decision]:
        trial = self.trials.pop(record.number, None)
        if trial is not None:
            search.tell(self.study, trial, record)
        return []  # a rung's cut-off only ever looks at the reports made before

    def rungs(self, budget: float) -> list[int]:
        a, out = self.spec.asha, []
        r = float(a.min_steps)
        while r < budget:
            out.append(int(round(r)))
            r *= a.reduction_factor
        return out

    def _judge_at(self, record: TrialRecord, step: int, view: View) -> Prune | None:
        if not search.prunable(record, step):
            return None
        for rung in reversed(self.rungs(record.budget or math.inf)):
            if report_step(record, rung) != step:
                continue
            others = [r.values[s] for r in view.records if r.number != record.number
                      and (s := report_step(r, rung)) is not None]
            if not others:
                return None
            cut = quantile(others, 1 - 1 / self.spec.asha.reduction_factor)
            upper = search.upper_of(record, step)
            if (record.values[step] if upper is None else upper) < cut:
                return Prune(record.number, step, f"{self.metric} {record.values[step]:.3f} on val at step {step} is below "
                                                  f"rung {rung}'s cut-off {cut:.3f} (top 1/{self.spec.asha.reduction_factor:g} "
                                                  f"of {len(others)} trials; asha)", "asha")
            return None
        return None


def report_step(record: TrialRecord, rung: int) -> int | None:
    """The step of ``record``'s report at ``rung``: its first verdict at or past it."""
    return min((s for s in record.values if s >= rung), default=None)


def quantile(xs: list[float], q: float) -> float:
    """The ``q`` quantile of ``xs``, interpolated linearly (numpy's default)."""
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (pos - lo)


# ---------------------------------------------------------------- population-based training
class PbtScheduler:
    """Synchronous, as Ray Tune's PBT with ``synch=True``: a member pauses after each barrier's
    checkpoint (``train.pause_every``); once every live member's verdict at a step is in, one
    round compares them all on the same view (``pbt.decide``), and the copies fork at that very
    step. No member trains past a barrier meanwhile, so nothing is trained twice, and what the
    rounds decide does not depend on which verdict came first. The rounds are its state."""

    state_key = "pbt"

    def __init__(self, spec: SweepSpec, metric: str, cadence: int):
        self.spec, self.metric, self.cadence = spec, metric, cadence
        self.settings = spec.pbt
        self.log = PbtLog()

    @property
    def barrier(self) -> int:
        """Steps between rounds that may copy: ``interval`` verdicts of the cadence."""
        return self.settings.interval * self.cadence

    def describe(self) -> str:
        s = self.settings
        return (f"population-based training of {s.population} members (a round every {s.interval} verdict(s), "
                f"quantile {s.quantile:g}, {s.explore})")

    def trial_overrides(self) -> dict:
        return {"train.pause_every": self.barrier}  # a member pauses at each barrier until its round is done

    def state(self) -> dict:
        return self.log.model_dump(mode="json")

    def restore(self, records: list[TrialRecord], state: dict | None = None) -> list[Decision]:
        """The rounds so far; the last one's decisions again (the driver does what is not done yet)."""
        self.log = PbtLog.model_validate(state) if state else PbtLog()
        if not self.log.checks:
            return []
        last = self.log.checks[-1].step
        return self._decisions([c for c in self.log.checks if c.step == last])

    def next_trial(self, records: list[TrialRecord]) -> dict[str, Value] | None:
        n = len(records)  # every member starts before the first round: copies come after
        return pbt.initial(self.spec)[n] if n < self.settings.population else None

    def on_verdict(self, record: TrialRecord, step: int, score: float, view: View) -> list[Decision]:
        return self.poll(view)

    def on_end(self, record: TrialRecord, view: View) -> list[Decision]:
        return self.poll(view)

    def poll(self, view: View) -> list[Decision]:
        """Every round whose verdicts are all in (a member ending can complete one too)."""
        out: list[Decision] = []
        budgets = {r.number: r.budget or math.inf for r in view.records}
        while (step := pbt.next_round(view.records, view.training, {c.step for c in self.log.checks},
                                      self.cadence, budgets)) is not None:
            members = pbt.members_at(view.records, view.training, step)
            scores = {r.number: r.values[step] for r in members}
            checks = [Check(trial=r.number, step=step, nth=sum(s <= step and s % self.cadence == 0 for s in r.values),
                            scores=scores, params={m.number: m.params for m in members},
                            steps={m.number: step for m in members}) for r in members]
            for c in checks:
                c.exploit = pbt.decide(self.settings, self.spec, c)
            self.log.checks += checks
            out += self._decisions(checks)
        return out

    def _decisions(self, checks: list[Check]) -> list[Decision]:
        return [Copy(c) if c.exploit is not None and not c.refused else Resume(c.trial, c.step)
                for c in checks if (c.exploit is not None and not c.refused) or c.step % self.barrier == 0]

    def why_copied(self, copy: TrialRecord | None) -> str:
        src = copy.forked_from if copy else {}
        return (f"pbt: {self.metric} in the bottom {self.settings.quantile:g} of the population; "
                f"{copy.run_id if copy else '?'} takes its place (a fork of {src.get('run_id', '?')} at step "
                f"{src.get('step', '?')})")


def make(spec: SweepSpec, metric: str, cadence: int):
    """The scheduler ``spec.scheduler`` names."""
    if spec.scheduler == "pbt":
        return PbtScheduler(spec, metric, cadence)
    if spec.scheduler == "asha":
        return AshaScheduler(spec, metric)
    return OptunaScheduler(spec, metric)
