import pytest

from rmt.tiny import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer random Llama with a trained byte-level BPE tokenizer and a chat template."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_model_no_template_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny_nochat") / "model", chat_template=False)


@pytest.fixture(autouse=True)
def _isolated_cache(monkeypatch, tmp_path_factory):
    # Tests never touch the user's cache; the embedded model's cache is shared across tests.
    monkeypatch.setenv("RMT_CACHE", str(tmp_path_factory.getbasetemp() / "rmt-cache"))


@pytest.fixture(scope="session")
def tiny_scored_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model's scored dataset of a small synthetic corpus (midtrain + eval)."""
    from helpers import score_tiny

    return score_tiny(tiny_model_dir, tmp_path_factory.mktemp("scored"))
