"""What every benchmark shares: the machine's state, its measured matmul rate, FLOP counts, and running
compared variants alternately so that other load on a shared machine slows them alike.

A benchmark's figures are only comparable with figures taken in the same run: the load of a shared
2-core machine changes absolute times 2–10×. So each benchmark runs its variants alternately, repeat by
repeat (A, B, A, B, …), reports the median and spread over the repeats, records the thread count and
the load average, and expresses each time as a fraction of what the CPU's arithmetic allows — the FLOPs
of the work divided by the matmul rate measured on the same machine, with the same threads, just before.
"""

from __future__ import annotations

import os
import statistics
import time

import torch


def machine_state() -> dict:
    """Threads, cores and load average, to print beside every result."""
    return {"threads": torch.get_num_threads(), "cores": os.cpu_count(), "load_1min": round(os.getloadavg()[0], 2)}


def matmul_gflops(threads: int | None = None, size: int = 1024, repeats: int = 5) -> float:
    """The median fp32 matmul rate (GFLOP/s) of this machine with `threads` threads: the arithmetic ceiling
    that a model's linear layers can reach here."""
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        for _ in range(3):
            a @ b
        rates = []
        for _ in range(repeats):
            n, start = 10, time.perf_counter()
            for _ in range(n):
                a @ b
            rates.append(2 * size**3 * n / (time.perf_counter() - start) / 1e9)
        return statistics.median(rates)
    finally:
        torch.set_num_threads(old)


def model_shape(model) -> dict:
    """Parameter counts a FLOP estimate needs: all, the output layer's, and the layer geometry."""
    config = model.config
    head = model.get_output_embeddings().weight.numel()
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    tied = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    body = total - embed - (0 if tied else head)  # the transformer layers and norms
    return {"body": body, "head": head, "layers": config.num_hidden_layers, "hidden": config.hidden_size}


def forward_flops(shape: dict, tokens: int, logit_rows: int, attended: float = 0.0) -> float:
    """FLOPs of one forward: 2 per weight per token through the layers, 2 per output-layer weight per row
    whose logits are computed, and 4·hidden per attended (query, key) pair per layer (scores and values).
    `attended` is the number of (query, key) pairs the attention computes (masked ones included)."""
    return 2 * shape["body"] * tokens + 2 * shape["head"] * logit_rows + 4 * shape["hidden"] * attended * shape["layers"]


def train_flops(shape: dict, tokens: int, logit_rows: int, attended: float = 0.0) -> float:
    """Forward and backward: the backward costs twice the forward."""
    return 3 * forward_flops(shape, tokens, logit_rows, attended)


def alternate(variants: dict, repeats: int) -> dict[str, list]:
    """Run each variant `repeats` times, alternating (A, B, A, B, …); `variants[name]()` returns a dict
    with at least `seconds`. Returns every variant's results in order."""
    results = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            results[name].append(run())
    return results


def summary(values: list[float]) -> str:
    """`median (min–max)`."""
    return f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"


def median(values: list[float]) -> float:
    return statistics.median(values)
