"""Tiny transformers models for the adapter tests: built locally, no hub."""
from __future__ import annotations

import torch
from peft_modules.quant import keep_layout
from transformers import (AutoModelForSequenceClassification, BitsAndBytesConfig, GPT2Config,
                          GPT2ForSequenceClassification, LlamaConfig,
                          LlamaForSequenceClassification)

VOCAB = 100


def tiny_gpt2(seed: int = 0) -> GPT2ForSequenceClassification:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64,
                     num_labels=2, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    return GPT2ForSequenceClassification(cfg).eval()


def tiny_llama(seed: int = 0) -> LlamaForSequenceClassification:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=2,
                      pad_token_id=0, bos_token_id=0, eos_token_id=0)
    return LlamaForSequenceClassification(cfg).eval()


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
