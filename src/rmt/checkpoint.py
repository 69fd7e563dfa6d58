"""Checkpoints: a Hugging Face model folder per saved step, with the trainer state beside it.

`RUN/checkpoints/step-000050/` holds `model.safetensors`, `config.json` and the tokenizer files (load it
with `AutoModelForCausalLM.from_pretrained`), `trainer_state/` (optimizer, scheduler, random states and
the sampler and data order, written by `accelerate`, so sharded FSDP states work too) and
`trainer_state.json`. Unsharded runs keep the weights once, in the Hugging Face files (unless those are
exported in a lower precision, `export_dtype`); FSDP runs also keep accelerate's sharded copy, which is what
resumes them. A checkpoint is written under a temporary name and renamed into place, so the
latest complete checkpoint is always whole; only the newest `keep_last` are kept.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from accelerate.utils import DistributedType
from safetensors.torch import load_file

from rmt.errors import RmtError

_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:06d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def checkpoint_step(path: Path | None) -> int:
    """The training step a checkpoint folder was saved at; 0 for None (no checkpoint yet)."""
    return json.loads((path / "trainer_state.json").read_text())["step"] if path else 0


def save_checkpoint(accelerator, run_dir, step: int, model, tokenizer, info: dict, keep_last: int,
                    export_dtype=None) -> Path:
    """Every process calls this; the model is consolidated and written once. `export_dtype` (e.g.
    torch.bfloat16) casts the Hugging Face files' weights; the exact weights then stay in trainer_state/."""
    target = checkpoint_dir(run_dir, step)
    tmp = target.with_name(f".{target.name}.tmp")
    state_dict = accelerator.get_state_dict(model)
    lossy = export_dtype is not None and any(v.is_floating_point() and v.dtype != export_dtype
                                             for v in state_dict.values())
    if lossy:
        state_dict = {k: v.to(export_dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    skip_weights = None
    if not _sharded(accelerator) and not lossy:  # the Hugging Face files below hold the exact weights already
        skip_weights = accelerator.register_save_state_pre_hook(lambda models, weights, out: weights.clear())
    accelerator.save_state(str(tmp / "trainer_state"))
    if skip_weights is not None:
        skip_weights.remove()
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        # Written last: its presence marks the folder complete.
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **info}, indent=2))
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return target


def safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file cannot be read whole (None if its header and size agree): a file cut short
    by a crash or a full disk is caught here, before any loader fails on it with a traceback."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                return "its header is cut short"
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        return None if 8 + n + end == size else f"{size} bytes, but its header describes {8 + n + end}"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable ({exc})"


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return sorted(folder.glob("*.safetensors"))


def checkpoint_problem(path: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from (None if it looks whole)."""
    try:
        checkpoint_step(path)
    except (OSError, ValueError, KeyError) as exc:
        return f"trainer_state.json is damaged ({exc})"
    files = weight_files(path)
    if not files:
        return "it holds no model weights"
    for f in files:
        problem = safetensors_problem(f)
        if problem:
            return f"{f.name}: {problem}"
    state = path / "trainer_state"
    if not state.is_dir() or not any(state.iterdir()):
        return "trainer_state/ (optimizer and random states) is missing"
    return None


def resume_checkpoint(run_dir: str | Path, previous_if_damaged: bool = False) -> Path:
    """The checkpoint to resume from: the latest one, checked whole. A damaged latest checkpoint is an error
    that names the problem and the previous complete checkpoint, which `previous_if_damaged` takes instead."""
    found = list_checkpoints(run_dir)
    if not found:
        raise RmtError(f"--resume: {run_dir} has no complete checkpoint to resume from")
    for i, path in enumerate(reversed(found)):
        problem = checkpoint_problem(path)
        if problem is None:
            if i:
                print(f"warning: resuming from {path.name}: the later checkpoint(s) are damaged")
            return path
        if not previous_if_damaged:
            earlier = next((p for p in reversed(found[: len(found) - 1 - i]) if checkpoint_problem(p) is None), None)
            hint = (f"; add --from-previous-checkpoint to resume from {earlier.name}" if earlier else
                    "; no earlier checkpoint is whole either: start the run again")
            raise RmtError(f"--resume: the latest checkpoint {path} is damaged ({problem}){hint}")
    raise RmtError(f"--resume: every checkpoint of {run_dir} is damaged; start the run again")


def load_checkpoint(accelerator, path: Path, model) -> int:
    """Restore model, optimizer, scheduler, random states and registered objects; returns the step."""
    try:
        if _sharded(accelerator) or _has_exact_weights(path / "trainer_state"):
            accelerator.load_state(str(path / "trainer_state"))
        else:
            hook = accelerator.register_load_state_pre_hook(lambda models, folder: models.clear())
            accelerator.load_state(str(path / "trainer_state"))
            hook.remove()
            _load_hf_weights(accelerator.unwrap_model(model), path)
    except RmtError:
        raise
    except Exception as exc:  # torch.load / pickle / safetensors raise many types for a damaged file
        raise RmtError(f"{path}: cannot restore the checkpoint ({type(exc).__name__}: {str(exc)[:200]})") from exc
    return checkpoint_step(path)


def _has_exact_weights(state: Path) -> bool:
    """accelerate wrote the model itself into trainer_state/ (the Hugging Face files are a lower precision)."""
    return any(state.glob("model*.safetensors")) or any(state.glob("pytorch_model*.bin"))


def _sharded(accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def _load_hf_weights(model, folder: Path) -> None:
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    weights = {}
    for name in files:
        weights.update(load_file(folder / name))
    result = model.load_state_dict(weights, strict=False)
    # Tied weights (e.g. lm_head = embeddings) are saved once; anything else missing is an error.
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {params[k].data_ptr() for k in weights if k in params}
    missing = [k for k in result.missing_keys if k not in params or params[k].data_ptr() not in loaded]
    if missing or result.unexpected_keys:
        raise RmtError(f"{folder}: checkpoint does not fit the model (missing {missing[:3]}, "
                       f"unexpected {result.unexpected_keys[:3]})")
