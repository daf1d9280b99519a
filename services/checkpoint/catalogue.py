"""The catalogue of a run's checkpoints and the choice of the best one. Pure: the service
stores entries in JetStream KV, this module only decides."""

from __future__ import annotations

from pydantic import BaseModel

from tuneloop.task import goal


class Entry(BaseModel):
    step: int
    path: str
    base_model: str
    adapter: bool
    sha256: str
    bytes: int
    is_final: bool = False
    scores: dict[str, float] | None = None   # from the periodic verdict, once it arrived
    bounds: dict[str, list[float]] = {}  # the verdict's bounds (a sequential verdict may have ended early)
    released: bool = False  # files deleted (a pruned run, a snapshot outscored); the record stays
    snapshot: bool = False  # weights only, for evaluation (eval.every); not resumable
    evaluated: bool = True  # a verdict was asked for (False: a checkpoint kept for resume only)
    saved_by: str | None = None  # event id of the ckpt.saved recorded: a redelivery of it changes nothing
    discarded: bool = False  # saved after a savepoint that the run rolled back to (released too)


def best(entries: list[Entry], metric: str) -> Entry | None:
    """Best on ``metric`` (the lowest for eval_loss and perplexity) by what its verdict is sure
    of: the lower bound where the verdict has one (a verdict that ended early on a few cases
    does not win on a lucky mean), else the score; ties go to the later step (more training)."""
    live = [e for e in entries if not e.released]
    scored = [e for e in live if e.scores is not None]
    if not scored:
        return max(live, key=lambda e: e.step, default=None)
    sign = -1.0 if goal(metric) == "min" else 1.0
    worst = float("-inf")  # an entry without the metric loses to every one with it

    def sure(e: Entry) -> float:
        if metric not in e.scores:
            return worst
        lo, hi = e.bounds.get(metric) or (e.scores[metric],) * 2
        return sign * (hi if sign < 0 else lo)

    return max(scored, key=lambda e: (sure(e), e.step))


def pending(entries: list[Entry]) -> list[int]:
    """Steps still waiting for a verdict."""
    return sorted(e.step for e in entries if e.evaluated and e.scores is None and not e.released)


def stale_snapshots(entries: list[Entry], metric: str) -> list[Entry]:
    """Scored snapshots that can no longer be exported (another entry scores at least as
    well): their files can go. A snapshot exists to be evaluated and, if best, exported;
    keeping every one would fill the disk with full copies of the weights."""
    top = best(entries, metric)
    return [e for e in entries if e.snapshot and not e.released and e.scores is not None
            and top is not None and e.step != top.step]
