"""The CLI's table cells: a log-scale interval (time, memory, throughput) is printed by its ends,
since it is not symmetric about the geometric mean; a linear one as mean ± half-width."""
from __future__ import annotations

import math
from types import SimpleNamespace

from scipy import stats as st

from flows.cli.display import _cell as cell_of  # the one cell formatter; a test may take it
from tasks.analysis import stats
from tasks.common import names


def _agg(**ivs):
    return SimpleNamespace(stats=ivs, timing_warnings=[])


def test_a_time_interval_is_printed_by_its_ends_and_never_below_zero():
    iv = stats.log_interval([0.5, 3.0])
    logs = [math.log(0.5), math.log(3.0)]
    half = st.t.ppf(0.975, 1) * st.tstd(logs) / math.sqrt(2)  # oracle: scipy on the logs
    low, high = math.exp(sum(logs) / 2 - half), math.exp(sum(logs) / 2 + half)
    text = cell_of(_agg(**{names.TRAIN_TIME: iv}), names.TRAIN_TIME, "{:.6f}", True)
    assert text == f"{math.sqrt(1.5):.6f} [{low:.6f}, {high:.6f}]"
    assert "±" not in text and "-" not in text


def test_accuracy_keeps_mean_plus_minus_half_width():
    iv = stats.t_interval([0.8, 0.9])
    text = cell_of(_agg(**{names.ACCURACY: iv}), names.ACCURACY, "{:.4f}", True)
    assert text.startswith("0.8500 ± ") and "[" not in text
