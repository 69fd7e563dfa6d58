"""`rmt eval`: next-token accuracy of a model on held-out scored documents (SPEC §9), with intervals.

Positions: every scored position of the `eval` split whose proxy entropy exceeds the floor (H > t0)
forms the *pool*. Accuracy is reported on RPT's nested splits (easy H > t0, medium H > t1,
hard H > t2, from the dataset's thresholds) and as their unweighted mean ("Avg." in both papers).

- **NTP mode**: the greedy next token (argmax of the logits at t − 1) against x_t, on the whole pool;
  one no-grad forward per window, in batches.
- **NTR mode**: the model reasons, then writes `\\boxed{prediction}` (SPEC §1), on a fixed sample of
  `positions` positions drawn uniformly without replacement from the pool with
  `numpy.random.default_rng(seed)`. The sample depends only on the data and the seed, so every model
  evaluated on the same data with the same seed answers the same positions (and can be compared paired,
  `rmt.stats.paired_difference`). Decoding is greedy with a reasoning cap of 2·B (or a fixed cap without a
  budget) and answer forcing (SPEC §3); each window's prompt prefix is encoded once for all its positions.
  The headline accuracy is RMT's `exact` match; RPT's `prefix` match is reported beside it.

Every accuracy comes with a 95% percentile-bootstrap interval over positions (`rmt.stats`). Every
evaluated position is stored in the JSON output (`records`), so any number can be recounted.

Under `torchrun` / `accelerate launch` the batches are dealt round-robin to the processes and the records
gathered: the output is the one-process output, written once.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from rmt import assets
from rmt.config import ENGINES, Flag, PROMPT_STYLES, add_config_arguments, check, comma_list, config_from_args
from rmt.difficulty import BAND_NAMES, nested_split_masks
from rmt.errors import RmtError
from rmt.forward import document_logits
from rmt.io import read_json, write_json_atomic
from rmt.prompts import PromptBuilder
from rmt.rewards import ExactMatch, NextToken, PrefixMatch, extract_prediction
from rmt.rollout import RolloutSettings, document_prompts, make_engine
from rmt.scored import ScoredWindow, load_scored, read_meta
from rmt.stats import mean_interval, split_intervals

MODES = ("ntp", "ntr")
EVAL_FILE = "eval.json"  # a run folder's evaluation, read by `rmt report`


@dataclass(frozen=True)
class EvalSettings:
    """How `rmt eval` evaluates; saved in the output so that results are only compared like with like."""

    budget: int | None = 16
    """Token budget B named in the NTR prompt; the reasoning cap is 2·B. null: no budget in the prompt."""
    max_reasoning_tokens: int = 64
    """Reasoning cap when `budget` is null."""
    positions: int = 128
    """NTR sample size (all of the pool if it is smaller)."""
    seed: int = 0
    """Seed of the NTR position sample."""
    force_answer: bool = True
    """Close </think> and open \\boxed{ for the model when it has not (SPEC §3)."""
    answer_tokens: int = 16
    """Tokens allowed for the boxed answer after the reasoning."""
    temperature: float = 0.0
    """NTR sampling temperature. 0: greedy, the papers' accuracy. > 0: one sampled answer per position (the
    sample of position k seeded by `seed` and k, so that two models evaluated alike draw the same random
    numbers): the accuracy is then the RL objective itself, the expected match, on held-out text."""
    batch_size: int = 32
    """Sequences per generation batch (NTR); windows per forward are a quarter of it (NTP)."""
    prompt_style: str = "auto"
    """auto | chat | plain | raw (see `rmt.prompts.PromptBuilder`)."""
    engine: str = "rmt"
    """NTR rollouts: rmt (built-in) or vllm (see the rollout config's engine)."""
    split: str = "eval"
    """Scored split to evaluate: eval (held out from mid-training); posttrain (also never mid-trained on: a
    development set to tune on, keeping eval for the final numbers); or all -- every scored split, for a
    corpus that no stage trained on (e.g. a second corpus to check a result on)."""

    def __post_init__(self):
        check([
            (self.engine in ENGINES, f"engine must be one of {', '.join(ENGINES)}, got '{self.engine}'"),
            (self.split in ("eval", "posttrain", "all"), f"split must be eval, posttrain or all, got '{self.split}'"),
            (self.budget is None or self.budget >= 1, f"budget must be >= 1 or null, got {self.budget}"),
            (self.max_reasoning_tokens >= 1, f"max_reasoning_tokens must be >= 1, got {self.max_reasoning_tokens}"),
            (self.positions >= 1, f"positions must be >= 1, got {self.positions}"),
            (self.answer_tokens >= 1, f"answer_tokens must be >= 1, got {self.answer_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.prompt_style in PROMPT_STYLES, f"prompt_style must be one of {', '.join(PROMPT_STYLES)}"),
        ], prefix="eval")

    @property
    def reasoning_cap(self) -> int:
        return 2 * self.budget if self.budget is not None else self.max_reasoning_tokens


@dataclass(frozen=True)
class EvalConfig(EvalSettings):
    """`rmt eval`: a model, a scored dataset, the modes, and how to evaluate (`EvalSettings`)."""

    model: str = "smollm2-135m-instruct"
    """Checkpoint folder, run folder (its latest checkpoint), hub name or smollm2-135m-instruct."""
    data: str = "runs/scored"
    """An `rmt score` output folder; its eval split is used."""
    modes: list[str] = field(default_factory=lambda: ["ntp", "ntr"])
    """ntp (greedy next token), ntr (reasoning, then the boxed token), or both."""
    out: str = ""
    """JSON output file; empty: RUN/eval.json when `model` is a run folder."""

    def __post_init__(self):
        super().__post_init__()
        check([(bool(self.modes) and not set(self.modes) - set(MODES),
                f"modes must be among {', '.join(MODES)}, got {list(self.modes)}")], prefix="eval")

    def settings(self) -> EvalSettings:
        return EvalSettings(**{f.name: getattr(self, f.name) for f in fields(EvalSettings)})


def _budget(text: str):
    return None if text.lower() in ("none", "null") else int(text)


FLAGS = (
    Flag("--model", "model"), Flag("--data", "data"), Flag("--out", "out"), Flag("--mode", "modes", comma_list),
    Flag("--budget", "budget", _budget), Flag("--max-reasoning", "max_reasoning_tokens", int),
    Flag("--positions", "positions", int), Flag("--seed", "seed", int),
    Flag("--no-force-answer", "force_answer", const=False), Flag("--answer-tokens", "answer_tokens", int),
    Flag("--batch-size", "batch_size", int), Flag("--prompt-style", "prompt_style"), Flag("--split", "split"),
    Flag("--temperature", "temperature", float),
)


@dataclass(frozen=True)
class Position:
    """One evaluated position: target `windows[window].input_ids[t]`, with its proxy entropy."""

    window: int  # index into the split's windows
    t: int
    entropy: float


def position_pool(windows: list[ScoredWindow], floor: float) -> list[Position]:
    """Scored positions with H > floor, in corpus order."""
    pool = []
    for i, w in enumerate(windows):
        scored = ~np.isnan(w.entropy)
        for t in np.flatnonzero(scored & (np.nan_to_num(w.entropy, nan=-np.inf) > floor)):
            pool.append(Position(i, int(t), float(w.entropy[t])))
    return pool


def sample_positions(pool: list[Position], n: int, seed: int) -> list[Position]:
    """The fixed NTR sample: `n` pool positions uniformly without replacement, kept in corpus order."""
    if n >= len(pool):
        return list(pool)
    picked = np.random.default_rng(seed).choice(len(pool), size=n, replace=False)
    return [pool[i] for i in sorted(picked.tolist())]


def split_accuracy(entropy: np.ndarray, correct: np.ndarray, thresholds) -> dict:
    """Accuracy per nested split and their mean ("avg", over splits that hold any position), each with its
    95% bootstrap interval ("ci")."""
    splits = {}
    intervals = split_intervals(entropy, correct, thresholds)
    for name, mask in nested_split_masks(entropy, tuple(thresholds)).items():
        n = int(mask.sum())
        hits = int(correct[mask].sum())
        splits[name] = {"n": n, "correct": hits, "accuracy": hits / n if n else None,
                        "ci": intervals["splits"][name]}
    present = [s["accuracy"] for s in splits.values() if s["accuracy"] is not None]
    return {"splits": splits, "avg": float(np.mean(present)) if present else None, "avg_ci": intervals["avg"]}


def load_all_splits(data) -> tuple[list[ScoredWindow], dict]:
    """The windows of every scored split of `data`, in split order, and its stats."""
    windows, stats = [], None
    for split in read_meta(data)["splits"]:
        part, stats = load_scored(data, split)
        windows += part
    return windows, stats


def _my_batches(order: list, batch_size: int, shard: tuple[int, int]) -> list[list]:
    """This process's batches: `order` cut into batches of `batch_size`, dealt round-robin to the processes.

    Whole batches are dealt, so every batch holds the same items as in a one-process run, and its results
    are the same to the last bit."""
    rank, world = shard
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)][rank::world]


@torch.inference_mode()
def evaluate_ntp(model, tokenizer, windows: list[ScoredWindow], pool: list[Position], batch_size: int,
                 progress: bool = True, shard: tuple[int, int] = (0, 1)) -> dict[int, dict]:
    """Greedy next token at each pool position: one batched forward per group of windows.

    Returns {pool index: record} for the positions of this process's batches (`shard` = (rank, world))."""
    by_window: dict[int, list[int]] = {}
    for k, p in enumerate(pool):
        by_window.setdefault(p.window, []).append(k)
    order = sorted(by_window, key=lambda i: -len(windows[i].input_ids))  # similar lengths pad little
    batches = _my_batches(order, batch_size, shard)
    records: dict[int, dict] = {}
    bar = tqdm(total=sum(len(by_window[i]) for b in batches for i in b), desc="eval ntp", unit="pos",
               disable=not progress, dynamic_ncols=True)
    for chunk in batches:
        logits, _, _ = document_logits(model, [windows[i].input_ids for i in chunk], tokenizer.pad_token_id)
        for row, i in enumerate(chunk):
            w = windows[i]
            # The distribution over x_t is predicted at t - 1.
            predicted = logits[row, [pool[k].t - 1 for k in by_window[i]]].argmax(-1).tolist()
            for k, token in zip(by_window[i], predicted):
                target = int(w.input_ids[pool[k].t])
                records[k] = {**_where(w, pool[k]), "target_id": target, "predicted_id": int(token),
                              "correct": token == target}
        bar.update(sum(len(by_window[i]) for i in chunk))
    bar.close()
    return records


def evaluate_ntr(model, tokenizer, windows: list[ScoredWindow], sample: list[Position], settings: EvalSettings,
                 progress: bool = True, shard: tuple[int, int] = (0, 1)) -> dict[int, dict]:
    """Reasoning, then the boxed prediction, greedily (or sampled at `settings.temperature`), at each sampled
    position.

    Positions of one window share its prompt prefix, encoded once (`RolloutEngine.generate_shared`).
    Returns {sample index: record} for the positions of this process's batches (`shard` = (rank, world))."""
    builder = PromptBuilder(tokenizer, settings.prompt_style, prefill_think=True)
    engine = make_engine(model, tokenizer, RolloutSettings(
        max_reasoning_tokens=settings.reasoning_cap, answer_tokens=settings.answer_tokens,
        temperature=settings.temperature,
        force_answer=settings.force_answer, batch_size=settings.batch_size,
    ), settings.engine)
    exact, prefix = ExactMatch(tokenizer), PrefixMatch(tokenizer)
    pre, post = builder.parts(settings.budget)
    by_window: dict[int, list[int]] = {}
    for k, p in enumerate(sample):
        by_window.setdefault(p.window, []).append(k)
    # Units of whole windows holding about a batch of positions each, dealt to the processes.
    units, current = [], []
    for i in sorted(by_window, key=lambda i: max(sample[k].t for k in by_window[i])):
        current.append(i)
        if sum(len(by_window[j]) for j in current) >= settings.batch_size:
            units.append(current)
            current = []
    units += [current] if current else []
    mine = units[shard[0] :: shard[1]]
    records: dict[int, dict] = {}
    bar = tqdm(total=sum(len(by_window[i]) for u in mine for i in u), desc="eval ntr", unit="pos",
               disable=not progress, dynamic_ncols=True)
    model.eval()
    for unit in mine:
        keys = [k for i in unit for k in by_window[i]]
        prompts = [document_prompts(pre, windows[i].input_ids, [sample[k].t for k in by_window[i]], post) for i in unit]
        seeds = [settings.seed * 1_000_003 + k for k in keys]  # position k's draws, whatever the batching
        for k, r in zip(keys, engine.generate_shared(prompts, 1, seeds)):
            p, w = sample[k], windows[sample[k].window]
            prediction = extract_prediction(r.text)
            task = NextToken(w.input_ids, p.t)
            records[k] = {
                **_where(w, p),
                "target": tokenizer.decode([int(w.input_ids[p.t])]),
                "prediction": prediction,
                "exact": exact.match(prediction, task) == 1.0,
                "prefix": prefix.match(prediction, task) == 1.0,
                "reasoning_len": r.reasoning_len,
                "closed_think": r.closed_think,
                "response": r.text,
            }
        bar.update(len(keys))
    bar.close()
    return records


def _gather_records(records: dict[int, dict], n: int) -> list[dict]:
    """Every process's {index: record}, joined into one list in index order (on every process)."""
    merged = dict(pair for pair in gather_object(list(records.items())))
    if sorted(merged) != list(range(n)):
        raise RuntimeError(f"evaluation lost positions: {n - len(merged)} of {n} missing after gathering")
    return [merged[k] for k in range(n)]


def _where(w: ScoredWindow, p: Position) -> dict:
    return {"doc_id": w.doc_id, "window": w.window, "position": p.t, "entropy": p.entropy}


def evaluate(model: str, data: str | Path, modes=MODES, budget: int | None = 16, positions: int = 128,
             seed: int = 0, progress: bool = True, **options) -> dict:
    """Evaluate `model` (checkpoint, run folder or name) on the eval split of the scored folder `data`.

    `options` are the other `EvalSettings` fields. Returns the JSON-ready result (see `rmt eval --help`).
    """
    modes = tuple(modes)
    if not modes or set(modes) - set(MODES):
        raise RmtError(f"modes must be among {', '.join(MODES)}, got {', '.join(modes) or 'none'}")
    settings = EvalSettings(budget=budget, positions=positions, seed=seed, **options)
    windows, stats = load_all_splits(data) if settings.split == "all" else load_scored(data, settings.split)
    thresholds = [float(t) for t in stats["thresholds"]]
    pool = position_pool(windows, thresholds[0])
    if not pool:
        raise RmtError(f"{data}: the {settings.split} split has no scored position above the floor "
                       f"{thresholds[0]:g} nats")
    sample = sample_positions(pool, settings.positions, settings.seed)

    # Under torchrun / accelerate launch every process evaluates whole batches of its own, and every
    # process ends with all the records; the caller writes the file once (`state.is_main_process`).
    state = PartialState(cpu=not torch.cuda.is_available())
    shard = (state.process_index, state.num_processes)
    progress = progress and state.is_main_process
    checkpoint = assets.resolve_model(str(model))
    tokenizer = assets.load_tokenizer(checkpoint)
    net = assets.load_model(checkpoint, assets.inference_dtype()).eval().to(state.device)

    result = {
        "model": str(model),
        "checkpoint": checkpoint,
        "data": str(data),
        "modes": list(modes),
        "settings": {**asdict(settings), "reasoning_cap": settings.reasoning_cap, "thresholds": thresholds,
                     "pool_size": len(pool), "ntr_positions": len(sample)},
        "results": {},
        "records": {},
    }
    if "ntp" in modes:
        start = time.perf_counter()
        records = evaluate_ntp(net, tokenizer, windows, pool, max(1, settings.batch_size // 4), progress, shard)
        records = _gather_records(records, len(pool))
        entropy = np.array([r["entropy"] for r in records])
        result["results"]["ntp"] = {
            **split_accuracy(entropy, np.array([r["correct"] for r in records]), thresholds),
            "positions": len(records),
            "seconds": time.perf_counter() - start,
        }
        result["records"]["ntp"] = records
    if "ntr" in modes:
        start = time.perf_counter()
        records = evaluate_ntr(net, tokenizer, windows, sample, settings, progress, shard)
        records = _gather_records(records, len(sample))
        entropy = np.array([r["entropy"] for r in records])
        lengths = np.array([r["reasoning_len"] for r in records], dtype=float)
        exact = split_accuracy(entropy, np.array([r["exact"] for r in records]), thresholds)
        prefix = split_accuracy(entropy, np.array([r["prefix"] for r in records]), thresholds)
        for name, mask in nested_split_masks(entropy, tuple(thresholds)).items():
            exact["splits"][name]["reasoning_len_mean"] = float(lengths[mask].mean()) if mask.any() else None
        # The same positions in greedy NTP mode, for the ratio NTR / NTP on identical positions.
        ntp_here = None
        if "ntp" in modes:
            by_where = {(r["doc_id"], r["window"], r["position"]): r["correct"] for r in result["records"]["ntp"]}
            ntp_here = split_accuracy(
                entropy, np.array([by_where[(r["doc_id"], r["window"], r["position"])] for r in records]), thresholds)
        result["results"]["ntr"] = {
            **exact,  # the headline: RMT's exact match
            "prefix": prefix,
            "ntp_same_positions": ntp_here,
            "reasoning_len_mean": float(lengths.mean()),
            "reasoning_len_ci": mean_interval(lengths),
            "well_formed_frac": float(np.mean([r["closed_think"] for r in records])),
            "answered_frac": float(np.mean([r["prediction"] is not None for r in records])),
            "positions": len(records),
            "seconds": time.perf_counter() - start,
        }
        result["records"]["ntr"] = records
    return result


def _pct(value) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def pct_ci(value, ci) -> str:
    """`29.0 [25.1, 33.0]`: an accuracy in % with its 95% interval."""
    if value is None:
        return "—"
    if not ci or ci[0] is None:
        return _pct(value)
    return f"{100 * value:.1f} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def format_table(result: dict) -> str:
    """The accuracies as a readable table (percent with 95% intervals, n per split)."""
    rows = []
    for mode, metric, block in (
        ("ntp", "greedy", result["results"].get("ntp")),
        ("ntr", "exact", result["results"].get("ntr")),
        ("ntr", "prefix", (result["results"].get("ntr") or {}).get("prefix")),
    ):
        if block:
            cells = [f"{pct_ci(s['accuracy'], s.get('ci'))} (n={s['n']})" for s in block["splits"].values()]
            rows.append([mode, metric, *cells, pct_ci(block["avg"], block.get("avg_ci"))])
    header = ["mode", "match", *(f"{n} H>{t:g}" for n, t in zip(BAND_NAMES, result["settings"]["thresholds"])), "avg"]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in [header, *rows]]
    lines.append("accuracy in % [95% bootstrap interval over positions]")
    ntr = result["results"].get("ntr")
    if ntr:
        s = result["settings"]
        budget = f"budget {s['budget']}" if s["budget"] is not None else "no budget"
        lines.append(
            f"ntr: {ntr['positions']} positions ({budget}, cap {s['reasoning_cap']} tokens, seed {s['seed']}), "
            f"mean reasoning length {ntr['reasoning_len_mean']:.1f} tokens, "
            f"closed </think> itself {100 * ntr['well_formed_frac']:.0f}%, answered {100 * ntr['answered_frac']:.0f}%"
        )
    return "\n".join(lines)


def load_eval(path: str | Path) -> dict:
    return read_json(Path(path), "rmt eval result")


def save_eval(result: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, result)


def output_path(config: EvalConfig) -> Path:
    """Where `rmt eval` writes: `out`, or RUN/eval.json for a run folder; checked before any work."""
    if config.out:
        out = Path(config.out)
    elif (Path(config.model) / "checkpoints").is_dir():
        out = Path(config.model) / EVAL_FILE
    else:
        raise RmtError("out is required unless model is a run folder (then it defaults to RUN/eval.json)")
    if out.is_dir():
        raise RmtError(f"{out} is a folder; out must be a JSON file path")
    if not out.parent.is_dir() and out.parent.exists():
        raise RmtError(f"{out.parent} is a file; cannot write {out} inside it")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, EvalConfig, FLAGS)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args, EvalConfig, FLAGS)
    out = output_path(config)
    result = evaluate(config.model, config.data, config.modes, progress=True, **{
        k: v for k, v in asdict(config.settings()).items()})
    if PartialState().is_main_process:
        save_eval(result, out)
        print(format_table(result))
        print(f"wrote {out}")
    return 0
