"""Bootstrap intervals and paired differences (`rmt.stats`) against hand-computed cases."""

import numpy as np
import pytest

from rmt.stats import (mean_interval, paired_difference, paired_mean_difference, split_intervals, thirds_difference,
                       verdict)

THRESHOLDS = (0.5, 1.0, 1.5)


def test_intervals_of_certain_outcomes_are_points():
    entropy = np.array([0.7, 1.2, 1.8, 2.0])
    out = split_intervals(entropy, np.ones(4), THRESHOLDS)
    assert out["avg"] == [1.0, 1.0] and all(ci == [1.0, 1.0] for ci in out["splits"].values())
    out = split_intervals(entropy, np.zeros(4), THRESHOLDS)
    assert out["avg"] == [0.0, 0.0]


def test_interval_matches_the_normal_approximation():
    rng = np.random.default_rng(0)
    n = 400
    correct = rng.random(n) < 0.3
    entropy = np.full(n, 2.0)  # every position in every nested split: the three accuracies are the same
    out = split_intervals(entropy, correct, THRESHOLDS, resamples=4000)
    p = correct.mean()
    half = 1.96 * np.sqrt(p * (1 - p) / n)  # ≈ 4.5 points at p = 0.3
    lo, hi = out["splits"]["hard"]
    assert lo == pytest.approx(p - half, abs=0.01) and hi == pytest.approx(p + half, abs=0.01)
    assert out["avg"] == pytest.approx(out["splits"]["easy"], abs=1e-12)


def test_a_split_without_positions_has_no_interval():
    out = split_intervals(np.array([0.7, 0.8]), np.array([1.0, 0.0]), THRESHOLDS)
    assert out["splits"]["hard"] == [None, None] and out["splits"]["easy"][0] is not None


def test_paired_difference_hand_computed():
    entropy = np.array([0.7, 0.7, 1.2, 1.2, 1.8, 1.8])
    a = np.array([1, 1, 1, 0, 1, 0])
    b = np.array([0, 1, 0, 0, 0, 0])
    d = paired_difference(entropy, a, b, THRESHOLDS)
    # easy (all 6): 4/6 − 1/6 = 0.5; medium (last 4): 2/4 − 0 = 0.5; hard (last 2): 1/2 − 0 = 0.5
    assert d["easy"]["diff"] == pytest.approx(0.5)
    assert d["medium"]["diff"] == pytest.approx(0.5) and d["hard"]["diff"] == pytest.approx(0.5)
    assert d["avg"]["diff"] == pytest.approx(0.5)
    same = paired_difference(entropy, a, a, THRESHOLDS)
    assert same["avg"] == {"diff": 0.0, "ci": [0.0, 0.0]} and verdict(same["avg"]["ci"]) == "cannot tell"


def test_pairing_narrows_the_interval():
    rng = np.random.default_rng(1)
    n = 300
    entropy = np.full(n, 2.0)
    b = (rng.random(n) < 0.4).astype(float)
    a = b.copy()
    flip = rng.choice(n, size=15, replace=False)  # A fixes 15 of B's errors or makes them: mostly equal
    a[flip] = 1.0
    d = paired_difference(entropy, a, b, THRESHOLDS)
    unpaired_half = 1.96 * np.sqrt(2 * 0.4 * 0.6 / n)
    lo, hi = d["avg"]["ci"]
    assert lo > 0 and (hi - lo) / 2 < unpaired_half / 2
    assert verdict(d["avg"]["ci"]) == "higher" and verdict([-0.2, -0.1]) == "lower"
    assert verdict([-0.1, 0.2]) == "cannot tell" and verdict([None, None]) == "cannot tell"


def test_mean_intervals():
    assert mean_interval([3.0, 3.0, 3.0]) == [3.0, 3.0]
    assert mean_interval([]) == [None, None]
    d = paired_mean_difference([5.0, 6.0, 7.0], [1.0, 2.0, 3.0])
    assert d == {"diff": 4.0, "ci": [4.0, 4.0]}


def test_thirds_difference_hand_computed():
    # 9 steps: thirds are steps 0-2 and 6-8; the middle third is ignored.
    values = [0.2, 0.4, 0.3, 9.0, 9.0, 9.0, 0.5, 0.7, 0.6]
    out = thirds_difference(values)
    assert out["first"] == pytest.approx(0.3) and out["last"] == pytest.approx(0.6)
    assert out["diff"] == pytest.approx(0.3) and out["steps"] == 3
    lo, hi = out["ci"]
    assert 0.0 < lo <= 0.3 <= hi  # every resample of the last third beats every one of the first
    # Weights: a step counts by its weight; weight 0 or a missing value leaves the step out.
    out = thirds_difference([0.0, 1.0, np.nan, 0, 0, 0, 1.0, 0.0, 0.5], weights=[1, 3, 5, 1, 1, 1, 0, 1, 1])
    assert out["first"] == pytest.approx(0.75) and out["last"] == pytest.approx(0.25)
    # A constant series: difference 0, a point interval; too few steps or an empty third: None.
    assert thirds_difference([0.4] * 6) == {"first": 0.4, "last": 0.4, "diff": 0.0, "ci": [0.0, 0.0], "steps": 2}
    assert thirds_difference([0.1, 0.2]) is None
    assert thirds_difference([0.1, 0.2, 0.3], weights=[0, 1, 1]) is None
