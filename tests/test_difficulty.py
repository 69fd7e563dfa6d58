"""SPEC §2: token entropy, difficulty bands, quantile thresholds, nested evaluation splits."""

import math

import numpy as np
import pytest
import torch

from rmt.difficulty import (
    BAND_NAMES,
    EASY,
    HARD,
    MEDIUM,
    NO_RL,
    assign_bands,
    nested_split_masks,
    quantile_thresholds,
    token_entropy,
)


def test_band_constants():
    assert (NO_RL, EASY, MEDIUM, HARD) == (0, 1, 2, 3)
    assert BAND_NAMES == ("easy", "medium", "hard")


def test_entropy_uniform_is_log_v():
    assert token_entropy(torch.zeros(2, 3, 100)) == pytest.approx(torch.full((2, 3), math.log(100)))


def test_entropy_one_hot_is_zero():
    logits = torch.full((4, 50), -1e4)
    logits[:, 7] = 1e4
    assert token_entropy(logits) == pytest.approx(torch.zeros(4), abs=1e-6)


def test_entropy_handles_minus_inf():
    logits = torch.tensor([0.0, 0.0, float("-inf")])
    assert token_entropy(logits).item() == pytest.approx(math.log(2))


def test_entropy_top_k_renormalises():
    # Top-2 of (log 3, log 1, ...) renormalised is (0.75, 0.25).
    logits = torch.tensor([math.log(3), math.log(1), -20.0, -30.0, -25.0])
    expected = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert token_entropy(logits, top_k=2).item() == pytest.approx(expected, rel=1e-5)
    assert token_entropy(logits, top_k=100).item() == pytest.approx(token_entropy(logits).item())


def test_entropy_matches_numpy_and_is_float32_for_bf16():
    logits = torch.randn(3, 7, 64, generator=torch.Generator().manual_seed(0)) * 3
    x = logits.double().numpy()
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    expected = -(p * np.log(p)).sum(-1)
    assert token_entropy(logits).numpy() == pytest.approx(expected, rel=1e-5)
    half = token_entropy(logits.bfloat16())
    assert half.dtype == torch.float32
    assert half.numpy() == pytest.approx(expected, abs=0.05)  # only the bf16 rounding of inputs


def test_assign_bands_at_thresholds():
    values = [0.0, 0.4999, 0.5, 0.9999, 1.0, 1.4999, 1.5, 7.0]
    expected = [NO_RL, NO_RL, EASY, EASY, MEDIUM, MEDIUM, HARD, HARD]
    assert assign_bands(np.array(values)).tolist() == expected
    assert assign_bands(torch.tensor(values, dtype=torch.float64)).tolist() == expected
    assert assign_bands(np.array([0.1, 0.2, 0.3]), thresholds=(0.15, 0.25, 0.3)).tolist() == [0, 1, 3]


def test_assign_bands_rejects_unsorted_thresholds():
    with pytest.raises(ValueError):
        assign_bands(np.array([1.0]), thresholds=(1.0, 0.5, 1.5))


def test_quantile_thresholds_equal_counts():
    rng = np.random.default_rng(0)
    below = rng.uniform(0.0, 0.5, size=50)
    above = rng.uniform(0.5, 4.0, size=300)
    entropies = rng.permutation(np.concatenate([below, above]))
    thresholds = quantile_thresholds(entropies, floor=0.5)
    assert thresholds[0] == 0.5
    counts = np.bincount(assign_bands(entropies, thresholds), minlength=4)
    assert counts.tolist() == [50, 100, 100, 100]


def test_quantile_thresholds_nothing_above_floor():
    with pytest.raises(ValueError, match="floor"):
        quantile_thresholds(np.array([0.1, 0.2]), floor=0.5)


def test_nested_split_masks():
    entropy = np.array([0.3, 0.5, 0.7, 1.0, 1.2, 1.5, 2.0])
    masks = nested_split_masks(entropy)
    assert masks["easy"].tolist() == [False, False, True, True, True, True, True]  # strictly > 0.5
    assert masks["medium"].tolist() == [False, False, False, False, True, True, True]
    assert masks["hard"].tolist() == [False, False, False, False, False, False, True]
    torch_masks = nested_split_masks(torch.tensor(entropy))
    assert all(torch_masks[name].tolist() == masks[name].tolist() for name in BAND_NAMES)
