"""The `rmt` command: one subcommand per stage. Each stage module adds its parser and runs its args."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from rmt import __version__
from rmt.errors import RmtError

# Subcommand name -> module with `add_arguments(parser)` and `run(args)`; listed here only once they work.
COMMANDS = {
    "doctor": ("rmt.doctor", "check the installation: torch, device, embedded model and corpus, cache"),
}


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser = argparse.ArgumentParser(prog="rmt", description="Reinforcement Mid-Training for causal LMs.")
    parser.add_argument("--version", action="version", version=f"rmt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
        importlib.import_module(module).add_arguments(sub_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Quiet transformers' own progress bars and advice: ours say what is happening.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return module.run(args) or 0
    except RmtError as exc:
        if args.debug:
            raise
        print(f"rmt {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rmt {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
