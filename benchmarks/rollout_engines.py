"""Rollout throughput of the two engines, `rmt` (built-in) and `vllm`, on the same work.

Both engines roll out the same prompts (documents of the embedded corpus, a few positions each, the RMT
prompt), `--group` copies of each with the same seeds, with the same reasoning cap and answer allowance, through
`rollout_positions` as `rmt train` calls it (the rmt engine with its shared-prefix cache, vLLM with its
automatic prefix caching). Each engine is warmed up once; then the timed repeats alternate between the
engines, so that other load on the machine slows both alike. Throughput counts the tokens the policy sampled
(`tokens_generated` of the training metrics); the two engines draw different random numbers, so their
rollouts, and token counts, differ.

    python benchmarks/rollout_engines.py --docs 4 --positions 2 --group 8 --cap 32 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rmt.assets import EMBEDDED_MODEL, load_model, load_tokenizer, resolve_model
from rmt.corpus import EMBEDDED_CORPUS, load_corpus, split_corpus
from rmt.prompts import PromptBuilder
from rmt.rollout import RolloutSettings, make_engine, rollout_positions
from rmt.runs import rollout_seed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=EMBEDDED_MODEL)
    parser.add_argument("--corpus", default=EMBEDDED_CORPUS)
    parser.add_argument("--docs", type=int, default=4)
    parser.add_argument("--positions", type=int, default=2, help="positions per document")
    parser.add_argument("--group", type=int, default=8, help="G, rollouts per position")
    parser.add_argument("--cap", type=int, default=32, help="reasoning tokens at most")
    parser.add_argument("--answer-tokens", type=int, default=8)
    parser.add_argument("--context", type=int, default=96, help="document tokens kept")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--vllm-memory", type=float, default=0.05, help="rollout.vllm_gpu_memory")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # before vLLM starts: its CPU worker refuses later changes

    path = resolve_model(args.model)
    tokenizer = load_tokenizer(path)
    model = load_model(path).eval()
    docs = split_corpus(load_corpus(args.corpus), "midtrain")[: args.docs]
    windows = [tokenizer(d.text, add_special_tokens=False)["input_ids"][: args.context] for d in docs]
    positions = [[len(w) * (k + 1) // (args.positions + 1) for k in range(args.positions)] for w in windows]
    pre, post = PromptBuilder(tokenizer).parts(args.cap // 2)
    seeds = [rollout_seed(0, d, t, g) for d, pos in enumerate(positions) for t in pos for g in range(args.group)]
    settings = RolloutSettings(answer_tokens=args.answer_tokens, temperature=1.0, batch_size=len(seeds))

    engines = {}
    for name in ("rmt", "vllm"):
        start = time.perf_counter()
        options = {"gpu_memory": args.vllm_memory} if name == "vllm" else {}
        engines[name] = make_engine(model, tokenizer, settings, name, **options)
        rollout_positions(engines[name], pre, post, windows, positions, args.group, seeds, args.cap)  # warm-up
        print(f"{name}: built and warmed up in {time.perf_counter() - start:.1f} s", flush=True)

    rates = {name: [] for name in engines}
    tokens = {name: [] for name in engines}
    for repeat in range(args.repeats):
        for name, engine in engines.items():
            start = time.perf_counter()
            rollouts = rollout_positions(engine, pre, post, windows, positions, args.group, seeds, args.cap)
            seconds = time.perf_counter() - start
            sampled = sum(sum(r.sampled_mask) for r in rollouts)
            rates[name].append(sampled / seconds)
            tokens[name].append(sampled)
            print(f"repeat {repeat + 1} {name}: {sampled} tokens in {seconds:.2f} s", flush=True)

    prompt_len = sum(len(pre) + t + len(post) for pos in positions for t in pos) / sum(map(len, positions))
    print(f"\n{len(seeds)} rollouts ({len(docs)} documents x {args.positions} positions x G={args.group}), "
          f"prompts of {prompt_len:.0f} tokens on average, reasoning cap {args.cap}, answer {args.answer_tokens} "
          f"tokens, {torch.get_num_threads()} threads, {model.dtype}, {args.repeats} repeats")
    for name in engines:
        r = rates[name]
        print(f"{name:5s} {statistics.median(r):8.1f} tokens/s median (min {min(r):.1f}, max {max(r):.1f}); "
              f"{statistics.mean(tokens[name]) / len(seeds):.1f} sampled tokens per rollout")


if __name__ == "__main__":
    main()
