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


def test_figures_show_the_numbers(runs, tmp_path):
    """The figures are checked for what they draw, not only that a file was written."""
    import json

    import numpy as np

    from rmt.report import plot_accuracy, plot_reasoning_length, plot_rewards

    rows = load_rows([runs / "base", runs / "rmt", runs / "rpt"])
    fig = plot_accuracy(rows, tmp_path / "accuracy.png")
    bars = [p for p in fig.axes[0].patches]
    expected = [100 * (v or 0) for r in rows for v in
                [r.evaluation["results"]["ntr"]["splits"][s]["accuracy"] for s in ("easy", "medium", "hard")]
                + [r.evaluation["results"]["ntr"]["avg"]]]
    assert sorted(np.nan_to_num([b.get_height() for b in bars])) == pytest.approx(sorted(expected))
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["base", "rmt", "rpt"]

    metrics = [json.loads(line) for line in (runs / "rmt" / "metrics.jsonl").read_text().splitlines()]
    fig = plot_reasoning_length(rows, tmp_path / "length.png")
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert list(lines["rmt: budget $B_t$"].get_ydata()) == [m["budget"] for m in metrics]
    assert list(lines["rmt: mean reasoning length"].get_ydata()) == [m["reasoning_len_mean"] for m in metrics]
    assert "rpt: budget $B_t$" not in lines and "rpt: cap (fixed)" in lines  # RPT has no budget

    fig = plot_rewards(rows, tmp_path / "rewards.png")
    match_panel = fig.axes[1]
    raw = [line for line in match_panel.get_lines() if line.get_alpha() == 0.3]
    assert list(raw[0].get_ydata()) == [m["reward_match_mean"] for m in metrics]
    assert match_panel.get_title() == "match reward $r_{match}$"


def _hand_made_run(folder, method, exact, lengths, entropy, *overrides):
    """A run folder with a config and an eval.json whose NTR records are given (no model needed)."""
    import json

    from rmt.config import save_config
    from rmt.warmup import WarmupConfig

    folder.mkdir(parents=True)
    if method == "warmup":
        save_config(WarmupConfig(), folder / "config.yaml")
    elif method:
        save_config(load_config(None, [f"method={method}", *overrides]), folder / "config.yaml")
    settings = {"budget": 8, "thresholds": [0.5, 1.0, 1.5], "pool_size": 99, "ntr_positions": len(exact),
                "seed": 0, "reasoning_cap": 16, "force_answer": True}
    records = [{"doc_id": "d", "window": 0, "position": i, "entropy": e, "exact": bool(x), "prefix": bool(x),
                "reasoning_len": n, "closed_think": True, "prediction": "x", "target": "x"}
               for i, (x, n, e) in enumerate(zip(exact, lengths, entropy))]
    from rmt.evaluate import split_accuracy

    import numpy as np

    block = split_accuracy(np.array(entropy), np.array(exact, dtype=bool), settings["thresholds"])
    result = {"model": method, "checkpoint": method, "data": "scored", "modes": ["ntr"], "settings": settings,
              "results": {"ntr": {**block, "prefix": block, "ntp_same_positions": None,
                                  "reasoning_len_mean": float(np.mean(lengths)), "well_formed_frac": 1.0,
                                  "answered_frac": 1.0, "positions": len(exact)}},
              "records": {"ntr": records}}
    (folder / "eval.json").write_text(json.dumps(result))
    return folder


def test_claims_and_paired_differences_from_hand_made_evaluations(tmp_path):
    from rmt.report import claims, compare, differences_table

    n = 200
    entropy = [0.7 + 1.2 * (i % 3) / 2 for i in range(n)]  # 0.7, 1.3, 1.9: every nested split populated
    rpt = [i % 4 == 0 for i in range(n)]  # 25% right
    rmt = [i % 4 == 0 or i % 4 == 1 for i in range(n)]  # right wherever rpt is, and on another quarter
    warm = rpt
    rows = load_rows([_hand_made_run(tmp_path / "warmup", "warmup", warm, [1] * n, entropy),
                      _hand_made_run(tmp_path / "rpt", "rpt", rpt, [4] * n, entropy),
                      _hand_made_run(tmp_path / "rmt", "rmt", rmt, [2] * n, entropy)])
    assert [r.label for r in rows] == ["warmed base", "rpt", "rmt"]
    c = compare(rows[2], rows[1])
    assert c["n"] == n and c["accuracy"]["avg"]["diff"] == pytest.approx(0.25, abs=0.01)
    assert c["accuracy"]["avg"]["ci"][0] > 0.15 and c["length"] == {"diff": -2.0, "ci": [-2.0, -2.0]}
    verdicts = {claim: verdict for claim, verdict, _ in claims(rows)}
    assert verdicts["RMT's NTR accuracy is above RPT's"] == "supports"
    assert verdicts["RMT reasons much shorter than RPT (paper: 21% of RPT's length)"] == "supports"
    assert verdicts["Ablation order: removing NTP hurts most, then DTB, then CAS"] == "not run"
    table_text = differences_table(rows)
    assert "| rmt − rpt |" in table_text and "| rpt − warmed base |" in table_text and "higher" in table_text

    # The same outcomes for both: cannot tell; RMT worse: contradicts.
    same = load_rows([_hand_made_run(tmp_path / "a" / "rpt", "rpt", rpt, [4] * n, entropy),
                      _hand_made_run(tmp_path / "a" / "rmt", "rmt", rpt, [4] * n, entropy)])
    assert dict((c, v) for c, v, _ in claims(same))["RMT's NTR accuracy is above RPT's"] == "cannot tell"
    worse = load_rows([_hand_made_run(tmp_path / "b" / "rpt", "rpt", rmt, [1] * n, entropy),
                       _hand_made_run(tmp_path / "b" / "rmt", "rmt", rpt, [3] * n, entropy)])
    verdicts = dict((c, v) for c, v, _ in claims(worse))
    assert verdicts["RMT's NTR accuracy is above RPT's"] == "contradicts"
    assert verdicts["RMT reasons much shorter than RPT (paper: 21% of RPT's length)"] == "contradicts"

    # No reasoning at all in either (an empty-thought cold start): cannot tell, and no ratio to nothing.
    empty = load_rows([_hand_made_run(tmp_path / "c" / "rpt", "rpt", rpt, [0] * n, entropy),
                       _hand_made_run(tmp_path / "c" / "rmt", "rmt", rpt, [0] * n, entropy)])
    length_claim = [c for c in claims(empty) if c[0].startswith("RMT reasons")][0]
    assert length_claim[1] == "cannot tell" and "nan" not in length_claim[2]
    assert "RPT's mean is 0 tokens" in length_claim[2]


def test_the_ablation_order_claim(tmp_path):
    from rmt.report import claims

    n = 300
    entropy = [0.7 + 1.2 * (i % 3) / 2 for i in range(n)]
    right = lambda share: [i % 10 < share for i in range(n)]  # noqa: E731 -- share in tenths, nested sets
    runs = [("rmt", right(8), ()), ("no-ntp", right(2), ("ntp.weight=0",)),
            ("no-dtb", right(4), ("budget.enabled=false",)), ("no-cas", right(6), ("curriculum.enabled=false",))]
    rows = load_rows([_hand_made_run(tmp_path / name, "rmt", exact, [2] * n, entropy, *o) for name, exact, o in runs])
    assert [r.label for r in rows] == ["rmt", "rmt w/o NTP", "rmt w/o DTB", "rmt w/o CAS"]
    claim = "Ablation order: removing NTP hurts most, then DTB, then CAS"
    verdict, evidence = next((v, e) for c, v, e in claims(rows) if c == claim)
    assert verdict == "supports" and "removing NTP costs +60.0" in evidence
    runs[3] = ("no-cas", right(3), ("curriculum.enabled=false",))  # CAS now matters more than DTB
    rows = load_rows([_hand_made_run(tmp_path / "x" / name, "rmt", exact, [2] * n, entropy, *o)
                      for name, exact, o in runs])
    assert next(v for c, v, _ in claims(rows) if c == claim) == "contradicts"
    # The order holds among the ablations, but every one of them beats full RMT: contradicts.
    runs = [("rmt", right(1), ()), ("no-ntp", right(3), ("ntp.weight=0",)),
            ("no-dtb", right(5), ("budget.enabled=false",)), ("no-cas", right(7), ("curriculum.enabled=false",))]
    rows = load_rows([_hand_made_run(tmp_path / "y" / name, "rmt", exact, [2] * n, entropy, *o)
                      for name, exact, o in runs])
    verdict, evidence = next((v, e) for c, v, e in claims(rows) if c == claim)
    assert verdict == "contradicts" and "negative cost" in evidence


def test_the_learning_table_from_hand_made_metrics(tmp_path):
    """Overall match falls as the curriculum turns to the hard band, while each band's match rises: the
    table says both, with intervals over steps."""
    import json

    from rmt.report import learning_table

    n = 40
    folder = _hand_made_run(tmp_path / "rmt", "rmt", [True] * n, [0] * n, [0.7] * n)
    metrics = []
    for step in range(1, 13):
        late = step > 6
        easy, hard = (0.6 + 0.01 * step, 0.2 + 0.01 * step)  # both bands rise a little every step
        bands = {"easy": 2, "medium": 0, "hard": 6} if late else {"easy": 6, "medium": 0, "hard": 2}
        overall = (bands["easy"] * easy + bands["hard"] * hard) / 8
        metrics.append({"step": step, "reward_match_mean": overall, "match_easy": easy, "match_hard": hard,
                        "sampled_bands": bands, "step_seconds": 1.0})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    text = learning_table(load_rows([folder]))
    row = next(line for line in text.splitlines() if line.startswith("| rmt |"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    # first 4 steps (0.75·easy + 0.25·hard = .51 … .54) vs the last 4 (0.25·easy + 0.75·hard = .39 … .42)
    assert cells[1] == "52.5 → 40.5 (-12.0 [-13.5, -10.5])"
    # at the run's band mix (48 easy, 48 hard positions in all): (easy + hard) / 2 = 0.40 + 0.01·step
    assert cells[2].startswith("42.5 → 50.5 (+8.0 [")
    assert cells[3].startswith("62.5 → 70.5 (+8.0 [") and cells[5].startswith("22.5 → 30.5 (+8.0 [")
    assert cells[4] == "—"  # no medium positions sampled
    assert cells[6] == "— (no `rl.control`)"
    assert cells[7] == "falls / rises / rises / cannot tell"


def test_the_learning_table_measures_the_gain_over_the_starting_model(tmp_path):
    """With `rl.control` logged, the table gives the policy's match minus the starting model's on the same
    prompts, first third of the steps → last third."""
    import json

    from rmt.report import learning_table

    n = 40
    folder = _hand_made_run(tmp_path / "rmt", "rmt", [True] * n, [0] * n, [0.7] * n)
    metrics = [{"step": s, "reward_match_mean": 0.5, "control_match_mean": 0.5 - 0.002 * s,
                "match_easy": 0.5, "sampled_bands": {"easy": 8, "medium": 0, "hard": 0}, "step_seconds": 1.0}
               for s in range(1, 13)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    row = next(line for line in learning_table(load_rows([folder])).splitlines() if line.startswith("| rmt |"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    # gains 0.002·step: steps 1-4 average 0.5 points, steps 9-12 2.1 points
    assert cells[6].startswith("+0.5 → +2.1 (+1.6 [")
    assert cells[7] == "cannot tell / cannot tell / cannot tell / rises"


def test_report_reads_another_evaluation_file(tmp_path, capsys):
    """`--eval-file`: the same run folders, a second evaluation of each (e.g. sampled at temperature 1)."""
    import json

    n = 40
    folders = [_hand_made_run(tmp_path / name, method, [True] * n, [0] * n, [0.7] * n)
               for name, method in (("warm", "warmup"), ("rmt", "rmt"))]
    for folder, hits in zip(folders, (10, 30)):
        result = json.loads((folder / "eval.json").read_text())
        result["settings"]["temperature"] = 1.0
        for k, r in enumerate(result["records"]["ntr"]):
            r["exact"] = k < hits
        (folder / "eval-t1.json").write_text(json.dumps(result))
    assert main(["report", *map(str, folders), "--out", str(tmp_path / "report"), "--eval-file", "eval-t1.json"]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert "sampled at temperature 1 per position" in text
    row = next(line for line in text.splitlines() if line.startswith("| rmt − warmed base |"))
    assert "+50.0 [" in row  # 30/40 − 10/40, from the second file's records
