"""Adapter-only checkpoints in our layout: a safetensors file of the trained tensors and a JSON
spec (peft's layout: peft_format.py; load_adapter and read_spec read both).

Loading never unpickles (safetensors holds raw tensors only), and refuses a checkpoint whose
targets or shapes do not fit the base model, naming the first offending tensors.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from peft_modules.inject import AdapterSummary, inject_adapters
from peft_modules.spec import AdapterSpec

WEIGHTS = "adapter.safetensors"
CONFIG = "adapter_config.json"


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


def read_spec(adapter_dir: str | Path) -> AdapterSpec:
    """The spec of an adapter folder in our layout, or in peft's (see peft_format)."""
    path = Path(adapter_dir) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path}: adapter config not found")
    meta = json.loads(path.read_text())
    if "spec" not in meta:  # peft's config has its fields at the top level
        from peft_modules.peft_format import spec_from_peft  # it imports this module
        return spec_from_peft(meta, str(path))
    return AdapterSpec.model_validate(meta["spec"])


def check_fit(path: Path, saved: dict, expected: dict, optional: dict | None = None) -> None:
    """Every `expected` tensor saved, nothing unknown, all shapes right. `optional` tensors may
    be absent (a frozen head that peft's layout carries anyway)."""
    optional = optional or {}
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected) - set(optional))
    if missing or unexpected:
        raise ValueError(f"{path}: adapter does not fit this base model; "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    known = {**optional, **expected}
    wrong = [f"{k}: saved {tuple(saved[k].shape)} vs model {tuple(known[k].shape)}"
             for k in saved if saved[k].shape != known[k].shape]
    if wrong:
        raise ValueError(f"{path}: adapter shapes do not fit this base model: {wrong[:5]}")


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> AdapterSummary:
    """Inject the saved spec into a freshly loaded base model and load the saved tensors.
    A folder in peft's layout (adapter_model.safetensors) goes to load_peft_adapter."""
    from peft_modules.peft_format import is_peft_dir, load_peft_adapter  # it imports this module

    path = Path(adapter_dir) / WEIGHTS
    if not path.is_file() and is_peft_dir(adapter_dir):
        return load_peft_adapter(model, adapter_dir)
    spec = read_spec(adapter_dir)
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
