"""The policy update every recipe shares (SPEC §6, §7, §13): trajectories in, one gradient out.

    trajectories = make_trajectories(rollouts, advantages, ...)   # what the update needs of each response
    losses = policy_update(model, trajectories, documents, ntp_masks, settings, backend, ...)

`policy_update` applies the dual objective ``L = L_RL + λ·L_NTP`` (SPEC §7, `losses.dual_objective`) once,
chunk by chunk: ``L_RL`` is the clipped surrogate (SPEC §6, `losses.grpo_loss`) over the trajectories'
loss tokens -- or their negative log-likelihood for supervised steps (the cold start) -- and ``L_NTP`` the
masked next-token loss over the step's documents. Both are token-level means over the whole step on
all processes, so the gradient does not depend on how the work is chunked, packed or spread over ranks.

Two backends compute the chunks' log-probabilities, with equal results (tests compare them):

- `PackedBackend`: one forward per document over ``[window | prompt prefix | post + response_1 | ...]``
  with a block attention mask (`rmt.packed`): the shared prefix is encoded once;
- `PerRolloutBackend`: one padded row per trajectory, and a separate pass over the documents -- the
  reference path, and the one for prompts that are not document positions (post-training questions).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch

from rmt.forward import document_logits, response_logprobs
from rmt.losses import dual_objective, grpo_loss, group_advantages, ntp_loss, rlp_advantages
from rmt.packed import PackItem, pack_documents, packed_forward

ADVANTAGES = {"grpo": group_advantages, "rlp": rlp_advantages}  # rewards [groups, G] -> (advantages, zero_std)


@dataclass
class Trajectory:
    """One response and what the update needs of it."""

    prompt_ids: list[int]
    response_ids: list[int]
    loss_mask: list[int]  # 1 on response tokens the loss covers: sampled by the policy (RLP: the thought only)
    advantage: float = 0.0
    doc: int | None = None  # index into the step's documents; None for prompts that are not positions
    position: int | None = None  # the document position t the prompt stops before
    reward: float = 0.0
    reward_parts: dict[str, float] = field(default_factory=dict)


def make_trajectories(rollouts, scores: list[dict], advantages: torch.Tensor, where=None,
                      loss_tokens: str = "sampled") -> list[Trajectory]:
    """Trajectories of a step's rollouts (groups of G consecutive rollouts; `advantages` is [groups, G]).

    `where[g]` is group g's (document index, position), or None for question prompts. `loss_tokens`:
    `sampled` keeps every token the policy sampled, `thought` only those before `</think>` (RLP)."""
    G = advantages.shape[1]
    flat = advantages.flatten().tolist()
    out = []
    for k, (r, score) in enumerate(zip(rollouts, scores, strict=True)):
        mask = list(r.sampled_mask)
        if loss_tokens == "thought":
            mask = [m if i < r.reasoning_len else 0 for i, m in enumerate(mask)]
        doc, position = where[k // G] if where is not None else (None, None)
        parts = {key: value for key, value in score.items() if key != "reward"}
        out.append(Trajectory(list(r.prompt_ids), list(r.response_ids), mask, flat[k], doc, position,
                              score["reward"], parts))
    return out


@dataclass(frozen=True)
class UpdateSettings:
    objective: str = "clipped"  # clipped (PPO-style surrogate, SPEC §6) | nll (supervised, the cold start)
    clip_eps: float = 0.2
    kl_coef: float = 0.0
    ntp_weight: float = 0.0  # λ
    micro_batch: int = 16  # sequences per forward, per-rollout backend
    pack_tokens: int = 4096  # longest packed sequence, packed backend


@dataclass
class Chunk:
    """What one forward gives the loss: response log-probs of some trajectories and/or NTP logits."""

    rows: list[int]  # trajectory indices, in the order of `logprobs`' rows
    logprobs: torch.Tensor | None = None  # [B, R], row b's response in its last columns
    mask: torch.Tensor | None = None  # [B, R] loss mask there
    ntp_logits: torch.Tensor | None = None  # [D, n, V]
    ntp_ids: torch.Tensor | None = None  # [D, n]
    ntp_target: torch.Tensor | None = None  # [D, n] 1 where input_ids[:, t] is an NTP target


class PackedBackend:
    """Each document's window and trajectories in packs (`rmt.packed`); needs SDPA attention."""

    def __init__(self, pre: list[int], post: list[int], pack_tokens: int = 4096, blocks: bool = True):
        self.pre, self.post, self.pack_tokens, self.blocks = pre, post, pack_tokens, blocks

    def plan(self, trajectories, documents, with_ntp: bool) -> list:
        items = [PackItem(t.doc, t.position, t.response_ids, t.loss_mask) for t in trajectories]
        return pack_documents(self.pre, self.post, documents, items, with_windows=with_ntp,
                              max_tokens=self.pack_tokens)

    def forward(self, model, pack, ntp_masks) -> Chunk:
        out = packed_forward(model, pack, self.blocks)
        chunk = Chunk(pack.items, out.logprobs if pack.items else None, out.mask if pack.items else None)
        if out.ntp_logits is not None:
            target = torch.as_tensor(np.asarray(ntp_masks[pack.doc]), dtype=torch.float32,
                                     device=out.ntp_logits.device)[None]
            chunk.ntp_logits, chunk.ntp_ids, chunk.ntp_target = out.ntp_logits, out.ntp_ids, target
        return chunk


class PerRolloutBackend:
    """Trajectories in padded micro-batches of full prompts, then the documents for NTP."""

    def __init__(self, pad_id: int, micro_batch: int = 16):
        self.pad_id, self.micro = pad_id, micro_batch

    def plan(self, trajectories, documents, with_ntp: bool) -> list:
        def batches(items):
            return [(list(range(i, min(i + self.micro, len(items)))), items[i : i + self.micro])
                    for i in range(0, len(items), self.micro)]

        return [("rl", *b) for b in batches(trajectories)] + ([("ntp", *b) for b in batches(documents)]
                                                             if with_ntp else [])

    def forward(self, model, spec, ntp_masks) -> Chunk:
        kind, rows, items = spec
        if kind == "rl":
            logprobs, mask = response_logprobs(model, [t.prompt_ids for t in items], [t.response_ids for t in items],
                                               [t.loss_mask for t in items], self.pad_id)
            return Chunk(rows, logprobs, mask)
        logits, ids, _ = document_logits(model, items, self.pad_id)
        target = torch.zeros_like(ids, dtype=torch.float32)
        for j, d in enumerate(rows):
            m = np.asarray(ntp_masks[d])
            target[j, : len(m)] = torch.as_tensor(m, dtype=torch.float32)
        return Chunk([], ntp_logits=logits, ntp_ids=ids, ntp_target=target)


def policy_update(model, trajectories: list[Trajectory], documents=(), ntp_masks=(),
                  settings: UpdateSettings = UpdateSettings(), backend=None, reference=None,
                  backward=None, global_sum=None, global_max=None, autocast=contextlib.nullcontext) -> dict:
    """Backpropagate ``L = L_RL + λ·L_NTP`` for one step; returns the loss values (and clip/KL stats).

    `documents` are the step's windows (token ids) and `ntp_masks[d]` document d's NTP targets; with no
    documents (or λ = 0) there is no NTP term. `backward(loss, last)` runs each chunk's backward (default
    `loss.backward()`; the trainer passes the engine's, which reduces gradients on the `last` one only).
    `global_sum(x)` sums a number over processes, `global_max(n)` takes the largest (default: one process).

    Every process runs the same number of forwards and backwards, whatever its share of the work: the
    engine's collectives (DDP's buffer broadcast in each forward, the gradient all-reduce, FSDP's weight
    gathers) must be issued in the same order everywhere, or the processes wait on each other forever. A
    process with fewer chunks than the busiest one runs filler chunks: a one-token forward whose loss is
    multiplied by 0, so it adds nothing to the gradient.
    """
    global_sum = global_sum or (lambda x: x)
    global_max = global_max or (lambda x: x)
    backward = backward or (lambda loss, last: loss.backward())
    lam = settings.ntp_weight
    rl_tokens = global_sum(sum(sum(t.loss_mask) for t in trajectories))
    ntp_tokens = global_sum(sum(int(np.asarray(m).sum()) for m in ntp_masks)) if lam > 0 else 0
    advantages = torch.tensor([t.advantage for t in trajectories], dtype=torch.float32)
    specs = backend.plan(trajectories, list(documents), with_ntp=ntp_tokens > 0) if (trajectories or ntp_tokens) else []
    sums = {"rl": 0.0, "ntp": 0.0}
    weighted: dict[str, float] = {}  # clip / KL stats times their chunk's loss tokens
    stat_tokens = 0.0
    n_chunks = int(global_max(len(specs)))
    for i in range(len(specs), n_chunks):  # fillers first: the real work's last backward stays last
        with autocast():
            filler = _filler_loss(model)
        backward(filler, i == n_chunks - 1)
    for i, spec in enumerate(specs):
        with autocast():
            chunk = backend.forward(model, spec, ntp_masks)
        device = chunk.logprobs.device if chunk.logprobs is not None else chunk.ntp_logits.device
        loss_rl = loss_ntp = torch.zeros((), device=device)
        if chunk.rows and rl_tokens:
            loss_rl, chunk_stats = _rl_loss(chunk, advantages[chunk.rows].to(device), settings, rl_tokens,
                                            _reference_logprobs(reference, backend, spec, ntp_masks, autocast))
            tokens = float(chunk.mask.sum())
            for key, value in chunk_stats.items():  # token means over this process's chunks
                weighted[key] = weighted.get(key, 0.0) + value * tokens
            stat_tokens += tokens
        if chunk.ntp_logits is not None and ntp_tokens:
            loss_ntp = ntp_loss(chunk.ntp_logits, chunk.ntp_ids, chunk.ntp_target) * (chunk.ntp_target.sum() / ntp_tokens)
        backward(dual_objective(loss_rl, loss_ntp, lam), n_chunks - len(specs) + i == n_chunks - 1)
        sums["rl"] += float(loss_rl.detach())
        sums["ntp"] += float(loss_ntp.detach())
    loss_rl, loss_ntp = global_sum(sums["rl"]), global_sum(sums["ntp"])
    stats = {key: value / stat_tokens for key, value in weighted.items()}
    return {"loss": float(dual_objective(loss_rl, loss_ntp, lam)), "loss_rl": loss_rl, "loss_ntp": loss_ntp,
            "chunks": len(specs), **stats}


def _filler_loss(model) -> torch.Tensor:
    """A forward through every parameter that contributes nothing: the loss of one token, times 0."""
    device = next(model.parameters()).device
    return model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device)).logits.float().sum() * 0.0


def _rl_loss(chunk: Chunk, advantages, settings: UpdateSettings, rl_tokens: float, ref_logprobs):
    """This chunk's share of L_RL: its token-mean loss weighted by its share of the step's loss tokens."""
    share = chunk.mask.sum() / rl_tokens
    if settings.objective == "nll":
        nll = -(chunk.logprobs * chunk.mask).sum() / chunk.mask.sum().clamp(min=1)
        return nll * share, {}
    # One policy update per batch of rollouts: the old policy is the current one (ratio = 1).
    loss, stats = grpo_loss(chunk.logprobs, chunk.logprobs.detach(), advantages, chunk.mask, settings.clip_eps,
                            ref_logprobs, settings.kl_coef)
    return loss * share, stats


def _reference_logprobs(reference, backend, spec, ntp_masks, autocast):
    if reference is None:
        return None
    with torch.no_grad(), autocast():
        return backend.forward(reference, spec, ntp_masks).logprobs
