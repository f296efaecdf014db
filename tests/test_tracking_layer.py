"""The one place runs are created (tasks/tracking/runs.new_run): every run carries a role and
its owner, and no tag value leaves the process with a credential in it."""
from __future__ import annotations

import os

import psutil
import pytest
from mlflow.tracking import MlflowClient

from tasks.common import names
from tasks.tracking import runs


def _store(tmp_path) -> tuple[MlflowClient, str]:
    c = runs.client_at(f"sqlite:///{tmp_path}/m.db")
    return c, c.create_experiment("layer")


def test_a_new_run_carries_its_role_and_this_process_as_owner(tmp_path):
    c, eid = _store(tmp_path)
    rid = runs.new_run(c, eid, "lora [bench]", {names.ROLE: names.ROLE_AGGREGATE})
    tags = c.get_run(rid).data.tags
    host, pid, started = tags[names.OWNER].rsplit(":", 2)
    # The oracle is psutil on this very process, not owner_tag().
    assert int(pid) == os.getpid()
    assert abs(float(started) - psutil.Process().create_time()) < 0.01
    assert tags[names.ROLE] == names.ROLE_AGGREGATE and c.get_run(rid).info.run_name == "lora [bench]"


def test_a_given_owner_is_kept(tmp_path):
    c, eid = _store(tmp_path)
    rid = runs.new_run(c, eid, "copy", {names.ROLE: names.ROLE_CHILD}, owner="elsewhere:1:2.00")
    assert c.get_run(rid).data.tags[names.OWNER] == "elsewhere:1:2.00"


@pytest.mark.parametrize("tags", [{}, {names.ROLE: ""}, {names.METHOD: "lora"}])
def test_a_run_without_a_role_is_refused_before_anything_is_written(tmp_path, tags):
    c, eid = _store(tmp_path)
    with pytest.raises(ValueError, match=names.ROLE):
        runs.new_run(c, eid, "x", tags)
    assert c.search_runs([eid]) == []


def test_tag_values_are_redacted(tmp_path):
    c, eid = _store(tmp_path)
    rid = runs.new_run(c, eid, "x", {names.ROLE: names.ROLE_CHILD,
                                     names.ERROR: "GET https://bob:hunter2@example.org/x failed"})
    assert "hunter2" not in c.get_run(rid).data.tags[names.ERROR]
