"""How sure a score is: a confidence sequence for the mean of per-case scores in [0, 1]. Pure.

A verdict is read after every shard (sequential verdicts), so its bound must stay valid however
often it is looked at and wherever the looking stops: a fixed-n interval checked after each shard
would be wrong far more often than it says. This is the hedged-capital betting confidence
sequence of Waudby-Smith & Ramdas, "Estimating means of bounded random variables by betting"
(JRSS-B 2023, Theorem 3, with their predictable plug-in bets): for every candidate mean ``m``
two gamblers bet that the scores come out above ``m`` and below it; ``m`` stays in the set while
neither has multiplied its capital by ``1 / alpha``. By Ville's inequality the true mean leaves
the set at some look with probability at most ``alpha`` (tests/unit/test_bounds.py checks it
by simulation). For 0/1 scores it is about 1.4x as wide as a normal interval at one fixed n,
and far narrower near 0 and 1.

The cases must come in an order that does not depend on their scores: the evaluator shuffles
a split with a seed fixed per run (``tuneloop.evaluator``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

GRID = 1001  # candidate means 0, 0.001, ..., 1: the bound's resolution
CAP = 0.5  # largest fraction of capital a bet may stake (the paper's c)


@dataclass(frozen=True)
class Bound:
    """The mean of ``n`` scores and where the true mean lies with probability ``confidence``."""

    mean: float
    lo: float
    hi: float
    n: int
    confidence: float

    def as_list(self) -> list[float]:
        return [round(self.lo, 4), round(self.hi, 4)]


def confidence_sequence(values: list[float], confidence: float) -> Bound:
    """The running bound after ``values`` (each in [0, 1], in the order they were scored).

    ``confidence`` 0 asks for no bound: the interval is the mean itself (decisions on point
    estimates, tuneloop's rule before bounds)."""
    n = len(values)
    mean = sum(values) / n if n else 0.0
    if confidence <= 0 or n == 0:
        return Bound(mean, mean if n else 0.0, mean if n else 1.0, n, confidence)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence {confidence} must be in (0, 1)")
    if any(not 0.0 <= v <= 1.0 for v in values):
        raise ValueError("a confidence sequence needs scores in [0, 1]")
    import numpy as np

    alpha = 1.0 - confidence
    m = np.linspace(0.0, 1.0, GRID)
    with np.errstate(divide="ignore"):
        up_cap, down_cap = CAP / m, CAP / (1.0 - m)  # a bet never risks more than it holds
    log_up = np.zeros(GRID)
    log_down = np.zeros(GRID)
    alive = np.ones(GRID, dtype=bool)
    threshold = math.log(1.0 / alpha)
    log2a = math.log(2.0 / alpha)
    total, squares, var_prev = 0.0, 0.0, 0.25  # predictable plug-in: estimates from the cases before
    for t, x in enumerate(values, 1):
        lam = math.sqrt(2.0 * log2a / (var_prev * t * math.log(1.0 + t)))
        log_up += np.log1p(np.minimum(lam, up_cap) * (x - m))
        log_down += np.log1p(-np.minimum(lam, down_cap) * (x - m))
        wealth = np.logaddexp(log_up, log_down) + math.log(0.5)  # hedged: half the capital each way
        alive &= wealth < threshold  # the running intersection: once out, a mean stays out
        total += x
        mu = (0.5 + total) / (t + 1)
        squares += (x - mu) ** 2
        var_prev = (0.25 + squares) / (t + 1)
    inside = np.flatnonzero(alive)
    if not len(inside):  # numerically possible only at the grid's edges: the mean is all that is left
        return Bound(mean, mean, mean, n, confidence)
    step = 1.0 / (GRID - 1)
    lo, hi = max(0.0, m[inside[0]] - step), min(1.0, m[inside[-1]] + step)  # the grid's rounding, outwards
    return Bound(mean, float(min(lo, mean)), float(max(hi, mean)), n, confidence)
