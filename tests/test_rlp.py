"""SPEC §13: RLP -- its advantages, its dense reward against hand-computed log-probabilities, the moving
average baseline model, the method on the core (thought-only loss, no NTP), and exact resume."""

import json
import sys

import pytest
import torch
from helpers import assert_same_record, run_and_kill

from rmt import assets
from rmt.cli import main
from rmt.config import load_config
from rmt.grpo import make_trajectories
from rmt.losses import rlp_advantages
from rmt.prompts import PromptBuilder
from rmt.rewards import NextToken, RewardContext, RLPReward
from rmt.rollout import Rollout
from rmt.train import train

TIMING = ("rollout_seconds", "reward_seconds", "train_seconds", "step_seconds")


def test_rlp_advantages_hand_computed():
    # G = 4: mean 3, G/(G−1) = 4/3 → A = 4/3·(r − 3) = [−8/3, −4/3, 0, 4]: r_i minus the mean of the others.
    advantages, flat = rlp_advantages(torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.5, 0.5, 0.5, 0.5]]))
    assert advantages[0].tolist() == pytest.approx([-8 / 3, -4 / 3, 0.0, 4.0])
    others = [(2 + 3 + 6) / 3, (1 + 3 + 6) / 3, (1 + 2 + 6) / 3, (1 + 2 + 3) / 3]
    assert advantages[0].tolist() == pytest.approx([r - o for r, o in zip([1, 2, 3, 6], others)])
    assert torch.equal(advantages[1], torch.zeros(4)) and flat == 1  # no std normalisation, flat groups 0


def _logprob(model, prefix, target):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prefix])).logits[0, -1]
    return float(torch.log_softmax(logits.float(), -1)[target])


def test_rlp_reward_is_the_log_likelihood_gain_of_the_thought(tiny_model_dir):
    tokenizer = assets.load_tokenizer(str(tiny_model_dir))
    policy = assets.load_model(str(tiny_model_dir)).eval()
    reward = RLPReward(policy, tokenizer, decay=0.9)
    context = tokenizer("Tom has 3 apples and buys", add_special_tokens=False)["input_ids"]
    ids = context + tokenizer(" 4 more", add_special_tokens=False)["input_ids"]
    t = len(context)
    pre, post = PromptBuilder(tokenizer, "raw").parts(None)
    assert pre == [] and tokenizer.decode(post) == "<think>\n"
    close = tokenizer("\n</think>", add_special_tokens=False)["input_ids"]
    thought = tokenizer(" count", add_special_tokens=False)["input_ids"]
    # One thought closed by the policy (its `</think>` is in the response), one cut by the cap.
    rollouts = [Rollout(context + post, thought + close, [1] * (len(thought) + len(close)), len(thought), True),
                Rollout(context + post, thought, [1] * len(thought), len(thought), False)]
    scores = reward(rollouts, [NextToken(ids, t)] * 2, RewardContext(0, 1))
    with_thought = _logprob(policy, context + post + thought + close, ids[t])
    baseline = _logprob(policy, context, ids[t])  # φ starts as a copy of θ
    for s in scores:
        assert s["logp_thought"] == pytest.approx(with_thought, abs=1e-5)
        assert s["logp_baseline"] == pytest.approx(baseline, abs=1e-5)
        assert s["reward"] == pytest.approx(with_thought - baseline, abs=1e-5)

    # φ ← τφ + (1−τ)θ after an optimizer step: with θ moved by +1 everywhere, φ moves by 1 − τ = 0.1.
    before = {k: v.clone() for k, v in reward.ema.state_dict().items()}
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(1.0)
    reward.after_step(policy)
    name = "model.embed_tokens.weight"
    torch.testing.assert_close(reward.ema.state_dict()[name], before[name] + 0.1, rtol=0, atol=1e-6)
    assert reward.ema.state_dict()[name].data_ptr() != policy.state_dict()[name].data_ptr()
    state = reward.state_dict()
    fresh = RLPReward(assets.load_model(str(tiny_model_dir)), tokenizer)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.ema.state_dict()[name], reward.ema.state_dict()[name], rtol=0, atol=0)


def test_rlp_surrogate_covers_the_thought_only():
    rollout = Rollout([1, 2], [5, 6, 7, 8, 9], [1, 1, 1, 1, 0], reasoning_len=2, closed_think=True)
    (traj,) = make_trajectories([rollout, rollout][:1], [{"reward": 0.3}], torch.zeros(1, 1) + 0.5, [(0, 2)],
                                loss_tokens="thought")
    assert traj.loss_mask == [1, 1, 0, 0, 0] and traj.advantage == 0.5 and traj.position == 2
    (traj,) = make_trajectories([rollout], [{"reward": 0.3}], torch.zeros(1, 1), [(0, 2)], loss_tokens="sampled")
    assert traj.loss_mask == [1, 1, 1, 1, 0]


def rlp_overrides(model, data, *extra):
    return [f"model={model}", f"data={data}", "method=rlp", "steps=6", "docs_per_step=2", "rollout.group_size=4",
            "rollout.positions_per_doc=2", "budget.max_reasoning_tokens=6", "optim.lr=1e-3", "save_every=3",
            *extra]


def test_rlp_method_on_the_core(tiny_model_dir, tiny_scored_dir, tmp_path):
    config = load_config(None, rlp_overrides(tiny_model_dir, tiny_scored_dir, f"out={tmp_path / 'run'}", "steps=2"))
    assert (config.reward.name, config.rl.advantage, config.rl.loss_tokens) == ("rlp", "rlp", "thought")
    assert config.ntp.weight == 0 and config.rollout.prompt_style == "raw" and not config.rollout.answer
    run_dir = train(config)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for m in metrics:
        assert m["loss_ntp"] == 0 and m["budget"] is None and m["reasoning_len_max"] <= 6
        assert "reward_logp_thought_mean" in m and "reward_logp_baseline_mean" in m
        assert m["reward_mean"] == pytest.approx(m["reward_logp_thought_mean"] - m["reward_logp_baseline_mean"],
                                                 abs=1e-5)
    assert any(m["grad_norm"] > 0 for m in metrics)


def test_rlp_resume_after_sigkill_is_exact(tiny_model_dir, tiny_scored_dir, tmp_path):
    """The moving-average model is in the checkpoint: a resumed run's rewards equal the uninterrupted run's."""
    overrides = rlp_overrides(tiny_model_dir, tiny_scored_dir)
    reference = train(load_config(None, overrides + [f"out={tmp_path / 'ref'}"]))
    killed = tmp_path / "killed"
    run_and_kill([sys.executable, "-m", "rmt.cli", "train", f"out={killed}", *overrides], killed / "metrics.jsonl", 4)
    assert main(["train", "--resume", f"out={killed}", *overrides]) == 0
    one = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert len(one) == len(two) == 6
    for a, b in zip(one, two):
        assert_same_record(a, b, skip=TIMING)
