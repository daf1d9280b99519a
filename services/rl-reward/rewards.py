"""Reward functions over completions. Pure; each returns a float per completion or raises
ValueError for that item alone (the service turns it into a per-item error)."""

from __future__ import annotations

from tuneloop.checks import check


def protocol(completion: str, reference: str | None, category: str | None) -> float:
    return 1.0 if check(completion, None, category).protocol else 0.0


def correctness(completion: str, reference: str | None, category: str | None) -> float:
    if reference is None:
        raise ValueError("correctness needs a reference answer")
    return 1.0 if check(completion, reference, category).correct else 0.0


REWARDS = {"protocol": protocol, "correctness": correctness}


def combined(completion: str, reference: str | None, category: str | None, weights: dict[str, float]) -> float:
    total = sum(weights.values()) or 1.0
    return sum(w * REWARDS[name](completion, reference, category) for name, w in weights.items()) / total
