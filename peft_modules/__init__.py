"""Our LoRA, DoRA and QLoRA adapters: pure torch (bitsandbytes only in quant.py)."""
from peft_modules.inject import (AdapterSummary, adapter_layers, count_params, find_targets,
                                 inject_adapters, merge_adapters, merge_and_unload,
                                 unmerge_adapters)
from peft_modules.io import load_adapter, read_spec, save_adapter
from peft_modules.lora import DoRALinear, LoRALinear
from peft_modules.peft_format import load_peft_adapter, read_peft_config, save_peft_adapter
from peft_modules.spec import AdapterSpec

__all__ = ["AdapterSpec", "AdapterSummary", "DoRALinear", "LoRALinear", "adapter_layers",
           "count_params", "find_targets", "inject_adapters", "load_adapter",
           "load_peft_adapter", "merge_adapters", "merge_and_unload", "read_peft_config",
           "read_spec", "save_adapter", "save_peft_adapter", "unmerge_adapters"]
