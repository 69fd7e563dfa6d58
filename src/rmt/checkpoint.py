"""Checkpoints: a Hugging Face model folder per saved step, with the trainer state beside it.

`RUN/checkpoints/step-000050/` holds `model.safetensors`, `config.json` and the tokenizer files (load it
with `AutoModelForCausalLM.from_pretrained`), `trainer_state/` (optimizer, scheduler, random states and
the sampler and data order, written by `accelerate`, so sharded FSDP/DeepSpeed states work too) and
`trainer_state.json`. Unsharded runs keep the weights once, in the Hugging Face files; FSDP/DeepSpeed
runs also keep accelerate's sharded copy, which is what resumes them. A checkpoint is written under a temporary name and renamed into place, so the
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


def save_checkpoint(accelerator, run_dir, step: int, model, tokenizer, info: dict, keep_last: int) -> Path:
    """Every process calls this; the model is consolidated and written once."""
    target = checkpoint_dir(run_dir, step)
    tmp = target.with_name(f".{target.name}.tmp")
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    skip_weights = None
    if not _sharded(accelerator):  # the Hugging Face files below hold the weights already
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


def load_checkpoint(accelerator, path: Path, model) -> int:
    """Restore model, optimizer, scheduler, random states and registered objects; returns the step."""
    if _sharded(accelerator):
        accelerator.load_state(str(path / "trainer_state"))
    else:
        hook = accelerator.register_load_state_pre_hook(lambda models, folder: models.clear())
        accelerator.load_state(str(path / "trainer_state"))
        hook.remove()
        _load_hf_weights(accelerator.unwrap_model(model), path)
    return checkpoint_step(path)


def _sharded(accelerator) -> bool:
    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


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
