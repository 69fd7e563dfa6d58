"""Multi-process runs on CPU (gloo) through torchrun must match one process with the same global batch."""

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from rmt.checkpoint import latest_checkpoint
from rmt.config import load_config
from rmt.train import train


def torchrun(args, nproc=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "-m", "rmt.cli", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_two_process_training_matches_one_process(tiny_model_dir, tiny_scored_dir, tmp_path):
    overrides = [f"model={tiny_model_dir}", f"data={tiny_scored_dir}", "steps=3", "docs_per_step=2",
                 "rollout.group_size=4", "rollout.positions_per_doc=2", "budget.b0=12", "optim.lr=1e-3",
                 "save_every=3"]
    single = train(load_config(None, overrides + [f"out={tmp_path / 'one'}"]))
    torchrun(["train", f"out={tmp_path / 'two'}", *overrides])
    double = tmp_path / "two"

    one = [json.loads(x) for x in (single / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (double / "metrics.jsonl").read_text().splitlines()]
    assert len(one) == len(two) == 3  # written once, not once per process
    for a, b in zip(one, two):
        assert a["sampled_bands"] == b["sampled_bands"] and a["tokens_generated"] == b["tokens_generated"]
        for key in ("loss", "loss_rl", "loss_ntp", "reward_mean", "reasoning_len_mean", "grad_norm"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), key
    w1 = load_file(latest_checkpoint(single) / "model.safetensors")
    w2 = load_file(latest_checkpoint(double) / "model.safetensors")
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-4, atol=1e-6)


def test_two_process_scoring_writes_the_same_dataset(tiny_model_dir, tmp_path):
    from helpers import write_corpus

    from rmt.score import ScoreOptions, score_dataset

    corpus = write_corpus(tmp_path / "corpus.jsonl", n=40)
    for mode in ("fixed", "quantile"):
        options = ["--top-k", "0", "--max-length", "48", "--stride", "40", "--min-context", "8",
                   "--docs-per-shard", "5", "--band-mode", mode, "--thresholds", "5.5,5.8,6.0"]
        one, two = tmp_path / f"one-{mode}", tmp_path / f"two-{mode}"
        score_dataset(str(tiny_model_dir), str(corpus), one, ["midtrain", "eval"], ScoreOptions(
            top_k=0, max_length=48, stride=40, min_context=8, docs_per_shard=5, band_mode=mode,
            thresholds=(5.5, 5.8, 6.0)))
        torchrun(["score", "--model", str(tiny_model_dir), "--corpus", str(corpus), "--out", str(two), *options])
        files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file() and p.suffix != ".png")
        assert len([f for f in files if f.suffix == ".parquet"]) >= 4  # several shards, split across ranks
        assert files == sorted(p.relative_to(two) for p in two.rglob("*") if p.is_file() and p.suffix != ".png")
        for f in files:
            assert (one / f).read_bytes() == (two / f).read_bytes(), f
