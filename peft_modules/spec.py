"""The adapter spec: which method, which layers, which hyper-parameters.

It is a pydantic model so that the pipeline's typed config can embed it as-is; pydantic's
ValidationError subclasses ValueError, so a bad spec raises a ValueError naming the field.
"""
from __future__ import annotations

import math
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

# "peft": any Hugging Face peft config, injected by the pipeline (tasks/methods/), not here.
Method = Literal["full", "lora", "dora", "qlora", "qdora", "peft"]

# Default target layers per transformers `model_type`, used when `targets` is left unset.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "deberta-v2": ["query_proj", "value_proj"],
}


class AdapterSpec(BaseModel):
    """What to inject. `targets`: a list of module-name suffixes, a regex string (full match
    on the module name, as in peft), or "all-linear"; None picks DEFAULT_TARGETS by model type."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Method = "lora"
    rank: int = Field(8, gt=0, description="LoRA rank r")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha; the update is scaled by alpha/r")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter input")
    targets: Optional[Union[list[str], str]] = None
    rslora: bool = Field(False, description="scale by alpha/sqrt(r) (Kalajdzievski 2023)")
    train_head: bool = Field(True, description="keep the fresh classification head trainable")

    @field_validator("targets")
    @classmethod
    def _targets_not_empty(cls, v):
        if v is not None and len(v) == 0:
            raise ValueError("targets must name at least one module (or be 'all-linear')")
        return v

    @property
    def use_dora(self) -> bool:
        return self.method in ("dora", "qdora")

    @property
    def quantized(self) -> bool:
        return self.method in ("qlora", "qdora")

    @property
    def scaling(self) -> float:
        # LoRA (Hu et al. 2021, §4.1): ΔW x is scaled by α/r. rsLoRA (Kalajdzievski 2023, §3)
        # shows α/r collapses the update at large r and proposes α/√r.
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)
