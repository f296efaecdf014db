"""tasks.prepare: every source format, every data error (exact words), subsets, tokenisation,
padding/pooling correctness and the Prefect cache."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from tasks.config.schema import DataConfig
from tasks.data.collate import Collator, make_loader
from tasks.data.dataset import load_splits, validate_data
from tasks.data.labels import DataError
from tasks.prepare import prepare_dataset, tokenize_splits

SST2 = Path(__file__).resolve().parents[1].parent / "shared/data/sst2"
ROWS = [("a gripping , funny film", 1), ('he said "dull', 0), ("it's fine, i guess", 1)]
EXTS = ["tsv", "csv", "jsonl", "parquet"]


def write_split(folder: Path, split: str, ext: str, rows, columns=("sentence", "label")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{split}.{ext}"
    frame = pd.DataFrame(rows, columns=list(columns))
    if ext == "tsv":  # written by hand: GLUE style, no quoting at all
        lines = ["\t".join(columns)] + ["\t".join(str(v) for v in row) for row in rows]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    elif ext == "csv":
        frame.to_csv(path, index=False)
    elif ext == "jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_parquet(path, index=False)
    return path


def folder_with(tmp_path: Path, ext: str = "tsv", train=ROWS, validation=ROWS) -> Path:
    write_split(tmp_path / "d", "train", ext, train)
    write_split(tmp_path / "d", "validation", ext, validation)
    return tmp_path / "d"


def cfg_for(folder: Path, **kw) -> DataConfig:
    return DataConfig(source=str(folder), **kw)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from tasks.models.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny"), SST2, max_train_lines=2000)


# ---------------------------------------------------------------- loading


@pytest.mark.parametrize("ext", EXTS)
def test_each_format_loads(tmp_path, ext):
    frames = load_splits(cfg_for(folder_with(tmp_path, ext)))
    assert set(frames) == {"train", "validation"}
    train = frames["train"]
    assert train["text"].tolist() == [t for t, _ in ROWS]
    assert train["label"].tolist() == [1, 0, 1]
    # Positions point into the file: header = line 1 for text files, 0-based rows for Parquet.
    expected = {"tsv": [2, 3, 4], "csv": [2, 3, 4], "jsonl": [1, 2, 3], "parquet": [0, 1, 2]}[ext]
    assert train.index.tolist() == expected


def test_first_extension_wins_and_custom_columns(tmp_path):
    d = tmp_path / "d"
    for split in ("train", "dev"):
        write_split(d, split, "tsv", [("from tsv", 0), ("x", 1)], columns=("review", "y"))
        write_split(d, split, "csv", [("from csv", 0), ("x", 1)], columns=("review", "y"))
    cfg = DataConfig(source=str(d), eval_split="dev", text_column="review", label_column="y")
    assert load_splits(cfg)["dev"]["text"].iloc[0] == "from tsv"


def test_real_sst2_subset_is_exact_and_deterministic():
    cfg = DataConfig(source=str(SST2), train_size=200, eval_size=50)
    a, b = load_splits(cfg), load_splits(cfg)
    assert len(a["train"]) == 200 and len(a["validation"]) == 50
    assert set(a["train"]["label"]) <= {0, 1} and set(a["validation"]["label"]) <= {0, 1}
    pd.testing.assert_frame_equal(a["train"], b["train"])
    pd.testing.assert_frame_equal(a["validation"], b["validation"])
    summary = validate_data(cfg)
    assert (summary.num_labels, summary.train_rows, summary.eval_rows) == (2, 200, 50)
    assert (summary.train_available, summary.eval_available) == (67349, 872)  # README counts
    assert summary.digest == validate_data(cfg).digest
    other = validate_data(cfg.model_copy(update={"seed": 7}))
    assert other.digest != summary.digest
    # A larger subset extends the smaller one (hash ranking), so runs of different sizes nest.
    bigger = load_splits(cfg.model_copy(update={"train_size": 400}))["train"]
    assert set(a["train"].index) <= set(bigger.index)


def test_size_above_the_rows_is_refused_unless_allowed(tmp_path):
    folder = folder_with(tmp_path)
    with pytest.raises(DataError, match=r"data.eval_size = 100 but .*validation.tsv has only 3 "
                                        r"rows; lower data.eval_size, or set data.allow_smaller"):
        load_splits(cfg_for(folder, train_size=3, eval_size=100))
    frames = load_splits(cfg_for(folder, train_size=3, eval_size=100, allow_smaller=True))
    assert len(frames["train"]) == 3 and len(frames["validation"]) == 3
    summary = validate_data(cfg_for(folder, eval_size=100, allow_smaller=True))
    assert summary.eval_rows == 3  # the size actually used, which the parent run records


def test_num_labels_inferred_or_configured(tmp_path):
    rows = [("a", 0), ("b", 2), ("c", 2)]
    folder = folder_with(tmp_path, train=rows, validation=[("d", 1)])
    summary = validate_data(cfg_for(folder))
    assert summary.num_labels == 3
    assert summary.label_counts == {"train": {0: 1, 1: 0, 2: 2}, "eval": {0: 0, 1: 1, 2: 0}}
    assert validate_data(cfg_for(folder, num_labels=5)).num_labels == 5
    binary = folder_with(tmp_path / "b", train=[("a", 0), ("b", 1)], validation=[("c", 1)])
    assert validate_data(cfg_for(binary)).num_labels == 2


def test_eval_labels_do_not_widen_the_task(tmp_path):
    """num_labels comes from the training split; a stray eval label is refused, not learnt."""
    folder = folder_with(tmp_path, train=[("a", 0), ("b", 1)],
                         validation=[("c", 1), ("d", 2), ("e", 0)])
    with pytest.raises(DataError) as err:
        validate_data(cfg_for(folder))
    assert "validation.tsv: line 3: column 'label': label 2 is outside [0, 2)" in str(err.value)
    assert "inferred from the training split" in str(err.value)


def test_single_class_training_rows_are_refused(tmp_path):
    only_zero = folder_with(tmp_path, train=[("a", 0), ("b", 0)], validation=[("c", 0), ("d", 1)])
    with pytest.raises(DataError, match=r"train.tsv: every training row has label 0; a "
                                        r"classifier needs at least two classes"):
        validate_data(cfg_for(only_zero, num_labels=2))
    mixed = folder_with(tmp_path / "m", train=[("a", 0), ("b", 0), ("c", 1)], validation=ROWS)
    with pytest.raises(DataError, match=r"picked by data.train_size"):
        validate_data(cfg_for(mixed, train_size=2, subset="first"))


def test_hub_source_uses_load_dataset(monkeypatch):
    import datasets

    dsd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"idx": [0, 1], "sentence": ["good", "bad"],
                                             "label": [1, 0]}),
        "validation": datasets.Dataset.from_dict({"idx": [0], "sentence": [""], "label": [1]}),
    })
    asked = []
    monkeypatch.setattr(datasets, "load_dataset", lambda source, name=None: asked.append(name) or dsd)
    with pytest.raises(DataError) as err:
        load_splits(DataConfig(source="someorg/no-such-local-folder"))
    assert "hub:someorg/no-such-local-folder[validation]: row index 0: column 'sentence' is empty" \
        in str(err.value)
    dsd["validation"] = datasets.Dataset.from_dict({"sentence": ["fine"], "label": [1]})
    frames = load_splits(DataConfig(source="someorg/no-such-local-folder"))
    assert frames["train"]["text"].tolist() == ["good", "bad"]
    load_splits(DataConfig(source="someorg/no-such-local-folder", hub_config="mrpc"))
    assert asked[-2:] == [None, "mrpc"]  # the dataset's configuration reaches the hub
    with pytest.raises(DataError, match=r"has no split 'test' \(splits: \['train', 'validation'\]\)"):
        load_splits(DataConfig(source="someorg/no-such-local-folder", eval_split="test"))


# ---------------------------------------------------------------- errors, word for word


def _raw(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


GOOD_TSV = b"sentence\tlabel\nfine\t1\nbad\t0\n"
ERROR_CASES = {
    # name: (train.tsv bytes, validation.tsv bytes, config overrides, expected substrings)
    "missing text column": (b"text\tlabel\nfine\t1\n", GOOD_TSV, {},
                            ["train.tsv: no column 'sentence'", "columns present: ['text', 'label']"]),
    "missing label column": (b"sentence\tstars\nfine\t1\n", GOOD_TSV, {},
                             ["train.tsv: no column 'label'", "['sentence', 'stars']"]),
    "empty split": (GOOD_TSV, b"sentence\tlabel\n", {},
                    ["validation.tsv: split 'validation' has no rows"]),
    "empty file": (b"", GOOD_TSV, {}, ["train.tsv: file is empty"]),
    "label not integer": (b"sentence\tlabel\nfine\t1\nmeh\tpos\n", GOOD_TSV, {},
                          ["train.tsv: line 3: column 'label': label 'pos' is not an integer"]),
    "label fraction": (b"sentence\tlabel\nfine\t0.5\n", GOOD_TSV, {},
                       ["train.tsv: line 2: column 'label': label '0.5' is not an integer"]),
    "label over num_labels": (GOOD_TSV, b"sentence\tlabel\na\t1\nb\t0\nc\t2\n", {"num_labels": 2},
                              ["validation.tsv: line 4: column 'label': label 2 is outside [0, 2)",
                               "(data.num_labels = 2)"]),
    "negative label": (b"sentence\tlabel\na\t1\nb\t-1\n", GOOD_TSV, {},
                       ["train.tsv: line 3: column 'label': label -1 is outside [0, 2)",
                        "(num_labels inferred from the training split"]),
    "bad utf-8": (b"sentence\tlabel\nfine\t1\nbad \xff\xfe byte\t0\n", GOOD_TSV, {},
                  ["train.tsv: line 3: not valid UTF-8"]),
    "empty text": (b"sentence\tlabel\nfine\t1\n  \t0\n", GOOD_TSV, {},
                   ["train.tsv: line 3: column 'sentence' is empty"]),
    "tab in text": (b"sentence\tlabel\nfine\t1\na\tb\t0\n", GOOD_TSV, {},
                    ["train.tsv: line 3: 3 fields, but the header ['sentence', 'label'] has 2"]),
    "blank lines keep numbering": (b"sentence\tlabel\n\nfine\t1\n\nx\ty\n", GOOD_TSV, {},
                                   ["train.tsv: line 5: column 'label': label 'y'"]),
    "same split twice": (GOOD_TSV, GOOD_TSV, {"eval_split": "train"},
                         ["train_split and eval_split are both 'train'"]),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_tsv_errors_name_file_column_and_line(tmp_path, case):
    train, validation, overrides, expected = ERROR_CASES[case]
    _raw(tmp_path / "d" / "train.tsv", train)
    _raw(tmp_path / "d" / "validation.tsv", validation)
    with pytest.raises(DataError) as err:
        validate_data(cfg_for(tmp_path / "d", **overrides))
    for words in expected:
        assert words in str(err.value)


def test_missing_source_and_file_source(tmp_path):
    with pytest.raises(DataError, match=r"data.source '.*nope': no such file or folder"):
        load_splits(cfg_for(tmp_path / "nope"))
    _raw(tmp_path / "train.tsv", GOOD_TSV)
    with pytest.raises(DataError, match=r"train.tsv' is a file; it must be a folder"):
        load_splits(cfg_for(tmp_path / "train.tsv"))


def test_missing_split_file_names_folder_split_and_extensions(tmp_path):
    _raw(tmp_path / "d" / "train.tsv", GOOD_TSV)
    with pytest.raises(DataError) as err:
        load_splits(cfg_for(tmp_path / "d"))
    assert str(err.value) == (f"{tmp_path / 'd'}: no file for split 'validation' (tried "
                              "validation.tsv, validation.csv, validation.jsonl, validation.parquet)")


def test_jsonl_and_parquet_errors(tmp_path):
    d = tmp_path / "j"
    _raw(d / "validation.jsonl", b'{"sentence": "ok", "label": 1}\n')
    _raw(d / "train.jsonl", b'{"sentence": "ok", "label": 1}\n{"sentence": null, "label": 0}\n')
    with pytest.raises(DataError, match=r"train.jsonl: line 2: column 'sentence' is empty \(null\)"):
        validate_data(cfg_for(d))
    _raw(d / "train.jsonl", b'{"sentence": "ok", "label": 1}\n{"sentence": "x", "label": 1\n')
    with pytest.raises(DataError, match=r"train.jsonl: line 2: not valid JSON"):
        validate_data(cfg_for(d))
    _raw(d / "train.jsonl", b'{"sentence": 5, "label": 1}\n')
    with pytest.raises(DataError, match=r"train.jsonl: line 1: column 'sentence' is not text"):
        validate_data(cfg_for(d))
    p = tmp_path / "p"
    write_split(p, "validation", "parquet", [("ok", 1)])
    pd.DataFrame({"sentence": [b"ok", b"bad \xff"], "label": [1, 0]}).to_parquet(p / "train.parquet")
    with pytest.raises(DataError,
                       match=r"train.parquet: row index 1: column 'sentence' is not valid UTF-8"):
        validate_data(cfg_for(p))


# ---------------------------------------------------------------- tokenisation and batching


def test_tokenize_splits(tmp_path, tiny_dir):
    rows = [("a good film", 1), ("literal <|endoftext|> mid-text", 0), ("x " * 300, 1)]
    prepared = tokenize_splits(cfg_for(folder_with(tmp_path, train=rows), max_length=40),
                               str(tiny_dir))
    assert prepared.pad_token_id == 0 and prepared.num_labels == 2
    assert prepared.train.labels == [1, 0, 1] and len(prepared.eval) == 3
    assert [len(ids) == 40 for ids in prepared.train.input_ids] == [False, False, True]
    assert prepared.at_max_length == {"train": 1, "eval": 0}
    # Text that spells the special token is text: it must not become the eos/pad id.
    assert all(prepared.pad_token_id not in ids for ids in prepared.train.input_ids)
    assert prepared.eval_texts == [t for t, _ in ROWS]
    assert prepared.train_df().columns.tolist() == ["text", "label"]
    assert prepared.digest == validate_data(cfg_for(folder_with(tmp_path, train=rows))).digest


def test_trailing_eos_is_dropped(tmp_path, tiny_dir):
    """A tokenizer that appends eos (= pad) would end every sequence in the pad id, which HF's
    pooling skips; tokenize_splits drops it so the pooled token is the last one fed."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    tok._tokenizer.post_processor = TemplateProcessing(
        single="$A <|endoftext|>", special_tokens=[("<|endoftext|>", 0)])
    assert tok("a good film")["input_ids"][-1] == 0
    tok.save_pretrained(tmp_path / "eos_tok")
    prepared = tokenize_splits(cfg_for(folder_with(tmp_path)), str(tmp_path / "eos_tok"))
    assert all(ids[-1] != 0 for ids in prepared.train.input_ids + prepared.eval.input_ids)


def test_collator_right_pads():
    batch = Collator(pad_token_id=9)([{"input_ids": [1, 2, 3], "labels": 1},
                                      {"input_ids": [4], "labels": 0}])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 9, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [1, 0]
    assert all(t.dtype == torch.long for t in batch.values())


def test_pooled_token_is_last_real_token_under_padding():
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=32, n_positions=32, n_embd=16, n_layer=2, n_head=2,
                        eos_token_id=0, bos_token_id=0, pad_token_id=0, num_labels=2)
    model = GPT2ForSequenceClassification(config).eval()
    short = [5, 0, 7]  # holds the eos/pad id mid-text: must still count as a real token
    long = [3, 4, 5, 6, 7, 8, 9, 10, 11]
    collate = Collator(pad_token_id=0)
    with torch.no_grad():  # reference: each sequence on its own, no padding, no mask
        alone = [model(input_ids=torch.tensor([s])).logits[0] for s in (short, long)]
        batch = collate([{"input_ids": short, "labels": 0}, {"input_ids": long, "labels": 1}])
        together = model(input_ids=batch["input_ids"],
                         attention_mask=batch["attention_mask"]).logits
    assert batch["input_ids"][0].tolist() == short + [0] * 6
    torch.testing.assert_close(together[0], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(together[1], alone[1], atol=1e-5, rtol=0)
    # And it really is the last real token: changing the token before it changes the logits.
    with torch.no_grad():
        changed = model(input_ids=torch.tensor([[5, 0, 8]])).logits[0]
    assert not torch.allclose(changed, alone[0])


def test_make_loader_is_seeded():
    from tasks.data.collate import SplitData

    data = SplitData([[i + 1] * (i % 3 + 1) for i in range(20)], [i % 2 for i in range(20)])
    order = lambda seed: [b["labels"].tolist() + b["input_ids"][:, 0].tolist()  # noqa: E731
                          for b in make_loader(data, 4, True, seed, pad_token_id=0)]
    assert order(1) == order(1) and order(1) != order(2)
    plain = list(make_loader(data, 8, False, 0, pad_token_id=0))
    assert [len(b["labels"]) for b in plain] == [8, 8, 4]


# ---------------------------------------------------------------- the Prefect task


def test_prepared_data_cache_hits_and_invalidates(tmp_path, tiny_dir, monkeypatch):
    import stat

    import tasks.prepare as data_module
    from tasks.prepare import prepare_cached

    folder = folder_with(tmp_path)
    cfg, root = cfg_for(folder), tmp_path / "cache"
    first, hit = prepare_cached(cfg, str(tiny_dir), root=root)
    again, hit2 = prepare_cached(cfg, str(tiny_dir), root=root)
    assert (hit, hit2) == (False, True)
    assert again.train.input_ids == first.train.input_ids and again.eval.labels == first.eval.labels
    assert again.digest == first.digest and again.summary == first.summary
    assert again.frames["eval"].equals(first.frames["eval"])
    assert again.frames["eval"].index.name == first.frames["eval"].index.name == "line"
    [entry] = (root / "prepared").iterdir()
    assert stat.S_IMODE(entry.stat().st_mode) == 0o700
    for f in entry.iterdir():  # private, and nothing that could be unpickled
        assert stat.S_IMODE(f.stat().st_mode) == 0o600 and f.suffix in (".parquet", ".json")
    write_split(folder, "train", "tsv", ROWS[:2])  # same path, new content: must recompute
    assert prepare_cached(cfg, str(tiny_dir), root=root)[1] is False
    # The key covers the code that prepares the data: an edit to it is never served old ids.
    code = tmp_path / "collate_copy.py"
    code.write_text("# version 1\n")
    monkeypatch.setattr(data_module, "CODE", [*data_module.CODE, code])
    assert prepare_cached(cfg, str(tiny_dir), root=root)[1] is False
    assert prepare_cached(cfg, str(tiny_dir), root=root)[1] is True
    code.write_text("# version 2: tokenisation changed\n")
    assert prepare_cached(cfg, str(tiny_dir), root=root)[1] is False


def test_a_half_written_cache_entry_is_not_served(tmp_path, tiny_dir):
    from tasks.prepare import cache_key, prepare_cached

    cfg, root = cfg_for(folder_with(tmp_path)), tmp_path / "cache"
    half = root / "prepared" / cache_key(cfg, str(tiny_dir), None)
    half.mkdir(parents=True)
    (half / "train.parquet").write_bytes(b"truncated")  # killed before meta.json was written
    data, hit = prepare_cached(cfg, str(tiny_dir), root=root)
    assert hit is False and len(data.train) > 0


def test_prepare_dataset_retries_only_non_data_errors(prefect_harness, tmp_path, monkeypatch):
    from prefect import flow
    from prefect.cache_policies import NO_CACHE

    import tasks.prepare as data_module

    calls = []

    def failing(cfg, tok, revision=None):
        calls.append(1)
        raise (DataError("bad row") if len(calls) == 1 else OSError("hub unreachable"))

    monkeypatch.setattr(data_module, "tokenize_splits", failing)
    monkeypatch.setenv("PEFT_BENCH_CACHE", str(tmp_path / "cache"))
    quick = prepare_dataset.with_options(retry_delay_seconds=0, cache_policy=NO_CACHE,
                                         persist_result=False)

    @flow
    def run() -> str:
        return quick(cfg_for(tmp_path), "tok", return_state=True).name

    assert run() == "Failed" and len(calls) == 1  # a DataError is not retried
    assert run() == "Failed" and len(calls) == 4  # other errors: 1 try + 2 retries


# ---------------------------------------------------------------- long fields


def _long_text(chars: int) -> str:
    # Words, commas, a doubled quote and a line break: a CSV writer must quote it, and a
    # reader must keep it one field.
    unit = 'a long, "winding" review\nof a film '
    return (unit * (chars // len(unit) + 1))[:chars].rstrip() + " end"


@pytest.fixture
def default_field_limit():
    """Python's default, as a fresh process has it: the limit is process-global, and an
    earlier reader may have raised it already."""
    import csv

    csv.field_size_limit(131072)


@pytest.mark.parametrize("ext", ["tsv", "csv", "jsonl", "parquet"])
@pytest.mark.parametrize("chars", [200_000, 5_000_000])
def test_a_field_of_any_length_is_read_whole(tmp_path, ext, chars, default_field_limit):
    """Python's csv refuses fields over 131,072 characters by default; a long document is
    normal input, and only tokenisation truncates it (to max_length)."""
    text = _long_text(chars)
    if ext == "tsv":  # TSV has no quoting: no tabs or line breaks inside a field
        text = text.replace("\n", " ")
    rows = [("short", 0), (text, 1), ("fine", 1)]
    folder = folder_with(tmp_path, ext, train=rows)
    if ext == "csv":
        assert '""winding"" review\nof' in (folder / "train.csv").read_text()  # quoted
    summary = validate_data(cfg_for(folder))
    assert summary.train_rows == 3
    assert load_splits(cfg_for(folder))["train"]["text"].tolist()[1] == text


def test_a_long_field_is_truncated_at_tokenisation(tmp_path, tiny_dir, default_field_limit):
    text = _long_text(200_000)
    folder = folder_with(tmp_path, "csv", train=[("short", 0), (text, 1), ("fine", 1)])
    prepared = tokenize_splits(cfg_for(folder, max_length=24), str(tiny_dir))
    assert [len(ids) for ids in prepared.train.input_ids][1] == 24
    assert prepared.at_max_length["train"] == 1
    assert prepared.frames["train"]["text"].iloc[1] == text  # the text itself is kept whole


def test_the_field_limit_is_the_largest_the_platform_takes(monkeypatch):
    """sys.maxsize overflows a 32-bit C long (Windows): the probe halves until it fits."""
    import csv

    import tasks.data.dataset as dataset

    real = csv.field_size_limit
    def long32(*limit):
        if limit and limit[0] > 2**31 - 1:
            raise OverflowError("Python int too large to convert to C long")
        return real(*limit)
    monkeypatch.setattr(csv, "field_size_limit", long32)
    dataset._largest_field_limit.cache_clear()
    try:
        assert dataset._largest_field_limit() == 2**31 - 1 == real()
    finally:
        dataset._largest_field_limit.cache_clear()
        monkeypatch.undo()
        dataset._unlimit_fields()
