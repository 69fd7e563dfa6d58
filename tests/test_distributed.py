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
