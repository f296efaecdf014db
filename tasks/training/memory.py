"""Memory of one method alone: the peak, and the average and 99th percentile over the
training steps.

Peak. On CUDA: torch's max_memory_allocated after a reset. On CPU: the process's resident set
sampled in a background thread, minus the level when the method started. The process-wide
`ru_maxrss` is wrong for a benchmark of several methods in one process: it never goes down,
so each method would inherit the previous one's peak.

Average and 99th percentile, as Hugging Face peft's method_comparison records them
(MetaMathQA/run.py: `memory_reserved() - init` appended after every optimiser step, then
numpy's mean and 0.99 quantile): the training loop calls `step_sample()` after each optimiser
step (tasks/train.py). On CUDA a step's sample is `memory_reserved` above the start level, the
caching allocator's whole footprint, which is what decides whether a run fits the device. On
the CPU it is the largest resident set the sampler saw during that step, above the start level:
the resident set at the step's end alone would miss the activations freed by then.
"""
from __future__ import annotations

import contextlib
import ctypes
import threading
from typing import Optional

import numpy as np
import psutil
import torch

from tasks.common import names

_active: list["PeakMemory"] = []  # the windows open now; step_sample() feeds each


def step_sample() -> None:
    """One optimiser step done: every open PeakMemory window records its step sample."""
    for window in list(_active):
        window.sample_step()


class PeakMemory:
    """`with PeakMemory(device) as pm: ...` then `pm.peak_mb` (MB above the start level),
    `pm.avg_mb` and `pm.p99_mb` over the steps sampled (None when no step was)."""

    def __init__(self, device: str | torch.device = "cpu", interval_s: float = 0.005):
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.peak_mb = 0.0
        self.step_mb: list[float] = []  # one sample per optimiser step, MB above the start
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # the sampler and step_sample share _max and _window
        self._thread: threading.Thread | None = None
        self._start = self._max = self._carry = self._window = 0
        self._start_reserved = 0  # CUDA: the caching allocator's footprint at the start

    def _rss(self) -> int:
        return self._proc.memory_info().rss

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self._lock:
                rss = self._rss()
                self._max = max(self._max, rss)
                self._window = max(self._window, rss)

    def sample_step(self) -> None:
        if self.device.type == "cuda":
            above = torch.cuda.memory_reserved(self.device) - self._start_reserved
        else:
            with self._lock:  # this step's largest reading, and the next step starts from now
                now = self._rss()
                self._max = max(self._max, now)  # no step sample above the peak
                above, self._window = max(self._window, now) - self._start, now
        self.step_mb.append(max(above, 0) / 2**20)

    @property
    def avg_mb(self) -> Optional[float]:
        return float(np.mean(self.step_mb)) if self.step_mb else None

    @property
    def p99_mb(self) -> Optional[float]:
        # numpy's default (linear) quantile, as peft's method_comparison computes it
        return float(np.quantile(self.step_mb, 0.99)) if self.step_mb else None

    def metrics(self) -> dict[str, float]:
        """The run's memory metrics (names.PEAK_MEMORY, MEMORY_AVG, MEMORY_P99); the last two
        only when a step was sampled (a run resumed at its end trains no step)."""
        out = {names.PEAK_MEMORY: self.peak_mb}
        if self.step_mb:
            out |= {names.MEMORY_AVG: self.avg_mb, names.MEMORY_P99: self.p99_mb}
        return out

    def _peak_so_far(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return max(self._max, self._rss())

    @contextlib.contextmanager
    def excluded(self):
        """Leave a block out of the peak (e.g. writing a checkpoint only to measure its size)."""
        self._carry = max(self._carry, self._peak_so_far())
        yield
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _trim()
            with self._lock:
                self._max = self._window = self._rss()

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()  # the previous method's cached blocks are not this one's
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            self._start_reserved = torch.cuda.memory_reserved(self.device)
        else:
            _trim()  # hand freed heap back to the OS, so the start level is not inflated
            self._start = self._max = self._window = self._rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        _active.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _active.remove(self)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        else:
            self._stop.set()
            self._thread.join()
        peak = max(self._carry, self._peak_so_far())
        self.peak_mb = max(peak - self._start, 0) / 2**20


def _trim() -> None:
    """glibc keeps freed small blocks in its heap; malloc_trim returns them to the OS so RSS
    reflects live memory. A no-op where glibc is absent."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
