"""Tiny transformers models for the adapter tests: built locally, no hub."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BitsAndBytesConfig,
    DebertaV2Config,
    DistilBertConfig,
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    MistralConfig,
    OPTConfig,
    Qwen2Config,
    RobertaConfig,
)
from transformers.pytorch_utils import Conv1D

import peft_modules as pm
from peft_modules.layers import LoRALinear, base_weight
from peft_modules.quant import keep_layout

VOCAB = 100


def randomise_biases(model: nn.Module, seed: int = 5) -> nn.Module:
    """Every Linear/Conv1D bias to randn. transformers initialises them to zero, and a zero bias
    hides an adapter that drops, scales or rescales it (DoRA must leave b alone)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, Conv1D)) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return model


def trained_look(model: nn.Module, seed: int = 7) -> nn.Module:
    """Our adapters as training leaves them: B = randn·0.1 (not 0), DoRA's m = ‖W0‖·(1 + 0.3·randn)
    (not ‖W0‖, where the DoRA scale is exactly 1), and the head moved, so that a wrong scale,
    transposition, bias or head cannot pass a comparison."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.modules():
            if not isinstance(layer, LoRALinear):
                continue
            layer.lora_b.weight.copy_(torch.randn(layer.lora_b.weight.shape, generator=g) * 0.1)
            if hasattr(layer, "magnitude"):
                norm = base_weight(layer.base_layer).float().norm(dim=1)
                noise = 1 + 0.3 * torch.randn(norm.shape, generator=g)
                layer.magnitude.copy_(norm * noise)
        heads = pm.head_names(model)
        for name, p in model.named_parameters():
            if any(name.startswith(h + ".") for h in heads):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def tiny_gpt2(seed: int = 0, random_bias: bool = True) -> GPT2ForSequenceClassification:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64,
                     num_labels=2, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    model = GPT2ForSequenceClassification(cfg).eval()
    return randomise_biases(model, seed + 5) if random_bias else model


def tiny_llama(seed: int = 0, random_bias: bool = True) -> LlamaForSequenceClassification:
    """With biases in attention and MLP (Llama has none by default, Qwen2 has q/k/v biases), so
    that the adapted nn.Linear layers carry a bias to get wrong."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=2,
                      pad_token_id=0, bos_token_id=0, eos_token_id=0,
                      attention_bias=random_bias, mlp_bias=random_bias)
    model = LlamaForSequenceClassification(cfg).eval()
    return randomise_biases(model, seed + 5) if random_bias else model


def load_4bit(model_dir, quant_type: str = "nf4"):
    """The real QLoRA path: from_pretrained with a BitsAndBytesConfig (CPU NF4 here)."""
    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, quantization_config=qc, dtype=torch.float32).eval()
    return keep_layout(model)


def batch(seed: int = 1, n: int = 4, length: int = 12):
    """Token ids with right padding (pad = 0) and labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, length), generator=g)
    mask = torch.ones_like(ids)
    for i in range(n):
        cut = length - 3 * (i % 3)
        ids[i, cut:], mask[i, cut:] = 0, 0
    return {"input_ids": ids, "attention_mask": mask,
            "labels": torch.randint(0, 2, (n,), generator=g)}


def tiny_bert(seed: int = 0, random_bias: bool = True) -> BertForSequenceClassification:
    """An encoder: nn.Linear query/key/value, a pretrained-style pooler, a `classifier` head."""
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=2,
                     pad_token_id=0)
    model = BertForSequenceClassification(cfg).eval()
    return randomise_biases(model, seed + 5) if random_bias else model


def _family_configs(vocab: int, pad: int) -> dict:
    small = dict(vocab_size=vocab, pad_token_id=pad)
    decoder = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, bos_token_id=pad,
                   eos_token_id=pad, max_position_embeddings=128, **small)
    encoder = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=2, max_position_embeddings=130, **small)
    return {
        "gpt2": GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=128, bos_token_id=pad,
                           eos_token_id=pad, **small),
        "llama": LlamaConfig(attention_bias=True, mlp_bias=True, **decoder),
        "qwen2": Qwen2Config(**decoder),  # q/k/v biases by default
        "mistral": MistralConfig(**decoder),
        "opt": OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2,
                         word_embed_proj_dim=32, max_position_embeddings=128, bos_token_id=pad,
                         eos_token_id=pad, **small),
        "bert": BertConfig(**encoder),
        "roberta": RobertaConfig(**encoder),
        "distilbert": DistilBertConfig(dim=32, hidden_dim=64, n_layers=2, n_heads=2,
                                       max_position_embeddings=128, **small),
        "deberta-v2": DebertaV2Config(**encoder),
    }


FAMILIES = ("gpt2", "llama", "qwen2", "mistral", "opt", "bert", "roberta", "distilbert",
            "deberta-v2")


def family_model_dir(family: str, out: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A tiny random base model of `family` (random non-zero biases) saved with the tiny
    GPT-2's tokenizer: a folder the pipeline loads like any pretrained one, adding the
    family's own fresh classification head."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = _family_configs(len(tok), tok.pad_token_id)[family]
    torch.manual_seed(seed)
    model = randomise_biases(AutoModel.from_config(cfg), seed + 5)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
