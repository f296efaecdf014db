"""The optimiser variants peft ships (peft.optimizers), as a method option: `optimizer:
{name: loraplus, lr_ratio: 16}` or `{name: lorafa}`. Both build an AdamW over the PeftModel's
LoRA parameters; the loop's schedule, clipping and checkpoints treat them like its own AdamW."""
from __future__ import annotations

from typing import Callable, Optional

import torch

# (model, lr, weight_decay) -> optimizer; tasks/train.py calls it in place of its AdamW.
MakeOptimizer = Callable[[torch.nn.Module, float, float], torch.optim.Optimizer]


def optimizer_factory(method) -> Optional[MakeOptimizer]:
    """None for the loop's own AdamW (the default)."""
    opt = method.optimizer
    if opt is None or opt.name == "adamw":
        return None
    if opt.name == "loraplus":
        return lambda model, lr, wd: loraplus(model, lr, wd, opt.lr_ratio)
    return lorafa


def loraplus(model, lr: float, weight_decay: float, ratio: float) -> torch.optim.Optimizer:
    """LoRA+ (Hayou et al. 2024, §3): B learns at lr x ratio, A at lr."""
    from peft.optimizers import create_loraplus_optimizer

    return create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio,
                                     weight_decay=weight_decay)


def lorafa(model, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """LoRA-FA (Zhang et al. 2023): A frozen at its init, B's gradient projected; peft needs the
    LoRA's own r, alpha and rsLoRA flag for the projection's scale."""
    from peft.optimizers import create_lorafa_optimizer

    cfg = model.peft_config["default"]
    return create_lorafa_optimizer(model, r=cfg.r, lora_alpha=cfg.lora_alpha, lr=lr,
                                   weight_decay=weight_decay, use_rslora=cfg.use_rslora)
