"""Files every stage writes or reads: atomic writes, JSON that fails with the file's name, and the
append-only `metrics.jsonl` log of a run.

A file is written under a temporary name in its own folder and renamed into place, so a reader (or a
crash) sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from rmt.errors import RmtError


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json_atomic(path: Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def read_json(path: Path, what: str = "JSON file"):
    """The JSON in `path`; a missing, unreadable or corrupt file is one RmtError naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise RmtError(f"{path}: missing ({what})") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RmtError(f"{path}: cannot read it as a {what} ({exc}); the file is damaged") from exc


class MetricsLog:
    """A run's `metrics.jsonl`: one JSON record per step, appended and flushed as each step ends.

    On resume, `truncate(step)` keeps the records up to the checkpoint's step (the later ones are recomputed
    identically) and drops a last line torn by a crash, with a warning; it rewrites the file atomically."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def records(self) -> list[dict]:
        if not self.path.is_file():
            return []
        lines = self.path.read_text(encoding="utf-8").splitlines()
        out = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as exc:
                if i == len(lines) - 1:  # a crash mid-write tears the last line only
                    print(f"warning: {self.path}: dropped a torn last line")
                    break
                raise RmtError(f"{self.path}:{i + 1}: not a JSON record ({exc.msg}); the log is damaged") from exc
        return out

    def truncate(self, step: int) -> None:
        kept = [r for r in self.records() if r["step"] <= step]
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def append(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
