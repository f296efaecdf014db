"""tasks.models.tiny: a random GPT-2 + BPE tokenizer that loads back like a hub checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tasks.models.tiny import make_tiny_model

SST2 = Path(__file__).resolve().parents[1].parent / "shared/data/sst2"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), SST2)


def test_loads_back_as_sequence_classifier(tiny):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    assert (tiny / "model.safetensors").is_file()
    assert json.loads((tiny / "config.json").read_text())["peft_bench_random_init"] is True
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    model = AutoModelForSequenceClassification.from_pretrained(tiny, num_labels=2).eval()
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    assert model.config.pad_token_id == tokenizer.eos_token_id
    assert model.config.peft_bench_random_init is True
    batch = tokenizer(["a gripping , funny film", "dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()
    # Byte-level BPE round-trips any text, so no sentence is mangled into unknown tokens.
    text = "it 's a charming , often hilarious journey — ¡olé!"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_same_seed_same_model_other_seed_differs(tmp_path):
    from safetensors.torch import load_file

    a = make_tiny_model(tmp_path / "a", SST2, max_train_lines=2000, seed=1)
    b = make_tiny_model(tmp_path / "b", SST2, max_train_lines=2000, seed=1)
    c = make_tiny_model(tmp_path / "c", SST2, max_train_lines=2000, seed=2)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
    wa, wb, wc = (load_file(p / "model.safetensors") for p in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_missing_data_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "train.tsv")):
        make_tiny_model(tmp_path / "out", tmp_path)
