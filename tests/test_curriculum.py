"""SPEC §5: curriculum band probabilities and the band sampler."""

import json

import numpy as np
import pytest

from rmt.curriculum import BandSampler, band_probabilities
from rmt.difficulty import EASY, HARD, MEDIUM, NO_RL

P_EARLY = (0.6, 0.3, 0.1)
P_LATE = (0.1, 0.3, 0.6)


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, (0.6, 0.3, 0.1)),
        (29, (0.6, 0.3, 0.1)),
        (30, (0.6, 0.3, 0.1)),  # t1: interpolation starts from p_early
        (50, (0.35, 0.3, 0.35)),  # halfway between t1 and t2
        (70, (0.1, 0.3, 0.6)),
        (100, (0.1, 0.3, 0.6)),
    ],
)
def test_band_probabilities(step, expected):
    probs = band_probabilities(step, 100, P_EARLY, P_LATE)
    assert probs == pytest.approx(expected)
    assert sum(probs) == pytest.approx(1.0)


def test_band_probabilities_rejects_bad_distribution():
    with pytest.raises(ValueError):
        band_probabilities(0, 100, (0.5, 0.3, 0.1), P_LATE)


def _bands(n_per_band=300):
    """Positions 0..4n−1, n of each band NO_RL, EASY, MEDIUM, HARD, interleaved."""
    return np.tile(np.array([NO_RL, EASY, MEDIUM, HARD]), n_per_band)


def test_sampler_band_frequencies_follow_probs():
    sampler, bands = BandSampler(seed=0), _bands()
    draws = np.array([bands[sampler.sample(bands, P_EARLY, k=1)[0]] for _ in range(4000)])
    freqs = [np.mean(draws == band) for band in (EASY, MEDIUM, HARD)]
    assert freqs == pytest.approx(P_EARLY, abs=0.03)


def test_sampler_renormalises_over_non_empty_bands():
    sampler = BandSampler(seed=1)
    bands = np.array([NO_RL, MEDIUM, NO_RL, HARD, MEDIUM, HARD, HARD])  # no easy positions
    for _ in range(200):
        positions = sampler.sample(bands, (0.9, 0.05, 0.05), k=2)
        assert len(positions) == 2
        assert set(bands[positions]) <= {MEDIUM, HARD}


def test_sampler_never_draws_zero_probability_band():
    sampler = BandSampler(seed=2)
    bands = np.array([EASY, EASY, HARD, HARD])
    positions = sampler.sample(bands, (1.0, 0.0, 0.0), k=4)
    assert positions.tolist() == [0, 1]


def test_sampler_distinct_sorted_and_exhausts():
    sampler, bands = BandSampler(seed=3), _bands(5)
    positions = sampler.sample(bands, P_LATE, k=100)  # only 15 eligible
    assert len(positions) == 15
    assert positions.tolist() == sorted(set(positions.tolist()))
    assert NO_RL not in bands[positions]
    small = sampler.sample(bands, P_LATE, k=6)
    assert len(small) == len(set(small.tolist())) == 6


def test_sampler_no_eligible_positions():
    sampler = BandSampler(seed=4)
    for probs in (P_EARLY, None):
        assert sampler.sample(np.array([NO_RL, NO_RL]), probs, k=3).size == 0
        assert sampler.sample(np.array([], dtype=np.int64), probs, k=3).size == 0


def test_sampler_deterministic_under_seed():
    bands = _bands(50)
    a, b = BandSampler(seed=7), BandSampler(seed=7)
    for probs in (P_EARLY, None, P_LATE):
        assert np.array_equal(a.sample(bands, probs, k=8), b.sample(bands, probs, k=8))


def test_sampler_state_dict_round_trip_continues_sequence():
    bands = _bands(50)
    original = BandSampler(seed=11)
    original.sample(bands, P_EARLY, k=5)
    state = json.loads(json.dumps(original.state_dict()))  # survives a JSON checkpoint
    expected = [original.sample(bands, probs, k=5) for probs in (P_EARLY, None)]
    resumed = BandSampler(seed=999)
    resumed.load_state_dict(state)
    for probs, positions in zip((P_EARLY, None), expected):
        assert np.array_equal(resumed.sample(bands, probs, k=5), positions)


def test_sampler_uniform_over_eligible_positions():
    sampler = BandSampler(seed=5)
    bands = np.array([NO_RL, EASY, HARD, HARD, HARD, NO_RL, MEDIUM, EASY])
    eligible = np.flatnonzero(bands >= EASY)
    counts = np.zeros(len(bands))
    for _ in range(3000):
        counts[sampler.sample(bands, None, k=1)] += 1
    assert counts[bands == NO_RL].sum() == 0
    # Uniform over positions, not bands: each of the 6 eligible positions gets ≈ 1/6.
    assert counts[eligible] / 3000 == pytest.approx(np.full(6, 1 / 6), abs=0.03)
