"""The child flow: one method, load → inject → train → evaluate → log, in its own MLflow run.

It takes only JSON-able parameters (the config as a dict, a method name, the parent run id), so
the same flow runs in-process or as a deployment on another worker.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch
from prefect import flow
from prefect.concurrency.sync import concurrency
from prefect.runtime import deployment, flow_run
from prefect.utilities.annotations import quote

from flows.orchestration import torchrun
from flows.orchestration.outputs import log_outputs, run_note, summary_of, timing_tags
from flows.orchestration.trials import TrialHook, trial_hook
from tasks.common import names, progress
from tasks.common.errors import describe
from tasks.common.secrets import redact
from tasks.config import sweep
from tasks.config.build import public_dump, revealed
from tasks.config.schema import BenchConfig, MethodConfig
from tasks.data.labels import names_tag
from tasks.evaluate import EvalResult, evaluate_task
from tasks.load import inject_adapter_task, load_model_task, saved_size_mb
from tasks.methods.optim import optimizer_factory
from tasks.preflight import resolve_device
from tasks.prepare import PreparedData, prepare_dataset
from tasks.tracking import runs as tracking
from tasks.tracking.lifecycle import reopen
from tasks.tracking.owner import owner_alive, owner_tag
from tasks.tracking.reuse import copy_run, find_reusable, run_key
from tasks.train import CheckpointPlan, NonFiniteError, train_task
from tasks.training import checkpoint, distributed
from tasks.training.distributed import Rank
from tasks.training.memory import PeakMemory


def prefect_tags() -> dict[str, str]:
    tags = {names.FLOW_RUN_ID: str(flow_run.id or ""),
            names.FLOW_RUN_NAME: str(flow_run.name or ""),
            # Which worker ran it: set by `peft-bench stack` workers, else this host and PID.
            names.WORKER: os.environ.get("PEFT_BENCH_WORKER",
                                         f"{socket.gethostname()}:{os.getpid()}")}
    if flow_run.ui_url:
        tags[names.FLOW_RUN_URL] = flow_run.ui_url
    return tags


def get_method(cfg: BenchConfig, name: str) -> MethodConfig:
    for m in cfg.methods:
        if m.name == name:
            return m
    raise ValueError(f"method_name: {name!r} is not in the config's methods "
                     f"{[m.name for m in cfg.methods]}")


@dataclass(frozen=True)
class RunPlan:
    """What one finetune flow run is: a grid point (scored on the selection split, a child of
    its method's run) or a final run (scored on the test split when there is one)."""

    phase: str                      # "grid" or "final"
    point: dict                     # the sweep values applied ({} without a sweep)
    split: str                      # "eval" or "test": the split the run is scored on
    split_name: str                 # that split's name in the data, for the record
    key: str = ""                   # the run key (tasks/tracking/reuse.py)

    @property
    def label(self) -> str:
        return sweep.label(self.point)


def plan_for(cfg: BenchConfig, phase: str, point: Optional[dict]) -> RunPlan:
    on_test = phase == "final" and cfg.data.has_test
    name = (cfg.data.test_split or "test-from-train") if on_test else cfg.data.eval_split
    return RunPlan(phase, dict(point or {}), "test" if on_test else "eval", name)


def start_child_run(cfg: BenchConfig, method: MethodConfig, parent_run_id: str,
                    device: torch.device, plan: RunPlan) -> str:
    shared = {k: v for k, v in public_dump(cfg).items() if k != "methods"}
    params = {**tracking.flatten(shared),
              **tracking.flatten(method.model_dump(mode="json", exclude={"sweep"}), "method."),
              "method.effective_lr": str(method.lr or cfg.training.lr)}
    if cfg.training.distributed is not None:
        params |= {names.WORLD_SIZE: str(cfg.training.distributed.world_size),
                   names.DIST_STRATEGY: cfg.training.distributed.strategy}
    seed = cfg.training.seed
    seeds = cfg.training.run_seeds
    role = names.ROLE_GRID if plan.phase == "grid" else names.ROLE_CHILD
    tags = {names.PARENT: parent_run_id, names.ROLE: role,
            names.METHOD: method.name, names.METHOD_KIND: method.method,
            names.SEED: str(seed), names.SEED_INDEX: str(seeds.index(seed) if seed in seeds else 0),
            names.POINT: plan.label, names.POINT_JSON: json.dumps(plan.point),
            names.EVAL_SPLIT: plan.split_name, names.RUN_KEY: plan.key,
            names.DEVICE: str(device), **prefect_tags()}
    name = f"{method.name}-{plan.label}" if plan.phase == "grid" else f"{method.name}-seed{seed}"
    return tracking.open_run(cfg, tags, run_name=name, params=params)


def log_eval(run_id: str, cfg: BenchConfig, ev: EvalResult, step: int) -> None:
    m = ev.metrics
    tracking.log_metrics(run_id, cfg.tracking, {
        names.EVAL_ACCURACY: m[names.ACCURACY], names.EVAL_F1: m[names.F1_MACRO],
        names.EVAL_PRECISION: m[names.PRECISION], names.EVAL_RECALL: m[names.RECALL],
        names.EVAL_LOSS: m["loss"], names.EVAL_RATE: m[names.EVAL_SAMPLES_PER_S]}, step)


def evaluate(cfg: BenchConfig, model, data: PreparedData, device: torch.device,
             with_texts: bool = False, split: str = "eval") -> EvalResult:
    """Score on the run's one split: the selection split, or the test split of a final run
    (periodic evaluations too, so no number of a run ever comes from another split)."""
    # quote(): Prefect walks every task argument looking for futures; through a split's
    # thousands of token-id lists that walk cost ~0.2 s a call (benchmarks/pipeline_overhead).
    return evaluate_task(model, quote(data.split(split)), data.num_labels, data.pad_token_id,
                         str(device), cfg.training.eval_batch_size, cfg.training.precision,
                         quote(data.texts(split)) if with_texts else None,
                         cfg.training.eval_sort_by_length)


def train_and_measure(cfg: BenchConfig, method: MethodConfig, data: PreparedData, run_id: str,
                      device: torch.device, split: str = "eval", hook: Optional[TrialHook] = None,
                      rank: Optional[Rank] = None):
    """Load, inject and train inside one peak-memory window (the method's own memory); a sweep
    trial's `hook` hears each periodic evaluation and may stop the training there (pruned).
    Under torchrun (`rank`), the model is trained inside DDP or FSDP; only the owner logs."""
    owner = rank is None or rank.owner
    with PeakMemory(device) as mem:
        model, summary, model_size_mb = build_model(cfg, method, data, device, mem)
        if rank is not None:
            model = distributed.wrap(model, rank, device)
        buffer = tracking.MetricBuffer(run_id, cfg.tracking) if owner else None

        def eval_fn(step: int) -> bool:
            stop = False
            if owner or rank.fsdp:  # FSDP's forward gathers shards: every rank takes part
                ev = evaluate(cfg, distributed.unwrap(model), data, device, split=split)
            if owner:
                log_eval(run_id, cfg, ev, step)
                stop = hook is not None and hook(step, ev.metrics, run_id)
            return rank.agree(stop) if rank is not None else stop

        try:
            result = call(train_task, model, quote(data.train), cfg.training,
                          method.lr or cfg.training.lr, data.pad_token_id, str(device),
                          buffer.add if buffer else None, eval_fn, checkpoint_plan(cfg, run_id),
                          optimizer_factory(method), rank)
        finally:
            if buffer:
                buffer.flush()
    return model, summary, result, mem.metrics(), model_size_mb


def build_model(cfg: BenchConfig, method: MethodConfig, data: PreparedData, device: torch.device,
                mem: Optional[PeakMemory] = None):
    """The base model with the method injected; (model, its AdapterSummary, model size MB)."""
    model = call(load_model_task, cfg.model, method, data.num_labels, data.pad_token_id,
                 str(device), data.label_names)
    with mem.excluded() if mem else contextlib.nullcontext():
        model_size_mb = saved_size_mb(model)  # writing it to measure it is not the method's memory
    summary = call(inject_adapter_task, model, method)
    if getattr(summary, "model", None) is not None:  # method: peft: train the PeftModel
        model = summary.model
    return model, summary, model_size_mb


def call(task, *args):
    """A Prefect task, called as such in a flow run; in a torchrun rank (no flow run there)
    its function itself, so that N ranks do not each record task runs."""
    if not torch.distributed.is_initialized():
        return task(*args)
    return task.fn(*(a.unquote() if isinstance(a, quote) else a for a in args))


def checkpoint_plan(cfg: BenchConfig, run_id: str) -> Optional[CheckpointPlan]:
    """Checkpoints go to <training.checkpoint_dir>/<MLflow run id>: a resume of the same run
    finds them, whichever process or worker picks it up (given a shared folder)."""
    every = cfg.training.checkpoint_every
    return CheckpointPlan(checkpoint_folder(cfg, run_id), every) if every else None


def checkpoint_folder(cfg: BenchConfig, run_id: str) -> Path:
    return Path(cfg.training.checkpoint_dir) / run_id






def run_method(cfg: BenchConfig, method: MethodConfig, data: PreparedData, run_id: str,
               device: torch.device, resumed: bool = False, split: str = "eval",
               hook: Optional[TrialHook] = None, rank: Optional[Rank] = None) -> dict[str, float]:
    torch.manual_seed(cfg.training.seed)  # head and adapter init follow the seed
    folder = checkpoint_folder(cfg, run_id)
    owner = rank is None or rank.owner
    if owner:
        log_inputs(cfg, data, run_id, split, resumed)
    try:
        model, summary, res, memory, model_size_mb = train_and_measure(cfg, method, data, run_id,
                                                                       device, split, hook, rank)
        if rank is not None:
            model, memory = trained_model(cfg, method, data, device, model, rank, memory)
        if not owner:
            return {}
        ev = evaluate(cfg, model, data, device, with_texts=True, split=split)
    except NonFiniteError:  # a diverged run's checkpoints would only diverge again
        if owner:
            checkpoint.clear(folder)
        raise
    log_eval(run_id, cfg, ev, res.steps)
    with tempfile.TemporaryDirectory() as tmp:
        adapter_mb = log_outputs(run_id, cfg, method, model, ev, Path(tmp), data.label_names)
    summary_metrics = summary_of(res, summary, ev, memory, model_size_mb, adapter_mb)
    tracking.log_metrics(run_id, cfg.tracking, summary_metrics, res.steps)  # eval: log_eval's
    tracking.log_history(run_id, cfg.tracking, names.STEP_TIME, res.step_times)
    result = {**summary_metrics, names.EVAL_ACCURACY: ev.metrics[names.ACCURACY],
              names.EVAL_F1: ev.metrics[names.F1_MACRO]}
    tracking.set_tags(run_id, cfg.tracking, {**timing_tags(method.name, res, cfg),
                                             names.RUN_NOTE: run_note(cfg, method, result)})
    if res.resumed_from is not None:
        tracking.set_tags(run_id, cfg.tracking, {names.RESUMED: str(res.resumed_from)})
    if res.resume_note:  # a damaged checkpoint was skipped: the run says which, and why
        tracking.set_tags(run_id, cfg.tracking, {names.RESUME_NOTE: res.resume_note[:5000]})
    if not cfg.training.keep_checkpoints:
        checkpoint.clear(folder)
    return result


def trained_model(cfg: BenchConfig, method: MethodConfig, data: PreparedData,
                  device: torch.device, model, rank: Rank, memory: dict[str, float]):
    """After distributed training: the owner's plain model with the trained weights (DDP: the
    wrapped module; FSDP: the shards gathered into a fresh copy, loaded as the run began), and
    the memory metrics with every rank's peak (collectives: every rank calls this)."""
    memory = distributed.memory_of_ranks(memory, rank)
    if not rank.fsdp:
        return distributed.unwrap(model), memory
    state = distributed.full_state(model)
    if not rank.owner:
        return None, memory
    torch.manual_seed(cfg.training.seed)
    plain, _, _ = build_model(cfg, method, data, device)
    plain.load_state_dict(state)
    return plain, memory


def log_inputs(cfg: BenchConfig, data: PreparedData, run_id: str, split: str,
               resumed: bool) -> None:
    """The datasets (once: a resumed run has them) and the class names, if any."""
    if not resumed:
        for role, df in (("train", data.train_df()), (split, data.frames[split].copy())):
            tracking.log_dataset(run_id, cfg.tracking, df, f"{cfg.name}-{role}",
                                 redact(data.source), role)
    if data.label_names is not None:
        tracking.set_tags(run_id, cfg.tracking, {names.LABEL_NAMES: names_tag(data.label_names)})








# The slot is leased: the holder renews it every 45 s; if the holder dies (worker killed),
# the server takes the slot back once the lease runs out. Prefect's default lease is 300 s;
# 60 s is its minimum, so a crashed run blocks the next one for about a minute, not five.
SLOT_LEASE_S = 60


def gpu_slot(cfg: BenchConfig):
    """Hold one slot of the Prefect global concurrency limit (default `gpu`) while training.

    Only deployment runs take it: they are what a work pool may start side by side on one GPU
    host. In-process (`dispatch: local`) methods already run one after another, and taking
    and handing back the slot measured ~2.3 s a method there (benchmarks/pipeline_overhead.py).
    """
    if not cfg.concurrency.slot or deployment.id is None:
        return contextlib.nullcontext()
    return concurrency(cfg.concurrency.slot, occupy=1, lease_duration=SLOT_LEASE_S)


def fail_mlflow_run(flow, flow_run, state) -> None:
    """on_crashed/on_cancellation hook: a crashed flow run (worker killed, SIGTERM) must not
    leave its MLflow run RUNNING. The parameter names matter: when the flow-run process was
    killed, the worker runs the hook and passes `flow=`, `flow_run=`, `state=` by keyword."""
    cfg = revealed(BenchConfig.model_validate(flow_run.parameters["config"]))
    tracking.fail_open_runs(cfg.tracking, str(flow_run.id),
                            f"flow run {state.name}: {state.message}")


def finished_metrics(run) -> dict[str, float]:
    return {k: v for k, v in run.data.metrics.items() if k in names.CHILD_METRICS.values()}


def open_child_run(cfg: BenchConfig, method: MethodConfig, parent_run_id: str,
                   device: torch.device, existing, plan: RunPlan) -> str:
    """A new child run, or the earlier one of the same (method, seed, point), reopened (a resume
    or a Prefect retry): never one that a live process is still training."""
    if existing is None:
        return start_child_run(cfg, method, parent_run_id, device, plan)
    owner = existing.data.tags.get(names.OWNER, "")
    if existing.info.status == "RUNNING" and owner and owner_alive(owner):
        raise RuntimeError(f"method {method.name}, seed {cfg.training.seed}: MLflow run "
                           f"{existing.info.run_id} is being trained by {owner}; not touching it")
    reopen(cfg.tracking, existing.info.run_id)
    return existing.info.run_id


def reuse_earlier(cfg: BenchConfig, plan: RunPlan, parent_run_id: str) -> Optional[str]:
    """With sweep.reuse: a copy of an earlier FINISHED run with the same run key, or None."""
    if cfg.sweep is None or not cfg.sweep.reuse:
        return None
    c = tracking.client(cfg.tracking)
    src = find_reusable(c, tracking.experiment_id(cfg.tracking), plan.key)
    if src is None:
        return None
    return copy_run(c, src, parent_run_id, owner_tag())


@flow(name="finetune", log_prints=True, on_crashed=[fail_mlflow_run],
      on_cancellation=[fail_mlflow_run])
def finetune(config: dict, method_name: str, parent_run_id: str, seed: Optional[int] = None,
             point: Optional[dict] = None, phase: str = "final") -> dict[str, float]:
    """Fine-tune and evaluate one method under one seed (default: training.seed) at one grid
    point (default: the config's values); its MLflow run ends FINISHED or FAILED. Data order,
    adapter init and head init follow the seed. A grid run is scored on the selection split, a
    final run on the test split when the config has one."""
    cfg = revealed(BenchConfig.model_validate(config))
    cfg = cfg.for_seed(seed) if seed is not None else cfg
    cfg = cfg.with_point(method_name, point) if point else cfg
    method, plan = get_method(cfg, method_name), plan_for(cfg, phase, point)
    device = resolve_device(cfg.training)
    if cfg.training.num_threads:
        torch.set_num_threads(cfg.training.num_threads)
    tracking.check_reachable(cfg.tracking)
    what = f"{method.name} seed {cfg.training.seed}"
    what += f", {plan.label}" if phase == "grid" else ""
    existing = tracking.find_child(cfg.tracking, parent_run_id, method.name, cfg.training.seed,
                                   plan.label)
    if existing is not None and existing.info.status == "FINISHED":
        progress.say(f"= {what}: already FINISHED in MLflow run {existing.info.run_id}, left alone")
        return finished_metrics(existing)
    data = prepare_dataset(cfg.data, cfg.model.name_or_path, cfg.model.revision)
    plan = replace(plan, key=run_key(cfg, method.name, plan.split_name, data.digest, str(device)))
    if existing is None and (copied := reuse_earlier(cfg, plan, parent_run_id)):
        progress.say(f"↺ {what}: reused an earlier FINISHED run with the same settings, data "
                     f"and code (MLflow run {copied})")
        return finished_metrics(tracking.client(cfg.tracking).get_run(copied))
    hook = trial_hook(cfg, parent_run_id, point, phase)  # halving/tpe: the point's Optuna trial
    with gpu_slot(cfg):  # waiting for the GPU is not part of the method's run
        run_id = open_child_run(cfg, method, parent_run_id, device, existing, plan)
        progress.say(f"▶ {what}: MLflow run {run_id}{' (resumed)' if existing else ''}")
        try:
            with tracking.closing_run(cfg.tracking, run_id, system_metrics=True):
                if cfg.training.distributed is not None:  # the ranks log into run_id
                    out = torchrun.run_job(cfg, method.name, run_id, parent_run_id, str(device),
                                           existing is not None, plan.split, plan.point, phase)
                else:
                    out = run_method(cfg, method, data, run_id, device,
                                     resumed=existing is not None, split=plan.split, hook=hook)
        except Exception as e:
            progress.say(f"✗ {what}: FAILED: {describe(e, one_line=True, limit=300)}")
            raise
    progress.say(f"✓ {what}: {plan.split_name} accuracy {out.get(names.EVAL_ACCURACY, 0):.4f}, "
                 f"train {out[names.TRAIN_TIME]:.1f} s, peak {out[names.PEAK_MEMORY]:,.0f} MB")
    return out
