"""SPEC §6, §7: GRPO advantages and clipped surrogate, masked NTP loss, dual objective."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rmt.losses import dual_objective, group_advantages, grpo_loss, ntp_loss, token_logprobs


def test_group_advantages_hand_computed():
    # mean 0.5, sample std sqrt(4·0.25/3) = 0.57735 → A = ±0.5/0.57735 = ±0.8660.
    advantages, n_flat = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]]))
    assert advantages[0].tolist() == pytest.approx([0.8660254, -0.8660254, -0.8660254, 0.8660254], rel=1e-5)
    assert n_flat == 0


def test_group_advantages_counts_flat_groups_and_zeroes_them():
    rewards = torch.tensor([[0.3, 0.3, 0.3, 0.3], [1.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.0, 0.0]])
    advantages, n_flat = group_advantages(rewards)
    assert n_flat == 2
    assert torch.equal(advantages[0], torch.zeros(4))  # exactly 0, not an ulp off
    assert torch.equal(advantages[2], torch.zeros(4))
    assert advantages[1].sum().item() == pytest.approx(0.0, abs=1e-6)


def test_group_advantages_needs_two_responses():
    with pytest.raises(ValueError):
        group_advantages(torch.tensor([[1.0], [0.0]]))


def _log(values):
    return torch.tensor(values).log()


def test_grpo_loss_clipping_and_masking():
    # Ratios: seq 0 (A=+1): 1.1 inside, 1.5 clipped to 1.2, third token masked out.
    #         seq 1 (A=−1): 0.5 clipped to 0.8, 1.5 (min keeps −1.5: not clipped), 0.9 inside.
    old = torch.zeros(2, 3)
    logprobs = _log([[1.1, 1.5, 7.0], [0.5, 1.5, 0.9]]).requires_grad_()
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    advantages = torch.tensor([1.0, -1.0])
    loss, stats = grpo_loss(logprobs, old, advantages, mask, clip_eps=0.2)
    # per-token: −1.1, −1.2 | 0.8, 1.5, 0.9 → sum 0.9 over 5 tokens.
    assert loss.item() == pytest.approx(0.9 / 5)
    assert stats["clip_frac"] == pytest.approx(2 / 5)
    assert "kl" not in stats
    loss.backward()
    # ∂/∂logπ of −ρA is −ρA/N where unclipped; clipped and masked tokens get no gradient.
    expected = torch.tensor([[-1.1, 0.0, 0.0], [0.0, 1.5, 0.9]]) / 5
    assert torch.allclose(logprobs.grad, expected, atol=1e-6)


def test_grpo_loss_token_level_averaging():
    # Ratio 1, so each token's loss is −A. Seq 0 has 1 token (A=+1), seq 1 has 3 (A=−1):
    # token-level mean (−1 + 3)/4 = 0.5, whereas averaging per sequence first would give 0.
    zeros = torch.zeros(2, 3)
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    loss, _ = grpo_loss(zeros, zeros, torch.tensor([1.0, -1.0]), mask)
    assert loss.item() == pytest.approx(0.5)


def test_grpo_loss_kl_term():
    # A = 0 leaves only the KL: log π_ref − log π = log 2 → k3 = 2 − log 2 − 1 = 0.30685.
    logprobs = torch.full((1, 2), -1.0)
    ref = logprobs + math.log(2)
    loss, stats = grpo_loss(
        logprobs, logprobs, torch.zeros(1), torch.ones(1, 2), ref_logprobs=ref, kl_coef=0.1
    )
    k3 = 1 - math.log(2)
    assert stats["kl"] == pytest.approx(k3, rel=1e-5)
    assert loss.item() == pytest.approx(0.1 * k3, rel=1e-5)


def test_grpo_loss_empty_mask_is_zero_and_finite():
    logprobs = torch.tensor([[float("-inf"), -1.0]], requires_grad=True)
    old = torch.tensor([[float("-inf"), 5.0]])
    loss, stats = grpo_loss(logprobs, old, torch.ones(1), torch.zeros(1, 2), ref_logprobs=old, kl_coef=0.1)
    assert loss.item() == 0.0
    assert stats == {"clip_frac": 0.0, "kl": 0.0}
    loss.backward()
    assert torch.equal(logprobs.grad, torch.zeros(1, 2))


def test_token_logprobs():
    logits = torch.randn(2, 4, 10, generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, 10, (2, 4), generator=torch.Generator().manual_seed(1))
    expected = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    assert torch.allclose(token_logprobs(logits, targets), expected)
    assert token_logprobs(logits.bfloat16(), targets).dtype == torch.float32


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).eval()


def test_ntp_loss_equals_transformers_loss(tiny_llama):
    input_ids = torch.randint(0, 100, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = tiny_llama(input_ids, labels=input_ids)
    loss = ntp_loss(out.logits, input_ids, torch.ones_like(input_ids))
    assert loss.item() == pytest.approx(out.loss.item(), rel=1e-5)


def test_ntp_loss_masks_targets(tiny_llama):
    input_ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(1))
    loss_mask = torch.ones_like(input_ids)
    loss_mask[0, [3, 7]] = 0  # RL positions C
    loss_mask[1, 6:] = 0  # padding
    with torch.no_grad():
        logits = tiny_llama(input_ids).logits
    logp = torch.log_softmax(logits, -1)
    terms = [
        -logp[b, t - 1, input_ids[b, t]]
        for b in range(2) for t in range(1, 10) if loss_mask[b, t]
    ]
    assert len(terms) == 7 + 5
    expected = torch.stack(terms).mean().item()
    assert ntp_loss(logits, input_ids, loss_mask).item() == pytest.approx(expected, rel=1e-5)
    # Position 0 is never a target, whatever the mask says there.
    loss_mask[:, 0] = 0
    assert ntp_loss(logits, input_ids, loss_mask).item() == pytest.approx(expected, rel=1e-5)


def test_ntp_loss_empty_mask_is_zero():
    logits = torch.randn(1, 4, 5, requires_grad=True)
    loss = ntp_loss(logits, torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_dual_objective():
    assert dual_objective(torch.tensor(1.0), torch.tensor(2.0), ntp_weight=0.1).item() == pytest.approx(1.2)


def test_chunked_logprobs_and_ntp_loss_equal_the_whole_computation(monkeypatch):
    """Long sequences are upcast in chunks of rows, recomputed in the backward pass: same values, same grads."""
    import rmt.losses as losses

    torch.manual_seed(0)
    logits = torch.randn(2, 9, 50, requires_grad=True)
    targets = torch.randint(0, 50, (2, 9))
    mask = torch.ones(2, 9)
    mask[1, 4] = 0

    def run():
        logits.grad = None
        value = losses.token_logprobs(logits, targets).sum() + ntp_loss(logits, targets, mask)
        value.backward()
        return value.detach(), logits.grad.clone()

    whole = run()
    monkeypatch.setattr(losses, "ROWS_PER_CHUNK", 4)  # 18 rows: 5 chunks
    chunked = run()
    torch.testing.assert_close(chunked[0], whole[0])
    torch.testing.assert_close(chunked[1], whole[1])
