"""RMT inside TRL (`rmt.integrations.trl`): the example runs, and the TRL path draws, prompts, rewards and adds
the NTP term as `rmt train` does."""

import importlib.util
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("trl")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from trl import GRPOConfig  # noqa: E402

from rmt.assets import load_model, load_tokenizer  # noqa: E402
from rmt.budget import length_reward, token_budget  # noqa: E402
from rmt.config import BudgetConfig, CurriculumConfig, load_config  # noqa: E402
from rmt.difficulty import BAND_NAMES, EASY  # noqa: E402
from rmt.errors import RmtError  # noqa: E402
from rmt.integrations.trl import (NextTokenPrompts, NextTokenReward, RMTGRPOTrainer,  # noqa: E402
                                  completion_rollout)
from rmt.rewards import ExactMatch, NextToken, PrefixMatch, RewardContext  # noqa: E402
from rmt.rollout import answer_format_ids  # noqa: E402
from rmt.scored import ntp_target_mask  # noqa: E402
from rmt.train import train  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "trl_rmt.py"
STEPS, DOCS, POSITIONS, G, B0, SEED = 5, 2, 2, 2, 12, 3


class Recorder:
    """The configured reward of an `rmt train` run, recording what it was asked to score."""

    name = "exact"

    def __init__(self, reward):
        self.reward = reward
        self.calls = []

    def __call__(self, rollouts, tasks, context):
        scores = self.reward(rollouts, tasks, context)
        self.calls.append((context, rollouts, tasks, scores))
        return scores


@pytest.fixture(scope="module")
def rmt_run(tiny_model_dir, tiny_scored_dir, tmp_path_factory):
    """A short `rmt train` run (no answer forcing, as TRL has none) and every reward call it made."""
    out = tmp_path_factory.mktemp("rmt-train") / "run"
    config = load_config(None, [
        f"model={tiny_model_dir}", f"data={tiny_scored_dir}", f"out={out}", f"steps={STEPS}", f"seed={SEED}",
        f"docs_per_step={DOCS}", f"rollout.group_size={G}", f"rollout.positions_per_doc={POSITIONS}",
        "rollout.answer_tokens=4", f"budget.b0={B0}", "rollout.force_answer=false", "optim.micro_batch=8",
        f"save_every={STEPS}", "keep_last=1",
    ])
    tokenizer = load_tokenizer(str(tiny_model_dir))
    recorder = Recorder(ExactMatch(tokenizer, config.reward.length_weight))
    run_dir = train(config, reward=recorder)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return SimpleNamespace(config=config, tokenizer=tokenizer, calls=recorder.calls, metrics=metrics)


def stream_like(run, data) -> NextTokenPrompts:
    c = run.config
    return NextTokenPrompts(data, run.tokenizer, total_steps=c.steps, docs_per_step=c.docs_per_step,
                            positions_per_doc=c.rollout.positions_per_doc, seed=c.seed, budget=c.budget,
                            curriculum=c.curriculum)


def grpo_config(out, steps, generations, batch, accumulation=1, **extra) -> GRPOConfig:
    return GRPOConfig(output_dir=str(out), max_steps=steps, num_generations=generations,
                      per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                      shuffle_dataset=False, max_completion_length=24, learning_rate=1e-3, bf16=False,
                      activation_checkpointing=False, logging_steps=1, save_strategy="no", report_to="none",
                      **extra)


# ---- the stream draws what `rmt train` draws --------------------------------------------------------------


def test_stream_draws_the_same_positions_budget_and_prompts_as_rmt_train(rmt_run, tiny_scored_dir):
    steps = list(stream_like(rmt_run, tiny_scored_dir).steps())
    assert len(steps) == len(rmt_run.calls) == STEPS
    for step, (rows, (context, rollouts, tasks, _), record) in enumerate(zip(steps, rmt_run.calls, rmt_run.metrics)):
        assert context.step == step and all(row["step"] == step for row in rows)
        assert {row["budget"] for row in rows} == {context.budget} == {record["budget"]}
        assert context.budget == token_budget(step, STEPS, B0, 1, 0.2)
        # rmt train rolls out G copies of each position, in the stream's order.
        drawn = [(tuple(int(i) for i in task.ids), task.position) for task in tasks[::G]]
        assert [(tuple(row["input_ids"]), row["position"]) for row in rows] == drawn
        assert [row["prompt_ids"] for row in rows] == [r.prompt_ids for r in rollouts[::G]]
        counts = {name: sum(row["band"] == b for row in rows) for b, name in enumerate(BAND_NAMES, start=EASY)}
        assert counts == record["sampled_bands"]
    # The curriculum moved within the run, so the comparison covered more than one band mix.
    assert len({tuple(m["band_probs"].values()) for m in rmt_run.metrics}) >= 3


def test_stream_band_mix_is_the_curriculum(rmt_run, tiny_scored_dir):
    prompts = stream_like(rmt_run, tiny_scored_dir)
    for step, record in enumerate(rmt_run.metrics):
        assert prompts.band_probs_at(step) == pytest.approx(list(record["band_probs"].values()))


def test_stream_keeps_a_fixed_number_of_prompts_per_step(tiny_model_dir, tiny_scored_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    prompts = NextTokenPrompts(tiny_scored_dir, tokenizer, total_steps=3, docs_per_step=2, positions_per_doc=200)
    for rows in prompts.steps():
        assert len(rows) == 400  # more than any window has: drawn positions are repeated
        for row in rows:
            assert prompts.windows[row["doc"]].band[row["position"]] >= EASY
            assert row["prompt"] == tokenizer.decode(row["prompt_ids"])
    assert [r["prompt_ids"] for r in next(prompts.steps())] == [r["prompt_ids"] for r in next(prompts.steps())]


# ---- the reward functions return what rmt's reward objects return -----------------------------------------


def call_reward(function, rollouts, tasks, step, total, budget):
    return function(
        prompts=[""] * len(rollouts), completions=[""] * len(rollouts),
        completion_ids=[r.response_ids for r in rollouts],
        trainer_state=SimpleNamespace(global_step=step, max_steps=total),
        input_ids=[list(task.ids) for task in tasks], position=[task.position for task in tasks],
        budget=[budget] * len(rollouts))


@pytest.mark.parametrize("reward_class", [ExactMatch, PrefixMatch])
def test_reward_function_returns_the_reward_objects_scores_on_rmt_rollouts(rmt_run, reward_class):
    tokenizer = rmt_run.tokenizer
    close_len = len(answer_format_ids(tokenizer)[0])
    function = NextTokenReward(reward_class(tokenizer, length_weight=0.2), tokenizer, rmt_run.config.budget)
    for context, rollouts, tasks, _ in rmt_run.calls:
        expected = reward_class(tokenizer, length_weight=0.2)(rollouts, tasks, context)
        got = call_reward(function, rollouts, tasks, context.step, context.total_steps, context.budget)
        assert got == [s["reward"] for s in expected]
        cap = 2 * context.budget
        for r in rollouts:  # the completion measured as rmt's engine measured it while sampling
            parsed = completion_rollout(tokenizer, r.response_ids, cap)
            assert (parsed.reasoning_len, parsed.closed_think, parsed.text) == (r.reasoning_len, r.closed_think, r.text)


def test_reward_function_scores_a_closed_correct_answer_and_logs_its_parts(tiny_model_dir, tiny_scored_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    prompts = NextTokenPrompts(tiny_scored_dir, tokenizer, total_steps=4, docs_per_step=1, positions_per_doc=1,
                               budget=BudgetConfig(b0=12))
    row = next(prompts.steps())[0]
    target = tokenizer.decode([row["input_ids"][row["position"]]])
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    thought, close = encode("Tom has"), answer_format_ids(tokenizer)[0]
    right = thought + close + encode(" \\boxed{" + target + "}") + [tokenizer.eos_token_id]
    wrong = thought + close + encode(" \\boxed{ zzz}")
    unclosed = encode("Tom has 3 apples and") + [tokenizer.eos_token_id]
    completions = [right, wrong, unclosed]
    task = NextToken(row["input_ids"], row["position"])
    budget = token_budget(0, 4, 12, 1, 0.2)
    logged = {}
    function = NextTokenReward(ExactMatch(tokenizer, length_weight=0.2), tokenizer, BudgetConfig(b0=12))
    got = function(prompts=[row["prompt"]] * 3, completions=[""] * 3, completion_ids=completions,
                   trainer_state=SimpleNamespace(global_step=0, max_steps=4), input_ids=[row["input_ids"]] * 3,
                   position=[row["position"]] * 3, budget=[budget] * 3, band=[row["band"]] * 3,
                   log_metric=lambda name, value: logged.setdefault(name, value))
    # By hand: the reasoning is the thought's tokens, without the line break and the closing tag.
    length = length_reward(len(thought), budget)
    assert got == pytest.approx([0.8 + 0.2 * length, 0.2 * length, 0.0])
    rollouts = [completion_rollout(tokenizer, ids, 2 * budget) for ids in completions]
    assert got == [s["reward"] for s in ExactMatch(tokenizer, 0.2)(rollouts, [task] * 3, RewardContext(0, 4, budget))]
    band = BAND_NAMES[row["band"] - EASY]
    assert logged == pytest.approx({"rmt_exact/match": 1 / 3, "rmt_exact/len": 2 * length / 3,
                                    f"rmt_exact/match_{band}": 1 / 3, "rmt_exact/closed_think": 2 / 3,
                                    "rmt_exact/reasoning_len": (2 * len(thought) + len(unclosed)) / 3})


def test_reward_function_refuses_a_budget_from_another_step(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    function = NextTokenReward(ExactMatch(tokenizer), tokenizer, BudgetConfig(b0=12))
    with pytest.raises(RmtError, match="B_t = 12"):
        function(prompts=[""], completions=[""], completion_ids=[[1, 2]], trainer_state=SimpleNamespace(
            global_step=0, max_steps=4), input_ids=[[5, 6, 7]], position=[1], budget=[7])


# ---- the trainer -------------------------------------------------------------------------------------------


def test_example_runs_two_steps(tiny_model_dir, tiny_scored_dir, tmp_path):
    spec = importlib.util.spec_from_file_location("trl_rmt_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = example.main(["--model", str(tiny_model_dir), "--data", str(tiny_scored_dir), "--out", str(tmp_path / "run"),
                        "--steps", "2", "--b0", "8"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for step, r in enumerate(records):
        assert r["budget"] == token_budget(step, 2, 8, 1, 0.2)
        assert sum(r[f"sampled/{name}"] for name in BAND_NAMES) == 4  # 2 documents × 2 positions
        assert math.isfinite(r["ntp_loss"]) and r["ntp_loss"] > 0
        # The cap 2·B_t, or a closing tag begun at it (`rollout.reasoning_cut`), as rmt's engine cuts.
        tag = len(answer_format_ids(load_tokenizer(str(tiny_model_dir)))[0])
        assert r["rmt_exact/reasoning_len"] <= 2 * r["budget"] + tag
        # Generation is capped at 2·B_t plus room for the answer (8 tokens and the format's).
        assert r["completions/max_length"] <= 2 * r["budget"] + 8 + sum(map(len, answer_format_ids(
            load_tokenizer(str(tiny_model_dir)))[:2]))
        for key in ("rmt_exact/match", "rmt_exact/len", "rmt_exact/closed_think", "band_prob/easy", "loss"):
            assert key in r


@pytest.mark.parametrize("accumulation", [1, 2])
def test_ntp_term_is_the_steps_token_mean_with_rl_positions_masked(tiny_model_dir, tiny_scored_dir, tmp_path,
                                                                   accumulation):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir))
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    prompts = NextTokenPrompts(tiny_scored_dir, tokenizer, total_steps=1, docs_per_step=3, positions_per_doc=2,
                               budget=BudgetConfig(b0=4))

    def no_reward(completions, **columns):  # L_RL is then 0 and the logged loss is λ·L_NTP alone
        return [0.0] * len(completions)

    config = grpo_config(tmp_path, 1, 2, prompts.prompts_per_step * 2 // accumulation, accumulation)
    trainer = RMTGRPOTrainer(model=model, reward_funcs=no_reward, args=config, prompts=prompts,
                             processing_class=tokenizer, ntp_weight=0.5)
    trainer.train()
    log = trainer.state.log_history[0]
    assert any(not torch.equal(initial[k], v) for k, v in model.state_dict().items())

    # By hand: each of the step's documents once, every owned position but the step's RL positions, with the
    # weights the step started from, one document at a time.
    model.load_state_dict(initial)
    rows = next(prompts.steps())
    nll, count = 0.0, 0
    for doc in dict.fromkeys(row["doc"] for row in rows):
        window = prompts.windows[doc]
        rl_positions = [row["position"] for row in rows if row["doc"] == doc]
        mask = ntp_target_mask(window, rl_positions)
        assert not mask[rl_positions].any() and mask.sum() > 0
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.as_tensor(window.input_ids)[None]).logits[0].float(), -1)
        for t in np.flatnonzero(mask):
            nll -= float(logp[t - 1, int(window.input_ids[t])])
            count += 1
    assert log["ntp_loss"] == pytest.approx(nll / count, rel=1e-5)
    assert log["loss"] == pytest.approx(0.5 * nll / count, rel=1e-5)


def test_trainer_names_the_settings_that_break_step_alignment(tiny_model_dir, tiny_scored_dir, tmp_path):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    prompts = NextTokenPrompts(tiny_scored_dir, tokenizer, total_steps=2, docs_per_step=1, positions_per_doc=2)
    config = grpo_config(tmp_path, 3, 2, 8)
    config.shuffle_dataset = True
    with pytest.raises(RmtError) as error:
        RMTGRPOTrainer(model=None, reward_funcs=[], args=config, prompts=prompts, processing_class=tokenizer)
    for need in ("shuffle_dataset=False", "2 × 2 = 4 completions", "max_steps=2"):
        assert need in str(error.value)


def test_trainer_runs_rpt_settings_without_budget_or_curriculum(tiny_model_dir, tiny_scored_dir, tmp_path):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    budget = BudgetConfig(enabled=False, max_reasoning_tokens=6)
    prompts = NextTokenPrompts(tiny_scored_dir, tokenizer, total_steps=1, docs_per_step=1, positions_per_doc=2,
                               budget=budget, curriculum=CurriculumConfig(enabled=False))
    reward = NextTokenReward(PrefixMatch(tokenizer), tokenizer, budget)
    trainer = RMTGRPOTrainer(model=load_model(str(tiny_model_dir)), reward_funcs=reward,
                             args=grpo_config(tmp_path, 1, 2, 4), prompts=prompts, processing_class=tokenizer,
                             ntp_weight=0.0, answer_tokens=2)
    trainer.train()
    log = trainer.state.log_history[0]
    assert "budget" not in log and "band_prob/easy" not in log and "ntp_loss" not in log
    assert "using at most" not in next(prompts.steps())[0]["prompt"]  # no budget in the instruction
    assert log["rmt_prefix/reasoning_len"] <= 6 and log["rmt_prefix/len"] == 0.0
    room = sum(map(len, answer_format_ids(tokenizer)[:2])) + 2
    assert log["completions/max_length"] <= 6 + room
