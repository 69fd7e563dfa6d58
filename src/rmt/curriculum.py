"""Curriculum-based adaptive sampling (CAS) of RL positions (SPEC §5)."""

from typing import Any

import numpy as np

from rmt.difficulty import EASY, HARD, MEDIUM

BandProbs = tuple[float, float, float]  # probabilities of (easy, medium, hard)


def band_probabilities(
    step: int, total_steps: int, p_early: BandProbs, p_late: BandProbs, t1: float = 0.3, t2: float = 0.7
) -> BandProbs:
    """Band distribution at a training step (SPEC §5).

    ``p_t = p_early`` for ``t < t1·T``, ``p_late`` for ``t ≥ t2·T``, and in between
    ``p_t = (1 − α)·p_early + α·p_late`` with ``α = (t/T − t1)/(t2 − t1)``.
    """
    for name, p in (("p_early", p_early), ("p_late", p_late)):
        if len(p) != 3 or min(p) < 0 or not np.isclose(sum(p), 1.0):
            raise ValueError(f"{name} must be 3 non-negative probabilities summing to 1, got {p}")
    progress = step / total_steps
    if progress < t1:
        return tuple(p_early)
    if progress >= t2:
        return tuple(p_late)
    alpha = (progress - t1) / (t2 - t1)
    return tuple((1 - alpha) * early + alpha * late for early, late in zip(p_early, p_late))


class BandSampler:
    """Draws the RL positions ``C`` of a document: a band from ``p_t``, then a position in it (SPEC §5).

    Holds its own random generator so that a resumed run continues the exact same sequence.
    """

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def sample(self, bands: np.ndarray, probs: BandProbs | None, k: int) -> np.ndarray:
        """Up to ``k`` distinct positions (indices into ``bands``, sorted ascending).

        Each draw picks a band from ``probs`` renormalised over the bands with positions left, then a
        position uniformly within it; bands with probability 0 are never drawn. ``probs=None`` samples
        uniformly over all positions with band ≥ EASY (RPT's uniform sampling). Returns fewer than
        ``k`` positions when too few are eligible, and never a position of band NO_RL.
        """
        bands = np.asarray(bands)
        if probs is None:
            eligible = np.flatnonzero(bands >= EASY)
            chosen = self.rng.choice(eligible, size=min(k, eligible.size), replace=False)
            return np.sort(chosen)
        pools = [np.flatnonzero(bands == band).tolist() for band in (EASY, MEDIUM, HARD)]
        weights = np.asarray(probs, dtype=np.float64)
        chosen = []
        for _ in range(k):
            available = weights * np.array([len(pool) > 0 for pool in pools])
            if available.sum() <= 0:
                break
            pool = pools[self.rng.choice(3, p=available / available.sum())]
            index = self.rng.integers(len(pool))
            # Swap-remove: O(1) and keeps the drawn positions distinct.
            pool[index], pool[-1] = pool[-1], pool[index]
            chosen.append(pool.pop())
        return np.sort(np.asarray(chosen, dtype=np.int64))

    def state_dict(self) -> dict[str, Any]:
        """The generator's state (JSON-serialisable)."""
        return self.rng.bit_generator.state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`; the sampler then continues the same sequence."""
        self.rng.bit_generator.state = state
