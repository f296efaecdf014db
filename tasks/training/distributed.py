"""One rank of a torchrun job: the process group, the model's wrapper and the rank's rows.

torch.distributed does the work: DistributedDataParallel averages gradients over the ranks,
FSDP2's `fully_shard` shards parameters, gradients and optimiser state. What is ours is how a
rank's rows are chosen, so that N ranks at batch b compute exactly what one process computes
at batch N·b:

- every rank builds the same loader at the global batch (batch_size × world size) with the same
  seed, so every rank draws the same global batches in the same order (checkpoints store the
  loader's generator, so a resumed run does too);
- rank r keeps its slice of each global batch (`shard`); padding was decided on the global
  batch, so every row is padded as the one process pads it;
- each rank's mean loss is scaled by (its rows × N / global rows) before backward: the ranks'
  gradients, averaged by DDP (or reduce-scattered by FSDP), are then the gradient of the global
  batch's mean loss, also when the last batch does not split evenly.

Dropout masks differ (each rank draws its own), so with dropout the runs are equal in
distribution only; with dropout off they agree to rounding (tests/test_distributed.py).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tasks.common import names


@dataclass
class Rank:
    """This process's place in the job. `owner`: the rank that logs, writes checkpoints and
    the adapter (the first rank of the host that started the job; launch.py)."""
    rank: int
    world: int
    local_rank: int
    strategy: str  # "ddp" or "fsdp"
    owner: bool

    @property
    def fsdp(self) -> bool:
        return self.strategy == "fsdp"

    def shard(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], float]:
        """This rank's rows of a global batch, and the weight of its mean loss (see above).
        A rank left without rows (a last batch smaller than the world) computes one row at
        weight 0: its backward still takes part in the gradient all-reduce."""
        n = len(batch["labels"])
        bounds = torch.tensor_split(torch.arange(n), self.world)[self.rank]
        if len(bounds) == 0:
            return {k: v[:1] for k, v in batch.items()}, 0.0
        lo, hi = int(bounds[0]), int(bounds[-1]) + 1
        return {k: v[lo:hi] for k, v in batch.items()}, (hi - lo) * self.world / n

    def mean(self, value: float, weight: float) -> float:
        """The global batch's mean loss from each rank's (mean loss, weight)."""
        t = torch.tensor([value * weight], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t) / self.world

    def agree(self, flag: bool) -> bool:
        """The owner's decision (a sweep's pruning), the same on every rank."""
        box = [flag]
        dist.broadcast_object_list(box, src=self.owner_rank())
        return bool(box[0])

    def owner_rank(self) -> int:
        ranks = [None] * self.world
        dist.all_gather_object(ranks, self.rank if self.owner else None)
        return next(r for r in ranks if r is not None)

    def gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def backend(requested: str, device: str | torch.device) -> str:
    if requested != "auto":
        return requested
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def finish() -> None:
    """Leave the group; the barrier first, so that no rank tears down while another still
    talks to it."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def rank_device(device: torch.device) -> torch.device:
    """On CUDA each local rank has its own device."""
    if device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def wrap(model: nn.Module, rank: Rank, device: torch.device) -> nn.Module:
    """DDP or FSDP2 around the model (peft's PeftModel included). DDP registers only the
    parameters that require a gradient, so a frozen base gets no gradient buckets; every
    trainable tensor is used in every forward, so unused-parameter search stays off."""
    if rank.fsdp:
        return _fully_shard(model)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def _fully_shard(model: nn.Module) -> nn.Module:
    """Each transformer block its own FSDP unit (their all-gathers overlap compute), then the
    root for what is left (embeddings, head), as torchtune's shard_model does."""
    from torch.distributed.fsdp import fully_shard

    for block in _blocks(model):
        fully_shard(block)
    fully_shard(model)
    return model


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated layers: the first ModuleList of more than one module (GPT-2's h, BERT's
    encoder.layer, Llama's layers)."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            return list(module)
    return []


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def grad_norm_value(norm: torch.Tensor) -> float:
    """clip_grad_norm_ over FSDP's sharded gradients returns a DTensor: its full value."""
    full = getattr(norm, "full_tensor", None)
    return float(full() if full is not None else norm)


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """FSDP: the whole state dict, every shard gathered (a collective: every rank calls it,
    and every rank gets it: the owner need not be global rank 0)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


def memory_of_ranks(memory: dict[str, float], rank: Rank) -> dict[str, float]:
    """The job's memory: each figure the largest rank's (what the biggest device must hold),
    and every rank's peak under a name of its own (a collective)."""
    every = rank.gather(memory)
    out = {k: max(m[k] for m in every) for k in memory}
    out |= {names.rank_metric(names.PEAK_MEMORY, r): m[names.PEAK_MEMORY]
            for r, m in enumerate(every)}
    return out
