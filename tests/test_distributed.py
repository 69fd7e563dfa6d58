"""Multi-process runs on CPU (gloo) through torchrun must match one process with the same global batch."""

import json
import subprocess
import sys
from pathlib import Path

import torch
from helpers import subprocess_env
from safetensors.torch import load_file

from rmt.checkpoint import latest_checkpoint
from rmt.config import load_config
from rmt.train import train


def torchrun(args, nproc=2):
    """`torchrun -m rmt.cli ARGS`; the tests folder is importable (for `reward.name=helpers:OddLength`)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "-m", "rmt.cli", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_two_process_training_matches_one_process(tiny_model_dir, tiny_scored_dir, tmp_path):
    # A random tiny model almost never predicts the next token, which would leave the RL gradient ~0 and
    # its all-reduce untested: the runs are rewarded by `helpers.OddLength` through the reward interface.
    overrides = [f"model={tiny_model_dir}", f"data={tiny_scored_dir}", "steps=3", "docs_per_step=2",
                 "rollout.group_size=4", "rollout.positions_per_doc=2", "budget.b0=12", "optim.lr=1e-3",
                 "save_every=3", "reward.name=helpers:OddLength"]
    torchrun(["train", f"out={tmp_path / 'two'}", *overrides])
    single = train(load_config(None, overrides + [f"out={tmp_path / 'one'}"]))
    double = tmp_path / "two"

    one = [json.loads(x) for x in (single / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (double / "metrics.jsonl").read_text().splitlines()]
    assert len(one) == len(two) == 3  # written once, not once per process
    # The RL gradient is really there at every step: groups with different rewards (of 2 docs x 2 positions).
    assert all(m["zero_std_groups"] < 4 for m in one)
    for a, b in zip(one, two):
        assert a["sampled_bands"] == b["sampled_bands"] and a["tokens_generated"] == b["tokens_generated"]
        for key in ("loss", "loss_rl", "loss_ntp", "reward_mean", "reasoning_len_mean", "grad_norm"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), key
    w0 = load_file(tiny_model_dir / "model.safetensors")
    w1 = load_file(latest_checkpoint(single) / "model.safetensors")
    w2 = load_file(latest_checkpoint(double) / "model.safetensors")
    assert max((w1[name] - w0[name]).abs().max().item() for name in w0) > 1e-3
    for name in w1:
        # Adam's first steps move each weight by ~lr * g / (|g| + eps): where a gradient is ~eps, the
        # rounding of the all-reduced sum shows, so the tolerance is a tenth of one step, not float noise.
        torch.testing.assert_close(w2[name], w1[name], rtol=0, atol=1e-4)


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


def test_two_process_evaluation_gives_the_one_process_result(tiny_model_dir, tiny_scored_dir, tmp_path):
    from rmt.evaluate import evaluate

    settings = dict(budget=3, positions=10, batch_size=4, answer_tokens=3)
    one = evaluate(str(tiny_model_dir), tiny_scored_dir, progress=False, **settings)
    out = tmp_path / "two.json"
    torchrun(["eval", "--model", str(tiny_model_dir), "--data", str(tiny_scored_dir), "--budget", "3",
              "--positions", "10", "--batch-size", "4", "--answer-tokens", "3", "--out", str(out)])
    two = json.loads(out.read_text())
    # Several batches of each mode, dealt to both processes; the records come back in order, exactly.
    assert len(one["records"]["ntr"]) == 10 and len(one["records"]["ntp"]) > 4
    assert two["records"] == json.loads(json.dumps(one["records"]))
    for mode in ("ntp", "ntr"):
        one["results"][mode].pop("seconds"), two["results"][mode].pop("seconds")
    assert two["results"] == json.loads(json.dumps(one["results"]))


def test_two_process_posttraining_matches_one_process(tiny_model_dir, tmp_path):
    from test_posttrain import _write, tiny_overrides

    from rmt.posttrain import load_posttrain_config, posttrain

    questions = _write(tmp_path / "questions.jsonl", [(f"What is {a} plus {b}?", str(a + b))
                                                      for a in range(1, 9) for b in range(1, 6)])
    overrides = tiny_overrides(tiny_model_dir, questions, steps=2)
    # A random tiny model is never right: `tiny_overrides` rewards odd-length responses (helpers.OddLength).
    torchrun(["posttrain", f"out={tmp_path / 'two'}", *overrides])
    single = posttrain(load_posttrain_config(None, overrides + [f"out={tmp_path / 'one'}"]))

    one = [json.loads(x) for x in (single / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len(one) == len(two) == 2 and any(m["grad_norm"] > 0 for m in one)
    for a, b in zip(one, two):
        assert a["tokens_generated"] == b["tokens_generated"]
        for key in ("loss", "reward_mean", "response_len_mean", "grad_norm"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), key
    e1, e2 = (json.loads((d / "posttrain_eval.json").read_text()) for d in (single, tmp_path / "two"))
    for phase in ("before", "after"):
        assert e1[phase]["n"] == e2[phase]["n"] == 4
        for key in ("accuracy", "response_len_mean", "format_ok_frac"):
            assert abs(e1[phase][key] - e2[phase][key]) < 1e-9, (phase, key)
    w1 = load_file(latest_checkpoint(single) / "model.safetensors")
    w2 = load_file(latest_checkpoint(tmp_path / "two") / "model.safetensors")
    w0 = load_file(tiny_model_dir / "model.safetensors")
    moved = max((w1[name] - w0[name]).abs().max().item() for name in w0)
    assert moved > 5e-4  # Adam moves weights by about lr = 1e-3 per step
    for name in w1:
        # Adam's first steps move each weight by ~lr * g / (|g| + eps): where a gradient is ~eps, the
        # rounding of the all-reduced sum shows, so the tolerance is a tenth of one step, not float noise.
        torch.testing.assert_close(w2[name], w1[name], rtol=0, atol=1e-4)


def test_two_process_training_resumes_exactly(tiny_model_dir, tiny_scored_dir, tmp_path):
    import shutil

    from helpers import assert_same_record

    overrides = [f"model={tiny_model_dir}", f"data={tiny_scored_dir}", "steps=4", "docs_per_step=2",
                 "rollout.group_size=4", "rollout.positions_per_doc=2", "budget.b0=12", "optim.lr=1e-3",
                 "save_every=2", "keep_last=2"]
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    torchrun(["train", f"out={full}", *overrides])
    # A crash after step 3: the step-4 checkpoint never came, the step-3 metrics line did.
    shutil.copytree(full, crashed)
    shutil.rmtree(crashed / "checkpoints" / "step-000004")
    lines = (crashed / "metrics.jsonl").read_text().splitlines()
    (crashed / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n")
    torchrun(["train", "--resume", f"out={crashed}", *overrides])

    one = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (crashed / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in two] == [1, 2, 3, 4]
    for a, b in zip(one, two):
        assert_same_record(a, b, skip=("rollout_seconds", "reward_seconds", "train_seconds", "step_seconds"))
    w1 = load_file(latest_checkpoint(full) / "model.safetensors")
    w2 = load_file(latest_checkpoint(crashed) / "model.safetensors")
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=0, atol=0)


def test_two_processes_with_unequal_work_finish_and_match_one_process(tiny_model_dir, tiny_scored_dir, tmp_path):
    """Each process gets a different number of forwards per step -- one pack per response
    (`optim.pack_tokens=1`) and groups with no reward spread left out (`zero_std=skip`) -- yet both issue
    the same collectives (filler chunks), finish, and give the one-process result."""
    overrides = [f"model={tiny_model_dir}", f"data={tiny_scored_dir}", "steps=3", "docs_per_step=2",
                 "rollout.group_size=2", "rollout.positions_per_doc=3", "budget.b0=12", "optim.lr=1e-3",
                 "save_every=3", "reward.name=helpers:OddLength", "rollout.zero_std=skip", "optim.pack_tokens=1"]
    torchrun(["train", f"out={tmp_path / 'two'}", *overrides])  # a hang fails on the subprocess timeout
    single = train(load_config(None, overrides + [f"out={tmp_path / 'one'}"]))
    one = [json.loads(x) for x in (single / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert any(m["update_chunks_min"] < m["update_chunks_max"] for m in two), "the work was not unequal"
    for a, b in zip(one, two):
        assert a["tokens_generated"] == b["tokens_generated"] and a["zero_std_groups"] == b["zero_std_groups"]
        for key in ("loss", "loss_rl", "loss_ntp", "reward_mean", "grad_norm"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), key
    w1 = load_file(latest_checkpoint(single) / "model.safetensors")
    w2 = load_file(latest_checkpoint(tmp_path / "two") / "model.safetensors")
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=0, atol=1e-4)


def test_fsdp2_generation_gathers_weights_once_whatever_each_process_decodes(tiny_model_dir, tmp_path):
    """Under FSDP2 (torch's fully_shard; it runs on CPU with gloo), processes that decode different numbers
    of prompts and tokens finish (a per-token weight gather would hang them), and their greedy rollouts are
    the unsharded model's."""
    from rmt import assets
    from rmt.prompts import PromptBuilder
    from rmt.rollout import RolloutEngine, RolloutSettings

    script = Path(__file__).parent / "scripts" / "fsdp2_generation.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(script), str(tiny_model_dir),
           str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    tokenizer = assets.load_tokenizer(str(tiny_model_dir))
    model = assets.load_model(str(tiny_model_dir)).eval()
    builder = PromptBuilder(tokenizer)
    ids = tokenizer("Tom has 12 apples and buys 4 more. How many apples now?", add_special_tokens=False)["input_ids"]
    for rank, (positions, cap) in enumerate((([5], 2), ([5, 8, 11], 6))):
        engine = RolloutEngine(model, tokenizer, RolloutSettings(max_reasoning_tokens=cap, answer_tokens=3,
                                                                 temperature=0.0))
        expected = [r.response_ids for r in engine.generate([builder.prompt_ids(ids, t, 3) for t in positions])]
        assert json.loads((tmp_path / f"rank-{rank}.json").read_text()) == expected
