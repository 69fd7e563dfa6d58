"""Uncertainty of accuracies: percentile-bootstrap confidence intervals over evaluated positions.

An accuracy on n positions is a mean of 0/1 outcomes; its 95% interval is the 2.5th and 97.5th
percentiles of the accuracy over `resamples` resamples of the positions (drawn with replacement). The
nested splits (H > t0 ⊇ H > t1 ⊇ H > t2, SPEC §9) and their average ("Avg.") are recomputed on each
resample, so the interval of the average accounts for the splits sharing positions.

Two models evaluated on the same positions are compared *paired*: each resample draws positions once and
takes both models' outcomes there, so the interval of the difference is much narrower than the two
intervals side by side. A difference whose interval holds 0 is "cannot tell".

Positions are resampled independently; positions of one document are correlated, so the intervals are, if
anything, a little too narrow -- the report says so.
"""

from __future__ import annotations

import numpy as np

from rmt.difficulty import BAND_NAMES, nested_split_masks

RESAMPLES = 2000
LEVEL = 0.95


def _split_means(values: np.ndarray, masks: np.ndarray, index: np.ndarray) -> np.ndarray:
    """[resamples, splits + 1]: the mean of `values` within each split on each resample, and their average."""
    v = values[index]  # [R, n]
    out = []
    for mask in masks:
        m = mask[index]
        count = m.sum(axis=1)
        out.append(np.where(count > 0, (v * m).sum(axis=1) / np.maximum(count, 1), np.nan))
    out = np.stack(out, axis=1)
    present = ~np.isnan(out).all(axis=0)
    avg = np.nanmean(out[:, present], axis=1) if present.any() else np.full(len(index), np.nan)
    return np.concatenate([out, avg[:, None]], axis=1)


def _interval(samples: np.ndarray, level: float) -> list[float | None]:
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return [None, None]
    lo, hi = np.percentile(finite, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return [float(lo), float(hi)]


def split_intervals(entropy, correct, thresholds, resamples: int = RESAMPLES, seed: int = 0,
                    level: float = LEVEL) -> dict:
    """Bootstrap intervals of the accuracy per nested split and of their average:
    `{"splits": {name: [lo, hi]}, "avg": [lo, hi]}`."""
    entropy, correct = np.asarray(entropy, dtype=float), np.asarray(correct, dtype=float)
    masks = np.stack([m for m in nested_split_masks(entropy, tuple(thresholds)).values()]) \
        if entropy.size else np.zeros((3, 0), bool)
    if entropy.size == 0:
        return {"splits": {name: [None, None] for name in BAND_NAMES}, "avg": [None, None]}
    index = np.random.default_rng(seed).integers(0, entropy.size, size=(resamples, entropy.size))
    means = _split_means(correct, masks, index)
    return {"splits": {name: _interval(means[:, i], level) for i, name in enumerate(BAND_NAMES)},
            "avg": _interval(means[:, -1], level)}


def paired_difference(entropy, correct_a, correct_b, thresholds, resamples: int = RESAMPLES, seed: int = 0,
                      level: float = LEVEL) -> dict:
    """Accuracy of A minus accuracy of B on the same positions, per nested split and on average, with
    paired-bootstrap intervals: `{name: {"diff": d, "ci": [lo, hi]}, ..., "avg": {...}}`."""
    entropy = np.asarray(entropy, dtype=float)
    diff = np.asarray(correct_a, dtype=float) - np.asarray(correct_b, dtype=float)
    masks = np.stack([m for m in nested_split_masks(entropy, tuple(thresholds)).values()])
    observed = _split_means(diff, masks, np.arange(entropy.size)[None])[0]
    index = np.random.default_rng(seed).integers(0, entropy.size, size=(resamples, entropy.size))
    means = _split_means(diff, masks, index)
    names = [*BAND_NAMES, "avg"]
    return {name: {"diff": None if np.isnan(observed[i]) else float(observed[i]), "ci": _interval(means[:, i], level)}
            for i, name in enumerate(names)}


def verdict(ci: list[float | None]) -> str:
    """"higher", "lower" or "cannot tell" (the interval holds 0) for a difference's interval."""
    lo, hi = ci
    if lo is None:
        return "cannot tell"
    if lo > 0:
        return "higher"
    if hi < 0:
        return "lower"
    return "cannot tell"


def mean_interval(values, resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> list[float | None]:
    """Bootstrap interval of a plain mean (e.g. reasoning length)."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return [None, None]
    index = np.random.default_rng(seed).integers(0, values.size, size=(resamples, values.size))
    return _interval(values[index].mean(axis=1), level)


def paired_mean_difference(a, b, resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> dict:
    """mean(a − b) over paired items with its bootstrap interval."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    return {"diff": float(d.mean()) if d.size else None, "ci": mean_interval(d, resamples, seed, level)}


def thirds_difference(values, weights=None, resamples: int = RESAMPLES, seed: int = 0,
                      level: float = LEVEL) -> dict | None:
    """Does a per-step series rise over training? The weighted mean of its last third of steps minus its
    first third, with a bootstrap interval that resamples steps within each third (steps, not rollouts,
    are the units: rollouts of one step share a model and a document). `weights[s]` is step s's count
    (e.g. positions of a band that step; steps with weight 0 or a missing value are left out).
    None when either third has no step."""
    values = np.asarray(values, dtype=float)
    weights = np.ones_like(values) if weights is None else np.asarray(weights, dtype=float)
    n = len(values) // 3
    if n == 0:
        return None
    thirds = []
    for part in (slice(0, n), slice(len(values) - n, len(values))):
        v, w = values[part], weights[part]
        keep = np.isfinite(v) & (w > 0)
        if not keep.any():
            return None
        thirds.append((v[keep], w[keep]))
    rng = np.random.default_rng(seed)
    observed, samples = [], []
    for v, w in thirds:
        observed.append(float((v * w).sum() / w.sum()))
        index = rng.integers(0, v.size, size=(resamples, v.size))
        samples.append((v[index] * w[index]).sum(axis=1) / w[index].sum(axis=1))
    return {"first": observed[0], "last": observed[1], "diff": observed[1] - observed[0],
            "ci": _interval(samples[1] - samples[0], level), "steps": n}
