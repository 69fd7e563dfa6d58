"""vLLM rollouts (`rollout.engine=vllm`, vLLM installed beside rmt): the calls and `Rollout` records of
`RolloutEngine`, with vLLM's paged KV cache, continuous batching and automatic prefix caching doing the forwards.

vLLM only proposes the policy's tokens. Each round sends every unfinished rollout (its prompt ids plus its
response so far, never re-tokenised) to vLLM with its own seed, up to the end of its current phase: reasoning
stops at `</think>` or the cap, the answer at a `}` or its token allowance. The proposed tokens are then
replayed one by one through `RolloutEngine`'s own rules (`_step_row`), which decide what the rollout keeps:
where the reasoning ends, what answer forcing inserts (masked 0 in `sampled_mask`), when the answer is closed.
Tokens vLLM sampled past an insertion were sampled without it and are dropped; a rollout the rules do not
consider finished (a `}` inside nested braces, say) goes on in the next round. The records therefore follow
the same rules as the `rmt` engine's, token for token under greedy decoding.

One engine per process, colocated with training: vLLM's `external_launcher` executor joins the process
group of `torchrun` / `accelerate launch` (or makes a one-process one), so every rank rolls out its own
prompts with the rank layout training uses. The engine holds its own copy of the weights: `sync_weights()`
pushes the policy's after every optimizer step (FSDP2 shards gathered) and resets the prefix cache, whose
keys and values were computed with the old weights.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
import socket
import tempfile

import torch

from rmt.errors import RmtError
from rmt.prompts import THINK_CLOSE
from rmt.rollout import Rollout, RolloutEngine, RolloutSettings, SharedPrompts, _Row
from rmt.runs import rollout_seed

# The engine alive in this process: vLLM keeps its parallel state in module globals, so a second engine (a
# recipe run after another in one process) first shuts the previous one down.
_ACTIVE: "VLLMEngine | None" = None


class VLLMEngine(RolloutEngine):
    """Rollouts from a vLLM engine that holds a copy of `model`'s weights.

    `gpu_memory` is the share of the device's memory vLLM may take for weights and KV cache (on a CPU: of the
    machine's memory); `sleep` frees that memory between rollouts (vLLM's sleep mode, level 2: weights and KV
    cache are dropped and the weights pushed again before the next rollouts; GPU only)."""

    def __init__(self, model, tokenizer, settings: RolloutSettings, gpu_memory: float = 0.3, sleep: bool = False):
        global _ACTIVE
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # vLLM's INFO lines would bury the progress bar
        try:
            from vllm import LLM
        except ImportError as e:
            raise RmtError("rollout.engine=vllm needs vLLM, which is not installed (see the README's vLLM "
                           "section)") from e
        super().__init__(model, tokenizer, settings)
        cpu = model.device.type == "cpu"
        if sleep and cpu:
            raise RmtError("rollout.vllm_sleep=true needs a GPU: vLLM has no sleep mode on CPU")
        from torch.distributed.fsdp import FullyShardedDataParallel

        if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            raise RmtError("rollout.engine=vllm gathers FSDP2 shards (fsdp_version: 2), not FSDP1's flat ones")
        if _ACTIVE is not None:
            _ACTIVE.close()  # refused under a launcher: there it is one engine per process
        # vLLM builds its model from a folder: the policy's config and tokenizer, and dummy weights that
        # `sync_weights` replaces with the policy's own (which may differ from any file on disk).
        self._folder = tempfile.TemporaryDirectory(prefix="rmt-vllm-")
        model.config.save_pretrained(self._folder.name)
        tokenizer.save_pretrained(self._folder.name)
        dtype = next(model.parameters()).dtype if cpu else torch.bfloat16  # GPU rollouts in bf16, as autocast
        with _launcher_env() as owns_process_group, _kept_random_state():
            self.llm = LLM(
                model=self._folder.name, load_format="dummy", dtype=dtype,
                distributed_executor_backend="external_launcher",
                enable_prefix_caching=True,
                block_size=32 if cpu else None,  # the CPU backend's prefix cache hit only with 32-token blocks
                enforce_eager=cpu,  # on CPU torch.compile took 21 s instead of 2 s to start, to decode ~10% faster
                **_memory(gpu_memory, cpu), enable_sleep_mode=sleep,
                generation_config="vllm",  # sampling is set here, not by the model folder's defaults
                seed=0,  # unused: every request brings its own seed
                disable_log_stats=True,
            )
        self._owns_process_group = owns_process_group
        # vLLM shuts an in-process engine down when it is collected, and that shutdown destroys every process
        # group, the default one included: under a launcher that group is training's, and in one process
        # `accelerate`'s end_training has destroyed it already, so the shutdown would fail. `close` shuts the
        # engine down where that is safe.
        self.llm.llm_engine.engine_core._finalizer.detach()
        self.sleep = sleep
        self._sleeping: set[str] = set()  # what vLLM's sleep mode has dropped: "weights", "kv_cache"
        # The weights are pushed before the first rollouts, not here: a resumed run restores its checkpoint's
        # weights into the policy after building the engine.
        self._pushed = False
        _ACTIVE = self

    def sync_weights(self) -> None:
        """Push the policy's current weights into the engine, then drop the prefix cache built with the old
        ones. Called after every optimizer step, on every process (an FSDP2 gather is a collective)."""
        if "weights" in self._sleeping:
            self.llm.wake_up(tags=["weights"])
            self._sleeping.discard("weights")
        # An iterator is required: `reload_weights` without one reloads the (here: dummy) weights from disk.
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": full_weights(self.model)})
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache; rollouts would reuse stale keys and values")
        self._pushed = True

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], seeds: list[int] | None = None,
                 max_reasoning_tokens: int | None = None) -> list[Rollout]:
        """Roll out every prompt, as `RolloutEngine.generate` does; `seeds[i]` seeds prompt i's sampling."""
        from vllm.inputs import TokensPrompt

        cap = max_reasoning_tokens or self.settings.max_reasoning_tokens
        seeds = list(range(len(prompts))) if seeds is None else list(seeds)
        rows = [_Row(Rollout(prompt_ids=[int(i) for i in p]), cap) for p in prompts]
        self._wake()
        # Every round takes at least one token of each unfinished rollout (a sampled one, or the end of its
        # reasoning), so the rounds end: usually two, reasoning then answer.
        for round_ in itertools.count():
            todo = [i for i, row in enumerate(rows) if not row.done]
            if not todo:
                break
            requests = [TokensPrompt(prompt_token_ids=rows[i].rollout.prompt_ids + rows[i].rollout.response_ids)
                        for i in todo]
            params = [self._sampling(rows[i], rollout_seed(seeds[i], round_)) for i in todo]
            with _kept_random_state():  # vLLM's sampler also draws from the global generator
                outputs = self.llm.generate(requests, params, use_tqdm=False)
            for i, output in zip(todo, outputs):
                before = len(rows[i].rollout.response_ids)
                self._replay(rows[i], output.outputs[0].token_ids)
                if len(rows[i].rollout.response_ids) == before and not rows[i].done:
                    raise RuntimeError(f"vLLM returned no token for a rollout ({output.outputs[0].finish_reason})")
        self._rest()
        for row in rows:
            row.rollout.text = self.tokenizer.decode(row.rollout.response_ids)
        return [row.rollout for row in rows]

    def generate_shared(self, docs: list[SharedPrompts], copies: int, seeds: list[int] | None = None,
                        max_reasoning_tokens: int | None = None) -> list[Rollout]:
        """`generate` over the expanded prompts (the same list and order as `RolloutEngine.generate_shared`):
        vLLM's automatic prefix caching encodes a shared prefix once."""
        prompts = [p for doc in docs for p in doc.prompts() for _ in range(copies)]
        return self.generate(prompts, seeds, max_reasoning_tokens)

    def close(self) -> None:
        """Shut the engine down and free its memory, in one plain process (under a launcher an engine lives as
        long as its process: vLLM's shutdown would destroy the launcher's process group)."""
        global _ACTIVE
        from vllm.distributed import parallel_state

        if not self._owns_process_group:
            raise RmtError("a vLLM engine under torchrun / accelerate launch lives as long as its process")
        if self.llm is not None:
            if not torch.distributed.is_initialized():
                # A recipe's end (accelerate's end_training) destroyed the default group and vLLM's with it:
                # forget them, or the shutdown below would fail destroying them again.
                for name, value in list(vars(parallel_state).items()):
                    if isinstance(value, parallel_state.GroupCoordinator):
                        setattr(parallel_state, name, None)
            self.llm.llm_engine.engine_core.engine_core.shutdown()
            self.llm = None
            gc.collect()
            self._folder.cleanup()
        if _ACTIVE is self:
            _ACTIVE = None

    def _sampling(self, row: _Row, seed: int):
        """vLLM's sampling for the rest of `row`'s current phase."""
        from vllm import SamplingParams

        s = self.settings
        reasoning = row.phase == "reason"
        # Past the cap only a closing tag may go on (the rules decide, token by token, in `_replay`).
        left = row.cap + len(self.close_ids) - row.rollout.reasoning_len if reasoning else \
            s.answer_tokens - row.answer_sampled
        return SamplingParams(
            temperature=s.temperature, top_p=s.top_p, seed=seed, max_tokens=max(1, left),
            stop=[THINK_CLOSE if reasoning else "}"], include_stop_str_in_output=True,
            stop_token_ids=sorted(self.eos_ids), skip_special_tokens=False,
        )

    def _replay(self, row: _Row, tokens) -> None:
        """Feed vLLM's tokens to the rollout's rules until it is done, or until the rules insert tokens: vLLM
        sampled the rest without them, so they are dropped and the next round samples after the insertion."""
        for token in tokens:
            self._step_row(row, int(token))
            if row.done:
                return
            if row.queue or not row.rollout.sampled_mask[-1]:
                while row.queue:
                    self._step_row(row, -1)  # pops the next inserted token; the argument is not used
                return

    def _wake(self) -> None:
        if not self._pushed:
            self.sync_weights()
        if "kv_cache" in self._sleeping:
            self.llm.wake_up(tags=["kv_cache"])
            self._sleeping.discard("kv_cache")

    def _rest(self) -> None:
        if self.sleep:
            self.llm.sleep(level=2)  # drops the weights too: the next rollouts push them again
            self._sleeping, self._pushed = {"weights", "kv_cache"}, False


def _memory(share: float, cpu: bool) -> dict:
    """vLLM's memory setting for a share of the device's memory. On a CPU vLLM would count the whole process
    against the share (the policy, optimizer and activations too), so there the share sizes the KV cache."""
    if not cpu:
        return {"gpu_memory_utilization": share}
    import psutil

    return {"kv_cache_memory_bytes": int(share * psutil.virtual_memory().total)}


@torch.no_grad()
def full_weights(model):
    """`(name, tensor)` for every weight of `model` under its Hugging Face name, whole: an FSDP2 shard (a
    DTensor) is all-gathered, one tensor at a time, in the same order on every process."""
    from torch.distributed.tensor import DTensor

    for name, tensor in model.state_dict().items():
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        yield name, tensor


@contextlib.contextmanager
def _kept_random_state():
    """Run a block without changing this process's global random state (vLLM seeds torch, numpy and random
    when it starts in-process; training's own seeding must stand)."""
    import random

    import numpy as np

    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        yield
    random.setstate(python_state)
    np.random.set_state(numpy_state)


@contextlib.contextmanager
def _launcher_env():
    """The environment `external_launcher` reads (RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Under torchrun
    or `accelerate launch` it is there; in one plain process it is set for the engine's start-up only, and
    vLLM then makes a one-process group. Yields whether vLLM made that group."""
    owns = not torch.distributed.is_initialized()
    if "RANK" in os.environ:
        if owns and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise RmtError("rollout.engine=vllm under a launcher joins its process group: initialise "
                           "torch.distributed (accelerate does) before building the engine")
        yield owns
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    values = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield owns
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
