"""Training forward passes: response log-probabilities for the RL loss and document logits for NTP.

This is the straightforward path: one padded row per response, and a separate pass over the documents.
"""

from __future__ import annotations

import torch

from rmt.losses import token_logprobs


def _left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


def response_logprobs(model, prompts, responses, sampled_masks, pad_id: int):
    """log π(response token | prompt, earlier response tokens) for a batch of sequences.

    Returns `logprobs` and `mask`, both [B, R] with R the longest response; row i's response fills
    its last len(response_i) columns (left padding), and `mask` is its sampled-token mask there.
    Only the last R+1 positions' logits are computed, so long prompts cost no vocabulary-size memory.
    """
    device = next(model.parameters()).device
    ids, attn = _left_pad([p + r for p, r in zip(prompts, responses)], pad_id, device)
    width = max(len(r) for r in responses)
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=positions, logits_to_keep=width + 1).logits
    logprobs = token_logprobs(logits[:, :-1], ids[:, -width:])
    mask = torch.zeros((len(responses), width), device=device)
    for i, m in enumerate(sampled_masks):
        mask[i, width - len(m) :] = torch.tensor(m, dtype=mask.dtype)
    return logprobs, mask


def document_logits(model, windows: list, pad_id: int):
    """Logits of each document window (right padding) with its ids and padding mask."""
    device = next(model.parameters()).device
    width = max(len(w) for w in windows)
    ids = torch.full((len(windows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(windows), width), dtype=torch.long)
    for i, w in enumerate(windows):
        ids[i, : len(w)] = torch.as_tensor(w, dtype=torch.long)
        attn[i, : len(w)] = 1
    ids, attn = ids.to(device), attn.to(device)
    return model(input_ids=ids, attention_mask=attn).logits, ids, attn
