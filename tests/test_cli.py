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
