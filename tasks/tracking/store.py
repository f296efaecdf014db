"""The one place that reads runs from MLflow: every filter string is built here, from quoted
values, and every search pages to the end.

Why one place: MLflow's filter grammar is SQL-like text. A value pasted into it unquoted breaks
the query (a benchmark called "o'brien's nightly" failed every run after training), and
`search_runs` returns at most one page (1,000 runs by default): past a year of nightly
benchmarks, stale runs were missed and histories cut, silently.

MLflow's parser takes a string in single or in double quotes and does not unescape anything
inside (mlflow 3.17: `'o\\'brien'` matches nothing). So a value is written in whichever quote
it does not contain; a value holding both kinds is searched by its longest quote-free piece
(LIKE) and the runs are then compared exactly here. Every result is compared exactly anyway:
what a caller asked for is what it gets, whatever the store's collation or LIKE does.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping, Optional

from mlflow.entities import Run, ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tasks.common import names

PAGE = 1000  # MLflow's default page; larger pages are no faster on sqlite
NEWEST, OLDEST = "attributes.start_time DESC", "attributes.start_time ASC"
# MLflow's own rule for run ids (mlflow.utils.validation._RUN_ID_REGEX).
RUN_ID = re.compile(r"^[a-zA-Z0-9][\w\-]{0,255}$")


class UnknownRun(LookupError):
    """A run id the store does not hold, or that is not a run id at all (CLI exit 2)."""


def literal(value: str) -> Optional[str]:
    """`value` as a filter-string literal, or None when it holds both quote kinds."""
    value = str(value)
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    return None


def _condition(key: str, value: str) -> Optional[str]:
    column = f"tags.`{key}`"
    quoted = literal(value)
    if quoted is not None:
        return f"{column} = {quoted}"
    piece = max(re.split(r"['\"]", str(value)), key=len)  # narrows the search; exact match below
    return f"{column} LIKE '%{piece}%'" if piece else None


@dataclass(frozen=True)
class Query:
    """Runs whose tags equal `tags` exactly (and with that status, if given)."""

    tags: Mapping[str, str] = field(default_factory=dict)
    status: Optional[str] = None

    def where(self) -> str:
        parts = [c for k, v in self.tags.items() if (c := _condition(k, v))]
        if self.status:
            parts.append(f"attributes.status = '{self.status}'")
        return " and ".join(parts)

    def matches(self, run: Run) -> bool:
        tags = run.data.tags
        return (all(tags.get(k) == str(v) for k, v in self.tags.items())
                and (self.status is None or run.info.status == self.status))


def search(client: MlflowClient, experiment_id: str, query: Query, order_by: str = OLDEST,
           limit: Optional[int] = None, view: int = ViewType.ACTIVE_ONLY) -> list[Run]:
    """Every run of the experiment that matches `query` (at most `limit`), in `order_by` order,
    paging through the store."""
    out: list[Run] = []
    token = None
    while limit is None or len(out) < limit:
        page = client.search_runs([experiment_id], query.where(), run_view_type=view,
                                  max_results=PAGE, order_by=[order_by, "attributes.run_id ASC"],
                                  page_token=token)
        out.extend(r for r in page if query.matches(r))
        token = page.token
        if not token:
            break
    return out[:limit] if limit is not None else out


def first(client: MlflowClient, experiment_id: str, query: Query,
          order_by: str = NEWEST) -> Optional[Run]:
    found = search(client, experiment_id, query, order_by, limit=1)
    return found[0] if found else None


# ---------------------------------------------------------------- runs by id and experiment

def get_run(client: MlflowClient, run_id: str, what: str = "run") -> Run:
    """The run, or UnknownRun naming the id and the store (no MLflow traceback)."""
    from tasks.common.secrets import redact

    store = redact(str(client.tracking_uri))
    if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id):
        raise UnknownRun(f"{what} {run_id!r} is not an MLflow run id (32 hex digits, as "
                         f"`peft-bench compare` and the MLflow UI show them)")
    try:
        return client.get_run(run_id)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise UnknownRun(f"{what} {run_id!r} is not in the tracking store {store}") from None
        raise


def experiment_id(client: MlflowClient, name: str) -> Optional[str]:
    exp = client.get_experiment_by_name(name)
    return exp.experiment_id if exp is not None else None


# ---------------------------------------------------------------- what peft-bench asks for

def parent_query(benchmark: Optional[str] = None, config_hash: Optional[str] = None,
                 data_digest: Optional[str] = None, status: Optional[str] = None) -> Query:
    tags = {names.ROLE: names.ROLE_PARENT}
    for key, value in ((names.BENCHMARK, benchmark), (names.CONFIG_HASH, config_hash),
                       (names.DATA_DIGEST, data_digest)):
        if value is not None:
            tags[key] = value
    return Query(tags, status)


def parents(client: MlflowClient, experiment_id: str, limit: Optional[int] = None,
            **criteria) -> list[Run]:
    """Benchmark parent runs, newest first (criteria: benchmark, config_hash, data_digest,
    status)."""
    return search(client, experiment_id, parent_query(**criteria), NEWEST, limit)


def children(client: MlflowClient, experiment_id: str, parent_run_id: str,
             status: Optional[str] = None, tags: Optional[Mapping[str, str]] = None) -> list[Run]:
    """Runs nested under `parent_run_id` (a benchmark's (method, seed) runs, or a method run's
    grid points), oldest first; `tags` narrow them by tag name, e.g. {names.ROLE: "grid"}."""
    return search(client, experiment_id, Query({names.PARENT: parent_run_id, **(tags or {})}, status))


def children_of(client: MlflowClient, parent: Run) -> list[Run]:
    """Every child of a benchmark's parent run (deleted ones left out), oldest first; runs
    started in the same millisecond in run-id order, so every reader sees one order."""
    runs = children(client, parent.info.experiment_id, parent.info.run_id)
    return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))


def aggregates(client: MlflowClient, experiment_id: str, parent_run_id: str) -> list[Run]:
    """The per-method aggregate runs of one benchmark (also the parents of its grid points)."""
    return search(client, experiment_id, Query({names.BENCHMARK_RUN: parent_run_id,
                                                names.ROLE: names.ROLE_AGGREGATE}))


def aggregates_by_method(client: MlflowClient, experiment_id: str,
                         parent_run_id: str) -> dict[str, str]:
    """method name -> aggregate run id, for one benchmark."""
    return {r.data.tags.get(names.METHOD): r.info.run_id
            for r in aggregates(client, experiment_id, parent_run_id)}


def running(client: MlflowClient, experiment_id: str,
            tags: Optional[Mapping[str, str]] = None) -> list[Run]:
    """Every RUNNING run of the experiment (with those tags), however many there are."""
    return search(client, experiment_id, Query(tags or {}, "RUNNING"))


def by_run_key(client: MlflowClient, experiment_id: str, key: str, limit: int = 5) -> list[Run]:
    """FINISHED runs that measured the same settings, data and code (tasks/tracking/reuse.py), newest
    first."""
    return search(client, experiment_id, Query({names.RUN_KEY: key}, "FINISHED"), NEWEST, limit)
