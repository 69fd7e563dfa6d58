"""Speed of one RL step's two halves, naive vs shared-prefix: rollouts and the training forward+backward.

For each model and configuration (context length, P positions per document, G rollouts per position),
four fresh worker processes each load the model and do one thing, so each one's peak memory
(`ru_maxrss`) is its own:

- `naive-rollout`:  `RolloutEngine.generate` over the P·G prompts (every prompt re-encodes its prefix);
- `shared-rollout`: `RolloutEngine.generate_shared` (the document's prefix is encoded once);
- `naive-train`:    `grpo.policy_update` with the per-rollout backend (RL loss over padded prompt+response rows, NTP in a
  second pass over the document);
- `packed-train`:   `grpo.policy_update` with the packed backend (one forward per document).

Each worker warms up first (one-time costs of the first calls) and keeps the best of `--repeats` timings
(`--tiny-repeats` for the tiny model, whose timings are milliseconds). Both training workers use the
shared-prefix rollouts (saved by `shared-rollout`), so they do the same work. With `trl` installed, a
`trl` worker also runs one step of TRL's GRPOTrainer on the same prompts (same model, G, completion cap)
for the configurations listed in `--trl-configs`. The machine is often shared: note its load.

    python benchmarks/step_speed.py                      # default: both models, 128x4x4 and 256x8x8
    python benchmarks/step_speed.py --models tiny --configs 128x4x4,128x8x8,256x4x4,256x8x8
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from rmt import assets
from rmt.corpus import EMBEDDED_CORPUS, load_corpus
from rmt.prompts import PromptBuilder
from rmt.rollout import Rollout, RolloutEngine, RolloutSettings, document_prompts

BUDGET = 8  # B_t in the prompt; the reasoning cap is --cap
MODES = ("naive-rollout", "shared-rollout", "naive-train", "packed-train")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def document(tokenizer, context: int) -> list[int]:
    """The first `context` tokens of the embedded corpus (documents joined by blank lines)."""
    ids: list[int] = []
    for doc in load_corpus(EMBEDDED_CORPUS):
        ids += tokenizer(doc.text + "\n\n", add_special_tokens=False)["input_ids"]
        if len(ids) >= context:
            return ids[:context]
    raise SystemExit(f"the corpus has fewer than {context} tokens")


def positions_for(context: int, p: int) -> list[int]:
    return sorted(np.random.default_rng(0).choice(np.arange(16, context), size=p, replace=False).tolist())


def worker(args) -> dict:
    torch.manual_seed(0)
    tokenizer = assets.load_tokenizer(args.model)
    model = assets.load_model(args.model)
    loaded = peak_mb()
    window = document(tokenizer, args.context)
    positions = positions_for(args.context, args.p)
    builder = PromptBuilder(tokenizer)
    pre, post = builder.parts(BUDGET)
    G = args.g
    result = {"mode": args.mode, "model_mb": loaded}
    if args.mode in ("naive-rollout", "shared-rollout"):
        engine = RolloutEngine(model.eval(), tokenizer, RolloutSettings(
            max_reasoning_tokens=args.cap, answer_tokens=args.answer_tokens, batch_size=args.batch_size))

        def roll(positions, copies):
            if args.mode == "naive-rollout":
                prompts = [builder.prompt_ids(window, t, BUDGET) for t in positions for _ in range(copies)]
                return engine.generate(prompts)
            return engine.generate_shared([document_prompts(pre, window, positions, post)], copies)

        roll(positions[:1], 2)  # warm-up: first calls pay one-time costs (thread pools, kernel selection)
        seconds = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            rollouts = roll(positions, G)
            seconds.append(time.perf_counter() - start)
        seconds = min(seconds)
        result.update(seconds=seconds, tokens=sum(len(r.response_ids) for r in rollouts),
                      prompt_tokens=sum(len(r.prompt_ids) for r in rollouts))
        if args.save:
            Path(args.save).write_text(json.dumps([r.__dict__ for r in rollouts]))
    elif args.mode in ("naive-train", "packed-train"):
        rollouts = [Rollout(**r) for r in json.loads(Path(args.load).read_text())]
        seconds, tokens = train_step(args, model, tokenizer, window, positions, pre, post, rollouts)
        result.update(seconds=seconds, tokens=tokens)
    elif args.mode == "trl":
        result.update(trl_step(args, model, tokenizer, [builder.prompt_ids(window, t, BUDGET) for t in positions]))
    result["peak_mb"] = peak_mb()
    return result


def train_step(args, model, tokenizer, window, positions, pre, post, rollouts) -> tuple[float, int]:
    """Seconds of one step's forward+backward of L_RL + λ·L_NTP, as train.py runs it (naive) or packed,
    and the number of tokens it forwards."""
    from rmt.grpo import PackedBackend, PerRolloutBackend, UpdateSettings, make_trajectories, policy_update
    from rmt.packed import PackItem, pack_documents
    from rmt.scored import ScoredWindow, ntp_target_mask

    n = len(window)
    doc = ScoredWindow("bench", 0, 0, 1, np.array(window, dtype=np.int64), np.zeros(n, np.float32),
                       np.zeros(n, np.int8))
    G = args.g
    advantages = torch.randn(len(positions), G, generator=torch.Generator().manual_seed(0))
    where = [(0, int(t)) for t in positions]
    trajectories = make_trajectories(rollouts, [{"reward": 0.0}] * len(rollouts), advantages, where)
    masks = [ntp_target_mask(doc, positions)]
    settings = UpdateSettings(ntp_weight=0.1, micro_batch=16, pack_tokens=args.pack_tokens)
    model.train()
    model(input_ids=torch.tensor([window[:64]]), labels=torch.tensor([window[:64]])).loss.backward()  # warm-up
    seconds = []
    for _ in range(args.repeats):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        if args.mode == "naive-train":
            policy_update(model, trajectories, [window], masks, settings, PerRolloutBackend(tokenizer.pad_token_id, 16))
            tokens = n + sum(len(r.prompt_ids) + len(r.response_ids) for r in rollouts)
        else:
            policy_update(model, trajectories, [window], masks, settings, PackedBackend(pre, post, args.pack_tokens))
            items = [PackItem(0, t, r.response_ids, r.sampled_mask)
                     for r, t in zip(rollouts, [t for t in positions for _ in range(G)])]
            tokens = sum(len(pack) for pack in pack_documents(pre, post, [window], items, max_tokens=args.pack_tokens))
        seconds.append(time.perf_counter() - start)
    return min(seconds), tokens


def trl_step(args, model, tokenizer, prompts) -> dict:
    """Wall time of one GRPOTrainer step (generation + loss + backward + optimizer) on the same prompts."""
    import random

    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    rng = random.Random(0)

    def reward(completions, **kwargs):  # random rewards: every group carries a signal, as in a real step
        return [rng.random() for _ in completions]

    dataset = Dataset.from_dict({"prompt": [tokenizer.decode(p) for p in prompts]})
    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            output_dir=out, max_steps=1, num_generations=args.g, per_device_train_batch_size=args.g * len(prompts),
            gradient_accumulation_steps=1, steps_per_generation=1,
            max_completion_length=args.cap + 8 + args.answer_tokens, temperature=1.0, beta=0.0, use_cpu=True,
            bf16=False, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
        )
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                              processing_class=tokenizer)
        warm = torch.tensor([prompts[0][:64]])  # warm-up, as the other workers do
        model.generate(warm, max_new_tokens=2, do_sample=False)
        model(input_ids=warm, labels=warm).loss.backward()
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    logs = trainer.state.log_history[0]
    return {"seconds": seconds, "tokens": logs.get("completions/mean_length", float("nan")) * args.g * len(prompts)}


# ---- the parent: run the workers, print the table, draw the plot ------------------------------------

def run_worker(model: str, config: tuple[int, int, int], mode: str, args, extra=()) -> dict:
    context, p, g = config
    command = [sys.executable, __file__, "--worker", mode, "--model", model, "--context", str(context),
               "--p", str(p), "--g", str(g), "--cap", str(args.cap), "--answer-tokens", str(args.answer_tokens),
               "--batch-size", str(args.batch_size), "--pack-tokens", str(args.pack_tokens),
               "--repeats", str(args.repeats if model != args.tiny_path else args.tiny_repeats), *extra]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.stderr.write(done.stderr[-3000:])
        raise SystemExit(f"worker {mode} failed for {model} {config}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def parse_configs(text: str) -> list[tuple[int, int, int]]:
    return [tuple(int(x) for x in c.split("x")) for c in text.split(",") if c]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=f"{assets.EMBEDDED_MODEL},tiny", help="comma-separated; 'tiny' = rmt.tiny")
    parser.add_argument("--configs", default="128x4x4,256x8x8", help="CONTEXTxPxG, comma-separated")
    parser.add_argument("--trl-configs", default="128x4x4", help="configurations also run with TRL ('' = none)")
    parser.add_argument("--cap", type=int, default=16, help="reasoning tokens per rollout (2·B_t)")
    parser.add_argument("--answer-tokens", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32, help="rollout batch size (rows)")
    parser.add_argument("--pack-tokens", type=int, default=2048, help="max tokens per packed sequence")
    parser.add_argument("--repeats", type=int, default=1, help="time each operation this many times, keep the best")
    parser.add_argument("--tiny-repeats", type=int, default=5, help="--repeats for the tiny model (milliseconds)")
    parser.add_argument("--out", default="runs/bench/step_speed.png", help="the plot")
    # worker arguments
    parser.add_argument("--worker", choices=(*MODES, "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--context", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--p", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--g", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    parser.add_argument("--load", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.mode = args.worker
        print(json.dumps(worker(args)))
        return

    try:
        import trl  # noqa: F401
        trl_configs = set(parse_configs(args.trl_configs))
    except ImportError:
        print("trl is not installed: skipping the TRL GRPOTrainer comparison (pip install trl)")
        trl_configs = set()
    configs = parse_configs(args.configs)
    rows = []
    args.tiny_path = None
    with tempfile.TemporaryDirectory() as tmp:
        models = {}
        for name in args.models.split(","):
            if name == "tiny":
                from rmt.tiny import build_tiny_model

                models[name] = args.tiny_path = str(build_tiny_model(Path(tmp) / "tiny"))
            else:
                models[name] = name
        for name, path in models.items():
            for config in configs:
                saved = str(Path(tmp) / f"rollouts-{name}-{'x'.join(map(str, config))}.json")
                r = {"model": name, "config": config}
                r["naive-rollout"] = run_worker(path, config, "naive-rollout", args)
                r["shared-rollout"] = run_worker(path, config, "shared-rollout", args, ["--save", saved])
                r["naive-train"] = run_worker(path, config, "naive-train", args, ["--load", saved])
                r["packed-train"] = run_worker(path, config, "packed-train", args, ["--load", saved])
                if config in trl_configs:
                    r["trl"] = run_worker(path, config, "trl", args)
                rows.append(r)
                print_row(r, header=len(rows) == 1)
    print(f"\n{torch.get_num_threads()} torch threads; load average {os.getloadavg()[0]:.2f} at the end; "
          f"reasoning cap {args.cap} + answer {args.answer_tokens} tokens; pack <= {args.pack_tokens} tokens")
    if any("trl" in r for r in rows):
        print("\nOne GRPO step vs TRL GRPOTrainer (ours: shared-prefix rollouts + packed forward+backward; "
              "TRL: generate + loss + backward + optimizer step)")
        for r in rows:
            if "trl" in r:
                ours = r["shared-rollout"]["seconds"] + r["packed-train"]["seconds"]
                t = r["trl"]
                peak = max(r["shared-rollout"]["peak_mb"], r["packed-train"]["peak_mb"])
                print(f"  {r['model']:>22} {'x'.join(map(str, r['config'])):>9}: ours {ours:7.1f} s "
                      f"({r['shared-rollout']['tokens']} response tokens), TRL {t['seconds']:7.1f} s "
                      f"({t['tokens']:.0f} completion tokens), TRL/ours {t['seconds'] / ours:5.2f}, "
                      f"peak MB ours {peak:.0f} TRL {t['peak_mb']:.0f}")
    plot(rows, args.out)
    print(f"plot: {args.out}")


def print_row(r: dict, header: bool) -> None:
    if header:
        print(f"{'model':>22} {'CTXxPxG':>9} | {'rollout s naive':>15} {'shared':>7} {'speedup':>7} "
              f"{'tok/s n/s':>11} | {'train s naive':>13} {'packed':>7} {'speedup':>7} {'tokens n/p':>11} | "
              f"{'peak MB rollout n/s':>19} | {'peak MB train n/p':>17}")
    nr, sr, nt, pt = (r[m] for m in MODES)
    print(f"{r['model']:>22} {'x'.join(map(str, r['config'])):>9} | {nr['seconds']:15.2f} {sr['seconds']:7.2f} "
          f"{nr['seconds'] / sr['seconds']:6.2f}x "
          f"{nr['tokens'] / nr['seconds']:5.1f}/{sr['tokens'] / sr['seconds']:<5.1f} | "
          f"{nt['seconds']:13.2f} {pt['seconds']:7.2f} {nt['seconds'] / pt['seconds']:6.2f}x "
          f"{nt['tokens']:5d}/{pt['tokens']:<5d} | {nr['peak_mb']:9.0f}/{sr['peak_mb']:<9.0f} | "
          f"{nt['peak_mb']:8.0f}/{pt['peak_mb']:<8.0f}", flush=True)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['model'].split('-')[0]}\n{'x'.join(map(str, r['config']))}" for r in rows]
    x = np.arange(len(rows))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = [
        ("rollout seconds", "naive-rollout", "shared-rollout", "seconds"),
        ("training forward+backward seconds", "naive-train", "packed-train", "seconds"),
        ("peak memory of training (MB)", "naive-train", "packed-train", "peak_mb"),
    ]
    for ax, (title, naive, fast, key) in zip(axes, panels):
        ax.bar(x - 0.2, [r[naive][key] for r in rows], 0.4, label=naive)
        ax.bar(x + 0.2, [r[fast][key] for r in rows], 0.4, label=fast)
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_title(title)
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.suptitle("one RL step per document: naive vs shared-prefix (CONTEXTxPxG)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
