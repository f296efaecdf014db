"""Checkpoints of one training run, enough to continue it bit for bit on the same device.

A checkpoint holds every trainable tensor (safetensors), the optimiser's and scheduler's state,
the RNG states (torch CPU and CUDA, and the data loader's generator as it was when the current
epoch started), the position in the epoch, and the loop's counters (step, samples, tokens,
losses, step times, train time so far). Resuming loads the model's trainable tensors, the
optimiser and scheduler, puts the generators back, replays the epoch's order and skips the
batches already seen: the following steps draw the same batches and dropout masks as an
uninterrupted run would.

Layout: `<dir>/step-<N>/` written in full, then `<dir>/latest` (the name of that folder)
replaced atomically, so a process killed while writing leaves the previous checkpoint usable.
Nothing is unpickled: tensors come from safetensors, the rest from `torch.load(weights_only=
True)`, which refuses anything but tensors and plain containers.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

LATEST = "latest"


@dataclass
class Progress:
    """The loop's counters and the data position at an optimiser-step boundary."""

    step: int = 0
    samples: int = 0
    tokens: int = 0
    train_time_s: float = 0.0
    periodic_eval_s: float = 0.0
    losses: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    epoch: int = 0
    batches_into_epoch: int = 0  # micro-batches of the current epoch already consumed
    resumed_from: Optional[int] = None


@dataclass
class Restored:
    progress: Progress
    epoch_generator_state: torch.Tensor  # the loader's generator when the epoch began


def _rng_states(device: torch.device) -> dict[str, torch.Tensor]:
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def save(folder: Path, model: nn.Module, opt: torch.optim.Optimizer, sched, progress: Progress,
         epoch_generator_state: torch.Tensor, device: torch.device, keep: int = 1) -> Path:
    """Write a checkpoint of the run at `progress.step`; keep the newest `keep` of them."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    out = folder / f"step-{progress.step}"
    tmp = folder / f".step-{progress.step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(mode=0o700)
    trainable = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters()
                 if p.requires_grad}
    save_file(trainable, str(tmp / "trainable.safetensors"))
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "rng": _rng_states(device), "epoch_generator": epoch_generator_state},
               tmp / "state.pt")
    (tmp / "progress.json").write_text(json.dumps(asdict(progress)))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    pointer = folder / f".{LATEST}.tmp"
    pointer.write_text(out.name)
    os.replace(pointer, folder / LATEST)  # atomic: readers see the old or the new checkpoint
    for old in sorted(folder.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return out


def latest(folder: Path) -> Optional[Path]:
    pointer = Path(folder) / LATEST
    if not pointer.is_file():
        return None
    path = Path(folder) / pointer.read_text().strip()
    return path if (path / "progress.json").is_file() else None


def restore(folder: Path, model: nn.Module, opt: torch.optim.Optimizer, sched,
            device: torch.device) -> Optional[Restored]:
    """Load the latest checkpoint into model, optimiser and scheduler and set the RNGs; None
    when there is none. Refuses a checkpoint whose tensors do not fit the model."""
    path = latest(folder)
    if path is None:
        return None
    saved = load_file(str(path / "trainable.safetensors"))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(saved) != set(params):
        raise ValueError(f"{path}: checkpoint does not fit this model (missing "
                         f"{sorted(set(params) - set(saved))[:3]}, unexpected "
                         f"{sorted(set(saved) - set(params))[:3]})")
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))
    state = torch.load(path / "state.pt", weights_only=True, map_location="cpu")
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["cpu"])
    if device.type == "cuda" and "cuda" in state["rng"]:
        torch.cuda.set_rng_state(state["rng"]["cuda"], device)
    progress = Progress(**json.loads((path / "progress.json").read_text()))
    progress.resumed_from = progress.step
    return Restored(progress, state["epoch_generator"])


def clear(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
