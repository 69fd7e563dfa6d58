"""Batched two-phase rollouts with answer forcing (SPEC §3).

Phase 1 samples reasoning until the policy writes `</think>` or reaches the cap (`2·B_t`, or a fixed
maximum without the budget); a closing tag begun at the cap may finish, so that an empty thought can close
itself even at B_t = 1. Phase 2 samples the answer: with answer forcing, the rollout first appends
what is missing itself -- `</think>` if the policy did not close it, then `\\boxed{` -- and samples only
the answer, up to its closing brace. Inserted tokens are marked in `sampled_mask` (0) so the RL loss
ignores them. Without forcing the policy writes everything and a missing answer simply scores 0.

Everything runs in one decoding loop over one KV cache; finished rows are dropped from the batch.

`generate_shared` is the same rollout for prompts that share a prefix (all positions of one document
share `pre + x_<t`, SPEC §1): each document's prefix is encoded once, and every prompt starts from a
slice of that cache instead of re-encoding it. The prefixes are held once per batch, not copied into
every row's cache: each row's cache holds only the end of its prompt and its response, and attention reads
the prefix it sees from the shared copy (`attention.trunk_attention`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from rmt.attention import TRUNK, SharedTrunk, attention_implementation
from rmt.prompts import THINK_CLOSE

BOX_OPEN = "\\boxed{"


def answer_format_ids(tokenizer) -> tuple[list[int], list[int], list[int]]:
    """Token ids of the answer format as rollouts write it: newline + `</think>`, space + `\\boxed{`, and `}`."""
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    return encode("\n" + THINK_CLOSE), encode(" " + BOX_OPEN), encode("}")


@dataclass
class RolloutSettings:
    max_reasoning_tokens: int = 64  # the reasoning cap when a call gives none
    answer_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    force_answer: bool = True
    batch_size: int = 32
    answer: bool = True  # sample an answer after the reasoning; False: stop at `</think>` or the cap (RLP)


@dataclass
class Rollout:
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    sampled_mask: list[int] = field(default_factory=list)  # 1: sampled by the policy; 0: inserted
    reasoning_len: int = 0  # thought tokens before `</think>` (`thought_length`), or all of them when the cap cut it
    closed_think: bool = False  # the policy closed `</think>` by itself
    text: str = ""


@dataclass
class SharedPrompts:
    """Prompts that share a prefix: prompt k is `prefix[:cuts[k]] + suffix`.

    For one document, `prefix = pre + x_<max t`, `cuts = [len(pre) + t for each position t]` and
    `suffix = post` (see `document_prompts`).
    """

    prefix: list[int]
    cuts: list[int]
    suffix: list[int]

    def prompts(self) -> list[list[int]]:
        return [self.prefix[:c] + self.suffix for c in self.cuts]


def document_prompts(pre: list[int], window_ids, positions, post: list[int]) -> SharedPrompts:
    """The prompts `pre + window_ids[:t] + post` of one document's positions, as one `SharedPrompts`
    (the same token ids as `PromptBuilder.prompt_ids` for each t)."""
    positions = [int(t) for t in positions]
    context = [int(i) for i in window_ids[: max(positions, default=0)]]
    return SharedPrompts(list(pre) + context, [len(pre) + t for t in positions], list(post))


def thought_length(tokenizer, reasoning_ids: list[int]) -> int:
    """Tokens of thought in a reasoning that ends with `</think>`: the tokens before the closing tag, not
    counting the tag's own tokens nor one whitespace-only token (the line break) right before it. A
    reasoning of just `\n</think>` has length 0."""
    ids = list(reasoning_ids)
    for k in range(1, len(ids) + 1):  # the fewest trailing tokens that hold the tag
        if THINK_CLOSE in tokenizer.decode(ids[-k:]):
            break
    n = len(ids) - k
    if n > 0 and not tokenizer.decode(ids[n - 1 : n]).strip():
        n -= 1
    return max(0, n)


def make_engine(model, tokenizer, settings: RolloutSettings, engine: str = "rmt", **options):
    """The rollout engine a config names: `rmt` (`RolloutEngine`) or `vllm` (`rmt.vllm_engine.VLLMEngine`,
    an optional dependency). Both take the same calls and give the same `Rollout` records."""
    if engine == "vllm":
        from rmt.vllm_engine import VLLMEngine

        return VLLMEngine(model, tokenizer, settings, **options)
    return RolloutEngine(model, tokenizer, settings)


def engine_options(rollout_config) -> dict:
    """The engine-specific options of a `RolloutConfig` (none for the built-in engine)."""
    if rollout_config.engine != "vllm":
        return {}
    return {"gpu_memory": rollout_config.vllm_gpu_memory, "sleep": rollout_config.vllm_sleep}


def rollout_positions(engine: "RolloutEngine", pre: list[int], post: list[int], windows, positions, copies: int,
                      seeds: list[int], max_reasoning_tokens: int, shared_prefix: bool = True) -> list[Rollout]:
    """`copies` rollouts of the prompt `pre + window[:t] + post` for every position t of every window, in that
    order (window by window, position by position, copy by copy). With `shared_prefix` each window's prefix
    is encoded once (`generate_shared`); otherwise every prompt is encoded whole (the reference path)."""
    if shared_prefix:
        docs = [document_prompts(pre, w, pos, post) for w, pos in zip(windows, positions)]
        return engine.generate_shared(docs, copies, seeds, max_reasoning_tokens)
    prompts = [list(pre) + [int(i) for i in w[: int(t)]] + list(post)
               for w, pos in zip(windows, positions) for t in pos for _ in range(copies)]
    return engine.generate(prompts, seeds, max_reasoning_tokens)


class RoomyLayer(DynamicLayer):
    """A full-attention cache layer whose keys and values live in buffers with room to grow: a decoded token is
    written in place, where `DynamicLayer` concatenates the whole cache at every step (copying it all, which
    took a sixth of a CPU rollout). `keys` / `values` are views of the filled part."""

    def __init__(self, room: int = 64):
        super().__init__()
        self.room = room
        self._keys = self._values = None
        self._length = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        if self._keys is None or self._length + n > self._keys.shape[-2]:
            self._grow(self._length + n + self.room, key_states, value_states)
        self._keys[:, :, self._length : self._length + n] = key_states
        self._values[:, :, self._length : self._length + n] = value_states
        self._length += n
        self._view()
        return self.keys, self.values

    def _grow(self, size: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        keys = key_states.new_empty((*key_states.shape[:2], size, key_states.shape[-1]))
        values = value_states.new_empty((*value_states.shape[:2], size, value_states.shape[-1]))
        if self._keys is not None:
            keys[:, :, : self._length] = self._keys[:, :, : self._length]
            values[:, :, : self._length] = self._values[:, :, : self._length]
        self._keys, self._values = keys, values

    def _view(self) -> None:
        self.keys = self._keys[:, :, : self._length]
        self.values = self._values[:, :, : self._length]

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self._length:
            self._keys = self._keys.repeat_interleave(repeats, dim=0)
            self._values = self._values.repeat_interleave(repeats, dim=0)
            self._view()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self._length:
            self._keys, self._values = self._keys[indices], self._values[indices]
            self._view()


def roomy_cache(room: int, prefilled=None) -> DynamicCache:
    """A `DynamicCache` of `RoomyLayer`s (`room` spare tokens per growth), optionally holding
    `prefilled` [(keys, values) per layer]."""
    cache = DynamicCache()
    Cache.__init__(cache, layer_class_to_replicate=lambda: RoomyLayer(room))
    for keys, values in prefilled or ():
        layer = RoomyLayer(room)
        layer.update(keys, values)
        cache.layers.append(layer)
    return cache


class _Row:
    """Decoding state of one sequence."""

    def __init__(self, rollout: Rollout, cap: int):
        self.rollout = rollout
        self.cap = cap  # reasoning tokens allowed (a closing tag begun at the cap may finish after it)
        self.phase = "reason"
        self.queue: list[int] = []  # tokens the rollout inserts before sampling resumes
        self.tail = ""  # recent reasoning text, to spot `</think>`
        self.answer = ""  # answer text since reasoning ended
        self.answer_sampled = 0
        self.done = False


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generators: list[torch.Generator]):
    """One token per row; row i draws its single uniform number from its own generator, so a sequence's
    sample never depends on which other sequences share its batch (or process)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs * keep)
        probs = probs / probs.sum(-1, keepdim=True)
    u = torch.cat([torch.rand(1, generator=g) for g in generators]).to(probs.device)
    # Inverse-CDF sampling; the clamp guards against a cumulative sum that rounds below u.
    index = torch.searchsorted(probs.cumsum(-1), u.unsqueeze(-1)).squeeze(-1)
    return index.clamp(max=probs.shape[-1] - 1)


class RolloutEngine:
    """Generates rollouts for prompt token ids with a Hugging Face causal LM."""

    def __init__(self, model, tokenizer, settings: RolloutSettings):
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.close_ids, self.box_ids, _ = answer_format_ids(tokenizer)
        self.eos_ids = set(_as_list(tokenizer.eos_token_id)) | set(_as_list(model.generation_config.eos_token_id))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids)

    def sync_weights(self) -> None:
        """Called after every optimizer step: this engine samples from the live policy, so nothing to do (an
        engine holding its own copy of the weights, like vLLM's, reloads them here)."""

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], seeds: list[int] | None = None,
                 max_reasoning_tokens: int | None = None) -> list[Rollout]:
        """Roll out every prompt, reasoning for at most `max_reasoning_tokens` (default: the settings').
        `seeds[i]` seeds prompt i's own sampler (default: i), so results do not depend on batching, on the
        number of processes, or on where a run was resumed."""
        cap = max_reasoning_tokens or self.settings.max_reasoning_tokens
        rollouts = [Rollout(prompt_ids=list(p)) for p in prompts]
        seeds = list(range(len(prompts))) if seeds is None else list(seeds)
        size = self.settings.batch_size
        for start in range(0, len(rollouts), size):
            generators = [torch.Generator().manual_seed(int(x)) for x in seeds[start : start + size]]
            self._generate_batch(rollouts[start : start + size], generators, cap)
        for r in rollouts:
            r.text = self.tokenizer.decode(r.response_ids)
        return rollouts

    @torch.no_grad()
    def generate_shared(
        self, docs: list[SharedPrompts], copies: int, seeds: list[int] | None = None,
        max_reasoning_tokens: int | None = None,
    ) -> list[Rollout]:
        """Roll out `copies` responses to every prompt of every `SharedPrompts`, encoding each shared
        prefix once.

        Returns the same list, in the same order, as `generate` over the expanded prompts
        `[p for doc in docs for p in doc.prompts() for _ in range(copies)]` with the same `seeds`:
        token for token with greedy decoding, and draw for draw when sampling (each row keeps its own
        seeded generator), up to float rounding of the differently batched forwards.
        """
        cap = max_reasoning_tokens or self.settings.max_reasoning_tokens
        prompts = [p for doc in docs for p in doc.prompts() for _ in range(copies)]
        seeds = list(range(len(prompts))) if seeds is None else list(seeds)
        # Every row re-encodes the last `tail` tokens of its prompt (the suffix) on top of a cache slice.
        tail = max([1] + [len(doc.suffix) for doc in docs if doc.cuts])
        states = self._prefix_states(docs) if all(len(p) >= tail for p in prompts) else None
        if states is None:  # a cache this path cannot slice (sliding-window layers) or a degenerate prompt
            return self.generate(prompts, seeds, cap)
        rollouts = [Rollout(prompt_ids=p) for p in prompts]
        starts = [(d, len(docs[d].prefix[:c]) + len(docs[d].suffix)) for d, doc in enumerate(docs) for c in doc.cuts]
        per_batch = max(1, self.settings.batch_size // copies)  # prompts per batch; each fills `copies` rows
        for first in range(0, len(starts), per_batch):
            chunk = starts[first : first + per_batch]
            rows = slice(first * copies, (first + len(chunk)) * copies)
            generators = [torch.Generator().manual_seed(int(x)) for x in seeds[rows]]
            self._generate_shared_batch(chunk, states, tail, copies, rollouts[rows], generators, cap)
        for r in rollouts:
            r.text = self.tokenizer.decode(r.response_ids)
        return rollouts

    def _end_reasoning(self, row: _Row, closed: bool) -> None:
        row.phase = "answer"
        row.rollout.closed_think = closed
        if closed:  # every response token so far is a sampled reasoning token
            row.rollout.reasoning_len = thought_length(self.tokenizer, row.rollout.response_ids)
        if not self.settings.answer:
            row.done = True
        elif self.settings.force_answer:
            row.queue = ([] if closed else list(self.close_ids)) + list(self.box_ids)
            row.answer = BOX_OPEN

    def _step_row(self, row: _Row, sampled: int) -> int:
        """Choose this row's next token (a queued insertion wins over the sample) and update its state."""
        s = self.settings
        r = row.rollout
        if not row.queue and row.phase == "reason" and sampled in self.eos_ids and s.force_answer and s.answer:
            # The policy would stop before answering: with forcing, its end-of-sequence token is not kept
            # (it would sit between the reasoning and the inserted answer) and the format is inserted instead.
            self._end_reasoning(row, closed=False)
        if row.queue:
            token, is_sampled = row.queue.pop(0), 0
        else:
            token, is_sampled = sampled, 1
        r.response_ids.append(token)
        r.sampled_mask.append(is_sampled)
        if not is_sampled:
            return token
        piece = self.tokenizer.decode([token])
        if row.phase == "reason":
            r.reasoning_len += 1
            row.tail = (row.tail + piece)[-32:]
            if token in self.eos_ids:  # only without forcing (see above): no answer
                row.done = True
            elif THINK_CLOSE in row.tail:
                self._end_reasoning(row, closed=True)
            elif reasoning_cut(r.reasoning_len, row.cap, len(self.close_ids), row.tail):
                self._end_reasoning(row, closed=False)
        else:
            row.answer += piece
            row.answer_sampled += 1
            opened = row.answer.find(BOX_OPEN)
            if token in self.eos_ids or row.answer_sampled >= s.answer_tokens:
                row.done = True
            elif opened >= 0:
                inner = row.answer[opened + len(BOX_OPEN) :]
                depth = 1
                for ch in inner:
                    depth += (ch == "{") - (ch == "}")
                    if depth == 0:
                        row.done = True
                        break
        return token

    def _generate_batch(self, batch: list[Rollout], generators: list[torch.Generator], cap: int) -> None:
        device = self.model.device
        width = max(len(r.prompt_ids) for r in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):  # left padding: every row's next token goes at the same column
            ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        room = cap + 2 * len(self.close_ids) + len(self.box_ids) + self.settings.answer_tokens + 1
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=roomy_cache(room),
                         use_cache=True, logits_to_keep=1)
        self._decode([_Row(r, cap) for r in batch], generators, out.cache, out.logits[:, -1], mask, positions[:, -1] + 1)

    def _decode(self, rows: list[_Row], generators: list[torch.Generator], cache, logits, mask, next_pos,
                trunk: SharedTrunk | None = None) -> None:
        """The decoding loop, from a prefilled cache, the logits of each row's last prompt token and each
        row's next position: a left-padded cache ([B, width]) with its 2D `mask`, or (`trunk`) a cache of
        each row's own tokens over shared document prefixes."""
        s = self.settings
        device = self.model.device
        live = list(range(len(rows)))  # rows of the current batch tensors, by index into `rows`
        max_steps = max(row.cap for row in rows) + 2 * len(self.close_ids) + len(self.box_ids) + s.answer_tokens
        for _ in range(max_steps):
            sampled = _sample(logits, s.temperature, s.top_p, [generators[j] for j in live]).tolist()
            tokens = [self._step_row(rows[j], tok) for j, tok in zip(live, sampled)]
            keep = [k for k, j in enumerate(live) if not rows[j].done]
            if not keep:
                break
            step_ids = torch.tensor(tokens, device=device).unsqueeze(1)
            if trunk is None:
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            if len(keep) < len(live):  # drop finished rows from the batch and the cache
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                step_ids, next_pos = step_ids[index], next_pos[index]
                if trunk is None:
                    mask = mask[index]
                else:
                    trunk.rows(index)
                live = [live[k] for k in keep]
            out = self._forward(trunk, input_ids=step_ids, attention_mask=mask, position_ids=next_pos.unsqueeze(1),
                                cache=cache, use_cache=True)
            cache, logits = out.cache, out.logits[:, -1]
            next_pos = next_pos + 1

    def _forward(self, trunk: SharedTrunk | None, **inputs):
        if trunk is None:
            return self.model(**inputs)
        inputs.pop("attention_mask", None)
        with attention_implementation(self.model, TRUNK):
            return self.model(**inputs, trunk=trunk)

    def _prefix_states(self, docs: list[SharedPrompts]) -> dict | None:
        """Key/value states of each document's prefix, `{doc: [(keys, values) per layer]}`, each
        [kv_heads, len(prefix), head_dim]; None if the model's cache is not a plain full-attention one."""
        device = self.model.device
        todo = [d for d, doc in enumerate(docs) if doc.cuts]
        states = {}
        size = self.settings.batch_size
        for first in range(0, len(todo), size):
            chunk = todo[first : first + size]
            width = max(len(docs[d].prefix) for d in chunk)
            ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            for i, d in enumerate(chunk):  # right padding: causal attention keeps every prefix exact
                ids[i, : len(docs[d].prefix)] = torch.tensor(docs[d].prefix)
            layers = self.model(input_ids=ids.to(device), use_cache=True, logits_to_keep=1).cache.layers
            if any(type(layer) is not DynamicLayer for layer in layers):
                return None
            for i, d in enumerate(chunk):
                n = len(docs[d].prefix)
                states[d] = [(layer.keys[i, :, :n], layer.values[i, :, :n]) for layer in layers]
        return states

    def _generate_shared_batch(self, chunk, states, tail, copies, batch, generators, cap: int) -> None:
        """Prefill each prompt `(doc, length)` of `chunk`: its last `tail` tokens, over the first
        `length - tail` tokens of its document's prefix states (held once, as a `SharedTrunk`); then copy it
        `copies` times and decode, as `_generate_batch` does after its prefill."""
        device = self.model.device
        cached = [length - tail for _, length in chunk]
        docs = sorted({d for d, _ in chunk})
        width = max(cached)
        layers = []
        for layer in range(len(states[docs[0]])):
            k0 = states[docs[0]][layer][0]
            keys = k0.new_zeros((len(docs), k0.shape[0], width, k0.shape[2]))
            values = torch.zeros_like(keys)
            for j, d in enumerate(docs):
                k, v = states[d][layer]
                n = min(width, k.shape[1])
                keys[j, :, :n], values[j, :, :n] = k[:, :n], v[:, :n]
            layers.append((keys, values))
        index = {d: j for j, d in enumerate(docs)}
        trunk = SharedTrunk(layers, torch.tensor([index[d] for d, _ in chunk], device=device),
                            torch.tensor(cached, device=device))
        prompt_tails = [batch[i * copies].prompt_ids[-tail:] for i in range(len(chunk))]
        ids = torch.tensor(prompt_tails, dtype=torch.long, device=device)
        positions = torch.tensor(cached, device=device).unsqueeze(1) + torch.arange(tail, device=device)
        room = tail + cap + 2 * len(self.close_ids) + len(self.box_ids) + self.settings.answer_tokens + 1
        out = self._forward(trunk, input_ids=ids, position_ids=positions, cache=roomy_cache(room), use_cache=True,
                            logits_to_keep=1)
        cache = out.cache
        cache.batch_repeat_interleave(copies)
        trunk.rows(torch.arange(len(chunk), device=device).repeat_interleave(copies))
        logits = out.logits[:, -1].repeat_interleave(copies, dim=0)
        next_pos = (positions[:, -1] + 1).repeat_interleave(copies)
        self._decode([_Row(r, cap) for r in batch], generators, cache, logits, None, next_pos, trunk)


def opens_tag(text: str) -> bool:
    """Whether `text` ends with the beginning of a closing tag (`</think>`, or the line break before it)."""
    return any(text.endswith(tag[:k]) for tag in (THINK_CLOSE, "\n" + THINK_CLOSE) for k in range(1, len(tag)))


def reasoning_cut(n: int, cap: int, tag_tokens: int, tail: str) -> bool:
    """Whether an unclosed reasoning of `n` tokens ending in `tail` stops here: at the cap, unless a closing
    tag has begun (it may finish within `tag_tokens` more: `\n</think>` takes several tokens, more than the
    cap of 2 at B_t = 1, where counting it against the cap left no rollout able to close `</think>`)."""
    return n >= cap and not (n < cap + tag_tokens and opens_tag(tail))


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
