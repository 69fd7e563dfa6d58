import json
import shutil

import pytest
import yaml

from rmt.cli import main
from rmt.demo import load_demo_config, posttrain_config, train_config
from rmt.errors import RmtError
from rmt.report import FIGURES

METHODS = ("ntp", "rpt", "rmt")


def tiny_demo_argv(model, corpus, out, *extra):
    """The quick demo on the tiny model: quantile bands (a random model's entropies are all high)."""
    return ["demo", "--quick", "--out", str(out), "--model", str(model), "--corpus", str(corpus),
            "score.band_mode=quantile", "score.top_k=0", "score.max_docs=20", "score.min_context=8",
            "score.max_length=64", "score.stride=48", "eval.positions=6", "eval.budget=3", *extra]


def method_rows(report_md):
    table = report_md.split("## The paper's claims")[0]
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
    # score, raw eval, warmup, warmed eval, 3 x (train, eval), report
    assert "=== [1/11] score" in printed and "=== [3/11] cold start" in printed and "=== [11/11] report" in printed
    report = (out / "report" / "report.md").read_text()
    assert method_rows(report) == ["base", "warmed base", *METHODS]
    assert "## The paper's claims" in report and "## Paired differences" in report
    for name in FIGURES:
        assert (out / "report" / name).stat().st_size > 10_000
    warmed = str(out / "warmup" / "checkpoints" / "step-000002")
    for method in METHODS:
        result = json.loads((out / method / "eval.json").read_text())
        assert result["checkpoint"].endswith("step-000004") and result["settings"]["ntr_positions"] == 6
        assert len(metrics_lines(out / method)) == 4
        # Every method starts from the warmed base.
        assert yaml.safe_load((out / method / "config.yaml").read_text())["model"] == str(out / "warmup")
    assert json.loads((out / "warmup" / "eval.json").read_text())["checkpoint"] == warmed
    raw = json.loads((out / "raw" / "eval.json").read_text())
    assert raw["model"] == str(tiny_model_dir)

    # Same command again: everything is finished, nothing is redone.
    before = {m: (out / m / "eval.json").stat().st_mtime_ns for m in ("raw", "warmup", *METHODS)}
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("already trained") == 4 and printed.count("up to date") == 5
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


def test_demo_posttrain_stage_on_the_tiny_model_and_resume(tiny_model_dir, tmp_path, capsys):
    from helpers import write_corpus

    corpus = write_corpus(tmp_path / "corpus.jsonl")
    out = tmp_path / "demo"
    post = ["posttrain.steps=2", "posttrain.save_every=1", "posttrain.keep_last=2", "posttrain.n_eval=4",
            "posttrain.questions_per_step=2", "posttrain.max_reasoning_tokens=4", "posttrain.rollout.answer_tokens=3",
            "posttrain.generated_train=60", "posttrain.generated_eval=30"]
    argv = ["demo", "--posttrain", *tiny_demo_argv(tiny_model_dir, corpus, out, *post)[1:]]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    # score, raw eval, warmup + eval, 3 x (train, eval), 4 post-trainings (warmed base and every method), report
    assert "=== [11/15] post-train warmup" in printed and "=== [14/15] post-train rmt" in printed
    assert "=== [15/15] report" in printed and "| Start | Accuracy before | Accuracy after" in printed
    for name in ("warmup", *METHODS):
        report = json.loads((out / name / "posttrain" / "posttrain_eval.json").read_text())
        assert report["before"]["n"] == report["after"]["n"] == 4 and report["steps"] == 2
        start = str(out / name / "checkpoints" / "step-000002")  # the warmup and every method ran 2 steps
        assert report["model_path"] == start  # each start post-trained from its own final checkpoint
        assert [json.loads(line)["step"] for line in metrics_lines(out / name / "posttrain")] == [1, 2]
    report_md = (out / "report" / "report.md").read_text()
    section = report_md.split("## Post-training on math")[1].split("## Details")[0]
    assert [line.split("|")[1].strip() for line in section.splitlines() if line.startswith("| ")][1:] == [
        "warmed base", *METHODS]
    assert "held-out questions" in section and (out / "report" / "posttrain.png").stat().st_size > 10_000

    # Again: nothing is redone. Then a post-training that lost its last checkpoint resumes from step 1.
    assert main(argv) == 0
    assert capsys.readouterr().out.count("already post-trained") == 4
    shutil.rmtree(out / "rmt" / "posttrain" / "checkpoints" / "step-000002")
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("already post-trained") == 3 and "from step 1" in printed
    assert [json.loads(line)["step"] for line in metrics_lines(out / "rmt" / "posttrain")] == [1, 2]
    # Other post-training settings into the same folder: refused.
    assert main([*argv, "posttrain.steps=3"]) == 2
    assert "other settings (steps)" in capsys.readouterr().err


def test_demo_configs_load_from_the_package():
    full, quick, study = (load_demo_config(None, preset, []) for preset in ("default", "quick", "study"))
    for demo in (full, quick, study):
        assert set(METHODS) <= set(demo.methods) and demo.model == "smollm2-135m-instruct" and demo.cold_start
        configs = {m: train_config(demo, m, "scored", "out", "warm") for m in demo.methods}
        # Same steps and the same rollouts per step for every method (a compute-matched comparison).
        shared = {(c.steps, c.docs_per_step, c.rollout.positions_per_doc, c.rollout.group_size)
                  for c in configs.values()}
        assert len(shared) == 1
        assert configs["rpt"].reward.name == "prefix" and not configs["rpt"].budget.enabled
        assert configs["rmt"].budget.enabled and configs["rmt"].budget.b0 == demo.train["budget"]["b0"]
        assert not configs["ntp"].rl.enabled and all(c.model == "warm" for c in configs.values())
        post = posttrain_config(demo, "runs/rmt", "runs/rmt/posttrain")  # the packaged posttrain.yaml + overrides
        assert post.model == "runs/rmt" and post.midtrain_corpus == demo.corpus
    assert quick.train["steps"] < full.train["steps"]
    assert study.train == full.train and study.methods == [*full.methods, "rmt-no-dtb", "rmt-no-cas", "rmt-no-ntp",
                                                            "rlp"]  # it adds to a finished demo's folder
    assert posttrain_config(quick, "m", "o").steps < posttrain_config(full, "m", "o").steps
    ablations = {m: train_config(study, m, "scored", "out", "warm") for m in ("rmt-no-dtb", "rmt-no-cas", "rmt-no-ntp")}
    assert not ablations["rmt-no-dtb"].budget.enabled and not ablations["rmt-no-cas"].curriculum.enabled
    assert ablations["rmt-no-ntp"].ntp.weight == 0 and all(c.method == "rmt" for c in ablations.values())


def test_demo_config_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(RmtError, match="set by the demo"):
        load_demo_config(None, "quick", ["train.method=rpt"])
    assert main(["demo", "--quick", "--out", str(tmp_path), "train.budget.b00=3"]) == 2
    assert "b00" in capsys.readouterr().err
    assert main(["demo", "--quick", "--out", str(tmp_path), "methods=[rmt,xyz]"]) == 2
    assert "methods must be distinct names among" in capsys.readouterr().err


def test_quick_demo_on_embedded_model(tmp_path, capsys):
    """The one real end-to-end run (a few minutes): embedded model and corpus, every stage including the
    post-training of every start, the report."""
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--posttrain", "--out", str(out)]) == 0
    report = (out / "report" / "report.md").read_text()
    assert method_rows(report) == ["base", "warmed base", *METHODS]
    for name in FIGURES:
        assert (out / "report" / name).stat().st_size > 10_000
    for folder in ("raw", "warmup", *METHODS):
        result = json.loads((out / folder / "eval.json").read_text())
        assert result["results"]["ntr"]["positions"] == 12 and result["results"]["ntp"]["positions"] > 0
    for folder in ("warmup", *METHODS):
        post = json.loads((out / folder / "posttrain" / "posttrain_eval.json").read_text())
        assert post["before"]["n"] == post["after"]["n"] == 8
    assert "## Post-training on math" in report and (out / "report" / "posttrain.png").is_file()
    assert "rmt demo finished in" in capsys.readouterr().out
