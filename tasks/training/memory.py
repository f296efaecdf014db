"""Peak memory of one method alone.

On CUDA: torch's max_memory_allocated after a reset. On CPU: the process's resident set
sampled in a background thread, minus the level when the method started. The process-wide
`ru_maxrss` is wrong for a benchmark of several methods in one process: it never goes down,
so each method would inherit the previous one's peak.
"""
from __future__ import annotations

import contextlib
import ctypes
import threading

import psutil
import torch


class PeakMemory:
    """`with PeakMemory(device) as pm: ...` then `pm.peak_mb` (MB above the start level)."""

    def __init__(self, device: str | torch.device = "cpu", interval_s: float = 0.005):
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.peak_mb = 0.0
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start = self._max = self._carry = 0

    def _rss(self) -> int:
        return self._proc.memory_info().rss

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._max = max(self._max, self._rss())

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
            self._max = self._rss()

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            _trim()  # hand freed heap back to the OS, so the start level is not inflated
            self._start = self._max = self._rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
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
