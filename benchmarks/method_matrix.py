"""The capability matrix (issue #18 item 2): every Hugging Face peft method on tiny random models
of each family the pipeline supports, in float and 4-bit, tried rather than typed.

    scripts/method_matrix                          # every cell -> docs/methods.json, docs/methods.md
    scripts/method_matrix --cells LORA/gpt2/float,VERA/bert/4bit   # a few cells, JSON on stdout

A cell is one peft type (its config class at peft's defaults, SEQ_CLS, the classification head
in modules_to_save) on one family (GPT-2's Conv1D, a Llama-style decoder, BERT), float or 4-bit
(bitsandbytes NF4 via from_pretrained, the head kept in float). It is injected through
peft's get_peft_model as `method: peft` is, then trained one AdamW step on random tokens:
- "trains": the loss is finite and some adapter weight (not the head) changed;
- "refused: <reason>": peft declined the config or the model before training (its message);
- "fails: <error>": peft accepted it, and the forward, backward or step broke (first line).
A float cell that trains then tries `merge_and_unload`: "merges" when the merged model's logits
equal the adapted one's (|diff| <= 1e-4 + 1e-4 |logit|). Trainable parameters are counted at the
defaults, on these tiny models (hidden size 256), so they compare methods, not real models.

The tiny models are 256 wide so that peft's defaults fit them (VB-LoRA's vector_length 256,
C3A's block_size 256, MiSS's r 64 must divide or fit the layer sizes); narrower, half the
methods would fail on a size check that says nothing about the method.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import _matrix_doc  # noqa: E402

FAMILIES = ("gpt2", "llama", "bert")
QUANTS = ("float", "4bit")
VOCAB, HIDDEN, SEQ = 100, 256, 12
JSON_OUT, MD_OUT = ROOT / "docs" / "methods.json", ROOT / "docs" / "methods.md"
COMMAND = "scripts/method_matrix"

# What a config needs beyond peft's defaults to be built at all, and why. Nothing else is set:
# the targets are peft's per-model defaults (peft.utils.constants TRANSFORMERS_MODELS_TO_*).
PROMPT = {"num_virtual_tokens": 20}  # peft's prompt-learning guides use 20 virtual tokens
EXTRA: dict[str, dict] = {
    "PROMPT_TUNING": PROMPT, "P_TUNING": PROMPT, "PREFIX_TUNING": PROMPT,
    "MULTITASK_PROMPT_TUNING": PROMPT, "CARTRIDGE": PROMPT,
    "ADALORA": {"total_step": 1},  # AdaLoRA's budget schedule needs the run's step count
    "TRAINABLE_TOKENS": {"token_indices": [1, 2, 3]},  # which token rows to train: no default
}
# peft has no LN-tuning default for BERT; the method (Zhao et al. 2023) tunes every LayerNorm.
FAMILY_EXTRA: dict[tuple[str, str], dict] = {("LN_TUNING", "bert"): {"target_modules": ["LayerNorm"]}}


def family_config(family: str):
    from transformers import BertConfig, GPT2Config, LlamaConfig

    common = dict(vocab_size=VOCAB, num_labels=2, pad_token_id=0)
    if family == "gpt2":
        return GPT2Config(n_layer=2, n_embd=HIDDEN, n_head=4, n_positions=64, bos_token_id=0,
                          eos_token_id=0, **common)
    if family == "llama":  # full multi-head attention: v_proj as wide as the model
        return LlamaConfig(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4, bos_token_id=0,
                           eos_token_id=0, max_position_embeddings=64, **common)
    if family == "bert":
        return BertConfig(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=2 * HIDDEN, max_position_embeddings=64, **common)
    raise ValueError(f"unknown family {family!r}; one of {', '.join(FAMILIES)}")


def save_family(family: str, folder: Path) -> Path:
    """The family's tiny random model, saved (4-bit loads it back through from_pretrained)."""
    from transformers import AutoModelForSequenceClassification

    out = folder / family
    if not (out / "config.json").is_file():
        torch.manual_seed(0)
        AutoModelForSequenceClassification.from_config(family_config(family)).save_pretrained(out)
    return out


def load(family: str, model_dir: Path, quant: str):
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    from peft_modules import head_names

    kwargs = {}
    if quant == "4bit":  # QLoRA's layout: the trained head stays in float
        with torch.device("meta"):
            heads = head_names(AutoModelForSequenceClassification.from_config(
                family_config(family)))
        kwargs = dict(device_map={"": "cpu"}, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
            llm_int8_skip_modules=heads))
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32,
                                                               **kwargs)
    return model, head_names(model)


def peft_types() -> list[str]:
    from peft import PeftType

    return [t.value for t in PeftType]


def block_for(peft_type: str, family: str) -> dict:
    """The `peft:` block of a cell: the type, and only what EXTRA says it needs."""
    return {"peft_type": peft_type, **EXTRA.get(peft_type, {}),
            **FAMILY_EXTRA.get((peft_type, family), {})}


def inject(model, block: dict, heads: list[str]):
    """As `method: peft` injects (tasks.methods.hf_peft.inject_peft): the peft config built from the
    block, SEQ_CLS, the head in modules_to_save, get_peft_model. Returns the PeftModel."""
    from tasks.methods.hf_peft import inject_peft

    return inject_peft(model, block, heads).model


def refused_before(family: str, block: dict, heads: list[str]):
    """The pipeline's own check before weights load (tasks.methods.hf_peft.refusal_on, on a meta-device
    copy of the model), or None."""
    from transformers import AutoModelForSequenceClassification

    from tasks.methods.hf_peft import refusal_on

    with torch.device("meta"):
        meta = AutoModelForSequenceClassification.from_config(family_config(family))
    return refusal_on(meta, block, heads)


def declined(exc: BaseException) -> bool:
    """peft saying no (a config or layer check) rather than breaking: its ValueErrors and
    NotImplementedErrors, and the TypeErrors its layer checks raise ("... is not supported")."""
    if isinstance(exc, (ValueError, NotImplementedError)):
        return True
    return isinstance(exc, TypeError) and ("not supported" in str(exc) or "requires" in str(exc))


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}".rstrip(": ")


def inputs() -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (4, SEQ), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = mask[3, -5:] = 0  # right padding, as the pipeline's batches have
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": torch.tensor([0, 1, 0, 1])}


def adapter_params(model) -> dict[str, torch.Tensor]:
    """The trainable tensors that are the method's own (the head's copy is not)."""
    return {n: p for n, p in model.named_parameters()
            if p.requires_grad and "modules_to_save" not in n}


def train_step(model, lr: float = 1e-3) -> tuple[Optional[str], float]:
    """One AdamW step. Returns (why it failed or None, the loss)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    own = adapter_params(model)
    before = {n: p.detach().clone() for n, p in own.items()}
    opt = torch.optim.AdamW(trainable, lr=lr)
    model.train()
    loss = model(**inputs()).loss
    if not math.isfinite(loss.item()):
        return f"the loss is {loss.item()}", loss.item()
    loss.backward()
    opt.step()
    if not own:
        return "no trainable adapter weight (only the head trains)", loss.item()
    if not any(not torch.equal(before[n], p.detach()) for n, p in own.items()):
        return "no adapter weight changed after one step", loss.item()
    return None, loss.item()


def merges(model) -> tuple[Optional[bool], str]:
    """merge_and_unload, then the same logits (the step above moved the adapter off identity).
    None for prompt learning: virtual tokens are inputs, there is no weight to merge them into."""
    if model.active_peft_config.is_prompt_learning:
        return None, "prompt learning: no weight to merge into"
    batch = {k: v for k, v in inputs().items() if k != "labels"}
    model.eval()
    with torch.no_grad():
        before = model(**batch).logits
        try:
            merged = model.merge_and_unload()
        except Exception as exc:  # noqa: BLE001 - the method's own refusal is the answer
            return False, first_line(exc)
        after = merged(**batch).logits
    diff = float((after - before).abs().max())
    ok = bool(torch.allclose(after, before, atol=1e-4, rtol=1e-4))
    return ok, f"max |logit diff| {diff:.1e}"


def run_cell(peft_type: str, family: str, quant: str, folder: Path) -> dict:
    cell = {"method": peft_type, "family": family, "quant": quant, "status": None,
            "reason": None, "merges": None, "merge_note": None, "trainable_params": None}
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model, heads = load(family, save_family(family, folder), quant)
    block = block_for(peft_type, family)
    try:  # what peft-bench run's pre-check says before any weight loads (not the verdict)
        cell["precheck"] = refused_before(family, block, heads)
    except Exception:  # noqa: BLE001 - the pre-check leaves these to the run
        cell["precheck"] = None
    try:
        model = inject(model, block, heads)
    except Exception as exc:  # noqa: BLE001 - peft declining the config or the model, or broken
        return {**cell, "status": "refused" if declined(exc) else "fails", "reason": first_line(exc),
                "seconds": round(time.perf_counter() - t0, 2)}
    cell["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    try:
        why, loss = train_step(model)
    except Exception as exc:  # noqa: BLE001 - accepted, then broke
        why, loss = first_line(exc), float("nan")
    cell.update(status="fails" if why else "trains", reason=why,
                loss=round(loss, 4) if math.isfinite(loss) else None)
    if not why and quant == "float":
        cell["merges"], cell["merge_note"] = merges(model)
    cell["seconds"] = round(time.perf_counter() - t0, 2)
    return cell


@contextlib.contextmanager
def quiet():
    """Our one line per cell, not other libraries' warnings and progress bars."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("peft").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def parse_cells(text: str) -> list[tuple[str, str, str]]:
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        parts = item.split("/")
        if len(parts) != 3 or parts[1] not in FAMILIES or parts[2] not in QUANTS:
            raise SystemExit(f"--cells: {item!r} is not METHOD/FAMILY/QUANT with FAMILY in "
                             f"{FAMILIES} and QUANT in {QUANTS}")
        out.append((parts[0].upper(), parts[1], parts[2]))
    return out


def run_cells(cells: list[tuple[str, str, str]], say=print) -> list[dict]:
    known = set(peft_types())
    bad = [c[0] for c in cells if c[0] not in known]
    if bad:
        raise SystemExit(f"unknown peft type(s): {', '.join(bad)}")
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (t, fam, q) in enumerate(cells, 1):
            with quiet():
                cell = run_cell(t, fam, q, Path(tmp))
            out.append(cell)
            say(f"[{i}/{len(cells)}] {t}/{fam}/{q}: {cell['status']}"
                f"{' (' + cell['reason'] + ')' if cell['reason'] else ''} {cell['seconds']:.1f} s")
    return out


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", help="METHOD/FAMILY/QUANT,... : only these, as JSON on stdout")
    ap.add_argument("--methods", help="comma-separated peft types (default: all)")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    if args.cells:
        cells = run_cells(parse_cells(args.cells), say=lambda s: print(s, file=sys.stderr))
        print(json.dumps(cells, indent=1))
        return 0
    types = args.methods.upper().split(",") if args.methods else peft_types()
    t0 = time.perf_counter()
    cells = run_cells([(t, f, q) for t in types for f in FAMILIES for q in QUANTS])
    import peft
    import transformers

    doc = {"command": COMMAND, "peft": peft.__version__, "transformers": transformers.__version__,
           "torch": torch.__version__, "seconds": round(time.perf_counter() - t0, 1),
           "hidden_size": HIDDEN, "extra": EXTRA,
           "family_extra": {f"{t}/{f}": v for (t, f), v in FAMILY_EXTRA.items()}, "cells": cells}
    JSON_OUT.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    _matrix_doc.write(MD_OUT, doc)
    print(f"wrote {JSON_OUT.relative_to(ROOT)} and {MD_OUT.relative_to(ROOT)} "
          f"({len(cells)} cells, {doc['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
