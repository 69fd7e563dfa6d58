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
