"""`rmt train`: the mid-training recipe (SPEC §1-§8) for the methods rmt, rpt and ntp.

Each step: budget B_t → band mix p_t → documents → positions C per document → G rollouts per position
→ rewards → group advantages → L = L_RL + λ·L_NTP over the same documents → optimizer step → log →
maybe checkpoint. Runs as one process or under `accelerate launch` / `torchrun` (documents are split
across ranks, gradients reduced by the engine, metrics and checkpoints written once).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import get_constant_schedule_with_warmup

from rmt import assets, checkpoint
from rmt.budget import length_reward, token_budget
from rmt.config import TrainConfig, config_to_dict, load_config, save_config
from rmt.curriculum import BandSampler, band_probabilities
from rmt.difficulty import BAND_NAMES, EASY
from rmt.errors import RmtError
from rmt.forward import document_logits, response_logprobs
from rmt.losses import grpo_loss, group_advantages, ntp_loss
from rmt.prompts import PromptBuilder
from rmt.rewards import extract_prediction, match_reward, total_reward
from rmt.packed import PackItem, pack_documents, packed_losses
from rmt.rollout import RolloutEngine, RolloutSettings, document_prompts
from rmt.scored import load_scored

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (see configs/)")
    parser.add_argument("--method", choices=("rmt", "rpt", "ntp"), help="preset of SPEC §8")
    parser.add_argument("--model", help="model name, folder, or the embedded default")
    parser.add_argument("--data", help="an `rmt score` output folder")
    parser.add_argument("--out", help="run folder")
    parser.add_argument("--steps", type=int, help="total training steps T")
    parser.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. ntp.weight=0")


def run(args: argparse.Namespace) -> int:
    shorthand = [f"{k}={getattr(args, k)}" for k in ("method", "model", "data", "out", "steps") if getattr(args, k)]
    config = load_config(args.config, shorthand + args.overrides)
    train(config, resume=args.resume)
    return 0


@dataclass
class DataOrder:
    """Epoch-wise shuffled order of the training windows; its state resumes exactly."""

    rng: np.random.Generator
    size: int
    order: np.ndarray | None = None
    cursor: int = 0

    def take(self, n: int) -> list[int]:
        out = []
        while len(out) < n:
            if self.order is None or self.cursor >= self.size:
                self.order, self.cursor = self.rng.permutation(self.size), 0
            out.append(int(self.order[self.cursor]))
            self.cursor += 1
        return out

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "order": self.order, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.order, self.cursor = state["order"], state["cursor"]


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop the metrics lines logged after `step` (the resumed checkpoint): they are recomputed identically."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    path.write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] <= step))


def prepare_run_dir(config: TrainConfig, resume: bool) -> Path:
    run_dir = Path(config.out)
    if resume:
        if checkpoint.latest_checkpoint(run_dir) is None:
            raise RmtError(f"--resume: {run_dir} has no complete checkpoint to resume from")
        return run_dir
    if (run_dir / "metrics.jsonl").exists() or checkpoint.list_checkpoints(run_dir):
        raise RmtError(f"{run_dir} already holds a run; use --resume to continue it, or choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def train(config: TrainConfig, resume: bool = False) -> Path:
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # lets torchrun / accelerate launch use gloo on CPU machines
        mixed_precision="bf16" if config.dtype != "float32" and torch.cuda.is_available() else "no",
        log_with=[t for t, on in (("tensorboard", config.log_tensorboard), ("wandb", config.log_wandb)) if on] or None,
        project_dir=config.out,
    )
    main = accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index
    if config.docs_per_step % world:
        raise RmtError(f"docs_per_step={config.docs_per_step} must be divisible by the {world} processes")
    run_dir = prepare_run_dir(config, resume) if main else Path(config.out)
    accelerator.wait_for_everyone()
    if main:
        save_config(config, run_dir / "config.yaml")

    # ---- build ----------------------------------------------------------------------------------
    torch.manual_seed(config.seed)
    windows, stats = load_scored(config.data, "midtrain")
    rl = config.rl.enabled
    if rl:
        windows = [w for w in windows if (w.band >= EASY).any()]
        if not windows:
            raise RmtError(f"{config.data}: no position above the entropy floor; nothing for RL to train on")
    tokenizer = assets.load_tokenizer(config.model)
    model = assets.load_model(config.model)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    reference = None
    if rl and config.rl.kl_coef > 0:
        reference = assets.load_model(config.model).to(accelerator.device).eval().requires_grad_(False)
    betas = tuple(config.optim.betas)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.optim.lr, betas=betas, weight_decay=config.optim.weight_decay
    )
    scheduler = get_constant_schedule_with_warmup(optimizer, config.optim.warmup_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    policy = accelerator.unwrap_model(model)
    builder = PromptBuilder(tokenizer, config.rollout.prompt_style, config.rollout.prefill_think)
    engine = RolloutEngine(policy, tokenizer, RolloutSettings(
        max_reasoning_tokens=config.budget.fixed_max_tokens,
        answer_tokens=config.rollout.answer_tokens,
        temperature=config.rollout.temperature,
        top_p=config.rollout.top_p,
        force_answer=config.rollout.force_answer,
        batch_size=config.rollout.batch_size,
    ))
    sampler = BandSampler(config.seed)
    data = DataOrder(np.random.default_rng(config.seed + 1), len(windows))
    accelerator.register_for_checkpointing(sampler, data)
    start_step = 0
    if resume:
        start_step = checkpoint.load_checkpoint(accelerator, checkpoint.latest_checkpoint(run_dir), model)
        if main:
            truncate_metrics(run_dir, start_step)
    accelerator.init_trackers("rmt", config=config_to_dict(config))

    T, G, P = config.steps, config.rollout.group_size, config.rollout.positions_per_doc
    progress = tqdm(range(start_step, T), initial=start_step, total=T, desc=f"train {config.method}",
                    disable=not main, dynamic_ncols=True)
    for step in progress:
        t0 = time.perf_counter()
        # ---- budget and band mix (SPEC §3, §5) ----------------------------------------------------
        budget = token_budget(step, T, config.budget.b0, config.budget.b_min, config.budget.gamma) \
            if config.budget.enabled and rl else None
        engine.settings.max_reasoning_tokens = 2 * budget if budget is not None else config.budget.fixed_max_tokens
        c = config.curriculum
        probs = band_probabilities(step, T, tuple(c.p_early), tuple(c.p_late), c.t1, c.t2) if c.enabled else None

        # ---- documents and positions C ----------------------------------------------------------
        # Every rank draws the whole step's documents (same generators), then keeps its own share.
        step_docs = [windows[i] for i in data.take(config.docs_per_step)]
        step_positions = [sampler.sample(w.band, probs, P) if rl else np.array([], dtype=np.int64) for w in step_docs]
        share = config.docs_per_step // world
        docs = step_docs[rank * share : (rank + 1) * share]
        positions = step_positions[rank * share : (rank + 1) * share]
        groups = [(d, int(t)) for d, pos in zip(docs, positions) for t in pos]

        m: dict[str, float] = {}
        rollouts, rewards_t, advantages = [], None, None
        t_rollout = t_reward = 0.0
        if rl:
            # ---- rollouts: G responses per position, batched -------------------------------------
            t1 = time.perf_counter()
            seeds = rollout_seeds(config.seed, step, rank * share, positions, G)
            policy.eval()
            with accelerator.autocast():
                if config.rollout.shared_prefix:
                    pre, post = builder.parts(budget)
                    shared = [document_prompts(pre, d.input_ids, pos, post) for d, pos in zip(docs, positions)]
                    rollouts = engine.generate_shared(shared, G, seeds)
                else:
                    prompts = [builder.prompt_ids(d.input_ids, t, budget) for d, t in groups for _ in range(G)]
                    rollouts = engine.generate(prompts, seeds)
            policy.train()
            t_rollout = time.perf_counter() - t1

            # ---- rewards (SPEC §3, §4) and group advantages (SPEC §6) -----------------------------
            t1 = time.perf_counter()
            r_match, r_len = [], []
            for k, r in enumerate(rollouts):
                d, t = groups[k // G]
                r_match.append(match_reward(config.reward.match, extract_prediction(r.text), d.input_ids, t, tokenizer))
                r_len.append(length_reward(r.reasoning_len, budget, config.reward.r_max) if budget else 0.0)
            w = config.reward.length_weight if budget is not None else 0.0
            rewards = [total_reward(a, b, w) for a, b in zip(r_match, r_len)]
            rewards_t = torch.tensor(rewards, dtype=torch.float32).view(-1, G)
            advantages, zero_std = group_advantages(rewards_t, config.rl.adv_eps)
            t_reward = time.perf_counter() - t1
            m.update(
                reward_mean=float(np.mean(rewards)), reward_match_mean=float(np.mean(r_match)),
                reward_len_mean=float(np.mean(r_len)), zero_std_groups=zero_std,
                reasoning_len_mean=float(np.mean([r.reasoning_len for r in rollouts])),
                reasoning_len_max=max(r.reasoning_len for r in rollouts),
                format_ok_frac=float(np.mean([
                    r.closed_think if config.rollout.force_answer else extract_prediction(r.text) is not None
                    for r in rollouts
                ])),
                tokens_generated=sum(sum(r.sampled_mask) for r in rollouts),
            )

        # ---- loss: L_RL + λ·L_NTP over the same documents (SPEC §6, §7) ---------------------------
        t1 = time.perf_counter()
        losses = accumulate_gradients(config, model, reference, accelerator, tokenizer, docs, positions,
                                      rollouts, advantages, builder.parts(budget) if config.optim.packed else None)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        t_train = time.perf_counter() - t1

        # ---- log ----------------------------------------------------------------------------------
        m = gather_metrics(accelerator, m)
        sampled = np.concatenate([w.band[p] for w, p in zip(step_docs, step_positions)]).astype(int) \
            if rl else np.array([], dtype=int)
        record = {
            "step": step + 1,
            "budget": budget,
            "reasoning_cap": engine.settings.max_reasoning_tokens if rl else None,
            "band_probs": dict(zip(BAND_NAMES, probs)) if probs else None,
            "sampled_bands": {name: int((sampled == b).sum()) for b, name in enumerate(BAND_NAMES, start=1)},
            **m,
            **losses,
            "lr": scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm),
            "rollout_seconds": t_rollout,
            "reward_seconds": t_reward,
            "train_seconds": t_train,
            "step_seconds": time.perf_counter() - t0,
        }
        if main:
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            progress.set_postfix(B=budget, r=f"{m.get('reward_mean', 0):.2f}",
                                 len=f"{m.get('reasoning_len_mean', 0):.0f}", loss=f"{losses['loss']:.3f}")
        accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step + 1)

        # ---- checkpoint ---------------------------------------------------------------------------
        if (step + 1) % config.save_every == 0 or step + 1 == T:
            checkpoint.save_checkpoint(accelerator, run_dir, step + 1, model, tokenizer,
                                       {"method": config.method, "total_steps": T}, config.keep_last)
    progress.close()
    accelerator.end_training()
    if main:
        print(f"run saved to {run_dir} (checkpoint: {checkpoint.latest_checkpoint(run_dir)})")
    return run_dir


def accumulate_gradients(config, model, reference, accelerator, tokenizer, docs, positions, rollouts, advantages,
                         prompt_parts=None):
    """Backpropagate L_RL + λ·L_NTP; returns the loss values.

    With `prompt_parts` (the prompt's `pre`, `post` ids) each document is one packed forward over its
    window and all its responses (`rmt.packed`); without, responses go in padded micro-batches and the
    documents in a separate pass. Both losses are token-level means over the whole step on all ranks,
    so a step gives the same gradient whatever the packing, micro-batch size or number of processes
    (the engine averages over ranks, hence the factor `world`).
    """
    world = accelerator.num_processes
    pad = tokenizer.pad_token_id
    micro = config.optim.micro_batch
    loss_rl = loss_ntp = torch.zeros((), device=accelerator.device)

    rl_items = []  # (rollout, advantage, document index, position)
    if rollouts:
        G = config.rollout.group_size
        # Document index and position of each group; post-training's groups have neither.
        where = [(i, int(t)) for i, pos in enumerate(positions) for t in pos] or [(None, None)] * len(advantages)
        adv = advantages.flatten().tolist()
        signal = (advantages != 0).any(dim=1).tolist()
        rl_items = [(r, a, *where[k // G]) for k, (r, a) in enumerate(zip(rollouts, adv))
                    if signal[k // G] or config.rollout.zero_std == "keep"]
    rl_tokens = global_sum(accelerator, sum(sum(r.sampled_mask) for r, *_ in rl_items))
    lam = config.ntp.weight
    ntp_masks = [ntp_target_mask(d, pos) for d, pos in zip(docs, positions)]
    ntp_tokens = global_sum(accelerator, sum(int(mk.sum()) for mk in ntp_masks)) if lam > 0 else 0

    packs = None
    if prompt_parts is not None:
        items = [PackItem(i, t, r.response_ids, r.sampled_mask) for r, _, i, t in rl_items]
        packs = pack_documents(*prompt_parts, [d.input_ids for d in docs], items, with_windows=ntp_tokens > 0,
                               max_tokens=config.optim.pack_tokens)
        n_backward = len(packs)
    else:
        n_backward = (-(-len(rl_items) // micro) if rl_tokens else 0) + (-(-len(docs) // micro) if ntp_tokens else 0)
    done = 0

    def backward(loss):
        nonlocal done
        done += 1
        # Reduce gradients across processes once, on the step's last backward.
        ctx = accelerator.no_sync(model) if done < n_backward else contextlib.nullcontext()
        with ctx:
            accelerator.backward(loss)

    stats = {}
    if packs is not None:
        advantages_t = torch.tensor([a for _, a, *_ in rl_items], dtype=torch.float32)
        loss_rl, loss_ntp, stats = packed_losses(
            model, packs, advantages_t, ntp_masks, rl_tokens, ntp_tokens, lam, config.rl.clip_eps,
            backward=lambda loss: backward(loss * world), reference=reference, kl_coef=config.rl.kl_coef,
            autocast=accelerator.autocast,
        )
    if packs is None and rl_tokens:
        for i in range(0, len(rl_items), micro):
            chunk = rl_items[i : i + micro]
            with accelerator.autocast():
                logprobs, mask = response_logprobs(
                    model, [r.prompt_ids for r, *_ in chunk], [r.response_ids for r, *_ in chunk],
                    [r.sampled_mask for r, *_ in chunk], pad,
                )
            ref = None
            if reference is not None:
                with torch.no_grad(), accelerator.autocast():
                    ref, _ = response_logprobs(reference, [r.prompt_ids for r, *_ in chunk],
                                               [r.response_ids for r, *_ in chunk], [r.sampled_mask for r, *_ in chunk], pad)
            adv_t = torch.tensor([a for _, a, *_ in chunk], device=logprobs.device)
            # One policy update per batch of rollouts: the old policy is the current one (ratio = 1).
            mean_loss, stats = grpo_loss(logprobs, logprobs.detach(), adv_t, mask, config.rl.clip_eps,
                                         ref, config.rl.kl_coef)
            part = mean_loss * (mask.sum() / rl_tokens)
            backward(part * world)
            loss_rl = loss_rl + part.detach()
    if packs is None and ntp_tokens:
        for i in range(0, len(docs), micro):
            chunk, masks = docs[i : i + micro], ntp_masks[i : i + micro]
            with accelerator.autocast():
                logits, ids, _ = document_logits(model, [d.input_ids for d in chunk], pad)
            target = torch.zeros_like(ids, dtype=torch.float32)
            for j, mk in enumerate(masks):
                target[j, : len(mk)] = torch.as_tensor(mk, dtype=torch.float32)
            part = ntp_loss(logits, ids, target) * (target.sum() / ntp_tokens)
            backward(lam * part * world)
            loss_ntp = loss_ntp + part.detach()
    loss_rl, loss_ntp = global_sum(accelerator, float(loss_rl)), global_sum(accelerator, float(loss_ntp))
    out = {"loss": loss_rl + lam * loss_ntp, "loss_rl": loss_rl, "loss_ntp": loss_ntp}
    if "clip_frac" in stats:
        out["clip_frac"] = stats["clip_frac"]
    return out


def ntp_target_mask(window, rl_positions) -> np.ndarray:
    """NTP targets of a window: the positions it owns (≥ 1), minus the RL positions C (SPEC §7)."""
    mask = np.zeros(len(window.input_ids), dtype=bool)
    mask[max(1, window.owned_from) :] = True
    mask[np.asarray(rl_positions, dtype=np.int64)] = False
    return mask


def global_sum(accelerator: Accelerator, value: float) -> float:
    if accelerator.num_processes == 1:
        return value
    return float(accelerator.reduce(torch.tensor(float(value), device=accelerator.device), "sum"))


def gather_metrics(accelerator: Accelerator, metrics: dict) -> dict:
    """Average per-rank metrics across processes (sums for counts)."""
    if accelerator.num_processes == 1 or not metrics:
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([float(metrics[k]) for k in keys], device=accelerator.device)
    gathered = accelerator.gather(values.unsqueeze(0))
    out = {}
    for i, k in enumerate(keys):
        column = gathered[:, i]
        if k in ("zero_std_groups", "tokens_generated"):
            out[k] = int(column.sum())
        elif k.endswith("_max"):
            out[k] = int(column.max())
        else:
            out[k] = float(column.mean())
    return out


def rollout_seeds(seed: int, step: int, first_doc: int, positions, group_size: int) -> list[int]:
    """A seed per rollout from (run seed, step, document index in the step, position, member of the group)."""
    return [int(np.random.SeedSequence([seed, step, first_doc + d, int(t), g]).generate_state(1)[0])
            for d, pos in enumerate(positions) for t in pos for g in range(group_size)]
