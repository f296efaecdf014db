"""A local model folder's files, checked before any run starts, so that a broken folder is
refused in seconds with the file named (exit 2), instead of failing a run after it began.

- `check_folder` (no torch): config.json readable and a JSON object; the weights transformers
  would load exist and are safetensors (a pickle can run code when loaded, so pickle-only
  weights are refused, never opened); every weights file's header parses.
- `load_config` / `meta_model`: the config built by transformers (which checks each field's
  type) and the model built from it on the meta device (no memory, no weights).
- `check_shapes`: the shapes in the safetensors headers (no tensor data read) against the
  meta model's, for the base model's tensors; the classification head is this task's own
  and is initialised fresh, so its shapes may differ.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from tasks.common.secrets import redact
from tasks.config.schema import ConfigError, ModelConfig

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"  # a sharded checkpoint: key -> shard file
# What torch.save / pickle write. Loading any of them unpickles, which can run code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
FIELD = "model.name_or_path"


def _refuse(path: Path, why: str) -> ConfigError:
    return ConfigError(f"{FIELD}: {redact(str(path))}: {why}")


def read_json(path: Path, what: str = "an object of settings") -> dict:
    """The file's JSON object, or a ConfigError naming the file and where the JSON breaks."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise _refuse(path, f"not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise _refuse(path, f"cannot be read ({e.strerror or e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise _refuse(path, f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") \
            from None
    if not isinstance(data, dict):
        raise _refuse(path, f"holds a JSON {type(data).__name__}, not {what}")
    return data


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files transformers loads from the folder (use_safetensors=True: the
    single file, else the sharded index's shards); refuses pickle-only or missing weights."""
    if (folder / WEIGHTS).is_file():
        return [folder / WEIGHTS]
    if (folder / INDEX).is_file():
        return _shards(folder, folder / INDEX)
    pickles = sorted(p.name for p in folder.iterdir()
                     if p.is_file() and p.name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise _refuse(folder / pickles[0], (
            "pickle weights; peft-bench loads only safetensors weights (unpickling a file can "
            "run code, so it is not opened). Convert it with safetensors where you trust it "
            "(e.g. from_pretrained(...).save_pretrained(folder) writes model.safetensors)"))
    others = sorted(p.name for p in folder.glob("*.safetensors"))
    found = f"; found only {others} (transformers loads {WEIGHTS})" if others else ""
    raise _refuse(folder, f"no model weights: neither {WEIGHTS} nor {INDEX}{found}")


def _shards(folder: Path, index: Path) -> list[Path]:
    weight_map = read_json(index, "a sharded-checkpoint index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise _refuse(index, "has no 'weight_map' of tensor names to shard files")
    shards = []
    for name in sorted(set(map(str, weight_map.values()))):
        shard = folder / name
        # A shard outside the folder (../x) would load a file nobody checked.
        if shard.resolve().parent != folder.resolve() or not name.endswith(".safetensors"):
            raise _refuse(index, f"names shard {name!r}: shards must be .safetensors files "
                          "inside the model folder")
        if not shard.is_file():
            raise _refuse(shard, f"missing: {index.name} lists it")
        shards.append(shard)
    return shards


def header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape from a safetensors header; no tensor data is read. A truncated or
    corrupt file fails here, named, rather than in the middle of a run."""
    from safetensors import SafetensorError, safe_open

    try:  # numpy: reading a header needs no torch
        with safe_open(str(path), framework="numpy") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except SafetensorError as e:
        raise _refuse(path, f"not a readable safetensors file ({e})") from None
    except OSError as e:
        raise _refuse(path, f"cannot be read ({e.strerror or e})") from None


def check_folder(folder: Path) -> None:
    """The cheap checks (no torch, no transformers): config.json, the weights' kind and
    headers."""
    read_json(folder / "config.json")
    for path in weight_files(folder):
        header_shapes(path)


def load_config(model: ModelConfig, source: str, local: bool):
    """transformers' config for the model. transformers 5 checks every field's type (a
    StrictDataclassError naming the field); for a local folder any failure is its
    config.json's. OSError (a hub model while offline) is left to the caller."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, revision=model.revision,
                                          trust_remote_code=model.trust_remote_code)
    except OSError as e:
        if local:
            raise _refuse(Path(source) / "config.json", _one_line(e)) from None
        raise
    except (StrictDataclassError, ValueError, TypeError, KeyError) as e:
        where = Path(source) / "config.json" if local else Path(redact(source))
        # The strict error already reads "Validation error for field 'n_embd': TypeError: ...".
        text = " ".join(str(e).split()) if isinstance(e, StrictDataclassError) else _one_line(e)
        raise _refuse(where, text) from None


def meta_model(config, model: ModelConfig, source: str):
    """The sequence-classification model built from the config on the meta device. A value
    that types but does not make sense (33 not divisible by 2 heads, -1 positions, an unknown
    activation) fails here, before any run."""
    import torch
    from transformers import AutoModelForSequenceClassification

    try:
        with torch.device("meta"):
            return AutoModelForSequenceClassification.from_config(
                config, trust_remote_code=model.trust_remote_code)
    except Exception as e:  # whatever the model's code raises on a bad config: name the file
        raise _refuse(Path(source) / "config.json",
                      f"no model can be built from it: {_one_line(e)}") from None


def _one_line(e: Exception) -> str:
    text = " ".join(str(e).split()) or "(no message)"
    return f"{type(e).__name__}: {text}"[:400]


def check_shapes(folder: Path, config, model) -> None:
    """Every base-model tensor in the checkpoint has the shape the config gives it."""
    if getattr(config, "quantization_config", None):
        return  # a quantised checkpoint stores packed tensors under the same names
    expected, strip = _base_shapes(model)
    for path in weight_files(folder):
        for key, shape in header_shapes(path).items():
            name = key[len(strip):] if strip and key.startswith(strip) else key
            want = expected.get(name)
            if want is not None and want != shape:
                raise _refuse(path, f"tensor {key!r} has shape {list(shape)}, but config.json "
                              f"makes it {list(want)}: the weights do not fit the config")


def _base_shapes(model) -> tuple[dict[str, tuple[int, ...]], Optional[str]]:
    """The base model's tensor shapes, named as in a checkpoint of the base model alone
    (`h.0.attn...`); checkpoint keys carrying the prefix (`transformer.h.0...`) are matched
    after stripping it. Without a base-model prefix, every tensor but the heads'."""
    import peft_modules as pm

    prefix = getattr(model, "base_model_prefix", "")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if prefix and hasattr(model, prefix):
        strip = prefix + "."
        return {k[len(strip):]: s for k, s in shapes.items() if k.startswith(strip)}, strip
    heads = pm.head_names(model)
    return {k: s for k, s in shapes.items()
            if not any(k == h or k.startswith(h + ".") for h in heads)}, None
