"""How close a training loop runs to the machine: model FLOP/s against the fp32 matmul rate at
the model's own shapes, measured in the same run.

Counting (Kaplan et al. 2020, sec. 2.1; the "6N" rule): a token costs 2N FLOPs forward through
N matmul weights, and 4N backward (gradients of the activations and of the weights). With
frozen weights (LoRA) the weight gradients are skipped: about 4N, plus the adapter's own 6 r
(d_in + d_out) per adapted layer. N counts the Linear/Conv1D weights outside the embeddings
and the head; the attention score matmuls (4 L d per token per layer at length L) are left
out, about L / 6d of the total (1-2% at L = 64, d = 384).
"""
from __future__ import annotations

import time
from statistics import median

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import peft_modules as pm


def matmul_shapes(model: nn.Module) -> list[tuple[int, int]]:
    """(d_in, d_out) of every matmul weight a token passes through: the Linear and Conv1D
    layers outside the classification head, of a model as loaded (no adapters yet)."""
    heads, shapes = pm.head_names(model), []
    for name, m in model.named_modules():
        if any(name == h or name.startswith(h + ".") for h in heads):
            continue
        if isinstance(m, nn.Linear):
            shapes.append((m.in_features, m.out_features))
        elif isinstance(m, Conv1D):
            shapes.append(tuple(m.weight.shape))  # Conv1D stores (d_in, d_out)
    return shapes


def flops_per_token(shapes: list[tuple[int, int]], adapter_params: int | None) -> float:
    """6N for full fine-tuning (`adapter_params` None); 4N + 6 x the adapters' own weights
    (A and B: r (d_in + d_out) per adapted layer) when the base is frozen."""
    n = sum(i * o for i, o in shapes)
    return 6.0 * n if adapter_params is None else 4.0 * n + 6.0 * adapter_params


def matmul_rate(shapes: list[tuple[int, int]], rows: int, threads: int,
                repeats: int = 5, calls: int = 20) -> float:
    """fp32 FLOP/s of x @ W.T over the model's layer shapes, `rows` tokens per batch (a
    batch's padded positions), each shape weighted as often as the model has it: the median of
    `repeats` passes of `calls` forward passes."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    xs = {i: torch.randn(rows, i, generator=g) for i, _ in set(shapes)}
    ws = {s: torch.randn(s[1], s[0], generator=g) for s in set(shapes)}
    flops = calls * sum(2.0 * rows * i * o for i, o in shapes)
    for s in set(shapes):  # warm the kernels
        xs[s[0]] @ ws[s].T
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            for s in shapes:
                xs[s[0]] @ ws[s].T
        rates.append(flops / (time.perf_counter() - t0))
    return median(rates)
