"""Checkpoints of one training run, enough to continue it bit for bit on the same device.

A checkpoint holds every trainable tensor (safetensors), the optimiser's and scheduler's state,
the RNG states (torch CPU and CUDA, and the data loader's generator as it was when the current
epoch started), the position in the epoch, and the loop's counters (step, samples, tokens,
losses, step times, train time so far). Resuming loads the model's trainable tensors, the
optimiser and scheduler, puts the generators back, replays the epoch's order and skips the
batches already seen: the following steps draw the same batches and dropout masks as an
uninterrupted run would.

Layout: `<dir>/step-<N>/` written in full under a temporary name, its files checked (the
safetensors header covers the file, every zip record of state.pt matches its CRC) and listed
last in `manifest.json` (each file's size and SHA-256); then renamed, and `<dir>/latest` (the
name of that folder) replaced atomically. Older checkpoints are deleted only after that, the
newest `keep_last` kept: a process killed while writing leaves the previous checkpoint usable.

`restore` verifies a checkpoint against its manifest before loading anything from it. One that
fails (truncated, changed, incomplete) is named with the reason and skipped for the newest
earlier one that verifies; with none left the run starts again from step 0. The reason comes
back as `Restored.note`, for the caller to record on the run.

Nothing is unpickled: tensors come from safetensors, the rest from `torch.load(weights_only=
True)`, which refuses anything but tensors and plain containers.
"""
from __future__ import annotations

import json
import os
import shutil
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from tasks.models.source import sha256_of

LATEST = "latest"
MANIFEST = "manifest.json"
TENSORS, STATE, PROGRESS = "trainable.safetensors", "state.pt", "progress.json"


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
    # The loader's generator when the epoch began; None: no checkpoint could be used, the run
    # starts from step 0 (and `note` says why).
    epoch_generator_state: Optional[torch.Tensor]
    note: Optional[str] = None  # the checkpoints skipped, by file and reason

    @property
    def from_scratch(self) -> bool:
        return self.epoch_generator_state is None


class Unusable(Exception):
    """A checkpoint that fails verification; the message names the file and why."""


def _rng_states(device: torch.device) -> dict[str, torch.Tensor]:
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def save(folder: Path, model: nn.Module, opt: torch.optim.Optimizer, sched, progress: Progress,
         epoch_generator_state: torch.Tensor, device: torch.device, keep: int = 2) -> Path:
    """Write a checkpoint of the run at `progress.step`, verify it, point `latest` at it, then
    keep the newest `keep` of them."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    out = folder / f"step-{progress.step}"
    tmp = folder / f".step-{progress.step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(mode=0o700)
    trainable = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters()
                 if p.requires_grad}
    save_file(trainable, str(tmp / TENSORS))
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "rng": _rng_states(device), "epoch_generator": epoch_generator_state},
               tmp / STATE)
    (tmp / PROGRESS).write_text(json.dumps(asdict(progress)))
    # Read back what was written before anything older is let go: a short write or a
    # corrupted record fails here, while the previous checkpoint is still the latest.
    _check_formats(tmp)
    manifest = {f.name: {"size": f.stat().st_size, "sha256": sha256_of(f)}
                for f in sorted(tmp.iterdir())}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))  # last: marks it complete
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    pointer = folder / f".{LATEST}.tmp"
    pointer.write_text(out.name)
    os.replace(pointer, folder / LATEST)  # atomic: readers see the old or the new checkpoint
    _prune(folder, progress.step, keep)
    return out


def _step(path: Path) -> int:
    try:
        return int(path.name.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def _prune(folder: Path, step: int, keep: int) -> None:
    """Keep the newest `keep` checkpoints up to `step`. Later ones are left from a timeline
    this run abandoned (it restarted from an earlier one): gone too, as are temporary folders
    of writes that a killed process never finished."""
    done = sorted((p for p in folder.glob("step-*") if 0 <= _step(p) <= step), key=_step)
    stale = [p for p in folder.glob("step-*") if _step(p) > step]
    stale += [p for p in folder.glob(".step-*.tmp") if p.is_dir()]
    for old in done[:-keep] + stale:
        shutil.rmtree(old, ignore_errors=True)


def _check_formats(path: Path) -> None:
    """Each file parses as what it should be: the safetensors header (which must cover the
    whole file), every zip record of the torch state against its CRC, the progress JSON."""
    try:
        with safe_open(str(path / TENSORS), framework="numpy") as f:
            list(f.keys())
    except (SafetensorError, OSError) as e:
        raise Unusable(f"{path / TENSORS}: not a readable safetensors file ({e})") from None
    try:
        with zipfile.ZipFile(path / STATE) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError) as e:
        raise Unusable(f"{path / STATE}: not a readable torch file ({e})") from None
    if bad is not None:
        raise Unusable(f"{path / STATE}: record {bad} does not match its CRC")
    try:
        json.loads((path / PROGRESS).read_text())
    except (OSError, ValueError) as e:
        raise Unusable(f"{path / PROGRESS}: not readable JSON ({e})") from None


def verify(path: Path) -> Optional[str]:
    """The checkpoint is complete and unchanged since it was written: its manifest is there,
    every file in it has the recorded size and SHA-256, and the files parse. Raises Unusable.
    A `step-N` folder without a manifest was written by a peft-bench from before manifests
    (this one writes it before the folder gets its name): accepted when its files parse, and
    the returned note says that their digests could not be checked."""
    if not path.is_dir():
        raise Unusable(f"{path}: missing")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        for name in (TENSORS, STATE, PROGRESS):
            if not (path / name).is_file():
                raise Unusable(f"{path / name}: missing") from None
        _check_formats(path)
        return (f"{path} was written by an earlier peft-bench, without a manifest: its files "
                "parse (safetensors header, zip CRCs, JSON) but their digests were not checked")
    except (OSError, ValueError) as e:
        raise Unusable(f"{path / MANIFEST}: not readable JSON ({e})") from None
    for name in (TENSORS, STATE, PROGRESS):
        f, want = path / name, manifest.get(name)
        if want is None or not f.is_file():
            raise Unusable(f"{f}: missing")
        if f.stat().st_size != want["size"]:
            raise Unusable(f"{f}: {f.stat().st_size:,} bytes, the manifest says "
                           f"{want['size']:,} (truncated or overwritten)")
        if sha256_of(f) != want["sha256"]:
            raise Unusable(f"{f}: its SHA-256 differs from the manifest's (the file changed "
                           "after it was written)")
    _check_formats(path)
    return None


def _candidates(folder: Path) -> Iterator[Path]:
    """The checkpoint `latest` names, then every other one, newest first."""
    pointer = folder / LATEST
    first = None
    if pointer.is_file():
        first = folder / Path(pointer.read_text().strip()).name  # a name, never a path
        yield first
    for path in sorted(folder.glob("step-*"), key=_step, reverse=True):
        if path != first and path.is_dir() and _step(path) >= 0:
            yield path


def restore(folder: Path, model: nn.Module, opt: torch.optim.Optimizer, sched,
            device: torch.device) -> Optional[Restored]:
    """Load the newest checkpoint that verifies into model, optimiser and scheduler and set the
    RNGs; None when there is no checkpoint at all. Checkpoints skipped on the way are named in
    `note`; when none verifies, a from-scratch Restored carries the note. Refuses a checkpoint
    whose tensors do not fit the model (a config change, not damage)."""
    folder, skipped = Path(folder), []
    for path in _candidates(folder):
        try:
            legacy = verify(path)
        except Unusable as e:
            skipped.append(str(e))
            continue
        restored = _load(path, model, opt, sched, device)
        notes = [f"checkpoint skipped on resume: {'; '.join(skipped)}. Resumed from the "
                 f"earlier {path.name} instead"] if skipped else []
        if legacy:
            notes.append(legacy)
        restored.note = "; ".join(notes) or restored.note
        return restored
    if not skipped:
        return None
    return Restored(Progress(), None, f"checkpoint skipped on resume: {'; '.join(skipped)}. "
                    "No complete checkpoint was left: the run restarted from step 0")


def _load(path: Path, model: nn.Module, opt, sched, device: torch.device) -> Restored:
    saved = load_file(str(path / TENSORS))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(saved) != set(params):
        raise ValueError(f"{path}: checkpoint does not fit this model (missing "
                         f"{sorted(set(params) - set(saved))[:3]}, unexpected "
                         f"{sorted(set(saved) - set(params))[:3]})")
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))
    state = torch.load(path / STATE, weights_only=True, map_location="cpu")
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["cpu"])
    if device.type == "cuda" and "cuda" in state["rng"]:
        torch.cuda.set_rng_state(state["rng"]["cuda"], device)
    progress = Progress(**json.loads((path / PROGRESS).read_text()))
    progress.resumed_from = progress.step
    return Restored(progress, state["epoch_generator"])


def clear(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
