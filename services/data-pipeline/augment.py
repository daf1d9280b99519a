"""Augmentations: rows added to train by rules the config names. Pure.

- ``rephrase``: new phrasings of a prompt from the user's templates (``data.augment.phrasings``),
  so a model learns the protocol from more ways of asking than the data set has;
- ``break_protocol``: the negative twin of an answer, for DPO pairs (``data.augment.negatives``).
"""

from __future__ import annotations

import json
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


def break_protocol(answer: str) -> str:
    """A dispreferred twin of a protocol answer, for DPO pairs: the same content as prose.

    ``{"task": "math", "answer": "26"}`` becomes ``The answer is 26.``: right content, wrong
    format, so preference training pushes towards the protocol itself.
    """
    try:
        obj = json.loads(answer)
    except ValueError:
        return f"Sure! {answer}"
    if isinstance(obj, dict) and "answer" in obj:
        return f"The answer is {obj['answer']}."
    return f"Sure! Here it is: {answer}"
