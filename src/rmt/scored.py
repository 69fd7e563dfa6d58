"""The scored dataset that `rmt score` writes and every later stage reads (SPEC §2).

A scored folder holds:

- ``meta.json``  -- model, corpus and options of the run; written first.
- ``<split>/shard-00000.parquet`` ... -- one row per window of a document, with the columns of
  `SHARD_SCHEMA`. A shard is written under a temporary name and renamed, so a shard that exists is whole.
- ``stats.json`` -- per-split counts, entropy quantiles and the band thresholds actually used; written
  last, so its presence marks the dataset complete.
- ``entropy_hist.png`` -- the entropy histogram per split with the thresholds.

Window ``w`` of a document covers document tokens ``[start, start + len(input_ids))``. Window-relative
position ``t`` is the target ``input_ids[t]``, predicted from ``input_ids[:t]``. A window *owns* the
positions ``t >= owned_from``; every document position ``>= 1`` is owned by exactly one window, so NTP
training on owned positions sees each token once. ``entropy[t]`` is NaN and ``band[t]`` is NO_RL (0)
where ``t`` was not scored (not owned, or fewer than ``min_context`` tokens before it in the window).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rmt.errors import RmtError
from rmt.io import read_json

FORMAT = 1
META_FILE = "meta.json"
STATS_FILE = "stats.json"
HIST_FILE = "entropy_hist.png"
SHARD_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("window", pa.int32()),
        ("start", pa.int32()),
        ("owned_from", pa.int32()),
        ("input_ids", pa.list_(pa.int32())),
        ("entropy", pa.list_(pa.float32())),
        ("band", pa.list_(pa.int8())),
    ]
)


@dataclass
class ScoredWindow:
    """One window of a document with the proxy entropy and difficulty band of each position."""

    doc_id: str
    window: int  # index of the window within its document
    start: int  # document offset of input_ids[0]
    owned_from: int  # first window-relative position this window owns (>= 1)
    input_ids: np.ndarray  # int64 [n]
    entropy: np.ndarray  # float32 [n], NaN where not scored
    band: np.ndarray  # int8 [n], NO_RL where not scored


def shard_path(folder: str | Path, split: str, index: int) -> Path:
    return Path(folder) / split / f"shard-{index:05d}.parquet"


def write_shard(path: Path, windows: list[ScoredWindow]) -> None:
    """Write windows as one Parquet shard, under a temporary name first so a partial shard never looks whole."""
    table = pa.table(
        {
            "doc_id": [w.doc_id for w in windows],
            "window": [w.window for w in windows],
            "start": [w.start for w in windows],
            "owned_from": [w.owned_from for w in windows],
            "input_ids": [w.input_ids.astype(np.int32) for w in windows],
            "entropy": [w.entropy.astype(np.float32) for w in windows],
            "band": [w.band.astype(np.int8) for w in windows],
        },
        schema=SHARD_SCHEMA,
    )
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def read_shard(path: Path) -> list[ScoredWindow]:
    try:
        table = pq.read_table(path, schema=SHARD_SCHEMA)
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise RmtError(f"{path}: cannot read as a scored shard ({exc}); re-run rmt score into a new --out") from exc
    ids = _list_column(table.column("input_ids"), np.int64)
    entropy = _list_column(table.column("entropy"), np.float32)
    band = _list_column(table.column("band"), np.int8)
    scalars = zip(*(table.column(name).to_pylist() for name in ("doc_id", "window", "start", "owned_from")))
    return [
        ScoredWindow(doc_id, window, start, owned_from, ids[i], entropy[i], band[i])
        for i, (doc_id, window, start, owned_from) in enumerate(scalars)
    ]


def _list_column(column: pa.ChunkedArray, dtype) -> list[np.ndarray]:
    """A list<...> column as one NumPy array per row (views into one flat array)."""
    if len(column) == 0:
        return []
    lists = column.combine_chunks()
    lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False)
    flat = pc.list_flatten(lists).to_numpy(zero_copy_only=False).astype(dtype)
    return np.split(flat, np.cumsum(lengths)[:-1])


def read_meta(path: str | Path) -> dict:
    """The ``meta.json`` of a scored folder (model, corpus, options, splits)."""
    meta_path = Path(path) / META_FILE
    if not meta_path.is_file():
        raise RmtError(f"{path}: not an `rmt score` output (no {META_FILE}); run `rmt score --out {path}` first")
    return read_json(meta_path, "scored-data meta.json")


def load_scored(path: str | Path, split: str) -> tuple[list[ScoredWindow], dict]:
    """All windows of one split of a complete scored folder, in corpus order, and its ``stats.json``."""
    path = Path(path)
    meta = read_meta(path)
    if meta.get("format") != FORMAT:
        raise RmtError(f"{path}: scored-data format {meta.get('format')}, this rmt reads {FORMAT}; re-run rmt score")
    stats_path = path / STATS_FILE
    if not stats_path.is_file():
        raise RmtError(
            f"{path}: incomplete, re-run rmt score with the same options to finish it "
            f"(model {meta['model']}, corpus {meta['corpus']}; it resumes where it stopped)"
        )
    stats = read_json(stats_path, "scored-data stats.json")
    if split not in stats["splits"]:
        raise RmtError(
            f"{path}: has no split '{split}' (scored splits: {', '.join(stats['splits'])}); "
            f"score it with `rmt score --splits {split}` into another --out"
        )
    shards = sorted((path / split).glob("shard-*.parquet"))
    expected = stats["splits"][split]["shards"]
    if len(shards) != expected:
        raise RmtError(f"{path / split}: {len(shards)} shards on disk but stats.json lists {expected}; it was altered")
    return [w for shard in shards for w in read_shard(shard)], stats


def ntp_target_mask(window: ScoredWindow, rl_positions=()) -> np.ndarray:
    """NTP targets of a window (SPEC §7): the positions it owns (≥ 1), minus the RL positions C."""
    mask = np.zeros(len(window.input_ids), dtype=bool)
    mask[max(1, window.owned_from) :] = True
    mask[np.asarray(rl_positions, dtype=np.int64)] = False
    return mask
