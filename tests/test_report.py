import shutil

import pytest

from rmt.cli import main
from rmt.config import load_config
from rmt.errors import RmtError
from rmt.evaluate import EVAL_FILE, evaluate, save_eval
from rmt.report import FIGURES, load_rows, method_label, render
from rmt.train import train


def tiny_run(model, data, out, method):
    config = load_config(None, [
        f"method={method}", f"model={model}", f"data={data}", f"out={out}", "steps=4", "docs_per_step=2",
        "rollout.group_size=2", "rollout.positions_per_doc=2", "rollout.answer_tokens=3", "budget.b0=6",
        "budget.max_reasoning_tokens=12", "optim.lr=1e-3", "save_every=4",
    ])
    return train(config)


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tiny_scored_dir, tmp_path_factory):
    """A base evaluation, evaluated rmt and rpt runs, and an rmt run without its evaluation."""
    root = tmp_path_factory.mktemp("runs")
    options = dict(budget=3, positions=8, progress=False)
    save_eval(evaluate(str(tiny_model_dir), tiny_scored_dir, **options), root / "base" / EVAL_FILE)
    for method in ("rmt", "rpt"):
        run_dir = tiny_run(tiny_model_dir, tiny_scored_dir, root / method, method)
        save_eval(evaluate(str(run_dir), tiny_scored_dir, **options), run_dir / EVAL_FILE)
    shutil.copytree(root / "rmt", root / "unevaluated")
    (root / "unevaluated" / EVAL_FILE).unlink()
    return root


def test_report_has_every_row_and_readable_figures(runs, tmp_path, capsys):
    out = tmp_path / "report"
    folders = [str(runs / name) for name in ("base", "rmt", "rpt", "unevaluated")]
    assert main(["report", *folders, "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    header = ("| Method | Easy | Medium | Hard | Avg. [95% CI] | NTP Avg. | NTR/NTP % (e/m/h) | Reasoning length | "
              "`</think>` closed | Steps |")
    assert header in text
    rows = [line for line in text.split("## The paper's claims")[0].splitlines() if line.startswith("| ")
            and line != header]
    # Two rmt runs: told apart by their folders.
    assert [row.split("|")[1].strip() for row in rows] == ["base", "rmt (rmt)", "rpt", "rmt (unevaluated)"]
    unevaluated = rows[-1].split("|")[2:-1]
    assert [c.strip() for c in unevaluated][:8] == ["—"] * 8  # no numbers for a run without eval.json
    assert "not evaluated" in text
    for name in FIGURES:
        assert (out / name).stat().st_size > 10_000, name
        assert f"]({name})" in text
    assert "rpt" in capsys.readouterr().out


def test_labels_name_the_ablations():
    label = lambda *overrides: method_label(load_config(None, list(overrides)))  # noqa: E731
    assert label("method=rmt") == "rmt"
    assert label("method=rpt") == "rpt"
    assert label("method=ntp") == "ntp"
    assert label("method=rmt", "budget.enabled=false") == "rmt w/o DTB"
    assert label("method=rmt", "curriculum.enabled=false", "ntp.weight=0") == "rmt w/o CAS w/o NTP"
    assert label("method=rpt", "budget.enabled=true", "reward.name=exact") == "rpt +DTB exact reward"


def test_bad_folders_are_one_clear_error(tmp_path, capsys):
    with pytest.raises(RmtError, match="no such folder"):
        render(load_rows([tmp_path / "missing"]), tmp_path / "out")
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    assert "neither a training run" in capsys.readouterr().err


def test_posttrain_table_from_hand_made_results(tmp_path):
    import json

    from rmt.report import load_rows, posttrain_table

    def phase(accuracy, length, closed):
        return {"accuracy": accuracy, "response_len_mean": length, "reasoning_len_mean": length - 4,
                "format_ok_frac": closed, "n": 48, "seconds": 1.0}

    for name, before, after in (("base", phase(0.104, 30.0, 0.5), phase(0.375, 20.5, 1.0)),
                                ("rmt", phase(0.25, 12.0, 1.0), None)):
        post = tmp_path / name / "posttrain"
        post.mkdir(parents=True)
        (post / "posttrain_eval.json").write_text(json.dumps({
            "model": name, "model_path": name, "source": "s", "n_train": 700, "n_eval": 48, "steps": 8,
            "max_reasoning_tokens": 48, "answer_tokens": 12, "before": before, "after": after}))
        (post / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward_mean": 0.25}) + "\n")
    rows = load_rows([tmp_path / "base", tmp_path / "rmt"])  # folders holding only a post-training
    lines = posttrain_table(rows).splitlines()
    # Neither folder is a training run: both are "base", told apart by folder.
    assert lines[2] == "| base (base) | 10.4 | 37.5 | +27.1 | 30.0 / 20.5 | 50% / 100% | 1 |"  # no samples: no CI
    assert lines[3] == "| base (rmt) | 25.0 | — | — | 12.0 / — | 100% / — | 1 |"
    assert "post-training unfinished" in rows[1].notes[0]
    path = render(load_rows([tmp_path / "base", tmp_path / "rmt"]), tmp_path / "report")
    assert "## Post-training on math" in path.read_text() and (tmp_path / "report" / "posttrain.png").is_file()
