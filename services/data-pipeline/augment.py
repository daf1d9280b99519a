"""Simple augmentations of prepared rows. Pure."""

from __future__ import annotations

import json


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
