import json
import os
import sys

import pytest
import torch
from helpers import assert_same_record, run_and_kill, subprocess_env
from safetensors.torch import load_file

from rmt import assets
from rmt.checkpoint import latest_checkpoint
from rmt.cli import main
from rmt.corpus import load_corpus, split_corpus
from rmt.errors import RmtError
from rmt.mathdata import QuestionPrompt, check_disjoint, load_math_data, math_reward, normalize_question
from rmt.posttrain import load_posttrain_config, posttrain
from rmt.rollout import answer_format_ids

TIMING = ("rollout_seconds", "train_seconds", "step_seconds", "seconds")


@pytest.fixture(autouse=True)
def _one_thread():
    # The tiny model gains nothing from threads, and on a busy machine a second thread that is not
    # scheduled stalls every operation at its barrier.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def answer(box: str) -> str:
    return f"<think>\nsome reasoning\n</think> \\boxed{{{box}}}"


# ---- reward -------------------------------------------------------------------------------------


@pytest.mark.parametrize("response, gold, expected", [
    (answer("18"), "18", 1.0),
    (answer("17"), "18", 0.0),
    (answer("-4"), "4", 0.0),
    (answer("\\frac{1}{2}"), "0.5", 1.0),  # fractions
    (answer("0.5"), "\\frac{1}{2}", 1.0),
    (answer("\\dfrac12"), "0.5", 1.0),  # LaTeX
    (answer("\\$18.00"), "18", 1.0),
    (answer("-\\frac{3}{4}"), "-0.75", 1.0),
    (answer("\\text{18}"), "18", 1.0),
    (answer("21 * 70"), "1470", 0.0),  # a calculation is not an answer
    (answer("3 + 4"), "7", 0.0),
    (answer("\\sqrt{4}"), "2", 0.0),
    (answer("x = 18"), "18", 1.0),
    (answer("1,000"), "1000", 1.0),  # thousands separators
    (answer("1000"), "1,000", 1.0),
    (answer("１８"), "18", 1.0),  # unicode: full-width digits, minus sign
    (answer("\u22124"), "-4", 1.0),
    (answer("🙂"), "18", 0.0),
    (answer("十八"), "18", 0.0),
    (answer(""), "18", 0.0),  # malformed
    (answer("\\frac{"), "3", 0.0),
    (answer("\\left("), "3", 0.0),
    (answer("9" * 500), "3", 0.0),
    ("<think>\nreasoning\n</think> \\boxed{18", "18", 0.0),  # never closed
    ("<think>\nreasoning\n</think> the answer is 18", "18", 0.0),  # missing box
    ("\\boxed{18}", "18", 0.0),  # no </think>: the box is not an answer
    (answer("12") + " or \\boxed{18}", "18", 1.0),  # the last box counts
    (answer("yes"), "yes", 1.0),  # gold answers that are not math compare as text
    (answer("no"), "yes", 0.0),
])
def test_math_reward(response, gold, expected):
    assert math_reward(response, gold) == expected


# ---- question sources ---------------------------------------------------------------------------


def test_gsm8k_questions_are_disjoint_from_each_other_and_from_midtraining():
    data = load_math_data("gsm8k")
    assert len(data.train) > 50 and len(data.eval) > 20
    train = {normalize_question(q.question) for q in data.train}
    held_out = {normalize_question(q.question) for q in data.eval}
    assert not train & held_out
    midtrain = [normalize_question(d.text) for d in split_corpus(load_corpus("gsm8k"), "midtrain")]
    assert len(midtrain) > 1000
    for q in [*train, *held_out]:
        assert not any(q in doc for doc in midtrain)
    check_disjoint(data.train, data.eval, [d.text for d in split_corpus(load_corpus("gsm8k"), "midtrain")])
    assert all(q.answer.lstrip("-").replace(".", "").isdigit() for q in data.train + data.eval)


def _write(path, questions):
    path.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in questions))
    return str(path)


def test_user_files_that_overlap_are_refused(tmp_path):
    train = _write(tmp_path / "train.jsonl", [("What is 2 + 2?", "4"), ("What is 3 + 5?", "8")])
    held_out = _write(tmp_path / "eval.jsonl", [("what is 3  +  5?", "8"), ("What is 1 + 1?", "2")])
    with pytest.raises(RmtError, match="also training questions"):
        load_math_data(train, held_out)
    clean = _write(tmp_path / "clean.jsonl", [("What is 1 + 1?", "2")])
    data = load_math_data(train, clean)
    assert [q.answer for q in data.train] == ["4", "8"] and [q.question for q in data.eval] == ["What is 1 + 1?"]
    # One file: a hash split of its questions.
    many = _write(tmp_path / "many.jsonl", [(f"What is {i} + 1?", str(i + 1)) for i in range(40)])
    data = load_math_data(many, eval_fraction=0.3)
    assert len(data.train) + len(data.eval) == 40 and data.eval and data.train
    with pytest.raises(RmtError, match="mid-training corpus"):
        check_disjoint(data.train, data.eval, ["A document. What is 3 + 1? It is 4."])


def test_reasoning_gym_eval_problems_are_new():
    data = load_math_data("reasoning-gym:basic_arithmetic", generated_train=40, generated_eval=20)
    assert 0 < len(data.train) <= 40 and 0 < len(data.eval) <= 20
    assert not {q.question for q in data.train} & {q.question for q in data.eval}
    with pytest.raises(RmtError, match="reasoning-gym task 'no_such_task'"):
        load_math_data("reasoning-gym:no_such_task")
    with pytest.raises(RmtError, match="unknown question source"):
        load_math_data("questions.csv")


def test_question_prompt(tiny_model_dir, tiny_model_no_template_dir):
    from transformers import AutoTokenizer

    chat = QuestionPrompt(AutoTokenizer.from_pretrained(tiny_model_dir)).text("What is 2 + 2?")
    assert chat.startswith("<|im_start|>user\nSolve") and chat.endswith("<|im_start|>assistant\n<think>\n")
    assert "What is 2 + 2?" in chat and "\\boxed{}" in chat
    plain = QuestionPrompt(AutoTokenizer.from_pretrained(tiny_model_no_template_dir)).text("What is 2 + 2?")
    assert plain.startswith("Solve") and plain.endswith("### Answer\n<think>\n")


# ---- the recipe ---------------------------------------------------------------------------------

def tiny_overrides(model, questions, steps=3):
    # A random tiny model never writes a correct answer: the steps are rewarded by `helpers.OddLength`
    # (through the reward interface) so that they really update the model.
    return [f"model={model}", f"source={questions}", f"steps={steps}", "questions_per_step=2",
            "rollout.group_size=4", "max_reasoning_tokens=8", "rollout.answer_tokens=3", "n_eval=4",
            "optim.lr=1e-3", "save_every=2", "reward=helpers:OddLength"]


@pytest.fixture
def tiny_questions(tmp_path):
    return _write(tmp_path / "questions.jsonl", [(f"Tom has {a} apples and buys {b} more. How many?", str(a + b))
                                                 for a in range(1, 11) for b in range(1, 7)])


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_posttrain_end_to_end(tiny_model_dir, tiny_questions, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["posttrain", f"--out={out}", *tiny_overrides(tiny_model_dir, tiny_questions)]) == 0
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    # Sampled tokens: reasoning up to the cap (8), a closing tag begun there (`tag` tokens), the answer (3).
    tag = len(answer_format_ids(assets.load_tokenizer(str(tiny_model_dir)))[0])
    for m in metrics:
        for key in ("reward_mean", "accuracy", "response_len_mean", "format_ok_frac", "zero_std_groups", "loss",
                    "lr", "grad_norm", "step_seconds"):
            assert key in m
        assert m["tokens_generated"] <= 2 * 4 * (8 + tag + 3)
    assert any(m["grad_norm"] > 0 for m in metrics)
    assert latest_checkpoint(out).name == "step-000003"
    report = json.loads((out / "posttrain_eval.json").read_text())
    assert report["source"] == tiny_questions and report["n_eval"] == 4
    for phase in ("before", "after"):
        assert report[phase]["n"] == 4 and 0 <= report[phase]["accuracy"] <= 1
        assert 0 < report[phase]["response_len_mean"] <= 8 + tag + 3
    samples = [json.loads(line) for line in (out / "eval_samples.jsonl").read_text().splitlines()]
    assert [s["phase"] for s in samples] == ["before"] * 4 + ["after"] * 4
    table = capsys.readouterr().out
    assert "before" in table and "after" in table and "accuracy" in table
    # The post-trained run folder is a model: post-training can start from it again.
    overrides = tiny_overrides(tiny_model_dir, tiny_questions)[1:] + ["steps=1", "eval_before=false"]
    assert main(["posttrain", f"--model={out}", f"--out={tmp_path / 'again'}", *overrides]) == 0
    again = json.loads((tmp_path / "again" / "posttrain_eval.json").read_text())
    assert again["model_path"] == str(latest_checkpoint(out)) and again["before"] is None and again["after"]


def test_resume_after_sigkill_is_exact(tiny_model_dir, tiny_questions, tmp_path):
    overrides = tiny_overrides(tiny_model_dir, tiny_questions, steps=6)
    reference = posttrain(load_posttrain_config(None, overrides + [f"out={tmp_path / 'ref'}"]))

    killed = tmp_path / "killed"
    # Kill after the step-2 checkpoint, before the run ends: some logged steps are then lost.
    run_and_kill([sys.executable, "-m", "rmt.cli", "posttrain", f"out={killed}", *overrides], killed / "metrics.jsonl",
                 3, env=subprocess_env())
    assert latest_checkpoint(killed).name in ("step-000002", "step-000004")

    assert main(["posttrain", "--resume", f"out={killed}", *overrides]) == 0
    resumed, uninterrupted = read_metrics(killed), read_metrics(reference)
    assert len(resumed) == len(uninterrupted) == 6
    assert any(m["grad_norm"] > 0 for m in uninterrupted)
    for a, b in zip(resumed, uninterrupted):
        assert_same_record(a, b, skip=TIMING)
    eval_resumed = json.loads((killed / "posttrain_eval.json").read_text())
    eval_reference = json.loads((reference / "posttrain_eval.json").read_text())
    assert_same_record(eval_resumed["before"], eval_reference["before"], skip=TIMING)
    assert_same_record(eval_resumed["after"], eval_reference["after"], skip=TIMING)
    ref_w = load_file(latest_checkpoint(reference) / "model.safetensors")
    res_w = load_file(latest_checkpoint(killed) / "model.safetensors")
    for name in ref_w:
        torch.testing.assert_close(res_w[name], ref_w[name], rtol=1e-5, atol=1e-6)


def test_packaged_config_is_valid():
    config = load_posttrain_config()
    data = load_math_data(config.source, config.eval_source, config.eval_fraction, config.generated_train,
                          config.generated_eval, config.seed, config.task_options)
    assert len(data.eval) >= config.n_eval and config.reward == "math"


def test_config_errors_are_clear(tmp_path, capsys):
    with pytest.raises(RmtError, match="rl.enabled must be true"):
        load_posttrain_config(None, ["rl.enabled=false"])
    with pytest.raises(RmtError, match="key: ntp"):  # post-training has no NTP term, hence no such section
        load_posttrain_config(None, ["ntp.weight=0.1"])
    assert main(["posttrain", f"--out={tmp_path / 'run'}", "--source=nowhere.jsonl"]) == 2
    assert "does not exist" in capsys.readouterr().err
