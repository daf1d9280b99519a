"""The catalogue of a run's checkpoints and the choice of the best one. Pure: the service
stores entries in JetStream KV, this module only decides."""

from __future__ import annotations

from pydantic import BaseModel


class Entry(BaseModel):
    step: int
    path: str
    base_model: str
    adapter: bool
    sha256: str
    bytes: int
    is_final: bool = False
    scores: dict[str, float] | None = None   # from the periodic verdict, once it arrived
    released: bool = False  # files deleted (a pruned run); the record stays


def best(entries: list[Entry], metric: str) -> Entry | None:
    """Highest score on ``metric``; ties go to the later step (more training, same score)."""
    scored = [e for e in entries if e.scores is not None]
    if not scored:
        return max(entries, key=lambda e: e.step, default=None)
    return max(scored, key=lambda e: (e.scores.get(metric, 0.0), e.step))


def pending(entries: list[Entry]) -> list[int]:
    """Steps still waiting for a verdict."""
    return sorted(e.step for e in entries if e.scores is None)
