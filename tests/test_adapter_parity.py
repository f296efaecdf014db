"""Our LoRA/DoRA against Hugging Face peft, the oracle: same base, same adapter weights, so the
logits and every trainable tensor's gradient must agree, at init and after AdamW steps. The base
layers carry random non-zero biases (see _models.randomise_biases)."""
from __future__ import annotations

import copy

import pytest
import torch
from _models import batch, load_4bit, tiny_bert, tiny_gpt2, tiny_llama
from peft import LoraConfig, get_peft_model

import peft_modules as pm
from peft_modules.inject import HEAD_NAMES

TOL = 1e-5


def peft_name(ours: str) -> str:
    """Our parameter name -> the name of the same tensor inside a peft model."""
    parts = ours.split(".")
    for i, part in enumerate(parts[:-1]):  # a head module (BERT's pooler sits inside `bert.`)
        if part in HEAD_NAMES:
            head, leaf = ".".join(parts[:i + 1]), ".".join(parts[i + 1:])
            return f"base_model.model.{head}.modules_to_save.default.{leaf}"
    if ".lora_" in ours:
        layer, _, leaf = ours.rpartition(".lora_")
        return f"base_model.model.{layer}.lora_{leaf[0].upper()}.default.weight"
    assert ours.endswith(".magnitude"), ours
    return f"base_model.model.{ours[:-len('.magnitude')]}.lora_magnitude_vector.default.weight"


def make_pair(base, spec: pm.AdapterSpec, targets, base2=None):
    """(ours, peft's) on copies of one base, with peft given our (randomised) adapter weights."""
    ours, theirs = base, base2 if base2 is not None else copy.deepcopy(base)
    heads = [h.split(".")[-1] for h in pm.head_names(ours)]  # BERT: pooler and classifier
    pm.inject_adapters(ours, spec)
    # The builders randomise biases: a zero bias would hide an adapter that rescales or drops it.
    assert all(layer.bias is not None and layer.bias.abs().min() > 0
               for layer in pm.adapter_layers(ours).values())
    cfg = LoraConfig(task_type="SEQ_CLS", r=spec.rank, lora_alpha=spec.alpha, lora_dropout=0.0,
                     target_modules=targets, use_dora=spec.use_dora, use_rslora=spec.rslora,
                     modules_to_save=heads)
    theirs = get_peft_model(theirs, cfg)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad and ".lora_" in name:  # B = 0 at init would hide bugs in B's path
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            if name.endswith(".magnitude"):
                p.mul_(1 + 0.1 * torch.rand(p.shape, generator=g))
        theirs_params = dict(theirs.named_parameters())
        for name, p in ours.named_parameters():
            if p.requires_grad:
                theirs_params[peft_name(name)].copy_(p)
    return ours, theirs


def forward_backward(model, b):
    model.zero_grad(set_to_none=True)
    out = model(**b)
    out.loss.backward()
    return out.logits.detach()


def assert_same(ours, theirs, b):
    lo, lt = forward_backward(ours, b), forward_backward(theirs, b)
    assert (lo - lt).abs().max().item() <= TOL
    tp = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        if p.requires_grad:
            q = tp[peft_name(name)]
            assert q.requires_grad, name
            err = (p.grad - q.grad).abs().max().item()
            assert err <= TOL, f"{name}: grad differs by {err:.2e}"


def check_parity(ours, theirs, steps: int = 3):
    b = batch()
    ours_tr, theirs_tr = pm.count_params(ours)[0], theirs.get_nb_trainable_parameters()[0]
    assert ours_tr == theirs_tr
    assert_same(ours, theirs, b)
    named = [(n, p) for n, p in ours.named_parameters() if p.requires_grad]
    tp = dict(theirs.named_parameters())
    opt_o = torch.optim.AdamW([p for _, p in named], lr=1e-2)
    opt_t = torch.optim.AdamW([tp[peft_name(n)] for n, _ in named], lr=1e-2)
    for step in range(steps):
        for model, opt in ((ours, opt_o), (theirs, opt_t)):
            forward_backward(model, batch(seed=10 + step))
            opt.step()
    assert_same(ours, theirs, b)


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("rslora", [False, True])
def test_gpt2_conv1d_parity(method, rslora):
    spec = pm.AdapterSpec(method=method, rank=4, alpha=8, targets=["c_attn"], rslora=rslora)
    check_parity(*make_pair(tiny_gpt2(), spec, ["c_attn"]))


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_llama_linear_parity(method):
    spec = pm.AdapterSpec(method=method, rank=4, alpha=16, targets=["q_proj", "v_proj"])
    check_parity(*make_pair(tiny_llama(), spec, ["q_proj", "v_proj"]))


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_bert_encoder_linear_parity(method):
    """BERT's nn.Linear query/value, its pooler trained with the classifier (peft:
    modules_to_save), random biases everywhere."""
    spec = pm.AdapterSpec(method=method, rank=4, alpha=8, targets=["query", "value"])
    ours, theirs = make_pair(tiny_bert(), spec, ["query", "value"])
    assert pm.head_names(ours) == ["bert.pooler", "classifier"]
    check_parity(ours, theirs)


def test_gpt2_all_linear_parity():
    spec = pm.AdapterSpec(method="dora", rank=2, alpha=4, targets="all-linear")
    ours, theirs = make_pair(tiny_gpt2(), spec, "all-linear")
    assert len(pm.adapter_layers(ours)) == 8  # c_attn, c_proj, c_fc, mlp.c_proj × 2 layers
    check_parity(ours, theirs, steps=1)


@pytest.mark.parametrize("method", ["qlora", "qdora"])
def test_4bit_parity(tmp_path, method):
    tiny_gpt2().save_pretrained(tmp_path)
    ours, theirs = load_4bit(tmp_path), load_4bit(tmp_path)
    spec = pm.AdapterSpec(method=method, rank=4, alpha=8, targets=["c_attn"])
    ours, theirs = make_pair(ours, spec, ["c_attn"], base2=theirs)
    layer = ours.transformer.h[0].attn.c_attn
    assert layer.kind == "4bit" and layer.lora_a.weight.dtype == torch.float32
    check_parity(ours, theirs)
