"""The interaction protocol and its checks, shared by the evaluator and rl-reward.

The example protocol: the assistant answers with one JSON object holding exactly the
string fields ``task`` (the category of the request) and ``answer``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

REQUIRED_KEYS = ("task", "answer")


@dataclass(frozen=True)
class CheckResult:
    protocol: bool
    correct: bool
    reason: str = ""


def check(output: str, reference: str | None = None, category: str | None = None) -> CheckResult:
    """Does ``output`` follow the protocol, and (when a reference is known) is it right?"""
    text = output.strip()
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return CheckResult(False, False, f"not JSON: {e.msg} at char {e.pos}")
    if not isinstance(obj, dict):
        return CheckResult(False, False, f"JSON {type(obj).__name__}, expected an object")
    missing = [k for k in REQUIRED_KEYS if k not in obj]
    if missing:
        return CheckResult(False, False, f"missing keys: {', '.join(missing)}")
    extra = sorted(set(obj) - set(REQUIRED_KEYS))
    if extra:
        return CheckResult(False, False, f"unexpected keys: {', '.join(extra)}")
    if not all(isinstance(obj[k], str) for k in REQUIRED_KEYS):
        return CheckResult(False, False, "task and answer must be strings")
    if category is not None and obj["task"] != category:
        return CheckResult(False, False, f"task {obj['task']!r}, expected {category!r}")
    if reference is None:
        return CheckResult(True, False, "")
    correct = obj["answer"].strip() == str(reference).strip()
    return CheckResult(True, correct, "" if correct else f"answer {obj['answer']!r}, expected {reference!r}")
