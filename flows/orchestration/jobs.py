"""The finetune flow runs a benchmark starts: one per grid point (a sweep's first phase) and
one per (method, seed) final run, whichever way they are dispatched."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from tasks.config.schema import BenchConfig
from tasks.config.sweep import label


@dataclass(frozen=True)
class Job:
    """One finetune flow run. Jobs key the states a dispatch returns; `key` is only how one is
    named to a person (console lines, the flow's result, the failed-runs tag)."""
    method: str
    seed: int
    parent_run_id: str  # the benchmark's run (a final run) or the method's run (a grid point)
    point: dict = field(default_factory=dict, hash=False)  # a dict: equal jobs hash alike anyway
    phase: str = "final"  # or "grid"

    @property
    def is_final(self) -> bool:
        return self.phase == "final"

    @property
    def key(self) -> str:
        key = f"{self.method}/seed={self.seed}"
        return key if self.is_final else f"grid:{key}/{label(self.point)}"

    def flow_run_name(self, benchmark: str) -> str:
        if self.phase == "grid":
            return f"{benchmark}-{self.method}-grid-{label(self.point)}"
        return f"{benchmark}-{self.method}-seed{self.seed}"

    def parameters(self, config: dict) -> dict:
        return {"config": config, "method_name": self.method, "parent_run_id": self.parent_run_id,
                "seed": self.seed, "point": self.point or None, "phase": self.phase}


States = dict[Job, str]  # each job's final Prefect state type, e.g. COMPLETED, FAILED


def final_jobs(cfg: BenchConfig, parent_run_id: str,
               chosen: Optional[dict[str, Optional[dict]]] = None) -> list[Job]:
    """Every (method, seed) in the rotated run order; with a sweep, at the method's chosen
    point, and none for a method whose every grid point failed."""
    jobs = []
    for _, seed, name in cfg.runs():
        if chosen is None:
            jobs.append(Job(name, seed, parent_run_id))
        elif chosen.get(name) is not None:
            jobs.append(Job(name, seed, parent_run_id, chosen[name]))
    return jobs


def grid_jobs(cfg: BenchConfig, method_runs: dict[str, str]) -> list[Job]:
    """Every grid point, under the first seed, as a child of its method's run."""
    seed = cfg.training.run_seeds[0]
    return [Job(name, seed, method_runs[name], point, "grid") for name, point in cfg.grid_jobs()]
