"""Which layout an adapter folder holds, ours or peft's, and loading either: the one place
that knows both, so that neither layout module imports the other."""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from peft_modules.formats import hf_peft, native
from peft_modules.formats.common import CONFIG
from peft_modules.inject import AdapterSummary
from peft_modules.spec import AdapterSpec


def read_spec(adapter_dir: str | Path) -> AdapterSpec:
    """The spec of an adapter folder in our layout or in peft's."""
    path = Path(adapter_dir) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path}: adapter config not found")
    meta = json.loads(path.read_text())
    if native.is_native_meta(meta):
        return native.spec_from_meta(meta)
    return hf_peft.spec_from_peft(meta, str(path))


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> AdapterSummary:
    """Inject the saved spec into a freshly loaded base model and load the saved tensors. A
    folder in peft's layout (adapter_model.safetensors, no adapter.safetensors) goes to peft's
    loader."""
    if not (Path(adapter_dir) / native.WEIGHTS).is_file() and hf_peft.is_peft_dir(adapter_dir):
        return hf_peft.load_peft_adapter(model, adapter_dir)
    return native.load_native_adapter(model, adapter_dir, read_spec(adapter_dir))
