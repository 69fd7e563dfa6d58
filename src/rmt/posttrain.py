"""`rmt posttrain`: GRPO on math questions with verifiable answers (SPEC §10), accuracy before and after.

Evaluate the starting model on held-out questions (greedy) → loop(step: questions → G rollouts each →
math_verify reward → group advantages (SPEC §6) → clipped surrogate → optimizer step → log → maybe
checkpoint) → evaluate again → `posttrain_eval.json`. The rollouts, advantages and loss are mid-training's
own (`RolloutEngine`, `group_advantages`, `train.accumulate_gradients` with no NTP documents), so every
starting checkpoint -- base, ntp, rpt, rmt -- is post-trained by exactly the same code.

Without `--config`, the packaged `configs/posttrain.yaml` (a CPU-sized demo run) is used; the dataclass
defaults below are a GPU-scale run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import get_constant_schedule_with_warmup

from rmt import assets, checkpoint
from rmt.config import NTPConfig, OptimConfig, RLConfig, RolloutConfig, load_config, save_config
from rmt.corpus import load_corpus, split_corpus
from rmt.errors import RmtError
from rmt.losses import group_advantages
from rmt.mathdata import MATH_INSTRUCTION, MathQuestion, QuestionPrompt, check_disjoint, load_math_data, math_reward
from rmt.rewards import extract_prediction
from rmt.rollout import RolloutEngine, RolloutSettings
from rmt.train import DataOrder, accumulate_gradients, gather_metrics, global_sum, prepare_run_dir, truncate_metrics

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "posttrain.yaml"
EVAL_FILE = "posttrain_eval.json"
SAMPLES_FILE = "eval_samples.jsonl"


@dataclass
class PostTrainConfig:
    model: str = "smollm2-135m-instruct"  # model name, folder, or run folder (its latest checkpoint)
    out: str = "runs/posttrain"
    source: str = "gsm8k"  # gsm8k | reasoning-gym:TASK | FILE.jsonl (question, answer)
    eval_source: str = ""  # a .jsonl of evaluation questions, with a .jsonl source; else a hash split
    eval_fraction: float = 0.3  # share of a source's questions held out for evaluation
    generated_train: int = 2000  # reasoning-gym: training problems generated
    generated_eval: int = 500  # reasoning-gym: evaluation problems generated
    task_options: dict[str, Any] = field(default_factory=dict)  # reasoning-gym: the task's settings
    n_eval: int = 0  # evaluation questions used (the first n held out); 0 = all
    midtrain_corpus: str = ""  # if set, refuse questions that appear in this corpus' midtrain part
    steps: int = 200
    questions_per_step: int = 32
    max_reasoning_tokens: int = 512  # fixed reasoning cap, in training and evaluation
    instruction: str = MATH_INSTRUCTION  # asks for a number: change it for sources with other answers
    seed: int = 0
    save_every: int = 50
    keep_last: int = 2
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16
    gradient_checkpointing: bool = False
    eval_before: bool = True
    eval_after: bool = True
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(answer_tokens=24))
    rl: RLConfig = field(default_factory=RLConfig)
    # Post-training has no documents: the NTP term is off (accumulate_gradients reads the weight).
    ntp: NTPConfig = field(default_factory=lambda: NTPConfig(weight=0.0))
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self):
        checks = [
            (self.steps > 0 and self.questions_per_step > 0, "steps and questions_per_step must be positive"),
            (self.max_reasoning_tokens > 0, "max_reasoning_tokens must be positive"),
            (0 < self.eval_fraction < 1, "eval_fraction must be in (0, 1)"),
            (self.n_eval >= 0, "n_eval must be 0 (all) or positive"),
            (self.rollout.group_size >= 2, "rollout.group_size must be at least 2 (GRPO compares within a group)"),
            (self.rollout.zero_std in ("keep", "skip"), "rollout.zero_std must be keep or skip"),
            (self.rollout.prompt_style in ("auto", "chat", "plain"),
             "rollout.prompt_style must be auto, chat or plain"),
            (self.dtype in ("auto", "float32", "bfloat16"), "dtype must be auto, float32 or bfloat16"),
            (self.rl.enabled, "rl.enabled must be true: post-training is RL"),
            (self.ntp.weight == 0, "ntp.weight must be 0: post-training has no documents for an NTP loss"),
            (self.save_every > 0 and self.keep_last > 0, "save_every and keep_last must be positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise RmtError(f"config: {message}")


def load_posttrain_config(path: str | None = None, overrides: list[str] | None = None) -> PostTrainConfig:
    """The packaged demo config (or `path`) with `key=value` overrides."""
    return load_config(str(path or DEFAULT_CONFIG), overrides, schema=PostTrainConfig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help=f"YAML config file (default: the packaged {DEFAULT_CONFIG.name})")
    parser.add_argument("--model", help="model name, folder, or an `rmt train` run folder (latest checkpoint)")
    parser.add_argument("--out", help="run folder")
    parser.add_argument("--source", help="gsm8k | reasoning-gym:TASK | FILE.jsonl with question and answer")
    parser.add_argument("--steps", type=int, help="GRPO steps")
    parser.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. rollout.group_size=8")


def run(args: argparse.Namespace) -> int:
    shorthand = [f"{k}={getattr(args, k)}" for k in ("model", "out", "source", "steps") if getattr(args, k)]
    config = load_posttrain_config(args.config, shorthand + args.overrides)
    posttrain(config, resume=args.resume)
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
    samples = [{
        "id": q.id, "answer": q.answer, "prediction": extract_prediction(r.text),
        "correct": math_reward(r.text, q.answer), "response_len": sum(r.sampled_mask),
        "reasoning_len": r.reasoning_len, "closed_think": r.closed_think, "response": r.text,
    } for q, r in zip(questions, rollouts)]
    n = len(samples)
    mean = lambda key: float(np.mean([s[key] for s in samples])) if n else 0.0  # noqa: E731
    return {"accuracy": mean("correct"), "response_len_mean": mean("response_len"),
            "reasoning_len_mean": mean("reasoning_len"), "format_ok_frac": mean("closed_think"), "n": n,
            "samples": samples}


def _evaluate(accelerator, model, tokenizer, questions, settings, prompt, run_dir, phase) -> dict:
    """evaluate_math over all processes (each takes every world-th question); samples go to a file."""
    world, rank = accelerator.num_processes, accelerator.process_index
    t0 = time.perf_counter()
    result = evaluate_math(model, tokenizer, questions[rank::world], settings, prompt)
    samples, n_local = result.pop("samples"), result["n"]
    n = int(global_sum(accelerator, n_local))
    out = {k: global_sum(accelerator, v * n_local) / max(n, 1) for k, v in result.items() if k != "n"}
    out.update(n=n, seconds=round(time.perf_counter() - t0, 2))
    if accelerator.is_main_process:
        with open(run_dir / SAMPLES_FILE, "a") as f:
            f.writelines(json.dumps({"phase": phase, **s}) + "\n" for s in samples)
    return out


def posttrain(config: PostTrainConfig, resume: bool = False) -> Path:
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # lets torchrun / accelerate launch use gloo on CPU machines
        mixed_precision="bf16" if config.dtype != "float32" and torch.cuda.is_available() else "no",
    )
    main = accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index
    if config.questions_per_step % world:
        raise RmtError(f"questions_per_step={config.questions_per_step} must be divisible by the {world} processes")
    run_dir = prepare_run_dir(config, resume) if main else Path(config.out)
    accelerator.wait_for_everyone()
    if main:
        save_config(config, run_dir / "config.yaml")
        if not resume:  # left over from a run killed before its first checkpoint
            (run_dir / SAMPLES_FILE).unlink(missing_ok=True)

    # ---- build ----------------------------------------------------------------------------------
    torch.manual_seed(config.seed)
    data = load_math_data(config.source, config.eval_source, config.eval_fraction, config.generated_train,
                          config.generated_eval, config.seed, config.task_options)
    if config.midtrain_corpus:
        midtrain = split_corpus(load_corpus(config.midtrain_corpus), "midtrain")
        check_disjoint(data.train, data.eval, [d.text for d in midtrain])
    eval_questions = data.eval[: config.n_eval or None]
    model_path = checkpoint.resolve_model_path(config.model)
    tokenizer = assets.load_tokenizer(model_path)
    model = assets.load_model(model_path)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    reference = None
    if config.rl.kl_coef > 0:
        reference = assets.load_model(model_path).to(accelerator.device).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr, betas=tuple(config.optim.betas),
                                  weight_decay=config.optim.weight_decay)
    scheduler = get_constant_schedule_with_warmup(optimizer, config.optim.warmup_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    policy = accelerator.unwrap_model(model)
    prompt = QuestionPrompt(tokenizer, config.rollout.prompt_style, config.rollout.prefill_think, config.instruction)
    eval_settings = evaluation_settings(config)
    engine = RolloutEngine(policy, tokenizer, dataclasses.replace(
        eval_settings, temperature=config.rollout.temperature, top_p=config.rollout.top_p))
    order = DataOrder(np.random.default_rng(config.seed + 1), len(data.train))
    accelerator.register_for_checkpointing(order)
    report = {"model": config.model, "model_path": model_path, "source": config.source,
              "n_train": len(data.train), "n_eval": len(eval_questions), "steps": config.steps,
              "max_reasoning_tokens": config.max_reasoning_tokens, "answer_tokens": config.rollout.answer_tokens,
              "before": None, "after": None}
    start_step = 0
    if resume:
        start_step = checkpoint.load_checkpoint(accelerator, checkpoint.latest_checkpoint(run_dir), model)
        if (run_dir / EVAL_FILE).exists():
            report["before"] = json.loads((run_dir / EVAL_FILE).read_text())["before"]
        if main:
            truncate_metrics(run_dir, start_step)

    # ---- evaluation before ----------------------------------------------------------------------
    if config.eval_before and report["before"] is None:
        start_model = policy if start_step == 0 else assets.load_model(model_path).to(accelerator.device)
        report["before"] = _evaluate(accelerator, start_model, tokenizer, eval_questions, eval_settings, prompt,
                                     run_dir, "before")
        if main:
            (run_dir / EVAL_FILE).write_text(json.dumps(report, indent=2))

    T, G, Q = config.steps, config.rollout.group_size, config.questions_per_step
    progress = tqdm(range(start_step, T), initial=start_step, total=T, desc="posttrain",
                    disable=not main, dynamic_ncols=True)
    for step in progress:
        t0 = time.perf_counter()
        # ---- questions and rollouts: G per question ---------------------------------------------
        # Every rank draws the whole step's questions (same generator), then keeps its own share.
        step_questions = [data.train[i] for i in order.take(Q)]
        first = rank * (Q // world)
        questions = step_questions[first : first + Q // world]
        prompts = [ids for q in questions for ids in [prompt.ids(q.question)] * G]
        # A seed per rollout from (run seed, step, question in the step, member of the group).
        seeds = [int(np.random.SeedSequence([config.seed, step, first + i, g]).generate_state(1)[0])
                 for i in range(len(questions)) for g in range(G)]
        policy.eval()
        with accelerator.autocast():
            rollouts = engine.generate(prompts, seeds=seeds)
        policy.train()
        t_rollout = time.perf_counter() - t0

        # ---- verifiable reward and group advantages (SPEC §6) -------------------------------------
        rewards = [math_reward(r.text, questions[k // G].answer) for k, r in enumerate(rollouts)]
        rewards_t = torch.tensor(rewards, dtype=torch.float32).view(-1, G)
        advantages, zero_std = group_advantages(rewards_t, config.rl.adv_eps)
        m = gather_metrics(accelerator, {
            "reward_mean": float(np.mean(rewards)),
            # The reward is the verifier's 0/1, so accuracy equals it; solved: groups with a correct answer.
            "accuracy": float(np.mean(rewards)),
            "solved_frac": float((rewards_t.max(dim=1).values > 0).float().mean()),
            "zero_std_groups": zero_std,
            "response_len_mean": float(np.mean([sum(r.sampled_mask) for r in rollouts])),
            "reasoning_len_mean": float(np.mean([r.reasoning_len for r in rollouts])),
            "format_ok_frac": float(np.mean([r.closed_think for r in rollouts])),
            "tokens_generated": sum(sum(r.sampled_mask) for r in rollouts),
        })

        # ---- loss, step --------------------------------------------------------------------------
        t1 = time.perf_counter()
        losses = accumulate_gradients(config, model, reference, accelerator, tokenizer, [], [], rollouts, advantages)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        t_train = time.perf_counter() - t1

        # ---- log ----------------------------------------------------------------------------------
        record = {
            "step": step + 1, **m, "loss": losses["loss"], "loss_rl": losses["loss_rl"],
            **({"clip_frac": losses["clip_frac"]} if "clip_frac" in losses else {}),
            "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
            "rollout_seconds": t_rollout, "train_seconds": t_train, "step_seconds": time.perf_counter() - t0,
        }
        if main:
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            progress.set_postfix(r=f"{m['reward_mean']:.2f}", len=f"{m['response_len_mean']:.0f}",
                                 loss=f"{losses['loss']:.3f}")

        # ---- checkpoint ---------------------------------------------------------------------------
        if (step + 1) % config.save_every == 0 or step + 1 == T:
            checkpoint.save_checkpoint(accelerator, run_dir, step + 1, model, tokenizer,
                                       {"stage": "posttrain", "source": config.source, "total_steps": T},
                                       config.keep_last)
    progress.close()

    # ---- evaluation after -----------------------------------------------------------------------
    if config.eval_after:
        report["after"] = _evaluate(accelerator, policy, tokenizer, eval_questions, eval_settings, prompt,
                                    run_dir, "after")
    if main:
        (run_dir / EVAL_FILE).write_text(json.dumps(report, indent=2))
        print(format_eval_table(report))
        print(f"run saved to {run_dir} (checkpoint: {checkpoint.latest_checkpoint(run_dir)})")
    return run_dir


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
