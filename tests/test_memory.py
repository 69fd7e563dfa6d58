"""The per-GPU memory estimate (`rmt.memory`) against hand-computed terms."""

import pytest
from transformers import LlamaConfig

from rmt.config import load_config
from rmt.memory import GiB, ModelShape, estimate


def test_model_shape_counts_parameters_on_the_meta_device():
    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    shape = ModelShape.from_config(config)
    # embeddings 1000·64 (tied lm_head) + per layer: q 64·64, k,v 64·32 each, o 64·64, mlp 3·64·128, 2 norms of 64
    per_layer = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64
    assert shape.params == 1000 * 64 + 2 * per_layer + 64
    assert (shape.layers, shape.hidden, shape.kv_heads, shape.head_dim, shape.vocab) == (2, 64, 2, 16, 1000)


def test_estimate_hand_computed():
    shape = ModelShape(params=10**9, layers=10, hidden=1000, kv_heads=4, head_dim=100, vocab=50_000)
    config = load_config(None, ["dtype=auto", "gradient_checkpointing=true", "rollout.batch_size=8",
                                "budget.b0=100", "rollout.answer_tokens=20", "optim.pack_tokens=1000"])
    parts = estimate(shape, config, processes=4, sharded=True, gpu=True, prompt_tokens=280)
    assert parts["weights"] == pytest.approx(4e9 / 4 / GiB)  # fp32 masters, sharded over 4
    assert parts["optimizer (AdamW)"] == pytest.approx(2 * 4e9 / 4 / GiB)
    assert parts["rollout weights (gathered)"] == pytest.approx(2e9 / GiB)  # the whole model in bf16
    # 8 rows x (280 + 2·100 + 20) tokens x 10 layers x (K and V) x 4 heads x 100 dims x 2 bytes
    assert parts["KV cache (one rollout batch)"] == pytest.approx(8 * 500 * 10 * 2 * 4 * 100 * 2 / GiB)
    unsharded = estimate(shape, config, processes=4, sharded=False, gpu=True, prompt_tokens=280)
    assert unsharded["weights"] == pytest.approx(4e9 / GiB) and unsharded["rollout weights (gathered)"] == 0
    assert parts["total"] == pytest.approx(sum(v for k, v in parts.items() if k != "total"))
