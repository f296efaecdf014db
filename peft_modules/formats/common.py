"""What both adapter layouts share: the config file's name and the check that saved tensors
fit the base model (names and shapes), so that a wrong adapter is refused naming the tensors."""
from __future__ import annotations

from pathlib import Path

CONFIG = "adapter_config.json"


def check_fit(path: Path, saved: dict, expected: dict, optional: dict | None = None) -> None:
    """Every `expected` tensor saved, nothing unknown, all shapes right. `optional` tensors may
    be absent (a frozen head that peft's layout carries anyway)."""
    optional = optional or {}
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected) - set(optional))
    if missing or unexpected:
        raise ValueError(f"{path}: adapter does not fit this base model; "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    known = {**optional, **expected}
    wrong = [f"{k}: saved {tuple(saved[k].shape)} vs model {tuple(known[k].shape)}"
             for k in saved if saved[k].shape != known[k].shape]
    if wrong:
        raise ValueError(f"{path}: adapter shapes do not fit this base model: {wrong[:5]}")
