"""Our progress, as a person running a benchmark sees it: one line per run started and ended,
an overall bar (every run's optimiser steps, with an ETA) above the bar of the run in training.

Lines go to the `peft_bench.progress` logger, which the CLI's console shows when everything
else (Prefect's task lines, MLflow's, transformers') goes to the run's log file only; inside a
flow they also go to Prefect's run logger, so they are in the Prefect UI. The overall bar
exists only in the process that runs the benchmark's runs itself (`dispatch: local`).
"""
from __future__ import annotations

import logging
from typing import Optional

from tqdm.auto import tqdm

from tasks.common.names import PROGRESS_LOGGER as LOGGER

_overall: Optional[tqdm] = None


def say(message: str, prefect: bool = True) -> None:
    logging.getLogger(LOGGER).info(message)
    if prefect:
        from prefect import get_run_logger
        from prefect.exceptions import MissingContextError

        try:
            get_run_logger().info(message)
        except MissingContextError:  # outside a flow run: the console line is enough
            pass


def start_overall(total_steps: int, runs: int) -> None:
    """The bar over every run's steps of a benchmark run in this process."""
    global _overall
    close_overall()
    _overall = tqdm(total=total_steps, desc=f"benchmark ({runs} runs)", position=0,
                    unit="step", mininterval=1.0, dynamic_ncols=True)


def step_done(n: int = 1) -> None:
    if _overall is not None:
        _overall.update(n)


def close_overall() -> None:
    global _overall
    if _overall is not None:
        _overall.close()
        _overall = None


def close_all() -> None:
    """Every bar still drawn, closed (a run that failed mid-training leaves its own open), so
    an error line that follows starts on a line of its own, not after a bar's last frame."""
    for bar in list(getattr(tqdm, "_instances", ())):
        if bar is not _overall:  # the run bars first: they clear their line and move up
            bar.close()
    close_overall()  # then the overall bar: its last frame stays, and a new line begins


def run_bar(total: int, initial: int, desc: str) -> tqdm:
    """The bar of the run in training, under the overall one when there is one."""
    return tqdm(total=total, initial=initial, desc=desc, leave=False, mininterval=1.0,
                position=1 if _overall is not None else 0, dynamic_ncols=True)
