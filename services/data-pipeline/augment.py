"""Augmentations: rows added to train by rules the config names. Pure.

- ``rephrase``: new phrasings of a prompt from the user's templates (``data.augment.phrasings``),
  so a model learns the task from more ways of asking than the data set has;
- ``negative_for``: a dispreferred answer for each row, for DPO pairs (``data.augment.negatives``):
  the answer of another row that fails the most of this row's task metrics.
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
    """A dispreferred answer for each row without its own ``rejected`` (DPO pairs): the answer of
    another row that fails the most of this row's declared metrics (judged with this row's
    reference and columns; none declared: ``exact``), so each pair holds the clearest contrast
    the data set offers (an answer that breaks the format fails what requires it too). Drawn
    from ``tries`` rows of the same category and ``tries`` of any; when none of those fails,
    the first of ``scan`` rows in order that does. Keyed by ``id(row)``; a row for which no
    answer fails gets none (a DPO run names it)."""
    metrics = list(judge.task.metrics) or None

    def failed(answer: str, row) -> int:
        v = judge.judge(answer, reference=row.reference, fields={**row.columns, "category": row.category},
                        only=metrics)
        return sum(s < 1.0 for name, s in v.scores.items() if metrics is None or name in metrics)

    by_category: dict[str, list] = {}
    for r in rows:
        by_category.setdefault(r.category, []).append(r)
    out: dict[int, str] = {}
    for row in rows:
        if row.rejected:
            continue
        same = by_category[row.category]
        drawn = [same[rng.randrange(len(same))] for _ in range(tries)] + [rows[rng.randrange(len(rows))] for _ in range(tries)]
        scored = [(failed(o.answer, row), -i, o.answer) for i, o in enumerate(drawn) if o.answer != row.answer]
        best = max(scored, default=(0, 0, None))
        if best[0] == 0:  # nothing drawn fails: the first row in order that does
            best = next(((1, 0, o.answer) for o in rows[:scan] if o.answer != row.answer and failed(o.answer, row)),
                        (0, 0, None))
        if best[0]:
            out[id(row)] = best[2]
    return out
