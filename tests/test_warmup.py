"""The cold start (`rmt warmup`, SPEC §14): its examples, that it never reads evaluation text, exact resume,
and that it teaches the format."""

import json
import shutil
import sys

import pytest
import torch
from helpers import assert_same_record, run_and_kill
from safetensors.torch import load_file

from rmt import assets
from rmt.checkpoint import latest_checkpoint
from rmt.cli import main
from rmt.config import load_config
from rmt.rewards import extract_prediction
from rmt.rollout import answer_format_ids
from rmt.scored import load_scored
from rmt.warmup import WarmupConfig, example_response, warmup


def test_example_response_is_thought_format_and_the_true_token(tiny_model_dir):
    tokenizer = assets.load_tokenizer(str(tiny_model_dir))
    ids = tokenizer("Tom has 12 apples and buys 4 more.", add_special_tokens=False)["input_ids"]
    t = 5
    formats = answer_format_ids(tokenizer)
    tail = example_response(ids, t, "tail", 3, formats)
    close, box, end = formats
    assert tail == ids[t - 3 : t] + close + box + [ids[t]] + end
    text = tokenizer.decode(tail)
    assert text.startswith(tokenizer.decode(ids[t - 3 : t])) and "</think>" in text
    assert extract_prediction(text) == tokenizer.decode([ids[t]])  # the box holds exactly the next token
    assert example_response(ids, t, "empty", 3, formats) == close + box + [ids[t]] + end
    assert example_response(ids, 1, "tail", 3, formats)[:1] == ids[:1]  # a short context restates what there is


def overrides(model, data, *extra):
    return [f"model={model}", f"data={data}", "steps=4", "docs_per_step=2", "positions_per_doc=3",
            "optim.lr=1e-3", "save_every=2", "keep_last=2", *extra]


def test_warmup_never_reads_the_eval_split(tiny_model_dir, tiny_scored_dir, tmp_path):
    """Only midtrain documents are trained on: the run works with the eval split deleted, and every document
    it logged is a midtrain one."""
    data = tmp_path / "scored"
    shutil.copytree(tiny_scored_dir, data)
    shutil.rmtree(data / "eval")  # any read of the eval split would now fail
    run_dir = warmup(load_config(None, overrides(tiny_model_dir, data, f"out={tmp_path / 'run'}"),
                                 schema=WarmupConfig))
    midtrain = {w.doc_id for w in load_scored(tiny_scored_dir, "midtrain")[0]}
    evaluated = {w.doc_id for w in load_scored(tiny_scored_dir, "eval")[0]}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    seen = {doc for r in records for doc in r["doc_ids"]}
    assert len(records) == 4 and seen and seen <= midtrain and not seen & evaluated
    assert all(r["examples"] == 6 and r["loss_ntp"] > 0 and r["loss_rl"] > 0 for r in records)
    assert latest_checkpoint(run_dir).name == "step-000004"


def test_warmup_resume_after_sigkill_is_exact(tiny_model_dir, tiny_scored_dir, tmp_path):
    args = overrides(tiny_model_dir, tiny_scored_dir, "steps=6")
    reference = warmup(load_config(None, args + [f"out={tmp_path / 'ref'}"], schema=WarmupConfig))
    killed = tmp_path / "killed"
    run_and_kill([sys.executable, "-m", "rmt.cli", "warmup", f"out={killed}", *args], killed / "metrics.jsonl", 3)
    assert main(["warmup", "--resume", f"out={killed}", *args]) == 0
    one = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in two] == list(range(1, 7))
    for a, b in zip(one, two):
        assert_same_record(a, b, skip=("step_seconds",))
    w1, w2 = (load_file(latest_checkpoint(d) / "model.safetensors") for d in (reference, killed))
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-5, atol=1e-6)


def test_warmup_teaches_the_format_and_train_starts_from_its_folder(tiny_model_dir, tiny_scored_dir, tmp_path):
    """On the tiny model, a few high-learning-rate steps are enough for greedy answers to close </think>
    by themselves; `rmt train --model WARMUP_DIR` then starts from the warmed checkpoint. (The random
    2-layer model learns the tail thought's copy in 30 steps, but not to stop after one line break.)"""
    from rmt.evaluate import evaluate

    run_dir = warmup(load_config(None, overrides(tiny_model_dir, tiny_scored_dir, f"out={tmp_path / 'warm'}",
                                                 "steps=30", "positions_per_doc=8", "optim.lr=3e-3",
                                                 "budgets=[3]", "save_every=30", "thought=tail"),
                             schema=WarmupConfig))
    before = evaluate(str(tiny_model_dir), tiny_scored_dir, ["ntr"], budget=3, positions=20, progress=False)
    after = evaluate(str(run_dir), tiny_scored_dir, ["ntr"], budget=3, positions=20, progress=False)
    assert before["results"]["ntr"]["well_formed_frac"] < 0.5
    assert after["results"]["ntr"]["well_formed_frac"] >= 0.9
    assert main(["train", f"--model={run_dir}", f"--data={tiny_scored_dir}", f"--out={tmp_path / 'rl'}", "steps=1",
                 "docs_per_step=1", "rollout.group_size=2", "rollout.positions_per_doc=1", "budget.b0=3"]) == 0
    assert (tmp_path / "rl" / "checkpoints" / "step-000001").is_dir()


def test_warmup_config_errors_are_clear(capsys):
    with pytest.raises(Exception, match="thought must be one of"):
        load_config(None, ["thought=story"], schema=WarmupConfig)
    assert main(["warmup", "budgets=[0]"]) == 2
    assert "budgets" in capsys.readouterr().err


def test_default_budgets_cover_the_end_of_dtb():
    """DTB ends at B_min: the cold start shows the model prompts that name it."""
    from rmt.config import BudgetConfig

    budgets = WarmupConfig().budgets
    assert BudgetConfig().b_min in budgets and 2 in budgets and None in budgets
