"""Packed training forward (SPEC §6, §7): a document's RL responses and its NTP targets in one forward.

All P·G responses of one document share the prompt prefix `pre + x_<t` (SPEC §1). The naive forward
(`forward.response_logprobs`) re-encodes that prefix for every response; a pack encodes it once:

    [ x (bare window, NTP) | pre + x_<max t (trunk) | post + response_1 | post + response_2 | ... ]

A 4D boolean attention mask (True = may attend; honoured by SDPA, not by the eager path, SPEC §12) and
explicit position ids make every token see exactly what it sees in the naive forwards:

- the window: itself, causally, positions from 0 -- the naive NTP forward over the bare window
  (`forward.document_logits`): NTP stays ordinary language modelling of the text, without the instruction;
- the trunk: itself, causally, positions from 0;
- the segment of a response at position t: the first `len(pre) + t` trunk tokens and itself, causally,
  positions continuing from `len(pre) + t` -- the naive forward over `pre + x_<t + post + response`.

So the response log-probabilities, the NTP logits, the loss and its gradients equal the naive ones up to
float rounding. A document whose responses would make the pack longer than `max_tokens` is split into
several packs, each with its own copy of the trunk (SDPA's cost grows with the square of the length).

Most of that mask is False: with 64 responses of 36 tokens behind a trunk of 340, nine in ten query-key
pairs of the square are masked out, and SDPA computes them all. `attention.block_attention` computes only the blocks
that are not: the window and the trunk each causally over themselves, and the responses in groups, each
response's queries against the part of the trunk it sees followed by its own keys (`BlockLayout`). The
dense mask stays as the reference (`packed_forward(..., blocks=False)`), and the path under gradient
checkpointing, whose recomputation would not see the block layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rmt.attention import BLOCKS, attention_implementation
from rmt.losses import token_logprobs

WINDOW, TRUNK = -1, 0  # segment ids; responses are 1, 2, ...


@dataclass
class PackItem:
    """One response to pack: its document (an index into the windows), position t, tokens and mask."""

    doc: int
    position: int
    response_ids: list[int]
    sampled_mask: list[int]


@dataclass
class Pack:
    """One packed sequence of length L: a document's window and/or trunk and some of its responses."""

    doc: int
    items: list[int]  # indices into the packed item list, in the order of the output rows
    input_ids: torch.Tensor  # [L]
    position_ids: torch.Tensor  # [L]
    segments: torch.Tensor  # [L] WINDOW, TRUNK, or k >= 1 for the k-th response
    trunk_view: torch.Tensor  # [L] trunk tokens each token may see besides its own segment
    window_len: int  # the window segment is the first `window_len` tokens (0: no NTP in this pack); the trunk follows
    response_logit_index: torch.Tensor  # [N] packed index of the logits scoring each response token
    response_rows: torch.Tensor  # [N] output row of each response token
    response_cols: torch.Tensor  # [N] output column (left padding, as in `forward.response_logprobs`)
    sampled_mask: torch.Tensor  # [B, R] 1 on tokens the policy sampled

    def __len__(self) -> int:
        return len(self.input_ids)

    def attention_mask(self, device=None) -> torch.Tensor:
        """[1, 1, L, L] boolean, True where a query (row) may attend to a key (column); built on `device`
        (an L×L mask is large: it is not built on the host and copied)."""
        index = torch.arange(len(self), device=device)
        segments, view = self.segments.to(device), self.trunk_view.to(device)
        causal = index[None, :] <= index[:, None]
        same = segments[:, None] == segments[None, :]
        trunk = (segments == TRUNK)[None, :] & ((index - self.window_len)[None, :] < view[:, None])
        return (causal & (same | trunk))[None, None]


@dataclass
class BlockGroup:
    """Responses attended together: `queries` [k, n] packed indices of their tokens, `keys` [k, S] the
    indices of what each sees (trunk tokens, then its own), `mask` [k, 1, n, S] True where a query may
    attend. Shorter responses are padded by repeating their last token; padded queries are dropped."""

    queries: torch.Tensor
    keys: torch.Tensor
    mask: torch.Tensor


@dataclass
class BlockLayout:
    """The attention of one pack as the blocks it needs: the window's first `window` tokens and the next
    `trunk` tokens each causally over themselves, then the response groups; `rows` picks each response
    token's output, in pack order, from the groups' outputs laid end to end."""

    window: int
    trunk: int
    groups: list[BlockGroup]
    rows: torch.Tensor

    def __post_init__(self):  # every group's queries and keys end to end, gathered at once
        self.group_queries = torch.cat([g.queries.flatten() for g in self.groups]) if self.groups else None
        self.group_keys = torch.cat([g.keys.flatten() for g in self.groups]) if self.groups else None
        self.query_sizes = [g.queries.numel() for g in self.groups]
        self.key_sizes = [g.keys.numel() for g in self.groups]

    def pairs(self) -> int:
        """(query, key) pairs the attention computes: each causal square's lower half, every group's whole
        rectangle (masked pairs in it included)."""
        causal = sum(n * (n + 1) // 2 for n in (self.window, self.trunk))
        return causal + sum(g.mask.shape[0] * g.mask.shape[2] * g.mask.shape[3] for g in self.groups)

    def to(self, device) -> "BlockLayout":
        groups = [BlockGroup(g.queries.to(device), g.keys.to(device), g.mask.to(device)) for g in self.groups]
        return BlockLayout(self.window, self.trunk, groups, self.rows.to(device))


def block_layout(pack: "Pack", group: int = 16) -> BlockLayout:
    """The blocks of `pack`'s attention mask (`Pack.attention_mask`), responses `group` at a time: the
    responses of a pack are in order of position, so a group's trunk is about as long as each needs."""
    segments = pack.segments
    window, trunk = pack.window_len, int((segments == TRUNK).sum())
    first = window + trunk
    counts = torch.bincount(segments[first:], minlength=1)[1:].tolist()  # tokens of responses 1, 2, ...
    starts = [first + sum(counts[:k]) for k in range(len(counts))]
    groups, rows, offset = [], [], 0
    for g in range(0, len(counts), group):
        lengths, begins = counts[g : g + group], starts[g : g + group]
        views = [int(pack.trunk_view[b]) for b in begins]
        n, seen = max(lengths), max(views)
        j = torch.arange(n)
        own = torch.stack([b + j.clamp(max=m - 1) for b, m in zip(begins, lengths)])  # [k, n]
        keys = torch.cat([(window + torch.arange(seen)).expand(len(own), seen), own], dim=1)
        sees_trunk = torch.arange(seen)[None, :] < torch.tensor(views)[:, None]  # [k, seen]
        causal = j[None, :] <= j[:, None]  # [n, n]: query row, key column
        mask = torch.cat([sees_trunk[:, None, :].expand(-1, n, -1), causal.expand(len(own), -1, -1)], dim=2)
        groups.append(BlockGroup(own, keys, mask[:, None]))
        rows += [offset + i * n + t for i, m in enumerate(lengths) for t in range(m)]
        offset += len(own) * n
    return BlockLayout(window, trunk, groups, torch.tensor(rows, dtype=torch.long))


def _checkpointing(model) -> bool:
    flag = getattr(model, "is_activation_checkpointing", None)  # Transformers 5; before: is_gradient_checkpointing
    return bool(getattr(model, "is_gradient_checkpointing", False) if flag is None else flag)


@dataclass
class PackedOutput:
    logprobs: torch.Tensor  # [B, R] as `forward.response_logprobs`: row b's response in its last columns
    mask: torch.Tensor  # [B, R] sampled-token mask there
    ntp_logits: torch.Tensor | None  # [1, n, V] logits over the bare window, as `forward.document_logits`
    ntp_ids: torch.Tensor | None  # [1, n] the window's ids


def pack_documents(
    pre: list[int], post: list[int], windows: list, items: list[PackItem], with_windows: bool = True,
    max_tokens: int = 4096,
) -> list[Pack]:
    """Packs for the responses `items` of documents `windows` (window ids per document).

    With `with_windows`, every document's bare window is packed too (once, in its first pack) for NTP;
    a document without responses then gets a pack of its window alone. Within a document, responses are
    packed in order of position, so earlier packs need shorter trunks; at least one response goes into
    each pack whatever `max_tokens` says.
    """
    by_doc: dict[int, list[int]] = {}
    for k, item in enumerate(items):
        if not 0 <= item.position <= len(windows[item.doc]):
            raise ValueError(f"position {item.position} is outside document {item.doc} "
                             f"({len(windows[item.doc])} tokens)")
        by_doc.setdefault(item.doc, []).append(k)
    docs = range(len(windows)) if with_windows else sorted(by_doc)
    head = len(post) if post else 1

    def size(chunk: list[int], window: int) -> int:
        trunk = len(pre) + max(items[k].position for k in chunk) if chunk else 0
        return window + trunk + sum(head + len(items[k].response_ids) for k in chunk)

    packs = []
    for d in docs:
        window = [int(i) for i in windows[d]]
        chunks = [[]]
        for k in sorted(by_doc.get(d, []), key=lambda k: items[k].position):
            first = len(window) if with_windows and len(chunks) == 1 else 0
            if chunks[-1] and size(chunks[-1] + [k], first) > max_tokens:
                chunks.append([])
            chunks[-1].append(k)
        for i, chunk in enumerate(chunks):
            packs.append(_build_pack(d, pre, post, window, items, chunk, with_window=with_windows and i == 0))
    return packs


def _build_pack(doc, pre, post, window, items, chunk, with_window: bool) -> Pack:
    ids, positions, segments, view = [], [], [], []

    def add(tokens, first_position, segment, sees):
        ids.extend(tokens)
        positions.extend(range(first_position, first_position + len(tokens)))
        segments.extend([segment] * len(tokens))
        view.extend([sees] * len(tokens))

    if with_window:
        add(window, 0, WINDOW, 0)
    window_len = len(ids)
    trunk = list(pre) + window[: max((items[k].position for k in chunk), default=0)] if chunk else []
    add(trunk, 0, TRUNK, 0)
    width = max((len(items[k].response_ids) for k in chunk), default=0)
    logit_index, rows, cols = [], [], []
    sampled = torch.zeros((len(chunk), width))
    for row, k in enumerate(chunk):
        item = items[k]
        cut = len(pre) + item.position
        # The segment starts with `post`; without one, with the prompt's last token (re-encoded).
        seen = cut if post else cut - 1
        head = trunk[seen:cut] + list(post)
        start = len(ids)
        add(head + list(item.response_ids), seen, row + 1, seen)
        n = len(item.response_ids)
        logit_index.extend(range(start + len(head) - 1, start + len(head) - 1 + n))
        rows.extend([row] * n)
        cols.extend(range(width - n, width))
        sampled[row, width - n :] = torch.tensor(item.sampled_mask, dtype=sampled.dtype)
    as_long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return Pack(
        doc=doc, items=list(chunk), input_ids=as_long(ids), position_ids=as_long(positions),
        segments=as_long(segments), trunk_view=as_long(view), window_len=window_len,
        response_logit_index=as_long(logit_index), response_rows=as_long(rows), response_cols=as_long(cols),
        sampled_mask=sampled,
    )


def packed_forward(model, pack: Pack, blocks: bool = True) -> PackedOutput:
    """One forward over `pack` (the model must use SDPA attention); only the logits that score a
    response token or a window token are computed. With `blocks`, attention computes only the unmasked
    blocks (`block_attention`); without, or under gradient checkpointing, SDPA with the dense mask."""
    inner = getattr(model, "module", model)
    attention = getattr(inner.config, "_attn_implementation", None)
    if attention != "sdpa":  # eager adds the mask to the scores: a boolean one is silently wrong (SPEC §12)
        raise ValueError(f"packed training needs a model loaded with attn_implementation='sdpa', not '{attention}'")
    device = next(model.parameters()).device
    keep = torch.cat([torch.arange(pack.window_len), pack.response_logit_index]).to(device)
    ids = pack.input_ids.to(device)
    inputs = dict(input_ids=ids[None], position_ids=pack.position_ids.to(device)[None], logits_to_keep=keep)
    if blocks and not _checkpointing(inner):
        with attention_implementation(inner, BLOCKS):
            logits = model(**inputs, pack_layout=block_layout(pack).to(device)).logits[0]
    else:
        logits = model(**inputs, attention_mask=pack.attention_mask(device)).logits[0]
    n = pack.window_len
    flat = token_logprobs(logits[n:], ids[pack.response_logit_index.to(device) + 1])
    mask = pack.sampled_mask.to(device)
    where = (pack.response_rows.to(device), pack.response_cols.to(device))
    logprobs = flat.new_zeros(mask.shape).index_put(where, flat)
    if not n:
        return PackedOutput(logprobs, mask, None, None)
    return PackedOutput(logprobs, mask, logits[None, :n], ids[None, :n])
