import json
import shutil
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import assert_same_record, run_and_kill

from rmt import assets
from rmt.budget import token_budget
from rmt.checkpoint import latest_checkpoint
from rmt.cli import main
from rmt.config import load_config
from rmt.curriculum import band_probabilities
from rmt.errors import RmtError
from rmt.rollout import answer_format_ids
from rmt.train import train

TIMING = ("rollout_seconds", "reward_seconds", "train_seconds", "step_seconds")


def tiny_config(model, data, out, *extra):
    return load_config(None, [
        f"model={model}", f"data={data}", f"out={out}", "steps=6", "docs_per_step=2",
        "rollout.group_size=4", "rollout.positions_per_doc=2", "rollout.answer_tokens=4",
        "budget.b0=12", "budget.max_reasoning_tokens=12", "optim.lr=1e-3", "optim.micro_batch=8",
        "save_every=2", "keep_last=2", *extra,
    ])


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_rmt_follows_budget_and_curriculum(tiny_model_dir, tiny_scored_dir, tmp_path):
    config = tiny_config(tiny_model_dir, tiny_scored_dir, tmp_path / "run")
    run_dir = train(config)
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, 7))
    tag = len(answer_format_ids(assets.load_tokenizer(str(tiny_model_dir)))[0])
    for m in metrics:
        step = m["step"] - 1
        assert m["budget"] == token_budget(step, 6, 12, 1, 0.2)
        expected = band_probabilities(step, 6, (0.6, 0.3, 0.1), (0.1, 0.3, 0.6))
        assert list(m["band_probs"].values()) == pytest.approx(expected)
        assert sum(m["sampled_bands"].values()) == 4  # 2 docs x 2 positions
        assert m["reasoning_len_max"] <= 2 * m["budget"] + tag  # the cap, or a closing tag begun at it
        for key in ("reward_mean", "reward_match_mean", "reward_len_mean", "format_ok_frac", "zero_std_groups",
                    "loss", "loss_rl", "loss_ntp", "lr", "grad_norm", "tokens_generated", "step_seconds"):
            assert key in m
        assert m["loss"] == pytest.approx(m["loss_rl"] + 0.1 * m["loss_ntp"])
    assert (run_dir / "config.yaml").is_file()
    ckpt = latest_checkpoint(run_dir)
    assert ckpt.name == "step-000006"
    assert len(list((run_dir / "checkpoints").iterdir())) == 2  # keep_last
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(ckpt).config.vocab_size > 0


@pytest.mark.parametrize("method, extra", [
    ("rpt", []),
    ("ntp", []),
    ("rmt", ["budget.enabled=false"]),
    ("rmt", ["curriculum.enabled=false"]),
    ("rmt", ["ntp.weight=0"]),
    ("rmt", ["rollout.force_answer=false", "rollout.zero_std=skip", "rl.kl_coef=0.05"]),
])
def test_methods_and_ablations_run(tiny_model_dir, tiny_scored_dir, tmp_path, method, extra):
    config = tiny_config(tiny_model_dir, tiny_scored_dir, tmp_path / "run", f"method={method}", "steps=2", *extra)
    metrics = read_metrics(train(config))
    assert len(metrics) == 2
    last = metrics[-1]
    if method == "ntp":
        assert last["loss"] == pytest.approx(last["loss_ntp"]) and "reward_mean" not in last
        return
    assert last["tokens_generated"] > 0
    if method == "rpt" or "budget.enabled=false" in extra:
        assert last["budget"] is None and last["reward_len_mean"] == 0 and last["reasoning_len_max"] <= 12
    if method == "rpt" or "curriculum.enabled=false" in extra:
        assert last["band_probs"] is None
    if method == "rpt" or "ntp.weight=0" in extra:
        assert last["loss"] == pytest.approx(last["loss_rl"])


def test_control_rollouts_repeat_the_starting_model_on_the_same_draws(tiny_model_dir, tiny_scored_dir, tmp_path):
    """`rl.control`: each step, the frozen starting model answers the policy's prompts with the same seeds.
    At step 1 the two are the same model, so every rollout is identical; once the policy has moved, they
    differ, while the control stays what the starting model draws. Its match reward is logged per step."""
    from rmt.rewards import ExactMatch

    calls = []

    class Recording(ExactMatch):
        def __call__(self, rollouts, tasks, context):
            calls.append((context.step, [r.response_ids for r in rollouts]))
            scores = super().__call__(rollouts, tasks, context)
            for s, r in zip(scores, rollouts):  # a match reward that varies, whatever the tiny model writes
                s["match"] = float(len(r.response_ids) % 2)
            return scores

    config = tiny_config(tiny_model_dir, tiny_scored_dir, tmp_path / "run", "steps=3", "rl.control=true",
                         "rollout.temperature=1.0")
    tokenizer = assets.load_tokenizer(str(tiny_model_dir))
    metrics = read_metrics(train(config, reward=Recording(tokenizer)))
    assert [step for step, _ in calls] == [0, 0, 1, 1, 2, 2]  # policy, then control, every step
    policy = {step: ids for k, (step, ids) in enumerate(calls) if k % 2 == 0}
    control = {step: ids for k, (step, ids) in enumerate(calls) if k % 2 == 1}
    assert policy[0] == control[0]
    assert policy[2] != control[2]  # lr 1e-3 moves the tiny policy within two steps
    for m, step in zip(metrics, range(3)):
        assert m["control_match_mean"] == pytest.approx(sum(len(ids) % 2 for ids in control[step]) / 16)
        assert "control_match_easy" in m and m["control_seconds"] > 0


def _weights(run_dir):
    return load_file(latest_checkpoint(run_dir) / "model.safetensors")


def test_resume_after_sigkill_is_exact(tiny_model_dir, tiny_scored_dir, tmp_path):
    args = ["model", "data", "steps", "docs_per_step", "rollout.group_size", "rollout.positions_per_doc",
            "budget.b0", "optim.lr", "save_every"]
    values = [tiny_model_dir, tiny_scored_dir, 8, 2, 4, 2, 16, 1e-3, 3]
    overrides = [f"{k}={v}" for k, v in zip(args, values)]
    reference = train(load_config(None, overrides + [f"out={tmp_path / 'ref'}"]))

    killed = tmp_path / "killed"
    # Kill after the step-3 checkpoint, before the run ends: some logged steps are then lost.
    run_and_kill([sys.executable, "-m", "rmt.cli", "train", f"out={killed}", *overrides], killed / "metrics.jsonl", 4)
    assert latest_checkpoint(killed).name in ("step-000003", "step-000006")

    assert main(["train", "--resume", f"out={killed}", *overrides]) == 0
    resumed, uninterrupted = read_metrics(killed), read_metrics(reference)
    assert len(resumed) == len(uninterrupted) == 8
    for a, b in zip(resumed, uninterrupted):
        assert_same_record(a, b, skip=TIMING)
    ref_w, res_w = _weights(reference), _weights(killed)
    for name in ref_w:
        torch.testing.assert_close(res_w[name], ref_w[name], rtol=1e-5, atol=1e-6)


def test_run_folder_is_never_overwritten(tiny_model_dir, tiny_scored_dir, tmp_path, capsys):
    config = tiny_config(tiny_model_dir, tiny_scored_dir, tmp_path / "run", "steps=1")
    train(config)
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(RmtError, match="already holds a run"):
        train(config)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before
    assert main(["train", f"--out={tmp_path / 'empty'}", "--resume", f"data={tiny_scored_dir}"]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err


def test_config_typo_is_one_clear_error(capsys):
    assert main(["train", "budgett.b0=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "budgett" in err and "Did you mean" in err


def test_missing_scored_data_is_one_clear_error(tmp_path, capsys):
    assert main(["train", f"--data={tmp_path}", f"--out={tmp_path / 'run'}"]) == 2
    assert "rmt train: error:" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [[], ["ntp.weight=0"], ["method=ntp"], ["rollout.zero_std=skip", "rl.kl_coef=0.05"]])
def test_fast_paths_match_the_reference_path(tiny_model_dir, tiny_scored_dir, tmp_path, extra):
    """Shared-prefix rollouts and packed training give the run the reference path gives."""
    runs = []
    for name, switches in (("fast", []), ("reference", ["rollout.shared_prefix=false", "optim.packed=false"])):
        config = tiny_config(tiny_model_dir, tiny_scored_dir, tmp_path / name, "steps=3", *extra, *switches)
        runs.append(read_metrics(train(config)))
    for fast, reference in zip(*runs):
        assert fast.keys() == reference.keys()
        rl = "method=ntp" not in extra
        assert ("reward_mean" in fast) == rl and ("tokens_generated" in fast) == rl
        assert fast.get("tokens_generated") == reference.get("tokens_generated")
        for key in ("loss", "loss_rl", "loss_ntp", "grad_norm", *(("reward_mean",) if rl else ())):
            assert fast[key] == pytest.approx(reference[key], rel=1e-4, abs=1e-6), key


def test_resume_continues_the_run_as_it_was(tiny_model_dir, tiny_scored_dir, tmp_path, capsys):
    """`--resume --out RUN` alone takes the run's saved config; settings that would change its results are
    refused (before anything is written) unless --allow-changes; harmless ones are accepted."""
    run = tmp_path / "run"
    config = tiny_config(tiny_model_dir, tiny_scored_dir, run, "steps=3", "save_every=1", "method=rpt")
    train(config)
    shutil.rmtree(run / "checkpoints" / "step-000003")
    saved = (run / "config.yaml").read_text()
    for change in ("steps=5", "method=rmt", "seed=1", "rollout.top_p=0.5"):
        assert main(["train", "--resume", "--out", str(run), change]) == 2
        err = capsys.readouterr().err
        assert "other settings" in err and change.split("=")[0] in err and "--allow-changes" in err
    assert (run / "config.yaml").read_text() == saved and len(read_metrics(run)) == 3
    assert main(["train", "--resume", "--out", str(run), "keep_last=3"]) == 0  # same run, more checkpoints kept
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3]
    assert yaml.safe_load((run / "config.yaml").read_text())["method"] == "rpt"


def test_bf16_export_halves_the_weights_and_resume_stays_exact(tiny_model_dir, tiny_scored_dir, tmp_path):
    """export_dtype=bfloat16: the Hugging Face weights are bf16, the exact fp32 weights stay in trainer_state/,
    and a resumed run equals the uninterrupted one."""
    overrides = [f"model={tiny_model_dir}", f"data={tiny_scored_dir}", "steps=4", "docs_per_step=2",
                 "rollout.group_size=2", "rollout.positions_per_doc=2", "budget.b0=6", "optim.lr=1e-3",
                 "save_every=2", "keep_last=2", "export_dtype=bfloat16"]
    reference = train(load_config(None, overrides + [f"out={tmp_path / 'ref'}"]))
    weights = load_file(latest_checkpoint(reference) / "model.safetensors")
    assert all(v.dtype == torch.bfloat16 for v in weights.values())
    cut = tmp_path / "cut"
    shutil.copytree(reference, cut)
    shutil.rmtree(cut / "checkpoints" / "step-000004")
    assert main(["train", "--resume", "--out", str(cut)]) == 0
    one, two = read_metrics(reference), read_metrics(cut)
    for a, b in zip(one, two):
        assert_same_record(a, b, skip=TIMING)
