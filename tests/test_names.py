"""One vocabulary: product code reads and writes MLflow names only through `tasks/common/names.py`.
(What runs actually write is checked against the same declarations in test_repeats.py.)"""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# A metric or tag name spelled out: "eval/…", "train/…", "peft_bench.…", "prefect.flow_run…",
# "mlflow.parentRunId", or one of the aggregate names ("accuracy_mean", "mcnemar_p", …).
SPELLED = re.compile(r"""["'](?:(?:eval|train)/\w+|peft_bench\.\w+|prefect\.flow_run\w*|"""
                     r"""mlflow\.parentRunId|mlflow\.note\.content|\w+_(?:mean|ci_low|ci_high)|"""
                     r"""mcnemar_p|n_seeds)["']""")


def test_no_product_code_spells_out_a_metric_or_tag_name():
    offenders = []
    for folder in ("flows", "tasks", "benchmarks", "peft_modules"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name == "names.py":
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if SPELLED.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "use tasks.common.names instead of:\n" + "\n".join(offenders)


def test_the_check_catches_a_spelled_out_name():
    assert SPELLED.search('row = run.data.metrics["eval/accuracy"]')
    assert SPELLED.search("tags.get('peft_bench.method')")
    assert SPELLED.search('m["accuracy_mean"]')
    assert not SPELLED.search("names.EVAL_ACCURACY")
