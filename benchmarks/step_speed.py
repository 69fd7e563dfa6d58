"""Speed of one RL step's two halves, naive vs shared-prefix: rollouts and the training forward+backward,
side by side with TRL's GRPOTrainer, each as a fraction of what this CPU's arithmetic allows.

For each model and configuration (context length, P positions per document, G rollouts per position) the
variants run in fresh worker processes (each one's peak memory, `ru_maxrss`, is its own), alternately,
repeat by repeat (naive, shared, naive, packed, [TRL], then again), so that other load on a shared machine
slows them alike; the tables give the median and the spread (min–max) of `--repeats`:

- `naive-rollout`:  `RolloutEngine.generate` over the P·G prompts (every prompt re-encodes its prefix);
- `shared-rollout`: `RolloutEngine.generate_shared` (the document's prefix is encoded once);
- `naive-train`:    `grpo.policy_update` with the per-rollout backend (RL loss over padded prompt+response
  rows, NTP in a second pass over the document);
- `dense-train`:    `grpo.policy_update` with the packed backend (one forward per document), SDPA over the
  pack's dense block mask (every masked pair computed);
- `packed-train`:   the same, with attention over the unmasked blocks only (`packed.block_attention`, the default);
- `trl` (with `trl` installed, for `--trl-configs`): one step of TRL's GRPOTrainer on the same prompts
  (same model, G, completion cap): generation, loss, backward and optimizer step.

Each worker warms up first (one-time costs of the first calls). The FLOP limit is the same for every
variant of the same work: the FLOPs the work needs (`common.forward_flops`: weights × tokens, output layer
× logit rows, attention over the (query, key) pairs a token may see and no other; backward = 2 × forward),
counted as the least any implementation must compute -- each document prefix encoded once, no padding, no
masked pair, no copy of the prefix in a second pack --, divided by the matmul rate measured on this machine
with the same thread count just before. "of limit" is that time / measured time (1.0 = at the arithmetic
ceiling); a TRL step's limit is a rollout's plus a training step's. `--threads 1` gives one-thread figures,
which a busy second core disturbs least.

    python benchmarks/step_speed.py                                # both models, 128x4x4 and 256x8x8
    python benchmarks/step_speed.py --threads 1 --repeats 3 --models smollm2-135m-instruct
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

sys.path.insert(0, str(Path(__file__).parent))
from common import alternate, forward_flops, machine_state, matmul_gflops, median, model_shape, summary, train_flops  # noqa: E402

BUDGET = 8  # B_t in the prompt; the reasoning cap is --cap
MODES = ("naive-rollout", "shared-rollout", "naive-train", "dense-train", "packed-train")


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
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = assets.load_tokenizer(args.model)
    model = assets.load_model(args.model)
    shape = model_shape(model)
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
        start = time.perf_counter()
        rollouts = roll(positions, G)
        seconds = time.perf_counter() - start
        result.update(seconds=seconds, tokens=sum(len(r.response_ids) for r in rollouts),
                      needed=rollout_flops(shape, rollouts, pre, positions))
        if args.save:
            Path(args.save).write_text(json.dumps([r.__dict__ for r in rollouts]))
    elif args.mode in ("naive-train", "dense-train", "packed-train"):
        rollouts = [Rollout(**r) for r in json.loads(Path(args.load).read_text())]
        seconds, needed = train_step(args, model, tokenizer, window, positions, pre, post, rollouts, shape)
        result.update(seconds=seconds, needed=needed)
    elif args.mode == "trl":
        result.update(trl_step(args, model, tokenizer, [builder.prompt_ids(window, t, BUDGET) for t in positions], shape))
    result["peak_mb"] = peak_mb()
    return result


def rollout_flops(shape, rollouts, pre, positions) -> float:
    """FLOPs the rollouts need: the document prefix encoded once, each prompt's tail (`post`) over the part of
    the prefix it sees, then one token per decoding step per row, attending to its prompt and what it wrote."""
    decode = sum(len(r.response_ids) for r in rollouts)
    attended = sum(len(r.prompt_ids) * len(r.response_ids) + len(r.response_ids) ** 2 / 2 for r in rollouts)
    prefix = len(pre) + max(positions)
    tail = len(rollouts[0].prompt_ids) - len(pre) - positions[0]  # post, the same for every prompt
    prompts = [len(pre) + t + tail for t in positions]
    attended += prefix**2 / 2 + sum(tail * (n - tail) + tail**2 / 2 for n in prompts)
    return forward_flops(shape, prefix + tail * len(positions) + decode, decode + len(positions), attended)


def train_step(args, model, tokenizer, window, positions, pre, post, rollouts, shape) -> tuple[float, float]:
    """Seconds of one step's forward+backward of L_RL + λ·L_NTP, as train.py runs it (naive) or packed (dense
    mask or blocks), and the FLOPs that work needs."""
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
    model.zero_grad(set_to_none=True)
    backend = PerRolloutBackend(tokenizer.pad_token_id, 16) if args.mode == "naive-train" \
        else PackedBackend(pre, post, args.pack_tokens, blocks=args.mode == "packed-train")
    start = time.perf_counter()
    policy_update(model, trajectories, [window], masks, settings, backend)
    seconds = time.perf_counter() - start
    # What the work needs: the window and every response once, in one pack, attention over the pairs its
    # mask allows (what each variant computes beyond that -- padding, masked pairs, a second copy of the
    # trunk in another pack -- is its own overhead).
    items = [PackItem(0, t, r.response_ids, r.sampled_mask) for r, t in zip(rollouts, [t for t in positions for _ in range(G)])]
    (pack,) = pack_documents(pre, post, [window], items, max_tokens=10**9)
    pairs = int(pack.attention_mask()[0, 0].sum())
    return seconds, train_flops(shape, len(pack), pack.window_len + len(pack.response_logit_index), pairs)


def trl_step(args, model, tokenizer, prompts, shape) -> dict:
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
    tokens = logs.get("completions/mean_length", float("nan")) * args.g * len(prompts)
    return {"seconds": seconds, "tokens": tokens}  # its limit: a rollout's plus a training step's (`limits`)


# ---- the parent: run the workers, print the table, draw the plot ------------------------------------

def run_worker(model: str, config: tuple[int, int, int], mode: str, args, extra=()) -> dict:
    context, p, g = config
    command = [sys.executable, __file__, "--worker", mode, "--model", model, "--context", str(context),
               "--p", str(p), "--g", str(g), "--cap", str(args.cap), "--answer-tokens", str(args.answer_tokens),
               "--batch-size", str(args.batch_size), "--pack-tokens", str(args.pack_tokens),
               "--threads", str(args.threads or 0), *extra]
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
    parser.add_argument("--trl-configs", default="128x4x4,256x8x8",
                        help="configurations also run with TRL ('' = none)")
    parser.add_argument("--cap", type=int, default=16, help="reasoning tokens per rollout (2·B_t)")
    parser.add_argument("--answer-tokens", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64, help="rollout batch size (rows)")
    parser.add_argument("--pack-tokens", type=int, default=4096, help="max tokens per packed sequence")
    parser.add_argument("--repeats", type=int, default=3, help="alternating repeats of every variant (median, spread)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch's default)")
    parser.add_argument("--variants", default=",".join(MODES), help="comma-separated subset of " + ", ".join(MODES))
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
        print("trl is not installed: skipping the TRL GRPOTrainer comparison (pip install 'rmt[trl]')")
        trl_configs = set()
    if args.threads:
        torch.set_num_threads(args.threads)
    state = machine_state()
    gflops = matmul_gflops(args.threads or None)
    print(f"{state['threads']} torch threads per worker on {state['cores']} cores, load average {state['load_1min']} "
          f"at the start; measured matmul rate {gflops:.1f} GFLOP/s (fp32, 1024x1024)", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = {}
        for name in args.models.split(","):
            if name == "tiny":
                from rmt.tiny import build_tiny_model

                models[name] = str(build_tiny_model(Path(tmp) / "tiny"))
            else:
                models[name] = name
        for name, path in models.items():
            for config in configs_of(args):
                saved = str(Path(tmp) / f"rollouts-{name}-{'x'.join(map(str, config))}.json")
                run_worker(path, config, "shared-rollout", args, ["--save", saved])  # the rollouts training uses
                variants = {mode: (lambda mode=mode: run_worker(path, config, mode, args,
                                                               ["--load", saved] if "train" in mode else []))
                            for mode in args.variants.split(",")}
                if config in trl_configs:
                    variants["trl"] = lambda: run_worker(path, config, "trl", args)
                r = {"model": name, "config": config, **alternate(variants, args.repeats)}
                rows.append(r)
                print_row(r, gflops, header=len(rows) == 1)
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end; reasoning cap {args.cap} + answer "
          f"{args.answer_tokens} tokens; pack <= {args.pack_tokens} tokens; median (min–max) of {args.repeats} "
          "alternating repeats; 'of limit' = FLOPs / measured matmul rate / seconds")
    if any("trl" in r for r in rows):
        print("\nOne GRPO step vs TRL GRPOTrainer (ours: shared-prefix rollouts + packed forward+backward; "
              "TRL: generate + loss + backward + optimizer step), medians")
        for r in rows:
            if "trl" in r:
                ours = median([a["seconds"] + b["seconds"] for a, b in zip(r["shared-rollout"], r["packed-train"])])
                trl_s = median([t["seconds"] for t in r["trl"]])
                peak = max(max(x["peak_mb"] for x in r["shared-rollout"]), max(x["peak_mb"] for x in r["packed-train"]))
                print(f"  {r['model']:>22} {'x'.join(map(str, r['config'])):>9}: ours {ours:7.1f} s, "
                      f"TRL {trl_s:7.1f} s ({summary([t['seconds'] for t in r['trl']])}), TRL/ours {trl_s / ours:5.2f}; "
                      f"peak MB ours {peak:.0f}, TRL {max(t['peak_mb'] for t in r['trl']):.0f}")
    plot(rows, gflops, args.out)
    print(f"plot: {args.out}")


def configs_of(args) -> list[tuple[int, int, int]]:
    return parse_configs(args.configs)


def print_row(r: dict, gflops: float, header: bool) -> None:
    """Median seconds (spread), speed-up, fraction of the FLOP limit, peak memory of each variant."""
    if header:
        print(f"{'model':>22} {'CTXxPxG':>9} | {'variant':>14} {'seconds: median (min-max)':>28} {'of limit':>9} "
              f"{'peak MB':>8}")
    for mode in [m for m in (*MODES, "trl") if m in r]:
        runs = r[mode]
        seconds = [x["seconds"] for x in runs]
        limit = limit_seconds(r, mode, gflops)
        print(f"{r['model']:>22} {'x'.join(map(str, r['config'])):>9} | {mode:>14} {summary(seconds):>28} "
              f"{limit / median(seconds):9.2f} {max(x['peak_mb'] for x in runs):8.0f}", flush=True)
    for naive, fast in (("naive-rollout", "shared-rollout"), ("naive-train", "packed-train"),
                        ("dense-train", "packed-train")):
        if naive not in r or fast not in r:
            continue
        ratios = [a["seconds"] / b["seconds"] for a, b in zip(r[naive], r[fast])]
        print(f"{'':>33} | {fast} / {naive}: {summary(ratios)}x faster (per repeat)")
    if "shared-rollout" in r and "packed-train" in r:
        step = [a["seconds"] + b["seconds"] for a, b in zip(r["shared-rollout"], r["packed-train"])]
        limit = limit_seconds(r, "shared-rollout", gflops) + limit_seconds(r, "packed-train", gflops)
        print(f"{'':>33} | one step (shared rollout + packed train): {summary(step)} s, limit {limit:.2f} s, "
              f"{limit / median(step):.2f} of limit ({median(step) / limit:.2f}x above it)")


def limit_seconds(r: dict, mode: str, gflops: float) -> float:
    """Seconds the work of `mode` needs at the measured matmul rate: a rollout's or a training step's needed
    FLOPs, both for a whole step (TRL)."""
    def needed(modes):
        return next(median([x["needed"] for x in r[m]]) for m in modes if m in r)

    rollout, train = ("shared-rollout", "naive-rollout"), ("packed-train", "dense-train", "naive-train")
    flops = needed(rollout) + needed(train) if mode == "trl" else needed([mode])
    return flops / (gflops * 1e9)


def plot(rows: list[dict], gflops: float, path: str) -> None:
    """One panel per model and configuration: each variant's median seconds (bars, linear scale) and the
    time its FLOPs would take at the measured matmul rate (black ticks)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {"naive-rollout": "rollout\nnaive", "shared-rollout": "rollout\nshared", "naive-train": "train\nnaive",
             "dense-train": "train\npacked,\ndense mask", "packed-train": "train\npacked,\nblocks", "trl": "TRL\nstep"}
    fig, axes = plt.subplots(1, len(rows), figsize=(5.5 * len(rows), 3.8), squeeze=False)
    for ax, r in zip(axes[0], rows):
        modes = [m for m in names if m in r]
        seconds = [median([x["seconds"] for x in r[m]]) for m in modes]
        limits = [limit_seconds(r, m, gflops) for m in modes]
        ax.bar(range(len(modes)), seconds, color=["#9ecae1", "#3182bd", "#fdd0a2", "#fdae6b", "#e6550d", "#74c476"][: len(modes)])
        ax.scatter(range(len(modes)), limits, marker="_", s=900, color="k", label="FLOP limit (measured matmul rate)")
        for k, v in enumerate(seconds):
            ax.text(k, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(modes)), [names[m] for m in modes], fontsize=8)
        ax.set_title(f"{r['model']}, {'x'.join(map(str, r['config']))} (context x P x G)", fontsize=10)
        ax.set_ylabel("seconds (median)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
