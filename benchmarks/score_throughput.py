"""Throughput of `rmt score` against a plain batched no-grad forward of the same model on the same windows.

Both run in this one process on the same model, the same windows and the same batches (longest first,
right padding). The plain forward only computes the logits; `rmt score`'s work per batch
(`score_windows`: forward, top-k entropy of every scored position) and per shard (bands, Parquet write)
comes on top. The two are timed batch by batch, alternating, so that other load on the machine slows
both alike; their ratio is the cost of scoring on top of the forward pass.

    python benchmarks/score_throughput.py --max-docs 100 --splits midtrain,eval
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from rmt.assets import EMBEDDED_MODEL, load_model, load_tokenizer
from rmt.corpus import EMBEDDED_CORPUS, load_corpus, split_corpus
from rmt.score import ScoreOptions, batch_order, pad_batch, plan_split, score_windows, scored_windows
from rmt.scored import write_shard


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=EMBEDDED_MODEL)
    parser.add_argument("--corpus", default=EMBEDDED_CORPUS)
    parser.add_argument("--splits", default="midtrain,eval")
    parser.add_argument("--max-docs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    options = ScoreOptions(max_docs=args.max_docs, batch_size=args.batch_size)

    tokenizer = load_tokenizer(args.model)
    docs = load_corpus(args.corpus)
    plans = [plan_split(split_corpus(docs, split), tokenizer, options) for split in args.splits.split(",")]
    shards = [shard for plan in plans for shard in plan.shards]
    model = load_model(args.model).eval()
    pad_id = tokenizer.pad_token_id
    score_windows(model, shards[0][: args.batch_size], options, pad_id)  # warm-up

    plain_s = score_s = 0.0
    with tempfile.TemporaryDirectory() as out, torch.inference_mode():
        for index, windows in enumerate(shards):
            entropies = [None] * len(windows)
            for batch in batch_order(windows, args.batch_size):
                batch_windows = [windows[i] for i in batch]
                start = time.perf_counter()
                input_ids, attention_mask = pad_batch(batch_windows, pad_id, model.device)
                model(input_ids=input_ids, attention_mask=attention_mask).logits
                plain_s += time.perf_counter() - start
                start = time.perf_counter()
                for i, entropy in zip(batch, score_windows(model, batch_windows, options, pad_id)):
                    entropies[i] = entropy
                score_s += time.perf_counter() - start
            start = time.perf_counter()
            scored = scored_windows(windows, entropies, options.thresholds)
            write_shard(Path(out) / f"shard-{index:05d}.parquet", scored)
            score_s += time.perf_counter() - start

    tokens = sum(w.tokens for shard in shards for w in shard)
    print(f"{tokens:,} window tokens in {sum(map(len, shards))} windows, batch size {args.batch_size}, "
          f"{torch.get_num_threads()} threads")
    print(f"plain forward: {tokens / plain_s:,.1f} tokens/s")
    print(f"rmt score:     {tokens / score_s:,.1f} tokens/s")
    print(f"ratio (rmt score / plain forward): {plain_s / score_s:.3f}")


if __name__ == "__main__":
    main()
