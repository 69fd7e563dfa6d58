"""Per-GPU memory of a training run, estimated from the model's config and the run's settings.

`rmt doctor --memory --config FILE --processes N` prints the estimate; `rmt train` warns before a GPU run
whose estimate exceeds the device's memory. The terms (GiB per process):

- weights: parameters in the training precision (fp32 unless `dtype=bfloat16`), sharded over the processes
  under FSDP;
- gradients and AdamW's two moments: one and two copies of the parameters, in their dtype, sharded likewise;
- rollout weights: under FSDP, generation gathers the whole model once per rollout phase (in bf16 on GPU),
  so every process holds a full copy while it decodes (`runs.gathered_weights`);
- KV cache: one rollout batch of `rollout.batch_size` rows of prompt + reasoning cap + answer tokens;
- logits: the bf16 logits of the longest pack (`optim.pack_tokens` rows over the vocabulary) plus one
  float32 chunk of them (`losses.ROWS_PER_CHUNK`);
- activations: with gradient checkpointing one hidden state per layer per packed token plus one layer's
  working set; without, about 16 hidden-sized tensors per layer per token.

These are estimates, not measurements: allocator fragmentation, CUDA context (~0.5–1 GiB) and temporary
buffers come on top. They are for spotting a run that cannot fit before it starts.
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 1024**3


@dataclass
class ModelShape:
    params: int
    layers: int
    hidden: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        """Counts the parameters on the meta device: nothing is allocated or downloaded."""
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(params=sum(p.numel() for p in model.parameters()), layers=config.num_hidden_layers,
                   hidden=config.hidden_size, kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                   head_dim=head_dim, vocab=config.vocab_size)


def estimate(shape: ModelShape, config, processes: int = 1, sharded: bool = False, gpu: bool = True,
             prompt_tokens: int = 512) -> dict[str, float]:
    """GiB per process for a `TrainConfig`-like `config` (needs dtype, gradient_checkpointing, optim,
    rollout and budget sections)."""
    share = processes if sharded else 1
    param_bytes = 2 if config.dtype == "bfloat16" else 4
    compute_bytes = 2 if gpu and config.dtype != "float32" else 4
    n = shape.params
    budget = config.budget
    cap = 2 * budget.b0 if budget.enabled else budget.max_reasoning_tokens
    rows, seq = config.rollout.batch_size, prompt_tokens + cap + config.rollout.answer_tokens
    kv = rows * seq * shape.layers * 2 * shape.kv_heads * shape.head_dim * compute_bytes
    pack = config.optim.pack_tokens
    from rmt.losses import ROWS_PER_CHUNK

    logits = pack * shape.vocab * compute_bytes + min(pack, ROWS_PER_CHUNK) * shape.vocab * 4 * 2
    per_token_layer = shape.hidden * compute_bytes * (1 if config.gradient_checkpointing else 16)
    activations = pack * shape.layers * per_token_layer + pack * shape.hidden * compute_bytes * 16
    out = {
        "weights": n * param_bytes / share,
        "gradients": n * param_bytes / share,  # gradients and AdamW's moments take the parameters' dtype
        "optimizer (AdamW)": 2 * n * param_bytes / share,
        "rollout weights (gathered)": n * compute_bytes if sharded else 0.0,
        "KV cache (one rollout batch)": kv,
        "logits (longest pack)": logits,
        "activations (longest pack)": activations,
    }
    out = {k: v / GiB for k, v in out.items()}
    out["total"] = sum(out.values())
    return out


def format_estimate(parts: dict[str, float], device_gib: float | None = None) -> str:
    lines = [f"  {name:<30} {gib:8.1f} GiB" for name, gib in parts.items()]
    if device_gib:
        verdict = "fits" if parts["total"] <= device_gib else "does NOT fit"
        lines.append(f"  {'device memory':<30} {device_gib:8.1f} GiB: the estimate {verdict}")
    return "\n".join(lines)
