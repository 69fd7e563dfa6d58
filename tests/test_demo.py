import json
import shutil

import pytest

from rmt.cli import main
from rmt.demo import load_demo_config, train_config
from rmt.errors import RmtError
from rmt.report import FIGURES

METHODS = ("ntp", "rpt", "rmt")


def tiny_demo_argv(model, corpus, out, *extra):
    """The quick demo on the tiny model: quantile bands (a random model's entropies are all high)."""
    return ["demo", "--quick", "--out", str(out), "--model", str(model), "--corpus", str(corpus),
            "score.band_mode=quantile", "score.top_k=0", "score.max_docs=20", "score.min_context=8",
            "score.max_length=64", "score.stride=48", "eval.positions=6", "eval.budget=3", *extra]


def method_rows(report_md):
    table = report_md.split("## Details")[0]
    return [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")][1:]


def metrics_lines(run_dir):
    return (run_dir / "metrics.jsonl").read_text().splitlines()


def test_demo_pipeline_on_the_tiny_model_and_resume(tiny_model_dir, tmp_path, capsys):
    from helpers import write_corpus

    corpus = write_corpus(tmp_path / "corpus.jsonl")
    out = tmp_path / "demo"
    argv = tiny_demo_argv(tiny_model_dir, corpus, out, "train.steps=4", "train.save_every=2", "train.keep_last=2")
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "=== [1/9] score" in printed and "=== [9/9] report" in printed and "elapsed" in printed
    report = (out / "report" / "report.md").read_text()
    assert method_rows(report) == ["base", *METHODS]
    for name in FIGURES:
        assert (out / "report" / name).stat().st_size > 10_000
    for method in METHODS:
        result = json.loads((out / method / "eval.json").read_text())
        assert result["checkpoint"].endswith("step-000004") and result["settings"]["ntr_positions"] == 6
        assert len(metrics_lines(out / method)) == 4
    base = json.loads((out / "base" / "eval.json").read_text())
    assert base["model"] == str(tiny_model_dir)

    # Same command again: everything is finished, nothing is redone.
    before = {m: (out / m / "eval.json").stat().st_mtime_ns for m in ("base", *METHODS)}
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("already trained") == 3 and printed.count("up to date") == 4
    assert {m: (out / m / "eval.json").stat().st_mtime_ns for m in before} == before

    # An interrupted rmt run (last checkpoint and evaluation lost) resumes from its step-2 checkpoint.
    shutil.rmtree(out / "rmt" / "checkpoints" / "step-000004")
    (out / "rmt" / "eval.json").unlink()
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "resuming" in printed and "from step 2" in printed
    assert [json.loads(line)["step"] for line in metrics_lines(out / "rmt")] == [1, 2, 3, 4]
    assert json.loads((out / "rmt" / "eval.json").read_text())["checkpoint"].endswith("step-000004")

    # Other training settings into the same folder: refused, not mixed.
    assert main([*argv, "train.steps=5"]) == 2
    assert "trained with other settings (steps)" in capsys.readouterr().err


def test_demo_configs_load_from_the_package():
    full, quick = load_demo_config(None, False, []), load_demo_config(None, True, [])
    for demo in (full, quick):
        assert demo.methods == list(METHODS) and demo.model == "smollm2-135m-instruct"
        configs = {m: train_config(demo, m, "scored", "out") for m in METHODS}
        # Same steps and the same rollouts per step for every method (a compute-matched comparison).
        shared = {(c.steps, c.docs_per_step, c.rollout.positions_per_doc, c.rollout.group_size)
                  for c in configs.values()}
        assert len(shared) == 1
        assert configs["rpt"].reward.match == "prefix" and not configs["rpt"].budget.enabled
        assert configs["rmt"].budget.enabled and configs["rmt"].budget.b0 == demo.train["budget"]["b0"]
        assert not configs["ntp"].rl.enabled
    assert quick.train["steps"] < full.train["steps"]


def test_demo_config_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(RmtError, match="set by the demo"):
        load_demo_config(None, True, ["train.method=rpt"])
    assert main(["demo", "--quick", "--out", str(tmp_path), "train.budget.b00=3"]) == 2
    assert "b00" in capsys.readouterr().err
    assert main(["demo", "--quick", "--out", str(tmp_path), "methods=[rmt,xyz]"]) == 2
    assert "methods must be among" in capsys.readouterr().err


def test_quick_demo_on_embedded_model(tmp_path, capsys):
    """The one real end-to-end run (a few minutes): embedded model and corpus, every stage, the report."""
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    report = (out / "report" / "report.md").read_text()
    assert method_rows(report) == ["base", *METHODS]
    for name in FIGURES:
        assert (out / "report" / name).stat().st_size > 10_000
    for folder in ("base", *METHODS):
        result = json.loads((out / folder / "eval.json").read_text())
        assert result["results"]["ntr"]["positions"] == 12 and result["results"]["ntp"]["positions"] > 0
    assert "rmt demo finished in" in capsys.readouterr().out
