"""Bad input is one clear line and exit 2, checked before any work, and never damages an existing run.

Every case runs a real command (`rmt ...`) in-process and checks: exit code 2; one line on stderr naming the
problem; no new output folder for a command that failed; and every file of an existing run folder unchanged.
"""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from rmt.cli import main


def snapshot(folder: Path) -> dict:
    """Content hash of every file under a folder (what a failed command must leave as it was)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def world(tiny_model_dir, tiny_scored_dir, tmp_path_factory):
    """A finished 2-step run with checkpoints at steps 1 and 2, and assorted bad files."""
    root = tmp_path_factory.mktemp("bad")
    run = root / "run"
    assert main(["train", f"--model={tiny_model_dir}", f"--data={tiny_scored_dir}", f"--out={run}", "steps=2",
                 "docs_per_step=1", "rollout.group_size=2", "rollout.positions_per_doc=1", "budget.b0=4",
                 "save_every=1", "keep_last=2"]) == 0
    (root / "a_file").write_text("not a folder")
    (root / "bad.yaml").write_text("steps: [1, 2\n")
    (root / "list.yaml").write_text("- method: rmt\n")
    (root / "empty.txt").write_text("   \n")
    (root / "latin1.txt").write_bytes("caf\xe9 au lait, " .encode("latin-1") * 20)
    (root / "short.txt").write_text("Too short.")
    (root / "no_checkpoint" / "checkpoints").mkdir(parents=True)
    broken_model = root / "broken_model"
    shutil.copytree(tiny_model_dir, broken_model)
    weights = broken_model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    broken_data = root / "broken_data"
    shutil.copytree(tiny_scored_dir, broken_data)
    (broken_data / "stats.json").write_text('{"format": 1, "spl')
    broken_shard = root / "broken_shard"
    shutil.copytree(tiny_scored_dir, broken_shard)
    next((broken_shard / "eval").glob("*.parquet")).write_bytes(b"PAR1 not really")
    return {"root": root, "run": run, "model": str(tiny_model_dir), "data": str(tiny_scored_dir)}


CASES = [
    # (id, argv template, expected text in the one error line)
    ("yaml-syntax", ["train", "--config", "{root}/bad.yaml", "--out", "{root}/new"], "not valid YAML"),
    ("yaml-list", ["train", "--config", "{root}/list.yaml", "--out", "{root}/new"], "expected a mapping"),
    ("typo", ["train", "--out", "{root}/new", "budgett.b0=3"], "budgett"),
    ("negative-lr", ["train", "--out", "{root}/new", "optim.lr=-1"], "optim.lr must be > 0"),
    ("band-probs", ["train", "--out", "{root}/new", "curriculum.p_early=[0.5,0.5,0.5]"], "p_early"),
    ("zero-steps", ["train", "--out", "{root}/new", "--steps", "0"], "steps must be >= 1"),
    ("top-p", ["train", "--out", "{root}/new", "rollout.top_p=0"], "top_p"),
    ("temperature", ["train", "--out", "{root}/new", "rollout.temperature=0"], "temperature"),
    ("group-size", ["train", "--out", "{root}/new", "rollout.group_size=1"], "group_size"),
    ("not-key-value", ["train", "--out", "{root}/new", "steps"], "not a key=value"),
    ("out-is-file", ["train", "--data", "{data}", "--model", "{model}", "--out", "{root}/a_file"], "is a file"),
    ("missing-data", ["train", "--data", "{root}/nowhere", "--out", "{root}/new"], "not an `rmt score` output"),
    ("missing-model", ["train", "--data", "{data}", "--model", "{root}/nowhere", "--out", "{root}/new"],
     "does not exist"),
    ("damaged-model", ["train", "--data", "{data}", "--model", "{root}/broken_model", "--out", "{root}/new"],
     "damaged"),
    ("damaged-stats", ["train", "--data", "{root}/broken_data", "--out", "{root}/new"], "stats.json"),
    ("existing-run", ["train", "--data", "{data}", "--model", "{model}", "--out", "{run}"], "already holds a run"),
    ("resume-changed-steps", ["train", "--resume", "--out", "{run}", "steps=5"], "other settings"),
    ("resume-changed-method", ["train", "--resume", "--out", "{run}", "--method", "rpt"], "other settings"),
    ("resume-bad-data", ["train", "--resume", "--out", "{run}", "--data", "{root}/nowhere"], "not an `rmt score`"),
    ("resume-nothing", ["train", "--resume", "--out", "{root}/no_checkpoint"], "no complete checkpoint"),
    ("score-empty", ["score", "--corpus", "{root}/empty.txt", "--out", "{root}/new", "--model", "{model}"], "empty"),
    ("score-latin1", ["score", "--corpus", "{root}/latin1.txt", "--out", "{root}/new", "--model", "{model}"],
     "not valid UTF-8"),
    ("score-short", ["score", "--corpus", "{root}/short.txt", "--out", "{root}/new", "--model", "{model}"],
     "min-context"),
    ("score-length", ["score", "--max-length", "8", "--out", "{root}/new"], "max-length"),
    ("score-out-file", ["score", "--corpus", "{root}/short.txt", "--out", "{root}/a_file", "--model", "{model}"],
     "a_file"),
    ("eval-positions", ["eval", "--model", "{model}", "--data", "{data}", "--positions", "0", "--out",
                        "{root}/new.json"], "positions must be >= 1"),
    ("eval-out-folder", ["eval", "--model", "{model}", "--data", "{data}", "--out", "{run}"], "is a folder"),
    ("eval-no-checkpoint", ["eval", "--model", "{root}/no_checkpoint", "--data", "{data}"], "no complete checkpoint"),
    ("eval-damaged-shard", ["eval", "--model", "{model}", "--data", "{root}/broken_shard", "--out",
                            "{root}/new.json"], "shard"),
    ("eval-split", ["eval", "--model", "{model}", "--data", "{data}", "--split", "train", "--out", "{root}/n.json"],
     "split must be"),
    ("report-out-file", ["report", "{run}", "--out", "{root}/a_file"], "is a file"),
    ("report-missing", ["report", "{root}/nowhere", "--out", "{root}/new"], "no such folder"),
    ("posttrain-source", ["posttrain", "--source", "{root}/nowhere.jsonl", "--out", "{root}/new"], "does not exist"),
    ("posttrain-no-rl", ["posttrain", "rl.enabled=false", "--out", "{root}/new"], "rl.enabled"),
    ("warmup-thought", ["warmup", "thought=story", "--out", "{root}/new"], "thought must be one of"),
    ("demo-method", ["demo", "--quick", "--out", "{root}/new", "methods=[rmt,xyz]"], "methods"),
    ("no-chat-template", ["train", "--data", "{data}", "--model", "{plain_model}", "--out", "{root}/new",
                          "rollout.prompt_style=chat"], "no chat template"),
]


@pytest.mark.parametrize("case, argv, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(world, tiny_model_no_template_dir, case, argv, expected, capsys):
    names = {**world, "plain_model": str(tiny_model_no_template_dir)}
    argv = [a.format(**names) for a in argv]
    shutil.rmtree(world["root"] / "new", ignore_errors=True)  # each case starts clean, whatever the last one left
    (world["root"] / "new.json").unlink(missing_ok=True)
    before = snapshot(world["run"])
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith(f"rmt {argv[0]}: error:") and "\n" not in err, err
    assert expected in err, err
    assert not (world["root"] / "new").exists() and not (world["root"] / "new.json").exists()
    assert snapshot(world["run"]) == before


def test_a_damaged_latest_checkpoint_names_the_previous_one(world, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    weights = run / "checkpoints" / "step-000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    before = snapshot(run)
    assert main(["train", "--resume", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "step-000002" in err and "damaged" in err and "--from-previous-checkpoint" in err and "step-000001" in err
    assert snapshot(run) == before
    # With the flag it resumes from step 1 and redoes step 2.
    assert main(["train", "--resume", "--out", str(run), "--from-previous-checkpoint"]) == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_a_torn_last_metrics_line_is_dropped_on_resume(world, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    shutil.rmtree(run / "checkpoints" / "step-000002")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.')  # a crash in the middle of a write
    assert main(["train", "--resume", "--out", str(run)]) == 0
    assert "dropped a torn last line" in capsys.readouterr().out
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_a_second_writer_is_refused(world, tmp_path, capsys):
    from rmt.runs import lock_run_dir

    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    shutil.rmtree(run / "checkpoints" / "step-000002")
    held = lock_run_dir(run)  # as if another rmt process were training into it
    try:
        assert main(["train", "--resume", "--out", str(run)]) == 2
        assert "being written by another rmt process" in capsys.readouterr().err
    finally:
        held.close()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into read-only folders")
def test_an_unwritable_output_folder_is_refused(world, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert main(["train", "--data", world["data"], "--model", world["model"], "--out", str(locked / "run")]) == 2
        assert "not writable" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)
