"""Model loading (optionally 4-bit) and adapter injection, as plain functions and Prefect tasks.

Model objects never go through a Prefect cache key (NO_CACHE): Prefect would pickle them to hash.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from torch import nn
from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

import peft_modules as pm
from peft_modules.quant import keep_layout
from tasks.config import MethodConfig, ModelConfig
from tasks.preflight import resolve_device  # noqa: F401  (re-exported for the flows)


def quantization_config(method: MethodConfig) -> BitsAndBytesConfig:
    q = method.quantization
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type,
                              bnb_4bit_use_double_quant=q.double_quant,
                              bnb_4bit_compute_dtype=getattr(torch, q.compute_dtype))


def load_model(model_cfg: ModelConfig, method: MethodConfig, num_labels: int,
               pad_token_id: int, device: torch.device) -> nn.Module:
    """AutoModelForSequenceClassification from a hub id or a local directory; 4-bit for
    qlora/qdora. The pad token is set so the pooled token is the last real one."""
    kwargs = dict(num_labels=num_labels, revision=model_cfg.revision,
                  trust_remote_code=model_cfg.trust_remote_code,
                  dtype=getattr(torch, model_cfg.dtype))
    if method.quantized:
        kwargs.update(quantization_config=quantization_config(method),
                      device_map={"": str(device) if device.type == "cpu" else device.index or 0})
    model = AutoModelForSequenceClassification.from_pretrained(model_cfg.name_or_path, **kwargs)
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
                    pad_token_id: int, device: str) -> nn.Module:
    return load_model(model_cfg, method, num_labels, pad_token_id, torch.device(device))


@task(name="inject-adapter", cache_policy=NO_CACHE)
def inject_adapter_task(model: nn.Module, method: MethodConfig) -> pm.AdapterSummary:
    return pm.inject_adapters(model, method.adapter_spec())
