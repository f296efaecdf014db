"""How much of the machine other processes took while we measured.

A timing taken while another job ran is not a property of the method. This module measures,
over a window, the CPU time that processes *outside our own process tree* used, as a share of
the capacity of the CPUs this process may run on (wall time × CPUs in its affinity set):

    other_share = (busy CPU time of the CPUs in our affinity set
                   − CPU time of this process and its children)
                  / (wall seconds × CPUs in our affinity set)

Numerator and denominator count the same CPUs: under a cpuset (Docker `--cpuset-cpus`, SLURM,
Kubernetes) the host's other CPUs are busy with jobs that cannot slow ours, so their time is not
counted. Busy time is `user + nice + system + irq + softirq + steal` per CPU from /proc/stat
(psutil): steal is time a hypervisor gave to other guests, which a benchmark loses just the same.
On CUDA it also samples which other processes hold a context on the same GPU (NVML, else
`nvidia-smi`).

Pure psutil/stdlib: benchmarks and the training loop both use it, neither needs Prefect or MLflow.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import psutil

# Above this share of the machine taken by others, timings are flagged as contaminated.
DEFAULT_THRESHOLD = 0.2


BUSY_FIELDS = ("user", "nice", "system", "irq", "softirq", "steal")


def _stat_cpu_ids() -> Optional[list[int]]:
    """The ids of /proc/stat's `cpuN` lines, in order; None where there is no /proc/stat.

    psutil lists those lines in order, and the kernel leaves offline CPUs out (e.g. SMT turned
    off), so list position N is not always CPU N."""
    try:
        with open("/proc/stat", "rb") as f:
            return [int(line.split()[0][3:]) for line in f
                    if line.startswith(b"cpu") and line[3:4].isdigit()]
    except (OSError, ValueError):
        return None


def _per_cpu_times() -> dict:
    """CPU id -> psutil's times of that CPU."""
    times = psutil.cpu_times(percpu=True)
    ids = _stat_cpu_ids()
    if ids is None or len(ids) != len(times):
        ids = list(range(len(times)))
    return dict(zip(ids, times))


def _affinity() -> Optional[frozenset[int]]:
    """The CPUs this process may run on; None where the OS does not say (all CPUs)."""
    with contextlib.suppress(AttributeError, OSError):
        return frozenset(os.sched_getaffinity(0)) or None
    return None


def _busy_seconds(cpus: Optional[frozenset[int]]) -> float:
    """Busy time summed over `cpus` (all CPUs when None)."""
    per_cpu = _per_cpu_times()
    return sum(getattr(t, f, 0.0) for cpu, t in per_cpu.items()
               if cpus is None or cpu in cpus for f in BUSY_FIELDS)


def _own_seconds(proc: psutil.Process) -> float:
    """CPU time of this process, its live descendants and its reaped children."""
    total = 0.0
    with contextlib.suppress(psutil.Error):
        t = proc.cpu_times()
        total += t.user + t.system + t.children_user + t.children_system
    with contextlib.suppress(psutil.Error):
        for child in proc.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                c = child.cpu_times()
                total += c.user + c.system
    return total


def _n_cpus(cpus: Optional[frozenset[int]]) -> int:
    return len(cpus) if cpus else (psutil.cpu_count() or 1)


def cpu_count() -> int:
    """CPUs this process may run on (its affinity set, else all of them)."""
    return _n_cpus(_affinity())


def other_gpu_processes(device_index: int = 0) -> Optional[set[int]]:
    """PIDs of other processes with a compute context on the GPU; None when unknowable."""
    me = os.getpid()
    try:
        import pynvml  # nvidia-ml-py; ships with many CUDA stacks

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        pids = {p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)}
        return pids - {me}
    except Exception:  # noqa: BLE001 - no NVML, no driver, or no permission: try nvidia-smi
        pass
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-compute-apps=pid", "--format=csv,noheader",
                              f"--id={device_index}"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return {int(x) for x in out.stdout.split() if x.strip().isdigit()} - {me}


@dataclass
class LoadReading:
    wall_s: float
    cpus: int  # CPUs in the affinity set: the ones other_cpu_s was counted on
    other_cpu_s: float
    gpu_others: Optional[int] = None  # most other GPU processes seen at once; None: not sampled
    gpu_pids: set[int] = field(default_factory=set)

    @property
    def other_share(self) -> float:
        """Share of the capacity of our CPUs (`cpus`: the affinity set) that other processes
        used (0..1)."""
        if self.wall_s <= 0:
            return 0.0
        return min(1.0, max(0.0, self.other_cpu_s / (self.wall_s * self.cpus)))

    def contaminated(self, threshold: float = DEFAULT_THRESHOLD) -> bool:
        return self.other_share > threshold or bool(self.gpu_others)


class MachineLoad:
    """`with MachineLoad() as load: ...` then `load.reading`. With `gpu_index` set, a thread
    samples other processes on that GPU every `gpu_interval_s`."""

    def __init__(self, gpu_index: Optional[int] = None, gpu_interval_s: float = 2.0,
                 job_root: bool = False):
        self.gpu_index = gpu_index
        self.gpu_interval_s = gpu_interval_s
        self.reading: Optional[LoadReading] = None
        # Under torchrun the job's other ranks are ours: count the launcher's whole tree.
        self._proc = psutil.Process(os.getppid() if job_root else None)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._gpu_max: Optional[int] = None
        self._gpu_pids: set[int] = set()

    def _sample_gpu(self) -> None:
        while True:
            pids = other_gpu_processes(self.gpu_index or 0)
            if pids is not None:
                self._gpu_max = max(self._gpu_max or 0, len(pids))
                self._gpu_pids |= pids
            if self._stop.wait(self.gpu_interval_s):
                return

    def __enter__(self) -> "MachineLoad":
        # One affinity set for the whole window: the CPUs whose busy time is counted are the
        # CPUs whose capacity is the denominator.
        self._cpus = _affinity()
        self._t0, self._busy0, self._own0 = (time.perf_counter(), _busy_seconds(self._cpus),
                                             _own_seconds(self._proc))
        if self.gpu_index is not None:
            self._thread = threading.Thread(target=self._sample_gpu, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=10)
        wall = time.perf_counter() - self._t0
        other = ((_busy_seconds(self._cpus) - self._busy0)
                 - (_own_seconds(self._proc) - self._own0))
        self.reading = LoadReading(wall, _n_cpus(self._cpus), max(0.0, other), self._gpu_max,
                                   set(self._gpu_pids))
