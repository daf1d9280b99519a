"""Scoring a batch of model outputs against the protocol. Pure: no model, no bus."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from tuneloop.checks import check
from tuneloop.events import Failure


@dataclass
class Case:
    prompt: str          # rendered prompt text, as in training
    category: str
    reference: str | None


@dataclass
class SuiteResult:
    scores: dict[str, float]
    by_category: dict[str, dict[str, float]]
    failures: list[Failure]


def score(cases: list[Case], outputs: list[str], max_failures: int = 10) -> SuiteResult:
    if len(cases) != len(outputs):
        raise ValueError(f"{len(cases)} cases but {len(outputs)} outputs")
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # cases, protocol, correct
    failures: list[Failure] = []
    for case, out in zip(cases, outputs):
        r = check(out, case.reference, case.category)
        t = totals[case.category]
        t[0] += 1
        t[1] += r.protocol
        t[2] += r.correct
        if not r.protocol and len(failures) < max_failures:
            failures.append(Failure(prompt=case.prompt[-300:], output=out[:300], reason=r.reason, category=case.category))
    n = sum(t[0] for t in totals.values()) or 1
    scores = {
        "protocol": sum(t[1] for t in totals.values()) / n,
        "correctness": sum(t[2] for t in totals.values()) / n,
    }
    by_category = {c: {"cases": t[0], "protocol": t[1] / t[0], "correctness": t[2] / t[0]} for c, t in sorted(totals.items())}
    return SuiteResult(scores=scores, by_category=by_category, failures=failures)
