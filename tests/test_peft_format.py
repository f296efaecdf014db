"""peft's adapter layout, with Hugging Face peft as the oracle both ways: our saved adapter loaded
by `PeftModel.from_pretrained`, and a peft-trained adapter loaded by us, must give the same logits.

The base layers carry random non-zero biases and the adapters are trained-looking (B ≠ 0, DoRA's
m ≠ ‖W0‖, head moved), so a wrong bias, scale, transposition or key cannot pass.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from _models import batch, load_4bit, tiny_gpt2, tiny_llama, trained_look
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

import peft_modules as pm

TOL = 1e-5
ARCHS = {"gpt2": (tiny_gpt2, ["c_attn"]), "llama": (tiny_llama, ["q_proj", "v_proj"])}
CASES = {"lora": ("lora", False), "rslora": ("lora", True), "dora": ("dora", False),
         "qlora": ("qlora", False), "qdora": ("qdora", False)}


def logits(model):
    b = batch()
    with torch.no_grad():
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits


def two_bases(arch: str, quantized: bool, tmp_path):
    """Two identical base models; 4-bit ones through from_pretrained, as QLoRA loads them."""
    build = ARCHS[arch][0]
    if not quantized:
        return build(), build()
    build().save_pretrained(tmp_path / "base")
    return load_4bit(tmp_path / "base"), load_4bit(tmp_path / "base")


def spec_for(arch: str, case: str) -> pm.AdapterSpec:
    method, rslora = CASES[case]
    return pm.AdapterSpec(method=method, rank=4, alpha=8, targets=ARCHS[arch][1], rslora=rslora)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("case", CASES)
def test_saved_by_us_loads_in_peft(tmp_path, arch, case):
    spec = spec_for(arch, case)
    ours, base = two_bases(arch, spec.quantized, tmp_path)
    base_logits = logits(base)
    pm.inject_adapters(ours, spec)
    expected = logits(trained_look(ours))
    assert (expected - base_logits).abs().max() > 1e-2  # the adapter does change the output
    weights = pm.save_peft_adapter(ours, spec, tmp_path / "adapter")
    theirs = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    cfg = theirs.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha, cfg.use_dora, cfg.use_rslora) == (4, 8, spec.use_dora,
                                                                        spec.rslora)
    # peft loaded every tensor of the file, under the keys it would itself save.
    saved, loaded = load_file(str(weights)), get_peft_model_state_dict(theirs)
    assert set(saved) == set(loaded) and "base_model.model.score.weight" in saved
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert (logits(theirs) - expected).abs().max().item() <= TOL


def train_a_little(model, steps: int = 3) -> None:
    """A few AdamW steps, so that B, m and the head are away from their init."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for step in range(steps):
        opt.zero_grad()
        model(**batch(seed=10 + step)).loss.backward()
        opt.step()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("case", CASES)
def test_trained_by_peft_loads_in_ours(tmp_path, arch, case):
    spec = spec_for(arch, case)
    base, ours = two_bases(arch, spec.quantized, tmp_path)
    cfg = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, lora_dropout=0.0,
                     target_modules=ARCHS[arch][1], use_dora=spec.use_dora,
                     use_rslora=spec.rslora)
    theirs = get_peft_model(base, cfg)
    m0 = {n: p.detach().clone() for n, p in theirs.named_parameters() if "magnitude" in n}
    train_a_little(theirs)
    moved = {n: p for n, p in theirs.named_parameters() if "lora_B" in n or n in m0}
    assert all(p.abs().max() > 1e-3 for n, p in moved.items() if "lora_B" in n)
    assert all((p - m0[n]).abs().max() > 1e-3 for n, p in moved.items() if n in m0)
    assert len(m0) == (2 * len(ARCHS[arch][1]) if spec.use_dora else 0)
    expected = logits(theirs)
    theirs.save_pretrained(tmp_path / "adapter")

    assert pm.read_peft_config(tmp_path / "adapter", quantized=spec.quantized) == spec
    summary = pm.load_peft_adapter(ours, tmp_path / "adapter")
    assert summary.method == spec.method
    assert len(summary.adapted_layers) == 2 * len(ARCHS[arch][1])
    assert (logits(ours) - expected).abs().max().item() <= TOL


def test_load_adapter_reads_both_layouts(tmp_path):
    spec = pm.AdapterSpec(method="dora", rank=4, alpha=8, targets=["c_attn"])
    model = tiny_gpt2()
    pm.inject_adapters(model, spec)
    expected = logits(trained_look(model))
    pm.save_adapter(model, spec, tmp_path / "ours")
    pm.save_peft_adapter(model, spec, tmp_path / "peft")
    assert not (tmp_path / "peft" / "adapter.safetensors").exists()
    for layout in ("ours", "peft"):
        assert pm.read_spec(tmp_path / layout) == spec
        fresh = tiny_gpt2()
        pm.load_adapter(fresh, tmp_path / layout)
        assert (logits(fresh) - expected).abs().max().item() <= TOL


def test_frozen_head_is_still_written_and_read(tmp_path):
    """peft's SEQ_CLS loader wants the head, and a fresh head is random at each load."""
    spec = pm.AdapterSpec(rank=4, alpha=8, targets=["c_attn"], train_head=False)
    model = tiny_gpt2()
    pm.inject_adapters(model, spec)
    expected = logits(trained_look(model))
    pm.save_peft_adapter(model, spec, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] is None
    assert pm.read_peft_config(tmp_path) == spec
    theirs = PeftModel.from_pretrained(tiny_gpt2(), tmp_path).eval()
    fresh = tiny_gpt2()
    pm.load_peft_adapter(fresh, tmp_path)
    assert not fresh.score.weight.requires_grad
    for other in (theirs, fresh):
        assert (logits(other) - expected).abs().max().item() <= TOL


# ---- what peft-bench cannot represent is refused, naming the field ----------------------------

@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory):
    """A plain LoRA adapter saved by peft itself."""
    out = tmp_path_factory.mktemp("peft-lora")
    cfg = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["c_attn"])
    get_peft_model(tiny_gpt2(), cfg).save_pretrained(out)
    return out


def edited(peft_dir, tmp_path, **fields):
    shutil.copytree(peft_dir, tmp_path, dirs_exist_ok=True)
    path = tmp_path / "adapter_config.json"
    cfg = json.loads(path.read_text())
    path.write_text(json.dumps({**cfg, **fields}))
    return tmp_path


@pytest.mark.parametrize("fields,named", [
    ({"peft_type": "IA3"}, "peft_type"), ({"peft_type": "PREFIX_TUNING"}, "peft_type"),
    ({"task_type": "CAUSAL_LM"}, "task_type"),
    ({"bias": "all"}, "bias"), ({"bias": "lora_only"}, "bias"), ({"lora_bias": True}, "lora_bias"),
    ({"use_dora": True, "lora_bias": True}, "lora_bias"),
    ({"rank_pattern": {"c_attn": 8}}, "rank_pattern"),
    ({"alpha_pattern": {"c_attn": 32}}, "alpha_pattern"),
    ({"layers_to_transform": [0]}, "layers_to_transform"),
    ({"layers_pattern": "h"}, "layers_pattern"),
    ({"exclude_modules": ["c_proj"]}, "exclude_modules"),
    ({"modules_to_save": ["score", "lm_head"]}, "modules_to_save"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights"),
    ({"init_lora_weights": "olora"}, "init_lora_weights"),
    ({"init_lora_weights": "loftq"}, "init_lora_weights"),
    ({"init_lora_weights": "mica"}, "init_lora_weights"),
    ({"layer_replication": [[0, 1]]}, "layer_replication"),
    ({"use_qalora": True}, "use_qalora"),
    ({"trainable_token_indices": [1, 2]}, "trainable_token_indices"),
    ({"target_parameters": ["mlp.weight"]}, "target_parameters"),
    ({"alora_invocation_tokens": [1, 2]}, "alora_invocation_tokens"),
    ({"arrow_config": {"top_k": 2}}, "arrow_config"),
    ({"a_future_peft_option": True}, "a_future_peft_option"),
    ({"r": 0}, "r"), ({"lora_alpha": -1}, "lora_alpha"), ({"lora_dropout": 1.5}, "lora_dropout"),
])
def test_unrepresentable_peft_options_are_refused(peft_dir, tmp_path, fields, named):
    adapter = edited(peft_dir, tmp_path, **fields)
    with pytest.raises(ValueError, match=rf"adapter_config.json: {named}="):
        pm.read_peft_config(adapter)
    model = tiny_gpt2()
    with pytest.raises(ValueError, match=rf"{named}="):
        pm.load_peft_adapter(model, adapter)
    assert not pm.adapter_layers(model)  # refused before touching the model


@pytest.mark.parametrize("fields,expected", [
    ({"init_lora_weights": False}, {}), ({"init_lora_weights": "gaussian"}, {}),
    ({"init_lora_weights": "eva"}, {}), ({"init_lora_weights": "orthogonal"}, {}),
    ({"fan_in_fan_out": False}, {}),  # peft sets it from the layer type on load
    ({"task_type": None}, {}),
    ({"target_modules": None}, {"targets": None}),
    ({"target_modules": r".*\.c_attn"}, {"targets": r".*\.c_attn"}),
    ({"modules_to_save": None}, {"train_head": False}),
])
def test_representable_peft_options_are_read(peft_dir, tmp_path, fields, expected):
    spec = pm.read_peft_config(edited(peft_dir, tmp_path, **fields))
    plain = dict(method="lora", rank=4, alpha=8, targets=["c_attn"], train_head=True)
    assert spec == pm.AdapterSpec(**{**plain, **expected})


def test_adapter_for_another_model_is_refused(peft_dir):
    with pytest.raises(ValueError, match="matched no module"):
        pm.load_peft_adapter(tiny_llama(), peft_dir)


def test_pickled_peft_adapter_is_not_read(peft_dir, tmp_path):
    shutil.copy(peft_dir / "adapter_config.json", tmp_path)
    (tmp_path / "adapter_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(FileNotFoundError, match="only safetensors"):
        pm.load_peft_adapter(tiny_gpt2(), tmp_path)


def test_full_fine_tuning_has_no_peft_adapter(tmp_path):
    model = tiny_gpt2()
    spec = pm.AdapterSpec(method="full")
    pm.inject_adapters(model, spec)
    with pytest.raises(ValueError, match="method: 'full'"):
        pm.save_peft_adapter(model, spec, tmp_path)
