"""`rmt warmup`: the supervised cold start that teaches a model next-token reasoning before any RL (SPEC §14).

A model that cannot yet answer in the format -- reason inside `<think> … </think>`, then put the next
token in `\\boxed{}` -- gives RL nothing to learn from: every reward is 0. The cold start shows it the
format on `midtrain` positions, with the true next token as the answer:

    prompt(x_<t, B)  →  <thought> \\n</think> \\boxed{x_t}

and trains on those responses with the negative log-likelihood (`grpo.policy_update` with
`objective="nll"`), plus λ·NTP over the same documents so that ordinary language modelling is kept.

The thought is chosen by measurement (README, "The cold start"): `empty` writes none -- `</think>` at once,
then the box -- and `tail` restates the last `thought_tokens` tokens of the context, a reasoning step meant
to carry the end of the text across the prompt's closing template to the box. On the embedded model the
empty thought learned faster and kept more of the plain next-token skill, so it is the default. The answer
is the target token's id itself, so a warmed model's boxed answer is its next-token prediction through the
format; RL then decides how long the reasoning before it should be. Each document's prompt names a budget drawn from
`budgets`, so the warmed model follows any budget that RL will name later.

It reads the scored dataset's `midtrain` split only: evaluation text is never seen (tested). It writes a
run folder with checkpoints like `rmt train` and resumes the same way; give its folder as `--model` to
`rmt train` (every method then starts from the same warmed model).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from rmt.config import Flag, OptimConfig, RunConfig, add_config_arguments, check, config_from_args
from rmt.difficulty import EASY
from rmt.errors import RmtError
from rmt.grpo import PackedBackend, Trajectory, UpdateSettings, policy_update
from rmt.prompts import PromptBuilder
from rmt.rollout import answer_format_ids
from rmt.runs import DataOrder, TrainingRun, add_resume_arguments, check_run_dir, config_for, resume_options
from rmt.scored import load_scored, ntp_target_mask

THOUGHTS = ("empty", "tail", "mixed")


@dataclass
class WarmupConfig(RunConfig):
    """`rmt warmup`: supervised next-token-reasoning examples from the midtrain split (the cold start)."""

    out: str = "runs/warmup"
    """Run folder: config.yaml, metrics.jsonl, checkpoints/ (give it to `rmt train --model`)."""
    data: str = "runs/scored"
    """An `rmt score` output folder; only its midtrain split is read."""
    steps: int = 60
    """Optimizer steps."""
    docs_per_step: int = 4
    """Documents per step (divisible by the number of processes)."""
    positions_per_doc: int = 16
    """Examples per document: positions drawn uniformly above the entropy floor."""
    thought: str = "empty"
    """empty: no thought, `</think>` at once (measured best, README "The cold start"); tail: the thought
    restates the last `thought_tokens` tokens of the context; mixed: it restates the last k tokens, k drawn
    uniformly from 0..thought_tokens per example, so the warmed model writes thoughts of many lengths for
    the budget's length reward to choose among."""
    thought_tokens: int = 4
    """Tokens of the context the `tail` thought restates (the most the `mixed` one does)."""
    budgets: list[int | None] = field(default_factory=lambda: [None, 1, 2, 4, 8, 16, 32])
    """Budgets B named in the prompts (one drawn per document; null: no budget in the prompt). Include
    the budgets RL will name: DTB ends at B_min = 1."""
    prompt_style: str = "auto"
    """auto | chat | plain (see `rmt.prompts.PromptBuilder`); use the style the later stages use."""
    ntp_weight: float = 1.0
    """λ of the NTP term over the same documents, which keeps the model's plain next-token skill."""
    save_every: int = 60
    """Checkpoint every this many steps (and at the end)."""
    keep_last: int = 1
    """Checkpoints kept."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4))

    def __post_init__(self):
        super().__post_init__()
        check([
            (self.docs_per_step >= 1 and self.positions_per_doc >= 1, "docs_per_step and positions_per_doc must be >= 1"),
            (self.thought in THOUGHTS, f"thought must be one of {', '.join(THOUGHTS)}, got '{self.thought}'"),
            (self.thought_tokens >= 1, "thought_tokens must be >= 1"),
            (bool(self.budgets) and all(b is None or b >= 1 for b in self.budgets),
             "budgets must list budgets >= 1 (or null)"),
            (self.prompt_style in ("auto", "chat", "plain"), "prompt_style must be auto, chat or plain"),
            (self.ntp_weight >= 0, "ntp_weight must be >= 0"),
        ], prefix="warmup")


FLAGS = (Flag("--model", "model"), Flag("--data", "data"), Flag("--out", "out"), Flag("--steps", "steps", int))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, WarmupConfig, FLAGS)
    add_resume_arguments(parser)


def run(args: argparse.Namespace) -> int:
    warmup(config_for(args, WarmupConfig, FLAGS), **resume_options(args))
    return 0


def example_response(window_ids, position: int, thought: str, thought_tokens: int, format_ids) -> list[int]:
    """The target response for position t: the thought (the last `thought_tokens` tokens of the context, or
    none), `\\n</think>`, ` \\boxed{`, the token x_t, `}`."""
    close_ids, box_ids, end_ids = format_ids
    ids = [int(i) for i in window_ids]
    restated = ids[max(0, position - thought_tokens) : position] if thought != "empty" and thought_tokens else []
    return restated + close_ids + box_ids + [ids[position]] + end_ids


def warmup(config: WarmupConfig, resume: bool = False, allow_changes: bool = False,
           previous_if_damaged: bool = False) -> Path:
    # ---- build ----------------------------------------------------------------------------------------
    check_run_dir(config.out, resume)  # the run folder first: a resume of nothing fails at once
    windows, _ = load_scored(config.data, "midtrain")  # never the eval split
    windows = [w for w in windows if (w.band >= EASY).any()]
    if not windows:
        raise RmtError(f"{config.data}: no midtrain position above the entropy floor to learn from")
    run = TrainingRun(config, config.optim, resume, allow_changes=allow_changes,
                      previous_if_damaged=previous_if_damaged)
    if config.docs_per_step % run.world:
        raise RmtError(f"docs_per_step={config.docs_per_step} must be divisible by the {run.world} processes")
    prompt = PromptBuilder(run.tokenizer, config.prompt_style, prefill_think=True)
    format_ids = answer_format_ids(run.tokenizer)
    update = UpdateSettings(objective="nll", ntp_weight=config.ntp_weight, pack_tokens=1 << 30)
    order = DataOrder(np.random.default_rng(config.seed + 1), len(windows))
    rng = np.random.default_rng(config.seed)
    start = run.start([order, _Generator(rng)])

    progress = tqdm(range(start, config.steps), initial=start, total=config.steps, desc="warmup",
                    disable=not run.main, dynamic_ncols=True)
    for step in progress:
        t0 = time.perf_counter()
        # ---- documents, positions and budgets: every process draws the step's, keeps its share ---------
        step_docs = [windows[i] for i in order.take(config.docs_per_step)]
        step_positions, step_budgets = [], []
        for w in step_docs:
            eligible = np.flatnonzero(w.band >= EASY)
            chosen = rng.choice(eligible, size=min(config.positions_per_doc, eligible.size), replace=False)
            step_positions.append(np.sort(chosen))
            step_budgets.append(config.budgets[int(rng.integers(len(config.budgets)))])
        # Thought lengths: fixed, or (mixed) drawn per example; drawn for the whole step on every process.
        step_lengths = [rng.integers(0, config.thought_tokens + 1, size=len(p)) if config.thought == "mixed"
                        else np.full(len(p), config.thought_tokens) for p in step_positions]
        _, docs = run.share(step_docs)
        _, positions = run.share(step_positions)
        _, budgets = run.share(step_budgets)
        _, thought_lengths = run.share(step_lengths)

        # ---- examples and the update: NLL of the responses + λ·NTP, one document (prompt) at a time -------
        losses = {"loss": 0.0, "loss_rl": 0.0, "loss_ntp": 0.0}
        n_docs = len(docs)
        for d, (w, pos, budget, lengths) in enumerate(zip(docs, positions, budgets, thought_lengths)):
            pre, post = prompt.parts(budget)
            trajectories = []
            for t, k in zip(pos, lengths):
                response = example_response(w.input_ids, int(t), config.thought, k, format_ids)
                trajectories.append(Trajectory(pre + [int(i) for i in w.input_ids[:t]] + post, response,
                                               [1] * len(response), doc=0, position=int(t)))
            # Each document is its own packed update of equal weight: its losses are scaled by 1/n_docs.
            part = policy_update(
                run.model, trajectories, [w.input_ids], [ntp_target_mask(w, pos)], update,
                PackedBackend(pre, post, update.pack_tokens),
                backward=lambda loss, last, d=d: run.backward(loss / n_docs, last and d == n_docs - 1),
                global_sum=run.global_sum, global_max=run.global_max, autocast=run.accelerator.autocast)
            for key in losses:
                losses[key] += part[key] / n_docs
        grad_norm = run.optimizer_step()

        # ---- log, checkpoint --------------------------------------------------------------------------
        record = {"step": step + 1, **losses,  # policy_update's losses are already over every process
                  "examples": int(sum(len(p) for p in step_positions)), "lr": run.lr, "grad_norm": grad_norm,
                  "doc_ids": [w.doc_id for w in step_docs], "step_seconds": time.perf_counter() - t0}
        run.log(record)
        progress.set_postfix(nll=f"{record['loss_rl']:.3f}", ntp=f"{record['loss_ntp']:.3f}")
        run.maybe_checkpoint(step + 1, {"stage": "warmup"})
    progress.close()
    return run.finish()


class _Generator:
    """Checkpointable state of the warmup's position and budget generator."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def state_dict(self) -> dict:
        return self.rng.bit_generator.state

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state
