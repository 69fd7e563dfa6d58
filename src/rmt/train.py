"""`rmt train`: mid-training (SPEC §1-§8, §13) with the methods rmt, rpt, ntp and rlp.

build → loop(step: budget B_t → band mix p_t → documents → positions C → G rollouts per position →
rewards → group advantages → L = L_RL + λ·L_NTP over the same documents → optimizer step → log → maybe
checkpoint) → save. The methods differ only in configuration (`rmt.config.PRESETS`): the reward object,
the advantage estimator, which tokens the surrogate covers, the prompt, and λ.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from rmt.config import Flag, TrainConfig, add_config_arguments, config_from_args, config_to_dict
from rmt.curriculum import BandSampler, band_probabilities
from rmt.difficulty import BAND_NAMES, EASY
from rmt.errors import RmtError
from rmt.grpo import ADVANTAGES, PackedBackend, PerRolloutBackend, UpdateSettings, make_trajectories, policy_update
from rmt.prompts import PromptBuilder
from rmt.rewards import NextToken, RewardContext, build_reward, extract_prediction
from rmt.rollout import RolloutSettings, engine_options, make_engine, rollout_positions
from rmt.runs import (DataOrder, TrainingRun, add_resume_arguments, check_run_dir, config_for, gathered_weights,
                      resume_options, rollout_seed)
from rmt.scored import load_scored, ntp_target_mask

FLAGS = (
    Flag("--method", "method"), Flag("--model", "model"), Flag("--data", "data"), Flag("--out", "out"),
    Flag("--steps", "steps", int),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, TrainConfig, FLAGS)
    add_resume_arguments(parser)


def run(args: argparse.Namespace) -> int:
    train(config_for(args, TrainConfig, FLAGS), **resume_options(args))
    return 0


def train(config: TrainConfig, resume: bool = False, reward=None, allow_changes: bool = False,
          previous_if_damaged: bool = False) -> Path:
    """Run (or resume) one mid-training run; `reward` replaces the configured reward object."""
    # ---- build ----------------------------------------------------------------------------------------
    check_run_dir(config.out, resume)  # the run folder first: a resume of nothing fails at once
    rl = config.rl.enabled
    windows, _ = load_scored(config.data, "midtrain")
    if rl:
        windows = [w for w in windows if (w.band >= EASY).any()]
        if not windows:
            raise RmtError(f"{config.data}: no position above the entropy floor; nothing for RL to train on")
    trackers = tuple(t for t, on in (("tensorboard", config.log_tensorboard), ("wandb", config.log_wandb)) if on)
    run = TrainingRun(config, config.optim, resume, trackers, allow_changes, previous_if_damaged)
    if config.docs_per_step % run.world:
        raise RmtError(f"docs_per_step={config.docs_per_step} must be divisible by the {run.world} processes")
    tokenizer = run.tokenizer
    prompt = PromptBuilder(tokenizer, config.rollout.prompt_style, config.rollout.prefill_think)
    r = config.rollout
    sampling = RolloutSettings(answer_tokens=r.answer_tokens, temperature=r.temperature, top_p=r.top_p,
                               force_answer=r.force_answer, batch_size=r.batch_size, answer=r.answer)
    engine = make_engine(run.policy, tokenizer, sampling, r.engine, **engine_options(r))
    reward = reward or build_reward(config.reward, tokenizer, run.policy)
    advantages_of = ADVANTAGES[config.rl.advantage]
    update = UpdateSettings(clip_eps=config.rl.clip_eps, kl_coef=config.rl.kl_coef, ntp_weight=config.ntp.weight,
                            micro_batch=config.optim.micro_batch, pack_tokens=config.optim.pack_tokens)
    runs_policy = getattr(reward, "runs_policy", False)
    control = rl and config.rl.control and not runs_policy
    frozen = run.load_reference() if rl and (config.rl.kl_coef > 0 or control) else None  # the starting model
    reference = frozen if config.rl.kl_coef > 0 else None
    control_engine = make_engine(frozen, tokenizer, sampling) if control else None
    sampler = BandSampler(config.seed)
    order = DataOrder(np.random.default_rng(config.seed + 1), len(windows))
    stateful = [reward] if hasattr(reward, "state_dict") else []
    start = run.start([sampler, order, *stateful], tracker_config=config_to_dict(config))

    T, G, P = config.steps, config.rollout.group_size, config.rollout.positions_per_doc
    progress = tqdm(range(start, T), initial=start, total=T, desc=f"train {config.method}",
                    disable=not run.main, dynamic_ncols=True)
    for step in progress:
        t0 = time.perf_counter()
        # ---- budget B_t and band mix p_t (SPEC §3, §5) -----------------------------------------------------
        budget = config.budget.at(step, T) if rl else None
        cap = config.budget.cap(budget)
        c = config.curriculum
        probs = band_probabilities(step, T, tuple(c.p_early), tuple(c.p_late), c.t1, c.t2) if c.enabled else None
        pre, post = prompt.parts(budget)

        # ---- documents and positions C: every process draws the whole step's, then keeps its share -----
        step_docs = [windows[i] for i in order.take(config.docs_per_step)]
        step_positions = [sampler.sample(w.band, probs, P) if rl else np.array([], dtype=np.int64) for w in step_docs]
        first, docs = run.share(step_docs)
        _, positions = run.share(step_positions)
        where = [(d, int(t)) for d, pos in enumerate(positions) for t in pos]

        m: dict[str, float] = {}
        trajectories = []
        t_rollout = t_reward = 0.0
        if rl:
            # ---- rollouts: G responses per position ------------------------------------------------------
            t1 = time.perf_counter()
            seeds = [rollout_seed(config.seed, step, first + d, t, g) for d, t in where for g in range(G)]
            run.policy.eval()
            # The built-in engine decodes with the policy itself: sharded weights are gathered once for it.
            gather = gathered_weights(run.model) if r.engine == "rmt" else contextlib.nullcontext()
            with gather, run.accelerator.autocast():
                rollouts = rollout_positions(engine, pre, post, [d.input_ids for d in docs], positions, G, seeds,
                                             cap, config.rollout.shared_prefix)
            run.policy.train()
            t_rollout = time.perf_counter() - t1

            # ---- rewards and group advantages (SPEC §4, §6; §13 for RLP) ------------------------------
            t1 = time.perf_counter()
            tasks = [NextToken(docs[d].input_ids, t) for d, t in where for _ in range(G)]
            with gathered_weights(run.model) if runs_policy else contextlib.nullcontext():
                scores = reward(rollouts, tasks, RewardContext(step, T, budget))
            rewards = torch.tensor([s["reward"] for s in scores], dtype=torch.float32).view(-1, G)
            advantages, zero_std = advantages_of(rewards, config.rl.adv_eps)
            trajectories = make_trajectories(rollouts, scores, advantages, where, config.rl.loss_tokens)
            if config.rollout.zero_std == "skip":
                trajectories = [tr for k, tr in enumerate(trajectories) if (advantages[k // G] != 0).any()]
            t_reward = time.perf_counter() - t1
            m.update(rollout_metrics(rollouts, scores, config.rollout), zero_std_groups=zero_std)
            bands = [int(docs[d].band[t]) for d, t in where for _ in range(G)]
            m.update(band_means(scores, bands, "match"))
            if control_engine is not None:  # the starting model on the same prompts, with the same draws
                t1 = time.perf_counter()
                with run.accelerator.autocast():
                    controls = rollout_positions(control_engine, pre, post, [d.input_ids for d in docs], positions,
                                                 G, seeds, cap, config.rollout.shared_prefix)
                control_scores = reward(controls, tasks, RewardContext(step, T, budget))
                m.update({f"control_{k}": v for k, v in band_means(control_scores, bands, "match").items()})
                if "match" in control_scores[0]:
                    m["control_match_mean"] = float(np.mean([c["match"] for c in control_scores]))
                m["control_seconds"] = time.perf_counter() - t1

        # ---- update: L = L_RL + λ·L_NTP over the same documents (SPEC §6, §7) --------------------------
        t1 = time.perf_counter()
        backend = PackedBackend(pre, post, config.optim.pack_tokens) if config.optim.packed \
            else PerRolloutBackend(tokenizer.pad_token_id, config.optim.micro_batch)
        losses = policy_update(
            run.model, trajectories, [d.input_ids for d in docs],
            [ntp_target_mask(d, pos) for d, pos in zip(docs, positions)], update, backend, reference,
            backward=run.backward, global_sum=run.global_sum, global_max=run.global_max,
            autocast=run.accelerator.autocast)
        chunks = losses.pop("chunks")
        m.update(update_chunks_min=chunks, update_chunks_max=chunks)  # forwards per process: its share of work
        grad_norm = run.optimizer_step()
        engine.sync_weights()
        if hasattr(reward, "after_step"):
            reward.after_step(run.policy)
        t_train = time.perf_counter() - t1

        # ---- log, checkpoint --------------------------------------------------------------------------
        sampled = np.concatenate([w.band[p] for w, p in zip(step_docs, step_positions)]).astype(int) \
            if rl else np.array([], dtype=int)
        record = {
            "step": step + 1, "budget": budget, "reasoning_cap": cap if rl else None,
            "band_probs": dict(zip(BAND_NAMES, probs)) if probs else None,
            "sampled_bands": {name: int((sampled == b).sum()) for b, name in enumerate(BAND_NAMES, start=1)},
            **run.gather_metrics(m), **losses, "lr": run.lr, "grad_norm": grad_norm,
            "rollout_seconds": t_rollout, "reward_seconds": t_reward, "train_seconds": t_train,
            "step_seconds": time.perf_counter() - t0,
        }
        run.log(record)
        progress.set_postfix(B=budget, r=f"{record.get('reward_mean', 0):.2f}",
                             len=f"{record.get('reasoning_len_mean', 0):.0f}", loss=f"{losses['loss']:.3f}")
        run.maybe_checkpoint(step + 1, {"method": config.method})
    progress.close()
    return run.finish()


def band_means(scores: list[dict], bands: list[int], part: str) -> dict:
    """Mean of a reward part per difficulty band of the rollouts' positions (`match_easy`, ...), so learning
    shows apart from the curriculum's shift towards harder bands; NaN for a band without rollouts (every
    process reports the same keys)."""
    out = {}
    if scores and part in scores[0]:
        for band, name in enumerate(BAND_NAMES, start=1):
            values = [s[part] for s, b in zip(scores, bands) if b == band]
            out[f"{part}_{name}"] = float(np.mean(values)) if values else float("nan")
    return out


def rollout_metrics(rollouts, scores: list[dict], rollout_config) -> dict:
    """Per-process means of a step's rewards (total and parts) and of its rollouts' shape."""
    out = {"reward_mean": float(np.mean([s["reward"] for s in scores]))}
    for key in scores[0] if scores else ():
        if key != "reward":
            out[f"reward_{key}_mean"] = float(np.mean([s[key] for s in scores]))
    closed = [r.closed_think for r in rollouts]
    answered = [extract_prediction(r.text) is not None for r in rollouts]
    out.update(
        reasoning_len_mean=float(np.mean([r.reasoning_len for r in rollouts])),
        reasoning_len_max=max(r.reasoning_len for r in rollouts),
        # How often the policy closed the format by itself: with forcing (or no answer phase) the
        # closed </think>; without forcing, an answer it opened.
        format_ok_frac=float(np.mean(closed if rollout_config.force_answer or not rollout_config.answer
                                     else answered)),
        tokens_generated=sum(sum(r.sampled_mask) for r in rollouts),
    )
    return out
