"""Scoring model outputs. Pure: no model, no bus.

A held-out case passes the interaction protocol (``tuneloop.checks``) and is correct when its
answer matches the reference; a test-suite case passes when its own checks all pass
(``tuneloop.suites``), and counts with its weight. A shard's outputs become a ``ShardResult``
(weighted counts per category, a few failures); the results of all shards of a request
combine into one ``SuiteResult``, whatever process scored each.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime

from pydantic import BaseModel, Field

from tuneloop.checks import check
from tuneloop.events import Failure
from tuneloop.suites import run_checks

MAX_FAILURES = 10


@dataclass
class Case:
    prompt: str | list[dict]  # prompt text as in training, or messages for the tokenizer's template
    category: str
    reference: str | None
    weight: float = 1.0
    checks: list | None = None  # a suite case's checks (None: the protocol check)

    def judge(self, output: str, new_tokens: int) -> tuple[bool, bool, str]:
        """(passes, correct, why not)."""
        if self.checks is not None:
            reasons = run_checks(self.checks, output, new_tokens)
            return not reasons, not reasons, "; ".join(reasons)
        r = check(output, self.reference, self.category)
        return r.protocol, r.correct, r.reason


class ShardResult(BaseModel):
    """What one evaluator found on one shard (kept in KV until the request is complete)."""

    shard: int
    counts: dict[str, list[float]] = Field(description="category -> [cases, weight, weight passing, weight correct]")
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


def tally(shard: int, cases: list[Case], outputs: list[str], new_tokens: list[int] | None = None) -> ShardResult:
    if len(cases) != len(outputs):
        raise ValueError(f"{len(cases)} cases but {len(outputs)} outputs")
    new_tokens = new_tokens or [0] * len(cases)
    counts: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0, 0.0])
    failures: list[Failure] = []
    for case, out, n in zip(cases, outputs, new_tokens):
        passes, correct, why = case.judge(out, n)
        c = counts[case.category]
        c[0] += 1
        c[1] += case.weight
        c[2] += case.weight * passes
        c[3] += case.weight * correct
        if not passes and len(failures) < MAX_FAILURES:
            failures.append(Failure(prompt=_text(case.prompt)[-300:], output=out[:300], reason=why, category=case.category))
    return ShardResult(shard=shard, counts=dict(counts), failures=failures, new_tokens=sum(new_tokens))


def combine(results: list[ShardResult]) -> SuiteResult:
    """One result from every shard's, in shard order (so any process combines them alike)."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0, 0.0])
    failures: list[Failure] = []
    tokens = 0
    for r in sorted(results, key=lambda r: r.shard):
        for cat, c in r.counts.items():
            totals[cat] = [a + b for a, b in zip(totals[cat], c)]
        failures += r.failures[:MAX_FAILURES - len(failures)]
        tokens += r.new_tokens
    n = int(sum(t[0] for t in totals.values()))
    weight = sum(t[1] for t in totals.values()) or 1.0
    scores = {"protocol": sum(t[2] for t in totals.values()) / weight,
              "correctness": sum(t[3] for t in totals.values()) / weight}
    by_category = {c: {"cases": int(t[0]), "protocol": t[2] / t[1], "correctness": t[3] / t[1]}
                   for c, t in sorted(totals.items())}
    return SuiteResult(cases=n, scores=scores, by_category=by_category, failures=failures,
                       mean_new_tokens=tokens / (n or 1))


def score(cases: list[Case], outputs: list[str], new_tokens: list[int] | None = None) -> SuiteResult:
    """Score one batch in one go (a request of a single shard)."""
    return combine([tally(0, cases, outputs, new_tokens)])


def _text(prompt: str | list[dict]) -> str:
    """A prompt as a failure shows it: the text, or the messages' contents one a line."""
    return prompt if isinstance(prompt, str) else "\n".join(f"{m.get('role')}: {m.get('content')}" for m in prompt)
