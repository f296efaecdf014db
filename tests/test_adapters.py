"""Round trips (fresh, merge, unmerge, save/load) and the errors a bad spec must raise."""
from __future__ import annotations

import json

import pytest
import torch
from _models import batch, load_4bit, tiny_gpt2, tiny_llama, trained_look
from transformers import AutoModelForSequenceClassification

import peft_modules as pm

BUILDERS = {"gpt2": (tiny_gpt2, ["c_attn"]), "llama": (tiny_llama, ["q_proj", "v_proj"])}


def logits(model, b=None):
    b = b or batch()
    with torch.no_grad():
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits


def randomise(model, seed=3):
    """Give the adapters non-trivial values, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("arch", BUILDERS)
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_fresh_adapter_is_identity_and_merge_roundtrip(arch, method):
    build, targets = BUILDERS[arch]
    model = build()
    base_logits = logits(model)
    pm.inject_adapters(model, pm.AdapterSpec(method=method, rank=4, alpha=8, targets=targets))
    assert torch.equal(logits(model), base_logits)  # B = 0 and m = ‖W0‖: exactly the base
    randomise(model)
    layers = pm.adapter_layers(model)
    w0 = {n: layer.base_layer.weight.detach().clone() for n, layer in layers.items()}
    unmerged = logits(model)
    assert (unmerged - base_logits).abs().max() > 1e-3
    pm.merge_adapters(model)
    assert (logits(model) - unmerged).abs().max().item() <= 1e-5
    pm.unmerge_adapters(model)
    for n, layer in layers.items():
        assert (layer.base_layer.weight - w0[n]).abs().max().item() <= 1e-6
    assert (logits(model) - unmerged).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch", BUILDERS)
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_layer_bias_is_kept(arch, method):
    """h = m·(W0 + sBA)x/‖W0 + sBA‖_c + b (Liu et al. eq. 5): b is added, never rescaled. The
    bias is randn and B, m trained-looking (DoRA scale ≠ 1), so a rescaled or dropped bias shows."""
    build, targets = BUILDERS[arch]
    model = build()
    pm.inject_adapters(model, pm.AdapterSpec(method=method, rank=2, alpha=4, targets=targets))
    trained_look(model)
    layer = next(iter(pm.adapter_layers(model).values()))
    bias = layer.base_layer.bias.detach()
    assert bias.abs().min() > 0
    with torch.no_grad():
        assert torch.equal(layer(torch.zeros(1, 3, layer.in_features))[0, 0], bias)
        x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(0))
        v = layer.base_layer.weight.detach()  # W0 + sBA as (out, in), built explicitly here
        v = (v.t() if layer.kind == "conv1d" else v) + layer.scaling * (
            layer.lora_b.weight @ layer.lora_a.weight)
        if method == "dora":
            v = (layer.magnitude / v.norm(dim=1)).unsqueeze(1) * v
        assert (layer(x) - (x @ v.t() + bias)).abs().max().item() <= 1e-5


def test_scaling_is_alpha_over_r():
    model = tiny_gpt2()
    pm.inject_adapters(model, pm.AdapterSpec(rank=4, alpha=16, targets=["c_attn"]))
    assert model.transformer.h[0].attn.c_attn.scaling == 4.0
    model = tiny_gpt2()
    pm.inject_adapters(model, pm.AdapterSpec(rank=4, alpha=16, targets=["c_attn"], rslora=True))
    assert model.transformer.h[0].attn.c_attn.scaling == 8.0


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merge_and_unload_save_pretrained(tmp_path, method):
    model = tiny_gpt2()
    pm.inject_adapters(model, pm.AdapterSpec(method=method, rank=4, alpha=8, targets=["c_attn"]))
    randomise(model)
    expected = logits(model)
    plain = pm.merge_and_unload(model)
    assert not pm.adapter_layers(plain)
    plain.save_pretrained(tmp_path)
    back = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert (logits(back) - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("method", ["lora", "dora", "full"])
def test_adapter_save_load_exact(tmp_path, method):
    spec = pm.AdapterSpec(method=method, rank=4, alpha=8, targets=["c_attn"])
    model = tiny_gpt2(seed=0)
    pm.inject_adapters(model, spec)
    randomise(model)
    expected = logits(model)
    pm.save_adapter(model, spec, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["spec"]["rank"] == 4
    fresh = tiny_gpt2(seed=0)  # the same base, freshly loaded
    pm.load_adapter(fresh, tmp_path)
    assert torch.equal(logits(fresh), expected)


def test_4bit_merge_gives_float_layer_and_unmerge_restores(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path)
    model = load_4bit(tmp_path)
    pm.inject_adapters(model, pm.AdapterSpec(method="qlora", rank=4, alpha=8, targets=["c_attn"]))
    randomise(model)
    expected = logits(model)
    layer = model.transformer.h[0].attn.c_attn
    pm.merge_adapters(model)
    assert type(layer.base_layer) is torch.nn.Linear
    assert (logits(model) - expected).abs().max().item() <= 1e-4
    pm.unmerge_adapters(model)
    assert layer.kind == "4bit" and "Linear4bit" in type(layer.base_layer).__name__
    assert torch.equal(logits(model), expected)


def test_adapter_that_does_not_fit_is_refused(tmp_path):
    spec = pm.AdapterSpec(method="lora", rank=4, alpha=8, targets=["c_attn"])
    model = tiny_gpt2()
    pm.inject_adapters(model, spec)
    pm.save_adapter(model, spec, tmp_path)
    with pytest.raises(ValueError, match="matched no module; candidate layers"):
        pm.load_adapter(tiny_llama(), tmp_path)
    wide = tiny_gpt2()
    wide.score = torch.nn.Linear(32, 3, bias=False)  # a 3-label head: shapes differ
    with pytest.raises(ValueError, match=r"score.weight: saved \(2, 32\) vs model \(3, 32\)"):
        pm.load_adapter(wide, tmp_path)


def test_head_trainable_by_default_and_switchable():
    model = tiny_gpt2()
    s = pm.inject_adapters(model, pm.AdapterSpec(rank=2, alpha=2, targets=["c_attn"]))
    assert model.score.weight.requires_grad
    assert s.trainable_params == 2 * (32 * 2 + 2 * 96) + 2 * 32
    model = tiny_gpt2()
    s = pm.inject_adapters(model, pm.AdapterSpec(rank=2, alpha=2, targets=["c_attn"],
                                                 train_head=False))
    assert not model.score.weight.requires_grad and s.trainable_params == 2 * (32 * 2 + 2 * 96)
    assert s.adapted_layers == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]


def test_full_trains_everything():
    model = tiny_gpt2()
    s = pm.inject_adapters(model, pm.AdapterSpec(method="full"))
    assert s.trainable_params == s.total_params == sum(p.numel() for p in model.parameters())
    assert s.trainable_pct == 100.0 and not pm.adapter_layers(model)


def test_default_targets_by_model_type():
    s = pm.inject_adapters(tiny_gpt2(), pm.AdapterSpec(rank=2, alpha=2))
    assert [n.split(".")[-1] for n in s.adapted_layers] == ["c_attn", "c_attn"]


def test_regex_targets():
    s = pm.inject_adapters(tiny_llama(), pm.AdapterSpec(rank=2, alpha=2, targets=r".*\.[qk]_proj"))
    assert sorted({n.split(".")[-1] for n in s.adapted_layers}) == ["k_proj", "q_proj"]


@pytest.mark.parametrize("field,value,message", [
    ("rank", 0, "rank"), ("rank", -2, "rank"), ("alpha", 0, "alpha"),
    ("dropout", 1.0, "dropout"), ("dropout", -0.1, "dropout"), ("method", "ia3", "method"),
])
def test_bad_spec_values(field, value, message):
    with pytest.raises(ValueError, match=message) as e:
        pm.AdapterSpec(**{field: value})
    assert "Input should be" in str(e.value)


def test_targets_matching_nothing_lists_candidates():
    with pytest.raises(ValueError, match=r"matched no module; candidate layers: "
                                         r"\['c_attn', 'c_fc', 'c_proj'\]"):
        pm.inject_adapters(tiny_gpt2(), pm.AdapterSpec(targets=["q_proj"]))


def test_unsupported_layer_type():
    with pytest.raises(ValueError, match=r"unsupported layer type for \['transformer.wte "
                                         r"\(Embedding\)'\]"):
        pm.inject_adapters(tiny_gpt2(), pm.AdapterSpec(targets=["wte"]))
    with pytest.raises(ValueError, match="unsupported layer type LayerNorm"):
        pm.LoRALinear(torch.nn.LayerNorm(4), rank=2, alpha=2)


def test_double_injection_refused():
    model = tiny_gpt2()
    pm.inject_adapters(model, pm.AdapterSpec(targets=["c_attn"]))
    with pytest.raises(ValueError, match="already has adapters"):
        pm.inject_adapters(model, pm.AdapterSpec(targets=["c_attn"]))
