"""`method: peft`: any Hugging Face peft config as a method (issue #18), and the optimiser
variants peft ships in `peft.optimizers`. Checked here, at config validation, by building the
peft config class itself, so a bad block is refused before any model loads, in the same words
as at injection (tasks/methods/hf_peft.py calls the same build_peft_config); peft is imported
only when a method uses it."""
from __future__ import annotations

import dataclasses
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Our own adapter fields (peft_modules.spec.AdapterSpec): they do nothing for method: peft,
# whose settings live in the peft: block, so a value other than the default is refused.
OWN_FIELDS = ("rank", "alpha", "dropout", "targets", "rslora", "train_head")
# Sweep keys that address a field of the peft: block: `peft.r`, `peft.target_modules`.
PEFT_PREFIX = "peft."

# Set by the pipeline, never by the block: the task decides the PeftModel class (SEQ_CLS:
# PeftModelForSequenceClassification), and the head trains as modules_to_save, as our adapters
# train it (peft docs, "Sequence classification": the classifier must be in modules_to_save).
OURS = ("peft_type", "task_type", "modules_to_save")


def config_class(peft_type: Any):
    """peft's own PeftType -> config class mapping (peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    known = {str(t.value): cls for t, cls in PEFT_TYPE_TO_CONFIG_MAPPING.items()}
    if not isinstance(peft_type, str) or peft_type.upper() not in known:
        raise ValueError(f"peft.peft_type: unknown peft type {peft_type!r}; known: "
                         f"{', '.join(sorted(known))}")
    return known[peft_type.upper()]


def config_fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init and f.name not in OURS]


def build_peft_config(block: dict, head_modules: list[str]):
    """The peft config of `block` (peft_type and that config's fields), task SEQ_CLS, the head
    as modules_to_save. An unknown type or field, or a value peft refuses, raises ValueError
    naming it."""
    if not isinstance(block, dict) or "peft_type" not in block:
        raise ValueError("peft.peft_type: required (e.g. LORA, VERA, IA3, LOHA, PROMPT_TUNING)")
    cls = config_class(block["peft_type"])
    fields = config_fields(cls)
    for key in block:
        if key in OURS[1:]:
            raise ValueError(f"peft.{key}: set by peft-bench (task SEQ_CLS, the classification "
                             "head as modules_to_save); leave it out")
        if key != "peft_type" and key not in fields:
            raise ValueError(f"peft.{key}: unknown field of {cls.__name__}; known: "
                             f"{', '.join(fields)}")
    kwargs = {k: v for k, v in block.items() if k != "peft_type"}
    try:
        return cls(task_type="SEQ_CLS", modules_to_save=list(head_modules) or None, **kwargs)
    except (ValueError, TypeError) as e:
        raise ValueError(f"peft ({cls.__name__}): {e}") from None


class OptimizerConfig(BaseModel):
    """The optimiser of one method. adamw: the loop's own AdamW (every method's default).
    loraplus: LoRA+ (Hayou et al. 2024), B matrices at lr x lr_ratio
    (peft.optimizers.create_loraplus_optimizer). lorafa: LoRA-FA (Zhang et al. 2023), A frozen,
    B's gradient projected (peft.optimizers.create_lorafa_optimizer). Both need a peft LoRA."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["adamw", "loraplus", "lorafa"] = Field("adamw", description="the optimiser")
    lr_ratio: Optional[float] = Field(
        None, gt=0, description="loraplus: learning rate of B over A's (LoRA+ paper: 16)")

    @model_validator(mode="after")
    def _ratio_for_loraplus(self):
        if self.name == "loraplus" and self.lr_ratio is None:
            object.__setattr__(self, "lr_ratio", 16.0)
        if self.name != "loraplus" and self.lr_ratio is not None:
            raise ValueError(f"optimizer.lr_ratio: only for loraplus, not {self.name}")
        return self


def check_block(block: Optional[dict], method: Optional[str]) -> Optional[dict]:
    """The peft: block, validated by building its peft config (no head modules known yet)."""
    if block is None:
        return None
    if method != "peft":
        raise ValueError(f"peft: only for method: peft, not method {method!r}")
    build_peft_config(block, [])
    return block


def check_method(m: Any) -> None:
    """What only the whole method can tell: peft: required, our own fields unset, the
    optimiser's needs met."""
    if m.method != "peft":
        if m.peft is not None:
            raise ValueError(f"peft: only for method: peft, not method {m.method!r}")
        if m.optimizer is not None and m.optimizer.name != "adamw":
            raise ValueError(f"optimizer.name: {m.optimizer.name} needs method: peft with "
                             "peft_type: LORA")
        return
    if m.peft is None:
        raise ValueError("peft: required for method: peft (e.g. {peft_type: VERA, r: 256})")
    fields = type(m).model_fields
    own = [k for k in OWN_FIELDS if getattr(m, k) != fields[k].default]
    if own:
        raise ValueError(f"{', '.join(own)}: our own adapter fields do nothing for method: "
                         "peft; set peft's fields inside peft: (e.g. peft.r, "
                         "peft.target_modules)")
    if m.optimizer is not None and m.optimizer.name != "adamw" \
            and str(m.peft.get("peft_type", "")).upper() != "LORA":
        raise ValueError(f"optimizer.name: {m.optimizer.name} trains a LoRA's A and B; "
                         f"peft.peft_type is {m.peft.get('peft_type')!r}, not LORA")


def apply_point(dump: dict, on_method: dict) -> dict:
    """A method's dump with a grid point's method values applied; `peft.X` keys go into the
    peft: block."""
    out = {**dump, **{k: v for k, v in on_method.items() if not k.startswith(PEFT_PREFIX)}}
    peft_keys = {k[len(PEFT_PREFIX):]: v for k, v in on_method.items()
                 if k.startswith(PEFT_PREFIX)}
    if peft_keys:
        out["peft"] = {**(dump.get("peft") or {}), **peft_keys}
    return out
