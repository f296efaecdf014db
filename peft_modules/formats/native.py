"""Adapter-only checkpoints in our layout: a safetensors file of the trained tensors and a JSON
spec (peft's layout: hf_peft.py; `detect` reads either).

Loading never unpickles (safetensors holds raw tensors only), and refuses a checkpoint whose
targets or shapes do not fit the base model, naming the first offending tensors.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from peft_modules.formats.common import CONFIG, check_fit
from peft_modules.inject import AdapterSummary, inject_adapters
from peft_modules.spec import AdapterSpec

WEIGHTS = "adapter.safetensors"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable tensor: adapter A, B (and DoRA m), plus the head when it trains."""
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_adapter(model: nn.Module, spec: AdapterSpec, out_dir: str | Path) -> Path:
    """Write adapter.safetensors + adapter_config.json into out_dir; returns the weights path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = trainable_state(model)
    save_file(state, str(out / WEIGHTS), metadata={"format": "pt"})
    meta = {"spec": spec.model_dump(mode="json"),
            "tensors": {k: list(v.shape) for k, v in state.items()}}
    (out / CONFIG).write_text(json.dumps(meta, indent=2))
    return out / WEIGHTS


def is_native_meta(meta: dict) -> bool:
    """Our adapter_config.json nests the spec; peft's has its fields at the top level."""
    return "spec" in meta


def spec_from_meta(meta: dict) -> AdapterSpec:
    return AdapterSpec.model_validate(meta["spec"])


def load_native_adapter(model: nn.Module, adapter_dir: str | Path, spec: AdapterSpec) -> AdapterSummary:
    """Inject `spec` into a freshly loaded base model and load the saved tensors."""
    path = Path(adapter_dir) / WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{path}: adapter weights not found")
    saved = load_file(str(path))
    summary = inject_adapters(model, spec)
    params = dict(model.named_parameters())
    expected = {n: p for n, p in params.items() if p.requires_grad}
    check_fit(path, saved, expected)
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor.to(params[name].dtype))
    return summary
