"""Tokenise a validated dataset and cache the result, as the `prepare-dataset` Prefect task.

Reading and validation live in `tasks.data.dataset` (no torch, no Prefect: fast to fail). Here the
selected rows are tokenised (truncated to `max_length`, unpadded) and kept in a cache of Parquet
files, readable by the owner only, keyed by the config, the content of the data and tokenizer
files, and the source code that prepares them (`tasks/data/dataset.py`, `tasks/data/labels.py`, this
file, `tasks/data/collate.py`): an edit to the cleaning, the label mapping or the tokenisation can
never be served old token ids. Nothing in the cache is ever unpickled."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.config.build import cache_root, looks_local
from tasks.config.schema import DataConfig
from tasks.data.collate import SplitData, load_tokenizer
from tasks.data.dataset import EXTENSIONS, DataSummary, load_frames, validate_data
from tasks.data.labels import DataError
from tasks.models.source import local_path, sha256_of


@dataclass
class PreparedData:
    """Everything training and evaluation need from the data: the training rows, the selection
    split (`eval`) and, when the config has one, the held-out `test` split."""

    train: SplitData
    eval: SplitData
    num_labels: int
    pad_token_id: int
    digest: str
    source: str
    tokenizer: str
    tokenizer_revision: Optional[str]
    max_length: int
    at_max_length: dict[str, int]  # sequences that reached max_length (so possibly truncated)
    summary: DataSummary
    frames: dict[str, pd.DataFrame] = field(repr=False)  # role -> selected raw rows
    test: Optional[SplitData] = None

    @property
    def label_names(self) -> Optional[list[str]]:
        """The class names by id (class-name labels, or data.label_names), else None."""
        return self.summary.label_names

    def split(self, role: str) -> SplitData:
        """"eval" (the selection split) or "test"."""
        if role == "test" and self.test is None:
            raise ValueError("no test split: set data.test_split or data.test_from_train")
        return self.test if role == "test" else self.eval

    def texts(self, role: str) -> list[str]:
        """The rows' text as a person reads it; a pair as `first ||| second`."""
        frame = self.frames[role]
        if "text_pair" not in frame:
            return frame["text"].tolist()
        return [f"{a} ||| {b}" for a, b in zip(frame["text"], frame["text_pair"])]

    @property
    def eval_texts(self) -> list[str]:
        return self.texts("eval")

    def train_df(self) -> pd.DataFrame:
        """Selected training rows (`text`, `label`), e.g. for `mlflow.data.from_pandas`."""
        return self.frames["train"].copy()

    def eval_df(self) -> pd.DataFrame:
        return self.frames["eval"].copy()


# ---------------------------------------------------------------- tokenisation


def _encode(tokenizer, frame: pd.DataFrame, where: str, max_length: int) -> tuple[SplitData, int]:
    # split_special_tokens: "<|endoftext|>" typed in the data is text, not a control token.
    # A pair goes through the tokenizer's own pair encoding ([CLS] a [SEP] b [SEP] and segment
    # ids for BERT), truncating the longer text first.
    pair = frame["text_pair"].tolist() if "text_pair" in frame else None
    out = tokenizer(frame["text"].tolist(), pair, truncation=True, max_length=max_length,
                    split_special_tokens=True)
    encoded = out["input_ids"]
    segments = out.get("token_type_ids") if pair is not None else None
    pad, sequences = tokenizer.pad_token_id, []
    for pos, ids in zip(frame.index, encoded):
        # HF's sequence-classification heads pool the rightmost token != pad_token_id. With
        # pad = eos, a sequence *ending* in eos (a tokenizer that appends eos) is pooled at the
        # token before that eos, so the eos is fed but never read. Dropping trailing pad ids
        # makes the pooled token the last token fed, whatever the batch. Pad ids mid-text are
        # harmless: the pooling looks for the rightmost one, and the collator masks by length.
        end = len(ids)
        while end and ids[end - 1] == pad:
            end -= 1
        if end == 0:
            raise DataError(f"{where}: {frame.index.name} {pos}: "
                            f"text has no tokens besides padding")
        sequences.append(list(ids[:end]))
    at_max = sum(len(ids) >= max_length for ids in encoded)
    types = ([list(t[:len(s)]) for t, s in zip(segments, sequences)]
             if segments is not None else None)
    return SplitData(sequences, frame["label"].astype(int).tolist(), types), at_max


def tokenize_splits(cfg: DataConfig, tokenizer_name_or_path: str,
                    revision: Optional[str] = None) -> PreparedData:
    """Validate, subset and tokenise both splits (truncated to `cfg.max_length`, unpadded)."""
    frames, summary = load_frames(cfg)
    tokenizer = load_tokenizer(tokenizer_name_or_path, revision)
    splits, at_max = {}, {}
    for role, frame in frames.items():
        splits[role], at_max[role] = _encode(tokenizer, frame, summary.files[role], cfg.max_length)
    return PreparedData(
        train=splits["train"], eval=splits["eval"], test=splits.get("test"),
        num_labels=summary.num_labels,
        pad_token_id=int(tokenizer.pad_token_id), digest=summary.digest, source=cfg.source,
        tokenizer=tokenizer_name_or_path, tokenizer_revision=revision, max_length=cfg.max_length,
        at_max_length=at_max, summary=summary, frames=frames)


# ---------------------------------------------------------------- the cache

CACHE_FORMAT = "5"  # bump when the cached layout changes (4: sentence pairs, 5: label names)
CODE = [Path(__file__).parent / f for f in ("data/dataset.py", "data/labels.py", "prepare.py", "data/collate.py")]
_TOKENIZER_FILES = (".json", ".txt", ".model", ".tiktoken")  # not weights: they can be GBs
_sha_memo: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _sha_memo:  # hash each file version once per process
        _sha_memo[key] = sha256_of(path)
    return _sha_memo[key]


def _data_files(cfg: DataConfig) -> list[Path]:
    files = []
    source = Path(cfg.source).expanduser()
    if looks_local(cfg.source) and source.is_dir():
        for split in dict.fromkeys(x for x in (cfg.train_split, cfg.eval_split, cfg.test_split) if x):
            files += [p for p in (source / f"{split}{e}" for e in EXTENSIONS) if p.is_file()][:1]
    return files


def _local_files(cfg: DataConfig, tokenizer: str) -> list[Path]:
    files = _data_files(cfg)
    tok = Path(local_path(tokenizer)).expanduser()
    if looks_local(tokenizer) and tok.is_dir():
        files += sorted(p for p in tok.iterdir() if p.is_file() and p.suffix in _TOKENIZER_FILES)
    return files


def cache_key(cfg: DataConfig, tokenizer: str, revision: Optional[str]) -> str:
    """Everything the prepared data depends on: the data config, the tokenizer, the content of
    local data and tokenizer files (hub sources: id and revision), the code that prepares them
    and the tokenizer libraries' versions."""
    import importlib.metadata as md

    h = hashlib.sha256(f"format {CACHE_FORMAT}\n{cfg.model_dump_json()}\n{tokenizer}\n"
                       f"{revision}\n".encode())
    for lib in ("transformers", "tokenizers"):
        h.update(f"{lib} {md.version(lib)}\n".encode())
    for path in CODE:
        h.update(path.read_bytes())
    for path in _local_files(cfg, tokenizer):
        h.update(f"{path.resolve()}\t{_file_sha256(path)}\n".encode())
    return h.hexdigest()[:32]


def _save(data: PreparedData, folder: Path) -> None:
    """Parquet per split plus meta.json, written into a private temp folder and renamed into
    place, so a reader sees a whole entry or none."""
    import json
    import os
    import shutil
    import tempfile
    from dataclasses import asdict

    folder.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))  # mode 0o700
    try:
        for role, split in (("train", data.train), ("eval", data.eval), ("test", data.test)):
            if split is None:
                continue
            frame = data.frames[role]
            columns = {"position": frame.index, "text": frame["text"],
                       "label": frame["label"].astype(int), "input_ids": split.input_ids}
            if "text_pair" in frame:
                columns["text_pair"] = frame["text_pair"]
            if split.token_type_ids is not None:
                columns["token_type_ids"] = split.token_type_ids
            pd.DataFrame(columns).to_parquet(tmp / f"{role}.parquet")
        meta = {k: v for k, v in asdict(data).items()
                if k not in ("train", "eval", "test", "frames")}
        meta["units"] = {role: f.index.name for role, f in data.frames.items()}
        (tmp / "meta.json").write_text(json.dumps(meta))
        for f in tmp.iterdir():
            os.chmod(f, 0o600)
        tmp.rename(folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "meta.json").is_file():  # another process won the race: fine
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read(folder: Path) -> PreparedData:
    import json

    meta = json.loads((folder / "meta.json").read_text())
    units = meta.pop("units")
    splits, frames = {}, {}
    for role in ("train", "eval", "test"):
        if not (folder / f"{role}.parquet").is_file():
            continue
        t = pd.read_parquet(folder / f"{role}.parquet")
        types = ([list(map(int, ids)) for ids in t["token_type_ids"]]
                 if "token_type_ids" in t else None)
        splits[role] = SplitData([list(map(int, ids)) for ids in t["input_ids"]],
                                 t["label"].astype(int).tolist(), types)
        texts = {c: t[c].tolist() for c in ("text", "text_pair") if c in t}
        frames[role] = pd.DataFrame({**texts, "label": t["label"].tolist()},
                                    index=pd.Index(t["position"].tolist(), name=units[role]))
    s = meta.pop("summary")
    s["label_counts"] = {r: {int(k): v for k, v in c.items()} for r, c in s["label_counts"].items()}
    return PreparedData(train=splits["train"], eval=splits["eval"], test=splits.get("test"),
                        summary=DataSummary(**s), frames=frames, **meta)


def prepare_cached(cfg: DataConfig, tokenizer: str, revision: Optional[str] = None,
                   root: Optional[Path] = None) -> tuple[PreparedData, bool]:
    """The prepared data from the cache, or tokenised now and cached; (data, was it a hit)."""
    folder = (root or cache_root()) / "prepared" / cache_key(cfg, tokenizer, revision)
    if (folder / "meta.json").is_file():
        return _read(folder), True
    if folder.exists():  # not a whole entry (entries are renamed in complete): never serve it
        import shutil
        shutil.rmtree(folder, ignore_errors=True)
    data = tokenize_splits(cfg, tokenizer, revision)
    _save(data, folder)
    return data, False


def validate_cached(cfg: DataConfig, root: Optional[Path] = None) -> DataSummary:
    """`validate_data`, its summary kept in the cache for local files: reading and checking
    SST-2's 67k training rows took ~0.35 s of every run's set-up (benchmarks/pipeline_overhead).
    Keyed like the prepared data, on the data config, the files' content and the checking code;
    a hub source is checked every time."""
    import json
    from dataclasses import asdict

    source = Path(cfg.source).expanduser()
    if not (looks_local(cfg.source) and source.is_dir()):
        return validate_data(cfg)
    h = hashlib.sha256(f"validated {CACHE_FORMAT}\n{cfg.model_dump_json()}\n".encode())
    for path in CODE[:2]:  # data/dataset.py, data/labels.py
        h.update(path.read_bytes())
    for path in _data_files(cfg):
        h.update(f"{path.resolve()}\t{_file_sha256(path)}\n".encode())
    entry = (root or cache_root()) / "validated" / f"{h.hexdigest()[:32]}.json"
    if entry.is_file():
        s = json.loads(entry.read_text())
        s["label_counts"] = {r: {int(k): v for k, v in c.items()}
                             for r, c in s["label_counts"].items()}
        return DataSummary(**s)
    summary = validate_data(cfg)  # bad data raises here, and nothing is cached
    entry.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = entry.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(asdict(summary)))
    tmp.replace(entry)  # whole or absent, as the prepared entries
    return summary


# ---------------------------------------------------------------- the Prefect task


def _retry_unless_data_error(task_, task_run, state) -> bool:
    # Retries are for flaky hub downloads; bad data or a bad config fails the same way again.
    return not isinstance(state.result(raise_on_failure=False), ValueError)


@task(name="prepare-dataset", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=10,
      retry_condition_fn=_retry_unless_data_error)
def prepare_dataset(cfg: DataConfig, tokenizer_name_or_path: str,
                    revision: Optional[str] = None) -> PreparedData:
    """Validate + tokenise, or read the same from the cache (`prepare_cached`)."""
    from prefect import get_run_logger

    data, hit = prepare_cached(cfg, tokenizer_name_or_path, revision)
    get_run_logger().info("prepared data %s (%d train, %d eval rows)",
                          "read from the cache" if hit else "tokenised and cached",
                          len(data.train), len(data.eval))
    return data
