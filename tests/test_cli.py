import subprocess
import sys

from rmt.cli import COMMANDS, main


def test_help_lists_every_command(capsys):
    try:
        main(["--help"])
    except SystemExit as exc:
        assert exc.code == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_doctor_succeeds_when_assets_are_installed(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "embedded model" in out and "embedded corpus" in out and out.strip().endswith("ok")


def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "rmt.cli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("rmt ")


def test_every_shipped_config_loads():
    """The YAML files in configs/ are what users start from: each must pass its schema."""
    from pathlib import Path

    import yaml

    from rmt.config import load_config
    from rmt.posttrain import load_posttrain_config

    root = Path(__file__).parent.parent / "configs"
    files = sorted(root.glob("*.yaml"))
    assert {f.name for f in files} >= {"cpu-demo.yaml", "paper-qwen3-14b.yaml", "paper-r1-distill-qwen-14b.yaml",
                                       "posttrain-14b.yaml"}
    for path in files:
        config = (load_posttrain_config if path.name.startswith("posttrain") else load_config)(str(path))
        assert config.model
    for path in sorted((root / "accelerate").glob("*.yaml")):
        assert yaml.safe_load(path.read_text())["distributed_type"]


def test_every_config_field_is_documented():
    from rmt.config import TrainConfig, describe
    from rmt.demo import DemoConfig
    from rmt.evaluate import EvalConfig
    from rmt.posttrain import PostTrainConfig
    from rmt.score import ScoreConfig
    from rmt.warmup import WarmupConfig

    for schema in (TrainConfig, PostTrainConfig, WarmupConfig, EvalConfig, ScoreConfig, DemoConfig):
        undocumented = [key for key, _, doc in describe(schema) if not doc]
        assert not undocumented, f"{schema.__name__}: {undocumented}"


def test_every_command_takes_config_files_and_key_value_settings(tmp_path, capsys):
    """One grammar: `--config FILE`, `key=value`, flags as aliases of keys, and help listing every key."""
    import pytest

    for command, key in (("train", "budget.b0"), ("score", "top_k"), ("eval", "positions"),
                         ("posttrain", "questions_per_step"), ("warmup", "thought_tokens")):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = capsys.readouterr().out
        assert "--config" in out and f"  {key} = " in out and "key=value" in out, command
    # A setting given as a flag, in a file and as key=value: key=value wins over the file, flags too.
    from argparse import ArgumentParser

    from rmt import evaluate

    config_file = tmp_path / "eval.yaml"
    config_file.write_text("positions: 7\nbudget: 4\nmodes: [ntp]\n")
    parser = ArgumentParser()
    evaluate.add_arguments(parser)
    args = parser.parse_args(["--config", str(config_file), "--budget", "none", "seed=3", "--mode", "ntp,ntr"])
    config = __import__("rmt.config", fromlist=["x"]).config_from_args(args, evaluate.EvalConfig, evaluate.FLAGS)
    assert (config.positions, config.budget, config.seed, list(config.modes)) == (7, None, 3, ["ntp", "ntr"])
