"""`method: peft` (issue #18, item 1): any Hugging Face peft config as a method. Oracles: peft
applied by hand in the test (get_peft_model, create_loraplus_optimizer, PeftModel
.from_pretrained), our own LoRA with the same weights, and the logged predictions; the flow
runs for real under a Prefect test server with a real MLflow store and the tiny GPT-2."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from _models import batch, tiny_bert, tiny_gpt2
from conftest import make_bench_config
from mlflow.tracking import MlflowClient
from peft import LoraConfig, PeftModel, get_peft_model
from peft.optimizers import create_loraplus_optimizer
from pydantic import ValidationError
from test_adapter_parity import peft_name

import peft_modules as pm
from tasks.config.schema import BenchConfig, ConfigError, MethodConfig
from tasks.load import inject_adapter_task
from tasks.methods.hf_peft import inject_peft, refusal
from tasks.methods.optim import optimizer_factory
from tasks.tracking.reuse import run_key
from tasks.training import checkpoint
from tasks.training.checkpoint import Progress

LORA = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["c_attn"]}
IA3 = {"peft_type": "IA3", "target_modules": ["c_attn"], "feedforward_modules": []}
CPU = torch.device("cpu")


def _method(block: dict, **extra) -> MethodConfig:
    return MethodConfig(name="p", method="peft", peft=block, **extra)


def _randomise(model, seed: int = 3) -> None:
    """B = 0 at init would hide a wrong scale or a dropped layer: every trainable tensor moved."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


# ------------------------------------------------------------------ injection, oracle: peft
# BERT: peft adds only `classifier`/`score` to modules_to_save by itself; the pretrained pooler
# trains as our adapters train it only because the pipeline names it.
FAMILIES = {"gpt2": (tiny_gpt2, ["c_attn"], ["score"]),
            "bert": (tiny_bert, ["query", "value"], ["pooler", "classifier"])}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_injected_lora_gives_peft_by_hand_logits_and_ours(family):
    build, targets, heads = FAMILIES[family]
    block = {**LORA, "target_modules": targets}
    ours_base, hand_base, mine_base = build(), build(), build()
    summary = inject_adapter_task.fn(ours_base, _method(block))
    piped = summary.model
    hand = get_peft_model(hand_base, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                target_modules=targets, modules_to_save=list(heads)))
    _randomise(piped)
    mine = dict(piped.named_parameters())
    hand_params = dict(hand.named_parameters())
    trainable = sorted(n for n, p in mine.items() if p.requires_grad)
    assert trainable == sorted(n for n, p in hand_params.items() if p.requires_grad)
    for head in heads:  # the head trains
        assert any(f".{head}.modules_to_save." in n for n in trainable), head
    with torch.no_grad():
        for n in trainable:
            hand_params[n].copy_(mine[n])
    b = batch()
    assert torch.allclose(piped(**b).logits, hand(**b).logits, atol=1e-6)
    assert summary.trainable_params == hand.get_nb_trainable_parameters()[0]
    assert len(summary.adapted_layers) == 2 * len(targets)
    # our own method: lora with the same weights: how a user compares ours with peft's
    pm.inject_adapters(mine_base, pm.AdapterSpec(method="lora", rank=4, alpha=8,
                                                 targets=targets))
    with torch.no_grad():
        for n, p in mine_base.named_parameters():
            if p.requires_grad:
                p.copy_(mine[peft_name(n)])
    assert torch.allclose(mine_base(**b).logits, piped(**b).logits, atol=1e-5)


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize("method, named", [
    ({"method": "peft", "peft": {"peft_type": "VERAX"}}, "peft.peft_type: unknown peft type 'VERAX'"),
    ({"method": "peft", "peft": {"peft_type": "VERA", "rr": 4}}, "peft.rr: unknown field of VeraConfig"),
    ({"method": "peft", "peft": {"peft_type": "VERA", "task_type": "CAUSAL_LM"}}, "peft.task_type"),
    ({"method": "peft", "rank": 4, "targets": ["c_attn"], "peft": {"peft_type": "VERA"}},
     "rank, targets: our own adapter fields do nothing for method: peft"),
    ({"method": "lora", "peft": {"peft_type": "VERA"}}, "peft: only for method: peft"),
    ({"method": "peft"}, "peft: required for method: peft"),
    ({"method": "peft", "peft": IA3, "optimizer": {"name": "loraplus"}},
     "optimizer.name: loraplus trains a LoRA's A and B"),
])
def test_bad_blocks_are_refused_naming_the_field_before_any_model(method, named):
    # The model folder does not exist: the refusal comes from the config, before any load.
    cfg = {"name": "x", "model": {"name_or_path": "/nonexistent/model"},
           "methods": [{"name": "p", **method}]}
    with pytest.raises(ValidationError) as e:
        BenchConfig.model_validate(cfg)
    assert named in str(e.value)


def test_config_round_trips_with_the_peft_block():
    cfg = BenchConfig.model_validate({"name": "x", "methods": [
        {"name": "p", "method": "peft", "peft": LORA, "optimizer": {"name": "loraplus"}}]})
    again = BenchConfig.model_validate(json.loads(json.dumps(cfg.model_dump(mode="json"))))
    assert again == cfg and again.methods[0].optimizer.lr_ratio == 16.0


# ------------------------------------------------------------------ sweep keys, run keys
def test_sweep_key_peft_r_reaches_the_block_and_the_run_key():
    cfg = BenchConfig.model_validate({"name": "x", "sweep": {}, "methods": [
        {"name": "lora", "method": "lora"},
        {"name": "p", "method": "peft", "peft": LORA, "sweep": {"peft.r": [2, 8]}}]})
    assert cfg.grid_jobs() == [("lora", {}), ("p", {"peft.r": 2}), ("p", {"peft.r": 8})]
    two, eight = (cfg.with_point("p", {"peft.r": r}) for r in (2, 8))
    assert two.methods[1].peft == {**LORA, "r": 2} and eight.methods[1].peft["r"] == 8
    keys = {run_key(c, "p", "validation", "d", "cpu") for c in (two, eight, cfg)}
    assert len(keys) == 3  # no two peft blocks ever reuse each other's runs
    with pytest.raises(ValidationError, match=r"peft\.rr: unknown field of LoraConfig"):
        BenchConfig.model_validate({"name": "x", "sweep": {}, "methods": [
            {"name": "p", "method": "peft", "peft": LORA, "sweep": {"peft.rr": [2, 8]}}]})
    with pytest.raises(ValidationError, match=r"\['peft.r'\] address a peft: block"):
        BenchConfig.model_validate({"name": "x", "sweep": {}, "methods": [
            {"name": "l", "method": "lora", "sweep": {"peft.r": [2, 8]}}]})


# ------------------------------------------------------------------ LoRA+ optimiser
def test_loraplus_param_groups_match_peft_and_the_ratio():
    model = inject_peft(tiny_gpt2(), LORA, ["score"]).model
    make = optimizer_factory(_method(LORA, optimizer={"name": "loraplus", "lr_ratio": 16}))
    ours = make(model, 1e-3, 0.01)
    theirs = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16,
                                       weight_decay=0.01)
    lr_of = {id(p): g["lr"] for g in ours.param_groups for p in g["params"]}
    assert lr_of == {id(p): g["lr"] for g in theirs.param_groups for p in g["params"]}
    for n, p in model.named_parameters():
        if ".lora_B." in n:
            assert lr_of[id(p)] == pytest.approx(16e-3), n
        elif ".lora_A." in n:
            assert lr_of[id(p)] == pytest.approx(1e-3), n
    assert optimizer_factory(_method(LORA)) is None  # the default stays the loop's AdamW


# ------------------------------------------------------------------ checkpoints
def _peft_run(seed: int):
    torch.manual_seed(seed)
    model = inject_peft(tiny_gpt2(), IA3, ["score"]).model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / 10)
    return model, opt, sched


def _steps(model, opt, sched, steps: range) -> None:
    for s in steps:
        model(**batch(seed=s)).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()


def test_a_resumed_peft_model_equals_an_uninterrupted_one(tmp_path):
    whole = _peft_run(0)
    _steps(*whole, range(4))
    first = _peft_run(0)
    _steps(*first, range(2))
    checkpoint.save(tmp_path, first[0], first[1], first[2], Progress(step=2, samples=8),
                    torch.Generator().get_state(), CPU)
    resumed = _peft_run(1)  # other init: only the checkpoint can make it equal
    assert checkpoint.restore(tmp_path, *resumed, CPU) is not None
    _steps(*resumed, range(2, 4))
    a, b = dict(whole[0].named_parameters()), dict(resumed[0].named_parameters())
    moved = [n for n, p in a.items() if p.requires_grad]
    assert moved and all(torch.equal(a[n], b[n]) for n in moved)


# ------------------------------------------------------------------ refusal
def test_a_method_peft_refuses_on_conv1d_is_refused_in_preflight(tiny_model_dir, sst2_dir,
                                                                  tmp_path):
    from tasks.preflight import check_targets

    oft = {"peft_type": "OFT", "target_modules": ["c_attn"]}
    why = refusal(BenchConfig.model_validate(
        {"name": "x", "model": {"name_or_path": str(tiny_model_dir)},
         "methods": [{"name": "o", "method": "peft", "peft": oft}]}).model, oft)
    assert "Conv1D" in why and "not supported" in why
    cfg = make_bench_config(tmp_path, tiny_model_dir, sst2_dir)
    cfg["methods"] = [{"name": "ia3", "method": "peft", "peft": IA3},
                      {"name": "oft", "method": "peft", "peft": oft}]
    with pytest.raises(ConfigError, match=r"methods\.1 \(oft\): peft OFT cannot run on this "
                                          r"model: .*Conv1D.*not supported"):
        check_targets(BenchConfig.model_validate(cfg))



def test_a_pre_check_that_cannot_run_on_meta_leaves_the_method_to_the_run(tiny_model_dir,
                                                                          sst2_dir, tmp_path):
    """SHiRA builds its mask with torch.nonzero, which has no meta-device kernel: the pre-check
    cannot tell, so it lets the method through (it trains on BERT, docs/methods.md) instead of
    ending `peft-bench run` with a NotImplementedError before any run (seen on methods-all)."""
    from _models import family_model_dir

    from tasks.preflight import check_targets

    cfg = make_bench_config(tmp_path, family_model_dir("bert", tmp_path / "bert", tiny_model_dir),
                            sst2_dir)
    shira = {"peft_type": "SHIRA", "r": 2, "target_modules": ["query", "value"]}
    cfg["methods"] = [{"name": "shira", "method": "peft", "peft": shira}]
    check_targets(BenchConfig.model_validate(cfg))
    assert refusal(BenchConfig.model_validate(cfg).model, shira) is None

# ------------------------------------------------------------------ the real flow
@pytest.fixture(scope="module")
def flow_run(prefect_harness, tmp_path_factory, tiny_model_dir, sst2_dir):
    from flows.benchmark import benchmark

    tmp = tmp_path_factory.mktemp("peft-flow")
    cfg = make_bench_config(tmp, tiny_model_dir, sst2_dir)
    cfg["methods"] = [{"name": "ia3", "method": "peft", "peft": IA3},
                      {"name": "plus", "method": "peft", "peft": LORA,
                       "optimizer": {"name": "loraplus", "lr_ratio": 4}},
                      {"name": "fa", "method": "peft", "peft": LORA,
                       "optimizer": {"name": "lorafa"}}]
    result = benchmark(config=cfg)
    return cfg, result, MlflowClient(cfg["tracking"]["tracking_uri"]), tmp


def _child(client, cfg, parent, method):
    from tasks.common import names
    from tasks.report import read_children

    runs = [r for r in read_children(cfg["tracking"]["tracking_uri"], parent)
            if r.data.tags.get(names.METHOD) == method
            and r.data.tags.get(names.ROLE) == names.ROLE_CHILD]
    assert len(runs) == 1
    return runs[0]


def test_the_flow_trains_peft_methods_and_logs_peft_layout(flow_run, tiny_model_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tasks.reporting.export import export_run

    cfg, result, client, tmp = flow_run
    assert result["failed"] == [] and set(result["states"].values()) == {"COMPLETED"}
    run = _child(client, cfg, result["parent_run_id"], "ia3")
    assert run.info.status == "FINISHED" and run.data.tags["peft_bench.method_kind"] == "peft"
    assert run.data.metrics["trainable_params"] > 0
    local = Path(client.download_artifacts(run.info.run_id, "", str(tmp / "dl")))
    adapter = local / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "IA3"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    base.config.pad_token_id = tok.pad_token_id
    loaded = PeftModel.from_pretrained(base, str(adapter)).eval()
    preds = pd.read_csv(local / "predictions.csv")
    with torch.no_grad():  # one row at a time: no padding, the logged probabilities back
        for _, row in preds.head(8).iterrows():
            enc = tok(row["text"], truncation=True, max_length=32, return_tensors="pt")
            p1 = loaded(**enc).logits.softmax(-1)[0, 1].item()
            assert p1 == pytest.approx(row["p_1"], abs=1e-4)
        enc = tok(list(preds["text"].head(8)), truncation=True, max_length=32,
                  return_tensors="pt", padding=True)
        logits = loaded(**enc).logits
    merged_dir = export_run(cfg["tracking"]["tracking_uri"], run.info.run_id, tmp / "merged",
                            merged=True)
    merged = AutoModelForSequenceClassification.from_pretrained(merged_dir).eval()
    merged.config.pad_token_id = tok.pad_token_id
    with torch.no_grad():
        assert torch.allclose(merged(**enc).logits, logits, atol=1e-5)


def test_the_loraplus_run_finished_with_its_schedule(flow_run):
    cfg, result, client, _ = flow_run
    run = _child(client, cfg, result["parent_run_id"], "plus")
    assert run.info.status == "FINISHED"
    lrs = [m.value for m in client.get_metric_history(run.info.run_id, "train/lr")]
    assert len(lrs) == 4 and lrs[0] != lrs[-1]  # the linear schedule still moves the rate



def test_the_lorafa_run_kept_a_at_its_init_and_trained_b(flow_run, tiny_model_dir):
    """LoRA-FA freezes A (Zhang et al. 2023): the logged A is the init peft draws under the
    run's seed, rebuilt here by hand; B moved off its zero init."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    cfg, result, client, tmp = flow_run
    run = _child(client, cfg, result["parent_run_id"], "fa")
    local = Path(client.download_artifacts(run.info.run_id, "adapter", str(tmp / "fa")))
    saved = load_file(str(local / "adapter_model.safetensors"))
    torch.manual_seed(cfg["training"].get("seed", 42))  # training.seed, the default
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    hand = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                           target_modules=["c_attn"], modules_to_save=["score"]))
    init = {k.replace(".default", ""): v for k, v in hand.state_dict().items() if "lora_" in k}
    a_keys = [k for k in saved if ".lora_A." in k]
    b_keys = [k for k in saved if ".lora_B." in k]
    assert a_keys and b_keys
    assert all(torch.equal(saved[k], init[k]) for k in a_keys)
    assert all(saved[k].abs().max() > 0 for k in b_keys)


PROMPT = {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4}


def test_prompt_methods_are_refused_on_a_last_token_head(tiny_model_dir, sst2_dir, tmp_path):
    """GPT-2's head would pool a padding token of every right-padded row (inputs_embeds)."""
    from tasks.methods.hf_peft import LAST_TOKEN_PROMPT
    from tasks.preflight import check_targets

    cfg = make_bench_config(tmp_path, tiny_model_dir, sst2_dir)
    for block in (PROMPT, {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4}):
        cfg["methods"] = [{"name": "pt", "method": "peft", "peft": block}]
        with pytest.raises(ConfigError, match=r"methods\.0 \(pt\): .*inputs_embeds"):
            check_targets(BenchConfig.model_validate(cfg))
    assert refusal(BenchConfig.model_validate(cfg).model, PROMPT) == LAST_TOKEN_PROMPT


def test_prompt_tuning_runs_through_the_loop_on_an_encoder(prefect_harness, tmp_path,
                                                           tiny_model_dir, sst2_dir):
    from _models import family_model_dir

    from flows.benchmark import benchmark

    bert = family_model_dir("bert", tmp_path / "bert", tiny_model_dir)
    cfg = make_bench_config(tmp_path, bert, sst2_dir)
    cfg["methods"] = [{"name": "pt", "method": "peft", "peft": PROMPT}]
    result = benchmark(config=cfg)
    client = MlflowClient(cfg["tracking"]["tracking_uri"])
    run = _child(client, cfg, result["parent_run_id"], "pt")
    assert run.info.status == "FINISHED"
    hidden = json.loads((bert / "config.json").read_text())["hidden_size"]
    heads = sum(p.numel() for n, p in
                __import__("transformers").AutoModelForSequenceClassification.from_pretrained(
                    bert, num_labels=2).named_parameters()
                if n.startswith(("bert.pooler", "classifier")))
    # the virtual tokens (4 x the embedding width) and the head (pooler + classifier), trained
    assert run.data.metrics["trainable_params"] == 4 * hidden + heads
    local = Path(client.download_artifacts(run.info.run_id, "adapter", str(tmp_path / "pt")))
    assert json.loads((local / "adapter_config.json").read_text())["peft_type"] == "PROMPT_TUNING"


def test_a_4bit_base_under_peft_lora(tiny_model_dir):
    """quantization: set on method: peft loads the base 4-bit, as for qlora; peft wraps the
    bitsandbytes Linear4bit with its own 4-bit LoRA layer, the head stays float."""
    import bitsandbytes as bnb
    from peft.tuners.lora.bnb import Linear4bit as PeftLoRA4bit

    from tasks.load import load_model

    cfg = BenchConfig.model_validate({"name": "x", "model": {"name_or_path": str(tiny_model_dir)},
                                      "methods": [{"name": "q", "method": "peft", "peft": LORA,
                                                   "quantization": {}}]})
    model = load_model(cfg.model, cfg.methods[0], 2, 0, CPU)
    wrapped = inject_adapter_task.fn(model, cfg.methods[0]).model
    layers = dict(wrapped.named_modules())
    attn = [m for n, m in layers.items() if n.endswith("attn.c_attn")]
    assert attn and all(isinstance(m, PeftLoRA4bit) for m in attn)
    assert all(isinstance(m.base_layer, bnb.nn.Linear4bit) for m in attn)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for n, m in layers.items() if ".score" in n)
    assert torch.isfinite(wrapped(**batch()).logits).all()
