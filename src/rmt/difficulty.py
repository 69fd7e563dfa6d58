"""Token difficulty: proxy-model entropy, difficulty bands and evaluation splits (SPEC §2)."""

import numpy as np
import torch

# Band ids used across the project. NO_RL positions are learned by NTP only and never sampled for RL.
NO_RL, EASY, MEDIUM, HARD = 0, 1, 2, 3
BAND_NAMES = ("easy", "medium", "hard")  # names of bands EASY, MEDIUM, HARD, in that order

Entropy = np.ndarray | torch.Tensor


@torch.no_grad()  # a measurement of difficulty, never a loss term
def token_entropy(logits: torch.Tensor, top_k: int | None = None) -> torch.Tensor:
    """Entropy in nats of the next-token distribution over the last dim (SPEC §2).

    ``H_t = −Σ_v p(v|x_<t) log p(v|x_<t)``, over the full vocabulary or, with ``top_k``, over the
    ``top_k`` largest logits renormalised (RPT used top-16). Computed in float32 whatever the logits'
    dtype; the only [.., V]-sized intermediate is the probability tensor, which is overwritten in place.
    """
    if top_k is not None:
        logits = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    # entr gives 0 for p = 0, where p·log p would give NaN (logits of -inf).
    return torch.special.entr(probs, out=probs).sum(dim=-1)


def assign_bands(entropy: Entropy, thresholds: tuple[float, float, float] = (0.5, 1.0, 1.5)) -> Entropy:
    """Difficulty band of each position (SPEC §2), same array type as ``entropy``.

    ``H < t0`` → NO_RL, ``[t0, t1)`` → EASY, ``[t1, t2)`` → MEDIUM, ``H ≥ t2`` → HARD.
    """
    if list(thresholds) != sorted(thresholds):
        raise ValueError(f"thresholds must be non-decreasing, got {thresholds}")
    if isinstance(entropy, torch.Tensor):
        boundaries = torch.tensor(thresholds, dtype=entropy.dtype, device=entropy.device)
        return torch.bucketize(entropy, boundaries, right=True)
    return np.digitize(entropy, thresholds)


def quantile_thresholds(entropies: np.ndarray, floor: float = 0.5) -> tuple[float, float, float]:
    """Thresholds ``(floor, q1, q2)`` giving equal-count bands above the floor (SPEC §2, quantile mode).

    ``q1, q2`` are the 1/3 and 2/3 quantiles of the entropies ``H ≥ floor``, for models whose entropy
    scale differs from RPT's proxy.
    """
    entropies = np.asarray(entropies, dtype=np.float64)
    above = entropies[entropies >= floor]
    if above.size == 0:
        raise ValueError(
            f"no entropy reaches the floor {floor} "
            f"(max {entropies.max(initial=-np.inf):.4f}); lower the floor or use fixed thresholds"
        )
    q1, q2 = np.quantile(above, [1 / 3, 2 / 3])
    return float(floor), float(q1), float(q2)


def nested_split_masks(
    entropy: Entropy, thresholds: tuple[float, float, float] = (0.5, 1.0, 1.5)
) -> dict[str, Entropy]:
    """RPT's nested evaluation splits (SPEC §2, §9): easy ``H > t0``, medium ``H > t1``, hard ``H > t2``.

    Unlike the training bands these overlap (hard ⊂ medium ⊂ easy), as in both papers' tables.
    """
    return {name: entropy > t for name, t in zip(BAND_NAMES, thresholds)}
