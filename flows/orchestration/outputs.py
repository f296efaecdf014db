"""What a finished child run records besides its metrics: the weights (peft's layout for an
adapter), predictions, the confusion matrix and config, the summary metrics, the run's
description and the timing-contamination tags. Written by the rank that owns the run."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import peft_modules as pm
from tasks.common import names
from tasks.common.secrets import redact
from tasks.config.schema import BenchConfig, MethodConfig
from tasks.evaluate import EvalResult, plot_confusion, with_label_names
from tasks.methods.hf_peft import save_peft
from tasks.tracking import runs as tracking
from tasks.train import TrainResult


def save_weights(cfg: BenchConfig, method: MethodConfig, model, folder: Path,
                 label_names: Optional[list[str]] = None) -> Path:
    """The trained weights as others load them: an adapter in Hugging Face peft's layout
    (adapter_model.safetensors + adapter_config.json, the head as modules_to_save), which
    `peft.PeftModel.from_pretrained` and peft-serving stacks read; for full fine-tuning every
    trained tensor (our layout). Returns the weights file (its size is the adapter size).
    With class names, the model's config.json beside them: its id2label says what each
    output is (an adapter alone cannot say it)."""
    if method.method == "full":
        weights = pm.save_adapter(model, method.adapter_spec(), folder)
    elif method.method == "peft":
        weights = save_peft(model, folder, redact(cfg.model.name_or_path))
    else:
        weights = pm.save_peft_adapter(model, method.adapter_spec(), folder,
                                       base_model_name_or_path=redact(cfg.model.name_or_path))
    if label_names is not None:
        model.config.save_pretrained(folder)
    return weights


def log_outputs(run_id: str, cfg: BenchConfig, method: MethodConfig, model, ev: EvalResult,
                out: Path, label_names: Optional[list[str]] = None) -> float:
    """Artifacts: adapter (or full weights), predictions, confusion matrix, resolved config;
    class names, when the labels have them, in all but the config."""
    adapter_dir = out / names.ADAPTER_ARTIFACTS
    weights = save_weights(cfg, method, model, adapter_dir, label_names)
    with_label_names(ev.predictions, label_names).to_csv(out / names.PREDICTIONS, index=False)
    plot_confusion(ev.confusion, out / names.CONFUSION_MATRIX, method.name, label_names)
    for name in (names.PREDICTIONS, names.CONFUSION_MATRIX):
        tracking.log_artifact(run_id, cfg.tracking, out / name)
    tracking.log_config(run_id, cfg)
    if cfg.tracking.log_weights:
        tracking.log_artifact(run_id, cfg.tracking, adapter_dir, names.ADAPTER_ARTIFACTS)
    return weights.stat().st_size / 2**20


def summary_of(res: TrainResult, summary: pm.AdapterSummary, ev: EvalResult,
               memory: dict[str, float], model_size_mb: float,
               adapter_mb: float) -> dict[str, float]:
    out = {names.TRAIN_TIME: res.train_time_s, names.STEP_TIME_MEDIAN: res.step_time_median_s,
           names.SAMPLES_PER_S: res.samples_per_s, names.TOKENS_PER_S: res.tokens_per_s,
           names.TRAIN_STEPS: res.steps, **memory,  # peak, and per-step average and p99
           names.TRAINABLE_PARAMS: summary.trainable_params,
           names.TOTAL_PARAMS: summary.total_params, names.TRAINABLE_PCT: summary.trainable_pct,
           names.MODEL_SIZE: model_size_mb, names.ADAPTER_SIZE: adapter_mb,
           names.EVAL_TIME: ev.metrics[names.EVAL_TIME],
           names.PERIODIC_EVAL_TIME: res.periodic_eval_s,
           names.EVAL_SAMPLES_PER_S: ev.metrics[names.EVAL_SAMPLES_PER_S]}
    if res.load is not None:
        out[names.OTHER_CPU_SHARE] = res.load.other_share
        if res.load.gpu_others is not None:
            out[names.OTHER_GPU_PROCS] = res.load.gpu_others
    return out


def run_note(cfg: BenchConfig, method: MethodConfig, m: dict[str, float]) -> str:
    """The run's description in the MLflow UI: what it is and its headline numbers."""
    settings = f"lr {method.lr or cfg.training.lr:g}"
    if method.method == "peft":
        settings += f", peft {json.dumps(method.peft)}"
    elif method.method != "full":
        settings += f", rank {method.rank}, alpha {method.alpha:g}, targets {method.targets}"
    return (f"**{method.name}** ({method.method}), seed {cfg.training.seed}, on "
            f"`{redact(cfg.model.name_or_path)}`: {settings}.\n\n"
            f"| accuracy | F1 | train s | peak MB | trainable |\n|---:|---:|---:|---:|---:|\n"
            f"| {m.get(names.EVAL_ACCURACY, float('nan')):.4f} | {m.get(names.EVAL_F1, float('nan')):.4f} "
            f"| {m[names.TRAIN_TIME]:.1f} | {m[names.PEAK_MEMORY]:.0f} | {m[names.TRAINABLE_PARAMS]:,.0f} |")


def timing_tags(method: str, res: TrainResult, cfg: BenchConfig) -> dict[str, str]:
    """Flag a run whose timings other processes disturbed, so the report warns instead of
    ranking on them."""
    load = res.load
    if load is None:
        return {}
    bad = load.contaminated(cfg.training.contamination_threshold)
    tags = {names.CONTAMINATED: str(bad).lower()}
    if bad:
        why = [f"other processes used {100 * load.other_share:.0f}% of the machine's CPU "
               f"(threshold {100 * cfg.training.contamination_threshold:.0f}%)"]
        if load.gpu_others:
            why.append(f"{load.gpu_others} other process(es) on the GPU")
        tags[names.TIMING_WARNING] = (f"{method} (seed {cfg.training.seed}): "
                                      + " and ".join(why) + " while it trained")
    return tags
