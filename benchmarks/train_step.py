"""Where a training step's time goes, for the CPU demo config (or any config).

    python benchmarks/train_step.py [--config configs/cpu-demo.yaml] [--steps 4] [key=value ...]

Scores a small slice of the embedded corpus if needed, runs a few steps of `rmt train`, and prints the
seconds per step split into rollout / reward / training, generated tokens/s and peak memory (RSS).
"""

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

from rmt.config import load_config
from rmt.score import ScoreOptions, score_dataset
from rmt.train import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/cpu-demo.yaml")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--scored", default="runs/bench-scored", help="scored data (made if missing)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    if not (Path(args.scored) / "stats.json").exists():
        score_dataset("smollm2-135m-instruct", "gsm8k", args.scored, ["midtrain"],
                      ScoreOptions(max_length=128, stride=112, max_docs=64))
    with tempfile.TemporaryDirectory() as out:
        config = load_config(args.config, [f"data={args.scored}", f"out={out}/run", f"steps={args.steps}",
                                           f"save_every={args.steps}", *args.overrides])
        start = time.perf_counter()
        run_dir = train(config)
        wall = time.perf_counter() - start
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # The first step pays one-off costs (allocations, caches): report the rest when there is a rest.
    steady = rows[1:] or rows
    mean = lambda key: sum(r.get(key, 0.0) for r in steady) / len(steady)  # noqa: E731
    tokens = sum(r.get("tokens_generated", 0) for r in steady)
    rollout_time = sum(r["rollout_seconds"] for r in steady)
    print(f"\nconfig {args.config} method={config.method} steps={args.steps} (wall {wall:.1f} s incl. load/save)")
    print(f"{'per step (mean of steps 2..)':<32}{'seconds':>10}")
    for key in ("rollout_seconds", "reward_seconds", "train_seconds", "step_seconds"):
        print(f"  {key.replace('_seconds', ''):<30}{mean(key):>10.2f}")
    print(f"generated tokens/s (rollouts)   {tokens / rollout_time if rollout_time else 0:>10.1f}")
    print(f"peak memory (max RSS)           {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:>10.0f} MiB")


if __name__ == "__main__":
    main()
