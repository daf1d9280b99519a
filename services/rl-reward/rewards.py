"""Reward functions over completions. Pure; each returns a float per completion or raises
ValueError for that item alone (the service turns it into a per-item error)."""

from __future__ import annotations

import difflib
import json

from tuneloop.checks import check


def protocol(completion: str, reference: str | None, category: str | None) -> float:
    return 1.0 if check(completion, None, category).protocol else 0.0


def correctness(completion: str, reference: str | None, category: str | None) -> float:
    if reference is None:
        raise ValueError("correctness needs a reference answer")
    return 1.0 if check(completion, reference, category).correct else 0.0


def similarity(completion: str, reference: str | None, category: str | None) -> float:
    """Partial credit: how close the answer is to the reference (0..1, 1 = exact; 0 off protocol).

    A binary reward gives a group of samples that are all wrong no signal at all; this one
    still ranks "37" above "12" for 36, so GRPO learns on prompts it cannot yet solve."""
    if reference is None:
        raise ValueError("similarity needs a reference answer")
    if not check(completion, None, category).protocol:
        return 0.0
    answer = json.loads(completion.strip())["answer"]
    return difflib.SequenceMatcher(None, answer, str(reference)).ratio()


def brevity(completion: str, reference: str | None, category: str | None) -> float:
    """Token efficiency: the length of the shortest protocol answer over this one's (1 = no waste)."""
    if reference is None:
        raise ValueError("brevity needs a reference answer")
    shortest = len(json.dumps({"task": category or "", "answer": reference}, ensure_ascii=False))
    return min(1.0, shortest / max(len(completion.strip()), 1))


REWARDS = {"protocol": protocol, "correctness": correctness, "similarity": similarity, "brevity": brevity}
DEFAULT_WEIGHTS = {"protocol": 1.0}


def check_weights(weights: dict[str, float]) -> dict[str, float]:
    """The weights to use; unknown reward names are a whole-request error, named."""
    weights = weights or DEFAULT_WEIGHTS
    unknown = sorted(set(weights) - set(REWARDS))
    if unknown:
        raise ValueError(f"unknown reward function(s) {unknown}; known: {sorted(REWARDS)}")
    if any(w < 0 for w in weights.values()) or not sum(weights.values()):
        raise ValueError(f"reward weights must be >= 0 and not all 0, got {weights}")
    return weights


def combine(values: dict[str, float], weights: dict[str, float]) -> float:
    """The weighted mean of the functions' rewards."""
    total = sum(weights.values()) or 1.0
    return sum(weights[name] * v for name, v in values.items()) / total
