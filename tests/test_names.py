"""One vocabulary: product code reads and writes MLflow names, summary keys and artifact file
names only through `tasks/common/names.py`. (What runs actually write is checked against the
same declarations in test_repeats.py.)"""
from __future__ import annotations

import re
from pathlib import Path

from tasks.common import names

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


# Every summary key (with a row's `_ci` and `_std` companions) and artifact file name declared in
# names.py, as a string literal: "accuracy", 'train_time_s', "confusion_matrix.png", …
DECLARED = {*names.SUMMARY_KEYS, *names.ARTIFACT_FILES,
            *(f(k) for k in names.AGGREGATED for f in (names.row_ci, names.row_std))}
QUOTED = re.compile(r"""["'](%s)["']""" % "|".join(
    re.escape(d) for d in sorted(DECLARED, key=len, reverse=True)))
# (file, literal) -> why that literal is not the declared name it spells.
NOT_THE_NAME: dict[tuple[str, str], str] = {
    ("flows/cli/display.py", "accuracy"): "the CLI table's column header, beside names.ACCURACY",
}


def test_no_product_code_spells_out_a_summary_key_or_artifact_name():
    offenders, excused = [], set()
    for folder in ("flows", "tasks"):  # benchmarks/ print rows of their own
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            if rel == "tasks/common/names.py":
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                found = set(QUOTED.findall(line))
                excused |= {(rel, m) for m in found if (rel, m) in NOT_THE_NAME}
                if any((rel, m) not in NOT_THE_NAME for m in found):
                    offenders.append(f"{rel}:{n}: {line.strip()}")
    assert not offenders, "use tasks.common.names instead of:\n" + "\n".join(offenders)
    assert excused == set(NOT_THE_NAME), f"stale exceptions: {set(NOT_THE_NAME) - excused}"


def test_the_check_catches_a_spelled_out_key_or_file():
    assert QUOTED.search('row["train_time_s"]')
    assert QUOTED.search("out / 'confusion_matrix.png'")
    assert QUOTED.search('r.get("accuracy_ci")')
    assert QUOTED.search('(work / "report.md")')
    assert not QUOTED.search('row["accuracy_drop"]')  # a regression config field
    assert not QUOTED.search("r[names.ACCURACY]")
