"""The search itself, by Optuna: samplers propose parameters, pruners judge verdicts.

The sweep's records in JetStream KV are the truth; the Optuna study lives in memory and is
rebuilt from them when the sweep process starts (``rebuild``): each recorded trial is asked
again with its own parameters (``enqueue_trial``), its verdicts reported again, its end
told again. So a restarted sweep samples and prunes knowing everything that happened.
"""

from __future__ import annotations

import copy
import logging
from typing import Literal

from pydantic import BaseModel, Field

from .spec import SweepSpec, Value, grid

log = logging.getLogger(__name__)
UPPER = "tuneloop_upper"  # Optuna user attribute: step -> the upper bound of the trial's verdict there
State = Literal["running", "complete", "pruned", "failed"]


class TrialRecord(BaseModel):
    """One trial as the sweep keeps it (KV ``<sweep>.trial-NNNN``)."""

    number: int = Field(ge=0)
    run_id: str
    params: dict[str, Value]
    state: State = "running"
    values: dict[int, float] = Field(default_factory=dict, description="Training step -> the metric on val.")
    bounds: dict[int, list[float]] = Field(default_factory=dict, description=(
        "Training step -> [lower, upper] of the metric on val, where the verdict had bounds "
        "(feedback.confidence > 0): the pruner judges the upper one."))
    value: float | None = Field(default=None, description="The metric of the exported model on test: the trial's result.")
    test: dict[str, float] | None = None
    steps: int | None = None
    budget: int | None = Field(default=None, description=(
        "Its run's train.max_steps: its verdict there is its final report, which no pruner acts on."))
    stop_reason: str | None = None
    pruned_at: int | None = Field(default=None, description="The step its training stopped at, pruned.")
    judged_at: int | None = Field(default=None, description=(
        "The verdict step at which the sweep decided to prune it (what a backtest compares with: verdicts "
        "that came while a restarted sweep was down can be later than the decision, yet published before the prune)."))
    released_bytes: int | None = None
    train_seconds: float | None = None
    tokens_per_second: float | None = None
    peak_memory_mb: float | None = None
    export: str | None = Field(default=None, description="The exported model (merged, else adapter), run-relative.")
    # Population-based training (sampler pbt): who copied whom, where, with what change.
    forked_from: dict | None = Field(default=None, description="A copy: {trial, run_id, step, changed} of the member it forked.")
    start_step: int = Field(default=0, ge=0, description="The step it started from (a copy: its donor's checkpoint).")
    replaced_by: int | None = Field(default=None, description="A member that copied another: the trial that took its place.")
    replaces: int | None = Field(default=None, description="A copy: the member whose place it takes.")


def make_study(spec: SweepSpec, drawn: int = 0):
    """A study for ``spec``; ``drawn``: trials the sweep already has (a restart). Its sampler is
    seeded with ``seed + drawn``: seeded with ``seed`` again it would draw what the first trials
    drew, and a restarted random or TPE sweep would train the same parameters twice."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    samplers = {"grid": optuna.samplers.RandomSampler, "random": optuna.samplers.RandomSampler,
                "tpe": optuna.samplers.TPESampler}  # grid: every point is enqueued, the sampler is never asked
    p = spec.pruner
    pruners = {
        "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=p.startup_trials, n_warmup_steps=p.warmup_steps),
        "percentile": lambda: optuna.pruners.PercentilePruner(p.percentile, n_startup_trials=p.startup_trials,
                                                              n_warmup_steps=p.warmup_steps),
        "successive-halving": lambda: optuna.pruners.SuccessiveHalvingPruner(min_resource=max(p.warmup_steps, 1)),
        "none": optuna.pruners.NopPruner,
    }
    return optuna.create_study(study_name=spec.name, direction="maximize",
                               sampler=samplers[spec.sampler](seed=spec.seed + drawn), pruner=optimistic(pruners[p.kind]()))


def optimistic(inner):
    """``inner`` judging each trial at the top of its bounds: a trial is pruned only when even
    the upper bound of its verdict is behind what the pruner compares it with (the other
    trials' scores). A verdict without bounds is judged on its score, as Optuna does."""
    import optuna

    class Optimistic(optuna.pruners.BasePruner):
        def prune(self, study, trial) -> bool:
            upper = trial.user_attrs.get(UPPER) or {}
            if upper:
                trial = copy.copy(trial)
                trial.intermediate_values = {s: max(v, upper.get(str(s), v)) for s, v in trial.intermediate_values.items()}
            return inner.prune(study, trial)

    return Optimistic()


def distributions(spec: SweepSpec) -> dict:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out = {}
    for name, p in spec.params.items():
        if p.values is not None:
            out[name] = CategoricalDistribution(p.values)
        elif p.integer:
            out[name] = IntDistribution(int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
        else:
            out[name] = FloatDistribution(p.low, p.high, log=p.log, step=p.step)
    return out


def ask(study, spec: SweepSpec, params: dict[str, Value] | None = None):
    """A new Optuna trial: with ``params`` exactly those (a grid point, a replayed trial), else sampled."""
    if params is not None:
        study.enqueue_trial(params)
    return study.ask(distributions(spec))


def next_params(spec: SweepSpec, records: list[TrialRecord]) -> dict[str, Value] | None:
    """For a grid, the first combination no trial has taken; for samplers, None (sample)."""
    if spec.sampler != "grid":
        return None
    taken = [r.params for r in records]
    return next((p for p in grid(spec) if p not in taken), None)


def report(trial, step: int, value: float, upper: float | None = None) -> bool:
    """Tell Optuna the trial's verdict at ``step`` (``upper``: its upper bound, where it has one);
    True when its pruner says the trial fell behind."""
    if upper is not None:
        trial.set_user_attr(UPPER, {**(trial.user_attrs.get(UPPER) or {}), str(step): upper})
    trial.report(value, step)
    return trial.should_prune()


def prunable(record: TrialRecord, step: int) -> bool:
    """A prune at ``step`` would still save training: not the trial's final report."""
    return record.budget is None or step < record.budget


def upper_of(record: TrialRecord, step: int) -> float | None:
    """The upper bound of ``record``'s verdict at ``step``, if it had bounds."""
    b = record.bounds.get(step)
    return b[1] if b else None


def tell(study, trial, record: TrialRecord) -> None:
    """Close the Optuna trial as the record ended."""
    from optuna.trial import TrialState

    if record.state == "complete" and record.value is not None:
        study.tell(trial, record.value)
    elif record.state == "pruned":
        study.tell(trial, state=TrialState.PRUNED)
    else:
        study.tell(trial, state=TrialState.FAIL)


def rebuild(study, spec: SweepSpec, records: list[TrialRecord]) -> dict[int, object]:
    """Rebuild the study from the records; returns the Optuna trials still running, by number."""
    running = {}
    for record in sorted(records, key=lambda r: r.number):
        trial = ask(study, spec, record.params)
        if trial.number != record.number:  # a study is rebuilt in order, so numbers must agree
            raise RuntimeError(f"replaying trial {record.number} gave Optuna trial {trial.number}")
        for step, value in sorted(record.values.items()):
            report(trial, step, value, upper_of(record, step))  # pruners that keep state (successive halving) rebuild it
        if record.state == "running":
            running[record.number] = trial
        else:
            tell(study, trial, record)
    return running


def best(records: list[TrialRecord]) -> TrialRecord | None:
    """The complete trial with the highest test value; ties go to the earlier trial."""
    done = [r for r in records if r.state == "complete" and r.value is not None]
    return max(done, key=lambda r: (r.value, -r.number), default=None)
