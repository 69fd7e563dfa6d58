"""`rmt score`: the proxy model's entropy at every token of a corpus, and its difficulty band (SPEC §2).

Each document is tokenized once and cut into windows of ``max_length`` tokens starting every ``stride``
tokens. A document position belongs to (is *owned* by) the first window that reaches it: window 0 owns
window-relative positions ``>= 1``; window ``k >= 1`` owns ``>= max_length - stride``, where the previous
window ended. Requiring ``max_length - stride >= min_context`` makes this the same as "the first window
that holds the position with at least ``min_context`` tokens before it", so every document position
``>= min_context`` is scored exactly once, always with at least ``min_context`` tokens of context.

Shards are scored in batches of windows sorted by length (right padding, no grad) and written as they are
done; a re-run skips shards already on disk, which is how a killed run resumes. In quantile mode the band
thresholds come from the first split's entropies, so that split's shards are held until it is all scored.
The folder layout is defined in `rmt.scored`.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm import tqdm

from rmt.assets import EMBEDDED_MODEL, inference_dtype, load_model, load_tokenizer
from rmt.corpus import EMBEDDED_CORPUS, SPLITS, Document, load_corpus, split_corpus
from rmt.difficulty import BAND_NAMES, NO_RL, assign_bands, quantile_thresholds, token_entropy
from rmt.config import Flag, add_config_arguments, comma_list, config_from_args
from rmt.errors import RmtError
from rmt.io import read_json, write_json_atomic
from rmt.scored import FORMAT, HIST_FILE, META_FILE, STATS_FILE, ScoredWindow, read_shard, shard_path, write_shard

BAND_KEYS = ("below_floor", *BAND_NAMES)  # stats.json names of bands NO_RL, EASY, MEDIUM, HARD
QUANTILES = (10, 25, 50, 75, 90, 99)


@dataclass(frozen=True)
class ScoreOptions:
    """What `rmt score` computes; all but ``batch_size`` are saved in ``meta.json`` and must match on resume."""

    top_k: int = 16
    """Entropy over the top-k logits renormalised, as RPT (SPEC §2); 0 = the full vocabulary."""
    max_length: int = 512
    """Tokens per window."""
    stride: int | None = None
    """Offset between window starts; windows overlap by ``max_length - stride`` tokens.
    None: ``max_length - max(min_context, max_length // 8)`` (448 for 512-token windows)."""
    min_context: int = 16
    """A position is scored only with at least this many tokens before it in its window."""
    thresholds: tuple[float, float, float] = (0.5, 1.0, 1.5)
    """Band thresholds in nats (RPT's); in quantile mode only the first (the floor) is used."""
    band_mode: str = "fixed"
    """``fixed``: the thresholds as given; ``quantile``: equal-count bands above the floor, from the first split."""
    max_docs: int | None = None
    """Score only the first N documents of each split (corpus order), for quick runs."""
    docs_per_shard: int = 64
    """Documents per Parquet shard: the unit of resumption."""
    batch_size: int = 8
    """Windows per forward pass: sets speed and memory; entropies change only by float rounding."""

    def __post_init__(self) -> None:
        if self.stride is None:  # frozen: set the derived default once, before the checks
            object.__setattr__(self, "stride", self.max_length - max(self.min_context, self.max_length // 8))
        checks = [
            (self.top_k >= 0, f"--top-k must be >= 0 (0 = full vocabulary), got {self.top_k}"),
            (self.min_context >= 1, f"--min-context must be >= 1, got {self.min_context}"),
            (self.max_length > self.min_context, f"--max-length must exceed --min-context ({self.min_context})"),
            (
                1 <= self.stride <= self.max_length - self.min_context,
                f"--stride must be in [1, max_length - min_context] = [1, {self.max_length - self.min_context}] "
                f"so that overlapping windows give every position {self.min_context} tokens of context; "
                f"got {self.stride}",
            ),
            (len(self.thresholds) == 3, f"--thresholds needs 3 values, got {len(self.thresholds)}"),
            (list(self.thresholds) == sorted(self.thresholds), f"--thresholds must be increasing: {self.thresholds}"),
            (self.band_mode in ("fixed", "quantile"), f"--band-mode must be fixed or quantile, not {self.band_mode}"),
            (self.max_docs is None or self.max_docs >= 1, f"--max-docs must be >= 1, got {self.max_docs}"),
            (self.docs_per_shard >= 1, f"--docs-per-shard must be >= 1, got {self.docs_per_shard}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
        ]
        for ok, message in checks:
            if not ok:
                raise RmtError(message)

    def meta(self) -> dict:
        """What the scores depend on: every option but `batch_size` (and none of a subclass's fields)."""
        options = {f.name: getattr(self, f.name) for f in fields(ScoreOptions) if f.name != "batch_size"}
        options["thresholds"] = list(self.thresholds)
        return options


@dataclass(frozen=True)
class ScoreConfig(ScoreOptions):
    """`rmt score`: a proxy model, a corpus, an output folder, the splits, and the options."""

    model: str = EMBEDDED_MODEL
    """Proxy model: hub name, model folder, run folder or smollm2-135m-instruct (SPEC §2: the policy itself)."""
    corpus: str = EMBEDDED_CORPUS
    """gsm8k, a .jsonl / .parquet / .txt file, a folder of those, or a hub dataset name."""
    out: str = "runs/scored"
    """Output folder; re-run the same command to resume."""
    splits: list[str] = field(default_factory=lambda: ["midtrain", "eval"])
    """Splits to score: midtrain, eval, posttrain, or all."""

    def __post_init__(self):
        super().__post_init__()
        splits = list(self.splits)
        if not splits or set(splits) - {*SPLITS, "all"} or len(set(splits)) != len(splits):
            raise RmtError(f"splits must list distinct splits among {', '.join(SPLITS)} (or all), got {splits}")


@dataclass
class Window:
    """A slice of one tokenized document, before scoring."""

    doc_id: str
    window: int
    start: int
    owned_from: int
    input_ids: np.ndarray  # int64

    @property
    def tokens(self) -> int:
        return len(self.input_ids)


@dataclass
class SplitPlan:
    """The windows of one split, grouped into shards."""

    shards: list[list[Window]]
    documents: int  # documents kept (long enough to have a scored position)
    skipped: int  # documents with at most min_context tokens
    tokens: int  # tokens of the kept documents, each counted once


def window_spans(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """``(start, end, owned_from)`` of each window of an ``n_tokens`` document; see the module docstring."""
    spans = [(0, min(n_tokens, max_length), 1)]
    while spans[-1][0] + max_length < n_tokens:
        start = spans[-1][0] + stride
        spans.append((start, min(n_tokens, start + max_length), max_length - stride))
    return spans


def plan_split(docs: list[Document], tokenizer, options: ScoreOptions) -> SplitPlan:
    docs = docs[: options.max_docs]
    encoded = tokenizer([d.text for d in docs], add_special_tokens=False)["input_ids"] if docs else []
    kept = [(doc, ids) for doc, ids in zip(docs, encoded) if len(ids) > options.min_context]
    shards = []
    for first in range(0, len(kept), options.docs_per_shard):
        shard = []
        for doc, ids in kept[first : first + options.docs_per_shard]:
            ids = np.asarray(ids, dtype=np.int64)
            spans = window_spans(len(ids), options.max_length, options.stride)
            shard += [Window(doc.id, k, start, owned, ids[start:end]) for k, (start, end, owned) in enumerate(spans)]
        shards.append(shard)
    return SplitPlan(shards, len(kept), len(docs) - len(kept), sum(len(ids) for _, ids in kept))


def batch_order(windows: list[Window], batch_size: int) -> list[list[int]]:
    """Indices of windows per forward pass: longest first, so each batch pads little."""
    order = sorted(range(len(windows)), key=lambda i: -windows[i].tokens)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def pad_batch(windows: list[Window], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` for one forward pass."""
    length = max(w.tokens for w in windows)
    input_ids = torch.full((len(windows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(windows), length), dtype=torch.long)
    for row, w in enumerate(windows):
        input_ids[row, : w.tokens] = torch.from_numpy(w.input_ids)
        attention_mask[row, : w.tokens] = 1
    return input_ids.to(device), attention_mask.to(device)


def window_entropy(logits: torch.Tensor, window: Window, options: ScoreOptions) -> np.ndarray:
    """Entropy at each window position from its ``[n, V]`` logits; NaN where the position is not scored."""
    entropy = np.full(window.tokens, np.nan, dtype=np.float32)
    first = max(window.owned_from, options.min_context)
    if first < window.tokens:
        # The distribution over target x_t is the one predicted at t - 1.
        scored = token_entropy(logits[first - 1 : window.tokens - 1], options.top_k or None)
        entropy[first:] = scored.float().cpu().numpy()
    return entropy


@torch.inference_mode()
def score_windows(model, windows: list[Window], options: ScoreOptions, pad_id: int, progress=None):
    """Entropy arrays of ``windows``, in their order, from batched forward passes of ``model``."""
    device = next(model.parameters()).device
    entropies: list[np.ndarray | None] = [None] * len(windows)
    for batch in batch_order(windows, options.batch_size):
        input_ids, attention_mask = pad_batch([windows[i] for i in batch], pad_id, device)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        for row, i in enumerate(batch):
            entropies[i] = window_entropy(logits[row], windows[i], options)
        if progress is not None:
            progress.update(sum(windows[i].tokens for i in batch))
    return entropies


def band_of(entropy: np.ndarray, thresholds: tuple[float, float, float]) -> np.ndarray:
    """Band of each position; unscored (NaN) positions are NO_RL."""
    bands = assign_bands(np.nan_to_num(entropy, nan=-np.inf), thresholds)
    return np.where(np.isnan(entropy), NO_RL, bands).astype(np.int8)


def scored_windows(windows: list[Window], entropies: list[np.ndarray], thresholds) -> list[ScoredWindow]:
    return [
        ScoredWindow(w.doc_id, w.window, w.start, w.owned_from, w.input_ids, e, band_of(e, thresholds))
        for w, e in zip(windows, entropies)
    ]


def stored_entropies(path: Path, windows: list[Window]) -> list[np.ndarray]:
    """Entropies of a shard already on disk, after checking it holds exactly these windows."""
    stored = read_shard(path)
    same = len(stored) == len(windows) and all(
        (s.doc_id, s.window, s.start, s.owned_from) == (w.doc_id, w.window, w.start, w.owned_from)
        and np.array_equal(s.input_ids, w.input_ids)
        for s, w in zip(stored, windows)
    )
    if not same:
        raise RmtError(
            f"{path} holds other windows than the corpus and tokenizer give now (did the corpus change?); "
            "choose another --out"
        )
    return [s.entropy for s in stored]


def check_existing(out: Path, meta: dict) -> None:
    """Refuse to mix runs: an existing folder must come from the same model, corpus and options."""
    if (out / META_FILE).is_file():
        old = read_json(out / META_FILE, "scored-data meta.json")
        flat_old = {**{k: v for k, v in old.items() if k != "options"}, **old.get("options", {})}
        flat_new = {**{k: v for k, v in meta.items() if k != "options"}, **meta["options"]}
        for key in flat_new:
            if flat_old.get(key) != flat_new[key]:
                raise RmtError(
                    f"{out} was scored with {key}={flat_old.get(key)!r}, not {flat_new[key]!r}; "
                    "choose another --out (or delete that folder)"
                )
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RmtError(f"{out} exists and is not an rmt score output; choose another --out")


def split_stats(plan: SplitPlan, entropy: np.ndarray, thresholds) -> dict:
    counts = np.bincount(assign_bands(entropy, thresholds), minlength=len(BAND_KEYS))
    quantiles = np.percentile(entropy, QUANTILES) if entropy.size else [None] * len(QUANTILES)
    return {
        "documents": plan.documents,
        "skipped_documents": plan.skipped,
        "windows": sum(len(shard) for shard in plan.shards),
        "tokens": plan.tokens,
        "scored_positions": int(entropy.size),
        "bands": {key: int(n) for key, n in zip(BAND_KEYS, counts)},
        "entropy_quantiles": {f"p{q}": None if v is None else float(v) for q, v in zip(QUANTILES, quantiles)},
        "shards": len(plan.shards),
    }


def plot_histogram(path: Path, entropies: dict[str, np.ndarray], thresholds, title: str) -> None:
    """Entropy histogram per split with the band thresholds, written atomically."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    every = np.concatenate(list(entropies.values()))
    bins = np.linspace(0.0, max(float(every.max()), thresholds[-1]) * 1.02, 61)
    for split, values in entropies.items():
        if values.size:
            ax.hist(values, bins, density=True, histtype="step", linewidth=1.5, label=f"{split} ({values.size:,})")
    for threshold, name in zip(thresholds, BAND_NAMES):
        ax.axvline(threshold, color="0.3", linestyle="--", linewidth=1)
        label = f" {name} ≥ {threshold:.2f}"
        ax.text(threshold, 0.98, label, rotation=90, va="top", ha="right", transform=ax.get_xaxis_transform())
    ax.set_title(title)
    ax.set_xlabel("entropy of the next-token distribution (nats)")
    ax.set_ylabel("density (scored positions)")
    ax.legend(title="split (scored positions)", loc="upper right")
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=120)
    os.replace(tmp, path)


@dataclass
class ScoreReport:
    stats: dict
    scored_tokens: int  # window tokens run through the model in this run (shards already on disk excluded)
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.scored_tokens / self.seconds if self.seconds > 0 else 0.0


def load_proxy(model_name: str, options: ScoreOptions, device):
    model = load_model(model_name, inference_dtype()).eval().to(device)
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions and options.max_length > max_positions:
        raise RmtError(f"--max-length {options.max_length} exceeds the model's {max_positions} positions")
    return model


def score_dataset(model_name: str, corpus_spec: str, out: str | Path, splits: list[str], options: ScoreOptions):
    """Score ``splits`` of a corpus into ``out`` (layout in `rmt.scored`), resuming what is already there."""
    out = Path(out)
    meta = {"format": FORMAT, "model": model_name, "corpus": corpus_spec, "options": options.meta(), "splits": splits}
    check_existing(out, meta)
    docs = load_corpus(corpus_spec)
    tokenizer = load_tokenizer(model_name)
    plans = {split: plan_split(split_corpus(docs, split), tokenizer, options) for split in splits}
    for split, plan in plans.items():
        if plan.skipped:
            print(f"{split}: skipped {plan.skipped} document(s) of at most --min-context={options.min_context} tokens")
    if not any(plan.documents for plan in plans.values()):
        raise RmtError(
            f"corpus '{corpus_spec}' has no document longer than --min-context={options.min_context} tokens in "
            f"split(s) {', '.join(splits)}: nothing to score; lower --min-context or give longer documents"
        )
    shards = [(split, i) for split in splits for i in range(len(plans[split].shards))]
    todo = {(split, i) for split, i in shards if not shard_path(out, split, i).is_file()}
    # Under torchrun / accelerate launch each process scores every world-th shard; one process alone
    # scores them all. Shards are the same files either way.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    mine = [shard for k, shard in enumerate(shards) if k % world == rank]
    model = load_proxy(model_name, options, accelerator.device) if todo & set(mine) else None

    if main:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / META_FILE, meta)
        if todo:
            (out / STATS_FILE).unlink(missing_ok=True)  # the folder is incomplete until stats.json is rewritten
        for split in splits:
            (out / split).mkdir(exist_ok=True)
    accelerator.wait_for_everyone()
    total = sum(w.tokens for split, i in todo & set(mine) for w in plans[split].shards[i])

    quantile = options.band_mode == "quantile"
    held: list[tuple[Path, list[Window], list[np.ndarray]]] = []  # scored, waiting for quantile thresholds
    first_split: list[np.ndarray] = []  # this process's entropies of the first split, for quantile thresholds
    start = time.perf_counter()
    with tqdm(total=total, unit="tok", unit_scale=True, desc="scoring", disable=not (total and main)) as progress:
        for split, index in mine:
            progress.set_description(f"scoring {split}")
            path, windows = shard_path(out, split, index), plans[split].shards[index]
            if (split, index) not in todo:
                shard_entropies = stored_entropies(path, windows)
            else:
                shard_entropies = score_windows(model, windows, options, tokenizer.pad_token_id, progress)
                if quantile:
                    held.append((path, windows, shard_entropies))
                else:
                    write_shard(path, scored_windows(windows, shard_entropies, options.thresholds))
            if split == splits[0]:
                first_split.extend(e[~np.isnan(e)] for e in shard_entropies)
    seconds = time.perf_counter() - start

    thresholds = options.thresholds
    if quantile:
        gathered = gather_object([np.concatenate(first_split)] if first_split else []) if world > 1 else first_split
        pooled = np.concatenate(gathered) if gathered else np.zeros(0, dtype=np.float32)
        try:
            thresholds = quantile_thresholds(pooled, floor=options.thresholds[0])
        except ValueError as exc:
            raise RmtError(f"quantile thresholds from split '{splits[0]}': {exc}") from exc
        for path, windows, shard_entropies in held:
            write_shard(path, scored_windows(windows, shard_entropies, thresholds))
    accelerator.wait_for_everyone()
    scored_tokens = int(accelerator.reduce(torch.tensor(total, device=accelerator.device), "sum")) if world > 1 else total
    if not main:
        return ScoreReport({}, scored_tokens, seconds)

    # Statistics from the shards as written, so they are the same however many processes scored them.
    entropies = {}
    for split in splits:
        stored = [e for i in range(len(plans[split].shards)) for e in stored_entropies(shard_path(out, split, i), plans[split].shards[i])]
        entropies[split] = np.concatenate([e[~np.isnan(e)] for e in stored]) if stored else np.zeros(0, np.float32)
    stats = {
        "format": FORMAT,
        "band_mode": options.band_mode,
        "thresholds": [float(t) for t in thresholds],
        "splits": {split: split_stats(plans[split], entropies[split], thresholds) for split in splits},
    }
    vocabulary = f"top-{options.top_k}" if options.top_k else "full vocabulary"
    bands = "fixed bands" if options.band_mode == "fixed" else f"quantile bands from {splits[0]}"
    title = f"Next-token entropy: {Path(model_name).name}, {vocabulary}, {bands}"
    plot_histogram(out / HIST_FILE, entropies, thresholds, title)
    write_json_atomic(out / STATS_FILE, stats)  # last: marks the folder complete
    return ScoreReport(stats, scored_tokens, seconds)


def print_report(report: ScoreReport, out: Path) -> None:
    header = ["split", "docs", "windows", "tokens", "scored", *BAND_KEYS]
    rows = [
        [split, s["documents"], s["windows"], s["tokens"], s["scored_positions"], *s["bands"].values()]
        for split, s in report.stats["splits"].items()
    ]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = [str(row[0]).ljust(widths[0])] + [str(cell).rjust(w) for cell, w in zip(row[1:], widths[1:])]
        print("  ".join(cells))
    thresholds = ", ".join(f"{t:.3f}" for t in report.stats["thresholds"])
    print(f"thresholds ({report.stats['band_mode']}): {thresholds} nats")
    if report.scored_tokens:
        print(f"scored {report.scored_tokens:,} tokens in {report.seconds:.1f} s: {report.tokens_per_s:,.0f} tokens/s")
    else:
        print("all shards were already scored")
    print(f"wrote {out}")


FLAGS = (
    Flag("--model", "model"), Flag("--corpus", "corpus"), Flag("--out", "out"), Flag("--splits", "splits", comma_list),
    Flag("--top-k", "top_k", int), Flag("--max-length", "max_length", int), Flag("--stride", "stride", int),
    Flag("--min-context", "min_context", int), Flag("--batch-size", "batch_size", int),
    Flag("--max-docs", "max_docs", int), Flag("--thresholds", "thresholds", lambda t: [float(v) for v in comma_list(t)]),
    Flag("--band-mode", "band_mode"), Flag("--docs-per-shard", "docs_per_shard", int),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, ScoreConfig, FLAGS)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args, ScoreConfig, FLAGS)
    splits = list(SPLITS) if "all" in config.splits else list(config.splits)
    report = score_dataset(config.model, config.corpus, Path(config.out), splits, config)
    if report.stats:  # the main process reports for all
        print_report(report, Path(config.out))
    return 0
