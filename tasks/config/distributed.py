"""`training.distributed`: one run over several processes, devices or hosts, through torchrun.

The checks here are the ones that can be made before any model loads (the config alone); what
depends on the method and device (FSDP of a 4-bit base, on the CPU) is checked by
`check_distributed` with the whole config (tasks/config/schema.py calls it).
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator


class DistributedConfig(BaseModel):
    """torchrun's settings for every run of the config (docs/deploy.md#several-devices)."""

    model_config = ConfigDict(extra="forbid")

    nproc_per_node: int = Field(2, ge=1, le=1024, description="processes (ranks) per host; on "
                                "CUDA one per device")
    nnodes: int = Field(1, ge=1, le=4096, description="hosts; above 1 every other host runs "
                        "`peft-bench join` with the same rendezvous settings")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="ddp: every rank holds the model, gradients are averaged; fsdp: "
        "parameters, gradients and optimiser state sharded (FSDP2 fully_shard)")
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="auto: nccl on CUDA, gloo on the CPU")
    rdzv_endpoint: Optional[str] = Field(
        None, description="host:port of the c10d rendezvous, needed when nnodes > 1; with one "
        "host torchrun's standalone rendezvous on a free local port")
    rdzv_id: str = Field("peft-bench", min_length=1, pattern=r"^[\w.\-]+$",
                         description="the job id every host joins under")
    join_timeout_s: float = Field(600.0, gt=0, description="how long the hosts wait for each "
                                  "other at the rendezvous")

    @model_validator(mode="after")
    def _endpoint(self):
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError(f"nnodes: {self.nnodes} hosts need rdzv_endpoint (host:port of "
                             "the rendezvous every host can reach)")
        if self.rdzv_endpoint is not None:
            host, _, port = self.rdzv_endpoint.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"rdzv_endpoint: {self.rdzv_endpoint!r} is not host:port")
        return self

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


# Why FSDP refuses these (peft's FSDP guide, bitsandbytes PR #970): a 4-bit base can be
# sharded only when bnb_4bit_quant_storage is the compute dtype, on CUDA; bitsandbytes' CPU
# Params4bit cannot be split into DTensor shards. peft's own methods wrap layers FSDP2 has not
# been tested with here: they run under DDP.
FSDP_METHODS = ("full", "lora", "dora", "qlora", "qdora")


def check_distributed(dist: DistributedConfig, methods: list, training,
                      device: Optional[str] = None) -> None:
    """Refuse what cannot work, before anything loads: the method and device for FSDP.
    `device`: the resolved one (the launcher checks again once `auto` is known)."""
    if dist.strategy != "fsdp":
        return
    device = device or training.device
    if training.checkpoint_every:
        # FSDP's optimiser state lives in shards; our checkpoints hold one whole state.
        raise ValueError("training.distributed.strategy: fsdp runs do not checkpoint; set "
                         "training.checkpoint_every: null (or use strategy: ddp, which does)")
    for m in methods:
        if m.method not in FSDP_METHODS:
            raise ValueError(f"training.distributed.strategy: fsdp does not run method "
                             f"{m.method!r} ({m.name}); FSDP runs {list(FSDP_METHODS)}, every "
                             "method runs under strategy: ddp")
        if m.quantization is not None and device == "cpu":
            raise ValueError(
                f"training.distributed.strategy: fsdp of a 4-bit base ({m.name}) needs CUDA "
                "(bnb_4bit_quant_storage equal to the compute dtype, bitsandbytes PR #970); "
                "set training.device: cuda, or strategy: ddp")
