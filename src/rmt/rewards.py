"""Rewards (SPEC §3, §4, §10, §13): answer parsing, the match functions, and reward objects.

A reward is an object called once per step on all of the step's rollouts:

    reward(rollouts, tasks, context) -> list of {"reward": r, <part>: value, ...}, one dict per rollout

where `tasks[i]` is what rollout i answers (a `NextToken` position, or a `MathQuestion`) and `context` is
the trainer's state (`RewardContext`: step, total steps, budget B_t). `"reward"` is the total the
advantages are computed from; the other keys are its parts, which the trainer logs as `reward_<part>_mean`.
A reward may keep state across steps: `after_step(model)` is called after every optimizer step, and
`state_dict()` / `load_state_dict()` go into checkpoints (RLP's moving-average baseline model does both).
A reward that runs the policy sets `runs_policy = True`: the trainer then gathers sharded weights for it.
`build_reward` makes the configured one; a new reward is a class with `__call__` and an entry in `REWARDS`
-- or, without touching this package, a class of your own named in the config as `package.module:Class`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from rmt.budget import length_reward

_THINK_END = "</think>"
_BOX_OPEN = "\\boxed{"
PREFIX_TOKENS = 16  # continuation tokens a multi-token (prefix) prediction may cover


# ---- parsing and the pure match functions ----------------------------------------------------------


def extract_prediction(response: str) -> str | None:
    """Content of the last ``\\boxed{…}`` after the last ``</think>`` (RPT's rule, SPEC §1).

    Braces inside the box must balance (``\\boxed{\\frac{1}{2}}`` → ``\\frac{1}{2}``); the content is
    returned verbatim, leading spaces included, because a token may begin with one. Returns None when
    there is no ``</think>``, no box after it, or the last box is never closed. Never raises.
    """
    think_end = response.rfind(_THINK_END)
    if think_end < 0:
        return None
    answer = response[think_end + len(_THINK_END):]
    prediction = None
    start = answer.find(_BOX_OPEN)
    while start >= 0:
        # Walk to the brace that closes this box, so boxes nested inside it stay part of its content.
        content_start = start + len(_BOX_OPEN)
        depth = 1
        pos = content_start
        while pos < len(answer) and depth:
            if answer[pos] == "{":
                depth += 1
            elif answer[pos] == "}":
                depth -= 1
            pos += 1
        if depth:
            return None  # an unclosed box runs to the end, so it is the last one
        prediction = answer[content_start:pos - 1]
        start = answer.find(_BOX_OPEN, pos)
    return prediction


def _utf8(text: str) -> bytes:
    # surrogatepass: a lone surrogate (never produced by a tokenizer, but possible in odd input) is bytes too
    return text.encode("utf-8", errors="surrogatepass")


def exact_match(prediction: str | None, target_text: str) -> float:
    """RMT's match reward (SPEC §4): 1 iff the prediction equals the decoded target token.

    ``r = 1[pred == x_t]``. String equality is UTF-8 byte equality, so a missing leading space fails.
    """
    return float(prediction is not None and prediction == target_text)


def prefix_match(prediction: str | None, continuation_tokens: Sequence[str | bytes]) -> float:
    """RPT's match reward (SPEC §4): 1 iff the prediction is a token-aligned prefix of the continuation.

    ``r = 1[bytes(pred) == bytes(x_t … x_{t+k−1}) for some k ≥ 1]``. ``continuation_tokens`` are the
    tokens ``x_t, x_{t+1}, …`` as decoded strings, or as raw bytes for byte-level tokenizers whose
    tokens may split a multibyte character. Bytes are compared, never re-tokenised ids, because
    re-tokenising a lone answer breaks on leading spaces.
    """
    if not prediction:
        return 0.0
    pred = _utf8(prediction)
    continuation = b""
    for token in continuation_tokens:
        continuation += token if isinstance(token, bytes) else _utf8(token)
        if len(continuation) >= len(pred):
            # The first boundary at or past the prediction's end decides: it must end exactly there.
            return float(continuation == pred)
    return 0.0


def total_reward(match: float, length: float, length_weight: float) -> float:
    """Total reward (SPEC §4): ``r = (1 − w)·r_match + w·r_len``."""
    return (1.0 - length_weight) * match + length_weight * length


# ---- the interface --------------------------------------------------------------------------------


@dataclass(frozen=True)
class NextToken:
    """A next-token-reasoning task (SPEC §1): predict ``ids[position]`` from ``ids[:position]``."""

    ids: Sequence[int]
    position: int


@dataclass(frozen=True)
class RewardContext:
    """The trainer's state a reward may use."""

    step: int  # 0-based step being trained
    total_steps: int  # T
    budget: int | None = None  # B_t of this step; None when the dynamic budget is off


class Reward(Protocol):
    name: str

    def __call__(self, rollouts: list, tasks: list, context: RewardContext) -> list[dict[str, float]]:
        """One dict per rollout with the total under "reward" and its parts."""


# ---- next-token rewards ----------------------------------------------------------------------------


class NextTokenMatch:
    """r = (1 − w)·r_match + w·r_len (SPEC §4) with the length term only under a budget (SPEC §3), and, with
    `length_needs_close`, only for reasoning the policy closed itself. Subclasses define `match`."""

    name = ""

    def __init__(self, tokenizer, length_weight: float = 0.0, r_max: float = 1.0, length_needs_close: bool = True):
        self.tokenizer = tokenizer
        self.length_weight = length_weight
        self.r_max = r_max
        self.length_needs_close = length_needs_close

    def match(self, prediction: str | None, task: NextToken) -> float:
        raise NotImplementedError

    def __call__(self, rollouts, tasks, context: RewardContext) -> list[dict[str, float]]:
        w = self.length_weight if context.budget is not None else 0.0
        out = []
        for rollout, task in zip(rollouts, tasks, strict=True):
            match = self.match(extract_prediction(rollout.text), task)
            counts = context.budget and (rollout.closed_think or not self.length_needs_close)
            length = length_reward(rollout.reasoning_len, context.budget, self.r_max) if counts else 0.0
            out.append({"reward": total_reward(match, length, w), "match": match, "len": length})
        return out


class ExactMatch(NextTokenMatch):
    """RMT's reward: the boxed prediction equals the decoded next token."""

    name = "exact"

    def match(self, prediction, task: NextToken) -> float:
        return exact_match(prediction, self.tokenizer.decode([int(task.ids[task.position])]))


class PrefixMatch(NextTokenMatch):
    """RPT's reward: the boxed prediction is a token-aligned byte prefix of the continuation."""

    name = "prefix"

    def match(self, prediction, task: NextToken) -> float:
        from rmt.prompts import token_bytes

        continuation = task.ids[task.position : task.position + PREFIX_TOKENS]
        return prefix_match(prediction, token_bytes(self.tokenizer, continuation))


class MathAnswer:
    """Post-training's verifiable reward (SPEC §10): 1 if the boxed answer equals the gold one
    (`rmt.mathdata.answers_match`); tasks are `MathQuestion`s."""

    name = "math"

    def __call__(self, rollouts, tasks, context: RewardContext) -> list[dict[str, float]]:
        from rmt.mathdata import math_reward

        return [{"reward": math_reward(r.text, q.answer)} for r, q in zip(rollouts, tasks, strict=True)]


# ---- RLP (SPEC §13) ----------------------------------------------------------------------------------


class RLPReward:
    """RLP's dense reward: ``r = log p_θ(x_t | x_<t, <think> c </think>) − log p_φ(x_t | x_<t)``.

    Both terms are teacher-forced log-probabilities computed without gradient: the first with the policy
    after its thought `c` (the rollout's reasoning, closed with `</think>` when the cap cut it), the second
    with no thought under `φ`, an exponential moving average of the policy that starts as a copy of it and
    follows ``φ ← τ·φ + (1−τ)·θ`` after every optimizer step (`after_step`). Its expectation over thoughts is
    the cross-entropy reduction the thought buys, so it gives a signal before the model can write a box.
    Rollouts come from the raw prompt `x_<t <think>` (prompt style `raw`) and stop at `</think>`.
    """

    name = "rlp"
    runs_policy = True  # teacher-forced forwards of the policy: sharded weights must be gathered

    def __init__(self, policy, tokenizer, decay: float = 0.999, batch_size: int = 16):
        import copy

        self.policy = policy
        self.decay = decay
        self.batch_size = batch_size
        self.ema = copy.deepcopy(policy).eval().requires_grad_(False)
        self.close_ids = tokenizer("\n" + _THINK_END, add_special_tokens=False)["input_ids"]
        self.pad_id = tokenizer.pad_token_id

    @torch.no_grad()
    def __call__(self, rollouts, tasks, context: RewardContext) -> list[dict[str, float]]:
        scored = []
        for r, task in zip(rollouts, tasks, strict=True):
            thought = r.response_ids[: r.reasoning_len]
            scored.append((list(r.prompt_ids) + list(thought) + self.close_ids, int(task.ids[task.position])))
        # The baseline depends on the position only: one forward per distinct context and target.
        keys = [tuple(int(i) for i in task.ids[: task.position + 1]) for task in tasks]
        distinct = list(dict.fromkeys(keys))
        without = dict(zip(distinct, self._logprobs(self.ema, [(list(k[:-1]), k[-1]) for k in distinct])))
        out = []
        for value, key in zip(self._logprobs(self.policy, scored), keys):
            out.append({"reward": value - without[key], "logp_thought": value, "logp_baseline": without[key]})
        return out

    def _logprobs(self, model, pairs: list[tuple[list[int], int]]) -> list[float]:
        """log p(target | prefix) for each (prefix, target), batched."""
        from rmt.forward import response_logprobs

        was_training = model.training
        model.eval()
        values = []
        for i in range(0, len(pairs), self.batch_size):
            chunk = pairs[i : i + self.batch_size]
            logprobs, _ = response_logprobs(model, [p for p, _ in chunk], [[t] for _, t in chunk],
                                            [[1]] * len(chunk), self.pad_id)
            values += logprobs[:, -1].float().tolist()
        model.train(was_training)
        return values

    @torch.no_grad()
    def after_step(self, model) -> None:
        """φ ← τ·φ + (1−τ)·θ, parameter by parameter (and buffers copied)."""
        for ema, param in zip(self.ema.parameters(), model.parameters(), strict=True):
            ema.lerp_(param.detach().to(ema.dtype), 1.0 - self.decay)

    def state_dict(self) -> dict:
        return {"ema": {k: v.detach().cpu().clone() for k, v in self.ema.state_dict().items()}}

    def load_state_dict(self, state: dict) -> None:
        self.ema.load_state_dict(state["ema"])


REWARDS = {"exact": ExactMatch, "prefix": PrefixMatch, "math": MathAnswer, "rlp": RLPReward}


def import_reward(path: str):
    """A user's reward class from `package.module:Class`, built with no arguments."""
    import importlib

    from rmt.errors import RmtError

    module, _, name = path.partition(":")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise RmtError(f"reward '{path}': cannot import it ({exc}); give package.module:Class") from exc
    return cls()


def build_reward(config, tokenizer, policy=None) -> Reward:
    """The reward object of a `RewardConfig` section (`config.name` in `REWARDS`, or an import path)."""
    if ":" in config.name:
        return import_reward(config.name)
    if config.name in ("exact", "prefix"):
        return REWARDS[config.name](tokenizer, config.length_weight, config.r_max, config.length_needs_close)
    if config.name == "rlp":
        return RLPReward(policy, tokenizer, config.ema_decay)
    return REWARDS[config.name]()
