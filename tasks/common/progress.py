"""Our progress, as a person running a benchmark sees it: one line per run started and ended,
an overall bar (every run's optimiser steps, with an ETA) above the bar of the run in training.

Lines go to the `peft_bench.progress` logger, which the CLI's console shows when everything
else (Prefect's task lines, MLflow's, transformers') goes to the run's log file only; inside a
flow they also go to Prefect's run logger, so they are in the Prefect UI. The overall bar
exists only in the process that runs the benchmark's runs itself (`dispatch: local`).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, TextIO

from tqdm.auto import tqdm

from tasks.common.names import PROGRESS_LOGGER as LOGGER

_overall: Optional[tqdm] = None
# In a torchrun rank that owns the run: the file the launcher follows (relay/follow below).
_relay: Optional[TextIO] = None


def say(message: str, prefect: bool = True) -> None:
    if _relay is not None:
        _emit("L", message)
        return
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
    if _relay is not None:
        _emit("S", str(n))
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


def run_bar(total: int, initial: int, desc: str, disable: bool = False) -> tqdm:
    """The bar of the run in training, under the overall one when there is one."""
    if _relay is not None:  # the launcher draws it
        _emit("B", f"{total} {initial} {desc}")
        disable = True
    return tqdm(total=total, initial=initial, desc=desc, leave=False, mininterval=1.0,
                disable=disable,
                position=1 if _overall is not None else 0, dynamic_ncols=True)


# ---------------------------------------------------------------- across processes (torchrun)
# The rank that owns a distributed run writes its progress as lines to a file, which the flow
# process follows and replays: "L <line>" (say), "B <total> <initial> <desc>" (a run bar),
# "S <n>" (steps done). One line per event, flushed, so a killed rank leaves whole lines.

def relay(path: Path) -> None:
    global _relay
    _relay = open(path, "a", encoding="utf-8", buffering=1)


def _emit(kind: str, text: str) -> None:
    _relay.write(f"{kind} {text.replace(chr(10), ' ')}\n")


class Follower:
    """Replays a relay file in this process: `poll()` reads what was added since the last."""

    def __init__(self, path: Path):
        self.path, self.offset, self.bar = path, 0, None

    def poll(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, encoding="utf-8") as f:
            f.seek(self.offset)
            while (line := f.readline()).endswith("\n"):
                self.offset = f.tell()
                self._replay(*line.rstrip("\n").split(" ", 1))

    def _replay(self, kind: str, text: str = "") -> None:
        if kind == "L":
            say(text)
        elif kind == "B":
            total, initial, desc = text.split(" ", 2)
            self.close()
            self.bar = run_bar(int(total), int(initial), desc)
        elif kind == "S":
            if self.bar is not None:
                self.bar.update(int(text))
            step_done(int(text))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
