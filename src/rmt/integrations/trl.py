"""Reinforcement Mid-Training inside TRL's `GRPOTrainer` (`pip install 'rmt[trl]'`, tested with trl 1.16.0).

For people who already train with TRL: the parts of RMT that `GRPOTrainer` lacks, built from rmt's own
library functions, so that the TRL path draws, prompts and rewards exactly as `rmt train` does.

- `NextTokenPrompts`: the training stream. From an `rmt score` folder, step t's prompts are next-token
  reasoning prompts (SPEC §1) for positions drawn by the curriculum's band mix p_t (SPEC §5,
  `rmt.curriculum`), whose instruction carries the budget B_t (SPEC §3, `rmt.budget.token_budget`).
- `NextTokenReward`: a TRL reward function around an rmt reward object (`rmt.rewards.ExactMatch`,
  `PrefixMatch`, or your own): it reads B_t from the trainer state, scores with the object, and logs the
  reward's parts (`match`, `len`, match per band) with TRL's `log_metric`.
- `RMTGRPOTrainer`: `GRPOTrainer` plus λ·L_NTP over the same documents with the step's RL positions masked
  out (SPEC §7, `rmt.losses.ntp_loss`, `rmt.scored.ntp_target_mask`), the prompts' exact token ids, and a
  generation cap of 2·B_t plus room for the answer.

**Why a stream and not a callback.** The prompt of step t depends on t (B_t in the instruction, positions
drawn from p_t), so it cannot be written ahead into a map-style `Dataset`. A callback that rewrites such
a dataset at each step would race TRL's sampler and accelerate's loader, which read one batch ahead.
Instead `NextTokenPrompts.dataset()` is a `datasets.IterableDataset` whose k-th block of
`prompts_per_step` rows *is* step k's: each block is computed from its own index with the same random
generators `rmt train` uses (`DataOrder(seed + 1)` for documents, `BandSampler(seed)` for positions), never
from the trainer's state. So it does not matter how far ahead the loader reads, and a resumed run (which
the Trainer fast-forwards by reading the skipped batches again) replays the same draws. The price: one
block must be one optimizer step -- `RMTGRPOTrainer` checks that the generation batch is
`prompts_per_step × num_generations`, that `steps_per_generation` equals `gradient_accumulation_steps`,
`num_iterations` is 1, `shuffle_dataset` is off and `max_steps` is the stream's `total_steps`.

What stays TRL's: generation (sampling from its own random stream, no answer forcing -- a completion
without `\\boxed{}` scores 0), advantages and the clipped surrogate with its `loss_type` normalisation
(`"dapo"`, trl 1.16's default, is rmt's token-level mean over the step), optimizer, logging, checkpoints.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

import numpy as np
import torch

try:
    from trl import GRPOTrainer
except ImportError as exc:  # the optional extra is missing
    raise ImportError("rmt.integrations.trl needs TRL: pip install 'rmt[trl]'") from exc
from accelerate.utils import gather_object
from datasets import IterableDataset

from rmt.config import BudgetConfig, CurriculumConfig
from rmt.curriculum import BandSampler, band_probabilities
from rmt.difficulty import BAND_NAMES, EASY
from rmt.errors import RmtError
from rmt.forward import document_logits
from rmt.losses import dual_objective, ntp_loss
from rmt.prompts import THINK_CLOSE, PromptBuilder
from rmt.rewards import NextToken, RewardContext
from rmt.rollout import Rollout, answer_format_ids, reasoning_cut, thought_length
from rmt.runs import DataOrder
from rmt.scored import load_scored, ntp_target_mask
from rmt.train import band_means


# ---- the training stream ---------------------------------------------------------------------------------


class NextTokenPrompts:
    """Per-step next-token reasoning prompts from an `rmt score` folder, drawn as `rmt train` draws them.

    Step t takes `docs_per_step` windows of the `midtrain` split (those with a position above the entropy
    floor, in `rmt train`'s shuffled order) and `positions_per_doc` positions of each from the band mix
    p_t; its prompts carry B_t. Each row has the columns TRL needs (`prompt`) and those the reward and the
    NTP term read: `prompt_ids` (exact ids, see `RMTGRPOTrainer`), `input_ids` (the window), `position`,
    `doc` (index into `windows`), `band`, `step`, `budget`.

    Every step has exactly `prompts_per_step` prompts, because TRL's batches are fixed: a window with
    fewer eligible positions than `positions_per_doc` has its drawn positions repeated (the random draws
    stay in step with `rmt train`'s, which trains such a window on fewer positions instead), and a window
    with none in the bands p_t allows is passed over for the next one.
    """

    def __init__(self, data, tokenizer, total_steps: int, docs_per_step: int = 4, positions_per_doc: int = 4,
                 seed: int = 0, budget: BudgetConfig | None = None, curriculum: CurriculumConfig | None = None,
                 prompt_style: str = "auto", prefill_think: bool = True):
        windows, _ = load_scored(data, "midtrain")
        self.windows = [w for w in windows if (w.band >= EASY).any()]  # `rmt train`'s RL windows
        if not self.windows:
            raise RmtError(f"{data}: no position above the entropy floor; nothing for RL to train on")
        if total_steps < 1 or docs_per_step < 1 or positions_per_doc < 1:
            raise RmtError("total_steps, docs_per_step and positions_per_doc must be >= 1")
        self.tokenizer = tokenizer
        self.total_steps, self.docs_per_step, self.positions_per_doc = total_steps, docs_per_step, positions_per_doc
        self.seed = seed
        self.budget = budget or BudgetConfig()
        self.curriculum = curriculum or CurriculumConfig()
        self.prompt = PromptBuilder(tokenizer, prompt_style, prefill_think)

    @property
    def prompts_per_step(self) -> int:
        return self.docs_per_step * self.positions_per_doc

    def budget_at(self, step: int) -> int | None:
        return self.budget.at(step, self.total_steps)

    def band_probs_at(self, step: int):
        c = self.curriculum
        return band_probabilities(step, self.total_steps, tuple(c.p_early), tuple(c.p_late), c.t1, c.t2) \
            if c.enabled else None

    def steps(self) -> Iterator[list[dict]]:
        """The rows of every step, step by step; the same sequence on every call."""
        sampler = BandSampler(self.seed)
        order = DataOrder(np.random.default_rng(self.seed + 1), len(self.windows))
        for step in range(self.total_steps):
            budget, probs = self.budget_at(step), self.band_probs_at(step)
            rows: list[dict] = []
            passed_over = 0
            while len(rows) < self.prompts_per_step:
                doc = order.take(1)[0]
                window = self.windows[doc]
                drawn = sampler.sample(window.band, probs, self.positions_per_doc)
                passed_over = 0 if drawn.size else passed_over + 1
                if passed_over > len(self.windows):
                    raise RmtError(f"step {step}: no window has a position in the bands the curriculum allows "
                                   f"(band mix {probs}); check curriculum.p_early / p_late against the scored bands")
                for t in np.resize(drawn, self.positions_per_doc if drawn.size else 0):
                    ids = self.prompt.prompt_ids(window.input_ids, int(t), budget)
                    rows.append({
                        "prompt": self.tokenizer.decode(ids), "prompt_ids": ids,
                        "input_ids": window.input_ids.tolist(), "position": int(t), "doc": doc,
                        "band": int(window.band[t]), "step": step, "budget": budget,
                    })
            yield rows

    def dataset(self) -> IterableDataset:
        """The stream as TRL's `train_dataset`: `total_steps` blocks of `prompts_per_step` rows."""
        return IterableDataset.from_generator(self._rows)

    def _rows(self):
        for rows in self.steps():
            yield from rows


# ---- rewards ---------------------------------------------------------------------------------------------


def completion_rollout(tokenizer, completion_ids, cap: int) -> Rollout:
    """A finished completion as the `Rollout` record rmt's rewards read, its reasoning measured as rmt's
    rollout engine measures it: closed if `</think>` appears within the first `cap` tokens (or within the
    closing tag's length after them, for a tag begun at the cap: `rmt.rollout.reasoning_cut`), the reasoning
    then being `rmt.rollout.thought_length` of those tokens; otherwise the tokens up to where the engine
    would have cut, unclosed. The text is decoded as the engine decodes it (special tokens kept)."""
    ids = [int(i) for i in completion_ids]
    rollout = Rollout(prompt_ids=[], response_ids=ids, sampled_mask=[1] * len(ids), text=tokenizer.decode(ids))
    room = len(answer_format_ids(tokenizer)[0])
    tail = ""
    for n, token in enumerate(ids, start=1):
        tail = (tail + tokenizer.decode([token]))[-32:]
        if THINK_CLOSE in tail:
            rollout.closed_think = True
            rollout.reasoning_len = thought_length(tokenizer, ids[:n])
            return rollout
        if reasoning_cut(n, cap, room, tail):
            break
    rollout.reasoning_len = min(len(ids), n) if ids else 0
    return rollout


class NextTokenReward:
    """A TRL reward function around an rmt next-token reward object (`ExactMatch`, `PrefixMatch`, ...).

    TRL calls it with the completions and the dataset's columns (`input_ids`, `position`, ... of
    `NextTokenPrompts`) and its `trainer_state`; B_t comes from the trainer state's step and `max_steps`
    with `budget`'s schedule, and must equal the `budget` column when there is one -- a mismatch means
    the stream and the trainer disagree on the step (see `RMTGRPOTrainer`'s checks). Returns the reward
    object's totals; logs its parts (`<name>/match`, `<name>/len`, `<name>/match_easy` ...), the mean
    reasoning length and the fraction of completions that closed `</think>`.
    """

    def __init__(self, reward, tokenizer, budget: BudgetConfig | None = None):
        self.reward = reward
        self.tokenizer = tokenizer
        self.budget = budget or BudgetConfig()
        self.__name__ = f"rmt_{reward.name}"  # TRL's name for the function in its logs

    def __call__(self, prompts, completions, completion_ids, trainer_state, input_ids, position,
                 log_metric=None, budget=None, band=None, **columns) -> list[float]:
        step, total = trainer_state.global_step, trainer_state.max_steps
        b_t = self.budget.at(step, total)
        if budget is not None and any(b != b_t for b in budget):
            raise RmtError(f"{self.__name__}: the prompts carry budget {sorted(set(budget))} but the trainer is at "
                           f"step {step} of {total}, where B_t = {b_t}; align the stream and the trainer "
                           "(one block per optimizer step, max_steps = total_steps)")
        cap = self.budget.cap(b_t)
        rollouts = [completion_rollout(self.tokenizer, ids, cap) for ids in completion_ids]
        tasks = [NextToken(ids, int(t)) for ids, t in zip(input_ids, position, strict=True)]
        scores = self.reward(rollouts, tasks, RewardContext(step, total, b_t))
        if log_metric is not None:
            for key in scores[0]:
                if key != "reward":
                    log_metric(f"{self.__name__}/{key}", float(np.mean([s[key] for s in scores])))
            if band is not None:
                for key, value in band_means(scores, list(band), "match").items():
                    if not np.isnan(value):  # a band without rollouts this step
                        log_metric(f"{self.__name__}/{key}", value)
            log_metric(f"{self.__name__}/reasoning_len", float(np.mean([r.reasoning_len for r in rollouts])))
            log_metric(f"{self.__name__}/closed_think", float(np.mean([r.closed_think for r in rollouts])))
        return [s["reward"] for s in scores]


# ---- the trainer -----------------------------------------------------------------------------------------


class RMTGRPOTrainer(GRPOTrainer):
    """`GRPOTrainer` on a `NextTokenPrompts` stream, with RMT's dual objective ``L = L_RL + λ·L_NTP``.

    Per step, beyond TRL's own work:

    - generation starts from the rows' exact prompt ids (the document's tokens are never decoded and
      re-encoded, as in `rmt.prompts`) and is capped at 2·B_t reasoning tokens plus room for
      "</think> \\boxed{…}" and `answer_tokens` (never more than `max_completion_length`);
    - L_NTP is the teacher-forced cross-entropy over the step's documents, each once, with all of the
      step's RL positions masked out, as a token mean over the step (`rmt.grpo.policy_update`'s
      normalisation); the documents are spread over the step's micro-batches and each micro-batch adds
      its share, scaled as TRL scales its policy loss, so the step's gradient is that of L_RL + λ·L_NTP;
    - logs `ntp_loss`, `budget`, the band mix `band_prob/<band>` and the drawn `sampled/<band>` counts.

    It overrides three internal methods of `GRPOTrainer` (`_generate_and_score_completions`,
    `_tokenize_prompts`, `_compute_loss`): that is why `rmt[trl]` pins the TRL version it was tested with.
    """

    def __init__(self, model, reward_funcs, args, prompts: NextTokenPrompts, ntp_weight: float = 0.1,
                 answer_tokens: int = 16, **kwargs):
        check_alignment(args, prompts)
        if ntp_weight < 0:
            raise RmtError(f"ntp_weight must be >= 0, got {ntp_weight}")
        super().__init__(model=model, reward_funcs=reward_funcs, args=args, train_dataset=prompts.dataset(), **kwargs)
        self.prompts = prompts
        self.ntp_weight = ntp_weight
        close, box, _ = answer_format_ids(prompts.tokenizer)
        self.answer_room = len(close) + len(box) + answer_tokens
        self._prompt_ids: list[list[int]] | None = None
        self._ntp_chunks: list[tuple[list, list]] = []
        self._ntp_tokens = 0.0
        self._ntp_sum = 0.0

    def _generate_and_score_completions(self, rows):
        if "budget" in rows[0]:
            cap = self.prompts.budget.cap(rows[0]["budget"]) + self.answer_room
            cap = min(cap, self.max_completion_length or cap)
            if self.use_vllm:
                self.vllm_generation.max_completion_length = cap
            else:
                self.generation_config.max_new_tokens = cap
        self._prompt_ids = [row["prompt_ids"] for row in rows] if "prompt_ids" in rows[0] else None
        output = super()._generate_and_score_completions(rows)
        if self.model.training:
            self._log_step(rows)
            if self.ntp_weight > 0:
                self._plan_ntp(rows)
        return output

    def _tokenize_prompts(self, prompts):
        # The rows' own ids instead of re-encoding the decoded prompt text.
        if self._prompt_ids is not None and len(self._prompt_ids) == len(prompts):
            return [list(p) for p in self._prompt_ids], None, {}
        return super()._tokenize_prompts(prompts)

    def _log_step(self, rows: list[dict]) -> None:
        step = rows[0]["step"]
        metrics = self._metrics["train"]
        if rows[0]["budget"] is not None:
            metrics["budget"].append(rows[0]["budget"])
        probs = self.prompts.band_probs_at(step)
        for name, p in zip(BAND_NAMES, probs or ()):
            metrics[f"band_prob/{name}"].append(p)
        bands = np.asarray(gather_object([row["band"] for row in rows]))  # each prompt num_generations times
        for b, name in enumerate(BAND_NAMES, start=EASY):
            metrics[f"sampled/{name}"].append(int((bands == b).sum()) // self.num_generations)

    def _plan_ntp(self, rows: list[dict]) -> None:
        """Give each of the step's documents to one process (the one holding its first row) and one of its
        micro-batches, with its NTP targets: the positions it owns minus every RL position of the step."""
        pairs = gather_object([(row["doc"], row["position"]) for row in rows])  # the whole step, in process order
        positions, first = defaultdict(set), {}
        for i, (doc, t) in enumerate(pairs):
            positions[doc].add(t)
            first.setdefault(doc, i)
        start = self.accelerator.process_index * len(rows)
        mine = [doc for doc, i in first.items() if start <= i < start + len(rows)]
        masks = [ntp_target_mask(self.prompts.windows[doc], sorted(positions[doc])) for doc in mine]
        micro = self.args.steps_per_generation
        self._ntp_chunks = [([self.prompts.windows[doc].input_ids for doc in mine[k::micro]], masks[k::micro])
                            for k in range(micro)]
        local = torch.tensor(float(sum(int(m.sum()) for m in masks)), device=self.accelerator.device)
        self._ntp_tokens = float(self.accelerator.reduce(local, reduction="sum"))
        self._ntp_sum = 0.0

    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        if not (self.model.training and self.ntp_weight > 0 and self._ntp_tokens > 0):
            return loss
        micro = self._step % self.args.steps_per_generation
        windows, masks = self._ntp_chunks[micro]
        if windows:
            logits, ids, _ = document_logits(model, windows, self._tokenizer.pad_token_id)
            target = torch.zeros_like(ids, dtype=torch.float32)
            for j, m in enumerate(masks):
                target[j, : len(m)] = torch.as_tensor(m, dtype=torch.float32)
            ce_sum = ntp_loss(logits, ids, target) * target[:, 1:].sum()
            # Gradients are summed over micro-batches and averaged over processes: this share, times the
            # number of processes, sums to the step's token-mean L_NTP.
            share = ce_sum * self.accelerator.num_processes / self._ntp_tokens
            loss = dual_objective(loss, share, self.ntp_weight)
            self._ntp_sum += float(ce_sum.detach())
        if micro == self.args.steps_per_generation - 1:
            local = torch.tensor(self._ntp_sum, device=self.accelerator.device)
            total = self.accelerator.reduce(local, reduction="sum")
            self._metrics["train"]["ntp_loss"].append(float(total) / self._ntp_tokens)
        return loss


def check_alignment(args, prompts: NextTokenPrompts) -> None:
    """One block of the stream must be one optimizer step (see the module's docstring)."""
    G = args.num_generations
    problems = [
        (not args.shuffle_dataset, "shuffle_dataset=False (the stream is already in rmt train's order)"),
        (args.num_iterations == 1, "num_iterations=1"),
        (args.steps_per_generation == args.gradient_accumulation_steps,
         "steps_per_generation equal to gradient_accumulation_steps (one generation per optimizer step)"),
        (args.generation_batch_size == prompts.prompts_per_step * G,
         f"a generation batch of prompts_per_step × num_generations = {prompts.prompts_per_step} × {G} = "
         f"{prompts.prompts_per_step * G} completions (per_device_train_batch_size × processes × "
         f"gradient_accumulation_steps), got {args.generation_batch_size}"),
        (args.max_steps == prompts.total_steps, f"max_steps={prompts.total_steps} (the stream's total_steps)"),
    ]
    missing = [need for ok, need in problems if not ok]
    if missing:
        raise RmtError("RMTGRPOTrainer needs " + "; ".join(missing))
