"""SPEC §1, §4: answer parsing, exact and prefix match rewards, total reward."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rmt.rewards import exact_match, extract_prediction, prefix_match, total_reward


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("<think>the next word</think> \\boxed{ para}", " para"),  # leading space kept
        ("<think>x</think>\\boxed{para}", "para"),
        ("<think>x</think> \\boxed{f(x)}", "f(x)"),
        ("<think>x</think> \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
        ("<think>x</think> \\boxed{a} then \\boxed{b}", "b"),  # last box wins
        ("<think>x</think> \\boxed{\\boxed{a}}", "\\boxed{a}"),  # a box inside a box is content
        ("<think>\\boxed{a}</think> \\boxed{b}", "b"),
        ("<think>a</think><think>b</think> \\boxed{c}", "c"),  # after the last </think>
        ("<think>x</think> \\boxed{}", ""),
        ("<think>x</think> \\boxed{ café}", " café"),
        ("<think>x</think> \\boxed{🙂}", "🙂"),
    ],
)
def test_extract_prediction(response, expected):
    assert extract_prediction(response) == expected


@pytest.mark.parametrize(
    "response",
    [
        "<think>the answer is \\boxed{ para}</think>",  # box only inside the think block
        "<think>x</think> \\boxed{ para} </think> no box",  # box before the last </think>
        "\\boxed{ para}",  # no </think>
        "<think>never closed \\boxed{a}",
        "<think>x</think> the answer is para",  # no box
        "<think>x</think> \\boxed{ para",  # unclosed
        "<think>x</think> \\boxed{a} \\boxed{\\frac{1}{2}",  # last box unclosed
        "",
    ],
)
def test_extract_prediction_none(response):
    assert extract_prediction(response) is None


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.one_of(st.text(), st.sampled_from(["</think>", "\\boxed{", "{", "}", "\\"])), max_size=12)
)
def test_extract_prediction_never_raises(parts):
    result = extract_prediction("".join(parts))
    assert result is None or isinstance(result, str)


def test_exact_match():
    assert exact_match(" para", " para") == 1.0
    assert exact_match("para", " para") == 0.0  # leading space matters
    assert exact_match(" para", "para") == 0.0
    assert exact_match(None, " para") == 0.0
    assert exact_match(" café", " café") == 1.0
    assert exact_match(" cafe", " café") == 0.0
    assert exact_match("", "") == 1.0  # an empty box for an empty token is still an equality


CONTINUATION = [" par", "agraph", " is"]


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        (" par", 1.0),  # one token
        (" paragraph", 1.0),  # two tokens, ends on a boundary
        (" paragraph is", 1.0),  # the whole continuation
        (" para", 0.0),  # ends inside a token
        ("par", 0.0),  # leading space missing
        (" paragraph is not", 0.0),  # longer than the continuation
        (" pan", 0.0),
        ("", 0.0),
        (None, 0.0),
    ],
)
def test_prefix_match(prediction, expected):
    assert prefix_match(prediction, CONTINUATION) == expected


def test_prefix_match_multibyte():
    assert prefix_match("ét", ["é", "t", "é"]) == 1.0
    assert prefix_match("été", ["é", "t", "é"]) == 1.0
    assert prefix_match("e", ["é", "t", "é"]) == 0.0


def test_prefix_match_raw_token_bytes():
    # Byte-level tokenizers may split "é" (c3 a9) over two tokens; raw bytes keep the boundary exact.
    assert prefix_match("é", [b"\xc3", b"\xa9", b"t"]) == 1.0
    assert prefix_match("ét", [b"\xc3", b"\xa9", b"t"]) == 1.0


def test_prefix_match_empty_continuation():
    assert prefix_match(" par", []) == 0.0


def test_total_reward():
    assert total_reward(1.0, 0.5, 0.2) == pytest.approx(0.8 * 1.0 + 0.2 * 0.5)
    assert total_reward(0.0, 1.0, 0.0) == 0.0
    assert total_reward(1.0, 0.0, 1.0) == 0.0


def test_prefix_match_never_raises_on_lone_surrogates():
    assert prefix_match("\ud800", [" par"]) == 0.0
    assert prefix_match("\ud800", ["\ud800"]) == 1.0


# ---- reward objects (the interface the trainer calls) ------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from rmt import assets

    return assets.load_tokenizer(str(tiny_model_dir))


def _rollouts(texts, reasoning_lens, closed):
    from rmt.rollout import Rollout

    return [Rollout([1], text=t, reasoning_len=n, closed_think=c) for t, n, c in zip(texts, reasoning_lens, closed)]


def test_exact_reward_object_hand_computed(tokenizer):
    from rmt.rewards import ExactMatch, NextToken, RewardContext

    ids = tokenizer("Ana has 12 books and 3 paragraphs", add_special_tokens=False)["input_ids"]
    t = 3
    target = tokenizer.decode([ids[t]])
    assert target.startswith(" ")  # a token that begins with a space: the space belongs in the box
    texts = [f"x</think> \\boxed{{{target}}}",  # right, closed itself at length 4 = B: r_len = 1
             f"x</think> \\boxed{{{target.strip()}}}",  # leading space missing: no match
             f"x</think> \\boxed{{{target}}}",  # right, but the cap closed it: no length reward
             "x</think> no box",  # missing \boxed{}: 0, never an exception
             f"x</think> \\boxed{{{target}{tokenizer.decode([ids[t + 1]])}}}"]  # two tokens: not exact
    rollouts = _rollouts(texts, [4, 2, 8, 6, 4], [True, True, False, True, True])
    reward = ExactMatch(tokenizer, length_weight=0.2, r_max=1.0)
    scores = reward(rollouts, [NextToken(ids, t)] * 5, RewardContext(step=0, total_steps=10, budget=4))
    assert [s["match"] for s in scores] == [1.0, 0.0, 1.0, 0.0, 0.0]
    # r_len: ℓ=4 → 1; ℓ=2 → 0.5; cap-closed → 0 (length_needs_close); ℓ=6 → (8−6)/4 = 0.5; ℓ=4 → 1
    assert [s["len"] for s in scores] == [1.0, 0.5, 0.0, 0.5, 1.0]
    assert [s["reward"] for s in scores] == pytest.approx([1.0, 0.1, 0.8, 0.1, 0.2])
    no_budget = reward(rollouts, [NextToken(ids, t)] * 5, RewardContext(0, 10, budget=None))
    assert [s["reward"] for s in no_budget] == [1.0, 0.0, 1.0, 0.0, 0.0]  # without a budget w = 0
    ungated = ExactMatch(tokenizer, 0.2, 1.0, length_needs_close=False)
    assert ungated(rollouts[2:3], [NextToken(ids, t)], RewardContext(0, 10, 4))[0]["len"] == 0.0  # ℓ=8 = 2B


def test_prefix_reward_object_takes_multi_token_predictions(tokenizer):
    from rmt.rewards import NextToken, PrefixMatch, RewardContext

    ids = tokenizer("Zoë reads paragraphs in the café", add_special_tokens=False)["input_ids"]
    t = 1
    two = tokenizer.decode(ids[t : t + 2])
    part = tokenizer.decode([ids[t]])[:-1]
    rollouts = _rollouts([f"</think> \\boxed{{{two}}}", f"</think> \\boxed{{{part}}}", "</think>"],
                         [1, 1, 1], [True] * 3)
    scores = PrefixMatch(tokenizer)(rollouts, [NextToken(ids, t)] * 3, RewardContext(0, 1))
    assert [s["match"] for s in scores] == [1.0, 0.0, 0.0] and [s["reward"] for s in scores] == [1.0, 0.0, 0.0]


def test_rewards_are_chosen_in_config(tokenizer):
    from rmt.config import RewardConfig
    from rmt.rewards import ExactMatch, PrefixMatch, build_reward

    assert isinstance(build_reward(RewardConfig(name="exact"), tokenizer), ExactMatch)
    assert isinstance(build_reward(RewardConfig(name="prefix"), tokenizer), PrefixMatch)
    assert build_reward(RewardConfig(name="helpers:OddLength"), tokenizer).name == "odd-length"
    from rmt.errors import RmtError

    with pytest.raises(RmtError, match="cannot import"):
        build_reward(RewardConfig(name="helpers:Nothing"), tokenizer)
    with pytest.raises(RmtError, match="reward.name must be one of"):
        RewardConfig(name="exactt")
