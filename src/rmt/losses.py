"""GRPO advantages and clipped surrogate, masked NTP loss and the dual objective (SPEC §6, §7)."""

import torch
import torch.nn.functional as F


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, int]:
    """Group-relative advantages (SPEC §6): ``A_i = (r_i − mean(r)) / (std(r) + ε)`` within each group.

    ``rewards`` is [n_groups, G]. ``std`` is the sample standard deviation (Bessel-corrected,
    ``correction=1``), as in TRL's GRPO and ``torch.std``'s default. Groups whose rewards are all
    equal carry no signal: their advantages are exactly 0 and their number is returned beside them.
    """
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [n_groups, G] with G >= 2, got shape {tuple(rewards.shape)}")
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True, correction=1)
    advantages = (rewards - mean) / (std + eps)
    # Set exactly 0: the float mean of equal values can differ from them by an ulp.
    flat = (rewards == rewards[:, :1]).all(dim=1)
    advantages = torch.where(flat.unsqueeze(1), torch.zeros_like(advantages), advantages)
    return advantages, int(flat.sum())


def rlp_advantages(rewards: torch.Tensor, eps: float = 0.0) -> tuple[torch.Tensor, int]:
    """RLP's group advantages (SPEC §13): ``A_i = G/(G−1)·(r_i − mean(r))``, no std normalisation.

    The factor makes ``A_i`` the difference between ``r_i`` and the mean of the *other* G−1 rewards (a
    leave-one-out baseline). ``rewards`` is [n_groups, G]; ``eps`` is unused (the GRPO signature).
    Returns the advantages and the number of groups whose rewards are all equal (advantages 0).
    """
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [n_groups, G] with G >= 2, got shape {tuple(rewards.shape)}")
    G = rewards.shape[1]
    advantages = G / (G - 1) * (rewards - rewards.mean(dim=1, keepdim=True))
    flat = (rewards == rewards[:, :1]).all(dim=1)
    advantages = torch.where(flat.unsqueeze(1), torch.zeros_like(advantages), advantages)
    return advantages, int(flat.sum())


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-style clipped surrogate with token-level averaging (SPEC §6).

    Per token, with ``ρ = exp(log π − log π_old)``:
    ``ℓ = −min(ρ·A, clip(ρ, 1−ε, 1+ε)·A) + β·(exp(log π_ref − log π) − (log π_ref − log π) − 1)``
    (the KL term, Schulman's k3 estimator, only with ``ref_logprobs``), and
    ``L = Σ ℓ·m / max(Σ m, 1)`` over the whole batch, so every sampled token weighs the same whatever
    its response's length. ``logprobs``, ``old_logprobs``, ``mask`` are [B, T]; ``advantages`` is [B].
    ``mask`` is 1 on response tokens the policy sampled, 0 on padding and on tokens the rollout
    inserted (answer forcing). Returns the loss and stats ``clip_frac`` (and ``kl`` with a reference).
    """
    mask = mask.bool()
    n_tokens = mask.sum().clamp(min=1)
    # Zero masked log-ratios before exp: padding may hold any value, and inf·0 would give NaN.
    log_ratio = torch.where(mask, logprobs - old_logprobs.detach(), 0.0)
    ratio = torch.exp(log_ratio)
    adv = advantages.detach().unsqueeze(1)
    clipped_ratio = ratio.clamp(1 - clip_eps, 1 + clip_eps)
    per_token = -torch.min(ratio * adv, clipped_ratio * adv)
    # Tokens whose gradient the clip removed.
    clipped = ((ratio < 1 - clip_eps) & (adv < 0)) | ((ratio > 1 + clip_eps) & (adv > 0))
    stats = {"clip_frac": float((clipped & mask).sum() / n_tokens)}
    if ref_logprobs is not None:
        ref_diff = torch.where(mask, ref_logprobs.detach() - logprobs, 0.0)
        kl = torch.exp(ref_diff) - ref_diff - 1
        per_token = per_token + kl_coef * kl
        stats["kl"] = float((kl.detach() * mask).sum() / n_tokens)
    loss = (per_token * mask).sum() / n_tokens
    return loss, stats


ROWS_PER_CHUNK = 1024  # logit rows upcast to float32 at a time (1024 x 152k vocabulary = 0.6 GB)


def _chunked(fn, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`fn(logits_rows, targets_rows)` over [N, V] logits in chunks of rows. With gradients, each chunk is
    recomputed in the backward pass instead of keeping its float32 softmax: memory grows with the chunk,
    not with N (long packs and large vocabularies), and the values are the same."""
    if logits.shape[0] <= ROWS_PER_CHUNK:
        return fn(logits, targets)
    parts = []
    for i in range(0, logits.shape[0], ROWS_PER_CHUNK):
        rows, t = logits[i : i + ROWS_PER_CHUNK], targets[i : i + ROWS_PER_CHUNK]
        parts.append(torch.utils.checkpoint.checkpoint(fn, rows, t, use_reentrant=False)
                     if rows.requires_grad else fn(rows, t))
    return torch.cat(parts)


def _gather_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log p(target)`` at each position, in float32: ``log_softmax(logits)[…, target]``.

    ``logits`` is [..., V] and ``targets`` [...], already aligned (the logits at i scoring token i+1
    are the caller's shift). Computed in chunks of rows (`_chunked`), so the float32 copy of a long
    sequence's logits never exists whole.
    """
    shape = targets.shape
    return _chunked(_gather_logprobs, logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)).view(shape)


def ntp_loss(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Teacher-forced next-token cross-entropy over the masked-in targets (SPEC §7).

    ``L_NTP = −Σ_t m_t log p(x_t | x_<t) / Σ_t m_t``, where ``logits[:, i]`` predicts
    ``input_ids[:, i+1]`` and ``loss_mask`` [B, L] marks target positions (``m[b, t] = 1``: learn
    ``input_ids[b, t]``; position 0 is never a target). Callers zero the RL positions ``C`` and
    padding. With an all-ones mask this equals transformers' ``model(ids, labels=ids).loss``.
    """
    mask = loss_mask.bool()
    # Shift the targets rather than the logits, so the logits are viewed, not copied.
    targets = torch.full_like(input_ids, -100)
    targets[:, :-1] = input_ids[:, 1:].masked_fill(~mask[:, 1:], -100)
    per_token = _chunked(lambda rows, t: F.cross_entropy(rows.float(), t, ignore_index=-100, reduction="none"),
                         logits.flatten(0, 1), targets.flatten())
    return per_token.sum() / mask[:, 1:].sum().clamp(min=1)


def dual_objective(loss_rl, loss_ntp, ntp_weight: float):
    """RMT's dual objective (SPEC §7): ``L = L_RL + λ·L_NTP`` (paper λ = 0.1); tensors or numbers.

    The one place the two terms are combined: `grpo.policy_update` back-propagates it and logs it."""
    return loss_rl + ntp_weight * loss_ntp
