import json

import numpy as np
import pytest
import torch

from rmt.assets import load_model, load_tokenizer
from rmt.cli import main
from rmt.difficulty import assign_bands, quantile_thresholds, token_entropy
from rmt.errors import RmtError
from rmt.score import ScoreOptions, score_dataset, window_spans
from rmt.scored import STATS_FILE, load_scored, read_meta

# Small windows so that a few sentences already span several overlapping windows.
SMALL = dict(max_length=64, stride=40, min_context=16, docs_per_shard=3, batch_size=4)


def write_corpus(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return str(path)


def sentences(i: int, n: int) -> str:
    return " ".join(f"Ana has {i + k} coins and buys {3 * k + 1} more books." for k in range(n))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Documents from one to about 300 tokens: short ones fit one window, long ones need several."""
    texts = ["Tom buys 3 eggs."] + [sentences(i, 2 + i % 20) for i in range(12)]
    return write_corpus(tmp_path_factory.mktemp("corpus") / "docs.jsonl", texts)


def folder_bytes(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("n_tokens", [2, 17, 64, 65, 104, 105, 300])
def test_windows_own_every_position_once_and_score_it_with_enough_context(n_tokens):
    options = ScoreOptions(**SMALL)
    owned, scored = [], []
    for start, end, owned_from in window_spans(n_tokens, options.max_length, options.stride):
        assert end - start <= options.max_length and end <= n_tokens
        owned += [start + t for t in range(owned_from, end - start)]
        scored += [start + t for t in range(max(owned_from, options.min_context), end - start)]
    assert owned == list(range(1, n_tokens))
    assert scored == list(range(options.min_context, n_tokens))


def test_stride_that_leaves_too_little_context_is_refused():
    with pytest.raises(RmtError, match="--stride"):
        ScoreOptions(max_length=64, stride=50, min_context=16)


def test_default_stride_follows_the_window_length():
    assert ScoreOptions().stride == 512 - 64
    assert ScoreOptions(max_length=128).stride == 128 - 16  # `rmt score --max-length 128` alone works
    assert ScoreOptions(max_length=64, min_context=24).stride == 64 - 24
    assert ScoreOptions(max_length=128).meta()["stride"] == 112  # the resolved value is what resume checks


@pytest.mark.parametrize("top_k, band_mode", [(16, "quantile"), (0, "fixed")])
def test_entropies_match_a_direct_forward_and_bands_match_the_thresholds(
    tiny_model_dir, corpus, tmp_path, top_k, band_mode
):
    options = ScoreOptions(top_k=top_k, band_mode=band_mode, **SMALL)
    score_dataset(str(tiny_model_dir), corpus, tmp_path, ["all"], options)
    windows, stats = load_scored(tmp_path, "all")
    thresholds = tuple(stats["thresholds"])
    entropy = np.concatenate([w.entropy for w in windows])
    scored = entropy[~np.isnan(entropy)]
    if band_mode == "quantile":
        assert thresholds == quantile_thresholds(scored, floor=0.5)
        assert thresholds[1] > 0.5
    else:
        assert thresholds == (0.5, 1.0, 1.5)
    assert stats["splits"]["all"]["scored_positions"] == scored.size
    assert sum(stats["splits"]["all"]["bands"].values()) == scored.size

    model = load_model(str(tiny_model_dir)).eval()
    assert any(w.window > 0 for w in windows)
    for w in [windows[0], *[w for w in windows if w.window > 0][:2], windows[-1]]:
        with torch.no_grad():
            logits = model(torch.from_numpy(w.input_ids)[None]).logits[0]
        first = max(w.owned_from, options.min_context)
        assert np.isnan(w.entropy[:first]).all() and (w.band[:first] == 0).all()
        for t in [first, (first + len(w.input_ids)) // 2, len(w.input_ids) - 1]:
            direct = token_entropy(logits[t - 1], top_k or None).item()
            assert w.entropy[t] == pytest.approx(direct, abs=1e-5)
        assert (w.band[first:] == assign_bands(w.entropy[first:], thresholds)).all()
    all_bands = np.concatenate([w.band for w in windows])
    if band_mode == "quantile":  # equal-count bands above the floor
        assert min(np.bincount(all_bands[~np.isnan(entropy)], minlength=4)[1:]) > scored.size / 4


def test_every_document_position_past_the_minimum_context_is_scored_exactly_once(tiny_model_dir, corpus, tmp_path):
    options = ScoreOptions(**SMALL)
    score_dataset(str(tiny_model_dir), corpus, tmp_path, ["all"], options)
    windows, stats = load_scored(tmp_path, "all")
    tokenizer = load_tokenizer(str(tiny_model_dir))
    texts = [json.loads(line)["text"] for line in open(corpus, encoding="utf-8")]
    by_doc = {}
    for w in windows:
        by_doc.setdefault(w.doc_id, []).append(w)
    assert stats["splits"]["all"]["skipped_documents"] == 1  # "Tom buys 3 eggs." is too short
    assert len(by_doc) == len(texts) - 1 and max(len(ws) for ws in by_doc.values()) >= 3
    for doc_id, doc_windows in by_doc.items():
        ids = tokenizer(texts[int(doc_id.split(":")[1]) - 1], add_special_tokens=False)["input_ids"]
        positions = []
        for w in doc_windows:
            assert list(w.input_ids) == ids[w.start : w.start + len(w.input_ids)]
            positions += [w.start + t for t in np.flatnonzero(~np.isnan(w.entropy))]
        assert sorted(positions) == list(range(options.min_context, len(ids)))


@pytest.mark.parametrize("band_mode", ["fixed", "quantile"])
def test_a_killed_run_resumes_to_the_same_files(tiny_model_dir, corpus, tmp_path, band_mode):
    options = ScoreOptions(band_mode=band_mode, **SMALL)
    splits = ["midtrain", "eval", "posttrain"]
    clean, resumed = tmp_path / "clean", tmp_path / "resumed"
    score_dataset(str(tiny_model_dir), corpus, clean, splits, options)
    score_dataset(str(tiny_model_dir), corpus, resumed, splits, options)

    # Kill: the last midtrain shard (the quantile mode's first split) and stats.json never got written,
    # and the shard's temporary file was left half-written.
    last = sorted((resumed / "midtrain").glob("shard-*.parquet"))[-1]
    last.unlink()
    (last.parent / (last.name + ".tmp")).write_bytes(b"PAR1 half a shard")
    (resumed / STATS_FILE).unlink()
    with pytest.raises(RmtError, match="incomplete, re-run rmt score"):
        load_scored(resumed, "midtrain")

    score_dataset(str(tiny_model_dir), corpus, resumed, splits, options)
    assert folder_bytes(resumed) == folder_bytes(clean)
    with pytest.raises(RmtError, match="no split 'all'"):
        load_scored(resumed, "all")

    # Different options into the same folder are refused before anything is touched.
    before = folder_bytes(clean)
    with pytest.raises(RmtError, match=r"top_k=16, not 0; choose another --out"):
        score_dataset(str(tiny_model_dir), corpus, clean, splits, ScoreOptions(top_k=0, band_mode=band_mode, **SMALL))
    assert folder_bytes(clean) == before
    assert read_meta(clean)["options"]["top_k"] == 16


def test_bad_corpora_are_refused_and_leave_nothing_that_looks_complete(tiny_model_dir, tmp_path):
    empty = write_corpus(tmp_path / "empty.jsonl", ["", "  "])
    short = write_corpus(tmp_path / "short.jsonl", ["Tom buys 3 eggs.", "Li has 2 coins."])
    with pytest.raises(RmtError, match="empty"):
        score_dataset(str(tiny_model_dir), empty, tmp_path / "a", ["all"], ScoreOptions(**SMALL))
    with pytest.raises(RmtError, match="no document longer than --min-context=16"):
        score_dataset(str(tiny_model_dir), short, tmp_path / "b", ["all"], ScoreOptions(**SMALL))
    # Quantile mode when no entropy reaches the floor (a top-16 entropy is at most ln 16 ≈ 2.77).
    quantile = ScoreOptions(band_mode="quantile", thresholds=(7.0, 8.0, 9.0), **SMALL)
    with pytest.raises(RmtError, match="no entropy reaches the floor 7.0"):
        score_dataset(str(tiny_model_dir), write_corpus(tmp_path / "ok.jsonl", [sentences(0, 3)]), tmp_path / "c",
                      ["all"], quantile)
    assert not list(tmp_path.rglob(STATS_FILE))


def test_cli_scores_prints_bands_and_reports_errors_in_one_line(tiny_model_dir, corpus, tmp_path, capsys):
    out = tmp_path / "scored"
    common = ["--model", str(tiny_model_dir), "--max-length", "64", "--stride", "40", "--out", str(out)]
    assert main(["score", "--corpus", corpus, "--splits", "midtrain,eval", "--max-docs", "3", *common]) == 0
    printed = capsys.readouterr().out
    assert "below_floor" in printed and "tokens/s" in printed and "midtrain" in printed
    windows, stats = load_scored(out, "midtrain")
    assert stats["splits"]["midtrain"]["documents"] <= 3 and windows
    assert (out / "entropy_hist.png").stat().st_size > 10_000

    assert main(["score", "--corpus", str(tmp_path / "missing.jsonl"), *common[:-1], str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rmt score: error:") and "missing.jsonl" in err[0]
