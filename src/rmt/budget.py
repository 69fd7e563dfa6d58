"""Dynamic token budget (DTB) and the triangular length reward (SPEC §3)."""

import math


def token_budget(step: int, total_steps: int, b0: int = 800, b_min: int = 1, gamma: float = 0.2) -> int:
    """Reasoning-token budget at a training step (SPEC §3).

    ``B_t = max(B_min, floor(B_0 · γ^(t/T)))``. Paper values (B_0=800, γ=0.2) give 800 at t=0,
    357 at t=T/2 and 160 at t=T.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    return max(b_min, math.floor(b0 * gamma ** (step / total_steps)))


def length_reward(length: int, budget: int, r_max: float = 1.0) -> float:
    """Triangular length reward for ``length`` reasoning tokens under budget ``B`` (SPEC §3).

    ``r = r_max·ℓ/B`` for ℓ ≤ B, ``r_max·(2B−ℓ)/B`` for B < ℓ ≤ 2B, ``0`` beyond: it peaks when the
    trace uses exactly the budget.
    """
    if budget <= 0:
        raise ValueError(f"budget must be positive, got {budget}")
    # Scale a fraction in [0, 1], so float rounding can never push the reward above r_max.
    if length <= budget:
        return r_max * (length / budget)
    if length <= 2 * budget:
        return r_max * ((2 * budget - length) / budget)
    return 0.0
