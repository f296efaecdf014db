"""The one place that imports bitsandbytes. Everything 4-bit the adapters need goes through here,
so the rest of peft_modules runs where bitsandbytes is absent."""
from __future__ import annotations

import torch
from torch import nn

try:  # bitsandbytes is optional for float-only use of the adapters.
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF
except ImportError:  # pragma: no cover - exercised only where bnb is not installed
    bnb = None


def is_linear4bit(layer: nn.Module) -> bool:
    return bnb is not None and isinstance(layer, bnb.nn.Linear4bit)


def is_params4bit(p: torch.Tensor) -> bool:
    return bnb is not None and isinstance(p, bnb.nn.Params4bit)


def dequantize(layer: nn.Module) -> torch.Tensor:
    """W0 of a Linear4bit as a float (out, in) tensor, in the layer's quantisation dtype."""
    w = layer.weight
    return bnbF.dequantize_4bit(w.data, w.quant_state)


def matmul_nobias(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x @ W0ᵀ on the 4-bit weight, without the bias: the part DoRA rescales (Liu et al. §4.1)."""
    dtype = layer.compute_dtype or x.dtype
    w = layer.weight
    return bnb.matmul_4bit(x.to(dtype), w.t(), bias=None, quant_state=w.quant_state).to(x.dtype)


def dequantized_linear(layer: nn.Module, weight: torch.Tensor) -> nn.Linear:
    """A float nn.Linear standing in for a 4-bit layer after merge. Re-quantising it would be
    lossy: the merged weight no longer lies on the NF4/FP4 grid of the original blocks."""
    out = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                    device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if layer.bias is not None:
            out.bias.copy_(layer.bias.to(weight.dtype))
    out.requires_grad_(False)
    return out


def param_count(p: torch.Tensor) -> int:
    """Parameters a tensor stands for: Params4bit packs two 4-bit values in each uint8."""
    return p.numel() * 2 if is_params4bit(p) else p.numel()


def keep_layout(model: nn.Module) -> nn.Module:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    On CPUs with AVX512-BF16, Linear4bit.forward in eval mode rewrites the weight into another
    layout with bf16 absmax, on first use. Evaluation would then run other numerics than
    training, the DoRA norm would dequantise a changed weight, and small layers (in < 128)
    crash. One layout for train and eval keeps every measurement comparable.
    """
    for m in model.modules():
        if is_linear4bit(m):
            m.support_avx512bf16_for_cpu = False
    return model
