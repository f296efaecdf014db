"""Writing into folders a user may also keep files in, without ever deleting theirs.

`peft-bench export` once emptied its destination with `shutil.rmtree`, and a rebuilt report
replaced its whole folder: a user's file in either was gone. Now every folder we write gets a
manifest of the files in it that are ours. A later write replaces those files and removes the
ones of ours it no longer writes; anything not in the manifest is the user's and stays.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

MANIFEST = ".peft-bench-files.json"


class DestinationError(ValueError):
    """The destination cannot be written as asked; the message names it."""


def files_in(folder: Path) -> list[str]:
    """Every file under `folder`, as sorted relative POSIX paths (the manifest left out)."""
    folder = Path(folder)
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.name != MANIFEST)


def ours(folder: Path) -> set[str]:
    """The files an earlier write recorded as ours (none if there is no readable manifest)."""
    try:
        listed = json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    return {p for p in listed.get("files", []) if isinstance(p, str) and ".." not in p}


def check_destination(out: Path, force: bool, option: str = "--force") -> None:
    """Refuse a destination that is a file, or a folder holding anything unless `force`."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DestinationError(f"{out} is a file, not a folder")
    if out.is_dir() and not force:
        present = sorted(p.name for p in out.iterdir())
        if present:
            shown = ", ".join(present[:5]) + (", ..." if len(present) > 5 else "")
            raise DestinationError(
                f"{out} is not empty ({shown}); choose an empty or new folder, or pass {option} "
                "to write into it (only the files peft-bench writes are replaced; yours stay)")


def install(staged: Path, out: Path) -> Path:
    """Move the finished files of `staged` into `out`: ours replaced one by one (os.replace,
    so each is whole), our stale ones removed, every other file left as it was. `staged` is
    removed. Returns `out`."""
    staged, out = Path(staged), Path(out)
    new = files_in(staged)
    if not out.exists():
        _write_manifest(staged, new)
        staged.rename(out)  # the common case: a new folder appears whole
        return out
    for rel in new:
        target = out / rel
        if target.is_dir():
            raise DestinationError(f"{target} is a folder; peft-bench writes a file there")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged / rel, target)
    for rel in sorted(ours(out) - set(new)):
        (out / rel).unlink(missing_ok=True)
    _write_manifest(out, new)
    shutil.rmtree(staged, ignore_errors=True)
    return out


def swap_in(staged: Path, out: Path) -> Path:
    """Replace the folder `out` (ours, e.g. a report) by `staged` in one rename, then move
    back every file of the old folder that is not ours. The old folder is deleted only once
    those are back: a crash in between leaves them in `.<name>.old`, never lost."""
    staged, out = Path(staged), Path(out)
    new = files_in(staged)
    _write_manifest(staged, new)
    if not out.exists():
        staged.rename(out)
        return out
    old = out.with_name(f".{out.name}.old")
    if old.exists():  # a crash left one: move its user files forward first
        swap_back_user_files(old, out, set(new))
        shutil.rmtree(old)
    out.rename(old)
    try:
        staged.rename(out)
    except BaseException:
        old.rename(out)
        raise
    swap_back_user_files(old, out, set(new))
    shutil.rmtree(old, ignore_errors=True)
    return out


def swap_back_user_files(old: Path, out: Path, new: set[str]) -> None:
    """Move the files of `old` that are neither ours nor replaced by ours into `out`."""
    for rel in sorted(set(files_in(old)) - ours(old) - new):
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(old / rel, target)


def _write_manifest(folder: Path, files: list[str]) -> None:
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"files": files}, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, folder / MANIFEST)
