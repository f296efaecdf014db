"""Sweeps that stop early (`sweep.strategy: halving | tpe`), through Optuna: one study per
method, each grid run one trial of it.

- The study of a method is named after the method's MLflow run (`peft-bench-<run id>`), which a
  `--resume` takes up again, and lives in `sweep.storage` (default: a journal file
  `<training.checkpoint_dir>/optuna.journal`; a database URL works too). The benchmark's
  process asks the trials; the finetune runs (in this process or on a worker, which must then
  see the same storage) report to them; so the storage outlives both.
- halving: Optuna's GridSampler over the grid's points (every point once, in an order drawn from
  `sweep.seed`), SuccessiveHalvingPruner (`min_resource` steps, default `training.eval_every`,
  then x `reduction_factor` per rung). Every trial is asked up front, so each point has one
  trial for good, and the trials run in trial order.
- tpe: TPESampler over the ranges (lists are choices; floats are rounded to 3 significant
  digits, so labels stay readable and a point sampled twice is one run), `n_trials` per method,
  asked one round at a time (one trial per method; with `dispatch: deployments`,
  `concurrency.limit` per method) after the previous round was told.
- A trial's user attributes hold its point (JSON) and, once known, its MLflow run id; the grid
  run is tagged `peft_bench.trial`. The benchmark tells each trial its outcome from MLflow after
  its round (COMPLETE with the run's selection metric, PRUNED, or FAIL), so a run left alone on
  a resume, or copied by reuse, is told like one trained now.
- `TrialHook`, built in the finetune run, reports the selection metric at each periodic
  evaluation and asks the pruner; a pruned run stops there and ends FINISHED with
  `peft_bench.pruned_at_step`, its curves so far kept, and `:pruned` added to its run key so
  that reuse never copies it as a run that trained to the end.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from flows.orchestration.jobs import Job, States
from tasks.common import names
from tasks.config.schema import BenchConfig
from tasks.config.sweep import Grid, Point, grid_keys, is_range, points
from tasks.tracking import runs as tracking
from tasks.tracking import store

POINT_ATTR = "point"           # a trial's user attribute: its point, as JSON
RUN_ATTR = "mlflow_run_id"     # a trial's user attribute: its grid run in MLflow
PRUNED_KEY_SUFFIX = ":pruned"  # added to a pruned run's run key: never reused as a full run
DIGITS = 3                     # significant digits of a sampled float

if TYPE_CHECKING:  # optuna is imported where a sweep uses it: ~0.3 s that other runs skip
    import optuna
    from optuna.trial import FrozenTrial, Trial

Dispatch = Callable[[BenchConfig, list[Job]], States]


def storage(cfg: BenchConfig):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the console shows our lines only
    where = cfg.sweep.storage
    if where and "://" in where:
        return where  # a database URL: Optuna opens it (RDBStorage)
    path = Path(where) if where else Path(cfg.training.checkpoint_dir) / "optuna.journal"
    path.parent.mkdir(parents=True, exist_ok=True)
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def study_name(method_run_id: str) -> str:
    return f"peft-bench-{method_run_id}"


def trial_tag(study: "optuna.Study", number: int) -> str:
    return f"{study.study_name}#{number}"


def point_key(point: Point) -> str:
    return json.dumps(point, sort_keys=True)


def _choice(value):
    """A grid value as an Optuna choice (None, bool, int, float or str): lists go as JSON."""
    return value if value is None or isinstance(value, (bool, int, float, str)) else json.dumps(value)


def pruner(cfg: BenchConfig) -> "optuna.pruners.BasePruner":
    import optuna

    s = cfg.sweep
    if s.strategy != "halving":
        return optuna.pruners.NopPruner()
    return optuna.pruners.SuccessiveHalvingPruner(
        min_resource=s.min_resource or cfg.training.eval_every,
        reduction_factor=s.reduction_factor, bootstrap_count=s.bootstrap_count)


def open_study(cfg: BenchConfig, grid: Grid, method_run_id: str) -> "optuna.Study":
    import optuna

    s = cfg.sweep
    if s.strategy == "halving":
        space = {k: [_choice(v) for v in grid[k]] for k in grid_keys(grid)}
        sampler = optuna.samplers.GridSampler(space, seed=s.seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=s.seed)
    return optuna.create_study(
        study_name=study_name(method_run_id), storage=storage(cfg), sampler=sampler,
        pruner=pruner(cfg), direction="maximize" if s.higher_is_better else "minimize",
        load_if_exists=True)


def load_study(cfg: BenchConfig, method_run_id: str) -> "optuna.Study":
    """The study to report to and tell: GridSampler ends `optimize` when its grid is done by
    calling `Study.stop`, which raises outside `optimize` (our ask/tell), so only asking goes
    through the study `open_study` gives."""
    import optuna

    return optuna.load_study(study_name=study_name(method_run_id), storage=storage(cfg),
                             sampler=optuna.samplers.RandomSampler(), pruner=pruner(cfg))


def suggest(trial: Trial, grid: Grid) -> Point:
    """The trial's point: a grid value (halving's GridSampler picks it) or a sample (tpe)."""
    point = {}
    for key in grid_keys(grid):
        values = grid[key]
        if not is_range(values):
            chosen = trial.suggest_categorical(key, [_choice(v) for v in values])
            point[key] = next(v for v in values if _choice(v) == chosen)
            continue
        kind, (low, high) = next(iter(values.items()))
        if kind == "int":
            point[key] = trial.suggest_int(key, low, high)
        else:
            x = trial.suggest_float(key, low, high, log=kind == "log_uniform")
            point[key] = min(max(float(f"{x:.{DIGITS}g}"), low), high)
    return point


def new_trial(study: optuna.Study, grid: Grid) -> tuple[Trial, Point]:
    trial = study.ask()
    point = suggest(trial, grid)
    trial.set_user_attr(POINT_ATTR, point_key(point))
    return trial, point


def live(study: optuna.Study, t: FrozenTrial) -> Trial:
    """A trial read back from the storage, as the object that reports and sets attributes
    (Optuna's ask/tell API hands one out only from `ask`)."""
    from optuna.trial import Trial

    return Trial(study, t._trial_id)


def trial_point(t: FrozenTrial | Trial) -> Point:
    return json.loads(t.user_attrs[POINT_ATTR])


def halving_jobs(cfg: BenchConfig, name: str, run_id: str, study: optuna.Study, grid: Grid,
                 seed: int) -> list[Job]:
    """One trial per grid point, asked now unless a trial that did not fail holds it; the
    points whose trials all failed are enqueued again (GridSampler counts them as visited)."""
    from optuna.trial import TrialState

    live = {t.user_attrs[POINT_ATTR]: t for t in study.get_trials(deepcopy=False)
            if t.state != TrialState.FAIL and POINT_ATTR in t.user_attrs}
    missing = [p for p in points(grid) if point_key(p) not in live]
    tried = {t.user_attrs.get(POINT_ATTR) for t in study.get_trials(deepcopy=False)}
    for p in missing:
        if point_key(p) in tried:
            study.enqueue_trial({k: _choice(v) for k, v in p.items()}, skip_if_exists=False)
    for _ in missing:
        t, p = new_trial(study, grid)
        live[point_key(p)] = t
    ordered = sorted(live.values(), key=lambda t: t.number)
    return [Job(name, seed, run_id, trial_point(t), "grid") for t in ordered]


def tpe_jobs(cfg: BenchConfig, name: str, run_id: str, study: optuna.Study, grid: Grid,
             seed: int, batch: int) -> list[Job]:
    """This round's trials: those an interrupted benchmark left running, else up to `batch`
    new ones, until the method has `n_trials`."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    running = [t for t in trials if t.state == TrialState.RUNNING]
    if not running:
        for _ in range(min(batch, cfg.sweep.n_trials - len(trials))):
            running.append(new_trial(study, grid)[0])
    return [Job(name, seed, run_id, trial_point(t), "grid") for t in running]


def settle(cfg: BenchConfig, client, experiment_id: str, study: optuna.Study,
           method_run_id: str) -> None:
    """Tell every running trial its outcome, read from its grid run in MLflow (the newest of
    its point); called once its round's runs have ended, so a trial without a FINISHED run
    failed."""
    from optuna.trial import TrialState

    metric = names.CHILD_METRICS[cfg.sweep.metric]
    by_point = {}
    for r in store.children(client, experiment_id, method_run_id,
                            tags={names.ROLE: names.ROLE_GRID}):  # oldest first: newest wins
        by_point[point_key(json.loads(r.data.tags.get(names.POINT_JSON, "{}")))] = r
    for t in study.get_trials(deepcopy=False):
        run = by_point.get(t.user_attrs.get(POINT_ATTR))
        if t.state != TrialState.RUNNING:
            continue  # told already: by the pruner's hook, or by an earlier round
        if run is not None:
            live(study, t).set_user_attr(RUN_ATTR, run.info.run_id)
            client.set_tag(run.info.run_id, names.TRIAL, trial_tag(study, t.number))
        if run is None or run.info.status != "FINISHED" or metric not in run.data.metrics:
            study.tell(t.number, state=TrialState.FAIL)
        elif names.PRUNED_AT_STEP in run.data.tags:
            study.tell(t.number, state=TrialState.PRUNED)
        else:
            study.tell(t.number, run.data.metrics[metric])


def run_studies(cfg: BenchConfig, client, experiment_id: str, method_runs: dict[str, str],
                dispatch: Dispatch) -> States:
    """Every method's trials, round by round (halving: one round), each round dispatched as
    one batch (in trial order) and then told. The grid runs' states."""
    seed, grids = cfg.training.run_seeds[0], {m.name: cfg.method_grid(m) for m in cfg.methods}
    studies = {n: open_study(cfg, grids[n], rid) for n, rid in method_runs.items()}
    batch = cfg.concurrency.limit if cfg.dispatch == "deployments" else 1
    states: States = {}
    while True:
        if cfg.sweep.strategy == "halving":
            jobs = [j for n, st in studies.items()
                    for j in halving_jobs(cfg, n, method_runs[n], st, grids[n], seed)]
        else:
            jobs = [j for n, st in studies.items()
                    for j in tpe_jobs(cfg, n, method_runs[n], st, grids[n], seed, batch)]
        if jobs:
            states.update(dispatch(cfg, jobs))
        for n, rid in method_runs.items():
            settle(cfg, client, experiment_id, load_study(cfg, rid), rid)
        if cfg.sweep.strategy == "halving" or not jobs:
            return states


# ------------------------------------------------------------------ in the finetune run
@dataclass
class TrialHook:
    """The periodic-evaluation hook of one grid run: report the selection metric to the
    run's trial, and say whether to stop (the pruner's call)."""

    cfg: BenchConfig
    study: optuna.Study
    trial: Trial
    pruned_at: Optional[int] = None

    def __call__(self, step: int, metrics: dict[str, float], run_id: str) -> bool:
        if self.trial.user_attrs.get(RUN_ATTR) != run_id:  # before a tell closes the trial
            self.trial.set_user_attr(RUN_ATTR, run_id)
            tracking.set_tags(run_id, self.cfg.tracking,
                              {names.TRIAL: trial_tag(self.study, self.trial.number)})
        key = self.cfg.sweep.metric
        value = metrics["loss" if key == names.FINAL_LOSS else key]  # evaluate()'s own keys
        with warnings.catch_warnings():  # a resumed run reports its first steps again
            warnings.simplefilter("ignore", UserWarning)
            self.trial.report(value, step)
        if not self.trial.should_prune():
            return False
        from optuna.trial import TrialState

        self.pruned_at = step
        run_key = tracking.client(self.cfg.tracking).get_run(run_id).data.tags.get(names.RUN_KEY, "")
        tracking.set_tags(run_id, self.cfg.tracking, {
            names.PRUNED_AT_STEP: str(step), names.RUN_KEY: run_key + PRUNED_KEY_SUFFIX})
        self.study.tell(self.trial.number, state=TrialState.PRUNED)
        return True


def trial_hook(cfg: BenchConfig, parent_run_id: str, point: Optional[dict],
               phase: str) -> Optional[TrialHook]:
    """The hook of a halving/tpe grid run: the running trial of its point in the study of its
    method's run (`parent_run_id`); None for anything else, or when no such trial exists."""
    if phase != "grid" or cfg.sweep is None or cfg.sweep.strategy == "grid":
        return None
    from optuna.trial import TrialState

    try:
        study = load_study(cfg, parent_run_id)
    except KeyError:  # no study: a grid run started by hand
        return None
    key = point_key(point or {})
    mine = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if t.user_attrs.get(POINT_ATTR) == key]
    return TrialHook(cfg, study, live(study, mine[-1])) if mine else None
