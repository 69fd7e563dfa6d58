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
    with pytest.raises(RmtError, match="cannot load model 'no-such-org/no-such-model'"):
        assets.load_tokenizer("no-such-org/no-such-model")
    with pytest.raises(RmtError, match="cannot load model"):
        assets.load_model(str(tmp_path / "missing"))


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
