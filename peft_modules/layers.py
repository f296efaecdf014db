"""LoRA and DoRA layers, wrapping nn.Linear, GPT-2's Conv1D or a bitsandbytes Linear4bit.

    LoRA  (Hu et al. 2021, eq. 3):      h = W0 x + b + s · B A x,           s = α/r (or α/√r, rsLoRA)
    DoRA  (Liu et al. 2024, eq. 5):     h = m · (W0 + sBA) x / ‖W0 + sBA‖_c + b

W0 stays frozen in whatever form the base layer holds it (float, or NF4/FP4 for QLoRA), and the
base layer's bias is kept. Shapes: x (..., in), A (r, in), B (out, r), m (out,).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from peft_modules import quant


def layer_kind(layer: nn.Module) -> Optional[str]:
    """'4bit', 'conv1d' or 'linear' for the layers we can adapt, else None."""
    if quant.is_linear4bit(layer):  # Linear4bit subclasses nn.Linear: test it first
        return "4bit"
    if isinstance(layer, Conv1D):
        return "conv1d"
    if isinstance(layer, nn.Linear):
        return "linear"
    return None


def base_weight(layer: nn.Module) -> torch.Tensor:
    """W0 as (out, in), dequantised if 4-bit. Conv1D stores (in, out), hence the transpose."""
    kind = layer_kind(layer)
    if kind == "4bit":
        return quant.dequantize(layer)
    return layer.weight.t() if kind == "conv1d" else layer.weight


class LoRALinear(nn.Module):
    """h = base(x) + s·B(A(dropout(x))). A fresh adapter (B = 0) leaves the output unchanged."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False, dtype: Optional[torch.dtype] = None):
        super().__init__()
        kind = layer_kind(base)
        if kind is None:
            raise ValueError(f"unsupported layer type {type(base).__name__}; "
                             "supported: Linear, Conv1D, Linear4bit")
        if rank <= 0 or alpha <= 0:
            raise ValueError(f"rank and alpha must be > 0, got rank={rank}, alpha={alpha}")
        self.base_layer, self.kind = base.requires_grad_(False), kind
        if kind == "4bit":
            quant.keep_layout(base)
        if kind == "conv1d":
            self.in_features, self.out_features = base.weight.shape
        else:
            self.in_features, self.out_features = base.in_features, base.out_features
        self.rank = rank
        self.scaling = alpha / (math.sqrt(rank) if rslora else rank)
        # The adapter trains in float even on a 4-bit base (QLoRA, Dettmers et al. 2023 §3).
        dtype = dtype or (torch.float32 if kind == "4bit" else base.weight.dtype)
        device = base.weight.device
        self.lora_a = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_b = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=dtype)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self._quantized_base: Optional[nn.Module] = None
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        # Hu et al. §4.1: A random, B zero, so ΔW = BA = 0 at the start. Kaiming-uniform with
        # a=√5 is nn.Linear's own default, which peft and the reference implementation use.
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base_layer.bias

    def delta_weight(self) -> torch.Tensor:
        """s·BA as (out, in)."""
        return self.scaling * (self.lora_b.weight @ self.lora_a.weight)

    def _lora_path(self, x: torch.Tensor) -> torch.Tensor:
        # (..., in) -> (..., r) -> (..., out); the input is cast to the adapter dtype, as
        # QLoRA's float adapter on a lower-precision activation requires.
        return self.lora_b(self.lora_a(self.dropout(x.to(self.lora_a.weight.dtype))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base_layer(x)
        if self.merged:
            return h
        # One fused add-with-scale instead of a scale then an add.
        return torch.add(h, self._lora_path(x).to(h.dtype), alpha=self.scaling)

    # ---- merge ---------------------------------------------------------------------------
    def merged_weight(self) -> torch.Tensor:
        return base_weight(self.base_layer).float() + self.delta_weight().float()

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into W0. A 4-bit base becomes a dequantised float Linear."""
        if self.merged:
            return
        w = self.merged_weight()
        if self.kind == "4bit":
            self._quantized_base = self.base_layer
            dtype = self.base_layer.compute_dtype or torch.float32
            self.base_layer = quant.dequantized_linear(self.base_layer, w.to(dtype))
        else:
            target = self.base_layer.weight
            target.copy_((w.t() if self.kind == "conv1d" else w).to(target.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        if self._quantized_base is not None:
            self.base_layer, self._quantized_base = self._quantized_base, None
        else:
            w = self.base_layer.weight
            w0 = self.unmerged_base(w.t() if self.kind == "conv1d" else w)
            w.copy_((w0.t() if self.kind == "conv1d" else w0).to(w.dtype))
        self.merged = False

    def unmerged_base(self, merged: torch.Tensor) -> torch.Tensor:
        return merged.float() - self.delta_weight().float()

    def extra_repr(self) -> str:
        return f"kind={self.kind}, in={self.in_features}, out={self.out_features}, " \
               f"r={self.rank}, scaling={self.scaling:g}, merged={self.merged}"


class DoRALinear(LoRALinear):
    """DoRA: W' = m · (W0 + sBA) / ‖W0 + sBA‖_c, the norm per output feature (Liu et al. 2024).

    W' is never built. Since W' x = (m/‖·‖) ⊙ (W0 x + s·BAx), the base layer's own output is
    rescaled and the low-rank path added; the norm is detached (§4.3), so it is computed under
    no_grad from r-sized products, not from a full-size W0 + sBA.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False, dtype: Optional[torch.dtype] = None):
        super().__init__(base, rank, alpha, dropout, rslora, dtype)
        with torch.no_grad():
            w0 = base_weight(base).float()
            sq = (w0 * w0).sum(dim=1)  # ‖W0‖² per output feature, constant while W0 is frozen
        self.register_buffer("w0_sq_norm", sq, persistent=False)
        self._merged_norm: Optional[torch.Tensor] = None  # ‖W0 + sBA‖ kept while merged
        # §4.1: m is initialised to ‖W0‖_c, so that W' = W0 at the start.
        self.magnitude = nn.Parameter(sq.sqrt().to(self.lora_a.weight.dtype))

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """‖W0 + sBA‖ per row from ‖W0‖² + 2s·⟨W0, BA⟩ + s²·‖BA‖², all (out, r)-sized. (out,)"""
        a, b = self.lora_a.weight.float(), self.lora_b.weight.float()
        w0 = base_weight(self.base_layer)
        w0_at = (w0 @ a.to(w0.dtype).t()).float()            # (out, r) = W0 Aᵀ
        cross = (b * w0_at).sum(dim=1)                         # ⟨W0_o, B_o A⟩
        ba_sq = ((b @ (a @ a.t())) * b).sum(dim=1)             # ‖B_o A‖²
        s = self.scaling
        return (self.w0_sq_norm + 2 * s * cross + s * s * ba_sq).clamp_min(0).sqrt()

    def _base_nobias(self, x: torch.Tensor) -> torch.Tensor:
        """W0 x without the bias, which DoRA must not rescale."""
        if self.kind == "4bit":
            return quant.matmul_nobias(self.base_layer, x)
        if self.kind == "conv1d":
            return x @ self.base_layer.weight                  # (…, in) @ (in, out)
        return F.linear(x, self.base_layer.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        h = self._base_nobias(x)                                # (…, out)
        h = torch.add(h, self._lora_path(x).to(h.dtype), alpha=self.scaling)
        scale = (self.magnitude / self.weight_norm()).to(h.dtype)   # (out,), norm detached
        if self.bias is None:
            return h * scale
        return torch.addcmul(self.bias.to(h.dtype), h, scale)

    def merged_weight(self) -> torch.Tensor:
        v = super().merged_weight()                             # V = W0 + sBA, float32
        # Kept for unmerge: once merged, W0 is gone and ‖V‖ can no longer be recomputed.
        self._merged_norm = v.norm(dim=1)
        return (self.magnitude.float() / self._merged_norm).unsqueeze(1) * v

    def unmerged_base(self, merged: torch.Tensor) -> torch.Tensor:
        # W' = (m/‖V‖) V, so V = W' ‖V‖/m and W0 = V - sBA.
        v = merged.float() * (self._merged_norm / self.magnitude.float()).unsqueeze(1)
        return v - self.delta_weight().float()
