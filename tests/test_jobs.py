"""A job is a value (flows/orchestration/jobs.py): dispatchers key states by it, and the
failed-runs tags read its fields, never a re-parsed string."""
from __future__ import annotations

from flows.benchmark import failed_tags
from flows.orchestration.jobs import Job
from tasks.common import names


def test_jobs_key_states_and_equal_jobs_are_one_key():
    a = Job("lora", 42, "p", {"lr": 1e-4}, "grid")
    states = {a: "FAILED", Job("lora", 42, "p"): "COMPLETED"}
    states[Job("lora", 42, "p", {"lr": 1e-4}, "grid")] = "COMPLETED"  # the same job again
    assert len(states) == 2 and states[a] == "COMPLETED"
    assert Job("lora", 42, "p", {"lr": 1e-3}, "grid") not in states  # another point


def test_how_a_job_is_named():
    assert Job("lora", 42, "p").key == "lora/seed=42"
    assert Job("lora", 42, "p").is_final and not Job("lora", 42, "m", {"lr": 1e-4}, "grid").is_final
    assert Job("lora", 42, "m", {"lr": 1e-4}, "grid").key.startswith("grid:lora/seed=42/")


def test_failed_tags_come_from_the_jobs_fields():
    # A method name that holds the old separator: splitting "/seed=" would have cut it short.
    finals = {Job("a/seed=x", 1, "p"): "FAILED", Job("a/seed=x", 2, "p"): "COMPLETED",
              Job("full", 1, "p"): "CRASHED", Job("full", 2, "p"): "COMPLETED"}
    assert failed_tags(finals) == {names.FAILED_METHODS: "a/seed=x,full",
                                   names.FAILED_RUNS: "a/seed=x/seed=1,full/seed=1"}
    assert failed_tags({Job("full", 1, "p"): "COMPLETED"}) == {names.FAILED_METHODS: "",
                                                              names.FAILED_RUNS: ""}
