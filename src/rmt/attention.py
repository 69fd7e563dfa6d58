"""Two attention functions that compute only what a mask would let through, registered with Transformers'
`AttentionInterface` and switched on for one call (`attention_implementation`).

- `block_attention` ("rmt_blocks"), for the packed training forward (`rmt.packed`): a pack's dense mask
  is mostly False (responses see the trunk and themselves, not each other), and SDPA computes every masked
  pair. This computes the window and the trunk causally and each group of responses against the part of
  the trunk it sees plus its own keys (`packed.BlockLayout`).
- `trunk_attention` ("rmt_trunk"), for decoding rollouts that share a prefix (`rollout.generate_shared`):
  every row of a batch would otherwise carry its own copy of its document's prefix in the KV cache, padded
  to the longest prompt, and each decoding step would read all of it. Here the cache holds only each row's
  own tokens (the end of its prompt and its response); the document prefixes ("trunks") are held once per
  batch (`SharedTrunk`), and each row attends to the first `cut` tokens of its document's trunk and to its
  own keys, causally. No gradient flows here (rollouts run under `no_grad`).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv

BLOCKS, TRUNK = "rmt_blocks", "rmt_trunk"


@contextlib.contextmanager
def attention_implementation(model, name: str):
    """Run the model's forwards inside the block with attention function `name` (its config is shared by
    its layers, which look the function up at every forward)."""
    config = getattr(model, "module", model).config
    old = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = old


def block_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, pack_layout=None,
                    **kwargs):
    """One pack's attention: query [1, H, L, d], key and value [1, H_kv, L, d], `pack_layout` its
    `packed.BlockLayout`. Returns [1, L, H, d], as Transformers' SDPA function does."""
    layout = pack_layout
    # CPU SDPA takes grouped-query attention with a mask; elsewhere repeat the key/value heads for it.
    gqa = query.device.type == "cpu" and key.shape[1] != query.shape[1]
    if not gqa:
        key, value = repeat_kv(key, query.shape[1] // key.shape[1]), repeat_kv(value, query.shape[1] // value.shape[1])

    def attend(q, k, v, mask=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scaling,
                                              enable_gqa=gqa)

    # Views by `split` and one gather per tensor for all groups: the backward of a slice or of a gather per
    # group would write a zero tensor of the whole pack for each (a tenth of a CPU step).
    sizes = [layout.window, layout.trunk, query.shape[2] - layout.window - layout.trunk]
    parts = [attend(q, k, v) for q, k, v in zip(*(x.split(sizes, dim=2)[:2] for x in (query, key, value)))
             if q.shape[2]]
    if layout.groups:
        q = query[0][:, layout.group_queries]  # [H, Σ k·n, d]
        k, v = key[0][:, layout.group_keys], value[0][:, layout.group_keys]  # [H_kv, Σ k·S, d]
        outs = []
        for g, qg, kg, vg in zip(layout.groups, q.split(layout.query_sizes, 1), k.split(layout.key_sizes, 1),
                                 v.split(layout.key_sizes, 1)):
            count, n, seen = g.mask.shape[0], g.mask.shape[2], g.mask.shape[3]
            out = attend(qg.unflatten(1, (count, n)).transpose(0, 1), kg.unflatten(1, (count, seen)).transpose(0, 1),
                         vg.unflatten(1, (count, seen)).transpose(0, 1), g.mask)  # [k, H, n, d]
            outs.append(out.transpose(0, 1).flatten(1, 2))  # [H, k·n, d]
        parts.append(torch.cat(outs, dim=1)[None, :, layout.rows])
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


class SharedTrunk:
    """The document prefixes of one decoding batch, each held once, and what each row sees of them.

    `layers[l]` = (keys, values) of layer l, each [D, H_kv, N, d]: document j's first tokens, zero-padded to
    the longest N. Row b belongs to document `docs[b]` and sees its first `cuts[b]` tokens. Rows are dropped
    or copied with `select` (the trunks themselves are never copied)."""

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor]], docs: torch.Tensor, cuts: torch.Tensor):
        self.layers = layers
        self.select(docs, cuts)

    def select(self, docs: torch.Tensor, cuts: torch.Tensor) -> None:
        self.docs, self.cuts = docs, cuts
        # Row b's slot among its document's rows: the trunk product runs over [D, rows per document].
        slots, seen = [], {}
        for d in docs.tolist():
            slots.append(seen.get(d, 0))
            seen[d] = slots[-1] + 1
        self.slots = torch.tensor(slots, dtype=torch.long, device=docs.device)
        self.width = max(seen.values(), default=1)
        n = self.layers[0][0].shape[2] if self.layers else 0
        self.sees = torch.arange(n, device=cuts.device)[None, :] < cuts[:, None]  # [B, N]

    def rows(self, index: torch.Tensor) -> None:
        """Keep (or repeat) rows: row b becomes old row index[b]."""
        self.select(self.docs[index], self.cuts[index])


def trunk_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, trunk=None, **kwargs):
    """Decoding attention over a `SharedTrunk` plus each row's own keys: query [B, H, q, d] (the last q own
    tokens of each row), key and value [B, H_kv, L, d] (the row's own tokens so far). Returns [B, q, H, d]."""
    B, H, q, d = query.shape
    kv, L = key.shape[1], key.shape[2]
    rep = H // kv
    tk, tv = trunk.layers[module.layer_idx]
    D, N = tk.shape[0], tk.shape[2]
    R = trunk.width
    queries = query.reshape(B, kv, rep * q, d)  # query head h reads key head h // rep

    def by_document(x: torch.Tensor) -> torch.Tensor:  # [B, kv, rep·q, X] -> [D, kv, R·rep·q, X]
        padded = x.new_zeros((D, R, *x.shape[1:]))
        padded[trunk.docs, trunk.slots] = x
        return padded.transpose(1, 2).reshape(D, kv, R * rep * q, x.shape[-1])

    def by_row(x: torch.Tensor) -> torch.Tensor:  # the inverse
        return x.view(D, kv, R, rep * q, x.shape[-1]).transpose(1, 2)[trunk.docs, trunk.slots]

    scale = scaling if scaling is not None else d**-0.5
    scores = torch.cat([by_row(by_document(queries) @ tk.transpose(-1, -2)), queries @ key.transpose(-1, -2)], dim=-1)
    i = torch.arange(rep * q, device=query.device) % q  # query row -> its own token (the last q of L)
    own = torch.arange(L, device=query.device)[None, :] <= (L - q + i)[:, None]  # [rep·q, L]
    allowed = torch.cat([trunk.sees[:, None, :].expand(-1, rep * q, -1), own[None].expand(B, -1, -1)], dim=-1)
    scores = (scores.float() * scale).masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    out = by_row(by_document(probs[..., :N]) @ tv) + probs[..., N:] @ value  # [B, kv, rep·q, d]
    return out.reshape(B, H, q, d).transpose(1, 2).contiguous(), None


AttentionInterface.register(BLOCKS, block_attention)
AttentionInterface.register(TRUNK, trunk_attention)
