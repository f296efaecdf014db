"""Our own training loop, on purpose: every measured second and byte is visible here.

Every method gets the same optimiser (AdamW), schedule and clipping; only the learning rate may
differ, and only where the config says so. Periodic evaluation, logging and checkpointing are
excluded from train time. A non-finite loss or gradient norm stops the run at once
(`NonFiniteError`), before the optimiser step can spread it into the weights. With a checkpoint
folder, the loop checkpoints every `checkpoint_every` steps and continues from the newest
checkpoint there that verifies, drawing the same batches and dropout masks as an uninterrupted
run; a damaged checkpoint skipped on the way is named in `TrainResult.resume_note`.
"""
from __future__ import annotations

import contextlib
import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from torch import nn
from transformers import get_scheduler

from tasks.common import names, progress
from tasks.config.schema import TrainingConfig
from tasks.data.collate import SplitData, make_loader
from tasks.training import checkpoint, memory
from tasks.training.distributed import Rank, grad_norm_value, unwrap
from tasks.training.machine_load import LoadReading, MachineLoad

LogFn = Callable[[dict[str, float], int], None]
log_ = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Training or evaluation produced NaN or infinity; the message says where and what to try."""


@dataclass(frozen=True)
class CheckpointPlan:
    folder: Path
    every: int  # optimiser steps between checkpoints


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
    resumed_from: Optional[int] = None  # the checkpoint's step when the run was resumed
    resume_note: Optional[str] = None  # checkpoints skipped on resume (damaged), and why

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


class BatchStream:
    """Micro-batches epoch after epoch, knowing where it is: the epoch, how many batches of it
    were taken, and the loader's generator as it stood when the epoch began (each epoch's order
    is drawn from it). `resume` replays an epoch from that state and skips what was seen."""

    def __init__(self, loader):
        self.loader = loader
        self.generator: torch.Generator = loader.generator
        self.epoch, self.taken = 0, 0
        self.epoch_state = self.generator.get_state()

    def resume(self, epoch: int, taken: int, epoch_state: torch.Tensor) -> None:
        self.epoch, self.taken = epoch, taken
        self.generator.set_state(epoch_state)

    def __iter__(self):
        skip = self.taken
        while True:
            self.epoch_state = self.generator.get_state()
            for i, batch in enumerate(self.loader):
                if i < skip:
                    continue
                self.taken = i + 1
                yield batch
            skip, self.taken = 0, 0
            self.epoch += 1


def _diverged(what: str, step: int, value: float, losses: list[float], cfg: TrainingConfig,
              lr: float) -> NonFiniteError:
    last = next(((i + 1, v) for i, v in reversed(list(enumerate(losses))) if math.isfinite(v)), None)
    seen = f"last finite loss {last[1]:.4g} at step {last[0]}" if last else "no finite loss yet"
    hint = f"lower the learning rate (now {lr:g})"
    if cfg.precision == "fp16":
        hint += " or train in bf16/fp32 (fp16 overflows easily)"
    if not cfg.max_grad_norm:
        hint += " or set training.max_grad_norm"
    return NonFiniteError(f"training diverged at step {step}: {what} is {value} ({seen}); "
                          f"{hint}. Nothing of this run is kept as a usable adapter.")


def _grad_norm(trainable: list[torch.Tensor], max_norm: Optional[float]) -> float:
    if max_norm:
        return grad_norm_value(torch.nn.utils.clip_grad_norm_(trainable, max_norm))
    grads = [p.grad for p in trainable if p.grad is not None]
    return grad_norm_value(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


@dataclass
class LoopContext:
    """What one training run is given: the model and its data, the settings, and the callbacks
    (`log(metrics, step)` every `log_every` steps, `evaluate(step)` every `eval_every` steps,
    its time not counted, True from it stops training there) and checkpoint plan."""
    model: nn.Module
    train: SplitData
    cfg: TrainingConfig
    lr: float
    pad_token_id: int
    device: torch.device
    log: Optional[LogFn] = None
    evaluate: Optional[Callable[[int], None]] = None
    ckpt: Optional[CheckpointPlan] = None
    # (model, lr, weight_decay) -> optimizer in place of AdamW: peft.optimizers' LoRA+ and
    # LoRA-FA for method: peft (tasks/methods/optim.py); None: AdamW.
    make_optimizer: Optional[Callable] = None
    # Under torchrun: this rank (tasks/training/distributed.py); the model is then DDP's or
    # FSDP's, `log` is set on the owner only. None: one process.
    dist: Optional[Rank] = None

    @property
    def world(self) -> int:
        return self.dist.world if self.dist else 1


@dataclass
class Optimiser:
    """AdamW, its schedule over `steps` optimiser steps, and the tensors it trains."""
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    trainable: list[torch.Tensor]
    steps: int

    @classmethod
    def build(cls, ctx: LoopContext, batches_per_epoch: int) -> "Optimiser":
        cfg = ctx.cfg
        steps = total_steps(cfg, batches_per_epoch)
        if ctx.make_optimizer is not None:
            opt = ctx.make_optimizer(ctx.model, ctx.lr, cfg.weight_decay)
        else:
            opt = torch.optim.AdamW(param_groups(ctx.model, cfg.weight_decay), lr=ctx.lr,
                                    fused=use_fused(cfg, ctx.device))
        sched = get_scheduler(cfg.scheduler, opt, num_warmup_steps=int(cfg.warmup_ratio * steps),
                              num_training_steps=steps)
        return cls(opt, sched, [p for p in ctx.model.parameters() if p.requires_grad], steps)

    def step(self, ctx: LoopContext, prog: checkpoint.Progress) -> None:
        """Clip, check the norm (a non-finite one never reaches the weights), step, zero."""
        norm = _grad_norm(self.trainable, ctx.cfg.max_grad_norm)
        if not math.isfinite(norm):
            raise _diverged("the gradient norm", prog.step + 1, norm, prog.losses, ctx.cfg, ctx.lr)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)


def train_model(model: nn.Module, train: SplitData, cfg: TrainingConfig, lr: float,
                pad_token_id: int, device: torch.device, log: Optional[LogFn] = None,
                evaluate: Optional[Callable[[int], None]] = None,
                ckpt: Optional[CheckpointPlan] = None,
                make_optimizer: Optional[Callable] = None,
                dist: Optional[Rank] = None) -> TrainResult:
    """AdamW (or `make_optimizer`'s) + schedule + accumulation + clipping. `log(metrics, step)`
    every `log_every` optimiser steps, `evaluate(step)` every `cfg.eval_every` steps (its time is not counted).
    The machine's load from other processes is measured over the whole loop (under torchrun
    the job's other ranks on this host are not "other processes")."""
    ctx = LoopContext(model, train, cfg, lr, pad_token_id, device, log, evaluate, ckpt,
                      make_optimizer, dist)
    with MachineLoad(gpu_index=_gpu_index(device), job_root=dist is not None) as load:
        res = _train_loop(ctx)
    res.load = load.reading
    return res


def _gpu_index(device: torch.device) -> Optional[int]:
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def _train_loop(ctx: LoopContext) -> TrainResult:
    cfg = ctx.cfg
    torch.manual_seed(cfg.seed)
    # Under torchrun every rank draws the same global batches and keeps its rows of each.
    loader = make_loader(ctx.train, cfg.batch_size * ctx.world, shuffle=True, seed=cfg.seed,
                         pad_token_id=ctx.pad_token_id, group_by_length=cfg.group_by_length)
    optim = Optimiser.build(ctx, len(loader))
    stream = BatchStream(loader)
    prog, note = _resume(ctx.ckpt, ctx.model, optim.opt, optim.sched, ctx.device, stream)
    ctx.model.train()
    bar = progress.run_bar(optim.steps, prog.step, "train", disable=not _owner(ctx))
    micro, window = 0, []
    t0 = step_start = time.perf_counter()
    for batch in _take(stream, (optim.steps - prog.step) * cfg.grad_accum):
        window.append(_forward_backward(ctx, batch, prog))
        micro += 1
        if micro % cfg.grad_accum:
            continue
        optim.step(ctx, prog)
        prog.step += 1
        prog.losses.append(sum(window) / len(window))
        window = []
        now = time.perf_counter()
        prog.step_times.append(now - step_start)
        bar.update(1)
        progress.step_done()
        memory.step_sample()  # the memory windows' per-step average and p99
        bar.set_postfix(loss=f"{prog.losses[-1]:.4f}", refresh=False)
        stop = _between_steps(ctx, optim, prog, stream, segment=now - t0)
        t0 += time.perf_counter() - now  # logging, evaluation, checkpoints: not training time
        step_start = time.perf_counter()
        if stop:  # the evaluate callback said so: a sweep point pruned (flows/orchestration/trials.py)
            break
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    bar.close()
    prog.train_time_s += time.perf_counter() - t0
    return TrainResult(prog.step, prog.train_time_s, prog.samples, prog.tokens, prog.losses,
                       prog.periodic_eval_s, prog.step_times, cfg.timing_warmup_steps,
                       resumed_from=prog.resumed_from, resume_note=note)


def _forward_backward(ctx: LoopContext, batch: dict, prog: checkpoint.Progress) -> float:
    """One micro-batch: forward, check the loss (a non-finite one stops the run before any
    backward), backward of loss / grad_accum. Returns the loss (of the global batch, under
    torchrun: every rank's, weighted by its rows)."""
    prog.samples += len(batch["labels"])  # the global batch: what the job trained on
    prog.tokens += int(batch["attention_mask"].sum())
    weight = 1.0
    if ctx.dist is not None:
        batch, weight = ctx.dist.shard(batch)
    batch = {k: v.to(ctx.device) for k, v in batch.items()}
    with autocast(ctx.device, ctx.cfg.precision):
        loss = ctx.model(**batch).loss
    value = loss.item()  # syncs CUDA, so the step time is real
    if ctx.dist is not None:  # every rank stops together on a non-finite loss
        value = ctx.dist.mean(value, weight)
    if not math.isfinite(value):
        raise _diverged("the loss", prog.step + 1, value, prog.losses, ctx.cfg, ctx.lr)
    (loss * weight / ctx.cfg.grad_accum).backward()  # loss * 1.0 is exact: one process unchanged
    return value


def _owner(ctx: LoopContext) -> bool:
    return ctx.dist is None or ctx.dist.owner


def _resume(ckpt, model, opt, sched, device, stream: BatchStream):
    """The loop's progress from the newest usable checkpoint (fresh without one), and the note
    of any damaged checkpoint skipped: logged here, recorded on the run by the caller."""
    back = checkpoint.restore(ckpt.folder, unwrap(model), opt, sched, device) if ckpt else None
    if back is None:
        return checkpoint.Progress(), None
    if back.note:
        log_.warning(back.note)
        progress.say(f"⚠ {back.note}")  # the console shows our progress lines only
    if back.from_scratch:
        return checkpoint.Progress(), back.note
    prog = back.progress
    stream.resume(prog.epoch, prog.batches_into_epoch, back.epoch_generator_state)
    return prog, back.note


def _take(stream: BatchStream, n: int):
    if n <= 0:
        return
    for batch in stream:
        yield batch
        n -= 1
        if n == 0:
            return


def _between_steps(ctx: LoopContext, optim: Optimiser, prog: checkpoint.Progress,
                   stream: BatchStream, segment: float) -> bool:
    """Logging, periodic evaluation and checkpoints after an optimiser step. `segment` is the
    training time since the last such pause: a checkpoint records it so that a resumed run's
    train time adds up to an uninterrupted one's. True when `evaluate` asked to stop."""
    cfg, steps, stop = ctx.cfg, optim.steps, False
    if ctx.log and prog.step % cfg.log_every == 0:
        ctx.log({names.TRAIN_LOSS: prog.losses[-1], names.TRAIN_LR: optim.sched.get_last_lr()[0]},
                prog.step)
    if ctx.evaluate and cfg.eval_every and prog.step % cfg.eval_every == 0 and prog.step < steps:
        e0 = time.perf_counter()
        stop = bool(ctx.evaluate(prog.step))  # under torchrun: the ranks agree (flows/)
        ctx.model.train()
        prog.periodic_eval_s += time.perf_counter() - e0
    if ctx.ckpt is not None and prog.step % ctx.ckpt.every == 0 and prog.step < steps:
        prog.epoch, prog.batches_into_epoch = stream.epoch, stream.taken
        prog.train_time_s += segment
        if _owner(ctx):  # DDP: every rank holds the same weights and optimiser state
            checkpoint.save(ctx.ckpt.folder, unwrap(ctx.model), optim.opt, optim.sched, prog,
                            stream.epoch_state, ctx.device, keep=cfg.keep_last)
        prog.train_time_s -= segment  # added once, at the end
    return stop


@task(name="train", cache_policy=NO_CACHE)
def train_task(model: nn.Module, train: SplitData, cfg: TrainingConfig, lr: float,
               pad_token_id: int, device: str, log: Optional[LogFn] = None,
               evaluate: Optional[Callable[[int], None]] = None,
               ckpt: Optional[CheckpointPlan] = None,
               make_optimizer: Optional[Callable] = None,
               dist: Optional[Rank] = None) -> TrainResult:
    return train_model(model, train, cfg, lr, pad_token_id, torch.device(device), log,
                       evaluate, ckpt, make_optimizer, dist)
