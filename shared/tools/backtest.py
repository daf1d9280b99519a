"""Backtesting the feedback policy on a recorded run: what would other settings have done?

A run's stream (or its timeline file, once the broker is gone) keeps every verdict the policy
saw, every rollback that made it forget some, and every feedback it sent. ``replay`` feeds the
same verdicts and rollbacks, in the same order, through the same ``policy.decide`` and
``policy.rewind`` the rl-reward service runs, with the settings asked for, and says
when the run would have stopped, what it would have exported, and the steps and time that
would have been saved or lost. With the run's own settings it gives back exactly the live
decisions (a test holds it to that).

What cannot be known is said, not guessed: verdicts after the live run ended do not exist,
so settings that would have trained on are reported as "past the end of the recording".
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from ..config import FeedbackSection
from ..events import ControlRolledBack, EvalVerdict, Event, Feedback, StepMetrics, TrainingFinished, derived_id
from ..policy import PolicyState, decide, rewind
from ..task import unknown_metric


POLICY_KEYS = ("metric", "target", "patience", "min_step", "confidence")  # what `policy.decide` reads


@dataclass
class Outcome:
    """What the policy did (live) or would have done (replayed) with one set of settings."""

    settings: FeedbackSection
    decisions: list[Feedback]
    stop_at: int | None  # the step of the verdict whose feedback said stop; None: it never did
    best_step: int | None
    best_score: float | None


@dataclass
class Backtest:
    live: Outcome
    replayed: Outcome
    end_step: int  # where the recorded run ended
    live_lag: int  # steps between the live stop verdict and the end (feedback is applied at a step boundary)
    seconds_at: dict[int, float]  # step -> seconds since the first step, from train.step

    @property
    def would_end(self) -> int | None:
        """The step the replayed run would have ended at; None when past the end of the recording."""
        if self.replayed.stop_at is None:
            return self.end_step if self.live.stop_at is None else None
        return self.replayed.stop_at + self.live_lag

    @property
    def steps_saved(self) -> int | None:
        """Steps the settings would have saved (negative: trained longer)."""
        return None if self.would_end is None else self.end_step - self.would_end

    @property
    def seconds_saved(self) -> float | None:
        end = self.would_end
        if end is None or not self.seconds_at or end > max(self.seconds_at):
            return None  # past what was recorded
        at = max((s for s in self.seconds_at if s <= end), default=min(self.seconds_at))
        return self.seconds_at[max(self.seconds_at)] - self.seconds_at[at]


def verdicts_seen(events: list[Event]) -> list[EvalVerdict]:
    """The verdicts the policy decides on, in the order they were published: periodic ones."""
    return [e for e in events if isinstance(e, EvalVerdict) and e.purpose == "periodic"]


def run_policy(settings: FeedbackSection, events: list[Event]) -> Outcome:
    """``decide`` over the periodic verdicts of ``events``, and ``rewind`` at each rollback, as
    the service does; it stops at the first stop. ``confidence`` 0 replays the rule of point
    estimates (the verdicts' bounds set aside); another confidence must be the one the verdicts
    were bounded at (a bound cannot be redrawn without the cases)."""
    state, decisions = PolicyState(), []
    for e in events:
        if isinstance(e, ControlRolledBack):
            state = rewind(state, [derived_id("eval", saved) for saved in e.discarded_saves])
            continue
        if not isinstance(e, EvalVerdict) or e.purpose != "periodic":
            continue
        if settings.confidence == 0:
            e = e.model_copy(update={"bounds": {}})
        elif e.bounds and abs(e.confidence - settings.confidence) > 1e-9:
            raise ValueError(f"confidence={settings.confidence:g}: the verdict of step {e.step} is bounded at "
                             f"{e.confidence:g}; replay at that confidence, or at 0 (point estimates)")
        feedback = decide(settings, state, e)
        if feedback is None:  # a verdict seen twice (decided once), or of a discarded checkpoint
            continue
        decisions.append(feedback)
        if feedback.action == "stop":
            break
    return _outcome(settings, decisions)


def live_outcome(settings: FeedbackSection, events: list[Event]) -> Outcome:
    """What the rl-reward service decided: the run's feedback events, up to its first stop."""
    decisions, seen = [], set()
    for e in events:
        if isinstance(e, Feedback) and e.event_id not in seen:
            seen.add(e.event_id)
            decisions.append(e)
            if e.action == "stop":
                break
    return _outcome(settings, decisions)


def _outcome(settings: FeedbackSection, decisions: list[Feedback]) -> Outcome:
    stop = next((d.step for d in decisions if d.action == "stop"), None)
    last = decisions[-1] if decisions else None
    return Outcome(settings, decisions, stop, last.best_step if last else None, last.best_score if last else None)


def backtest(events: list[Event], recorded: FeedbackSection, settings: FeedbackSection) -> Backtest:
    """The run of ``events`` (decided live with ``recorded``) against ``settings``."""
    live = live_outcome(recorded, events)
    replayed = run_policy(settings, events)
    done = next((e for e in reversed(events) if isinstance(e, TrainingFinished)), None)
    steps = [e for e in events if isinstance(e, StepMetrics) and e.loss is not None]
    end = done.step if done else (steps[-1].step if steps else 0)
    t0 = steps[0].time if steps else None
    seconds = {e.step: (e.time - t0).total_seconds() for e in steps}
    lag = end - live.stop_at if live.stop_at is not None and done and done.reason == "feedback" else 0
    return Backtest(live, replayed, end, max(lag, 0), seconds)


def row(r: Backtest) -> dict[str, str]:
    """One line of the backtest table: settings, outcome, and the trade-off against the live run
    (steps and seconds saved, score lost: the live export's score minus this one's, metric by metric)."""
    s, live, ended = r.replayed.settings, r.live, r.would_end
    same = [(d.step, d.action, d.reason) for d in r.replayed.decisions] == [(d.step, d.action, d.reason) for d in live.decisions]
    lost = None if ended is None else score_lost(live, r.replayed)
    return {"metric": s.metric, "target": f"{s.target:g}", "patience": str(s.patience), "min_step": str(s.min_step),
            "would stop": stop_text(r.replayed), "ends at": "past the recording" if ended is None else str(ended),
            "exports": best_text(r.replayed), "steps saved": "-" if r.steps_saved is None else f"{r.steps_saved:+d}",
            "seconds saved": "-" if r.seconds_saved is None else f"{r.seconds_saved:+.1f}",
            "score lost": "-" if not lost else "; ".join(f"{m} {v:+.3f}" for m, v in lost.items()),
            "same as live": "yes" if same else "no"}


def scores_at(o: Outcome, step: int | None) -> dict[str, float]:
    """Every metric of the verdict of ``step`` among ``o``'s decisions (what its export scored)."""
    return next((dict(d.scores) or {o.settings.metric: d.score} for d in o.decisions if d.step == step), {})


def score_lost(live: Outcome, replayed: Outcome) -> dict[str, float]:
    """The live export's score minus the replayed one's, metric by metric: the replayed settings'
    metric first, then the live one's if it differs. A score is never set against another
    metric's (a run stopped on one metric against settings of another compares both on both)."""
    mine, theirs = scores_at(live, live.best_step), scores_at(replayed, replayed.best_step)
    metrics = dict.fromkeys([replayed.settings.metric, live.settings.metric])
    return {m: mine[m] - theirs[m] for m in metrics if m in mine and m in theirs}


def stop_text(o: Outcome) -> str:
    return f"after the verdict of step {o.stop_at}" if o.stop_at is not None else "never"


def best_text(o: Outcome) -> str:
    return f"step {o.best_step} ({o.best_score:.3f})" if o.best_step is not None else "-"


def parse_settings(text: str, base: FeedbackSection, metrics: list[str] | None = None) -> FeedbackSection:
    """``target=0.9,patience=2,min_step=100`` on top of ``base``; ValueError names what is wrong."""
    found = grid(text, base, metrics)
    if len(found) != 1:
        raise ValueError(f"{text!r}: one value per setting here (several are for --grid)")
    return found[0]


def grid(text: str, base: FeedbackSection, metrics: list[str] | None = None) -> list[FeedbackSection]:
    """Every combination of ``key=v1|v2,key=v3`` on top of ``base``, in order; a ``metric`` must be
    one of ``metrics`` (the run's task's)."""
    names, choices = [], []
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, values = part.partition("=")
        if not sep or key.strip() not in POLICY_KEYS:
            raise ValueError(f"{part!r}: expected KEY=VALUE with KEY one of {', '.join(POLICY_KEYS)}")
        names.append(key.strip())
        choices.append(values.split("|"))
    out = []
    for combo in itertools.product(*choices):
        raw = {**base.model_dump(), **dict(zip(names, combo))}
        try:
            settings = FeedbackSection.model_validate(raw)
        except Exception as e:  # pydantic's message names the field and the value
            raise ValueError(f"feedback settings {dict(zip(names, combo))}: {e}") from None
        if metrics is not None and settings.metric not in metrics:
            raise ValueError(unknown_metric(settings.metric, metrics, "metric"))
        out.append(settings)
    return out
