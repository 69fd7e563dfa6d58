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
