"""Evaluation: metrics, a predictions table, a confusion matrix, and eval throughput."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support
from torch import nn

from tasks.common import names
from tasks.data.collate import SplitData, file_order, length_sorted_batches, make_loader, sequence_lengths
from tasks.train import NonFiniteError, autocast


@dataclass
class EvalResult:
    metrics: dict[str, float]          # accuracy, f1_macro, precision, recall, loss, …
    predictions: pd.DataFrame          # label, prediction, p_<k> per class (and text)
    confusion: np.ndarray              # (num_labels, num_labels), rows = true labels


def compute_metrics(labels, preds, num_labels: int) -> dict[str, float]:
    """Macro averages over every class, including a class the model never predicts."""
    classes = list(range(num_labels))
    p, r, f1, _ = precision_recall_fscore_support(labels, preds, labels=classes,
                                                  average="macro", zero_division=0)
    return {names.ACCURACY: float(accuracy_score(labels, preds)), names.F1_MACRO: float(f1),
            names.PRECISION: float(p), names.RECALL: float(r)}


@torch.no_grad()
def evaluate_model(model: nn.Module, data: SplitData, num_labels: int, pad_token_id: int,
                   device: torch.device, batch_size: int = 64, precision: str = "fp32",
                   texts: Optional[list[str]] = None, sort_by_length: bool = True) -> EvalResult:
    """Score `data`. `sort_by_length` batches rows of similar length (less padding; outputs
    are put back in file order, and a row's prediction does not depend on its batch mates up
    to float rounding: tests/test_collate_grouping.py)."""
    was_training = model.training
    model.eval()
    batches = (length_sorted_batches(sequence_lengths(data), batch_size) if sort_by_length
               else None)
    loader = make_loader(data, batch_size, shuffle=False, seed=0, pad_token_id=pad_token_id,
                         batches=batches)
    probs, loss_sum = [], 0.0
    t0 = time.perf_counter()
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(device, precision):
            out = model(**batch)
        loss_sum += out.loss.float().item() * len(batch["labels"])
        probs.append(out.logits.float().softmax(-1).cpu())
    elapsed = time.perf_counter() - t0
    model.train(was_training)
    p = torch.cat(probs).numpy()
    if batches is not None:
        p = p[file_order(batches)]  # back to file order, row i's outputs at position i
    if not (np.isfinite(p).all() and np.isfinite(loss_sum)):
        bad = int((~np.isfinite(p).all(-1)).sum())
        raise NonFiniteError(f"evaluation produced non-finite outputs ({bad} of {len(p)} rows "
                             f"with NaN/inf probabilities, loss {loss_sum / len(p)}): the model's "
                             "weights diverged; its predictions are not usable")
    labels, preds = np.asarray(data.labels), p.argmax(-1)
    metrics = compute_metrics(labels, preds, num_labels)
    metrics.update({"loss": loss_sum / len(labels), names.EVAL_TIME: elapsed,
                    names.EVAL_SAMPLES_PER_S: len(labels) / max(elapsed, 1e-9)})
    table = pd.DataFrame({"label": labels, "prediction": preds,
                          **{f"p_{k}": p[:, k] for k in range(p.shape[1])}})
    if texts is not None:
        table.insert(0, "text", texts)
    cm = confusion_matrix(labels, preds, labels=list(range(num_labels)))
    return EvalResult(metrics, table, cm)


def with_label_names(table: pd.DataFrame, label_names: Optional[list[str]]) -> pd.DataFrame:
    """The predictions table with `label_name`/`pred_name` beside the ids, for class names."""
    if label_names is None:
        return table
    out = table.copy()
    at = out.columns.get_loc("prediction") + 1
    out.insert(at, "pred_name", [label_names[i] for i in out["prediction"]])
    out.insert(at, "label_name", [label_names[i] for i in out["label"]])
    return out


def confusion_figure(cm: np.ndarray, title: str, label_names: Optional[list[str]] = None):
    """The confusion matrix as a matplotlib Figure: rows are the true classes, columns the
    predicted ones, ticks their names when known, else their ids. Built with the object API on
    an Agg canvas, never through pyplot (as tasks/reporting/charts.py): no display, no global
    state shared between Prefect worker threads, nothing to close."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(cm)
    ticks = list(label_names) if label_names is not None else [str(i) for i in range(n)]
    side = max(3.2, 0.6 * n + 2)  # room for a few more classes than two
    fig = Figure(figsize=(side + 0.4, side), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center",
                color="white" if v > cm.max() / 2 else "black")
    ax.set(xlabel="predicted", ylabel="true", title=title)
    # Names can be long: slanted on the x axis so neighbours do not overlap.
    ax.set_xticks(range(n), ticks, rotation=30 if label_names is not None else 0,
                  ha="right" if label_names is not None else "center")
    ax.set_yticks(range(n), ticks)
    fig.tight_layout()
    return fig


def plot_confusion(cm: np.ndarray, path: Path, title: str,
                   label_names: Optional[list[str]] = None) -> Path:
    confusion_figure(cm, title, label_names).savefig(path)
    return path


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(model: nn.Module, data: SplitData, num_labels: int, pad_token_id: int,
                  device: str, batch_size: int = 64, precision: str = "fp32",
                  texts: Optional[list[str]] = None, sort_by_length: bool = True) -> EvalResult:
    return evaluate_model(model, data, num_labels, pad_token_id, torch.device(device),
                          batch_size, precision, texts, sort_by_length)
