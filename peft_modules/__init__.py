"""Our LoRA, DoRA and QLoRA adapters: pure torch (bitsandbytes only in quant.py).

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
