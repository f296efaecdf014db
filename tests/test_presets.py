"""The method presets (configs/methods/, issue #18 item 3): at least 20, each a method block
the config schema accepts with its sweep grid, each cited, each a method the capability matrix
says trains on BERT; and a config that inlines a preset holds it unchanged (without its grid
when the config does not sweep), so a preset edited in one place cannot drift from the other."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tasks.config.build import build_config

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "configs" / "methods").glob("*.yaml"))
QUICKSTART = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text(encoding="utf-8"))


def _preset(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def test_at_least_twenty_presets():
    assert len(PRESETS) >= 20, [p.name for p in PRESETS]


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_validates_with_its_grid_and_cites_a_source(path):
    block = _preset(path)
    assert block["name"] == path.stem
    assert block.get("lr") and block.get("sweep", {}).get("lr"), "an lr and a small lr grid"
    assert path.read_text(encoding="utf-8").startswith("# "), "a comment citing the source"
    raw = {**QUICKSTART, "methods": [block], "sweep": {}}
    cfg = build_config(raw, str(path))  # the schema: peft's config class built, the grid checked
    assert cfg.methods[0].name == block["name"]


def test_each_peft_preset_trains_on_bert_in_the_matrix():
    matrix = json.loads((ROOT / "docs" / "methods.json").read_text(encoding="utf-8"))
    status = {c["method"]: c["status"] for c in matrix["cells"]
              if c["family"] == "bert" and c["quant"] == "float"}
    for path in PRESETS:
        block = _preset(path)
        if block["method"] == "peft":
            assert status[block["peft"]["peft_type"]] == "trains", path.name


def _inlined() -> list[tuple[Path, dict, bool]]:
    """The method blocks of every config that says it inlines presets (names configs/methods/)."""
    out = []
    for config in sorted((ROOT / "configs").glob("*.yaml")):
        text = config.read_text(encoding="utf-8")
        if "configs/methods/" in text:
            raw = yaml.safe_load(text)
            out += [(config, m, bool(raw.get("sweep"))) for m in raw.get("methods", [])]
    return out


def test_configs_inline_presets_unchanged():
    presets = {p.stem: _preset(p) for p in PRESETS}
    checked = 0
    for config, block, sweeps in _inlined():
        want = presets.get(block["name"])
        if want is None:
            continue
        if not sweeps:
            want = {k: v for k, v in want.items() if k != "sweep"}
        assert block == want, f"{config.name}: {block['name']} differs from its preset"
        checked += 1
    assert checked >= 6 + len(PRESETS)  # quickstart-methods its handful, methods-all every one


def test_quickstart_methods_compares_against_lora():
    cfg = build_config(yaml.safe_load((ROOT / "configs" / "quickstart-methods.yaml").read_text(
        encoding="utf-8")), "quickstart-methods")
    assert cfg.reference == "lora" and cfg.methods[0].method == "lora"
    assert cfg.training.seeds == [1, 2]
    assert {m.peft["peft_type"] for m in cfg.methods if m.method == "peft"} >= {
        "LORA", "VERA", "IA3", "LOHA", "OFT"}


def test_methods_all_runs_every_preset_against_lora():
    raw = yaml.safe_load((ROOT / "configs" / "methods-all.yaml").read_text(encoding="utf-8"))
    cfg = build_config(raw, "methods-all")
    assert sorted(m.name for m in cfg.methods) == sorted(p.stem for p in PRESETS)
    assert cfg.reference == "lora" and cfg.methods[0].method == "lora"
    assert cfg.training.seeds == [1, 2] and not raw.get("sweep")
    assert sum(m.method == "peft" for m in cfg.methods) >= 20
