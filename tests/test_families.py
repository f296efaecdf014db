"""Every model family the pipeline names, every method, `targets` left unset: tiny random models
(random non-zero biases) of GPT-2, Llama, Qwen2, Mistral, OPT, BERT, RoBERTa, DistilBERT and
DeBERTa-v2, through the benchmark flow. Under 4-bit the head, whatever it is called, and what
sits between the backbone and it stay float and trainable (isinstance is the oracle)."""
from __future__ import annotations

import pytest
import torch
from _models import FAMILIES, family_model_dir
from conftest import make_bench_config
from mlflow.tracking import MlflowClient
from torch import nn

import peft_modules as pm
from flows.benchmark import benchmark
from peft_modules.quant import is_linear4bit
from tasks.config.schema import MethodConfig, ModelConfig
from tasks.load import load_model
from tasks.report import read_children

METHODS = ("full", "lora", "dora", "qlora", "qdora")
# The head modules each family's ...ForSequenceClassification has, written out by hand.
HEADS = {"gpt2": ["score"], "llama": ["score"], "qwen2": ["score"], "mistral": ["score"],
         "opt": ["score"], "bert": ["bert.pooler", "classifier"], "roberta": ["classifier"],
         "distilbert": ["pre_classifier", "classifier"],
         "deberta-v2": ["pooler", "classifier"]}
QV = {"q_proj", "v_proj"}
TARGETS = {"gpt2": {"c_attn"}, "llama": QV, "qwen2": QV, "mistral": QV, "opt": QV,
           "bert": {"query", "value"}, "roberta": {"query", "value"},
           "distilbert": {"q_lin", "v_lin"}, "deberta-v2": {"query_proj", "value_proj"}}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("families")
    return {f: family_model_dir(f, root / f, tiny_model_dir) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_4bit_keeps_the_head_float_and_trainable(family, family_dirs):
    method = MethodConfig(name="qlora", method="qlora")
    model = load_model(ModelConfig(name_or_path=str(family_dirs[family])), method, 2, 0,
                       torch.device("cpu"))
    assert pm.head_names(model) == HEADS[family]
    summary = pm.inject_adapters(model, method.adapter_spec())
    for head in HEADS[family]:
        linears = [m for m in model.get_submodule(head).modules() if isinstance(m, nn.Linear)]
        assert linears, head
        for m in linears:
            assert not is_linear4bit(m) and m.weight.dtype == torch.float32, (head, m)
            assert m.weight.requires_grad, head
    quantised = [n for n, m in model.named_modules() if is_linear4bit(m)]
    assert quantised, "the backbone was not quantised"
    assert {n.split(".")[-1] for n in summary.adapted_layers} == TARGETS[family]
    assert len(summary.adapted_layers) == 2 * len(TARGETS[family])  # two layers each
    batch = {"input_ids": torch.tensor([[5, 6, 7, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 0]]),
             "labels": torch.tensor([1])}
    model.train()
    model(**batch).loss.backward()  # a 4-bit head would trip bitsandbytes' own assertion
    assert all(p.grad is not None for h in HEADS[family]
               for p in model.get_submodule(h).parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_every_method_finishes_with_default_targets(family, family_dirs, prefect_harness,
                                                    tmp_path, sst2_dir):
    cfg = make_bench_config(tmp_path, family_dirs[family], sst2_dir)
    cfg["name"] = f"family-{family}"
    cfg["methods"] = [{"name": m, "method": m, "rank": 4, "alpha": 8} for m in METHODS]
    cfg["data"].update(train_size=32, eval_size=16)
    cfg["training"].update(max_steps=2, eval_every=None)
    result = benchmark(config=cfg)
    assert result["failed"] == []
    kids = {r.data.tags["peft_bench.method"]: r
            for r in read_children(cfg["tracking"]["tracking_uri"], result["parent_run_id"])}
    assert sorted(kids) == sorted(METHODS)
    client = MlflowClient(cfg["tracking"]["tracking_uri"])
    for name, run in kids.items():
        assert run.info.status == "FINISHED", (family, name, run.data.tags.get("peft_bench.error"))
        assert run.data.metrics["train_steps"] == 2
        if name != "full":
            files = [a.path for a in client.list_artifacts(run.info.run_id, "adapter")]
            assert "adapter/adapter_config.json" in files, files


def test_a_family_without_default_targets_lists_its_layers():
    from transformers import ElectraConfig, ElectraForSequenceClassification

    model = ElectraForSequenceClassification(ElectraConfig(
        vocab_size=100, embedding_size=32, hidden_size=32, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=64))
    with pytest.raises(ValueError) as e:
        pm.find_targets(model, pm.AdapterSpec())
    msg = str(e.value)
    assert "no default for model type 'electra'" in msg and "set targets" in msg
    assert "candidate layers: ['dense', 'key', 'query', 'value']" in msg  # not the head's
