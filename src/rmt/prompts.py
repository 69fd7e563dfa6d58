"""The next-token reasoning prompt (SPEC §1) and the byte view of tokens used by the match rewards.

A prompt is three pieces of token ids: `pre` (chat template + instruction + "### Context" header),
the document's own token ids `x_<t` (never decoded and re-tokenised, so the context is exact), and
`post` (end of the user turn, start of the assistant turn, and the opening `<think>`). The instruction
comes before the context, so all positions of one document share the prompt up to the earlier one.
"""

from __future__ import annotations

from functools import lru_cache

from rmt.errors import RmtError

INSTRUCTION = (
    "Predict the next token of the text below. First think briefly inside <think> </think>{budget_hint}, "
    "then write only the next token inside \\boxed{{}}. The token may begin with a space: if it does, "
    "the space goes inside the box too."
)
BUDGET_HINT = ", using at most {budget} tokens"
CONTEXT_HEADER = "\n### Context\n"
THINK_OPEN = "<think>\n"
THINK_CLOSE = "</think>"
_SENTINEL = "\x00CONTEXT\x00"
_PLAIN_POST = "\n### Answer\n"
STYLES = ("auto", "chat", "plain", "raw")


class PromptBuilder:
    """Builds prompt token ids for a window and a position, for one tokenizer and prompt style.

    `style` is `chat` (the tokenizer's chat template; an error if it has none), `plain` (the instruction
    without a template, for base models), `auto` (chat when the tokenizer has a template), or `raw` (no
    instruction at all: the bare context, then `<think>` -- RLP's prompt, SPEC §13).
    """

    def __init__(self, tokenizer, style: str = "auto", prefill_think: bool = True):
        if style not in STYLES:
            raise RmtError(f"prompt style must be one of {', '.join(STYLES)}, got '{style}'")
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if style == "chat" and not has_template:
            raise RmtError(
                "the model's tokenizer has no chat template but prompt.style=chat; "
                "use prompt.style=plain (or auto) for base models"
            )
        self.tokenizer = tokenizer
        self.chat = style == "chat" or (style == "auto" and has_template)
        self.raw = style == "raw"
        self.prefill_think = prefill_think
        self._parts = lru_cache(maxsize=64)(self._build_parts)

    def instruction(self, budget: int | None) -> str:
        hint = BUDGET_HINT.format(budget=budget) if budget is not None else ""
        return INSTRUCTION.format(budget_hint=hint)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _build_parts(self, budget: int | None) -> tuple[list[int], list[int]]:
        user = self.instruction(budget) + CONTEXT_HEADER
        if self.raw:
            return [], self._encode(THINK_OPEN)
        if self.chat:
            rendered = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": user + _SENTINEL}], add_generation_prompt=True, tokenize=False
            )
            pre, post = rendered.split(_SENTINEL)
        else:
            pre, post = user, _PLAIN_POST
        if self.prefill_think:
            post += THINK_OPEN
        return self._encode(pre), self._encode(post)

    def parts(self, budget: int | None) -> tuple[list[int], list[int]]:
        """(`pre`, `post`) token ids around the context, for the instruction at this budget."""
        return self._parts(budget)

    def prompt_ids(self, window_ids, position: int, budget: int | None) -> list[int]:
        """Prompt for predicting `window_ids[position]` from `window_ids[:position]`."""
        pre, post = self.parts(budget)
        return pre + [int(i) for i in window_ids[:position]] + post


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}


def token_bytes(tokenizer, ids) -> list[bytes]:
    """The exact bytes of each token. Byte-level BPE tokens are mapped back to their raw bytes, so a
    token holding half of a multi-byte character keeps its true boundary; others are decoded one by one."""
    tokens = tokenizer.convert_ids_to_tokens([int(i) for i in ids])
    decoder = _byte_decoder() if _is_byte_level(tokenizer) else {}
    out = []
    for token_id, token in zip(ids, tokens):
        if decoder and token is not None and all(ch in decoder for ch in token):
            out.append(bytes(decoder[ch] for ch in token))
        else:
            out.append(tokenizer.decode([int(token_id)]).encode("utf-8"))
    return out


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and "ByteLevel" in repr(backend.decoder)
