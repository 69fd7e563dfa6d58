"""A tiny, randomly initialised causal LM with its own small tokenizer, for tests and benchmarks.

Nothing is downloaded: a byte-level BPE tokenizer is trained on a few hundred generated sentences and a
2-layer Llama is built around it, so the whole pipeline can run end to end in seconds on a CPU.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    names = ["Janet", "Tom", "Ana", "Li", "Omar", "Zoë"]
    things = ["eggs", "apples", "books", "coins", "paragraphs", "cafés"]
    out = []
    for _ in range(n):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        name, thing = rng.choice(names), rng.choice(things)
        out.append(
            f"{name} has {a} {thing} and buys {b} more. How many {thing} now? {a} + {b} = {a + b}. "
            f"<think> reasoning about the next token </think> \\boxed{{ {thing}}} #### {a + b}"
        )
    return out


def build_tiny_model(out_dir: str | Path, seed: int = 0, chat_template: bool = True, vocab_size: int = 512) -> Path:
    """Write a tiny Llama + tokenizer to `out_dir` (a normal Hugging Face folder) and return it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=_SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    core.train_from_iterator(_sentences(400, seed), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|im_start|>"
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
