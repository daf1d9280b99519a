"""The feedback policy: from a run's verdicts, decide whether training should go on. Pure.

The rl-reward service runs it on live verdicts; `tuneloop replay` runs it on recorded ones,
with other settings, to ask what they would have done."""

from __future__ import annotations

from pydantic import BaseModel

from tuneloop.config import FeedbackSection
from tuneloop.events import EvalVerdict, Feedback, derived_id
from tuneloop.task import EXACT, better, goal


class PolicyState(BaseModel):
    """What the policy remembers of a run; kept in JetStream KV, so every replica and a
    restarted one decide from the same history (the service updates it by compare-and-set)."""

    metric: str | None = None  # the metric best_score is of (a lower one is better for eval_loss, perplexity)
    best_score: float | None = None
    best_step: int | None = None
    since_best: int = 0
    decided: dict[str, Feedback] = {}  # verdict id -> the feedback decided for it (a redelivery sends it again)
    discarded: list[str] = []  # eval requests of checkpoints a rollback discarded: their verdicts never count


def _count(state: PolicyState, score: float, step: int) -> None:
    """One more verdict scored ``score``: a new best, or one more evaluation without one."""
    if better(state.metric or EXACT, score, state.best_score):
        state.best_score, state.best_step, state.since_best = score, step, 0
    else:
        state.since_best += 1


def rewind(state: PolicyState, discarded_requests: list[str]) -> PolicyState:
    """The state as if the verdicts of the checkpoints a rollback discarded (``control.rolled_back``'s
    ``discarded_saves``, as eval request ids) had never come: best and patience counted again from
    the verdicts that remain, in the order they came; those that arrive later are not counted."""
    out = PolicyState(metric=state.metric, discarded=sorted({*state.discarded, *discarded_requests}))
    for verdict_id, feedback in state.decided.items():
        if feedback.request_id not in out.discarded:
            _count(out, feedback.score, feedback.step)
            out.decided[verdict_id] = feedback
    return out


def decide(cfg: FeedbackSection, state: PolicyState, verdict: EvalVerdict, weak_below: float = 0.9) -> Feedback | None:
    """Update ``state`` with ``verdict`` and return the feedback to send (None for a duplicate, and
    for a verdict of a checkpoint a rollback discarded)."""
    if verdict.event_id in state.decided or verdict.request_id in state.discarded:
        return None
    metric = cfg.metric or EXACT
    state.metric = metric
    lower = goal(metric) == "min"
    worst = float("inf") if lower else 0.0
    score = verdict.scores.get(metric, worst)
    _count(state, score, verdict.step)
    # Weak categories: a fraction below ``weak_below`` (a loss has no absolute bar: none are named).
    weak = [] if lower else sorted(c for c, s in verdict.by_category.items() if s.get(metric, 0.0) < weak_below)
    reached = score <= cfg.target if lower else score >= cfg.target
    action, reason = "continue", f"{metric} {score:.3f} {'>' if lower else '<'} target {cfg.target:.3f}"
    if verdict.step < cfg.min_step:
        reason = f"{metric} {score:.3f}; no stop before step {cfg.min_step}"
    else:
        if reached:
            action, reason = "stop", f"target reached: {metric} {score:.3f} {'<=' if lower else '>='} {cfg.target:.3f}"
        elif state.since_best >= cfg.patience:
            action, reason = "stop", f"no improvement for {state.since_best} evaluations (best {state.best_score:.3f} at step {state.best_step})"
    feedback = Feedback(
        run_id=verdict.run_id, event_id=derived_id("feedback", verdict.event_id), step=verdict.step, action=action,
        reason=reason, score=score, best_step=state.best_step, best_score=state.best_score, weak_categories=weak,
        verdict_id=verdict.event_id, request_id=verdict.request_id, scores=dict(verdict.scores),
        by_category={c: {k: v for k, v in s.items() if k != "cases"} for c, s in verdict.by_category.items()},
        mean_new_tokens=verdict.mean_new_tokens,
    )
    state.decided[verdict.event_id] = feedback
    return feedback
