"""Augmentations: rows added to train by rules the config names. Pure.

- ``rephrase``: new phrasings of a prompt from the user's templates (``data.augment.phrasings``),
  so a model learns the task from more ways of asking than the data set has;
- ``negative_for``: a dispreferred answer for each row, for DPO pairs (``data.augment.negatives``):
  another row's answer that the task's metrics fail for this row.
"""

from __future__ import annotations

import random
import re


def rephrase(prompt: str, rule, rng: random.Random) -> str | None:
    """``prompt`` in another phrasing of ``rule`` (a PhrasingRule), or None when no pattern
    matches it. A template equal to the prompt is not drawn: the new row must be new."""
    for pattern in rule.match:
        m = re.fullmatch(pattern, prompt.strip())
        if m:
            options = [t.format(**m.groupdict()) for t in rule.templates]
            options = [o for o in options if o != prompt.strip()]
            return rng.choice(options) if options else None
    return None


def negative_for(rows: list, judge, rng: random.Random, tries: int = 8, scan: int = 200) -> dict[int, str]:
    """A dispreferred answer for each row without its own ``rejected`` (DPO pairs): the answer
    of another row, of the same category where one fails, that this row's declared metrics
    fail (judged with this row's reference and columns). Keyed by ``id(row)``: ``tries`` random
    candidates, then the first ``scan`` in order; a row for which none fails gets none (a DPO
    run names it)."""
    metrics = list(judge.task.metrics) or None  # none declared: exact against the reference

    def fails(answer: str, row) -> bool:
        v = judge.judge(answer, reference=row.reference, fields={**row.columns, "category": row.category},
                        only=metrics)
        scored = [s for name, s in v.scores.items() if metrics is None or name in metrics]
        return bool(scored) and min(scored) < 1.0

    by_category: dict[str, list] = {}
    for r in rows:
        by_category.setdefault(r.category, []).append(r)
    out: dict[int, str] = {}
    for row in rows:
        if row.rejected:
            continue
        pools = [by_category[row.category], rows]
        for pool in pools:
            candidates = [pool[rng.randrange(len(pool))] for _ in range(tries)] + pool[:scan]
            found = next((o.answer for o in candidates if o.answer != row.answer and fails(o.answer, row)), None)
            if found is not None:
                out[id(row)] = found
                break
    return out
