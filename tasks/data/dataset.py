"""Read and validate a text-classification dataset (SST-2 by default), without a tokenizer.

A source is either a hub dataset id (`datasets.load_dataset`) or a local folder holding one file
per split: `<split>.tsv`, `.csv`, `.jsonl` or `.parquet` (first match in that order). Every
problem with the data raises `DataError` naming the file (or hub id), the column and the line,
so bad input is reported before any model is loaded, and before torch, transformers or Prefect
are imported: this module needs only pandas.

Selected rows come back as DataFrames with the columns `text` and `label` whatever the source
column names were; the index is the position in the source file (`line`, header = line 1, for
text files; `row index`, 0-based, for Parquet and hub data), so any later message can point
back into the file."""
from __future__ import annotations

import codecs
import csv
import functools
import hashlib
import io
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from tasks.config.build import looks_local
from tasks.config.schema import DataConfig
from tasks.data import labels
from tasks.data.labels import DataError

EXTENSIONS = (".tsv", ".csv", ".jsonl", ".parquet")


@dataclass
class DataSummary:
    source: str
    files: dict[str, str]  # role ("train"/"eval") -> file path or "hub:<id>[<split>]"
    num_labels: int
    train_rows: int
    eval_rows: int
    train_available: int  # rows in the split before `train_size` subsetting
    eval_available: int
    label_counts: dict[str, dict[int, int]]  # role -> label -> count, every label listed
    digest: str  # sha256 over the selected rows (text + label), train then eval (then test)
    test_rows: int = 0
    test_available: int = 0
    test_is_eval: bool = False  # the test split is the selection split: optimistic numbers
    label_names: Optional[list[str]] = None  # class names by id (tasks/data/labels.py), if known


# ---------------------------------------------------------------- reading one split


@dataclass
class _Table:
    where: str  # what messages name: the file path, or the hub id and split
    unit: str  # "line" (text files, 1-based, header = 1) or "row index" (0-based)
    frame: pd.DataFrame  # columns as read, no conversion
    positions: list[int]


def _decode(path: Path) -> str:
    # Decode the whole file at once (fast), and on failure turn the byte offset into a line.
    data = path.read_bytes()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]  # a BOM would otherwise glue onto the first column name
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}: line {line}: not valid UTF-8 "
                        f"({e.reason} at byte {e.start})") from None


@functools.lru_cache(maxsize=None)
def _largest_field_limit() -> int:
    # sys.maxsize overflows the C long the csv module stores the limit in where long is 32-bit
    # (Windows); halve until it fits, which lands on the platform's LONG_MAX.
    limit = sys.maxsize
    while True:
        try:
            csv.field_size_limit(limit)
            return limit
        except OverflowError:
            limit //= 2


def _unlimit_fields() -> None:
    # Python's csv refuses a field over 131,072 characters; a long document is normal input
    # (max_length truncates it at tokenisation). The limit is process-global: it is only ever
    # raised here, never restored, because a reader in another thread could be mid-file.
    limit = _largest_field_limit()
    if csv.field_size_limit() < limit:  # lowered again by someone else since
        csv.field_size_limit(limit)


def _read_delimited(path: Path, delimiter: str) -> _Table:
    # TSV is read with quoting off: GLUE text holds bare quote characters, and a quoting reader
    # would merge lines. CSV keeps standard quoting (commas in text need it).
    _unlimit_fields()
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    text = io.StringIO(_decode(path), newline="")
    reader = csv.reader(text, delimiter=delimiter, quoting=quoting)
    rows, positions, prev = [], [], 0
    try:
        header = [name.strip() for name in next(reader, [])]
        if not header:
            raise DataError(f"{path}: file is empty (expected a header line)")
        prev = reader.line_num
        for row in reader:
            start, prev = prev + 1, reader.line_num  # a quoted CSV field may span lines
            if not row:
                continue  # blank line
            if len(row) != len(header):
                raise DataError(f"{path}: line {start}: {len(row)} fields, but the header "
                                f"{header} has {len(header)}")
            rows.append(row)
            positions.append(start)
    except csv.Error as e:
        raise DataError(f"{path}: line {prev + 1}: {e}") from None
    return _Table(str(path), "line", pd.DataFrame(rows, columns=header, dtype=object), positions)


def _read_jsonl(path: Path) -> _Table:
    records, positions = [], []
    for n, raw in enumerate(_decode(path).split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {n}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}: line {n}: expected a JSON object, "
                            f"got {type(record).__name__}")
        records.append(record)
        positions.append(n)
    return _Table(str(path), "line", pd.DataFrame.from_records(records), positions)


def _read_parquet(path: Path) -> _Table:
    try:
        frame = pd.read_parquet(path)
    except Exception as e:  # pyarrow raises several unrelated types for unreadable files
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    return _Table(str(path), "row index", frame, list(range(len(frame))))


_READERS = {".tsv": lambda p: _read_delimited(p, "\t"), ".csv": lambda p: _read_delimited(p, ","),
            ".jsonl": _read_jsonl, ".parquet": _read_parquet}


def _split_file(folder: Path, split: str) -> Path:
    for ext in EXTENSIONS:
        if (folder / f"{split}{ext}").is_file():
            return folder / f"{split}{ext}"
    tried = ", ".join(f"{split}{ext}" for ext in EXTENSIONS)
    raise DataError(f"{folder}: no file for split {split!r} (tried {tried})")


def _local_folder(cfg: DataConfig) -> Optional[Path]:
    """The source folder, None for a hub id, DataError for anything else."""
    if not looks_local(cfg.source):
        return None
    path = Path(cfg.source).expanduser()
    if not path.exists():
        raise DataError(f"data.source {cfg.source!r}: no such file or folder ({path.resolve()})")
    if not path.is_dir():
        raise DataError(f"data.source {cfg.source!r} is a file; it must be a folder holding one "
                        f"file per split ({cfg.train_split}.tsv and {cfg.eval_split}.tsv, or "
                        f".csv/.jsonl/.parquet), or a hub dataset id")
    return path


def _read_hub(cfg: DataConfig) -> dict[str, _Table]:
    import datasets  # imported here: slow to import and not needed for local data

    try:
        dsd = datasets.load_dataset(cfg.source, name=cfg.hub_config)
    except datasets.exceptions.DatasetNotFoundError as e:
        raise DataError(f"hub dataset {cfg.source!r}: {e}") from None
    # Network errors propagate as they are, so the Prefect task's retries can handle them.
    tables = {}
    for split in dict.fromkeys(s for s in (cfg.train_split, cfg.eval_split, cfg.test_split) if s):
        if split not in dsd:
            raise DataError(f"hub dataset {cfg.source!r} has no split {split!r} "
                            f"(splits: {sorted(dsd)})")
        frame = dsd[split].to_pandas()
        tables[split] = _Table(f"hub:{cfg.source}[{split}]", "row index", frame,
                               list(range(len(frame))))
    return tables


# ---------------------------------------------------------------- validation


# The frame columns a split's text comes back in: one text, or a pair (tokenised together).
TEXT_OUT = ("text", "text_pair")


def _text_value(value: Any, where: str) -> str:
    if isinstance(value, bytes):  # Parquet binary columns, or strings pyarrow did not decode
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{where} is not valid UTF-8") from None
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        raise DataError(f"{where} is empty (null)")
    if not isinstance(value, str):
        raise DataError(f"{where} is not text (got {type(value).__name__} {value!r})")
    if not value.strip():
        raise DataError(f"{where} is empty")
    return value


def _clean(table: _Table, cfg: DataConfig, split: str) -> pd.DataFrame:
    """Check one split and return it as `text`/`label` columns indexed by file position."""
    present = list(table.frame.columns)
    for column in (*cfg.text_columns, cfg.label_column):
        if column not in present:
            raise DataError(f"{table.where}: no column {column!r} (columns present: {present})")
    if len(table.frame) == 0:
        raise DataError(f"{table.where}: split {split!r} has no rows")
    texts: dict[str, list[str]] = {out: [] for out in TEXT_OUT[:len(cfg.text_columns)]}
    values_: list[labels.Label] = []
    rows = zip(table.positions, table.frame[cfg.label_column].tolist(),
               *(table.frame[c].tolist() for c in cfg.text_columns))
    for pos, label, *values in rows:
        at = f"{table.where}: {table.unit} {pos}"
        for out, column, value in zip(texts, cfg.text_columns, values):
            texts[out].append(_text_value(value, f"{at}: column {column!r}"))
        values_.append(labels.parse(label, f"{at}: column {cfg.label_column!r}"))
    index = pd.Index(table.positions, name=table.unit)
    # Ids or class names as read; tasks.data.labels.resolve turns names into ids for every split.
    return pd.DataFrame({**texts, "label": values_}, index=index)


def _subset(frame: pd.DataFrame, size: Optional[int], seed: int, split: str,
            how: str = "random") -> pd.DataFrame:
    # Rank rows by a hash of (seed, split, position): stable across runs, platforms and library
    # versions (unlike an RNG stream), and a larger size always extends a smaller selection.
    if size is None or size >= len(frame):
        return frame
    if how == "first":  # the first rows in file order, as some published setups use
        return frame.iloc[:size]
    def rank(i: int) -> bytes:
        return hashlib.blake2b(f"{seed}:{split}:{i}".encode(), digest_size=8).digest()
    chosen = sorted(sorted(range(len(frame)), key=rank)[:size])  # keep file order
    return frame.iloc[chosen]


def _digest(frames: dict[str, pd.DataFrame], names: Optional[list[str]]) -> str:
    h = hashlib.sha256()
    if names is not None:  # the same ids under other names are other data; integer labels
        h.update(f"[label names]\n{json.dumps(names)}\n".encode())  # hash as they always did
    for role, frame in frames.items():
        h.update(f"[{role}]\n".encode())
        pairs = frame["text_pair"] if "text_pair" in frame else [None] * len(frame)
        for text, pair, label in zip(frame["text"], pairs, frame["label"]):
            line = f"{label}\t{text}" + ("" if pair is None else f"\t{pair}")
            h.update(f"{line}\n".encode("utf-8"))
    return h.hexdigest()


def _size(cfg: DataConfig, role: str, frame: pd.DataFrame, where: str) -> Optional[int]:
    field = f"{role}_size"
    size = getattr(cfg, field)
    if size is None or size <= len(frame):
        return size
    if cfg.allow_smaller:
        return None  # all rows; DataSummary records how many were used
    raise DataError(f"data.{field} = {size:,} but {where} has only {len(frame):,} rows; lower "
                    f"data.{field}, or set data.allow_smaller: true to use all of them")


def _tables(cfg: DataConfig, roles: dict[str, str]) -> dict[str, _Table]:
    folder = _local_folder(cfg)
    if folder is None:
        return _read_hub(cfg)
    paths = {s: _split_file(folder, s) for s in dict.fromkeys(roles.values())}
    return {s: _READERS[p.suffix](p) for s, p in paths.items()}


def _carve_test(train: pd.DataFrame, cfg: DataConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train rows left, test rows): a seeded share of the training split, taken before the
    training subset is drawn, so no test row is ever trained on."""
    n = max(1, round(cfg.test_from_train * len(train)))
    test = _subset(train, n, cfg.seed, "test-from-train")
    return train.drop(test.index), test


def load_frames(cfg: DataConfig) -> tuple[dict[str, pd.DataFrame], DataSummary]:
    """Read, validate and subset the splits; frames are keyed by role ("train", "eval" and,
    with a test split, "test")."""
    if cfg.train_split == cfg.eval_split:
        raise DataError(f"data: train_split and eval_split are both {cfg.train_split!r}; "
                        f"the benchmark needs held-out evaluation data")
    roles = {"train": cfg.train_split, "eval": cfg.eval_split}
    if cfg.test_split:
        roles["test"] = cfg.test_split
    tables = _tables(cfg, roles)
    where = {role: tables[split].where for role, split in roles.items()}
    full = {role: _clean(tables[split], cfg, split) for role, split in roles.items()}
    for role, frame in full.items():
        labels.check_hidden(frame, where[role], role)
    # Names map to ids over the whole training file, before any carving or subsetting: the
    # classes do not depend on the seed or the sizes.
    full, names = labels.resolve(full, where, cfg)
    if cfg.test_from_train:
        full["train"], full["test"] = _carve_test(full["train"], cfg)
        roles["test"], where["test"] = "test-from-train", f"{where['train']} (test_from_train)"
    num_labels, why = labels.num_labels(cfg, full["train"], where["train"], names)
    for role, frame in full.items():
        labels.check_range(frame, where[role], cfg.label_column, num_labels, why)
    frames = {role: _subset(full[role], _size(cfg, role, full[role], where[role]),
                            cfg.seed, roles[role], cfg.subset) for role in roles}
    labels.check_classes(frames["train"], where["train"], cfg, names)
    counts = {role: {k: int((f["label"] == k).sum()) for k in range(num_labels)}
              for role, f in frames.items()}
    summary = DataSummary(
        source=cfg.source, files=where, num_labels=num_labels,
        train_rows=len(frames["train"]), eval_rows=len(frames["eval"]),
        train_available=len(full["train"]), eval_available=len(full["eval"]),
        label_counts=counts, digest=_digest(frames, names), label_names=names,
        test_rows=len(frames.get("test", ())), test_available=len(full.get("test", ())),
        test_is_eval=cfg.test_split is not None and cfg.test_split == cfg.eval_split)
    return frames, summary


def load_splits(cfg: DataConfig) -> dict[str, pd.DataFrame]:
    """Selected, validated rows of `cfg.train_split` and `cfg.eval_split`, keyed by split name."""
    frames, _ = load_frames(cfg)
    out = {cfg.train_split: frames["train"], cfg.eval_split: frames["eval"]}
    if "test" in frames and cfg.test_split != cfg.eval_split:
        out[cfg.test_split or "test-from-train"] = frames["test"]
    return out


def validate_data(cfg: DataConfig) -> DataSummary:
    """Load and check the data without a tokenizer, so bad input fails before a model loads."""
    return load_frames(cfg)[1]


