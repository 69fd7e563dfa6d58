"""SPEC §3: dynamic token budget and triangular length reward."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rmt.budget import length_reward, token_budget


def test_budget_paper_values():
    # 800·0.2^0 = 800; 800·0.2^0.5 = 357.77 → 357; 800·0.2^1 = 160.
    assert token_budget(0, 1000) == 800
    assert token_budget(500, 1000) == 357
    assert token_budget(1000, 1000) == 160


def test_budget_floor_at_b_min():
    assert token_budget(100, 100, b0=10, b_min=5, gamma=0.01) == 5  # floor(0.1) = 0 → 5
    assert token_budget(100, 100, b0=10, gamma=0.01) == 1  # default b_min


def test_budget_rejects_zero_total_steps():
    with pytest.raises(ValueError):
        token_budget(0, 0)


@settings(max_examples=50, deadline=None)
@given(total=st.integers(1, 10_000), a=st.integers(0, 10_000), b=st.integers(0, 10_000))
def test_budget_monotone_non_increasing(total, a, b):
    early, late = sorted((a, b))
    assert token_budget(late, total) <= token_budget(early, total)
    assert token_budget(late, total) >= 1


@pytest.mark.parametrize(
    ("length", "expected"),
    [(0, 0.0), (50, 0.5), (100, 1.0), (150, 0.5), (200, 0.0), (201, 0.0), (10_000, 0.0)],
)
def test_length_reward_triangle(length, expected):
    assert length_reward(length, 100) == pytest.approx(expected)


def test_length_reward_scales_with_r_max():
    assert length_reward(100, 100, r_max=2.0) == 2.0
    assert length_reward(25, 100, r_max=2.0) == pytest.approx(0.5)


@settings(max_examples=100, deadline=None)
@given(length=st.integers(0, 5000), budget=st.integers(1, 1000), r_max=st.floats(0.0, 10.0))
def test_length_reward_bounded(length, budget, r_max):
    assert 0.0 <= length_reward(length, budget, r_max) <= r_max
