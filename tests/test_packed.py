"""Shared-prefix rollouts and the packed training forward reproduce the naive computations."""

import pytest
import torch

from rmt import assets
from rmt.forward import document_logits, response_logprobs
from rmt.losses import grpo_loss, ntp_loss
from rmt.grpo import PackedBackend, PerRolloutBackend, Trajectory, UpdateSettings, policy_update
from rmt.packed import PackItem, block_layout, pack_documents, packed_forward
from rmt.prompts import PromptBuilder
from rmt.rollout import RolloutEngine, RolloutSettings, document_prompts
from rmt.scored import load_scored, ntp_target_mask

G = 3
BUDGET = 6


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tiny_scored_dir):
    tokenizer = assets.load_tokenizer(str(tiny_model_dir))
    model = assets.load_model(str(tiny_model_dir))  # SDPA
    windows, _ = load_scored(tiny_scored_dir, "midtrain")
    docs = windows[:3]
    positions = [[20, 9, 31], [12, 38, 5], [33, 17, 25]]  # windows hold 39 tokens
    builder = PromptBuilder(tokenizer)
    return tokenizer, model, builder, docs, positions


def engine(setup, temperature: float, batch_size: int) -> RolloutEngine:
    tokenizer, model, *_ = setup
    settings = RolloutSettings(max_reasoning_tokens=6, answer_tokens=2, temperature=temperature,
                               batch_size=batch_size)
    return RolloutEngine(model.eval(), tokenizer, settings)


def naive_and_shared(setup, temperature: float, batch_size: int):
    _, _, builder, docs, positions = setup
    pre, post = builder.parts(BUDGET)
    prompts = [builder.prompt_ids(d.input_ids, t, BUDGET)
               for d, pos in zip(docs, positions) for t in pos for _ in range(G)]
    seeds = list(range(100, 100 + len(prompts)))
    e = engine(setup, temperature, batch_size)
    naive = e.generate(prompts, seeds)
    shared_prompts = [document_prompts(pre, d.input_ids, pos, post) for d, pos in zip(docs, positions)]
    shared = e.generate_shared(shared_prompts, G, seeds)
    return naive, shared


@pytest.mark.parametrize("batch_size", [6, 32])  # two prompts (G copies each) per batch; all in one
def test_shared_prefix_rollouts_equal_naive_greedy(setup, batch_size):
    naive, shared = naive_and_shared(setup, 0.0, batch_size)
    assert len(shared) == len(naive) == 3 * 3 * G
    for a, b in zip(naive, shared):
        assert (b.prompt_ids, b.response_ids, b.sampled_mask, b.reasoning_len, b.text) == \
            (a.prompt_ids, a.response_ids, a.sampled_mask, a.reasoning_len, a.text)


def test_shared_prefix_rollouts_follow_the_row_seeds_when_sampling(setup):
    naive, shared = naive_and_shared(setup, 1.0, 32)
    assert [r.response_ids for r in shared] == [r.response_ids for r in naive]
    assert len({tuple(r.response_ids) for r in shared}) > 1


def test_pack_attention_mask_lets_each_response_see_its_own_prefix():
    pre, post, window = [1, 2], [9], [10, 11, 12, 13]
    items = [PackItem(0, 3, [20, 21], [1, 1]), PackItem(0, 1, [30], [1])]
    (pack,) = pack_documents(pre, post, [window], items)
    # [window 10 11 12 13 | trunk 1 2 10 11 12 | 9 30 (t=1) | 9 20 21 (t=3)]: sorted by position
    assert pack.input_ids.tolist() == [10, 11, 12, 13, 1, 2, 10, 11, 12, 9, 30, 9, 20, 21]
    assert pack.position_ids.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 3, 4, 5, 6, 7]
    assert pack.items == [1, 0]
    mask = pack.attention_mask()[0, 0].int()
    assert mask[3].tolist() == [1, 1, 1, 1] + [0] * 10  # window: itself only
    assert mask[8].tolist() == [0] * 4 + [1] * 5 + [0] * 5  # trunk: itself only
    assert mask[10].tolist() == [0] * 4 + [1, 1, 1] + [0, 0] + [1, 1] + [0] * 3  # pre + x_<1, own segment
    assert mask[13].tolist() == [0] * 4 + [1] * 5 + [0, 0] + [1, 1, 1]  # pre + x_<3, own segment


def test_block_layout_covers_exactly_the_unmasked_pairs():
    """The blocks `block_attention` computes hold every pair the dense mask allows and no other."""
    pre, post, window = [1, 2], [9], list(range(10, 30))
    lengths = [3, 1, 5, 2, 4, 2, 6]
    items = [PackItem(0, t, list(range(40, 40 + n)), [1] * n) for t, n in zip([7, 2, 19, 11, 2, 15, 5], lengths)]
    for with_windows in (True, False):
        (pack,) = pack_documents(pre, post, [window], items, with_windows=with_windows)
        layout = block_layout(pack, group=3)  # three groups: 3, 3 and 1 responses
        assert len(layout.groups) == 3
        covered = torch.zeros(len(pack), len(pack), dtype=torch.long)
        for begin, end in ((0, layout.window), (layout.window, layout.window + layout.trunk)):
            covered[begin:end, begin:end] += torch.tril(torch.ones(end - begin, end - begin, dtype=torch.long))
        for g in layout.groups:
            for queries, keys, mask in zip(g.queries, g.keys, g.mask[:, 0]):
                real = torch.unique(queries)  # padded queries repeat the last token: count it once
                for q in real.tolist():
                    row = (queries == q).nonzero()[0, 0]
                    allowed = keys[mask[row]]
                    assert len(torch.unique(allowed)) == len(allowed)  # no key twice
                    covered[q, allowed] += 1
        assert torch.equal(covered, pack.attention_mask()[0, 0].long())
        assert len(layout.rows) == len(pack) - layout.window - layout.trunk


@pytest.mark.parametrize("checkpointing", [False, True])
def test_block_attention_equals_the_dense_mask_with_gradients(setup, checkpointing):
    """Logits and gradients of the block path equal SDPA's over the dense mask (the reference), and
    under gradient checkpointing the forward keeps to the dense mask."""
    tokenizer, model, builder, docs, _ = setup
    model.train()
    pre, post = builder.parts(BUDGET)
    items = random_items(setup, len(post), seed=5)
    windows = [d.input_ids for d in docs]
    if checkpointing:
        model.gradient_checkpointing_enable()
    try:
        for pack in pack_documents(pre, post, windows, items, max_tokens=250):
            grads, outs = [], []
            for blocks in (True, False):
                model.zero_grad(set_to_none=True)
                out = packed_forward(model, pack, blocks=blocks)
                loss = (out.logprobs * out.mask).sum() + (out.ntp_logits.logsumexp(-1).mean() if pack.window_len else 0)
                loss.backward()
                outs.append(out)
                grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
            torch.testing.assert_close(outs[0].logprobs, outs[1].logprobs, atol=1e-5, rtol=0)
            if pack.window_len:
                torch.testing.assert_close(outs[0].ntp_logits, outs[1].ntp_logits, atol=1e-5, rtol=0)
            for name in grads[0]:
                torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4, msg=name)
    finally:
        model.gradient_checkpointing_disable()
        model.zero_grad(set_to_none=True)


def random_items(setup, post_len: int, seed: int = 0):
    """Responses of random tokens and lengths with some inserted (unsampled) tokens."""
    tokenizer, _, _, docs, positions = setup
    g = torch.Generator().manual_seed(seed)
    items = []
    for d, pos in enumerate(positions):
        for t in pos:
            for _ in range(G):
                n = int(torch.randint(2, 9, (1,), generator=g))
                ids = torch.randint(3, len(tokenizer), (n,), generator=g).tolist()
                mask = (torch.rand(n, generator=g) > 0.2).int().tolist()
                items.append(PackItem(d, t, ids, mask))
    return items


@pytest.mark.parametrize("empty_post", [False, True])
def test_packed_logprobs_and_ntp_logits_equal_naive(setup, empty_post):
    tokenizer, model, builder, docs, _ = setup
    model.eval()
    pre, post = builder.parts(BUDGET)
    post = [] if empty_post else post
    items = random_items(setup, len(post))
    windows = [d.input_ids for d in docs]
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        for pack in pack_documents(pre, post, windows, items, max_tokens=300):
            out = packed_forward(model, pack)
            chunk = [items[k] for k in pack.items]
            prompts = [pre + [int(i) for i in windows[it.doc][: it.position]] + post for it in chunk]
            ref, ref_mask = response_logprobs(model, prompts, [it.response_ids for it in chunk],
                                              [it.sampled_mask for it in chunk], pad)
            assert torch.equal(out.mask, ref_mask)
            for row, it in enumerate(chunk):  # every response token, sampled or inserted
                n = len(it.response_ids)
                torch.testing.assert_close(out.logprobs[row, -n:], ref[row, -n:], atol=1e-5, rtol=0)
            if pack.window_len:
                logits, ids, _ = document_logits(model, [windows[pack.doc]], pad)
                assert torch.equal(out.ntp_ids, ids)
                torch.testing.assert_close(out.ntp_logits, logits, atol=1e-5, rtol=0)


def naive_loss(model, pre, post, docs, positions, items, advantages, lam, pad, micro=4):
    """The step loss written out by hand (per-rollout forwards, then the documents), backpropagated."""
    rl_tokens = sum(sum(it.sampled_mask) for it in items)
    masks = [ntp_target_mask(d, pos) for d, pos in zip(docs, positions)]
    ntp_tokens = sum(int(m.sum()) for m in masks)
    total = 0.0
    for i in range(0, len(items), micro):
        chunk = items[i : i + micro]
        prompts = [pre + [int(x) for x in docs[it.doc].input_ids[: it.position]] + post for it in chunk]
        logprobs, mask = response_logprobs(model, prompts, [it.response_ids for it in chunk],
                                           [it.sampled_mask for it in chunk], pad)
        loss, _ = grpo_loss(logprobs, logprobs.detach(), advantages[i : i + micro], mask)
        part = loss * (mask.sum() / rl_tokens)
        part.backward()
        total += float(part.detach())
    for i in range(0, len(docs), micro):
        logits, ids, _ = document_logits(model, [d.input_ids for d in docs[i : i + micro]], pad)
        target = torch.zeros_like(ids, dtype=torch.float32)
        for j, m in enumerate(masks[i : i + micro]):
            target[j, : len(m)] = torch.as_tensor(m, dtype=torch.float32)
        part = ntp_loss(logits, ids, target) * (target.sum() / ntp_tokens)
        (lam * part).backward()
        total += lam * float(part.detach())
    return total


def core_loss(model, pre, post, docs, positions, items, advantages, lam, backend):
    """The same step loss from `grpo.policy_update` with the given backend (what the recipes run)."""
    trajectories = [Trajectory(pre + [int(x) for x in docs[it.doc].input_ids[: it.position]] + post,
                               it.response_ids, it.sampled_mask, float(a), it.doc, it.position)
                    for it, a in zip(items, advantages)]
    masks = [ntp_target_mask(d, pos) for d, pos in zip(docs, positions)]
    settings = UpdateSettings(ntp_weight=lam, micro_batch=4, pack_tokens=backend.pack_tokens
                              if isinstance(backend, PackedBackend) else 2048)
    return policy_update(model, trajectories, [d.input_ids for d in docs], masks, settings, backend)["loss"]


@pytest.mark.parametrize("backend", ["packed-4096", "packed-250", "per-rollout"])  # one or several packs per doc
def test_policy_update_loss_and_gradients_equal_a_hand_written_step(setup, backend):
    tokenizer, model, builder, docs, positions = setup
    model.train()
    pre, post = builder.parts(BUDGET)
    items = random_items(setup, len(post), seed=1)
    advantages = torch.randn(len(items), generator=torch.Generator().manual_seed(2))
    args = (pre, post, docs, positions, items, advantages, 0.1)

    model.zero_grad(set_to_none=True)
    expected = naive_loss(model, *args, pad=tokenizer.pad_token_id)
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    chosen = PerRolloutBackend(tokenizer.pad_token_id, 4) if backend == "per-rollout" \
        else PackedBackend(pre, post, int(backend.split("-")[1]))
    got = core_loss(model, *args, backend=chosen)
    assert got == pytest.approx(expected, abs=1e-6)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    model.zero_grad(set_to_none=True)


def test_packed_forward_refuses_eager_attention(tiny_model_dir):
    model = assets.load_model(str(tiny_model_dir), attn_implementation="eager")
    (pack,) = pack_documents([1], [2], [[5, 6, 7]], [PackItem(0, 2, [8], [1])])
    with pytest.raises(ValueError, match="sdpa"):
        packed_forward(model, pack)


@pytest.mark.parametrize("backend", ["packed", "per-rollout"])
def test_lambda_weighs_what_is_backpropagated(setup, backend):
    """The gradient of one update is ∇L_RL + λ·∇L_NTP: checked on the gradients themselves, against the
    two terms back-propagated apart (not on a logged sum)."""
    tokenizer, model, builder, docs, positions = setup
    model.train()
    pre, post = builder.parts(BUDGET)
    items = random_items(setup, len(post), seed=3)
    advantages = torch.randn(len(items), generator=torch.Generator().manual_seed(4))
    trajectories = [Trajectory(pre + [int(x) for x in docs[it.doc].input_ids[: it.position]] + post,
                               it.response_ids, it.sampled_mask, float(a), it.doc, it.position)
                    for it, a in zip(items, advantages)]
    masks = [ntp_target_mask(d, pos) for d, pos in zip(docs, positions)]
    windows = [d.input_ids for d in docs]
    chosen = PackedBackend(pre, post, 4096) if backend == "packed" else PerRolloutBackend(tokenizer.pad_token_id, 4)

    def grads(trajs, lam):
        model.zero_grad(set_to_none=True)
        policy_update(model, trajs, windows, masks, UpdateSettings(ntp_weight=lam, micro_batch=4), chosen)
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    rl_only, ntp_only, both = grads(trajectories, 0.0), grads([], 1.0), grads(trajectories, 0.3)
    for name, g in both.items():
        torch.testing.assert_close(g, rl_only[name] + 0.3 * ntp_only[name], atol=1e-6, rtol=1e-4, msg=name)
    model.zero_grad(set_to_none=True)


def test_update_stats_are_token_means_over_every_chunk(setup):
    """The logged KL to a reference is the token mean over the whole step, however many chunks it took
    (not the last chunk's)."""
    import copy

    tokenizer, model, builder, docs, positions = setup
    pre, post = builder.parts(BUDGET)
    items = random_items(setup, len(post), seed=5)
    trajectories = [Trajectory(pre + [int(x) for x in docs[it.doc].input_ids[: it.position]] + post,
                               it.response_ids, it.sampled_mask, 1.0, it.doc, it.position) for it in items]
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    settings = UpdateSettings(kl_coef=0.1)

    def kl(micro_batch):
        model.zero_grad(set_to_none=True)
        backend = PerRolloutBackend(tokenizer.pad_token_id, micro_batch)
        return policy_update(model, trajectories, settings=settings, backend=backend, reference=reference)["kl"]

    one_chunk, many_chunks = kl(len(trajectories)), kl(2)
    assert one_chunk > 0
    assert many_chunks == pytest.approx(one_chunk, rel=1e-4)
    model.zero_grad(set_to_none=True)
