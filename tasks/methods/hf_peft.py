"""Any Hugging Face peft config as a method: built from the `peft:` block, checked before any
model loads, injected with `peft.get_peft_model`.

peft is imported inside the functions: a config without `method: peft` never pays for it.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional

from peft_modules.inject import AdapterSummary, count_params
from tasks.config.peft_block import build_peft_config, config_class, config_fields

__all__ = ["PeftSummary", "build_peft_config", "config_class", "config_fields", "inject_peft",
           "refusal", "refusal_on", "save_peft"]


@dataclass
class PeftSummary(AdapterSummary):
    """An AdapterSummary that also carries the PeftModel get_peft_model returned: prompt-based
    methods add their virtual tokens in its forward, and it writes peft's layout."""

    model: Any = None


def inject_peft(model, block: dict, head_modules: list[str]) -> PeftSummary:
    """Wrap `model` with get_peft_model (peft's tuners replace the target layers in place; the
    returned PeftModel is the one to train, score and save)."""
    from peft import get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped = get_peft_model(model, build_peft_config(block, head_modules))
    layers = [n for n, m in wrapped.base_model.named_modules() if isinstance(m, BaseTunerLayer)]
    layers = [n.removeprefix("model.") for n in layers]
    return PeftSummary("peft", *count_params(wrapped), adapted_layers=layers, model=wrapped)


# Decoder heads (`score`: GPT-2, Llama, Mistral, Qwen2, OPT) pool the last real token, found
# from input_ids. Prompt-based methods hand the model inputs_embeds instead, and transformers
# then pools the last position (GPT2ForSequenceClassification: "will not detect padding tokens
# in inputs_embeds"), a padding token on every right-padded row: the run would train and score
# on the wrong token and still report a number.
LAST_TOKEN_PROMPT = ("prompt-based methods (prompt, prefix, p-tuning) pass inputs_embeds, and "
                     "this model's head then reads the last position, a padding token on every "
                     "right-padded row; use an encoder (BERT, RoBERTa, DeBERTa) for them")


def refusal_on(meta_model, block: dict, head_modules: list[str]) -> Optional[str]:
    """peft's reason for refusing `block` on this (meta-device) model, or None. peft 0.21 raises
    TypeError for a layer type its tuner lacks (GPT-2's Conv1D under OFT, BOFT, HRA, LoHa,
    LoKr, C3A, MiSS, DeLoRA, SHiRA) and ValueError for targets matching nothing; anything else
    (a meta tensor an init cannot read) is left for the run itself to report."""
    config = build_peft_config(block, head_modules)
    from peft import get_peft_model

    if config.is_prompt_learning and "score" in head_modules:
        return LAST_TOKEN_PROMPT
    try:
        get_peft_model(copy.deepcopy(meta_model), config)
    except (ValueError, TypeError) as e:
        return " ".join(str(e).split())[:500]
    except Exception:  # noqa: BLE001 - e.g. SHiRA's mask through torch.nonzero, no meta kernel
        return None
    return None


def refusal(model_cfg, block: dict) -> Optional[str]:
    """Try the method on a meta-device copy of the model (its config only, no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    import peft_modules as pm
    from tasks.models.source import local_path

    config = AutoConfig.from_pretrained(local_path(model_cfg), revision=model_cfg.revision,
                                        trust_remote_code=model_cfg.trust_remote_code)
    with torch.device("meta"):
        meta = AutoModelForSequenceClassification.from_config(
            config, trust_remote_code=model_cfg.trust_remote_code)
    return refusal_on(meta, block, pm.head_names(meta))


def save_peft(model, folder, base_model_name_or_path: str):
    """peft's own save_pretrained layout (adapter_model.safetensors + adapter_config.json,
    the head under modules_to_save), loadable with PeftModel.from_pretrained. The base's name is
    the one the caller gives (credentials masked), not the path the model was loaded from."""
    from pathlib import Path

    for cfg in model.peft_config.values():
        cfg.base_model_name_or_path = base_model_name_or_path
    model.save_pretrained(str(folder))
    return Path(folder) / "adapter_model.safetensors"
