import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rmt.errors import RmtError
from rmt.prompts import PromptBuilder, token_bytes
from rmt.rewards import extract_prediction
from rmt.rollout import RolloutEngine, RolloutSettings


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


def test_positions_of_a_document_share_the_prompt_prefix(tiny):
    _, tokenizer = tiny
    builder = PromptBuilder(tokenizer)
    window = tokenizer("Tom has 3 apples and buys 4 more.", add_special_tokens=False)["input_ids"]
    pre, post = builder.parts(32)
    early, late = builder.prompt_ids(window, 3, 32), builder.prompt_ids(window, 7, 32)
    assert early[: len(pre) + 3] == late[: len(pre) + 3] == pre + window[:3]
    assert late == pre + window[:7] + post
    text = tokenizer.decode(late)
    assert text.index("at most 32 tokens") < text.index("### Context") < text.index("Tom has")
    assert text.endswith("<|im_start|>assistant\n<think>\n")
    assert "at most" not in tokenizer.decode(builder.prompt_ids(window, 3, None))


def test_models_without_chat_template(tiny_model_no_template_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_no_template_dir)
    with pytest.raises(RmtError, match="no chat template"):
        PromptBuilder(tokenizer, style="chat")
    plain = PromptBuilder(tokenizer, style="auto")
    assert not plain.chat
    assert tokenizer.decode(plain.prompt_ids([], 0, 8)).endswith("### Answer\n<think>\n")


def test_token_bytes_keep_partial_characters(tiny):
    _, tokenizer = tiny
    ids = tokenizer(" café 🙂", add_special_tokens=False)["input_ids"]
    pieces = token_bytes(tokenizer, ids)
    assert b"".join(pieces) == " café 🙂".encode()
    assert any(len(p) == 1 and p[0] >= 0x80 for p in pieces)  # a lone byte of a multi-byte character


def _engine(tiny, **kw):
    model, tokenizer = tiny
    settings = dict(max_reasoning_tokens=6, answer_tokens=3, temperature=1.0, batch_size=4)
    return RolloutEngine(model, tokenizer, RolloutSettings(**{**settings, **kw})), tokenizer


def test_answer_forcing_inserts_and_masks_the_format(tiny):
    engine, tokenizer = _engine(tiny)
    prompts = [PromptBuilder(tokenizer).prompt_ids(tokenizer("a b c d")["input_ids"], 2, 3)] * 5
    for r in engine.generate(prompts):
        # A random model never closes </think>; past the cap (6) only a begun closing tag may go on.
        assert r.reasoning_len <= 6 + len(engine.close_ids) and not r.closed_think
        assert len(r.response_ids) == len(r.sampled_mask)
        inserted = [t for t, m in zip(r.response_ids, r.sampled_mask) if m == 0]
        assert inserted == engine.close_ids + engine.box_ids
        assert "</think>" in r.text and "\\boxed{" in r.text
        assert sum(r.sampled_mask) <= 6 + len(engine.close_ids) + 3


def test_without_forcing_a_missing_answer_is_none(tiny):
    engine, tokenizer = _engine(tiny, force_answer=False)
    prompts = [PromptBuilder(tokenizer).prompt_ids(tokenizer("a b c d")["input_ids"], 2, 3)] * 3
    for r in engine.generate(prompts):
        assert all(r.sampled_mask) and extract_prediction(r.text) is None


def test_samples_depend_on_seeds_not_on_batching(tiny):
    engine, tokenizer = _engine(tiny)
    builder = PromptBuilder(tokenizer)
    ids = tokenizer("one two three four five six", add_special_tokens=False)["input_ids"]
    prompts = [builder.prompt_ids(ids, t, 3) for t in (1, 2, 3, 4, 5)]
    seeds = [11, 22, 33, 44, 55]
    together = [r.response_ids for r in engine.generate(prompts, seeds)]
    engine.settings.batch_size = 2
    apart = [r.response_ids for r in engine.generate(prompts, seeds)]
    assert together == apart
    again = [r.response_ids for r in engine.generate(prompts[::-1], seeds[::-1])][::-1]
    assert again == together
    assert [r.response_ids for r in engine.generate(prompts, [1, 2, 3, 4, 5])] != together


def test_greedy_is_deterministic(tiny):
    engine, tokenizer = _engine(tiny, temperature=0.0)
    prompt = PromptBuilder(tokenizer).prompt_ids(tokenizer("x y z")["input_ids"], 2, 3)
    a, b = engine.generate([prompt] * 2, [1, 2])
    assert a.response_ids == b.response_ids
    model, _ = tiny
    with torch.no_grad():
        first = model(torch.tensor([prompt])).logits[0, -1].argmax().item()
    assert a.response_ids[0] == first


def _generate_edited(engine, model, tokenizer, edit, budget):
    """One rollout of a prompt with every forward's output passed through `edit(out, kwargs)` first."""
    original = model.forward

    def edited(*args, **kwargs):
        out = original(*args, **kwargs)
        edit(out, kwargs)
        return out

    model.forward = edited
    try:
        (r,) = engine.generate([PromptBuilder(tokenizer).prompt_ids(tokenizer("a b")["input_ids"], 1, budget)])
    finally:
        model.forward = original
    return r


def test_an_end_of_sequence_during_reasoning_is_replaced_by_the_forced_answer(tiny):
    model, tokenizer = tiny
    engine, _ = _engine(tiny, max_reasoning_tokens=20)
    eos = tokenizer.eos_token_id

    def eos_after_two(out, kwargs):  # the policy wants to stop after two reasoning tokens
        if kwargs.get("cache") is not None and kwargs["input_ids"].shape[1] == 1:
            out.logits[..., eos] = 1e4

    r = _generate_edited(engine, model, tokenizer, eos_after_two, budget=3)
    # The first token came from the prefill's logits; the EOS sampled next was replaced by the format.
    forced = engine.close_ids + engine.box_ids
    assert r.response_ids[0] != eos and r.reasoning_len == 1
    assert r.response_ids[1 : 1 + len(forced)] == forced and r.sampled_mask[1 : 1 + len(forced)] == [0] * len(forced)


@pytest.mark.parametrize("thought", [0, 1, 2])
def test_a_closing_tag_begun_at_the_cap_may_finish(tiny, thought):
    """At B_t = 1 the cap is 2 tokens, fewer than `\n</think>` takes: a tag begun by the cap may finish; a
    thought that fills the cap without beginning one is cut there and the tag inserted."""
    model, tokenizer = tiny
    engine, _ = _engine(tiny, max_reasoning_tokens=2, temperature=0.0)
    word, brace = tokenizer(" a", add_special_tokens=False)["input_ids"][0], tokenizer("}", add_special_tokens=False)["input_ids"][0]
    # The token the scripted policy writes at each response position (inserted ones: any).
    script = [word] * thought + engine.close_ids + [word] * len(engine.box_ids) + [word, brace]
    calls = []

    def scripted(out, kwargs):
        out.logits[..., -1, script[min(len(calls), len(script) - 1)]] = 1e4
        calls.append(1)

    r = _generate_edited(engine, model, tokenizer, scripted, budget=1)
    assert r.response_ids == [word] * thought + engine.close_ids + engine.box_ids + [word, brace]
    assert r.closed_think == (thought < 2) and r.reasoning_len == thought
    assert r.sampled_mask[: thought + len(engine.close_ids)] == [1] * thought + [int(thought < 2)] * len(engine.close_ids)


def test_thought_length_counts_the_thought_only(tiny_model_dir):
    from rmt import assets
    from rmt.rollout import thought_length

    tokenizer = assets.load_tokenizer(str(tiny_model_dir))
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert thought_length(tokenizer, encode("\n</think>")) == 0  # an empty thought
    assert thought_length(tokenizer, encode("</think>")) == 0
    words = encode(" apples and books")
    assert thought_length(tokenizer, words + encode("\n</think>")) == len(words)
    assert thought_length(tokenizer, words + encode("</think>")) == len(words)


def test_roomy_cache_layer_holds_what_the_dynamic_one_holds():
    """Writes in place across growths, then reorders rows, as `DynamicLayer` does by concatenation."""
    from transformers.cache_utils import DynamicLayer

    from rmt.rollout import RoomyLayer

    g = torch.Generator().manual_seed(0)
    roomy, dynamic = RoomyLayer(room=3), DynamicLayer()

    def update(n):
        k, v = torch.randn(2, 2, n, 4, generator=g), torch.randn(2, 2, n, 4, generator=g)
        for layer in (roomy, dynamic):
            layer.update(k, v)
        torch.testing.assert_close(roomy.keys, dynamic.keys, rtol=0, atol=0)
        torch.testing.assert_close(roomy.values, dynamic.values, rtol=0, atol=0)

    update(5)  # a prefill, then more single tokens than one growth's room
    for _ in range(7):
        update(1)
    roomy.batch_repeat_interleave(3)
    dynamic.batch_repeat_interleave(3)
    rows = torch.tensor([5, 0, 2])
    roomy.batch_select_indices(rows)
    dynamic.batch_select_indices(rows)
    for _ in range(4):
        k, v = torch.randn(3, 2, 1, 4, generator=g), torch.randn(3, 2, 1, 4, generator=g)
        roomy.update(k, v)
        dynamic.update(k, v)
    torch.testing.assert_close(roomy.keys, dynamic.keys, rtol=0, atol=0)
    torch.testing.assert_close(roomy.values, dynamic.values, rtol=0, atol=0)
    assert roomy.keys.shape == (3, 2, 16, 4)


def test_reasoning_cut_hand_cases():
    from rmt.rollout import reasoning_cut

    assert not reasoning_cut(1, 2, 4, " a")  # below the cap
    assert reasoning_cut(2, 2, 4, " a a")  # at the cap, no tag begun
    assert not reasoning_cut(2, 2, 4, "\n</")  # a tag begun at the cap may go on ...
    assert not reasoning_cut(5, 2, 4, " a\n</think")
    assert reasoning_cut(6, 2, 4, "\n</thin")  # ... for at most the tag's length
