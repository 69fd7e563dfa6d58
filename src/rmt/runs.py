"""What every training recipe (`rmt train`, `rmt posttrain`, `rmt warmup`) builds and does around its steps.

`TrainingRun` holds the accelerator, the model with its optimizer and schedule, the tokenizer and the run
folder; it backpropagates (reducing gradients across processes on a step's last backward only), steps the
optimizer, writes the step's metrics record and checkpoints, and resumes all of it exactly. A recipe is
then only its own loop: what to sample, how to score it, which loss.

Runs work as one process or under `accelerate launch` / `torchrun`: each process gets its share of the
step's work (`share`), gradients are reduced by the engine (DDP or FSDP through accelerate), and metrics and
checkpoints are written once, by the main process. DeepSpeed is refused: its engine steps the optimizer after
a fixed number of backward passes, and a step here has as many as its packs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from transformers import get_constant_schedule_with_warmup

from rmt import assets, checkpoint
from rmt.config import save_config
from rmt.errors import RmtError
from rmt.io import MetricsLog

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"


@dataclass
class DataOrder:
    """Epoch-wise shuffled order of `size` items; its state resumes exactly."""

    rng: np.random.Generator
    size: int
    order: np.ndarray | None = None
    cursor: int = 0

    def take(self, n: int) -> list[int]:
        out = []
        while len(out) < n:
            if self.order is None or self.cursor >= self.size:
                self.order, self.cursor = self.rng.permutation(self.size), 0
            out.append(int(self.order[self.cursor]))
            self.cursor += 1
        return out

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "order": self.order, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.order, self.cursor = state["order"], state["cursor"]


def check_run_dir(out: str | Path, resume: bool) -> Path:
    """The run folder of a new run (must not hold one) or of a resumed one (must hold a checkpoint)."""
    run_dir = Path(out)
    if run_dir.exists() and not run_dir.is_dir():
        raise RmtError(f"{run_dir} is a file; --out must be a folder")
    if resume:
        if checkpoint.latest_checkpoint(run_dir) is None:
            raise RmtError(f"--resume: {run_dir} has no complete checkpoint to resume from")
        return run_dir
    if (run_dir / METRICS_FILE).exists() or checkpoint.list_checkpoints(run_dir):
        raise RmtError(f"{run_dir} already holds a run; use --resume to continue it, or choose another --out")
    return run_dir


# Settings a resumed run may change: they affect speed, memory, logging or what is kept, not the results
# (beyond float rounding).
RESUME_MAY_CHANGE = ("out", "save_every", "keep_last", "log_tensorboard", "log_wandb", "gradient_checkpointing",
                     "export_dtype", "rollout.batch_size", "optim.micro_batch", "optim.pack_tokens")


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_resume_config(run_dir: Path, config, allow_changes: bool = False) -> None:
    """A resumed run continues the run as it was: refuse settings that differ from its saved config.yaml
    (and would change its results), unless `allow_changes`."""
    from rmt.config import config_to_dict, load_config

    saved = run_dir / CONFIG_FILE
    if not saved.is_file():
        raise RmtError(f"--resume: {saved} is missing; this folder does not hold a complete run")
    before = _flatten(config_to_dict(load_config(str(saved), schema=type(config))))
    now = _flatten(config_to_dict(config))
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k) and k not in RESUME_MAY_CHANGE)
    if changed and not allow_changes:
        shown = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:4])
        raise RmtError(f"--resume: {run_dir} was started with other settings ({shown}"
                       f"{', ...' if len(changed) > 4 else ''}); resume with the same settings, or add "
                       "--allow-changes to continue with the new ones")


def add_resume_arguments(parser) -> None:
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its latest checkpoint, with its saved config.yaml "
                             "(settings given here must not change it)")
    parser.add_argument("--allow-changes", action="store_true",
                        help="with --resume: accept settings that differ from the run's saved config")
    parser.add_argument("--from-previous-checkpoint", action="store_true",
                        help="with --resume: if the latest checkpoint is damaged, resume from the previous whole one")


def resume_options(args) -> dict:
    """The keyword arguments of a recipe (train, warmup, posttrain) that `add_resume_arguments` parsed."""
    return {"resume": args.resume, "allow_changes": args.allow_changes,
            "previous_if_damaged": args.from_previous_checkpoint}


def config_for(args, schema, flags, default_file=None):
    """The config of a training command. With --resume and no --config, the run's saved config.yaml is the
    base, so `--resume --out RUN` alone continues the run as it was."""
    from rmt.config import config_from_args

    if getattr(args, "resume", False) and not args.config:
        probe = config_from_args(args, schema, flags, default_file)  # only to find the run folder
        saved = Path(probe.out) / CONFIG_FILE
        if saved.is_file():
            args.config = str(saved)
            try:
                return config_from_args(args, schema, flags)
            finally:
                args.config = None
    return config_from_args(args, schema, flags, default_file)


LOCK_FILE = ".lock"


def lock_run_dir(run_dir: Path):
    """Hold an exclusive lock on a run folder for this process's lifetime (the OS drops it when the process
    ends, however it ends); a second writer gets one clear error instead of interleaved files."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return None
    handle = open(run_dir / LOCK_FILE, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        handle.close()
        raise RmtError(f"{run_dir} is being written by another rmt process; wait for it to finish, or choose "
                       "another --out") from exc
    return handle


def check_writable(run_dir: Path) -> None:
    """The run folder (or the folder it will be created in) must be writable, checked before any work."""
    import os

    target = run_dir
    while not target.exists():
        target = target.parent
    if not target.is_dir():
        raise RmtError(f"{target} is a file; cannot create {run_dir} inside it")
    if not os.access(target, os.W_OK | os.X_OK):
        raise RmtError(f"{target} is not writable; choose another --out")


@contextlib.contextmanager
def gathered_weights(model):
    """Full weights on every process for the length of the block: generation (and other no-grad forwards,
    e.g. RLP's reward) under a sharded engine.

    Under FSDP2 every forward of a sharded module gathers its weights (a collective) and frees them again:
    decoding token by token would gather all the weights for every token, and processes that decode
    different numbers of tokens would wait on each other forever. Here every process gathers each sharded
    module's weights once, in the same order, keeps them through any number of forwards, and frees them at
    the end. FSDP1 has its own context for the same thing; DDP and one process need nothing."""
    from torch.distributed.fsdp import FSDPModule

    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if sharded:
        for m in sharded:
            m.set_reshard_after_forward(False)
        for m in sharded:
            m.unshard()
        try:
            yield
        finally:
            for m in sharded:
                m.reshard()
                m.set_reshard_after_forward(True)
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1

    if any(isinstance(m, FSDP1) for m in model.modules()):
        with FSDP1.summon_full_params(model, writeback=False, recurse=True):
            yield
        return
    yield


def warn_if_too_large(config, model_path: str, world: int, distributed_type) -> None:
    """Print the memory estimate (`rmt.memory`) when it exceeds this GPU's memory, before loading anything."""
    from accelerate.utils import DistributedType
    from transformers import AutoConfig

    from rmt.memory import ModelShape, estimate, format_estimate

    if not hasattr(config, "rollout") or not hasattr(config, "budget"):
        return
    device_gib = torch.cuda.get_device_properties(0).total_memory / 1024**3
    parts = estimate(ModelShape.from_config(AutoConfig.from_pretrained(model_path)), config, world,
                     sharded=distributed_type == DistributedType.FSDP, gpu=True)
    if parts["total"] > device_gib:
        print(f"warning: this run may not fit in the GPU's memory (estimate per process, `rmt doctor --memory`):\n"
              f"{format_estimate(parts, device_gib)}")


def rollout_seed(*parts: int) -> int:
    """A seed from integers (run seed, step, item, member ...): each rollout samples from its own."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class TrainingRun:
    """The accelerator, model, optimizer, tokenizer and run folder of one training run.

    `config` is a `RunConfig` (model, out, steps, seed, save_every, keep_last, dtype, ...), `optim` an
    `OptimConfig`. Nothing is written until `start()`: a run that fails while it is being built leaves no
    folder behind, and a resumed run's files are untouched."""

    def __init__(self, config, optim, resume: bool = False, trackers: tuple[str, ...] = (),
                 allow_changes: bool = False, previous_if_damaged: bool = False):
        self.config, self.resume = config, resume
        gpu = torch.cuda.is_available()
        self.accelerator = Accelerator(
            cpu=not gpu,  # lets torchrun / accelerate launch use gloo on CPU machines
            # auto: fp32 parameters (the master copy) with bf16 compute on GPUs; bfloat16: bf16 parameters
            mixed_precision="bf16" if config.dtype == "auto" and gpu else "no",
            log_with=list(trackers) or None, project_dir=config.out,
        )
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            raise RmtError("DeepSpeed is not supported (it steps after a fixed number of backward passes; a step "
                           "here has one per pack): use FSDP, e.g. configs/accelerate/fsdp.yaml")
        self.main = self.accelerator.is_main_process
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        self.run_dir = check_run_dir(config.out, resume)
        check_writable(self.run_dir)
        self._lock = lock_run_dir(self.run_dir) if self.main and self.run_dir.is_dir() else None
        self.resume_from = None
        if resume:
            check_resume_config(self.run_dir, config, allow_changes)
            self.resume_from = checkpoint.resume_checkpoint(self.run_dir, previous_if_damaged)
        torch.manual_seed(config.seed)
        self.model_path = assets.resolve_model(config.model)
        self.tokenizer = assets.load_tokenizer(self.model_path)
        if gpu and self.main:
            warn_if_too_large(config, self.model_path, self.world, self.accelerator.distributed_type)
        model = assets.load_model(self.model_path, torch.bfloat16 if config.dtype == "bfloat16" else torch.float32)
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        optimizer = torch.optim.AdamW(model.parameters(), lr=optim.lr, betas=tuple(optim.betas),
                                      weight_decay=optim.weight_decay)
        scheduler = get_constant_schedule_with_warmup(optimizer, optim.warmup_steps)
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        self.policy = self.accelerator.unwrap_model(self.model)
        self.grad_clip = optim.grad_clip
        self.metrics = MetricsLog(self.run_dir / METRICS_FILE)
        self.device = self.accelerator.device

    def load_reference(self):
        """A frozen copy of the starting model (for a KL term)."""
        return assets.load_model(self.model_path).to(self.device).eval().requires_grad_(False)

    def share(self, items: list, per_rank: int | None = None) -> tuple[int, list]:
        """This process's slice of a step's items (every process draws them all, in the same order):
        (index of its first item, its items)."""
        n = per_rank if per_rank is not None else len(items) // self.world
        return self.rank * n, items[self.rank * n : (self.rank + 1) * n]

    def start(self, state_objects=(), tracker_config: dict | None = None) -> int:
        """Register objects whose state goes into checkpoints, restore everything on resume, write the
        resolved config; returns the step to start from."""
        self.accelerator.register_for_checkpointing(*state_objects)
        step = 0
        if self.resume:
            step = checkpoint.load_checkpoint(self.accelerator, self.resume_from, self.model)
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._lock = self._lock or lock_run_dir(self.run_dir)
            if self.resume:
                self.metrics.truncate(step)
            save_config(self.config, self.run_dir / CONFIG_FILE)
        self.accelerator.wait_for_everyone()
        if tracker_config is not None and self.accelerator.log_with:
            self.accelerator.init_trackers("rmt", config=tracker_config)
        return step

    # ---- one step -------------------------------------------------------------------------------------

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """Backpropagate one chunk of a step. Every chunk's loss is already its share of the step's mean,
        and the engine averages over processes, hence the factor `world`; gradients are reduced across
        processes on the step's last backward only."""
        ctx = contextlib.nullcontext() if last else self.accelerator.no_sync(self.model)
        with ctx:
            self.accelerator.backward(loss * self.world)

    def optimizer_step(self) -> float:
        """Clip, step, schedule, zero; returns the global gradient norm before clipping."""
        grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor; its local value would be one shard's norm
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def global_sum(self, value: float) -> float:
        if self.world == 1:
            return value
        return float(self.accelerator.reduce(torch.tensor(float(value), device=self.device), "sum"))

    def global_max(self, value: float) -> float:
        if self.world == 1:
            return value
        import torch.distributed as dist

        tensor = torch.tensor(float(value), device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return float(tensor)

    def gather_metrics(self, metrics: dict) -> dict:
        """Per-process metrics averaged across processes (counts summed, maxima and minima kept; NaN -- nothing
        measured on a process -- left out of means, and None when no process measured it)."""
        if not metrics:
            return metrics
        keys = sorted(metrics)
        values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=self.device)
        gathered = self.accelerator.gather(values.unsqueeze(0)) if self.world > 1 else values.unsqueeze(0)
        out = {}
        for i, k in enumerate(keys):
            column = gathered[:, i]
            if k in ("zero_std_groups", "tokens_generated"):
                out[k] = int(column.sum())
            elif k.endswith("_max"):
                out[k] = int(column.max())
            elif k.endswith("_min"):
                out[k] = int(column.min())
            else:
                finite = column[~column.isnan()]
                out[k] = float(finite.mean()) if finite.numel() else None
        return out

    def log(self, record: dict) -> None:
        if self.main:
            self.metrics.append(record)
        if self.accelerator.log_with:
            self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])

    def maybe_checkpoint(self, step: int, info: dict) -> None:
        """Checkpoint after `step` steps (1-based) every `save_every` steps and at the end."""
        if step % self.config.save_every == 0 or step == self.config.steps:
            export = torch.bfloat16 if self.config.export_dtype == "bfloat16" else None
            checkpoint.save_checkpoint(self.accelerator, self.run_dir, step, self.model, self.tokenizer,
                                       {**info, "total_steps": self.config.steps}, self.config.keep_last, export)

    def finish(self) -> Path:
        self.accelerator.end_training()
        if self.main:
            print(f"run saved to {self.run_dir} (checkpoint: {checkpoint.latest_checkpoint(self.run_dir)})")
        return self.run_dir
