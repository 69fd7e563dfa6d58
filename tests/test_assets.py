import time

import pytest
import torch

from rmt import assets
from rmt.errors import RmtError


def test_local_folder_is_passed_through(tiny_model_dir):
    assert assets.resolve_model(str(tiny_model_dir)) == str(tiny_model_dir)
    model = assets.load_model(str(tiny_model_dir))
    tokenizer = assets.load_tokenizer(str(tiny_model_dir))
    assert model.config.vocab_size == len(tokenizer)


def test_unknown_model_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RmtError, match="'no-such-org/no-such-model' is not in the local Hugging Face cache"):
        assets.load_tokenizer("no-such-org/no-such-model")
    with pytest.raises(RmtError, match="missing' does not exist"):
        assets.load_model(str(tmp_path / "missing"))


def test_one_resolver_for_every_form_of_model(tiny_model_dir, tmp_path):
    """Hub name, model folder, run folder (latest complete checkpoint); anything else is one clear error."""
    import json
    import shutil

    assert assets.resolve_model("Qwen/Qwen3-1.7B-Base") == "Qwen/Qwen3-1.7B-Base"
    assert assets.resolve_model(str(tiny_model_dir)) == str(tiny_model_dir)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    with pytest.raises(RmtError, match="no complete checkpoint"):
        assets.resolve_model(str(run))
    for step in (1, 2):
        shutil.copytree(tiny_model_dir, run / "checkpoints" / f"step-{step:06d}")
        (run / "checkpoints" / f"step-{step:06d}" / "trainer_state.json").write_text(json.dumps({"step": step}))
    shutil.copytree(tiny_model_dir, run / "checkpoints" / "step-000003")  # incomplete: no trainer_state.json
    assert assets.resolve_model(str(run)) == str(run / "checkpoints" / "step-000002")
    assert assets.load_model(str(run)).config.vocab_size > 0  # every command loads a run folder the same way
    (tmp_path / "empty").mkdir()
    with pytest.raises(RmtError, match="neither a model folder"):
        assets.resolve_model(str(tmp_path / "empty"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(RmtError, match="is a file"):
        assets.resolve_model(str(tmp_path / "file"))


@pytest.mark.slow
def test_embedded_model_converts_once_then_loads_fast_and_answers():
    path = assets.resolve_model(assets.EMBEDDED_MODEL)
    assert (assets.embedded_model_dir() / "model.safetensors").is_file()
    assert not [p for p in assets.embedded_model_dir().parent.iterdir() if p.name.startswith(".")]
    start = time.perf_counter()
    model = assets.load_model(assets.EMBEDDED_MODEL)
    tokenizer = assets.load_tokenizer(assets.EMBEDDED_MODEL)
    assert time.perf_counter() - start < 10  # ~2 s here; generous for loaded CI machines
    assert path == str(assets.embedded_model_dir())
    assert tokenizer.chat_template
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])
