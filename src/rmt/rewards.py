"""Answer parsing and match rewards for next-token reasoning (SPEC §1, §4)."""

from collections.abc import Sequence

_THINK_END = "</think>"
_BOX_OPEN = "\\boxed{"


def extract_prediction(response: str) -> str | None:
    """Content of the last ``\\boxed{…}`` after the last ``</think>`` (RPT's rule, SPEC §1).

    Braces inside the box must balance (``\\boxed{\\frac{1}{2}}`` → ``\\frac{1}{2}``); the content is
    returned verbatim, leading spaces included, because a token may begin with one. Returns None when
    there is no ``</think>``, no box after it, or the last box is never closed. Never raises.
    """
    think_end = response.rfind(_THINK_END)
    if think_end < 0:
        return None
    answer = response[think_end + len(_THINK_END):]
    prediction = None
    start = answer.find(_BOX_OPEN)
    while start >= 0:
        # Walk to the brace that closes this box, so boxes nested inside it stay part of its content.
        content_start = start + len(_BOX_OPEN)
        depth = 1
        pos = content_start
        while pos < len(answer) and depth:
            if answer[pos] == "{":
                depth += 1
            elif answer[pos] == "}":
                depth -= 1
            pos += 1
        if depth:
            return None  # an unclosed box runs to the end, so it is the last one
        prediction = answer[content_start:pos - 1]
        start = answer.find(_BOX_OPEN, pos)
    return prediction


def exact_match(prediction: str | None, target_text: str) -> float:
    """RMT's match reward (SPEC §4): 1 iff the prediction equals the decoded target token.

    ``r = 1[pred == x_t]``. String equality is UTF-8 byte equality, so a missing leading space fails.
    """
    return float(prediction is not None and prediction == target_text)


def prefix_match(prediction: str | None, continuation_tokens: Sequence[str | bytes]) -> float:
    """RPT's match reward (SPEC §4): 1 iff the prediction is a token-aligned prefix of the continuation.

    ``r = 1[bytes(pred) == bytes(x_t … x_{t+k−1}) for some k ≥ 1]``. ``continuation_tokens`` are the
    tokens ``x_t, x_{t+1}, …`` as decoded strings, or as raw bytes for byte-level tokenizers whose
    tokens may split a multibyte character. Bytes are compared, never re-tokenised ids, because
    re-tokenising a lone answer breaks on leading spaces.
    """
    if not prediction:
        return 0.0
    pred = prediction.encode()
    continuation = b""
    for token in continuation_tokens:
        continuation += token if isinstance(token, bytes) else token.encode()
        if len(continuation) >= len(pred):
            # The first boundary at or past the prediction's end decides: it must end exactly there.
            return float(continuation == pred)
    return 0.0


def total_reward(match: float, length: float, length_weight: float) -> float:
    """Total reward (SPEC §4): ``r = (1 − w)·r_match + w·r_len``."""
    return (1.0 - length_weight) * match + length_weight * length


PREFIX_TOKENS = 16  # continuation tokens a multi-token (prefix) prediction may cover


def match_reward(kind: str, prediction: str | None, window_ids, position: int, tokenizer) -> float:
    """The match reward of a prediction for target `window_ids[position]` (SPEC §4): `exact` compares
    with the decoded target token, `prefix` with the bytes of the continuation from the target on."""
    from rmt.prompts import token_bytes

    if kind == "exact":
        return exact_match(prediction, tokenizer.decode([int(window_ids[position])]))
    return prefix_match(prediction, token_bytes(tokenizer, window_ids[position : position + PREFIX_TOKENS]))
