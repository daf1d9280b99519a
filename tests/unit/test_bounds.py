"""Bounds a sequential verdict can look at after every shard (tuneloop.bounds)."""

import random

import pytest

from tuneloop.bounds import confidence_sequence


def running(values, confidence):
    return [confidence_sequence(values[:n], confidence) for n in range(1, len(values) + 1)]


@pytest.mark.parametrize("p", [0.2, 0.5, 0.9])
def test_the_true_mean_leaves_the_bound_at_some_look_at_most_alpha_of_the_time(p):
    """Anytime validity: over many runs of 120 cases looked at after every 8, the share of runs
    where *any* look excludes the true mean stays under 1 - confidence (a fixed-n interval
    looked at 15 times would exceed it several times over)."""
    confidence, runs, missed = 0.8, 200, 0
    for seed in range(runs):
        rng = random.Random(seed)
        xs = [float(rng.random() < p) for _ in range(120)]
        looks = [confidence_sequence(xs[:n], confidence) for n in range(8, 121, 8)]
        missed += any(not b.lo <= p <= b.hi for b in looks)
    assert missed / runs <= 1 - confidence


def test_a_fixed_n_normal_interval_checked_at_every_look_would_not_be_valid():
    """The reason for the sequence: the same runs through a 80% normal interval at each look
    miss the true mean far more often than 20% (so the test above can fail)."""
    runs, missed, p = 200, 0, 0.5
    for seed in range(runs):
        rng = random.Random(seed)
        xs = [float(rng.random() < p) for _ in range(120)]
        for n in range(8, 121, 8):
            m = sum(xs[:n]) / n
            r = 1.2816 * max(m * (1 - m), 1e-9) ** 0.5 / n ** 0.5
            if not m - r <= p <= m + r:
                missed += 1
                break
    assert missed / runs > 0.3


def test_the_bound_narrows_with_cases_and_contains_the_mean():
    rng = random.Random(1)
    xs = [float(rng.random() < 0.7) for _ in range(400)]
    widths = [b.hi - b.lo for b in running(xs, 0.9)[15::64]]
    assert widths == sorted(widths, reverse=True) and widths[-1] < 0.2
    b = confidence_sequence(xs, 0.9)
    assert b.lo <= b.mean <= b.hi and b.n == 400


def test_scores_near_an_edge_get_a_narrow_bound():
    """Empirical variance, not the worst case: 48 cases all right are surely above 0.85."""
    b = confidence_sequence([1.0] * 48, 0.8)
    assert b.lo > 0.85 and b.hi == 1.0
    half = confidence_sequence([1.0, 0.0] * 24, 0.8)
    assert half.hi - half.lo > 2 * (b.hi - b.lo)


def test_confidence_zero_is_the_point_estimate_and_bad_input_is_named():
    b = confidence_sequence([1.0, 0.0, 1.0, 1.0], 0.0)
    assert (b.lo, b.mean, b.hi) == (0.75, 0.75, 0.75)
    with pytest.raises(ValueError, match="scores in \\[0, 1\\]"):
        confidence_sequence([0.5, 1.5], 0.9)
    with pytest.raises(ValueError, match="confidence 1.0"):
        confidence_sequence([0.5], 1.0)
