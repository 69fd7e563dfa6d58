"""Reinforcement Mid-Training with TRL's GRPOTrainer.

    pip install 'rmt[trl]'
    rmt score --out runs/scored --max-docs 48 --max-length 128        # entropy bands of a corpus
    python examples/trl_rmt.py --data runs/scored --out runs/trl-rmt --steps 10

Each step: prompts for positions drawn by the curriculum's band mix, carrying the budget B_t → TRL samples
completions → exact-match + length reward → GRPO loss + λ·NTP loss over the same documents.
"""

import argparse
import json
from pathlib import Path

import torch
from trl import GRPOConfig

from rmt.assets import load_model, load_tokenizer
from rmt.config import BudgetConfig, CurriculumConfig
from rmt.integrations.trl import NextTokenPrompts, NextTokenReward, RMTGRPOTrainer
from rmt.rewards import ExactMatch


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="hub name, model folder or the embedded one")
    parser.add_argument("--data", default="runs/scored", help="an `rmt score` folder")
    parser.add_argument("--out", default="runs/trl-rmt")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--docs-per-step", type=int, default=2)
    parser.add_argument("--positions-per-doc", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=4, help="G, completions per prompt")
    parser.add_argument("--b0", type=int, default=32, help="budget at step 0 (paper: 800, for 14B models)")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    tokenizer, model = load_tokenizer(args.model), load_model(args.model)
    budget = BudgetConfig(b0=args.b0)  # B_t = max(1, floor(b0 · 0.2^(t/T)))
    prompts = NextTokenPrompts(args.data, tokenizer, total_steps=args.steps, docs_per_step=args.docs_per_step,
                               positions_per_doc=args.positions_per_doc, seed=args.seed, budget=budget,
                               curriculum=CurriculumConfig())  # band mix (0.6, 0.3, 0.1) → (0.1, 0.3, 0.6)
    reward = NextTokenReward(ExactMatch(tokenizer, length_weight=0.2), tokenizer, budget)
    config = GRPOConfig(
        output_dir=args.out, max_steps=args.steps, seed=args.seed, learning_rate=args.lr,
        lr_scheduler_type="constant", num_generations=args.group_size,
        per_device_train_batch_size=prompts.prompts_per_step * args.group_size,  # one step = one block of prompts
        shuffle_dataset=False, max_completion_length=2 * args.b0 + 32, beta=0.0,
        bf16=torch.cuda.is_available(), activation_checkpointing=False,
        logging_steps=1, save_strategy="no", report_to="none",
    )
    trainer = RMTGRPOTrainer(model=model, reward_funcs=reward, args=config, prompts=prompts,
                             processing_class=tokenizer, ntp_weight=0.1, answer_tokens=8)
    trainer.train()
    out = Path(args.out)
    with open(out / "metrics.jsonl", "w") as f:  # one line per step, as `rmt train` writes
        f.writelines(json.dumps(r) + "\n" for r in trainer.state.log_history if "loss" in r)
    return out


if __name__ == "__main__":
    main()
