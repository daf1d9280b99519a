"""A GRPO reward for the arithmetic task, written for TRL's GRPOTrainer: the same function
plugs into tuneloop unchanged (``train.grpo.rewards: {"arithmetic.rewards:close_answer": 1.0}``).

TRL's signature: ``(prompts, completions, **columns) -> list[float]``; the columns include the
data set's own and tuneloop's ``reference`` (here, the number of the demonstration's Answer line).
"""

from __future__ import annotations

import re

ANSWER = re.compile(r"Answer:\s*(-?\d+)")


def close_answer(prompts, completions, reference, **kwargs) -> list[float]:
    """1 for the right number on an Answer line, less the further off it is, 0 without one:
    a group of wrong samples still ranks a near miss above a far one."""
    out = []
    for completion, ref in zip(completions, reference):
        text = completion[0]["content"] if isinstance(completion, list) else completion  # conversational or not
        m = ANSWER.search(text)
        if m is None or ref is None:
            out.append(0.0)
            continue
        off = abs(int(m.group(1)) - int(ref))
        out.append(1.0 / (1.0 + off))
    return out
