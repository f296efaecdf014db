"""Our LoRA, DoRA and QLoRA adapters.

Depends on torch; transformers only for GPT-2's `Conv1D` layer type (layers.py); safetensors
for the adapter files (formats/); pydantic for the spec (spec.py); bitsandbytes, optional and
only in quant.py, for QLoRA's 4-bit base layers. Hugging Face peft is not imported: hf_peft.py
writes and reads its layout by itself.

    layers    LoRALinear, DoRALinear: wrap nn.Linear, Conv1D or a 4-bit Linear4bit
    inject    find the target layers, put adapters in, merge or take them out, count params
    quant     the one place that imports bitsandbytes: 4-bit checks, dequantise, matmul
    spec      AdapterSpec: method, target layers, hyper-parameters; default targets per model
    formats/  adapters on disk: native (ours), hf_peft (peft's layout), detect (which one a
              folder holds, and loading either), common (what both share)

The names below are imported on first use (PEP 562), so that `peft_modules.spec` (a pydantic
model, used to validate configs) can be imported without paying for torch: a bad config is
refused in well under a second.
"""
from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "AdapterSpec": "spec",
    "AdapterSummary": "inject", "adapter_layers": "inject", "count_params": "inject",
    "find_targets": "inject", "head_names": "inject", "inject_adapters": "inject", "merge_adapters": "inject",
    "merge_and_unload": "inject", "unmerge_adapters": "inject",
    "load_adapter": "formats.detect", "read_spec": "formats.detect", "save_adapter": "formats.native",
    "DoRALinear": "layers", "LoRALinear": "layers",
    "load_peft_adapter": "formats.hf_peft", "read_peft_config": "formats.hf_peft",
    "save_peft_adapter": "formats.hf_peft",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'peft_modules' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"peft_modules.{_WHERE[name]}"), name)
    globals()[name] = value  # next time a plain attribute
    return value


def __dir__() -> list[str]:
    return __all__
