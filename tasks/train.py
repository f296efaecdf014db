"""Our own training loop, on purpose: every measured second and byte is visible here.

Every method gets the same optimiser (AdamW), schedule and clipping; only the learning rate may
differ, and only where the config says so. Periodic evaluation is excluded from train time.
"""
from __future__ import annotations

import contextlib
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from torch import nn
from tqdm.auto import tqdm
from transformers import get_scheduler

from tasks import names
from tasks.collate import SplitData, make_loader
from tasks.config import TrainingConfig
from tasks.machine_load import LoadReading, MachineLoad

LogFn = Callable[[dict[str, float], int], None]


@dataclass
class TrainResult:
    steps: int
    train_time_s: float
    samples: int
    tokens: int  # non-padding tokens seen
    losses: list[float] = field(default_factory=list)
    periodic_eval_s: float = 0.0  # time spent in evaluate() calls, left out of train_time_s
    step_times: list[float] = field(default_factory=list)  # wall seconds of each optimiser step
    warmup_steps: int = 3  # steps left out of the steady-state median
    load: Optional[LoadReading] = None  # what other processes took while this method trained

    @property
    def step_time_median_s(self) -> float:
        """Median step time once caches and allocators have warmed up: the first
        `warmup_steps` steps are left out (all steps count when there are no more than that)."""
        steady = self.step_times[self.warmup_steps:] or self.step_times
        return statistics.median(steady) if steady else 0.0

    @property
    def samples_per_s(self) -> float:
        return self.samples / max(self.train_time_s, 1e-9)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.train_time_s, 1e-9)


def autocast(device: torch.device, precision: str):
    """bf16/fp16 autocast on CUDA only; CPU training stays in the model's dtype."""
    if device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    # Decay matrices only: biases, norms and DoRA's magnitude vector are not regularised to 0.
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for _, p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for _, p in params if p.ndim < 2], "weight_decay": 0.0}]


def use_fused(cfg: TrainingConfig, device: torch.device) -> Optional[bool]:
    """torch's fused AdamW kernel (one launch for all tensors) on CUDA by default; elsewhere
    only when asked. None lets torch choose its foreach implementation."""
    want = cfg.fused_adamw if cfg.fused_adamw is not None else device.type == "cuda"
    return True if want else None


def total_steps(cfg: TrainingConfig, batches_per_epoch: int) -> int:
    if cfg.max_steps:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * batches_per_epoch / cfg.grad_accum))


def _batches(loader, steps: int, grad_accum: int):
    """Yield micro-batches until `steps` optimiser steps are done, epoch after epoch (the
    loader's own seeded generator gives each epoch a new, reproducible order)."""
    needed = steps * grad_accum
    while True:
        for batch in loader:
            yield batch
            needed -= 1
            if needed == 0:
                return


def train_model(model: nn.Module, train: SplitData, cfg: TrainingConfig, lr: float,
                pad_token_id: int, device: torch.device, log: Optional[LogFn] = None,
                evaluate: Optional[Callable[[int], None]] = None) -> TrainResult:
    """AdamW + schedule + accumulation + clipping. `log(metrics, step)` every `log_every`
    optimiser steps, `evaluate(step)` every `cfg.eval_every` steps (its time is not counted).
    The machine's load from other processes is measured over the whole loop."""
    with MachineLoad(gpu_index=_gpu_index(device)) as load:
        res = _train_loop(model, train, cfg, lr, pad_token_id, device, log, evaluate)
    res.load = load.reading
    return res


def _gpu_index(device: torch.device) -> Optional[int]:
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def _train_loop(model, train, cfg, lr, pad_token_id, device, log, evaluate) -> TrainResult:
    torch.manual_seed(cfg.seed)
    loader = make_loader(train, cfg.batch_size, shuffle=True, seed=cfg.seed,
                         pad_token_id=pad_token_id, group_by_length=cfg.group_by_length)
    steps = total_steps(cfg, len(loader))
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=lr,
                            fused=use_fused(cfg, device))
    sched = get_scheduler(cfg.scheduler, opt, num_warmup_steps=int(cfg.warmup_ratio * steps),
                          num_training_steps=steps)
    trainable = [p for p in model.parameters() if p.requires_grad]
    res = TrainResult(0, 0.0, 0, 0, warmup_steps=cfg.timing_warmup_steps)
    step, micro, window = 0, 0, []
    model.train()
    bar = tqdm(total=steps, desc="train", leave=False, mininterval=1.0)
    t0 = step_start = time.perf_counter()
    for batch in _batches(loader, steps, cfg.grad_accum):
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(device, cfg.precision):
            loss = model(**batch).loss
        (loss / cfg.grad_accum).backward()
        res.samples += len(batch["labels"])
        res.tokens += int(batch["attention_mask"].sum())
        window.append(loss.item())  # .item() syncs CUDA, so the step time below is real
        micro += 1
        if micro % cfg.grad_accum:
            continue
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        res.losses.append(sum(window) / len(window))
        window = []
        now = time.perf_counter()
        res.step_times.append(now - step_start)
        bar.update(1)
        bar.set_postfix(loss=f"{res.losses[-1]:.4f}", refresh=False)
        if log and step % cfg.log_every == 0:
            log({names.TRAIN_LOSS: res.losses[-1], names.TRAIN_LR: sched.get_last_lr()[0]}, step)
        if evaluate and cfg.eval_every and step % cfg.eval_every == 0 and step < steps:
            e0 = time.perf_counter()
            evaluate(step)
            model.train()
            res.periodic_eval_s += time.perf_counter() - e0
        t0 += time.perf_counter() - now  # logging and evaluation are not training time
        step_start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    res.train_time_s, res.steps = time.perf_counter() - t0, step
    bar.close()
    return res


@task(name="train", cache_policy=NO_CACHE)
def train_task(model: nn.Module, train: SplitData, cfg: TrainingConfig, lr: float,
               pad_token_id: int, device: str, log: Optional[LogFn] = None,
               evaluate: Optional[Callable[[int], None]] = None) -> TrainResult:
    return train_model(model, train, cfg, lr, pad_token_id, torch.device(device), log, evaluate)
