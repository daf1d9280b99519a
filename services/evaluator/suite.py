"""Scoring model outputs by the run's task. Pure: no model, no bus.

A held-out case is judged by every metric the task declares (``tuneloop.task``), and by
``exact`` where it has a reference; a test-suite case by its own checks (``tuneloop.suites``),
the metric ``pass``. Each case counts with its weight. A shard's outputs become a
``ShardResult`` (weighted sums per category and metric, the teacher-forced loss of the
demonstrations, a few failures); the results of all shards of a request combine into one
``SuiteResult``, whatever process scored each.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime

from pydantic import BaseModel, Field

from tuneloop.bounds import confidence_sequence
from tuneloop.checks import Subject, run_checks
from tuneloop.events import Failure
from tuneloop.task import LOSS, PERPLEXITY, SUITE_METRIC, Judge, Verdict

MAX_FAILURES = 10


@dataclass
class Case:
    prompt: str | list[dict]  # prompt text as in training, or messages for the tokenizer's template
    category: str
    reference: str | None
    weight: float = 1.0
    checks: list | None = None  # a suite case's own checks (None: the task's metrics)
    completion: str | list[dict] | None = None  # the demonstration (for the held-out loss)
    fields: dict = field(default_factory=dict)  # the row's other columns

    def judge(self, judge: Judge | None, output: str, new_tokens: int) -> Verdict:
        if self.checks is not None:
            reasons = run_checks(self.checks, Subject(output, new_tokens))
            return Verdict({SUITE_METRIC: float(not reasons)}, {SUITE_METRIC: "; ".join(reasons)} if reasons else {})
        if judge is None:
            raise ValueError("a held-out case is judged by the run's task: no task given")
        return judge.judge(output, prompt=user_text(self.prompt), reference=self.reference,
                           fields={**self.fields, "category": self.category}, new_tokens=new_tokens)


class ShardResult(BaseModel):
    """What one evaluator found on one shard (kept in KV until the request is complete)."""

    shard: int
    cases: dict[str, int] = Field(default_factory=dict, description="category -> cases")
    sums: dict[str, dict[str, list[float]]] = Field(
        default_factory=dict, description="category -> metric -> [weight of the cases it scored, weighted score]")
    loss: dict[str, list[float]] = Field(
        default_factory=dict, description="category -> [summed token NLL of the demonstrations, their tokens]")
    values: dict[str, list[float]] = Field(
        default_factory=dict, description="metric -> each case's score, in the shard's order (for the bounds)")
    weighted: bool = False  # a case weighs other than 1: the bounds (of an unweighted mean) do not apply
    failures: list[Failure] = Field(default_factory=list)
    new_tokens: int = 0
    seconds: float = 0.0
    worker: str = ""
    # Where the shard's time went (bench/feedback_loop.py prints them per stage).
    load_seconds: float = 0.0
    generate_seconds: float = 0.0
    score_seconds: float = 0.0
    finished: datetime | None = None


@dataclass
class SuiteResult:
    cases: int
    scores: dict[str, float]
    by_category: dict[str, dict[str, float]]
    failures: list[Failure]
    mean_new_tokens: float
    bounds: dict[str, list[float]] = field(default_factory=dict)


def tally(shard: int, cases: list[Case], outputs: list[str], new_tokens: list[int] | None = None,
          judge: Judge | None = None, losses: list[tuple[float, int] | None] | None = None) -> ShardResult:
    """One shard's counts. ``losses``: each case's (summed NLL, tokens) of its demonstration, or None."""
    if len(cases) != len(outputs):
        raise ValueError(f"{len(cases)} cases but {len(outputs)} outputs")
    new_tokens = new_tokens or [0] * len(cases)
    result = ShardResult(shard=shard, new_tokens=sum(new_tokens))
    for i, (case, out, n) in enumerate(zip(cases, outputs, new_tokens)):
        v = case.judge(judge, out, n)
        cat = case.category
        result.cases[cat] = result.cases.get(cat, 0) + 1
        for metric, score in v.scores.items():
            w, s = result.sums.setdefault(cat, {}).get(metric, [0.0, 0.0])
            result.sums[cat][metric] = [w + case.weight, s + case.weight * score]
            result.values.setdefault(metric, []).append(score)
        result.weighted |= case.weight != 1.0
        if losses and losses[i] is not None:
            nll, tokens = result.loss.get(cat, [0.0, 0.0])
            result.loss[cat] = [nll + losses[i][0], tokens + losses[i][1]]
        if v.reasons and len(result.failures) < MAX_FAILURES:
            result.failures.append(Failure(
                prompt=user_text(case.prompt)[-300:], output=out[:300], category=cat, scores=v.scores,
                reason="; ".join(f"{m}: {why}" for m, why in v.reasons.items())[:1000]))
    return result


def combine(results: list[ShardResult], confidence: float = 0.0) -> SuiteResult:
    """One result from every shard's, in shard order (so any process combines them alike);
    with ``confidence``, each metric's bound over its cases in that order (tuneloop.bounds)."""
    cases: dict[str, int] = defaultdict(int)
    sums: dict[str, dict[str, list[float]]] = defaultdict(dict)
    loss: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    failures: list[Failure] = []
    tokens = 0
    for r in sorted(results, key=lambda r: r.shard):
        for cat, n in r.cases.items():
            cases[cat] += n
        for cat, metrics in r.sums.items():
            for metric, (w, s) in metrics.items():
                a, b = sums[cat].get(metric, [0.0, 0.0])
                sums[cat][metric] = [a + w, b + s]
        for cat, (nll, t) in r.loss.items():
            loss[cat] = [loss[cat][0] + nll, loss[cat][1] + t]
        failures += r.failures[:MAX_FAILURES - len(failures)]
        tokens += r.new_tokens
    n = sum(cases.values())

    def scores(cats: list[str]) -> dict[str, float]:
        totals: dict[str, list[float]] = {}
        for cat in cats:
            for metric, (w, s) in sums.get(cat, {}).items():
                a, b = totals.get(metric, [0.0, 0.0])
                totals[metric] = [a + w, b + s]
        out = {m: s / w for m, (w, s) in totals.items() if w > 0}
        nll, t = sum(loss[c][0] for c in cats if c in loss), sum(loss[c][1] for c in cats if c in loss)
        if t > 0:
            out[LOSS] = nll / t
            out[PERPLEXITY] = math.exp(min(nll / t, 50.0))
        return out

    by_category = {c: {"cases": cases[c], **scores([c])} for c in sorted(cases)}
    return SuiteResult(cases=n, scores=scores(list(cases)), by_category=by_category, failures=failures,
                       mean_new_tokens=tokens / (n or 1), bounds=bounds_of(results, confidence))


def bounds_of(results: list[ShardResult], confidence: float) -> dict[str, list[float]]:
    """Each metric's [lower, upper] bound over the cases of ``results`` in shard order; none
    without a confidence, or where cases are weighted (the bound is of an unweighted mean)."""
    ordered = sorted(results, key=lambda r: r.shard)
    if confidence <= 0 or any(r.weighted for r in ordered):
        return {}
    values: dict[str, list[float]] = defaultdict(list)
    for r in ordered:
        for metric, xs in r.values.items():
            values[metric] += xs
    return {m: confidence_sequence(xs, confidence).as_list() for m, xs in values.items()}


def score(cases: list[Case], outputs: list[str], new_tokens: list[int] | None = None, judge: Judge | None = None,
          losses: list[tuple[float, int] | None] | None = None) -> SuiteResult:
    """Score one batch in one go (a request of a single shard)."""
    return combine([tally(0, cases, outputs, new_tokens, judge, losses)])


def user_text(prompt: str | list[dict]) -> str:
    """A prompt as a metric function and a failure see it: the text, or the last user message."""
    if isinstance(prompt, str):
        return prompt
    users = [m.get("content", "") for m in prompt if m.get("role") == "user"]
    return str(users[-1]) if users else ""
