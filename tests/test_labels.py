"""tasks.data.labels: class-name labels mapped to ids (sorted, or data.label_names), integer labels
unchanged, every mix or unknown class refused naming its rows, and the names carried to the
cache, the model's id2label, MLflow, the predictions table and the confusion matrix."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from test_data import write_split

from tasks.config.schema import DataConfig
from tasks.data.dataset import load_splits, validate_data
from tasks.data.labels import DataError

THREE = {"negative": 0, "neutral": 1, "positive": 2}  # the oracle: sorted by hand
TRAIN = [("awful", "negative"), ("fine i guess", "neutral"), ("great", "positive"),
         ("dull", " negative "), ("superb", "positive")]
EVAL = [("bad", "negative"), ("lovely", "positive"), ("so-so", "neutral")]


def folder(tmp_path: Path, train=TRAIN, validation=EVAL, ext: str = "tsv", name="d") -> Path:
    write_split(tmp_path / name, "train", ext, train)
    write_split(tmp_path / name, "validation", ext, validation)
    return tmp_path / name


def cfg_for(path: Path, **kw) -> DataConfig:
    return DataConfig(source=str(path), **kw)


def raw(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# ---------------------------------------------------------------- the mapping


@pytest.mark.parametrize("ext", ["tsv", "csv", "jsonl", "parquet"])
def test_names_map_to_their_sorted_position(tmp_path, ext):
    frames = load_splits(cfg_for(folder(tmp_path, ext=ext)))
    # " negative " is stripped: padding must not make a second class.
    assert frames["train"]["label"].tolist() == [THREE[n.strip()] for _, n in TRAIN]
    assert frames["validation"]["label"].tolist() == [THREE[n] for _, n in EVAL]
    assert frames["train"]["label"].dtype == "int64"
    summary = validate_data(cfg_for(folder(tmp_path, ext=ext)))
    assert summary.label_names == ["negative", "neutral", "positive"]
    assert summary.num_labels == 3
    assert summary.label_counts["train"] == {0: 2, 1: 1, 2: 2}


def test_data_label_names_fix_the_order_and_may_add_a_class(tmp_path):
    order = ["positive", "negative", "neutral", "mixed"]  # "mixed": no training row has it
    cfg = cfg_for(folder(tmp_path), label_names=order)
    frames = load_splits(cfg)
    assert frames["train"]["label"].tolist() == [1, 2, 0, 1, 0]
    assert frames["validation"]["label"].tolist() == [1, 0, 2]
    summary = validate_data(cfg)
    assert (summary.label_names, summary.num_labels) == (order, 4)


def test_integer_labels_are_as_before(tmp_path):
    """Ids stay ids, with no names, and the digest is the one integer data always had (the
    run keys and the regression history depend on it)."""
    rows = [("a", "1"), ("b", 0), ("c", "  2 ")]
    path = folder(tmp_path, train=rows, validation=[("d", 1)])
    summary = validate_data(cfg_for(path))
    assert (summary.label_names, summary.num_labels) == (None, 3)
    h = hashlib.sha256()
    for role, lines in (("train", ["1\ta", "0\tb", "2\tc"]), ("eval", ["1\td"])):
        h.update(f"[{role}]\n".encode())
        for line in lines:
            h.update(f"{line}\n".encode())
    assert summary.digest == h.hexdigest()
    # data.label_names with ids: the names of ids 0..n-1, and it fixes their number.
    named = validate_data(cfg_for(path, label_names=["low", "mid", "high"]))
    assert (named.label_names, named.num_labels) == (["low", "mid", "high"], 3)
    assert named.digest != summary.digest  # the same ids, now with a meaning
    with pytest.raises(DataError, match=r"train.tsv: line 4: column 'label': label 2 is outside "
                                        r"\[0, 2\) \(data.label_names has 2 classes\)"):
        validate_data(cfg_for(path, label_names=["low", "high"]))


def test_the_digest_follows_the_mapping(tmp_path):
    path = folder(tmp_path)
    sorted_ = validate_data(cfg_for(path)).digest
    assert validate_data(cfg_for(path, label_names=["negative", "neutral", "positive"])).digest \
        == sorted_  # the same mapping, spelled out
    swapped = validate_data(cfg_for(path, label_names=["neutral", "negative", "positive"]))
    assert swapped.digest != sorted_
    # Renamed classes with the same ids are other data too.
    renamed = [(t, {"negative": "bad", "neutral": "meh", "positive": "good"}[n.strip()])
               for t, n in TRAIN]
    other = folder(tmp_path, train=renamed, validation=[(t, {"negative": "bad", "neutral": "meh",
                   "positive": "good"}[n]) for t, n in EVAL], name="r")
    assert validate_data(cfg_for(other, label_names=["bad", "meh", "good"])).digest != sorted_


def test_hub_string_labels_map_and_class_label_ints_stay(monkeypatch):
    import datasets

    dsd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"sentence": ["good", "bad", "ok"],
                                             "label": ["pos", "neg", "pos"]}),
        "validation": datasets.Dataset.from_dict({"sentence": ["fine"], "label": ["neg"]}),
    })
    monkeypatch.setattr(datasets, "load_dataset", lambda source, name=None: dsd)
    cfg = DataConfig(source="someorg/no-such-local-folder")
    assert load_splits(cfg)["train"]["label"].tolist() == [1, 0, 1]
    assert validate_data(cfg).label_names == ["neg", "pos"]
    # The hub's SST-2 shape: a ClassLabel feature, read as ints.
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})
    dsd["train"] = datasets.Dataset.from_dict({"sentence": ["good", "bad", "ok"],
                                               "label": [1, 0, 1]}, features=features)
    dsd["validation"] = datasets.Dataset.from_dict({"sentence": ["fine"], "label": [0]},
                                                   features=features)
    assert load_splits(cfg)["train"]["label"].tolist() == [1, 0, 1]
    assert validate_data(cfg).label_names is None


# ---------------------------------------------------------------- errors, word for word

GOOD = "sentence\tlabel\nfine\tpositive\nbad\tnegative\n"
ERRORS = {
    # name: (train.tsv, validation.tsv, config overrides, expected substrings)
    "ids then a name": ("sentence\tlabel\na\t1\nb\t0\nc\tnegative\n", GOOD, {},
                        ["train.tsv: line 4: column 'label': label 'negative' is not an integer, "
                         "but ", "train.tsv: line 2 has the integer label 1; labels must be all "
                         "integer ids or all class names"]),
    "names then an id": ("sentence\tlabel\na\tpositive\nb\tnegative\nc\t1\n", GOOD, {},
                         ["train.tsv: line 4: column 'label': label 1 is an integer id, but ",
                          "train.tsv: line 2 has the class name 'positive'"]),
    "names in train, ids in eval": (GOOD, "sentence\tlabel\nx\tnegative\ny\t0\n", {},
                                    ["validation.tsv: line 3: column 'label': label 0 is an "
                                     "integer id, but ", "train.tsv: line 2 has the class name "
                                     "'positive'"]),
    "eval class not in training": (GOOD, "sentence\tlabel\nx\tnegative\ny\tneutral\n", {},
                                   ["validation.tsv: line 3: column 'label': label 'neutral' is "
                                    "not a class of the training split ", "train.tsv (its "
                                    "classes: ['negative', 'positive']); list every class in "
                                    "data.label_names"]),
    "name not in label_names": (GOOD, GOOD, {"label_names": ["negative", "neutral"]},
                                ["train.tsv: line 2: column 'label': label 'positive' is not in "
                                 "data.label_names ['negative', 'neutral']"]),
    "num_labels disagrees": (GOOD, GOOD, {"num_labels": 3},
                             ["data.num_labels = 3, but the training split ",
                              "train.tsv has 2 classes ['negative', 'positive']"]),
    "label_names twice": (GOOD, GOOD, {"label_names": ["negative", "positive", " negative"]},
                          ["data.label_names: 'negative' is listed twice"]),
    "label_names numeric": (GOOD, GOOD, {"label_names": ["negative", "1"]},
                            ["data.label_names[1]: '1' is an integer; class names must not be"]),
    "label_names vs num_labels": (GOOD, GOOD, {"label_names": ["negative", "positive"],
                                               "num_labels": 3},
                                  ["data.num_labels = 3, but data.label_names has 2 classes"]),
    "empty label": ("sentence\tlabel\na\tpositive\nb\t \n", GOOD, {},
                    ["train.tsv: line 3: column 'label': label is empty"]),
    "fraction": ("sentence\tlabel\na\t1\nb\t0.5\n", GOOD, {},
                 ["train.tsv: line 3: column 'label': label '0.5' is not an integer"]),
    "one class by name": ("sentence\tlabel\na\tpositive\nb\tpositive\n", GOOD,
                          {"label_names": ["negative", "positive"]},
                          ["every training row has label 1 ('positive')"]),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_label_errors_name_file_line_and_column(tmp_path, case):
    train, validation, overrides, expected = ERRORS[case]
    raw(tmp_path / "d" / "train.tsv", train)
    raw(tmp_path / "d" / "validation.tsv", validation)
    with pytest.raises(DataError) as err:
        validate_data(cfg_for(tmp_path / "d", **overrides))
    for words in expected:
        assert words in str(err.value)


def test_json_booleans_and_nulls_are_refused(tmp_path):
    d = tmp_path / "j"
    raw(d / "validation.jsonl", '{"sentence": "ok", "label": "a"}\n')
    raw(d / "train.jsonl", '{"sentence": "ok", "label": "a"}\n{"sentence": "x", "label": true}\n')
    with pytest.raises(DataError, match=r"train.jsonl: line 2: column 'label': label True is "
                                        r"not an integer \(a boolean"):
        validate_data(cfg_for(d))
    raw(d / "train.jsonl", '{"sentence": "ok", "label": "a"}\n{"sentence": "x", "label": null}\n')
    with pytest.raises(DataError, match=r"train.jsonl: line 2: column 'label': label is empty"):
        validate_data(cfg_for(d))


def test_a_mixed_error_reaches_the_cli_as_exit_2(tmp_path, tiny_model_dir, sst2_dir):
    from conftest import make_bench_config
    from typer.testing import CliRunner

    from flows.cli.main import app

    raw(tmp_path / "d" / "train.tsv", "sentence\tlabel\na\t1\nb\tnegative\n")
    raw(tmp_path / "d" / "validation.tsv", GOOD)
    cfg = make_bench_config(tmp_path, tiny_model_dir, sst2_dir)
    cfg["data"] = {"source": str(tmp_path / "d")}
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(app, ["run", str(tmp_path / "b.yaml")])
    assert result.exit_code == 2, result.output
    assert "line 3: column 'label': label 'negative' is not an integer" in \
        " ".join(result.output.split())


# ---------------------------------------------------------------- where the names go


def test_the_cache_keeps_the_names_and_keys_on_their_order(tmp_path, tiny_model_dir):
    from tasks.prepare import cache_key, prepare_cached

    path, root = folder(tmp_path), tmp_path / "cache"
    first, hit = prepare_cached(cfg_for(path), str(tiny_model_dir), root=root)
    again, hit2 = prepare_cached(cfg_for(path), str(tiny_model_dir), root=root)
    assert (hit, hit2) == (False, True)
    assert again.label_names == first.label_names == ["negative", "neutral", "positive"]
    assert again.summary == first.summary
    swapped_cfg = cfg_for(path, label_names=["positive", "neutral", "negative"])
    assert cache_key(swapped_cfg, str(tiny_model_dir), None) != \
        cache_key(cfg_for(path), str(tiny_model_dir), None)
    swapped, hit3 = prepare_cached(swapped_cfg, str(tiny_model_dir), root=root)
    assert hit3 is False and swapped.label_names == ["positive", "neutral", "negative"]
    assert swapped.train.labels == [2, 1, 0, 2, 0] and swapped.digest != first.digest


def test_the_model_gets_id2label(tiny_model_dir):
    import torch

    from tasks.config.schema import MethodConfig, ModelConfig
    from tasks.load import load_model

    lora = MethodConfig(name="lora", method="lora", rank=2, alpha=4, targets=["c_attn"])
    model = load_model(ModelConfig(name_or_path=str(tiny_model_dir)), lora, 3, 0,
                       torch.device("cpu"), ["negative", "neutral", "positive"])
    assert model.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    assert model.config.label2id == THREE and model.config.num_labels == 3
    plain = load_model(ModelConfig(name_or_path=str(tiny_model_dir)), lora, 2, 0,
                       torch.device("cpu"))
    assert plain.config.id2label == {0: "LABEL_0", 1: "LABEL_1"}  # transformers' default


def test_the_confusion_matrix_and_predictions_show_the_names(tmp_path):
    import matplotlib.pyplot as plt
    import numpy as np

    from tasks.evaluate import confusion_figure, plot_confusion, with_label_names

    cm = np.array([[3, 1, 0], [0, 2, 0], [1, 0, 4]])
    names = ["negative", "neutral", "positive"]
    fig = confusion_figure(cm, "lora", names)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == names
    assert [t.get_text() for t in ax.get_yticklabels()] == names
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("predicted", "true")
    plt.close(fig)
    fig = confusion_figure(cm, "lora")
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["0", "1", "2"]
    plt.close(fig)
    assert plot_confusion(cm, tmp_path / "cm.png", "lora", names).stat().st_size > 0
    table = pd.DataFrame({"text": ["a", "b"], "label": [0, 2], "prediction": [1, 2],
                          "p_0": [0.1, 0.0], "p_1": [0.8, 0.1], "p_2": [0.1, 0.9]})
    named = with_label_names(table, names)
    assert named.columns.tolist() == ["text", "label", "prediction", "label_name", "pred_name",
                                      "p_0", "p_1", "p_2"]
    assert named["label_name"].tolist() == ["negative", "positive"]
    assert named["pred_name"].tolist() == ["neutral", "positive"]
    assert with_label_names(table, None) is table


def test_a_long_list_of_names_fits_an_mlflow_tag():
    from tasks.data.labels import names_tag

    assert json.loads(names_tag(["a", "b"])) == ["a", "b"]
    many = [f"class number {i}" for i in range(2000)]
    tag = names_tag(many)
    assert len(tag) <= 8000
    short = json.loads(tag)
    assert short[:-1] == many[:len(short) - 1] and short[-1].startswith("... and ")


@pytest.mark.timeout(900)
def test_a_cli_run_on_class_names(prefect_harness, tmp_path, tiny_model_dir, sst2_dir):
    """peft-bench run on three named classes: the child run records the names, its adapter
    folder's config.json has them as id2label, the predictions name them."""
    from conftest import make_bench_config
    from mlflow.tracking import MlflowClient
    from typer.testing import CliRunner

    from flows.cli.main import app
    from tasks.common import names

    words = {"negative": "awful dull bad", "neutral": "fine okay average",
             "positive": "great superb lovely"}
    rows = [(f"{words[c].split()[i % 3]} film {i}", c) for i in range(12) for c in words]
    path = folder(tmp_path, train=rows, validation=rows[:9])
    cfg = make_bench_config(tmp_path, tiny_model_dir, sst2_dir)
    cfg["data"] = {"source": str(path), "max_length": 16}
    cfg["methods"] = [m for m in cfg["methods"] if m["name"] == "lora"]
    cfg["training"].update(max_steps=2, batch_size=8, eval_every=None)
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(app, ["run", str(tmp_path / "b.yaml")])
    assert result.exit_code == 0, result.output
    client = MlflowClient(cfg["tracking"]["tracking_uri"])
    exp = client.get_experiment_by_name("ci")
    [child] = [r for r in client.search_runs([exp.experiment_id])
               if r.data.tags[names.ROLE] == names.ROLE_CHILD]
    assert child.info.status == "FINISHED"
    assert json.loads(child.data.tags[names.LABEL_NAMES]) == ["negative", "neutral", "positive"]
    artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
    assert {"confusion_matrix.png", names.PREDICTIONS, names.ADAPTER_ARTIFACTS} <= artifacts
    adapter = Path(client.download_artifacts(child.info.run_id, names.ADAPTER_ARTIFACTS,
                                             str(tmp_path / "dl")))
    config = json.loads((adapter / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
    assert config["label2id"] == THREE
    preds = pd.read_csv(client.download_artifacts(child.info.run_id, names.PREDICTIONS,
                                                  str(tmp_path / "dl2")))
    assert preds["label_name"].tolist() == [n for _, n in rows[:9]]
    assert (preds["label"].map(dict(enumerate(THREE))) == preds["label_name"]).all()
    assert (preds["prediction"].map(dict(enumerate(THREE))) == preds["pred_name"]).all()
    merged = tmp_path / "merged"  # export --merged: the plain model keeps the names too
    out = CliRunner().invoke(app, ["export", child.info.run_id, str(merged), "--merged",
                                   "--tracking-uri", cfg["tracking"]["tracking_uri"]])
    assert out.exit_code == 0, out.output
    config = json.loads((merged / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
