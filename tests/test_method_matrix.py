"""The capability matrix cannot go stale silently: a few cells regenerated here must equal the
committed docs/methods.json, the page must be the one rendered from it, and every peft type the
installed peft has must be in it. Trainable counts of two cells are checked by hand."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import _matrix_doc, method_matrix  # noqa: E402

# A trained, merged cell; one where merging fails (the BERT pooler in modules_to_save); a
# refusal on GPT-2's Conv1D; a 4-bit cell; a prompt method that fails in the forward; one whose
# only trainable weights are the head's.
CELLS = [("LORA", "gpt2", "float"), ("VERA", "bert", "float"), ("BOFT", "gpt2", "float"),
         ("LORA", "llama", "4bit"), ("PREFIX_TUNING", "bert", "float"), ("OSF", "gpt2", "float")]
KEYS = ("status", "reason", "merges", "trainable_params")


@pytest.fixture(scope="module")
def committed() -> dict:
    return json.loads((ROOT / "docs" / "methods.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def regenerated() -> dict:
    cells = method_matrix.run_cells(CELLS, say=lambda s: None)
    return {(c["method"], c["family"], c["quant"]): c for c in cells}


def test_regenerated_cells_equal_the_committed_matrix(committed, regenerated):
    by = {(c["method"], c["family"], c["quant"]): c for c in committed["cells"]}
    for key in CELLS:
        assert {k: regenerated[key][k] for k in KEYS} == {k: by[key][k] for k in KEYS}, key


def test_cells_by_hand(regenerated):
    """LoRA r=8 on GPT-2's c_attn (256 -> 768), 2 layers: 8 * (256 + 768) * 2 = 16,384, and the
    score head 256 * 2 = 512 (no bias). VeRA r=256 on BERT's query and value (256 -> 256), 2
    layers: lambda_d (256) + lambda_b (256) per layer = 2,048; the classifier 256 * 2 + 2 and
    the pooler 256 * 256 + 256 trained as modules_to_save: 2,048 + 514 + 65,792."""
    lora, vera = regenerated[CELLS[0]], regenerated[CELLS[1]]
    assert lora["status"] == "trains" and lora["merges"] is True
    assert lora["trainable_params"] == 16_384 + 512
    assert vera["status"] == "trains" and vera["trainable_params"] == 2_048 + 514 + 65_792
    boft = regenerated[CELLS[2]]
    assert boft["status"] == "refused" and "Conv1D" in boft["reason"]
    assert regenerated[CELLS[3]]["status"] == "trains"


def test_every_installed_peft_type_is_in_the_matrix(committed):
    import peft

    assert committed["peft"] == peft.__version__, "peft changed: rerun scripts/method_matrix"
    have = {(c["method"], c["family"], c["quant"]) for c in committed["cells"]}
    want = {(t, f, q) for t in method_matrix.peft_types() for f in method_matrix.FAMILIES
            for q in method_matrix.QUANTS}
    assert want - have == set()


def test_the_page_is_rendered_from_the_json(committed, tmp_path):
    out = tmp_path / "methods.md"
    _matrix_doc.write(out, committed)
    assert out.read_text(encoding="utf-8") == (ROOT / "docs" / "methods.md").read_text(
        encoding="utf-8"), "docs/methods.md is stale: rerun scripts/method_matrix"


def test_the_checks_see_what_they_claim(tmp_path):
    """The step check sees an adapter that did not move (lr 0); the merge check sees a merge
    that changes the logits: LoRA merged into 4-bit weights is requantised, which is lossy."""
    with method_matrix.quiet():
        model, heads = method_matrix.load("llama", method_matrix.save_family("llama", tmp_path),
                                          "float")
        model = method_matrix.inject(model, method_matrix.block_for("LORA", "llama"), heads)
        why, _ = method_matrix.train_step(model, lr=0.0)
        assert why == "no adapter weight changed after one step"
        model, heads = method_matrix.load("llama", tmp_path / "llama", "4bit")
        model = method_matrix.inject(model, method_matrix.block_for("LORA", "llama"), heads)
        assert method_matrix.train_step(model)[0] is None
        ok, note = method_matrix.merges(model)
    assert ok is False and note.startswith("max |logit diff|"), note
