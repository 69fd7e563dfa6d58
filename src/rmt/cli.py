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
    "score": ("rmt.score", "score token difficulty: proxy-model entropy and band of every corpus token"),
    "warmup": ("rmt.warmup", "cold start: supervised next-token-reasoning examples from the midtrain split"),
    "train": ("rmt.train", "mid-train a model: rmt / rpt / ntp / rlp methods and ablations (SPEC §8, §13)"),
    "eval": ("rmt.evaluate", "next-token accuracy on held-out data, NTP and NTR modes, per nested split (SPEC §9)"),
    "report": ("rmt.report", "compare evaluated runs: table in the papers' layout and training plots"),
    "posttrain": ("rmt.posttrain", "GRPO on math questions with verifiable answers, accuracy before and after"),
    "demo": ("rmt.demo", "the whole study on the embedded model: score, warm up, train and evaluate every "
                         "method, report"),
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """All commands are listed; only the chosen one's module is imported (they import torch)."""
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if a in COMMANDS), None)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser = argparse.ArgumentParser(prog="rmt", description="Reinforcement Mid-Training for causal LMs.")
    parser.add_argument("--version", action="version", version=f"rmt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
        if name == chosen:
            importlib.import_module(module).add_arguments(sub_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Quiet transformers' own progress bars and advice: ours say what is happening.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    args = build_parser(argv).parse_args(argv)
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
