"""Scoring model outputs against the protocol. Pure: no model, no bus.

A shard's outputs become a ``ShardResult`` (counts per category, a few failures); the results
of all shards of a request combine into one ``SuiteResult``, whatever process scored each.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from pydantic import BaseModel, Field

from tuneloop.checks import check
from tuneloop.events import Failure

MAX_FAILURES = 10


@dataclass
class Case:
    prompt: str          # rendered prompt text, as in training
    category: str
    reference: str | None


class ShardResult(BaseModel):
    """What one evaluator found on one shard (kept in KV until the request is complete)."""

    shard: int
    counts: dict[str, list[int]] = Field(description="category -> [cases, protocol ok, correct]")
    failures: list[Failure] = Field(default_factory=list)
    new_tokens: int = 0
    seconds: float = 0.0
    worker: str = ""


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
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    failures: list[Failure] = []
    for case, out in zip(cases, outputs):
        r = check(out, case.reference, case.category)
        c = counts[case.category]
        c[0] += 1
        c[1] += r.protocol
        c[2] += r.correct
        if not r.protocol and len(failures) < MAX_FAILURES:
            failures.append(Failure(prompt=case.prompt[-300:], output=out[:300], reason=r.reason, category=case.category))
    return ShardResult(shard=shard, counts=dict(counts), failures=failures, new_tokens=sum(new_tokens or []))


def combine(results: list[ShardResult]) -> SuiteResult:
    """One result from every shard's, in shard order (so any process combines them alike)."""
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    failures: list[Failure] = []
    tokens = 0
    for r in sorted(results, key=lambda r: r.shard):
        for cat, c in r.counts.items():
            totals[cat] = [a + b for a, b in zip(totals[cat], c)]
        failures += r.failures[:MAX_FAILURES - len(failures)]
        tokens += r.new_tokens
    n = sum(t[0] for t in totals.values())
    scores = {"protocol": sum(t[1] for t in totals.values()) / (n or 1),
              "correctness": sum(t[2] for t in totals.values()) / (n or 1)}
    by_category = {c: {"cases": t[0], "protocol": t[1] / t[0], "correctness": t[2] / t[0]} for c, t in sorted(totals.items())}
    return SuiteResult(cases=n, scores=scores, by_category=by_category, failures=failures,
                       mean_new_tokens=tokens / (n or 1))


def score(cases: list[Case], outputs: list[str], new_tokens: list[int] | None = None) -> SuiteResult:
    """Score one batch in one go (a request of a single shard)."""
    return combine([tally(0, cases, outputs, new_tokens)])
