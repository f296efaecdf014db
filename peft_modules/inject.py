"""Put adapters into a transformers model in place, and take them out again (merge).

One entry point for every method, `full` included, so the pipeline treats all methods alike.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from peft_modules import quant
from peft_modules.layers import DoRALinear, LoRALinear, layer_kind
from peft_modules.spec import DEFAULT_TARGETS, AdapterSpec

# The classification head and what sits between the backbone and it, by the names the
# `...ForSequenceClassification` classes give them: `score` (GPT-2, Llama, Qwen2, Mistral, OPT),
# `classifier` (BERT, DeBERTa-v2; RoBERTa's holds dense + out_proj), `pre_classifier`
# (DistilBERT), `pooler` (BERT's pretrained one, DeBERTa-v2's fresh one). They train with the
# head and stay in float under 4-bit.
HEAD_NAMES = ("score", "classifier", "pre_classifier", "pooler")


@dataclass
class AdapterSummary:
    method: str
    trainable_params: int
    total_params: int
    adapted_layers: list[str] = field(default_factory=list)

    @property
    def trainable_pct(self) -> float:
        return 100.0 * self.trainable_params / max(self.total_params, 1)


def head_names(model: nn.Module) -> list[str]:
    """The head modules (HEAD_NAMES), outermost only: `classifier`, not also `classifier.dense`."""
    found: list[str] = []
    for n, _ in model.named_modules():
        if n.split(".")[-1] in HEAD_NAMES and not _in_head(n, found):
            found.append(n)
    return found


def _in_head(name: str, heads: list[str]) -> bool:
    return any(name == h or name.startswith(h + ".") for h in heads)


def resolve_targets(model: nn.Module, spec: AdapterSpec):
    if spec.targets is not None:
        return spec.targets
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGETS:
        heads = head_names(model)
        layers = sorted({n.split(".")[-1] for n, m in model.named_modules()
                         if layer_kind(m) is not None and not _in_head(n, heads)})
        raise ValueError(f"targets: no default for model type {model_type!r}; set targets "
                         f"(suffixes, a regex, or 'all-linear'); candidate layers: {layers}")
    return DEFAULT_TARGETS[model_type]


def _matches(name: str, targets) -> bool:
    if isinstance(targets, str):  # a regex string matches the whole name, as in peft
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def find_targets(model: nn.Module, spec: AdapterSpec) -> list[str]:
    """Names of the modules to adapt. Raises ValueError if none match or one is unsupported."""
    heads = head_names(model)
    targets = resolve_targets(model, spec)
    candidates = [n for n, m in model.named_modules()
                  if layer_kind(m) is not None and not _in_head(n, heads)]
    if targets == "all-linear":
        chosen = candidates
    else:
        chosen = [n for n, _ in model.named_modules() if n and _matches(n, targets)]
    modules = dict(model.named_modules())
    bad = [f"{n} ({type(modules[n]).__name__})" for n in chosen if layer_kind(modules[n]) is None]
    if bad:
        raise ValueError(f"targets {targets!r}: unsupported layer type for {bad[:5]}; "
                         "supported: Linear, Conv1D, Linear4bit")
    if not chosen:
        suffixes = sorted({n.split(".")[-1] for n in candidates})
        raise ValueError(f"targets {targets!r} matched no module; candidate layers: {suffixes} "
                         f"(e.g. {candidates[:3]})")
    return chosen


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total), counting each packed 4-bit value as one parameter."""
    trainable = total = 0
    for p in model.parameters():
        n = quant.param_count(p)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def inject_adapters(model: nn.Module, spec: AdapterSpec) -> AdapterSummary:
    """Replace the target layers of `model` in place and set what trains.

    Everything but the adapters is frozen, except the classification head while
    `spec.train_head` (a fresh, random head left frozen cripples every method). `full` adds no
    adapter and trains every parameter.
    """
    if spec.method == "peft":  # HF peft's own injection: tasks/methods/hf_peft.py
        raise ValueError("method 'peft' is injected by Hugging Face peft, not peft_modules")
    if spec.method == "full":
        model.requires_grad_(True)
        return AdapterSummary(spec.method, *count_params(model))
    if adapter_layers(model):
        raise ValueError("model already has adapters; load a fresh base model first")
    names = find_targets(model, spec)
    model.requires_grad_(False)
    cls = DoRALinear if spec.use_dora else LoRALinear
    for name in names:
        base = model.get_submodule(name)
        _set_module(model, name, cls(base, spec.rank, spec.alpha, spec.dropout, spec.rslora))
    for head in head_names(model):
        model.get_submodule(head).requires_grad_(spec.train_head)
    return AdapterSummary(spec.method, *count_params(model), adapted_layers=names)


def adapter_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_adapters(model: nn.Module) -> None:
    for layer in adapter_layers(model).values():
        layer.merge()


def unmerge_adapters(model: nn.Module) -> None:
    for layer in adapter_layers(model).values():
        layer.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base layer and put the plain layer back: the result is an
    ordinary transformers model (save_pretrained / from_pretrained as usual). Layers that were
    4-bit come back as float nn.Linear (see quant.dequantized_linear)."""
    for name, layer in adapter_layers(model).items():
        layer.merge()
        base = layer.base_layer
        base.requires_grad_(False)
        _set_module(model, name, base)
    return model
