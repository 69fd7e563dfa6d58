"""`rmt posttrain`: GRPO on math questions with verifiable answers (SPEC §10), accuracy before and after.

Evaluate the starting model on held-out questions (greedy) → loop(step: questions → G rollouts each →
math-verify reward → group advantages (SPEC §6) → clipped surrogate → optimizer step → log → maybe
checkpoint) → evaluate again → `posttrain_eval.json`. The rollouts, reward object, advantages and policy
update are the library's (`RolloutEngine`, `rewards.MathAnswer`, `grpo.policy_update`), the same as
mid-training's, so every starting checkpoint -- base, ntp, rpt, rmt, rlp -- is post-trained by the same code.

Without `--config`, the packaged `configs/posttrain.yaml` (a CPU-sized demo run) is used; the dataclass
defaults below are a GPU-scale run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from rmt import assets
from rmt.config import (Flag, OptimConfig, RLConfig, RolloutConfig, RunConfig, add_config_arguments, check,
                        config_from_args, load_config)
from rmt.corpus import load_corpus, split_corpus
from rmt.errors import RmtError
from rmt.grpo import ADVANTAGES, PerRolloutBackend, UpdateSettings, make_trajectories, policy_update
from rmt.io import read_json, write_json_atomic
from rmt.mathdata import MATH_INSTRUCTION, MathQuestion, QuestionPrompt, check_disjoint, load_math_data
from rmt.rewards import MathAnswer, RewardContext, extract_prediction, import_reward
from rmt.rollout import RolloutEngine, RolloutSettings, engine_options, make_engine
from rmt.runs import (DataOrder, TrainingRun, add_resume_arguments, check_run_dir, config_for, gathered_weights,
                      resume_options, rollout_seed)

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "posttrain.yaml"
EVAL_FILE = "posttrain_eval.json"
SAMPLES_FILE = "eval_samples.jsonl"


@dataclass
class PostTrainConfig(RunConfig):
    """`rmt posttrain`: GRPO with a verifiable math reward from any checkpoint (SPEC §10)."""

    out: str = "runs/posttrain"
    """Run folder: config.yaml, metrics.jsonl, checkpoints/, posttrain_eval.json, eval_samples.jsonl."""
    steps: int = 200
    """GRPO steps."""
    source: str = "gsm8k"
    """gsm8k (the posttrain part of the embedded GSM8K) | reasoning-gym:TASK | FILE.jsonl (question, answer)."""
    eval_source: str = ""
    """A .jsonl of evaluation questions, with a .jsonl source; else a hash split of the source."""
    eval_fraction: float = 0.3
    """Share of a source's questions held out for evaluation."""
    generated_train: int = 2000
    """reasoning-gym: training problems generated."""
    generated_eval: int = 500
    """reasoning-gym: evaluation problems generated (those also in training are dropped)."""
    task_options: dict[str, Any] = field(default_factory=dict)
    """reasoning-gym: the task's settings (e.g. max_digits)."""
    n_eval: int = 0
    """Evaluation questions used (the first n held out); 0 = all."""
    midtrain_corpus: str = ""
    """If set, refuse questions that appear in this corpus' midtrain part (SPEC §10)."""
    questions_per_step: int = 32
    """Questions per step (divisible by the number of processes); each gets rollout.group_size answers."""
    max_reasoning_tokens: int = 512
    """Reasoning cap, in training and evaluation."""
    reward: str = "math"
    """math (the boxed answer equals the gold one, by math-verify) or package.module:Class, your own reward
    class (see `rmt.rewards`; tasks are `MathQuestion`s), built with no arguments."""
    instruction: str = MATH_INSTRUCTION
    """The instruction before each question; it asks for a number: change it for sources with other answers."""
    eval_before: bool = True
    """Evaluate the starting model before training."""
    eval_after: bool = True
    """Evaluate the trained model after the last step."""
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(answer_tokens=24))
    rl: RLConfig = field(default_factory=RLConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self):
        super().__post_init__()
        check([
            (self.questions_per_step >= 1, "questions_per_step must be >= 1"),
            (self.max_reasoning_tokens >= 1, "max_reasoning_tokens must be >= 1"),
            (0 < self.eval_fraction < 1, f"eval_fraction must be in (0, 1), got {self.eval_fraction}"),
            (self.n_eval >= 0, "n_eval must be 0 (all) or positive"),
            (self.generated_train >= 1 and self.generated_eval >= 1, "generated_train and generated_eval must be >= 1"),
            (self.rl.enabled, "rl.enabled must be true: post-training is RL"),
            (self.reward == "math" or ":" in self.reward, f"reward must be math or package.module:Class, got '{self.reward}'"),
            (self.rl.advantage == "grpo", "rl.advantage must be grpo for post-training"),
            (self.rollout.answer, "rollout.answer must be true: the reward reads the boxed answer"),
        ])


def load_posttrain_config(path: str | None = None, overrides: list[str] | None = None) -> PostTrainConfig:
    """The packaged demo config (or `path`) with `key=value` overrides."""
    return load_config(str(path or DEFAULT_CONFIG), overrides, schema=PostTrainConfig)


FLAGS = (Flag("--model", "model"), Flag("--out", "out"), Flag("--source", "source"), Flag("--steps", "steps", int))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, PostTrainConfig, FLAGS, default_file=str(DEFAULT_CONFIG))
    add_resume_arguments(parser)


def run(args: argparse.Namespace) -> int:
    config = config_for(args, PostTrainConfig, FLAGS, default_file=str(DEFAULT_CONFIG))
    posttrain(config, **resume_options(args))
    return 0


def evaluation_settings(config: PostTrainConfig) -> RolloutSettings:
    """Greedy decoding under the training caps."""
    return RolloutSettings(
        max_reasoning_tokens=config.max_reasoning_tokens, answer_tokens=config.rollout.answer_tokens,
        temperature=0.0, force_answer=config.rollout.force_answer, batch_size=config.rollout.batch_size,
    )


@torch.no_grad()
def evaluate_math(model, tokenizer, questions: list[MathQuestion], settings: RolloutSettings,
                  prompt: QuestionPrompt | None = None) -> dict:
    """Accuracy and lengths of one response per question (greedy when `settings.temperature` is 0).

    Returns `accuracy`, `response_len_mean` (tokens the model wrote), `reasoning_len_mean`,
    `format_ok_frac` (closed `</think>` itself), `n`, and `samples` (one record per question).
    """
    prompt = prompt or QuestionPrompt(tokenizer)
    was_training = model.training
    model.eval()
    rollouts = RolloutEngine(model, tokenizer, settings).generate([prompt.ids(q.question) for q in questions])
    model.train(was_training)
    scores = MathAnswer()(rollouts, questions, RewardContext(0, 1))
    samples = [{
        "id": q.id, "answer": q.answer, "prediction": extract_prediction(r.text),
        "correct": s["reward"], "response_len": sum(r.sampled_mask),
        "reasoning_len": r.reasoning_len, "closed_think": r.closed_think, "response": r.text,
    } for q, r, s in zip(questions, rollouts, scores)]
    n = len(samples)
    mean = lambda key: float(np.mean([s[key] for s in samples])) if n else 0.0  # noqa: E731
    return {"accuracy": mean("correct"), "response_len_mean": mean("response_len"),
            "reasoning_len_mean": mean("reasoning_len"), "format_ok_frac": mean("closed_think"), "n": n,
            "samples": samples}


def _evaluate(run: TrainingRun, model, questions, settings, prompt, phase) -> dict:
    """evaluate_math over all processes (each takes every world-th question); samples go to a file."""
    t0 = time.perf_counter()
    with gathered_weights(run.model if model is run.policy else model):  # processes answer unequal shares
        result = evaluate_math(model, run.tokenizer, questions[run.rank :: run.world], settings, prompt)
    samples, n_local = result.pop("samples"), result["n"]
    n = int(run.global_sum(n_local))
    out = {k: run.global_sum(v * n_local) / max(n, 1) for k, v in result.items() if k != "n"}
    out.update(n=n, seconds=round(time.perf_counter() - t0, 2))
    if run.main:
        with open(run.run_dir / SAMPLES_FILE, "a", encoding="utf-8") as f:
            f.writelines(json.dumps({"phase": phase, **s}) + "\n" for s in samples)
    return out


def posttrain(config: PostTrainConfig, resume: bool = False, reward=None, allow_changes: bool = False,
              previous_if_damaged: bool = False) -> Path:
    """Run (or resume) one post-training; `reward` replaces the math reward object."""
    # ---- build ----------------------------------------------------------------------------------------
    check_run_dir(config.out, resume)  # the run folder first: a resume of nothing fails at once
    data = load_math_data(config.source, config.eval_source, config.eval_fraction, config.generated_train,
                          config.generated_eval, config.seed, config.task_options)
    if config.midtrain_corpus:
        midtrain = split_corpus(load_corpus(config.midtrain_corpus), "midtrain")
        check_disjoint(data.train, data.eval, [d.text for d in midtrain])
    eval_questions = data.eval[: config.n_eval or None]
    run = TrainingRun(config, config.optim, resume, allow_changes=allow_changes,
                      previous_if_damaged=previous_if_damaged)
    if config.questions_per_step % run.world:
        raise RmtError(f"questions_per_step={config.questions_per_step} must be divisible by the {run.world} processes")
    tokenizer = run.tokenizer
    prompt = QuestionPrompt(tokenizer, config.rollout.prompt_style, config.rollout.prefill_think, config.instruction)
    eval_settings = evaluation_settings(config)
    engine = make_engine(run.policy, tokenizer, RolloutSettings(
        max_reasoning_tokens=config.max_reasoning_tokens, answer_tokens=config.rollout.answer_tokens,
        temperature=config.rollout.temperature, top_p=config.rollout.top_p,
        force_answer=config.rollout.force_answer, batch_size=config.rollout.batch_size),
        config.rollout.engine, **engine_options(config.rollout))
    reward = reward or (import_reward(config.reward) if ":" in config.reward else MathAnswer())
    update = UpdateSettings(clip_eps=config.rl.clip_eps, kl_coef=config.rl.kl_coef,
                            micro_batch=config.optim.micro_batch)
    backend = PerRolloutBackend(tokenizer.pad_token_id, config.optim.micro_batch)
    reference = run.load_reference() if config.rl.kl_coef > 0 else None
    order = DataOrder(np.random.default_rng(config.seed + 1), len(data.train))
    report = {"model": config.model, "model_path": run.model_path, "source": config.source,
              "n_train": len(data.train), "n_eval": len(eval_questions), "steps": config.steps,
              "max_reasoning_tokens": config.max_reasoning_tokens, "answer_tokens": config.rollout.answer_tokens,
              "before": None, "after": None}
    report_path = run.run_dir / EVAL_FILE
    if resume and report_path.exists():
        report["before"] = read_json(report_path, "post-training evaluation")["before"]
    start = run.start([order])
    if run.main and not resume:  # left over from a run killed before its first checkpoint
        (run.run_dir / SAMPLES_FILE).unlink(missing_ok=True)

    # ---- evaluation before ----------------------------------------------------------------------------
    if config.eval_before and report["before"] is None:
        start_model = run.policy if start == 0 else assets.load_model(run.model_path).to(run.device)
        report["before"] = _evaluate(run, start_model, eval_questions, eval_settings, prompt, "before")
        if run.main:
            write_json_atomic(report_path, report)

    T, G, Q = config.steps, config.rollout.group_size, config.questions_per_step
    progress = tqdm(range(start, T), initial=start, total=T, desc="posttrain", disable=not run.main,
                    dynamic_ncols=True)
    for step in progress:
        t0 = time.perf_counter()
        # ---- questions and rollouts: every process draws the step's questions, keeps its share -------
        first, questions = run.share([data.train[i] for i in order.take(Q)])
        prompts = [ids for q in questions for ids in [prompt.ids(q.question)] * G]
        seeds = [rollout_seed(config.seed, step, first + i, g) for i in range(len(questions)) for g in range(G)]
        run.policy.eval()
        gather = gathered_weights(run.model) if config.rollout.engine == "rmt" else contextlib.nullcontext()
        with gather, run.accelerator.autocast():  # the built-in engine decodes with the (gathered) policy
            rollouts = engine.generate(prompts, seeds)
        run.policy.train()
        t_rollout = time.perf_counter() - t0

        # ---- verifiable reward and group advantages (SPEC §6) -----------------------------------------
        tasks = [q for q in questions for _ in range(G)]
        scores = reward(rollouts, tasks, RewardContext(step, T))
        rewards = torch.tensor([s["reward"] for s in scores], dtype=torch.float32).view(-1, G)
        advantages, zero_std = ADVANTAGES[config.rl.advantage](rewards, config.rl.adv_eps)
        trajectories = make_trajectories(rollouts, scores, advantages, loss_tokens=config.rl.loss_tokens)
        if config.rollout.zero_std == "skip":
            trajectories = [tr for k, tr in enumerate(trajectories) if (advantages[k // G] != 0).any()]
        m = run.gather_metrics({
            "reward_mean": float(rewards.mean()),
            # The reward is the verifier's 0/1, so accuracy equals it; solved: groups with a correct answer.
            "accuracy": float(rewards.mean()),
            "solved_frac": float((rewards.max(dim=1).values > 0).float().mean()),
            "zero_std_groups": zero_std,
            "response_len_mean": float(np.mean([sum(r.sampled_mask) for r in rollouts])),
            "reasoning_len_mean": float(np.mean([r.reasoning_len for r in rollouts])),
            "format_ok_frac": float(np.mean([r.closed_think for r in rollouts])),
            "tokens_generated": sum(sum(r.sampled_mask) for r in rollouts),
        })

        # ---- update, step ---------------------------------------------------------------------------
        t1 = time.perf_counter()
        losses = policy_update(run.model, trajectories, settings=update, backend=backend, reference=reference,
                               backward=run.backward, global_sum=run.global_sum, global_max=run.global_max,
                               autocast=run.accelerator.autocast)
        grad_norm = run.optimizer_step()
        engine.sync_weights()
        t_train = time.perf_counter() - t1

        # ---- log, checkpoint --------------------------------------------------------------------------
        record = {
            "step": step + 1, **m, "loss": losses["loss"], "loss_rl": losses["loss_rl"],
            **({"clip_frac": losses["clip_frac"]} if "clip_frac" in losses else {}),
            "lr": run.lr, "grad_norm": grad_norm,
            "rollout_seconds": t_rollout, "train_seconds": t_train, "step_seconds": time.perf_counter() - t0,
        }
        run.log(record)
        progress.set_postfix(r=f"{m['reward_mean']:.2f}", len=f"{m['response_len_mean']:.0f}",
                             loss=f"{losses['loss']:.3f}")
        run.maybe_checkpoint(step + 1, {"stage": "posttrain", "source": config.source})
    progress.close()

    # ---- evaluation after -----------------------------------------------------------------------------
    if config.eval_after:
        report["after"] = _evaluate(run, run.policy, eval_questions, eval_settings, prompt, "after")
    if run.main:
        write_json_atomic(report_path, report)
        print(format_eval_table(report))
    return run.finish()


def format_eval_table(report: dict) -> str:
    """Before / after evaluation as a small text table."""
    rows = [("accuracy", "accuracy", "{:.3f}"), ("response length", "response_len_mean", "{:.1f}"),
            ("reasoning length", "reasoning_len_mean", "{:.1f}"), ("closed </think>", "format_ok_frac", "{:.3f}")]
    phases = [p for p in ("before", "after") if report.get(p)]
    lines = [f"post-training on {report['source']}, {report['n_eval']} held-out questions, model {report['model']}",
             f"{'':<18}" + "".join(f"{p:>10}" for p in phases)]
    for label, key, fmt in rows:
        lines.append(f"{label:<18}" + "".join(f"{fmt.format(report[p][key]):>10}" for p in phases))
    return "\n".join(lines)
