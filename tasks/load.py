"""Model loading (optionally 4-bit) and adapter injection, as plain functions and Prefect tasks.

Model objects never go through a Prefect cache key (NO_CACHE): Prefect would pickle them to hash.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, BitsAndBytesConfig

import peft_modules as pm
from peft_modules.quant import keep_layout
from tasks.config.schema import MethodConfig, ModelConfig
from tasks.models.source import local_path


def quantization_config(method: MethodConfig, keep_float: list[str]) -> BitsAndBytesConfig:
    """NF4/FP4 for every Linear but `keep_float`. QLoRA (Dettmers et al. 2023, §3) quantises
    the frozen base only; the head is trained, and bitsandbytes cannot train a 4-bit layer."""
    q = method.quantization
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type,
                              bnb_4bit_use_double_quant=q.double_quant,
                              bnb_4bit_compute_dtype=getattr(torch, q.compute_dtype),
                              llm_int8_skip_modules=keep_float)


def head_modules(model_cfg: ModelConfig) -> list[str]:
    """The model's head modules (peft_modules.inject.HEAD_NAMES), found on a meta-device copy
    built from its config: no weights. transformers keeps only the last parameter's module in
    float by itself, which is `score` for GPT-2 but `classifier.bias` for BERT."""
    config = AutoConfig.from_pretrained(local_path(model_cfg), revision=model_cfg.revision,
                                        trust_remote_code=model_cfg.trust_remote_code)
    with torch.device("meta"):
        meta = AutoModelForSequenceClassification.from_config(
            config, trust_remote_code=model_cfg.trust_remote_code)
    return pm.head_names(meta)


def load_model(model_cfg: ModelConfig, method: MethodConfig, num_labels: int,
               pad_token_id: int, device: torch.device,
               label_names: Optional[list[str]] = None) -> nn.Module:
    """AutoModelForSequenceClassification from a hub id or a local directory; 4-bit for
    qlora/qdora and for method: peft with a quantization: block. peft's
    prepare_model_for_kbit_training is not called: it casts fp16/bf16 weights to float32 (ours
    already compute in the config's dtype) and turns gradient checkpointing on, which would
    change the time measured, not the method. The pad token is set so the pooled token is the last real one. With class
    names (tasks/data/labels.py) the config's id2label/label2id carry them, so a saved or exported
    model says what each logit means; integer labels keep transformers' LABEL_<i>."""
    # use_safetensors: never unpickle weights (a pickle can run code); preflight refuses a
    # pickle-only folder by name, and transformers raises for a hub model without safetensors.
    kwargs = dict(num_labels=num_labels, revision=model_cfg.revision,
                  trust_remote_code=model_cfg.trust_remote_code,
                  dtype=getattr(torch, model_cfg.dtype), use_safetensors=True)
    if method.quantized:
        kwargs.update(quantization_config=quantization_config(method, head_modules(model_cfg)),
                      device_map={"": str(device) if device.type == "cpu" else device.index or 0})
    if label_names is not None:
        kwargs.update(id2label=dict(enumerate(label_names)),
                      label2id={name: i for i, name in enumerate(label_names)})
    model = AutoModelForSequenceClassification.from_pretrained(local_path(model_cfg), **kwargs)
    model.config.pad_token_id = pad_token_id
    if not method.quantized:
        model.to(device)
    return keep_layout(model)


def saved_size_mb(model: nn.Module) -> float:
    """Size of the model as save_pretrained actually writes it (float or 4-bit safetensors)."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return sum(p.stat().st_size for p in Path(tmp).rglob("*.safetensors")) / 2**20


@task(name="load-model", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=10)
def load_model_task(model_cfg: ModelConfig, method: MethodConfig, num_labels: int,
                    pad_token_id: int, device: str,
                    label_names: Optional[list[str]] = None) -> nn.Module:
    return load_model(model_cfg, method, num_labels, pad_token_id, torch.device(device),
                      label_names)


@task(name="inject-adapter", cache_policy=NO_CACHE)
def inject_adapter_task(model: nn.Module, method: MethodConfig) -> pm.AdapterSummary:
    """Our adapters in place; for method: peft, peft's get_peft_model with the head as
    modules_to_save (the summary's `model` is then the PeftModel to train)."""
    if method.method == "peft":
        from tasks.methods.hf_peft import inject_peft

        return inject_peft(model, method.peft, pm.head_names(model))
    return pm.inject_adapters(model, method.adapter_spec())
