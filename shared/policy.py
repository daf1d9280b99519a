"""The feedback policy: from a run's verdicts, decide whether training should go on. Pure.

The rl-reward service runs it on live verdicts; `tuneloop replay` runs it on recorded ones,
with other settings, to ask what they would have done."""

from __future__ import annotations

import math
from typing import NamedTuple

from pydantic import BaseModel

from tuneloop.config import FeedbackSection
from tuneloop.events import Decision, EvalVerdict, Feedback, derived_id
from tuneloop.task import EXACT, goal


class PolicyState(BaseModel):
    """What the policy remembers of a run; kept in JetStream KV, so every replica and a
    restarted one decide from the same history (the service updates it by compare-and-set)."""

    metric: str | None = None  # the metric best_score is of (a lower one is better for eval_loss, perplexity)
    best_score: float | None = None
    best_bound: float | None = None  # the best verdict's lower bound (its score where verdicts carry none)
    best_step: int | None = None
    since_best: int = 0
    decided: dict[str, Feedback] = {}  # verdict id -> the feedback decided for it (a redelivery sends it again)
    discarded: list[str] = []  # eval requests of checkpoints a rollback discarded: their verdicts never count


class Reading(NamedTuple):
    """A verdict's score on the policy's metric with its bound, turned so that higher is better
    (a loss is negated): every comparison below is then one way round."""

    score: float
    lo: float
    hi: float

    @classmethod
    def of(cls, metric: str, score: float, bounds: dict[str, list[float]] | None) -> "Reading":
        lo, hi = (bounds or {}).get(metric) or (score, score)
        return cls(-score, -hi, -lo) if goal(metric) == "min" else cls(score, lo, hi)


def sign(metric: str) -> float:
    return -1.0 if goal(metric) == "min" else 1.0


def gain(r: Reading, best_score: float | None, best_bound: float | None) -> bool | None:
    """Is this verdict better than the best? True: its lower bound is above the best's (or there
    is no best yet); False: its upper bound is at or below the best's score; None: the bound
    cannot tell. Without bounds (confidence 0): the point estimates, as they compare."""
    if best_bound is None or r.lo > best_bound:
        return True
    if best_score is not None and r.hi <= best_score:
        return False
    return None


def reached(r: Reading, target: float) -> bool | None:
    """Is the target reached? True: the lower bound is at it; False: the upper bound is below;
    None: not settled (the policy then goes on: a stop must be sure)."""
    if r.lo >= target:
        return True
    if r.hi < target:
        return False
    return None


def settled(d: Decision, bounds: dict[str, list[float]], score: float) -> str | None:
    """Why a sequential verdict may end now (every decision it is for is settled), or None."""
    r = Reading.of(d.metric, score, bounds)
    s = sign(d.metric)
    said = []
    if d.target is not None:
        t = reached(r, s * d.target)
        if t is None:
            return None
        said.append(f"target {'reached' if t else 'not reached'}")
    if d.best_bound is not None:
        g = gain(r, None if d.best_score is None else s * d.best_score, s * d.best_bound)
        if g is None:
            return None
        said.append("better than the best" if g else "no better than the best")
    lo, hi = bounds.get(d.metric, (score, score))
    return f"settled: {' and '.join(said) or 'nothing to decide'} ({d.metric} in [{lo:.3f}, {hi:.3f}])"


def ends_early(d: Decision, bounds: dict[str, list[float]], score: float, n: int, planned: int) -> str | None:
    """Why a sequential verdict ends after ``n`` of its ``planned`` cases, or None to score on.

    It ends once settled, or once the rest of the split would not settle it either, except when
    the target is reached: that decision stops the run for good, so it is confirmed on the whole
    split. A prefix is the same cases in the same order at every verdict of a run, and a lucky
    one would end every verdict of the run early and high (the bench saw a 16-case prefix's
    bound of [0.682, 0.976] stop a run whose test score was 0.581)."""
    if d.target is not None and reached(Reading.of(d.metric, score, bounds), sign(d.metric) * d.target):
        return None
    return settled(d, bounds, score) or beyond_reach(d, bounds, score, n, planned)


def beyond_reach(d: Decision, bounds: dict[str, list[float]], score: float, n: int, planned: int) -> str | None:
    """Why scoring the rest of the split would not settle the decision either, or None.

    A bound narrows about as the square root of the cases: projected from ``n`` to ``planned``
    cases around the same mean, if even that narrower bound would still span the target or the
    best, the rest of the split is not worth its generation. The verdict then ends unsettled
    (the policy counts it neither way, as it would a full verdict that settled nothing). A
    heuristic of value, not a guarantee: the bound the verdict reports is the real one."""
    if n >= planned or d.metric not in bounds:
        return None
    lo, hi = bounds[d.metric]
    shrink = math.sqrt(n / planned)
    projected = [score - (score - lo) * shrink, score + (hi - score) * shrink]
    if settled(d, {d.metric: projected}, score) is not None:
        return None
    return (f"unsettled, and the whole split would not settle it ({d.metric} in [{lo:.3f}, {hi:.3f}] on {n} cases, "
            f"about [{projected[0]:.3f}, {projected[1]:.3f}] on {planned})")


def _count(state: PolicyState, metric: str, score: float, bounds: dict[str, list[float]] | None, step: int) -> None:
    """One more verdict: a new best, one more surely without a gain, or neither (unsettled)."""
    s = sign(metric)
    r = Reading.of(metric, score, bounds)
    g = gain(r, None if state.best_score is None else s * state.best_score,
             None if state.best_bound is None else s * state.best_bound)
    if g:
        state.best_score, state.best_bound, state.best_step, state.since_best = score, s * r.lo, step, 0
    elif g is False:
        state.since_best += 1


def rewind(state: PolicyState, discarded_requests: list[str]) -> PolicyState:
    """The state as if the verdicts of the checkpoints a rollback discarded (``control.rolled_back``'s
    ``discarded_saves``, as eval request ids) had never come: best and patience counted again from
    the verdicts that remain, in the order they came; those that arrive later are not counted."""
    out = PolicyState(metric=state.metric, discarded=sorted({*state.discarded, *discarded_requests}))
    for verdict_id, feedback in state.decided.items():
        if feedback.request_id not in out.discarded:
            _count(out, out.metric or EXACT, feedback.score, feedback.bounds, feedback.step)
            out.decided[verdict_id] = feedback
    return out


def weak_categories(by_category: dict[str, dict[str, float]], metric: str, margin: float) -> list[str]:
    """Categories scoring ``margin`` or more below the mean of the categories' scores: weakness
    relative to the others, so that a task whose every category is below any fixed line still
    has some to weigh up (and one whose categories are all alike has none)."""
    scores = {c: sign(metric) * s[metric] for c, s in by_category.items() if metric in s}
    if len(scores) < 2:
        return []
    mean = sum(scores.values()) / len(scores)
    return sorted(c for c, v in scores.items() if v < mean - margin)


def decide(cfg: FeedbackSection, state: PolicyState, verdict: EvalVerdict, margin: float = 0.05) -> Feedback | None:
    """Update ``state`` with ``verdict`` and return the feedback to send (None for a duplicate, and
    for a verdict of a checkpoint a rollback discarded)."""
    if verdict.event_id in state.decided or verdict.request_id in state.discarded:
        return None
    metric = cfg.metric or EXACT
    state.metric = metric
    lower = goal(metric) == "min"
    score = verdict.scores.get(metric, float("inf") if lower else 0.0)
    _count(state, metric, score, verdict.bounds, verdict.step)
    r, s = Reading.of(metric, score, verdict.bounds), sign(metric)
    lo, hi = verdict.bounds.get(metric) or (score, score)
    shown = f"{metric} {score:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if metric in verdict.bounds else "")
    action, reason = "continue", f"{shown} {'>' if lower else '<'} target {cfg.target:.3f}"
    if verdict.step < cfg.min_step:
        reason = f"{shown}; no stop before step {cfg.min_step}"
    else:
        hit = reached(r, s * cfg.target)
        if hit:
            action, reason = "stop", f"target reached: {shown} {'<=' if lower else '>='} {cfg.target:.3f}"
        elif state.since_best >= cfg.patience:
            action, reason = "stop", (f"no improvement for {state.since_best} evaluations (best {state.best_score:.3f} at "
                                      f"step {state.best_step})")
        elif hit is None:
            reason = f"{shown}: target {cfg.target:.3f} not yet sure"
    feedback = Feedback(
        run_id=verdict.run_id, event_id=derived_id("feedback", verdict.event_id), step=verdict.step, action=action,
        reason=reason, score=score, best_step=state.best_step, best_score=state.best_score,
        best_bound=state.best_bound, weak_categories=weak_categories(verdict.by_category, metric, margin),
        verdict_id=verdict.event_id, request_id=verdict.request_id, scores=dict(verdict.scores),
        bounds=dict(verdict.bounds),
        by_category={c: {k: v for k, v in s.items() if k != "cases"} for c, s in verdict.by_category.items()},
        mean_new_tokens=verdict.mean_new_tokens,
    )
    state.decided[verdict.event_id] = feedback
    return feedback
