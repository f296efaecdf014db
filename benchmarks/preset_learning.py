"""Does each preset learn? (issue #18 item 4.) Every method block of configs/methods/ trained for
a short run on the pretrained offline model (all-MiniLM-L6-v2, configs/quickstart.yaml's model
and data) and scored on SST-2 validation rows, against the majority-class rate.

    .venv/bin/python benchmarks/preset_learning.py      # all -> docs/methods-learning.json,
                                                         # and docs/methods.md re-rendered
    .venv/bin/python benchmarks/preset_learning.py --presets vera,ia3 [--print]

The pipeline's own pieces, without Prefect or MLflow: tasks.prepare (tokenised rows),
tasks.load.load_model, the method's injection (peft's get_peft_model through tasks.methods for
`method: peft`, peft_modules for ours), tasks.train.train_model (AdamW or the method's
optimizer: from tasks.methods.optim, the method's lr, the config's schedule) and tasks.evaluate.evaluate_model. A preset learns at this budget when its
accuracy beats the majority-class rate of the scored rows by MARGIN.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Optional

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRESETS = ROOT / "configs" / "methods"
OUT = ROOT / "docs" / "methods-learning.json"
TRAIN_ROWS, EVAL_ROWS, MARGIN = 600, 200, 0.10
COMMAND = ".venv/bin/python benchmarks/preset_learning.py"


def preset_blocks(names: Optional[list[str]] = None) -> list[dict]:
    blocks = [yaml.safe_load(p.read_text(encoding="utf-8")) for p in sorted(PRESETS.glob("*.yaml"))]
    if names:
        unknown = set(names) - {b["name"] for b in blocks}
        if unknown:
            raise SystemExit(f"--presets: no preset named {', '.join(sorted(unknown))} in "
                             f"{PRESETS.relative_to(ROOT)}")
        by = {b["name"]: b for b in blocks}
        blocks = [by[n] for n in names]
    return blocks


def bench_config(blocks: list[dict]):
    """configs/quickstart.yaml's model and data at the learning budget, these methods."""
    from tasks.config.build import build_config

    raw = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text(encoding="utf-8"))
    raw["data"].update(train_size=TRAIN_ROWS, eval_size=EVAL_ROWS,
                       source=str((ROOT / raw["data"]["source"]).resolve()))
    raw["methods"] = [{k: v for k, v in b.items() if k != "sweep"} for b in blocks]  # no sweep
    raw["training"].update(epochs=1, batch_size=16, seeds=None, seed=1)
    return build_config(raw, "preset learning")


def majority_rate(labels: list[int]) -> float:
    return Counter(labels).most_common(1)[0][1] / len(labels)


def inject(cfg, method, model):
    """As the pipeline injects: peft's get_peft_model for `method: peft`, ours otherwise.
    Returns the model to train (peft's PeftModel for method: peft)."""
    import peft_modules as pm

    if method.method != "peft":
        pm.inject_adapters(model, method.adapter_spec())
        return model
    from tasks.load import head_modules
    from tasks.methods.hf_peft import inject_peft

    return inject_peft(model, method.peft, head_modules(cfg.model)).model


def learn(cfg, method, data) -> dict:
    import torch

    from tasks.evaluate import evaluate_model
    from tasks.load import load_model
    from tasks.methods.optim import optimizer_factory
    from tasks.train import train_model

    device = torch.device("cpu")
    torch.manual_seed(cfg.training.seed)
    model = load_model(cfg.model, method, data.num_labels, data.pad_token_id, device)
    model = inject(cfg, method, model)
    res = train_model(model, data.train, cfg.training, method.lr or cfg.training.lr,
                      data.pad_token_id, device, make_optimizer=optimizer_factory(method))
    ev = evaluate_model(model, data.eval, data.num_labels, data.pad_token_id, device)
    return {"accuracy": round(float(ev.metrics["accuracy"]), 4), "steps": res.steps,
            "train_time_s": round(res.train_time_s, 1),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def run(names: Optional[list[str]] = None, say=print, done=None) -> dict:
    """Train the presets (all, or `names` in that order); `done(doc)` after each one."""
    from tasks.prepare import prepare_cached

    blocks = preset_blocks(names)
    cfg = bench_config(blocks)
    data, _ = prepare_cached(cfg.data, cfg.model.name_or_path, cfg.model.revision)
    majority = majority_rate(data.eval.labels)
    rows = []
    doc = {"command": COMMAND, "model": cfg.model.name_or_path,
           "budget": f"{TRAIN_ROWS} training rows, 1 epoch, batch 16", "eval_rows": EVAL_ROWS,
           "majority": round(majority, 4), "margin": MARGIN, "presets": rows}
    for block, method in zip(blocks, cfg.methods):
        t0 = time.perf_counter()
        row = {"name": method.name, "peft_type": (method.peft or {}).get("peft_type", method.method)}
        try:
            row.update(learn(cfg, method, data))
            row["learns"] = row["accuracy"] >= majority + MARGIN
        except Exception as exc:  # noqa: BLE001 - a preset that breaks is a finding
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        rows.append(row)
        say(f"{method.name}: {row.get('accuracy', row.get('error'))} "
            f"(majority {majority:.3f}) {time.perf_counter() - t0:.0f} s")
        if done:
            done(doc)
    return doc


def write(doc: dict) -> None:
    """docs/methods-learning.json, presets not rerun kept from the file (in preset order),
    and docs/methods.md re-rendered with it."""
    from benchmarks import _matrix_doc, method_matrix

    old = json.loads(OUT.read_text(encoding="utf-8"))["presets"] if OUT.is_file() else []
    new = {r["name"]: r for r in [*old, *doc["presets"]]}
    order = [b["name"] for b in preset_blocks()]
    OUT.write_text(json.dumps({**doc, "presets": [new[n] for n in order if n in new]},
                              indent=1) + "\n", encoding="utf-8")
    matrix = json.loads(method_matrix.JSON_OUT.read_text(encoding="utf-8"))
    _matrix_doc.write(method_matrix.MD_OUT, matrix)


def mark_unmeasured() -> None:
    """Presets without figures get a row saying so (a run cut short keeps what it measured)."""
    doc = json.loads(OUT.read_text(encoding="utf-8"))
    have = {r["name"] for r in doc["presets"]}
    missing = [b for b in preset_blocks() if b["name"] not in have]
    doc["presets"] = [{"name": b["name"], "peft_type": (b.get("peft") or {}).get(
        "peft_type", b["method"]), "measured": False,
        "error": "not measured yet (the run was stopped first): rerun this script"}
        for b in missing]
    write(doc)


def quiet() -> None:
    """Our progress lines, not transformers' load reports or peft's warnings."""
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("peft").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="peft")
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecations


def main(argv: Optional[list[str]] = None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", help="comma-separated preset names, in this order (default: all)")
    ap.add_argument("--print", action="store_true", help="print the figures, write nothing")
    ap.add_argument("--mark-unmeasured", action="store_true",
                    help="list the presets with no figures yet as not measured, and stop")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    quiet()
    if args.mark_unmeasured:
        mark_unmeasured()
        return 0
    names = args.presets.split(",") if args.presets else None
    doc = run(names, done=None if args.print else write)
    if args.print:
        print(json.dumps(doc, indent=1))
    else:
        print(f"wrote {OUT.relative_to(ROOT)}; docs/methods.md re-rendered")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
