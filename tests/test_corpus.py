import json

import pytest

from rmt.corpus import SPLITS, document_split, load_corpus, split_corpus
from rmt.errors import RmtError


def test_gsm8k_loads_all_problems_without_calculator_annotations():
    docs = load_corpus("gsm8k")
    assert len(docs) == 1319
    assert not any("<<" in d.text for d in docs)
    first = docs[0]
    assert first.text.startswith("Janet’s ducks lay 16 eggs per day.")
    assert "16 - 3 - 4 = 9 duck eggs" in first.text
    assert first.meta["answer"] == "18"


def test_splits_are_disjoint_deterministic_and_cover_the_corpus():
    docs = load_corpus("gsm8k")
    parts = {s: split_corpus(docs, s) for s in SPLITS}
    texts = {s: {d.text for d in part} for s, part in parts.items()}
    assert sum(len(p) for p in parts.values()) == len(docs)
    assert not texts["midtrain"] & texts["eval"]
    assert not texts["midtrain"] & texts["posttrain"]
    assert not texts["eval"] & texts["posttrain"]
    # Roughly 80/10/10, and a document's split depends only on its text.
    assert 0.7 < len(parts["midtrain"]) / len(docs) < 0.9
    assert document_split("some text") == document_split("some text")
    assert [d.text for d in split_corpus(list(reversed(docs)), "eval")] == [d.text for d in reversed(parts["eval"])]


def test_local_files_and_folders(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "first doc"}) + "\n\n" + json.dumps({"text": "second"}) + "\n")
    (tmp_path / "b.txt").write_text("a plain text document", encoding="utf-8")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["from parquet"]}), tmp_path / "c.parquet")
    assert [d.text for d in load_corpus(str(tmp_path / "a.jsonl"))] == ["first doc", "second"]
    assert sorted(d.text for d in load_corpus(str(tmp_path))) == sorted(
        ["first doc", "second", "a plain text document", "from parquet"]
    )


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty"),
        (b"\n  \n", "is empty"),
        (b'{"text": "ok"}\n{not json}\n', "invalid JSON"),
        (b'["a list"]\n', "expected a JSON object"),
        (b'{"title": "no text field"}\n', "none of the fields"),
        (b'{"text": "caf\xe9"}\n', "not valid UTF-8"),
    ],
)
def test_bad_files_give_one_clear_error(tmp_path, content, message):
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(content)
    with pytest.raises(RmtError, match=message):
        load_corpus(str(path))


def test_missing_path_and_unknown_type(tmp_path):
    with pytest.raises(RmtError, match="does not exist"):
        load_corpus(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(RmtError, match="unsupported file type"):
        load_corpus(str(tmp_path / "x.csv"))
    with pytest.raises(RmtError, match="unknown split"):
        split_corpus([], "train")
